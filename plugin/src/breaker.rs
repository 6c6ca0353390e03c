//! The circuit breaker on the request path: admit on the request headers, record the outcome
//! when the stream ends, hand batches over on the tick. The state machine itself is
//! `breakwater_policies::breaker`; this is how it meets shared data and the worker's
//! [`Watch`] of it.
//!
//! A healthy request on a quiet breaker makes no host call here: the worker's view admits it,
//! and its success joins the worker's batch, handed over on the tick. Everything else (a
//! failure, a probe, a breaker that is failing, suspect, open past its period or half-open)
//! goes through the shared state with a CAS, so it is exact across workers. A change the other
//! workers must know of is sent to them at once ([`refresh`]).

use crate::host::Host;
use crate::outcome::{Ignored, Verdict};
use crate::reply::Refusal;
use crate::vm::{message, Vm};
use crate::watch::{View, Watch};
use crate::{config, store, Compiled, Policy};
use alloc::format;
use alloc::rc::Rc;
use alloc::string::String;
use breakwater_policies::breaker::Step;
use breakwater_policies::{Admission, Batch, Forced, Outcome, Recorded, Transition, TripReason, SECOND};

/// A call the breaker admitted: its outcome is reported with its generation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Call {
    pub generation: u32,
    pub probe: bool,
}

/// The breaker's decision on a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admit {
    /// Go on; report the outcome (None: go on uncounted, as a dry-run would-be rejection or
    /// while forced closed).
    Pass(Option<Call>),
    /// Refused with `circuit-open`; the reply is sent.
    Rejected,
}

/// A view known for longer than this (with traffic) is read again, in case a message was lost.
const REFRESH_NS: u64 = SECOND;

fn watch(c: &Rc<Compiled>, p: &Policy, vm: &Vm) -> Option<Rc<Watch>> {
    let w = p.watch(|| vm.watches.of(&p.breaker_key))?;
    vm.watches.touch(&w, c, p.index);
    Some(w)
}

/// Admission on the request headers.
pub fn admit(c: &Rc<Compiled>, p: &Policy, host: &impl Host, vm: &Vm) -> Admit {
    let Some(b) = &p.cfg.breaker else { return Admit::Pass(None) };
    let admission = match b.force {
        // Forced by the configuration: no shared state, no watch, nothing recorded.
        Some(Forced::Closed) => None,
        Some(Forced::Open) => Some(Admission::Reject { retry_after_ns: b.machine.open_for_ns }),
        None => automatic(c, p, b, host, vm),
    };
    match admission {
        // Forced closed: go on, uncounted.
        None => Admit::Pass(None),
        Some(Admission::Allow { generation }) => Admit::Pass(Some(Call { generation, probe: false })),
        Some(Admission::Probe { generation }) => Admit::Pass(Some(Call { generation, probe: true })),
        Some(Admission::Reject { retry_after_ns }) => match p.cfg.mode {
            config::Mode::Enforce => {
                p.local(|l| l.counts.reject(Refusal::CircuitOpen));
                vm.list(c, p);
                crate::fallback::refuse(host, vm, p, Refusal::CircuitOpen, retry_after_ns, None);
                Admit::Rejected
            }
            // Would have been rejected: count it, let it pass, and keep its outcome out of the
            // breaker so that dry_run walks through exactly the states enforce would.
            config::Mode::DryRun => {
                p.local(|l| l.counts.dry_run_reject(Refusal::CircuitOpen));
                vm.list(c, p);
                Admit::Pass(None)
            }
        },
    }
}

/// How far an open breaker's end must be from the last clock read for a request to be rejected
/// without reading the clock: ticks read it every `sync_interval` (at most 10 s), so this covers
/// a tick late by a stalled event loop, too.
const OPEN_CLOCK_MARGIN: u64 = 11 * breakwater_policies::SECOND;

/// Admission by the shared state (the breaker's own, or an operator's force): the worker's
/// view when it can decide, else the shared state itself. None: forced closed.
fn automatic(c: &Rc<Compiled>, p: &Policy, b: &config::Breaker, host: &impl Host, vm: &Vm) -> Option<Admission> {
    // No watch (cannot happen in practice): fail open, under a generation that cannot exist.
    let Some(w) = watch(c, p, vm) else { return Some(Admission::Allow { generation: u32::MAX }) };
    w.active.set(true);
    Some(match w.view.get() {
        View::Quiet { generation } => Admission::Allow { generation },
        View::ForcedClosed => return None,
        View::ForcedOpen => Admission::Reject { retry_after_ns: b.machine.open_for_ns },
        // Far from its end, an open breaker rejects by the last clock read (at most a tick old)
        // and saves the read (~1k instructions of a fast-fail's ~30k); near it, the clock is
        // read, so the first request after `open_for` is the probe, to the millisecond.
        View::Open { until } if until.saturating_sub(vm.coarse_now()) > OPEN_CLOCK_MARGIN => {
            Admission::Reject { retry_after_ns: until - vm.coarse_now() }
        }
        View::Open { until } => match vm.clock(host) {
            now if now < until => Admission::Reject { retry_after_ns: until - now },
            now => exactly(p, &w, host, vm, now),
        },
        View::Unknown | View::Failing | View::Suspect | View::HalfOpen => exactly(p, &w, host, vm, vm.clock(host)),
    })
}

/// Admission against the shared state (a CAS when it takes a probe slot or confirms a trip).
fn exactly(p: &Policy, w: &Watch, host: &impl Host, vm: &Vm, now: u64) -> Admission {
    let Some(b) = &p.cfg.breaker else { return Admission::Allow { generation: 0 } };
    match store::update(host, &p.breaker_key, |s| s.admit(&b.machine, now)) {
        Some((step, view)) => {
            saw(p, w, host, vm, view, now, step.transition);
            step.value
        }
        // Shared data failing us entirely: fail open, the breaker must never become the outage.
        // The call is counted under no generation that could exist, so it changes nothing.
        None => Admission::Allow { generation: u32::MAX },
    }
}

/// Takes in what a CAS on the shared state showed: the new view, the transition made (stats,
/// log line), and tells the other workers if they must know.
fn saw(p: &Policy, w: &Watch, host: &impl Host, vm: &Vm, view: View, now: u64, t: Option<Transition>) {
    let before = w.view.replace(view);
    w.synced_at.set(now);
    if timed(view, now) {
        vm.hurry(host);
    }
    transitioned(p, host, t);
    // A transition, a run of failures starting, or a rate trip awaiting confirmation: the other
    // workers drop their view and hand over their successes now.
    let news =
        t.is_some() || matches!((before, view), (View::Quiet { .. } | View::Unknown, View::Failing | View::Suspect));
    if news {
        vm.broadcast(host, &message::about(message::REFRESH, &p.breaker_key));
    }
}

/// Accounting when the stream ends: `verdict` of a call the breaker admitted (None: it never
/// reached the upstream, so only a probe slot it held goes back), `slow` if it was.
pub fn record(
    c: &Rc<Compiled>,
    p: &Policy,
    host: &impl Host,
    vm: &Vm,
    call: Call,
    verdict: Option<Verdict>,
    slow: bool,
) {
    let Some(b) = &p.cfg.breaker else { return };
    let Some(w) = watch(c, p, vm) else { return };
    let Some(verdict) = verdict else {
        if call.probe {
            release_probe(p, &w, host, vm, call);
        }
        return;
    };
    p.local(|l| {
        match verdict {
            Verdict::Success => l.counts.success += 1,
            Verdict::Failure => l.counts.failure += 1,
            Verdict::Ignored(why) => l.counts.ignore(why, 1),
        }
        l.counts.slow += u32::from(slow);
    });
    vm.list(c, p);
    let failure = match verdict {
        Verdict::Ignored(_) => {
            if call.probe {
                release_probe(p, &w, host, vm, call);
            }
            return;
        }
        Verdict::Success => false,
        Verdict::Failure => true,
    };
    // A closed-state success on a quiet breaker joins the worker's batch, handed over on the
    // tick: the common case writes no shared data. While the breaker is failing or suspect it
    // goes at once, to end a run of failures or to weigh in on a rate, for every worker; so
    // does a slow call, which may tip the slow-call rate.
    if !failure && !call.probe && !slow {
        let quiet = matches!(w.view.get(), View::Quiet { generation } if generation == call.generation)
            || w.view.get() == View::Unknown;
        if quiet {
            add_to_batch(p, &w, call.generation, slow, vm.coarse_now());
            return;
        }
    }
    let now = vm.clock(host);
    let outcome = Outcome { failure, slow };
    let jitter = splitmix64(now);
    let pending = w.take_batch();
    let step = store::update(host, &p.breaker_key, |s| {
        // This worker's earlier successes come first, so a failure after them counts from zero.
        let before = s.record_successes(&b.machine, now, pending);
        let stale_batch = before.value == Recorded::Stale;
        before.and(s.record(&b.machine, now, call.generation, outcome, jitter)).map(|r| (r, stale_batch))
    });
    if let Some((step, view)) = step {
        let (recorded, stale_batch) = step.value;
        let stale = u32::from(recorded == Recorded::Stale) + if stale_batch { pending.successes } else { 0 };
        p.local(|l| l.counts.ignore(Ignored::Stale, stale));
        saw(p, &w, host, vm, view, now, step.transition);
    }
}

/// Adds a success of `generation` to the worker's batch; a batch of an older generation is
/// dropped as stale first (the breaker would drop it anyway).
fn add_to_batch(p: &Policy, w: &Watch, generation: u32, slow: bool, at: u64) {
    let mut b = w.batch.get();
    if b.generation != generation {
        let dropped = b.successes;
        p.local(|l| l.counts.ignore(Ignored::Stale, dropped));
        b = Batch { generation, ..Batch::default() };
    }
    b.successes = b.successes.saturating_add(1);
    b.slow = b.slow.saturating_add(u32::from(slow));
    b.last_at = b.last_at.max(at);
    w.batch.set(b);
}

fn release_probe(p: &Policy, w: &Watch, host: &impl Host, vm: &Vm, call: Call) {
    let step = store::update(host, &p.breaker_key, |s| {
        let changed = s.release_probe(call.generation);
        Step { value: (), changed, transition: None }
    });
    if let Some((_, view)) = step {
        saw(p, w, host, vm, view, vm.coarse_now(), None);
    }
}

/// How long successes may wait in a worker's batch: one bucket of the breaker's window (so a
/// window's counts are at most a bucket late), at least `sync_interval`, at most a second.
fn handover_ns(c: &Compiled, p: &Policy) -> u64 {
    let bucket = p.cfg.breaker.as_ref().map_or(SECOND, |b| b.machine.window_ns / 10);
    bucket.clamp(c.sync_interval_ns, SECOND.max(c.sync_interval_ns))
}

/// Hands the batch over and reads the shared state: the view is fresh, a suspect breaker is
/// confirmed (or cleared), an open one past its period turns half-open.
fn sync(p: &Policy, w: &Watch, host: &impl Host, vm: &Vm, now: u64) {
    let Some(b) = &p.cfg.breaker else { return };
    let pending = w.take_batch();
    let step = store::update(host, &p.breaker_key, |s| {
        let recorded = s.record_successes(&b.machine, now, pending);
        let stale = recorded.value == Recorded::Stale;
        recorded.and(s.confirm(&b.machine, now)).and(s.expire(now)).map(|()| stale)
    });
    match step {
        Some((step, view)) => {
            if step.value {
                p.local(|l| l.counts.ignore(Ignored::Stale, pending.successes));
            }
            saw(p, w, host, vm, view, now, step.transition);
        }
        None => w.batch.set(pending),
    }
}

/// The tick, for every breaker this worker watches: hands a batch over once it is due, keeps
/// a suspect or open breaker moving on time, refreshes an active view now and then (a safety
/// net: changes come as messages), and forgets a view nobody used for a while.
/// Returns whether a breaker on this worker is timed to the tick (see `timed`): the tick must
/// keep the fine pace.
pub fn tick(host: &impl Host, vm: &Vm, now: u64) -> bool {
    let mut timed_any = false;
    for w in vm.watches.listed() {
        let Some((c, i)) = w.owner() else {
            vm.watches.unlist(&w);
            continue;
        };
        let Some(p) = c.policy(i) else { continue };
        if w.active.replace(false) {
            w.used_at.set(now);
        }
        let since = now.saturating_sub(w.synced_at.get());
        let batch = w.batch.get().successes > 0;
        let due = match w.view.get() {
            View::Suspect => true,
            View::Open { until } => now >= until,
            View::Unknown => batch,
            _ => (batch && since >= handover_ns(&c, p)) || since >= REFRESH_NS,
        };
        if due {
            sync(p, &w, host, vm, now);
        }
        let idle = now.saturating_sub(w.used_at.get()) >= REFRESH_NS;
        let watching = matches!(w.view.get(), View::Suspect | View::Open { .. });
        timed_any |= timed(w.view.get(), now);
        if idle && !watching && w.batch.get().successes == 0 {
            w.view.set(View::Unknown);
            vm.watches.unlist(&w);
        }
    }
    timed_any
}

/// A view the tick must move on time, at the fine pace: a trip awaiting confirmation, or an
/// open breaker within a coarse tick of turning half-open (until then, a request near the end
/// reads the clock itself, and the tick only moves the state gauges).
fn timed(view: View, now: u64) -> bool {
    match view {
        View::Suspect => true,
        View::Open { until } => until.saturating_sub(now) <= crate::tick::COARSE_NS,
        _ => false,
    }
}

/// Another worker changed breaker `key`: drop the view, hand over the batch now (so a run of
/// failures or a rate trip is judged with every worker's successes).
pub fn refresh(host: &impl Host, vm: &Vm, key: &[u8]) {
    let Some(w) = vm.watches.find(key) else { return };
    w.view.set(View::Unknown);
    if w.batch.get().successes == 0 {
        return;
    }
    let Some((c, i)) = w.owner() else { return };
    if let Some(p) = c.policy(i) {
        let now = vm.clock(host);
        sync(p, &w, host, vm, now);
    }
}

/// What an operator can do to a breaker, for all workers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// Force open or closed (`Some`), or release to automatic (`None`).
    Force(Option<Forced>),
    /// A fresh closed breaker, not forced.
    Reset,
}

/// Applies an operator's command to the shared breaker and tells every worker; returns the
/// state names before and after (see [`crate::metrics::STATES`]), or None if shared data failed.
pub fn command(
    c: &Rc<Compiled>,
    p: &Policy,
    host: &impl Host,
    vm: &Vm,
    cmd: Command,
) -> Option<(&'static str, &'static str)> {
    let w = watch(c, p, vm)?;
    let (mut before, mut after) = ("closed", "closed");
    let (step, view) = store::update(host, &p.breaker_key, |s| {
        before = crate::metrics::state_name(s, None);
        let step = match cmd {
            Command::Force(forced) => s.force(forced),
            Command::Reset => s.reset(),
        };
        after = crate::metrics::state_name(s, None);
        step
    })?;
    saw(p, &w, host, vm, view, vm.clock(host), step.transition);
    Some((before, after))
}

/// Stats and the log line of a transition, made by whichever worker made it.
pub fn transitioned(p: &Policy, host: &impl Host, t: Option<Transition>) {
    let Some(t) = t else { return };
    let m = p.metrics(host);
    let (state, why) = describe(t);
    let index = match t {
        Transition::Opened { .. } => Some(0),
        Transition::HalfOpened => Some(1),
        Transition::Closed => Some(2),
        Transition::Forced(_) | Transition::Reset => None,
    };
    if let Some(id) = index.and_then(|i| m.transitions.get(i).copied()) {
        crate::metrics::add(host, id, 1);
    }
    m.set_state(host, state);
    log::info!("policy {}: circuit {}: {}", p.name(), state.replace('_', "-"), why);
}

/// A transition as the log line names it: the state entered (`open`, `half_open`, `closed`,
/// `forced_open`, `forced_closed`) and why, e.g. ("open", "5 consecutive failures; open for 30s").
/// `breakwater simulate` reports its transitions in these very words.
pub fn describe(t: Transition) -> (&'static str, String) {
    match t {
        Transition::Opened { reason, period_ns } => {
            let why = match reason {
                TripReason::ConsecutiveFailures(n) => format!("{n} consecutive failures"),
                TripReason::FailureRate { percent, requests } => {
                    format!("failure rate {percent}% of {requests} requests")
                }
                TripReason::SlowCalls { percent, requests } => format!("slow calls {percent}% of {requests} requests"),
                TripReason::ProbeFailed => "a half-open probe failed".into(),
                TripReason::ProbeSlow => "a half-open probe was slow".into(),
            };
            ("open", format!("{why}; open for {}", fmt_duration(period_ns)))
        }
        Transition::HalfOpened => ("half_open", String::from("open period over; probing")),
        Transition::Closed => ("closed", String::from("probes succeeded")),
        Transition::Forced(Some(Forced::Open)) => ("forced_open", String::from("forced open by an operator")),
        Transition::Forced(Some(Forced::Closed)) => {
            ("forced_closed", String::from("forced closed (disabled) by an operator"))
        }
        Transition::Forced(None) => ("closed", String::from("released to automatic by an operator")),
        Transition::Reset => ("closed", String::from("reset by an operator: counts cleared")),
    }
}

/// "250ms", "10s", "1.5s": readable in a log line.
fn fmt_duration(ns: u64) -> String {
    let ms = ns / 1_000_000;
    match ms {
        0..=999 => format!("{ms}ms"),
        _ if ms.is_multiple_of(1000) => format!("{}s", ms / 1000),
        _ => format!("{}.{}s", ms / 1000, format!("{:03}", ms % 1000).trim_end_matches('0')),
    }
}

/// A cheap mix of the clock for jitter; no need for cryptographic randomness here. The jitter of
/// a re-opened breaker's period is `splitmix64(now)`, `now` being when the failed probe ended.
pub fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}
