//! Property tests of the request path over arbitrary host bytes (issue 9): whatever the host
//! hands over — request headers, attributes, response headers (one by one or as a malformed
//! serialized map), trailers, properties of any length, and, in the second property, shared
//! data and queue messages — nothing panics and Breakwater keeps its promises.
//!
//! Two fake workers of one process run interleaved whole streams (request headers → response
//! headers → trailers → the stream's end), ticks, cross-worker wake-ups, time passing and
//! configuration reloads, under route rules on every attribute and a policy with every feature
//! (breaker with all trip rules, bulkhead with a queue and priority classes that shed, budgeted
//! retries, an adaptive timeout, a fallback cache and static answer), a leasing bulkhead with an
//! adaptive limit (and a fallback cluster), a dry run, and a per-route instance configuration
//! (top-level `policy`). Values come from a mix: ones that match the configuration (so streams are
//! tracked), and arbitrary bytes — empty, invalid UTF-8, NUL, CR/LF, 32 and 64 KiB.
//!
//! Checked as it runs: a request the filter stops is refused at once or waits, and is then
//! answered or resumed once, never both; a request it lets through is never answered; no more
//! requests of a bulkhead are in flight than its limit, and its shared state never counts
//! more; `x-envoy-max-retries` never exceeds the policy's `max_retries`. Checked at the end:
//! every request that waited was answered or resumed by its queue timeout; once every stream
//! has ended and the workers ticked, no permit, lease or waiter is left in shared state or on
//! a worker, the `bulkhead_active` and `bulkhead_queued` gauges are back to 0, and no breaker
//! holds a probe slot.
//!
//! The second property adds what other writers can do: garbage (or another state's bytes)
//! under the policies' shared-data keys, arbitrary bytes and forged grants, refusals and
//! recalls on the workers' queues, and a clock that steps back. Then nothing may panic, a
//! stopped request is still answered or resumed at most once and by its queue timeout (a
//! cross-worker hop later if the shared state lost it), and each worker's own accounting
//! (parked requests, permits) is back to zero at the end; shared state may be wrong until the
//! garbage ages out, so it is not checked, nor are the bulkhead gauges, which follow it.
//!
//! Deterministic: a fixed seed, no failure files; `FUZZ_SEED` and `FUZZ_CASES` search further
//! by hand.

use super::{on_end, on_request_headers, on_response_headers, on_response_trailers, Action, Stream, Tracked};
use crate::bulkhead::Permit;
use crate::fake::Worker;
use crate::host::Host;
use crate::Compiled;
use alloc::format;
use alloc::rc::Rc;
use alloc::string::String;
use alloc::vec::Vec;
use breakwater_policies::{BreakerState, BulkheadState, Phase, MS};
use core::cell::RefCell;
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::{select, Index};
use proptest::test_runner::{Config, RngAlgorithm, RngSeed, TestRunner};

/// Every feature at once; small limits, so that queues fill and breakers trip.
const ALL: &str = r#"{
  "circuit_breaker": {
    "consecutive_failures": 3,
    "failure_rate": { "threshold": 50, "minimum_requests": 4, "window": "1s" },
    "slow_call": { "duration": "100ms", "threshold": 50, "minimum_requests": 4 },
    "open_for": "200ms", "max_open_for": "1s",
    "half_open": { "max_probes": 2, "successes_to_close": 2, "probe_timeout": "500ms" },
    "failure_on": { "status": ["5xx", 429], "grpc_status": ["UNAVAILABLE", "DEADLINE_EXCEEDED"],
                    "reset": true, "connect_failure": true, "timeout": true }
  },
  "bulkhead": {
    "max_concurrent": 3, "queue": { "max_size": 2, "timeout": "100ms" },
    "priority": { "header": "x-priority", "default": "standard",
                  "classes": { "critical": { "reserved": 1 }, "background": { "max": 1, "shed_at": 0.6 },
                               "standard": { "shed_at": 1 } } }
  },
  "timeout": { "adaptive": { "percentile": 90, "margin": "5ms", "min": "10ms", "max": "80ms",
                             "minimum_requests": 2, "window": "1s" } },
  "retry": {
    "retry_on": ["5xx", "reset", "retriable-status-codes", "unavailable"], "retriable_status_codes": [409],
    "max_retries": 2, "per_try_timeout": "50ms", "budget": { "ratio": 0.5, "min_per_second": 1, "ttl": "1s" }
  },
  "reject": { "status": 503, "headers": { "x-team": "core" } },
  "fallback": { "when": ["bulkhead_full", "queue_timeout", "shed"], "static": { "body": "degraded" },
                "cache": { "max_entries": 4, "max_body": 64, "key_headers": ["x-tenant"] } }
}"#;

/// Leases (no priority classes) under an adaptive limit, a breaker, retries budgeted on the
/// route's own retry policy.
const LEASING: &str = r#"{
  "circuit_breaker": { "consecutive_failures": 2, "open_for": "100ms" },
  "bulkhead": { "adaptive": { "min": 2, "max": 4 },
                "queue": { "max_size": 2, "timeout": "100ms" } },
  "retry": { "max_retries": 1, "budget": {} },
  "fallback": { "when": ["circuit_open"], "cluster": "backup" }
}"#;

const SHADOW: &str = r#"{
  "mode": "dry_run",
  "circuit_breaker": { "consecutive_failures": 1, "open_for": "100ms" },
  "bulkhead": { "max_concurrent": 1, "queue": { "max_size": 1, "timeout": "50ms" } },
  "retry": { "budget": { "ratio": 0, "min_per_second": 0, "ttl": "1s" } }
}"#;

/// Route rules on every attribute the request path reads.
fn rules() -> String {
    format!(
        r#"{{"sync_interval": "10ms", "policies": {{"all": {ALL}, "leasing": {LEASING}, "shadow": {SHADOW}}}, "routes": [
          {{"match": {{"route_name": "all"}}, "policy": "all"}},
          {{"match": {{"path_prefix": "/lease", "methods": ["GET", "POST"], "host": "*.example.com",
                      "headers": {{"x-tenant": "gold"}}, "cluster": "backend"}}, "policy": "leasing"}},
          {{"match": {{"route_name": "shadow", "methods": ["GET"]}}, "policy": "shadow"}},
          {{"match": {{"host": "api.example.com", "headers": {{"x-tenant": "gold"}}}}, "policy": "shadow"}},
          {{"match": {{"cluster": "backend"}}, "policy": "all"}}
        ]}}"#
    )
}

/// A filter instance enabled per route: every request it sees falls under `all`.
fn only() -> String {
    format!(r#"{{"sync_interval": "10ms", "policy": "all", "policies": {{"all": {ALL}}}}}"#)
}

const POLICIES: [&str; 3] = ["all", "leasing", "shadow"];

fn key(kind: &str, policy: &str) -> String {
    format!("breakwater/v1/test/{kind}/{policy}")
}

fn config(cases: u32) -> Config {
    let env = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
    Config {
        cases: env("FUZZ_CASES").map_or(cases, |n| n as u32),
        failure_persistence: None,
        rng_algorithm: RngAlgorithm::ChaCha,
        rng_seed: RngSeed::Fixed(env("FUZZ_SEED").unwrap_or(0x5eed_b4ea_4a7e_0009)),
        ..Config::default()
    }
}

// ---------------------------------------------------------------------------------------------
// What the host hands over

/// Bytes a header or attribute may hold.
fn bytes() -> BoxedStrategy<Vec<u8>> {
    prop_oneof![
        Just(Vec::new()),
        vec(any::<u8>(), 0..24),
        Just(b"crit\xe9cal".to_vec()),
        Just(b"\xff\xfe\xfd".to_vec()),
        Just(b"a\0b".to_vec()),
        Just(b"x\r\nset-cookie: y".to_vec()),
        (any::<u8>(), 1..3usize).prop_map(|(b, n)| alloc::vec![b; n << 15]),
    ]
    .boxed()
}

/// An optional value: absent, one that means something to the configuration, or any bytes.
fn value(meaningful: &'static [&'static str]) -> BoxedStrategy<Option<Vec<u8>>> {
    prop_oneof![
        1 => Just(None),
        4 => select(meaningful).prop_map(|s| Some(s.as_bytes().to_vec())),
        2 => bytes().prop_map(Some),
    ]
    .boxed()
}

/// An attribute as proxy-wasm hands it over: 8 bytes little-endian for an integer, here of any
/// length too.
fn integer(meaningful: &'static [u64]) -> BoxedStrategy<Option<Vec<u8>>> {
    prop_oneof![
        1 => Just(None),
        4 => select(meaningful).prop_map(|n| Some(n.to_le_bytes().to_vec())),
        1 => any::<u64>().prop_map(|n| Some(n.to_le_bytes().to_vec())),
        2 => bytes().prop_map(Some),
    ]
    .boxed()
}

#[derive(Clone, Debug)]
struct Request {
    route_name: Option<Vec<u8>>,
    cluster: Option<Vec<u8>>,
    path: Option<Vec<u8>>,
    method: Option<Vec<u8>>,
    authority: Option<Vec<u8>>,
    priority: Option<Vec<u8>>,
    tenant: Option<Vec<u8>>,
}

/// Mostly what one of the rules looks for (each value now and then replaced by any bytes), or
/// anything at all.
fn request() -> BoxedStrategy<Request> {
    // route_name, cluster, :path, :method, :authority, x-priority, x-tenant
    type Aim = [&'static [&'static str]; 7];
    const PRIORITY: &[&str] = &["critical", "background", "standard", "none"];
    const ALL: Aim =
        [&["all"], &["backend", "other"], &["/", "/x"], &["GET"], &["b.example.com"], PRIORITY, &["gold", "tin"]];
    const LEASING: Aim = [
        &["lease"],
        &["backend"],
        &["/lease/items", "/lease"],
        &["GET", "POST"],
        &["a.example.com"],
        PRIORITY,
        &["gold"],
    ];
    const SHADOW: Aim = [&["shadow"], &["other"], &["/"], &["GET"], &["api.example.com:8080"], PRIORITY, &["gold"]];
    const ANY: Aim = [
        &["all", "shadow", "lease"],
        &["backend", "other"],
        &["/lease/items", "/", "/lease"],
        &["GET", "POST", "PUT"],
        &["a.example.com", "api.example.com:8080", "example.com"],
        PRIORITY,
        &["gold"],
    ];
    let aimed = |aim: Aim| {
        let v = |i: usize| prop_oneof![12 => select(aim[i]).prop_map(|s| Some(s.as_bytes().to_vec())), 1 => bytes().prop_map(Some), 1 => Just(None)];
        (v(0), v(1), v(2), v(3), v(4), v(5), v(6))
    };
    prop_oneof![3 => aimed(ALL), 3 => aimed(LEASING), 2 => aimed(SHADOW), 2 => aimed(ANY)]
        .prop_map(|(route_name, cluster, path, method, authority, priority, tenant)| Request {
            route_name,
            cluster,
            path,
            method,
            authority,
            priority,
            tenant,
        })
        .boxed()
}

/// The response headers Breakwater reads, in this order.
const RESPONSE_HEADERS: [&str; 5] =
    [":status", "grpc-status", "content-type", "x-envoy-upstream-service-time", "x-envoy-attempt-count"];

#[derive(Clone, Debug)]
enum Response {
    /// Each of [`RESPONSE_HEADERS`], or not.
    Headers(Vec<Option<Vec<u8>>>),
    /// A serialized map, then changed: cut, a byte flipped, a count or length made huge.
    Raw(Vec<Option<Vec<u8>>>, Index, u8, u32),
}

fn response_headers() -> BoxedStrategy<Vec<Option<Vec<u8>>>> {
    (
        value(&["200", "503", "429", "409", "404"]),
        value(&["0", "14", "4", "16", "17"]),
        value(&["application/grpc", "application/grpc+proto", "text/plain"]),
        value(&["0", "5", "150", "18446744073709551615"]),
        value(&["1", "2", "3", "0", "4294967296"]),
    )
        .prop_map(|(a, b, c, d, e)| alloc::vec![a, b, c, d, e])
        .boxed()
}

fn response() -> BoxedStrategy<Response> {
    prop_oneof![
        3 => response_headers().prop_map(Response::Headers),
        1 => (response_headers(), any::<Index>(), 0..4u8, any::<u32>()).prop_map(|(h, i, how, n)| Response::Raw(h, i, how, n)),
    ]
    .boxed()
}

impl Response {
    fn pairs(headers: &[Option<Vec<u8>>]) -> Vec<(&'static str, Vec<u8>)> {
        RESPONSE_HEADERS.iter().zip(headers).filter_map(|(n, v)| v.clone().map(|v| (*n, v))).collect()
    }

    /// Sets the response headers on the host.
    fn apply(&self, w: &Worker) {
        w.host.response_headers.borrow_mut().clear();
        *w.host.raw_response_headers.borrow_mut() = None;
        match self {
            Response::Headers(h) => {
                for (name, v) in Response::pairs(h) {
                    w.host.set_response_header(name, v);
                }
            }
            Response::Raw(h, at, how, n) => {
                let pairs = Response::pairs(h);
                let refs: Vec<(&str, &[u8])> = pairs.iter().map(|(k, v)| (*k, v.as_slice())).collect();
                let mut raw = crate::headers::serialize(&refs);
                let i = at.index(raw.len());
                match how {
                    0 => raw.truncate(i),
                    1 => raw[i] ^= 0x5a,
                    // The pair count, or the first name's or value's length.
                    _ => {
                        let field = [0, 4, 8][at.index(3)];
                        if let Some(slot) = raw.get_mut(field..field + 4) {
                            slot.copy_from_slice(&n.to_le_bytes());
                        }
                    }
                }
                *w.host.raw_response_headers.borrow_mut() = Some(raw);
            }
        }
    }
}

/// What Envoy reports when the stream ends.
#[derive(Clone, Debug)]
struct Ending {
    flags: Option<Vec<u8>>,
    code: Option<Vec<u8>>,
    details: Option<Vec<u8>>,
    attempts: Option<Vec<u8>>,
}

fn ending() -> BoxedStrategy<Ending> {
    // No flags, UH, UT, UR, UF, UC, UO, RL, UAEX, DC, UPE.
    const FLAGS: &[u64] = &[0, 0x2, 0x4, 0x10, 0x20, 0x40, 0x80, 0x800, 0x1000, 0x4000, 0x80_0000];
    (
        integer(FLAGS),
        integer(&[0, 200, 503, 504]),
        value(&["via_upstream", "upstream_reset_before_response_started{connection_termination}"]),
        integer(&[0, 1, 2, 3]),
    )
        .prop_map(|(flags, code, details, attempts)| Ending { flags, code, details, attempts })
        .boxed()
}

/// A message on a worker's queue.
#[derive(Clone, Debug)]
enum Message {
    Raw(Vec<u8>),
    /// A grant (0), refusal (1) or anything else with the ticket of one of the worker's streams.
    Forged(u8, Index),
    /// A recall of a bulkhead's idle permits.
    Recall(Index),
}

#[derive(Clone, Debug)]
enum Op {
    Start(usize, Request),
    Respond(Index, Response),
    Trailers(Index, Option<Vec<u8>>),
    End(Index, Ending),
    Tick(usize),
    Wake(usize),
    /// Nanoseconds.
    Advance(u64),
    /// A new configuration on a worker (true: the per-route instance's): a new root context.
    Reload(usize, bool),
    // Only in the second property: what other writers do.
    Message(usize, Message),
    /// Bytes under a policy's shared-data key (breaker, bulkhead, budget).
    Garbage(Index, Vec<u8>),
    StepBack(u64),
}

fn op(chaos: bool) -> BoxedStrategy<Op> {
    let stream = prop_oneof![
        10 => (0..2usize, request()).prop_map(|(w, r)| Op::Start(w, r)),
        4 => (any::<Index>(), response()).prop_map(|(s, r)| Op::Respond(s, r)),
        1 => (any::<Index>(), value(&["0", "14", "4"])).prop_map(|(s, t)| Op::Trailers(s, t)),
        4 => (any::<Index>(), ending()).prop_map(|(s, e)| Op::End(s, e)),
        2 => (0..2usize).prop_map(Op::Tick),
        3 => (0..2usize).prop_map(Op::Wake),
        3 => prop_oneof![0..20 * MS, 0..300 * MS].prop_map(Op::Advance),
        1 => (0..2usize, any::<bool>()).prop_map(|(w, o)| Op::Reload(w, o)),
    ];
    if !chaos {
        return stream.boxed();
    }
    let message = prop_oneof![
        vec(any::<u8>(), 0..12).prop_map(Message::Raw),
        (0..4u8, any::<Index>()).prop_map(|(k, i)| Message::Forged(k, i)),
        any::<Index>().prop_map(Message::Recall),
    ];
    prop_oneof![
        12 => stream,
        1 => (0..2usize, message).prop_map(|(w, m)| Op::Message(w, m)),
        1 => (any::<Index>(), garbage()).prop_map(|(k, b)| Op::Garbage(k, b)),
        1 => (0..500 * MS).prop_map(Op::StepBack),
    ]
    .boxed()
}

/// Bytes under a shared-data key: anything, or a state of each kind (as another version or a
/// stray writer could leave), cut or not.
fn garbage() -> BoxedStrategy<Vec<u8>> {
    let states = [BreakerState::default().encode(), BulkheadState::default().encode()];
    prop_oneof![
        vec(any::<u8>(), 0..64),
        (select(states.to_vec()), any::<Index>()).prop_map(|(s, cut)| s[..cut.index(s.len() + 1)].to_vec()),
        // A bulkhead state whose one holder is worker 1 or 2 with permits it does not know of.
        (1..3u32, 0..4u32, any::<u64>()).prop_map(|(worker, lease, seen)| {
            let mut b = alloc::vec![2u8, 1];
            b.extend_from_slice(&worker.to_le_bytes());
            b.extend_from_slice(&seen.to_le_bytes());
            b.extend_from_slice(&lease.to_le_bytes());
            b.extend_from_slice(&[0, 1]);
            b.extend_from_slice(&1u32.to_le_bytes());
            b.extend_from_slice(&0u32.to_le_bytes());
            b
        }),
    ]
    .boxed()
}

// ---------------------------------------------------------------------------------------------
// The run

/// A stream Envoy has not yet ended (`proxy_on_delete`).
struct Open {
    worker: usize,
    ticket: u32,
    /// The configuration of the root context that made it.
    c: Rc<Compiled>,
    stream: Stream,
    /// Its answer may be cached.
    pending: Option<crate::fallback::Pending>,
    /// It went on to the upstream (at once, or when resumed).
    forwarded: bool,
    /// Stopped at the request headers: it must be answered or resumed, once.
    stopped: bool,
    answered: bool,
    resumed: bool,
}

impl Open {
    fn tracked(&self) -> Option<&Tracked> {
        match &self.stream {
            Stream::Tracked(t) => Some(t),
            Stream::Untracked => None,
        }
    }
    /// The policy's name.
    fn policy(&self) -> Option<&str> {
        self.tracked().and_then(|t| self.c.policy(t.policy)).map(|p| p.name())
    }
    fn waiting(&self) -> bool {
        self.tracked().is_some_and(|t| matches!(t.permit, Permit::Waiting(_)))
    }
}

struct Run {
    workers: [Worker; 2],
    now: u64,
    /// The latest the clock has been (it may step back).
    latest: u64,
    open: Vec<Open>,
    next_ticket: u32,
    /// Replies and resumptions seen so far, per worker.
    seen: [(usize, usize); 2],
    chaos: bool,
    covered: Coverage,
}

/// What the runs went through, added up over all cases: a property that never reaches a queue,
/// a probe or a recall proves nothing about them.
#[derive(Debug, Default)]
struct Coverage {
    tracked: u32,
    leased: u32,
    waited: u32,
    refused: u32,
    circuit_open: u32,
    probes: u32,
    resumed: u32,
    answered_after_waiting: u32,
    recalls: u32,
    malformed_maps: u32,
    /// Refusals answered by a fallback (static or cached) at once, and by the cache.
    fallbacks: u32,
    cached: u32,
}

impl Coverage {
    fn add(&mut self, o: &Coverage) {
        self.tracked += o.tracked;
        self.leased += o.leased;
        self.waited += o.waited;
        self.refused += o.refused;
        self.circuit_open += o.circuit_open;
        self.probes += o.probes;
        self.resumed += o.resumed;
        self.answered_after_waiting += o.answered_after_waiting;
        self.recalls += o.recalls;
        self.malformed_maps += o.malformed_maps;
        self.fallbacks += o.fallbacks;
        self.cached += o.cached;
    }
}

impl Run {
    fn new(first_only: bool, chaos: bool, start: u64) -> Run {
        let cfg = if first_only { only() } else { rules() };
        let w1 = Worker::first(&cfg);
        let w2 = Worker::second(&w1, &rules());
        let mut run = Run {
            workers: [w1, w2],
            now: 0,
            latest: 0,
            open: Vec::new(),
            next_ticket: 1,
            seen: [(0, 0); 2],
            chaos,
            covered: Coverage::default(),
        };
        run.set_clock(start);
        run
    }

    fn set_clock(&mut self, now: u64) {
        self.now = now;
        self.latest = self.latest.max(now);
        for w in &self.workers {
            w.host.now.set(now);
        }
    }

    fn pick(&self, i: &Index) -> Option<usize> {
        (!self.open.is_empty()).then(|| i.index(self.open.len()))
    }

    fn step(&mut self, op: &Op) {
        match op {
            Op::Start(w, r) => self.start(*w, r),
            Op::Respond(i, resp) => {
                if let Some(i) = self.pick(i) {
                    let s = &mut self.open[i];
                    let w = &self.workers[s.worker];
                    self.covered.malformed_maps += u32::from(matches!(resp, Response::Raw(..)));
                    resp.apply(w);
                    let read = on_response_headers(&s.c, &w.host, &mut s.stream);
                    // A cacheable answer is captured as its body passes: here some of the headers' bytes.
                    let pending = s.pending.take();
                    let mut capture = crate::fallback::on_response_headers(
                        &s.c,
                        &w.host,
                        &w.vm,
                        s.ticket,
                        &s.stream,
                        read.as_deref(),
                        false,
                        pending,
                    );
                    let mut body = w.host.response_headers().unwrap_or_default();
                    body.truncate(48);
                    *w.host.body_chunk.borrow_mut() = body;
                    let size = w.host.body_chunk.borrow().len();
                    crate::fallback::on_response_body(&w.host, &mut capture, size, true);
                }
            }
            Op::Trailers(i, grpc) => {
                if let Some(i) = self.pick(i) {
                    let s = &mut self.open[i];
                    let w = &self.workers[s.worker];
                    w.host.response_trailers.borrow_mut().clear();
                    if let Some(v) = grpc {
                        w.host.set_response_trailer("grpc-status", v);
                    }
                    on_response_trailers(&s.c, &w.host, &mut s.stream);
                }
            }
            Op::End(i, e) => {
                if let Some(i) = self.pick(i) {
                    self.end(i, e);
                }
            }
            Op::Tick(w) => crate::tick::tick(&self.workers[*w].host, &self.workers[*w].vm),
            Op::Wake(w) => self.wake(*w),
            Op::Advance(ns) => self.set_clock(self.now.saturating_add(*ns)),
            Op::StepBack(ns) => self.set_clock(self.now.saturating_sub(*ns)),
            Op::Message(w, m) => {
                let bytes = match m {
                    Message::Raw(b) => b.clone(),
                    Message::Forged(kind, i) => {
                        let ticket = self.pick(i).map_or(1, |i| self.open[i].ticket);
                        crate::vm::message::ticket(*kind, ticket)
                    }
                    Message::Recall(i) => {
                        crate::vm::message::about(crate::vm::message::RECALL, &key("bulkhead", POLICIES[i.index(3)]))
                    }
                };
                let queue = self.workers[*w].vm.worker.get();
                self.workers[*w].host.enqueue(queue, &bytes);
                self.wake(*w);
            }
            Op::Garbage(k, bytes) => {
                let n = k.index(13);
                let key = match n {
                    0..9 => key(["breaker", "bulkhead", "retry_budget"][n / 3], POLICIES[n % 3]),
                    // A slot of the fallback cache.
                    _ => format!("{}/{}", key("cache", "all"), n - 9),
                };
                let _ = self.workers[0].host.shared_set(&key, bytes, 0);
            }
            Op::Reload(w, to_only) => {
                let cfg = if *to_only { only() } else { rules() };
                self.workers[*w].reconfigure(&cfg);
            }
        }
        self.observe();
        if let (Op::Start(..), Some(s)) = (op, self.open.last()) {
            // Refused at once: answered now. Let through or waiting: not answered.
            assert_eq!(s.answered, s.stopped && !s.waiting(), "stream {}: {:?}", s.ticket, s.stream);
        }
    }

    fn start(&mut self, w: usize, r: &Request) {
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        let worker = &self.workers[w];
        let host = &worker.host;
        host.new_stream();
        for (path, v) in [("xds.route_name", &r.route_name), ("xds.cluster_name", &r.cluster)] {
            if let Some(v) = v {
                host.set_prop(path, v);
            }
        }
        for (name, v) in [
            (":path", &r.path),
            (":method", &r.method),
            (":authority", &r.authority),
            ("x-priority", &r.priority),
            ("x-tenant", &r.tenant),
        ] {
            if let Some(v) = v {
                host.set_header(name, v);
            }
        }
        host.context.set(ticket);
        let c = worker.c.clone();
        let (action, stream) = on_request_headers(&c, host, &worker.vm, ticket);
        let reason =
            host.last_reply().filter(|r| r.context == ticket).and_then(|r| r.header("x-breakwater").map(String::from));
        let c_ = &mut self.covered;
        match &stream {
            Stream::Tracked(t) => {
                c_.tracked += 1;
                c_.leased += u32::from(t.permit == Permit::Leased);
                c_.waited += u32::from(matches!(t.permit, Permit::Waiting(_)));
                c_.probes += u32::from(t.call.is_some_and(|c| c.probe));
            }
            Stream::Untracked if action == Action::Stop => {
                c_.refused += 1;
                c_.circuit_open += u32::from(reason.as_deref() == Some("circuit-open"));
                c_.fallbacks += u32::from(reason.as_deref().is_some_and(|r| r.starts_with("fallback-")));
                c_.cached += u32::from(reason.as_deref() == Some("fallback-cache"));
            }
            Stream::Untracked => {}
        }
        let pending = crate::fallback::on_request_headers(&c, host, &worker.vm, &stream);
        let s = Open {
            worker: w,
            ticket,
            c,
            stream,
            pending,
            forwarded: action == Action::Continue,
            stopped: action == Action::Stop,
            answered: false,
            resumed: false,
        };
        // A stopped request was refused (answered now, see `observe`) or waits in a queue.
        if action == Action::Stop {
            assert!(s.tracked().is_none() || s.waiting(), "stopped but neither refused nor waiting: {:?}", s.stream);
        }
        // The router is never told to retry more than the policy allows.
        if let Some(n) = host.header_text("x-envoy-max-retries") {
            let max = s.tracked().and_then(|t| s.c.policy(t.policy)).and_then(|p| p.cfg.retry.as_ref());
            let max = max.map_or(0, |r| r.max_retries);
            assert!(n.parse::<u32>().is_ok_and(|n| n <= max), "x-envoy-max-retries: {n} (max {max})");
        }
        self.open.push(s);
    }

    fn end(&mut self, i: usize, e: &Ending) {
        let s = self.open.swap_remove(i);
        let w = &self.workers[s.worker];
        for (path, v) in [
            ("response.flags", &e.flags),
            ("response.code", &e.code),
            ("response.code_details", &e.details),
            ("upstream.request_attempt_count", &e.attempts),
        ] {
            w.host.props.borrow_mut().remove(path);
            if let Some(v) = v {
                w.host.set_prop(path, v);
            }
        }
        on_end(&s.c, &w.host, &w.vm, s.ticket, s.stream);
    }

    fn wake(&mut self, w: usize) {
        let worker = &self.workers[w];
        if let Some(q) = worker.host.process.queues.borrow().get(&worker.vm.worker.get()) {
            self.covered.recalls += q.iter().filter(|m| m.first() == Some(&crate::vm::message::RECALL)).count() as u32;
        }
        crate::bulkhead::on_message(&worker.host, &worker.vm, worker.vm.worker.get());
    }

    /// Replies and resumptions since the last look: each for a stream that was stopped and
    /// not yet answered or resumed.
    fn observe(&mut self) {
        for w in 0..2 {
            let replies: Vec<u32> =
                self.workers[w].host.replies.borrow()[self.seen[w].0..].iter().map(|r| r.context).collect();
            let resumed: Vec<u32> = self.workers[w].host.resumed.borrow()[self.seen[w].1..].to_vec();
            self.seen[w] = (self.seen[w].0 + replies.len(), self.seen[w].1 + resumed.len());
            for (ticket, is_reply) in replies.iter().map(|t| (*t, true)).chain(resumed.iter().map(|t| (*t, false))) {
                let Some(s) = self.open.iter_mut().find(|s| s.worker == w && s.ticket == ticket) else {
                    panic!(
                        "{} for stream {ticket} on worker {w}, which has ended",
                        if is_reply { "a reply" } else { "resumed" }
                    );
                };
                assert!(
                    s.stopped,
                    "stream {ticket} was let through, then {}",
                    if is_reply { "answered" } else { "resumed" }
                );
                assert!(!s.answered && !s.resumed, "stream {ticket} answered or resumed twice");
                if is_reply {
                    s.answered = true;
                    self.covered.answered_after_waiting += u32::from(s.waiting());
                } else {
                    assert!(s.waiting(), "stream {ticket} resumed but it did not wait");
                    s.resumed = true;
                    // Not to its upstream if it was sent to the fallback cluster instead.
                    s.forwarded = !self.workers[w].vm.fallback.is_rerouted(ticket);
                    self.covered.resumed += 1;
                }
            }
        }
        if !self.chaos {
            self.within_limits();
        }
    }

    /// No more of a bulkhead's requests in flight than its limit, nor permits in its state.
    fn within_limits(&self) {
        for (policy, max) in [("all", 3), ("leasing", 4)] {
            let flying = self.open.iter().filter(|s| s.forwarded && s.policy() == Some(policy)).count();
            assert!(flying <= max, "{flying} requests of {policy} in flight, limit {max}");
            let state = bulkhead(&self.workers[0], policy);
            assert!(state.active() <= max as u32, "{policy}: {} permits taken, limit {max}", state.active());
        }
    }

    /// Runs the workers' ticks and wake-ups for `ms` milliseconds, every 10 ms.
    fn settle(&mut self, ms: u64) {
        for _ in 0..ms / 10 {
            self.set_clock(self.now.saturating_add(10 * MS));
            for w in 0..2 {
                self.wake(w);
                crate::tick::tick(&self.workers[w].host, &self.workers[w].vm);
                self.wake(w);
            }
            self.observe();
        }
    }

    /// Lets every wait run out, ends every stream, and checks that nothing is left over.
    fn finish(mut self) -> Coverage {
        // Past every queue timeout (100 ms) and recall timeout (20 ms), from the latest time any
        // request was queued at.
        self.set_clock(self.latest);
        self.settle(200);
        for s in self.open.iter().filter(|s| s.stopped) {
            assert!(s.answered || s.resumed, "stream {} still waits after its queue timeout", s.ticket);
        }
        let plain = Ending { flags: None, code: None, details: None, attempts: None };
        while !self.open.is_empty() {
            self.end(0, &plain);
            self.observe();
        }
        self.settle(50);
        if !self.chaos {
            self.nothing_held();
            for policy in POLICIES {
                let state = bulkhead(&self.workers[0], policy);
                assert_eq!((state.active(), state.queued()), (0, 0), "{policy}: permits or waiters left: {state:?}");
                let (breaker, _) = crate::store::load::<BreakerState>(&self.workers[0].host, &key("breaker", policy));
                if let Phase::HalfOpen { probes, .. } = breaker.phase {
                    assert_eq!(probes, 0, "{policy}: a probe slot held with no request in flight");
                }
            }
        }
        // After garbage, word of a waiter whose client left may never come: such an entry is
        // forgotten after stale_after (10 s; the clock may have stepped back meanwhile).
        self.set_clock(self.now.saturating_add(60 * breakwater_policies::SECOND));
        self.settle(30);
        self.nothing_held();
        self.covered
    }

    /// No worker has a request parked or holds permits, and (without garbage) the gauges are
    /// back to 0.
    fn nothing_held(&self) {
        for w in &self.workers {
            assert!(w.vm.waiters.is_empty(), "worker {}: a request still parked", w.vm.worker.get());
            for policy in POLICIES {
                if let Some(h) = w.vm.holdings.find(key("bulkhead", policy).as_bytes()) {
                    let held = (h.lease.get(), h.in_use.get(), h.exact.get());
                    assert_eq!(held, (0, 0, 0), "worker {} still holds permits of {policy}", w.vm.worker.get());
                }
            }
        }
        for policy in POLICIES.iter().filter(|_| !self.chaos) {
            for gauge in ["bulkhead_active", "bulkhead_queued"] {
                let n = self.workers[0].host.metric(&format!("{gauge}.policy.{policy}"));
                assert_eq!(n, 0, "{gauge} of {policy}");
            }
        }
    }
}

fn bulkhead(w: &Worker, policy: &str) -> BulkheadState {
    crate::store::load::<BulkheadState>(&w.host, &key("bulkhead", policy)).0
}

/// When the run starts: the epoch, now, or an hour before the clock runs out.
fn start() -> BoxedStrategy<u64> {
    prop_oneof![
        Just(0u64),
        Just(1_700_000_000 * breakwater_policies::SECOND),
        Just(u64::MAX - 3600 * breakwater_policies::SECOND)
    ]
    .boxed()
}

/// Runs `cases` cases of up to 100 operations and returns what they went through.
fn run_cases(chaos: bool) -> Coverage {
    let covered = RefCell::new(Coverage::default());
    let mut runner = TestRunner::new(config(256));
    let cases = (prop::bool::weighted(0.25), start(), vec(op(chaos), 1..100));
    let result = runner.run(&cases, |(per_route, start, ops)| {
        let mut run = Run::new(per_route, chaos, start);
        for op in &ops {
            run.step(op);
        }
        covered.borrow_mut().add(&run.finish());
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    let covered = covered.into_inner();
    std::println!("{covered:?}");
    covered
}

#[test]
fn any_host_bytes_leave_every_stream_answered_once_and_nothing_held() {
    let c = run_cases(false);
    // What the cases must reach, for the checks to mean something (a run reaches about three
    // times these).
    let reached = [
        ("tracked streams", c.tracked, 1000),
        ("leased permits", c.leased, 100),
        ("waits", c.waited, 200),
        ("refusals", c.refused, 200),
        ("circuit-open refusals", c.circuit_open, 50),
        ("probes", c.probes, 30),
        ("resumptions", c.resumed, 50),
        ("waits answered", c.answered_after_waiting, 20),
        ("recalls", c.recalls, 5),
        ("malformed header maps", c.malformed_maps, 100),
        ("refusals answered by a fallback", c.fallbacks, 50),
        // Few answers are cacheable (a 200 from the upstream, not gRPC, to a GET) and fewer
        // refusals share their key; the unit tests in fallback/tests.rs go through the rest.
        ("refusals answered from the cache", c.cached, 1),
    ];
    for (what, n, least) in reached {
        assert!(n >= least, "only {n} {what} (at least {least}): {c:?}");
    }
}

#[test]
fn garbage_in_shared_data_and_queues_is_survived_and_each_worker_still_cleans_up() {
    let c = run_cases(true);
    assert!(c.tracked >= 1000 && c.waited >= 100, "{c:?}");
}
