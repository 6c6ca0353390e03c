//! The state decoders against bytes nobody wrote: shared data is shared with every worker, with
//! other versions of the plugin during an upgrade, and with whatever else writes under the key.
//!
//! For each state (breaker, bulkhead with its adaptive limiter, retry budget, latency histogram)
//! `decode` gets arbitrary bytes, bytes behind
//! the right version byte, states written field by field with any value in any field, and
//! valid encodings of states that operations built, cut, flipped or with a field set to an
//! extreme. It must not panic, and whatever it accepts must then survive a run of real
//! operations, with configurations across the ranges `config::parse` accepts and a clock that
//! mostly moves forward a little and now and then jumps anywhere (near `u64::MAX` too, and
//! back). `cargo test` builds with overflow checks, so an arithmetic overflow is a failure.
//!
//! After every operation:
//! * the state encodes to bytes that decode to the same state (a decoded state first goes
//!   through one encode and decode, to drop what the encoder never writes, such as a window
//!   bucket of epoch 0, which marks an unused bucket, holding counts);
//! * on a state that operations built from a fresh one, a step that says it changed nothing
//!   left it as it was (else the plugin would not write it back); a decoded state may be tidied
//!   (an empty holder dropped) without being written back, which the next write does;
//! * what the state machines promise, as far as it shows from outside: a probe only with a
//!   free probe slot, a re-trip opens for a period the configuration allows; the bulkhead never
//!   takes more permits than the limit, a class's max or the others' reservations allow, admits
//!   only below its current (adaptive) limit, keeps that limit within min and max, takes
//!   nothing for a shed request, leaves no waiter that could be admitted, and grants or refuses
//!   only waiters that were waiting; a budget withdrawal never takes more than the budget has;
//!   an adaptive timeout lies within its min and max, and a percentile within the histogram.
//!
//! Every strict prefix of a valid encoding is refused (of the latency state's 5.8 KB, a
//! sample of them): a value cut short is never read as another state.
//!
//! Deterministic: a fixed seed, no persistence of failures. `make wasm-test` runs these again as
//! wasm32 in Wasmtime (about as fast), so the case counts stay small. The strategies are boxed:
//! unboxed, their nested value trees overflowed wasm32's 1 MiB stack in a debug build.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use breakwater_policies::breaker::{RateRule, SlowRule};
use breakwater_policies::bulkhead::{Ask, Update, Waiter, MAX_LEASE};
use breakwater_policies::latency::{upper_ms, BUCKETS};
use breakwater_policies::{
    Acquire, AdaptiveConfig, Admission, Batch, BreakerConfig, BreakerState, BudgetConfig, BudgetState, BulkheadConfig,
    BulkheadState, ClassLimit, Forced, Histogram, Latencies, LatencyState, Outcome, Phase, TimeoutRule, Transition, MS,
    SECOND,
};
use core::fmt::Debug;
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, RngAlgorithm, RngSeed};

const HOUR: u64 = 3600 * SECOND;
const DAY: u64 = 24 * HOUR;

/// Cases per state type: about a second each natively in a debug build.
const CASES: u32 = 400;

/// A fixed seed, so every run tries the same cases. `FUZZ_SEED` and `FUZZ_CASES` in the
/// environment try others, for a longer search by hand (a failure prints its minimal input).
fn config() -> Config {
    let env = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
    Config {
        cases: env("FUZZ_CASES").map_or(CASES, |n| n as u32),
        failure_persistence: None,
        rng_algorithm: RngAlgorithm::ChaCha,
        rng_seed: RngSeed::Fixed(env("FUZZ_SEED").unwrap_or(0x00b2_ea4a_7e2d_ec0d)),
        ..Config::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Time, counts, bytes

/// A moment: anywhere, early, around now (wall clock in ns), or within an hour of `u64::MAX`.
fn time() -> BoxedStrategy<u64> {
    prop_oneof![
        any::<u64>(),
        0..100 * SECOND,
        1_700_000_000 * SECOND..1_700_000_100 * SECOND,
        u64::MAX - HOUR..=u64::MAX,
        Just(0),
        Just(u64::MAX),
    ]
    .boxed()
}

/// When an operation happens: mostly a little after the one before, now and then anywhere.
#[derive(Clone, Copy, Debug)]
enum When {
    After(u64),
    At(u64),
}

fn when() -> BoxedStrategy<When> {
    prop_oneof![
        6 => (0..20 * MS).prop_map(When::After),
        3 => (0..5 * SECOND).prop_map(When::After),
        1 => (0..300 * SECOND).prop_map(When::After),
        1 => time().prop_map(When::At),
    ]
    .boxed()
}

struct Clock(u64);

impl Clock {
    fn tick(&mut self, w: When) -> u64 {
        self.0 = match w {
            When::After(d) => self.0.saturating_add(d),
            When::At(t) => t,
        };
        self.0
    }
}

/// A count: small, or at the edges of u32.
fn count() -> BoxedStrategy<u32> {
    prop_oneof![0..20u32, Just(u32::MAX), Just(u32::MAX - 1), any::<u32>()].boxed()
}

/// One change to a valid encoding.
#[derive(Clone, Debug)]
enum Mutation {
    Truncate(Index),
    Flip(Index, u8),
    Insert(Index, u8),
    Remove(Index),
    /// Overwrites 1, 4 or 8 bytes at the index with an extreme value.
    Extreme(Index, usize, u64),
}

fn mutation() -> BoxedStrategy<Mutation> {
    let extreme =
        prop_oneof![Just(0u64), Just(1), Just(u64::from(u32::MAX)), Just(u64::MAX), Just(u64::MAX - 1), any::<u64>()];
    prop_oneof![
        any::<Index>().prop_map(Mutation::Truncate),
        (any::<Index>(), 1..=255u8).prop_map(|(i, x)| Mutation::Flip(i, x)),
        (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        any::<Index>().prop_map(Mutation::Remove),
        (any::<Index>(), prop_oneof![Just(1usize), Just(4), Just(8)], extreme)
            .prop_map(|(i, w, v)| Mutation::Extreme(i, w, v)),
    ]
    .boxed()
}

fn mutate(bytes: &mut Vec<u8>, mutations: &[Mutation]) {
    for m in mutations {
        if bytes.is_empty() {
            return;
        }
        match m {
            Mutation::Truncate(i) => bytes.truncate(i.index(bytes.len())),
            Mutation::Flip(i, x) => {
                let at = i.index(bytes.len());
                bytes[at] ^= x;
            }
            Mutation::Insert(i, b) => bytes.insert(i.index(bytes.len() + 1), *b),
            Mutation::Remove(i) => {
                bytes.remove(i.index(bytes.len()));
            }
            Mutation::Extreme(i, width, v) => {
                let at = i.index(bytes.len());
                for (k, b) in v.to_le_bytes().iter().take(*width).enumerate() {
                    if let Some(slot) = bytes.get_mut(at + k) {
                        *slot = *b;
                    }
                }
            }
        }
    }
}

/// Little-endian bytes, as the states' codec writes them.
#[derive(Default)]
struct Bytes(Vec<u8>);

impl Bytes {
    fn u8(mut self, v: u8) -> Self {
        self.0.push(v);
        self
    }
    fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
}

// ---------------------------------------------------------------------------------------------
// The driver, the same for every state

type Ops<Op> = Vec<(When, Op)>;

/// A state under test.
trait Subject: Clone + PartialEq + Debug + Default {
    type Cfg: Debug;
    type Op: Debug;
    fn decode(bytes: &[u8]) -> Option<Self>;
    fn encode(&self) -> Vec<u8>;
    /// Applies `op` at `now` and checks what must hold; returns whether the step said it
    /// changed the state (None: the operation does not say). `memo` carries a value from one
    /// operation to the next (the budget's last epoch).
    fn apply(&mut self, cfg: &Self::Cfg, op: &Self::Op, now: u64, memo: &mut u64) -> Option<bool>;
}

/// What goes into `decode`.
#[derive(Clone, Debug)]
enum Input<Op> {
    Raw(Vec<u8>),
    /// Behind the version byte the decoder expects.
    Versioned(Vec<u8>),
    /// The encoding of a state that `ops` built from a fresh one at `start`, then mutated.
    Built(u64, Ops<Op>, Vec<Mutation>),
}

/// `fields`: states written field by field (the layout is written out in this file), so that
/// extreme values land in each field, not just where a mutation happens to hit.
fn input<Op: Clone + Debug + 'static>(
    op: BoxedStrategy<Op>,
    fields: BoxedStrategy<Vec<u8>>,
) -> BoxedStrategy<Input<Op>> {
    let ops = vec((when(), op), 0..30);
    prop_oneof![
        1 => vec(any::<u8>(), 0..160).prop_map(Input::Raw),
        4 => fields.prop_map(Input::Raw),
        2 => vec(any::<u8>(), 0..160).prop_map(Input::Versioned),
        2 => (time(), ops.clone()).prop_map(|(t, o)| Input::Built(t, o, Vec::new())),
        5 => (time(), ops, vec(mutation(), 1..4)).prop_map(|(t, o, m)| Input::Built(t, o, m)),
    ]
    .boxed()
    .boxed()
}

/// Runs `ops`; `built`: on a state that operations built from a fresh one.
fn run<S: Subject>(s: &mut S, cfg: &S::Cfg, ops: &[(When, S::Op)], clock: &mut Clock, built: bool) {
    let mut memo = 0;
    for (w, op) in ops {
        let before = s.clone();
        let now = clock.tick(*w);
        let changed = s.apply(cfg, op, now, &mut memo);
        if built && changed == Some(false) {
            assert_eq!(*s, before, "{op:?} at {now} said it changed nothing");
        }
        let bytes = s.encode();
        assert_eq!(S::decode(&bytes).as_ref(), Some(&*s), "encode → decode after {op:?} at {now}");
    }
}

fn fuzz<S: Subject>(cfg: &S::Cfg, input: &Input<S::Op>, start: u64, ops: &[(When, S::Op)]) {
    let bytes = match input {
        Input::Raw(b) => b.clone(),
        Input::Versioned(b) => [&S::default().encode()[..1], b].concat(),
        Input::Built(t, built_by, m) => {
            let mut s = S::default();
            run(&mut s, cfg, built_by, &mut Clock(*t), true);
            let mut b = s.encode();
            // Every cut of a short encoding; of a long one (the latency state's 5.8 KB) the
            // first and last 64 and every 97th between, or the check alone takes minutes.
            let near_an_end = |cut: &usize| *cut < 64 || *cut + 64 > b.len() || cut.is_multiple_of(97);
            for cut in (0..b.len()).filter(near_an_end) {
                assert_eq!(S::decode(&b[..cut]), None, "{cut} of {} bytes of {s:?}", b.len());
            }
            mutate(&mut b, m);
            b
        }
    };
    let Some(decoded) = S::decode(&bytes) else { return };
    let once = decoded.encode();
    let Some(mut s) = S::decode(&once) else { panic!("the encoding of {decoded:?} does not decode") };
    assert_eq!(s.encode(), once, "encode → decode → encode of {decoded:?}");
    run(&mut s, cfg, ops, &mut Clock(start), false);
}

// ---------------------------------------------------------------------------------------------
// The breaker

/// A breaker configuration within what `config::parse` accepts.
fn breaker_config() -> BoxedStrategy<BreakerConfig> {
    let rate = (1..=100u8, prop_oneof![1..10u32, 1..=1_000_000u32])
        .prop_map(|(threshold, minimum_requests)| RateRule { threshold, minimum_requests });
    let slow = (MS..=HOUR, 1..=100u8, prop_oneof![1..10u32, 1..=1_000_000u32])
        .prop_map(|(duration_ns, threshold, minimum_requests)| SlowRule { duration_ns, threshold, minimum_requests });
    (
        (prop_oneof![Just(0u32), 1..10u32, Just(1_000_000)], proptest::option::of(rate), proptest::option::of(slow)),
        (100 * MS..=HOUR, prop_oneof![MS..=10 * SECOND, MS..=DAY], any::<Index>()),
        (prop_oneof![1..4u32, Just(1000)], prop_oneof![1..4u32, Just(1000)], MS..=HOUR, 20 * MS..=20 * SECOND),
    )
        .prop_map(|((consecutive_failures, failure_rate, slow_call), (window_ns, open_for_ns, max), probes)| {
            let (max_probes, successes_to_close, probe_timeout_ns, confirm_ns) = probes;
            // max_open_for: from open_for to a day.
            let max_open_for_ns = open_for_ns + max.index((DAY - open_for_ns + 1) as usize) as u64;
            BreakerConfig {
                consecutive_failures,
                failure_rate,
                slow_call,
                window_ns,
                open_for_ns,
                max_open_for_ns,
                max_probes,
                successes_to_close,
                probe_timeout_ns,
                confirm_ns,
            }
        })
        .boxed()
}

/// A window bucket as the breaker writes it: slot, epoch, total, failures, slow.
type WindowBucket = (u8, u64, u32, u32, u32);

/// A time window's buckets as the breaker writes them.
fn window_fields() -> BoxedStrategy<Vec<WindowBucket>> {
    let slot = prop_oneof![20 => 0..10u8, 1 => any::<u8>()];
    vec((slot, prop_oneof![0..30u64, time()], count(), count(), count()), 0..=10).boxed()
}

/// A breaker state, field by field: version 3, generation, forced, phase, consecutive failures,
/// the run's failure times, suspect_since, open period, bucket length, window.
fn breaker_fields() -> BoxedStrategy<Vec<u8>> {
    let phase = prop_oneof![
        Just((0u8, 0u64, 0u32, 0u32)),
        time().prop_map(|until| (1, until, 0, 0)),
        (time(), count(), count()).prop_map(|(at, probes, successes)| (2, at, probes, successes)),
    ];
    let forced = prop_oneof![12 => Just(0u8), 4 => 1..3u8, 1 => any::<u8>()];
    (
        (any::<u32>(), forced, phase, count(), vec(time(), 0..=32)),
        (proptest::option::of(time()), prop_oneof![time(), MS..=DAY], prop_oneof![any::<u64>(), Just(SECOND)]),
        window_fields(),
    )
        .prop_map(|((generation, forced, phase, consecutive, run), (suspect, period, bucket_ns), window)| {
            let mut b = Bytes::default().u8(3).u32(generation).u8(forced).u8(phase.0);
            b = match phase.0 {
                1 => b.u64(phase.1),
                2 => b.u32(phase.2).u32(phase.3).u64(phase.1),
                _ => b,
            };
            b = b.u32(consecutive).u8(run.len() as u8);
            for t in run {
                b = b.u64(t);
            }
            b = match suspect {
                None => b.u8(0),
                Some(t) => b.u8(1).u64(t),
            };
            b = b.u64(period).u64(bucket_ns).u8(window.len() as u8);
            for (slot, epoch, total, failures, slow) in window {
                b = b.u8(slot).u64(epoch).u32(total).u32(failures).u32(slow);
            }
            b.0
        })
        .boxed()
}

/// Which generation an outcome is reported with.
#[derive(Clone, Copy, Debug)]
enum Generation {
    Current,
    Previous,
    Any(u32),
}

impl Generation {
    fn of(self, s: &BreakerState) -> u32 {
        match self {
            Generation::Current => s.generation,
            Generation::Previous => s.generation.wrapping_sub(1),
            Generation::Any(g) => g,
        }
    }
}

fn generation() -> BoxedStrategy<Generation> {
    prop_oneof![
        4 => Just(Generation::Current),
        1 => Just(Generation::Previous),
        1 => any::<u32>().prop_map(Generation::Any),
    ]
    .boxed()
}

#[derive(Clone, Debug)]
enum BreakerOp {
    Admit,
    /// Generation, outcome, jitter.
    Record(Generation, Outcome, u64),
    /// A batch: generation, successes, of which slow, the last one this long ago (or at any time).
    RecordSuccesses(Generation, u32, u32, When),
    Confirm,
    Force(Option<Forced>),
    ReleaseProbe(Generation),
}

fn breaker_op() -> BoxedStrategy<BreakerOp> {
    let outcome =
        (prop::bool::weighted(0.3), prop::bool::weighted(0.3)).prop_map(|(failure, slow)| Outcome { failure, slow });
    let forced = prop_oneof![Just(None), Just(Some(Forced::Open)), Just(Some(Forced::Closed))];
    prop_oneof![
        3 => Just(BreakerOp::Admit),
        4 => (generation(), outcome, any::<u64>()).prop_map(|(g, o, j)| BreakerOp::Record(g, o, j)),
        2 => (generation(), count(), count(), when()).prop_map(|(g, n, slow, at)| BreakerOp::RecordSuccesses(g, n, slow, at)),
        1 => Just(BreakerOp::Confirm),
        1 => forced.prop_map(BreakerOp::Force),
        1 => generation().prop_map(BreakerOp::ReleaseProbe),
    ]
.boxed()
}

impl Subject for BreakerState {
    type Cfg = BreakerConfig;
    type Op = BreakerOp;
    fn decode(bytes: &[u8]) -> Option<Self> {
        BreakerState::decode(bytes)
    }
    fn encode(&self) -> Vec<u8> {
        BreakerState::encode(self)
    }
    fn apply(&mut self, cfg: &BreakerConfig, op: &BreakerOp, now: u64, _: &mut u64) -> Option<bool> {
        Some(match *op {
            BreakerOp::Admit => {
                let step = self.admit(cfg, now);
                if let Admission::Probe { .. } = step.value {
                    let ok = matches!(self.phase, Phase::HalfOpen { probes, .. } if probes <= cfg.max_probes);
                    assert!(ok, "a probe admitted without a free slot: {self:?}");
                }
                step.changed
            }
            BreakerOp::Record(g, outcome, jitter) => {
                let step = self.record(cfg, now, g.of(self), outcome, jitter);
                if let Some(Transition::Opened { period_ns, .. }) = step.transition {
                    let allowed = cfg.open_for_ns..=cfg.max_open_for_ns;
                    assert!(allowed.contains(&period_ns), "open for {period_ns} ns under {cfg:?}");
                }
                step.changed
            }
            BreakerOp::RecordSuccesses(g, successes, slow, last) => {
                let last_at = match last {
                    When::After(d) => now.saturating_sub(d),
                    When::At(t) => t,
                };
                let batch = Batch { generation: g.of(self), successes, slow, last_at };
                self.record_successes(cfg, now, batch).changed
            }
            BreakerOp::Confirm => self.confirm(cfg, now).changed,
            BreakerOp::Force(f) => self.force(f).changed,
            BreakerOp::ReleaseProbe(g) => self.release_probe(g.of(self)),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// The bulkhead

/// An adaptive limit as `config::parse` makes them: min ≤ initial ≤ max, tolerance 1–10,
/// window 100ms–1m; `max` is the bulkhead's `max_concurrent`.
fn adaptive_config(max: u32) -> BoxedStrategy<AdaptiveConfig> {
    (any::<Index>(), any::<Index>(), 1000..=10_000u32, 100 * MS..=60 * SECOND)
        .prop_map(move |(min, initial, tolerance_milli, window_ns)| {
            let min = 1 + min.index(max as usize) as u32;
            let initial = min + initial.index((max - min + 1) as usize) as u32;
            AdaptiveConfig { min, max, initial, tolerance_milli, window_ns }
        })
        .boxed()
}

/// A bulkhead configuration as `config::parse` makes them: one class without limits of its own
/// (no priority section), or up to 16 whose reservations leave every class some capacity, some
/// shed; with a fixed or an adaptive limit.
fn bulkhead_config() -> BoxedStrategy<BulkheadConfig> {
    let class = (0..4u32, proptest::option::of(1..6u32), proptest::option::of(1..=1000u32));
    let classes = prop_oneof![Just(vec![(0, None, None)]), vec(class, 1..=16)];
    (
        prop_oneof![3 => 1..12u32, 1 => 12..200u32, 1 => Just(1_000_000)],
        prop_oneof![Just(0u32), 1..5u32, Just(10_000)],
        MS..=HOUR,
        classes,
        10 * SECOND..=200 * SECOND,
        20 * MS..=20 * SECOND,
    )
        .prop_flat_map(|(max_concurrent, queue_max, queue_timeout_ns, classes, stale_after_ns, recall_timeout_ns)| {
            let adaptive = proptest::option::of(adaptive_config(max_concurrent));
            adaptive.prop_map(move |adaptive| {
                // Reservations must leave every class a permit at the lowest limit.
                let floor = adaptive.map_or(max_concurrent, |a| a.min);
                let mut limits = Vec::new();
                let mut reserved = 0u32;
                for &(r, max, shed_at_milli) in &classes {
                    // Keep the parser's rules: reserved ≤ max ≤ max_concurrent, and a permit for
                    // every class beyond all the others' reservations.
                    let r = r.min(floor.saturating_sub(1).saturating_sub(reserved) / 2);
                    let max = max.map(|m| m.max(r).max(1).min(max_concurrent));
                    reserved += r;
                    limits.push(ClassLimit { reserved: r, max, shed_at_milli });
                }
                BulkheadConfig {
                    max_concurrent,
                    queue_max,
                    queue_timeout_ns,
                    classes: limits,
                    stale_after_ns,
                    recall_timeout_ns,
                    adaptive,
                }
            })
        })
        .boxed()
}

fn worker() -> BoxedStrategy<u32> {
    prop_oneof![4 => 1..4u32, 1 => any::<u32>()].boxed()
}

fn ticket() -> BoxedStrategy<u32> {
    prop_oneof![4 => 1..6u32, 1 => any::<u32>()].boxed()
}

fn class() -> BoxedStrategy<u8> {
    prop_oneof![8 => 0..3u8, 1 => 0..17u8, 1 => any::<u8>()].boxed()
}

/// A limiter as the bulkhead writes it: a presence flag (now and then another byte), then the
/// limit (thousandths), baseline, window start, sum, count and peak.
fn limiter_fields() -> BoxedStrategy<Vec<u8>> {
    let big = || prop_oneof![0..200_000u64, any::<u64>(), Just(u64::MAX)];
    prop_oneof![
        3 => Just(vec![0u8]),
        6 => (big(), big(), time(), big(), count(), count())
            .prop_map(|(limit, baseline, since, sum, n, peak)| {
                Bytes::default().u8(1).u64(limit).u64(baseline).u64(since).u64(sum).u32(n).u32(peak).0
            }),
        1 => any::<u8>().prop_map(|b| vec![b]),
    ]
    .boxed()
}

/// A bulkhead state, field by field: version 3, holders (worker, seen_at, lease, draining,
/// permits by class), waiters (worker, ticket, class, since, recall_only), the limiter.
fn bulkhead_fields() -> BoxedStrategy<Vec<u8>> {
    let holder = (worker(), time(), count(), any::<bool>(), vec(count(), 0..4));
    let waiter = (worker(), ticket(), class(), time(), any::<bool>());
    (vec(holder, 0..5), vec(waiter, 0..6), limiter_fields())
        .prop_map(|(holders, waiters, limiter)| {
            let mut b = Bytes::default().u8(3).u8(holders.len() as u8);
            for (worker, seen_at, lease, draining, active) in holders {
                b = b.u32(worker).u64(seen_at).u32(lease).u8(u8::from(draining)).u8(active.len() as u8);
                for n in active {
                    b = b.u32(n);
                }
            }
            b = b.u32(waiters.len() as u32);
            for (worker, ticket, class, since, recall_only) in waiters {
                b = b.u32(worker).u32(ticket).u8(class).u64(since).u8(u8::from(recall_only));
            }
            b.0.extend(limiter);
            b.0
        })
        .boxed()
}

/// Whom an operation is about: someone in the state (a holder, a waiter), or anyone.
#[derive(Clone, Copy, Debug)]
enum Who {
    Existing(Index),
    Anyone(u32, u32),
}

fn who() -> BoxedStrategy<Who> {
    prop_oneof![
        3 => any::<Index>().prop_map(Who::Existing),
        1 => (worker(), ticket()).prop_map(|(w, t)| Who::Anyone(w, t)),
    ]
    .boxed()
}

#[derive(Clone, Debug)]
enum BulkheadOp {
    Ask(Ask),
    /// Worker, class, ticket, may_wait.
    Acquire(u32, u8, u32, bool),
    /// A holder and one of the classes it holds, or anyone's class.
    Release(Who, u8),
    /// A waiter.
    Withdraw(Who),
    /// A holder.
    Renew(Who),
    /// A holder, keep, draining.
    TrimLease(Who, u32, bool),
    /// A holder (or anyone) hands over latency samples: their sum (ms) and count.
    Adapt(Who, u64, u32),
}

fn bulkhead_op() -> BoxedStrategy<BulkheadOp> {
    let ask = (worker(), class(), ticket(), any::<bool>(), any::<bool>(), any::<bool>()).prop_map(
        |(worker, class, ticket, may_wait, may_pause, lease)| Ask { worker, class, ticket, may_wait, may_pause, lease },
    );
    let keep = prop_oneof![0..4u32, count()];
    prop_oneof![
        5 => ask.prop_map(BulkheadOp::Ask),
        1 => (worker(), class(), ticket(), any::<bool>()).prop_map(|(w, c, k, m)| BulkheadOp::Acquire(w, c, k, m)),
        4 => (who(), class()).prop_map(|(w, c)| BulkheadOp::Release(w, c)),
        2 => who().prop_map(BulkheadOp::Withdraw),
        1 => who().prop_map(BulkheadOp::Renew),
        2 => (who(), keep, any::<bool>()).prop_map(|(w, k, d)| BulkheadOp::TrimLease(w, k, d)),
        2 => (who(), prop_oneof![0..100_000u64, any::<u64>()], count()).prop_map(|(w, s, n)| BulkheadOp::Adapt(w, s, n)),
    ]
    .boxed()
}

/// A holder as its encoding shows it: worker, permits by class.
type Holding = (u32, Vec<u32>);
/// A waiter as its encoding shows it: worker, ticket, class.
type Waiting = (u32, u32, u8);

/// The holders and waiters of a bulkhead state, read from its encoding (the state keeps them
/// private).
fn parse(s: &BulkheadState) -> (Vec<Holding>, Vec<Waiting>) {
    let b = s.encode();
    let u32_at = |at: usize| u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
    let mut holders = Vec::new();
    let mut at = 2;
    for _ in 0..b[1] {
        // worker u32, seen_at u64, lease u32, draining u8, then the per-class counts.
        let worker = u32_at(at);
        at += 4 + 8 + 4 + 1;
        let classes = usize::from(b[at]);
        holders.push((worker, (0..classes).map(|c| u32_at(at + 1 + 4 * c)).collect()));
        at += 1 + 4 * classes;
    }
    let n = u32_at(at) as usize;
    at += 4;
    let waiters = (0..n).map(|i| at + i * 18).map(|w| (u32_at(w), u32_at(w + 4), b[w + 8])).collect();
    (holders, waiters)
}

fn waiters(s: &BulkheadState) -> Vec<Waiting> {
    parse(s).1
}

/// A holder's worker (and a class it holds, else `class`), or anyone's.
fn holder(s: &BulkheadState, who: Who, class: u8) -> (u32, u8) {
    let holders = parse(s).0;
    match who {
        Who::Existing(i) if !holders.is_empty() => {
            let (worker, active) = &holders[i.index(holders.len())];
            let held = active.iter().position(|n| *n > 0).map_or(class, |c| c as u8);
            (*worker, held)
        }
        Who::Existing(_) => (1, class),
        Who::Anyone(worker, _) => (worker, class),
    }
}

/// A waiter's worker and ticket, or anyone's.
fn waiter(s: &BulkheadState, who: Who) -> (u32, u32) {
    let waiting = waiters(s);
    match who {
        Who::Existing(i) if !waiting.is_empty() => {
            let (worker, ticket, _) = waiting[i.index(waiting.len())];
            (worker, ticket)
        }
        Who::Existing(_) => (1, 1),
        Who::Anyone(worker, ticket) => (worker, ticket),
    }
}

/// The promises the bulkhead keeps, as far as they show from outside.
#[derive(Debug, PartialEq)]
struct Sound {
    /// No more permits taken than `max_concurrent`.
    within_limit: bool,
    /// Per class, no more than its max.
    within_class_max: Vec<bool>,
    /// Within the limit, the permits left cover every class's reservation it does not use.
    reservations_kept: bool,
    /// No waiter could be admitted.
    no_admissible_waiter: bool,
}

fn sound(s: &BulkheadState, cfg: &BulkheadConfig) -> Sound {
    let unused: u64 =
        cfg.classes.iter().enumerate().map(|(c, l)| u64::from(l.reserved.saturating_sub(s.active_of(c)))).sum();
    Sound {
        within_limit: s.active() <= cfg.max_concurrent,
        within_class_max: cfg
            .classes
            .iter()
            .enumerate()
            .map(|(c, l)| l.max.is_none_or(|m| s.active_of(c) <= m))
            .collect(),
        reservations_kept: s.active() <= cfg.max_concurrent && u64::from(cfg.max_concurrent - s.active()) >= unused,
        no_admissible_waiter: waiters(s).iter().all(|w| !s.admissible(cfg, usize::from(w.2))),
    }
}

/// What held before an operation holds after it.
fn kept(before: &Sound, after: &Sound, what: &dyn Fn() -> String) {
    assert!(!before.within_limit || after.within_limit, "{}: over max_concurrent", what());
    for (c, (b, a)) in before.within_class_max.iter().zip(&after.within_class_max).enumerate() {
        assert!(!b || *a, "{}: class {c} over its max", what());
    }
    assert!(!before.reservations_kept || after.reservations_kept, "{}: a reservation eaten into", what());
    assert!(
        !before.no_admissible_waiter || after.no_admissible_waiter,
        "{}: a waiter left that could be admitted",
        what()
    );
}

fn parts<T>(u: Update<T>) -> (bool, Vec<Waiter>, Vec<Waiter>) {
    (u.changed, u.granted, u.refused)
}

impl Subject for BulkheadState {
    type Cfg = BulkheadConfig;
    type Op = BulkheadOp;
    fn decode(bytes: &[u8]) -> Option<Self> {
        BulkheadState::decode(bytes)
    }
    fn encode(&self) -> Vec<u8> {
        BulkheadState::encode(self)
    }
    fn apply(&mut self, cfg: &BulkheadConfig, op: &BulkheadOp, now: u64, _: &mut u64) -> Option<bool> {
        let before = self.clone();
        let sound_before = sound(self, cfg);
        let waiting_before = waiters(self);
        // An admission takes a permit only below the current limit.
        let admitted = |s: &BulkheadState, value: &Acquire| {
            if matches!(value, Acquire::Admitted | Acquire::Leased(_)) {
                assert!(s.active() <= s.limit(cfg), "{op:?}: admitted past the limit {}", s.limit(cfg));
            }
        };
        let (changed, granted, refused) = match *op {
            BulkheadOp::Ask(ask) => {
                let u = self.ask(cfg, now, ask);
                if let Acquire::Leased(n) = u.value {
                    assert!((1..=MAX_LEASE).contains(&n), "{op:?}: a lease of {n}");
                }
                if matches!(u.value, Acquire::Queued | Acquire::Full | Acquire::Shed) && u.granted.is_empty() {
                    assert!(self.active() <= before.active(), "{op:?}: took a permit without saying so");
                }
                if u.value == Acquire::Shed {
                    assert!(self.queued() <= before.queued(), "{op:?}: a shed request waits");
                }
                admitted(self, &u.value);
                parts(u)
            }
            BulkheadOp::Acquire(worker, class, ticket, may_wait) => {
                let u = self.acquire(cfg, now, worker, class, ticket, may_wait);
                assert!(!matches!(u.value, Acquire::Leased(_)), "acquire never leases");
                admitted(self, &u.value);
                parts(u)
            }
            BulkheadOp::Release(who, class) => {
                let (worker, class) = holder(self, who, class);
                parts(self.release(cfg, now, worker, class))
            }
            BulkheadOp::Withdraw(who) => {
                let (worker, ticket) = waiter(self, who);
                parts(self.withdraw(cfg, now, worker, ticket))
            }
            BulkheadOp::Renew(who) => parts(self.renew(cfg, now, holder(self, who, 0).0)),
            BulkheadOp::TrimLease(who, keep, draining) => {
                parts(self.trim_lease(cfg, now, holder(self, who, 0).0, keep, draining))
            }
            BulkheadOp::Adapt(who, sum_ms, count) => {
                let u = self.adapt(cfg, now, holder(self, who, 0).0, Latencies { sum_ms, count });
                let (min, max) = cfg.adaptive.map_or((cfg.max_concurrent, cfg.max_concurrent), |a| (a.min, a.max));
                assert!((min..=max).contains(&u.value.limit), "{op:?}: limit {} under {cfg:?}", u.value.limit);
                assert_eq!(u.value.limit, self.limit(cfg));
                parts(u)
            }
        };
        kept(&sound_before, &sound(self, cfg), &|| format!("{op:?} at {now} on {before:?}"));
        // A waiter handed a permit, or refused, was waiting, and is not any more (unless the
        // same request just asked again).
        let waiting = waiters(self);
        let asked = match *op {
            BulkheadOp::Ask(a) => Some((a.worker, a.ticket, a.class)),
            BulkheadOp::Acquire(worker, class, ticket, _) => Some((worker, ticket, class)),
            _ => None,
        };
        let n = |list: &[Waiting], key| list.iter().filter(|x| **x == key).count();
        for w in granted.iter().chain(&refused) {
            let key = (w.worker, w.ticket, w.class);
            assert!(waiting_before.contains(&key), "{op:?}: {w:?} was not waiting");
            let again = usize::from(asked == Some(key));
            assert!(n(&waiting, key) < n(&waiting_before, key) + again, "{op:?}: {w:?} still waits");
        }
        Some(changed)
    }
}

// ---------------------------------------------------------------------------------------------
// The retry budget

/// A budget configuration within what `config::parse` accepts.
fn budget_config() -> BoxedStrategy<BudgetConfig> {
    (
        prop_oneof![Just(0u32), 0..=1000u32, Just(1000)],
        prop_oneof![Just(0u32), 0..100u32, Just(1_000_000)],
        SECOND..=60 * SECOND,
    )
        .prop_map(|(ratio_milli, min_per_second, ttl_ns)| BudgetConfig { ratio_milli, min_per_second, ttl_ns })
        .boxed()
}

/// A budget state, field by field: version 1, then buckets (slot, epoch, deposits, withdrawals).
fn budget_fields() -> BoxedStrategy<Vec<u8>> {
    let slot = prop_oneof![20 => 0..11u8, 1 => any::<u8>()];
    vec((slot, prop_oneof![0..30u64, time()], count(), count()), 0..=11)
        .prop_map(|buckets| {
            let mut b = Bytes::default().u8(1).u8(buckets.len() as u8);
            for (slot, epoch, deposits, withdrawals) in buckets {
                b = b.u8(slot).u64(epoch).u32(deposits).u32(withdrawals);
            }
            b.0
        })
        .boxed()
}

#[derive(Clone, Debug)]
enum BudgetOp {
    Deposit(u32),
    Withdraw(u32),
    /// Into the epoch of the last withdrawal, or any.
    Refund(Option<u64>, u32),
    Overdraw(u32),
    /// Only reads.
    Available,
}

fn budget_op() -> BoxedStrategy<BudgetOp> {
    prop_oneof![
        2 => count().prop_map(BudgetOp::Deposit),
        3 => prop_oneof![0..12u32, count()].prop_map(BudgetOp::Withdraw),
        2 => (prop_oneof![Just(None), any::<u64>().prop_map(Some)], count()).prop_map(|(e, n)| BudgetOp::Refund(e, n)),
        1 => count().prop_map(BudgetOp::Overdraw),
        1 => Just(BudgetOp::Available),
    ]
    .boxed()
}

impl Subject for BudgetState {
    type Cfg = BudgetConfig;
    type Op = BudgetOp;
    fn decode(bytes: &[u8]) -> Option<Self> {
        BudgetState::decode(bytes)
    }
    fn encode(&self) -> Vec<u8> {
        BudgetState::encode(self)
    }
    fn apply(&mut self, cfg: &BudgetConfig, op: &BudgetOp, now: u64, last_epoch: &mut u64) -> Option<bool> {
        match *op {
            BudgetOp::Deposit(n) => self.deposit(cfg, now, n),
            BudgetOp::Withdraw(want) => {
                let available = self.available(cfg, now);
                let (got, epoch) = self.withdraw(cfg, now, want);
                assert!(got <= want && got <= available, "{op:?}: got {got} of {available} available");
                assert_eq!(epoch, cfg.epoch(now));
                *last_epoch = epoch;
            }
            BudgetOp::Refund(epoch, n) => self.refund(epoch.unwrap_or(*last_epoch), n),
            BudgetOp::Overdraw(n) => self.overdraw(cfg, now, n),
            BudgetOp::Available => {
                let _ = self.available(cfg, now);
            }
        }
        None
    }
}

// ---------------------------------------------------------------------------------------------
// The latency histogram

/// An adaptive timeout as `config::parse` makes them.
fn timeout_rule() -> BoxedStrategy<TimeoutRule> {
    (
        (1..=1000u32, 1000..=10_000u32, prop_oneof![Just(0u64), 1..=3_600_000u64]),
        (1..=3_600_000u64, any::<Index>(), prop_oneof![1..100u32, Just(1_000_000)], SECOND..=HOUR),
    )
        .prop_map(|((percentile_tenths, multiplier_milli, margin_ms), (min_ms, max, minimum_requests, window_ns))| {
            let max_ms = min_ms + max.index((3_600_000 - min_ms + 1) as usize) as u64;
            TimeoutRule { percentile_tenths, multiplier_milli, margin_ms, min_ms, max_ms, minimum_requests, window_ns }
        })
        .boxed()
}

/// A latency state, field by field: version 1, then ten slices (epoch, a count per bucket).
fn latency_fields() -> BoxedStrategy<Vec<u8>> {
    let counts = prop_oneof![Just(Vec::new()), vec(count(), 1..8)];
    let slice = (prop_oneof![0..30u64, time()], counts, any::<Index>());
    (vec(slice, 10), prop_oneof![8 => Just(0usize), 1 => 1..4usize])
        .prop_map(|(slices, cut)| {
            let mut b = Bytes::default().u8(1);
            for (epoch, some, at) in slices {
                b = b.u64(epoch);
                // A few counts somewhere among the buckets, zeros elsewhere.
                let start = at.index(BUCKETS);
                for i in 0..BUCKETS {
                    b = b.u32(i.checked_sub(start).and_then(|k| some.get(k)).copied().unwrap_or(0));
                }
            }
            // Now and then a few bytes short.
            b.0.truncate(b.0.len() - cut);
            b.0
        })
        .boxed()
}

#[derive(Clone, Debug)]
enum LatencyOp {
    /// A worker's batch: latencies (ms) and how many of each.
    Record(Vec<(u64, u32)>),
    /// Reads the timeout.
    Timeout,
}

fn latency_op() -> BoxedStrategy<LatencyOp> {
    let ms = prop_oneof![0..2000u64, any::<u64>(), Just(u64::MAX)];
    prop_oneof![
        3 => vec((ms, prop_oneof![1..5u32, count()]), 0..6).prop_map(LatencyOp::Record),
        2 => Just(LatencyOp::Timeout),
    ]
    .boxed()
}

impl Subject for LatencyState {
    type Cfg = TimeoutRule;
    type Op = LatencyOp;
    fn decode(bytes: &[u8]) -> Option<Self> {
        LatencyState::decode(bytes)
    }
    fn encode(&self) -> Vec<u8> {
        LatencyState::encode(self)
    }
    fn apply(&mut self, cfg: &TimeoutRule, op: &LatencyOp, now: u64, _: &mut u64) -> Option<bool> {
        match op {
            LatencyOp::Record(samples) => {
                let mut batch = Histogram::default();
                for &(ms, n) in samples {
                    for _ in 0..n.min(3) {
                        batch.add(ms);
                    }
                }
                let before = self.window(cfg.window_ns, now).total();
                self.record(cfg.window_ns, now, &batch);
                let after = self.window(cfg.window_ns, now).total();
                assert!(after >= before.min(after), "{op:?}");
            }
            LatencyOp::Timeout => {
                if let Some(t) = cfg.timeout_ms(self, now) {
                    assert!((cfg.min_ms..=cfg.max_ms).contains(&t), "{t} under {cfg:?}");
                }
                let all = self.window(cfg.window_ns, now);
                if let Some(p) = all.percentile(cfg.percentile_tenths) {
                    assert!(p <= upper_ms(BUCKETS - 1), "{p}");
                }
            }
        }
        None
    }
}

// ---------------------------------------------------------------------------------------------
// The tests

proptest! {
    #![proptest_config(config())]

    #[test]
    fn breaker_state_bytes_never_panic_and_what_decodes_survives_operations(
        cfg in breaker_config(),
        input in input(breaker_op(), breaker_fields()),
        start in time(),
        ops in vec((when(), breaker_op()), 0..40),
    ) {
        fuzz::<BreakerState>(&cfg, &input, start, &ops);
    }

    #[test]
    fn bulkhead_state_bytes_never_panic_and_what_decodes_survives_operations(
        cfg in bulkhead_config(),
        input in input(bulkhead_op(), bulkhead_fields()),
        start in time(),
        ops in vec((when(), bulkhead_op()), 0..40),
    ) {
        fuzz::<BulkheadState>(&cfg, &input, start, &ops);
    }

    #[test]
    fn budget_state_bytes_never_panic_and_what_decodes_survives_operations(
        cfg in budget_config(),
        input in input(budget_op(), budget_fields()),
        start in time(),
        ops in vec((when(), budget_op()), 0..40),
    ) {
        fuzz::<BudgetState>(&cfg, &input, start, &ops);
    }

    #[test]
    fn latency_state_bytes_never_panic_and_what_decodes_survives_operations(
        cfg in timeout_rule(),
        input in input(latency_op(), latency_fields()),
        start in time(),
        ops in vec((when(), latency_op()), 0..40),
    ) {
        fuzz::<LatencyState>(&cfg, &input, start, &ops);
    }
}
