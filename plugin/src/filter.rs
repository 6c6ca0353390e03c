//! The request logic, host-agnostic: admission on the request headers, the response status on
//! the response headers (and gRPC trailers), outcome accounting when the stream ends (`on_log`,
//! which Envoy calls for every stream: responses, resets, timeouts and client aborts alike), and
//! the periodic sync that hands a worker's batched successes to the shared breaker.
//!
//! Costs are counted in host calls: a call that returns data (a header, an attribute, shared
//! data) costs a VM re-entry for its buffer, ~10k instructions in Envoy 1.40. A tracked request
//! that succeeds on a quiet breaker reads two (the route name and `:status`), bumps one counter
//! and reads the clock twice; it touches no shared data (see [`crate::local`]).

use crate::bulkhead::{self, Permit};
use crate::config::{FailureOn, Mode, Policy};
use crate::host::{property_u64, Host};
use crate::local::View;
use crate::metrics::{self, PolicyMetrics};
use crate::parking::Parking;
use crate::retry::{self, Grant};
use crate::routes::Attributes;
use crate::store;
use crate::Compiled;
use alloc::format;
use alloc::rc::Rc;
use alloc::string::String;
use alloc::vec::Vec;
use breakwater_policies::breaker::Step;
use breakwater_policies::{Admission, Outcome, Transition, TripReason, SECOND};

/// Envoy's legacy response-flag bits (`response.flags`).
pub mod flags {
    pub const NO_HEALTHY_UPSTREAM: u64 = 0x2; // UH
    pub const UPSTREAM_REQUEST_TIMEOUT: u64 = 0x4; // UT
    pub const UPSTREAM_REMOTE_RESET: u64 = 0x10; // UR
    pub const UPSTREAM_CONNECTION_FAILURE: u64 = 0x20; // UF
    pub const UPSTREAM_CONNECTION_TERMINATION: u64 = 0x40; // UC
    pub const UPSTREAM_OVERFLOW: u64 = 0x80; // UO: Envoy's own circuit breaker
    pub const RATE_LIMITED: u64 = 0x800; // RL
    pub const UNAUTHORIZED_EXTERNAL_SERVICE: u64 = 0x1000; // UAEX
    pub const DOWNSTREAM_CONNECTION_TERMINATION: u64 = 0x4000; // DC
    pub const UPSTREAM_PROTOCOL_ERROR: u64 = 0x80_0000; // UPE
}

/// How one finished stream is classified for the breaker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Success,
    Failure,
    /// Neither: the client went away first, another filter answered, or an error kind the
    /// policy does not count (`failure_on.reset: false`, …). A probe's slot is given back.
    Ignored,
}

/// Per-stream state; lives in the HTTP context.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Stream {
    /// No policy applies, or Breakwater already answered it: nothing to account.
    #[default]
    Untracked,
    Admitted {
        policy: usize,
        /// The breaker counts this stream's outcome (it has a breaker that admitted it).
        counted: bool,
        probe: bool,
        start_ns: u64,
        /// The response's `:status`, 0 until response headers pass (they may never come).
        status: u16,
        /// `grpc-status` from trailers, or from the headers of a trailers-only response.
        grpc_status: Option<u32>,
        permit: Permit,
        /// The retries it was allowed, if its policy has a retry section.
        retry: Option<Grant>,
    },
}

/// What the HTTP context should return from on_http_request_headers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Continue,
    /// A local reply was sent: stop iteration.
    Rejected,
    /// Waiting in a bulkhead queue: stop iteration until woken or timed out.
    Queued,
}

/// Request attributes read from the host on first use, at most once each.
pub struct HostAttributes<'h, H: Host> {
    host: &'h H,
    route_name: Option<Option<String>>,
    path: Option<Option<String>>,
    method: Option<Option<String>>,
    authority: Option<Option<String>>,
    cluster: Option<Option<String>>,
}

impl<'h, H: Host> HostAttributes<'h, H> {
    pub fn new(host: &'h H) -> Self {
        HostAttributes { host, route_name: None, path: None, method: None, authority: None, cluster: None }
    }
}

fn text(bytes: Option<Vec<u8>>) -> Option<String> {
    bytes.and_then(|b| String::from_utf8(b).ok()).filter(|s| !s.is_empty())
}

impl<H: Host> Attributes for HostAttributes<'_, H> {
    fn route_name(&mut self) -> Option<&str> {
        let host = self.host;
        self.route_name.get_or_insert_with(|| text(host.property(&["xds", "route_name"]))).as_deref()
    }
    fn path(&mut self) -> Option<&str> {
        let host = self.host;
        self.path.get_or_insert_with(|| host.request_header(":path")).as_deref()
    }
    fn method(&mut self) -> Option<&str> {
        let host = self.host;
        self.method.get_or_insert_with(|| host.request_header(":method")).as_deref()
    }
    fn host(&mut self) -> Option<&str> {
        let host = self.host;
        self.authority.get_or_insert_with(|| host.request_header(":authority")).as_deref()
    }
    fn header(&mut self, name: &str) -> Option<String> {
        self.host.request_header(name)
    }
    fn cluster(&mut self) -> Option<&str> {
        let host = self.host;
        self.cluster.get_or_insert_with(|| text(host.property(&["xds", "cluster_name"]))).as_deref()
    }
}

/// Admission, on the request headers: the breaker first (a request it rejects never takes a
/// bulkhead permit), then the bulkhead. `ticket` is the stream's context id, for waking it.
pub fn on_request_headers(c: &Rc<Compiled>, host: &impl Host, w: &Parking, ticket: u32) -> (Action, Stream) {
    let Some(policy) = c.config.routes.find(&mut HostAttributes::new(host)) else {
        return (Action::Continue, Stream::Untracked);
    };
    let Some(p) = c.config.policies.get(policy) else {
        return (Action::Continue, Stream::Untracked);
    };
    let (counted, probe, mut now) = match &p.breaker {
        None => (false, false, 0),
        Some(b) => {
            // The worker's view settles the common cases without touching shared data.
            let (admission, now) = match c.view(policy) {
                View::Quiet => {
                    let start = if b.slow_ns.is_some() || p.bulkhead.is_some() { host.now_ns() } else { 0 };
                    (Admission::Allow, start)
                }
                View::Open { until } => match host.now_ns() {
                    now if now < until => (Admission::Reject { retry_after_ns: until - now }, now),
                    now => admit_exactly(c, host, policy, now),
                },
                View::Unknown | View::Failing | View::Suspect | View::HalfOpen => {
                    admit_exactly(c, host, policy, host.now_ns())
                }
            };
            match admission {
                Admission::Allow => (true, false, now),
                Admission::Probe => (true, true, now),
                Admission::Reject { retry_after_ns } => match rejected(c, host, policy, retry_after_ns) {
                    // A dry run goes on, to the bulkhead too, but the breaker does not count it.
                    Action::Continue => (false, false, now),
                    action => return (action, Stream::Untracked),
                },
            }
        }
    };
    let permit = match p.bulkhead {
        None => Permit::None,
        Some(_) => {
            if now == 0 {
                now = host.now_ns();
            }
            match bulkhead::admit(c, host, w, policy, ticket, now) {
                bulkhead::Admit::Pass(permit) => permit,
                bulkhead::Admit::Wait(class) => Permit::Waiting(class),
                bulkhead::Admit::Refused => Permit::Refused,
            }
        }
    };
    let action = match permit {
        Permit::Waiting(_) => Action::Queued,
        Permit::Refused => Action::Rejected,
        Permit::None | Permit::Held(_) => Action::Continue,
    };
    // A refused request makes no retries; a waiting one reserves its retries now, with its headers.
    let retry = if action == Action::Rejected { None } else { retry::reserve(c, host, policy, now) };
    let stream =
        Stream::Admitted { policy, counted, probe, start_ns: now, status: 0, grpc_status: None, permit, retry };
    (action, stream)
}

/// Admission against the shared state (a CAS when it takes a probe slot).
fn admit_exactly(c: &Compiled, host: &impl Host, policy: usize, now: u64) -> (Admission, u64) {
    let Some(b) = c.config.policies.get(policy).and_then(|p| p.breaker.as_ref()) else {
        return (Admission::Allow, now);
    };
    match store::update(host, c.breaker_key(policy), |s| s.admit(&b.machine, now)) {
        Some((step, view)) => {
            c.set_view(policy, view);
            transitioned(c, host, policy, step.transition);
            (step.value, now)
        }
        // If shared data fails us entirely, fail open: the breaker must never become the outage.
        None => (Admission::Allow, now),
    }
}

fn rejected(c: &Compiled, host: &impl Host, policy: usize, retry_after_ns: u64) -> Action {
    let (Some(p), Some(m)) = (c.config.policies.get(policy), c.metrics.get(policy)) else {
        return Action::Continue;
    };
    match p.mode {
        Mode::Enforce => {
            metrics::inc(host, m.rejected_circuit_open);
            reject(host, p, "circuit-open", retry_after_ns);
            Action::Rejected
        }
        // Would have been rejected: count it, let it pass, and keep its outcome out of the
        // breaker so that dry_run walks through exactly the states enforce would.
        Mode::DryRun => {
            metrics::inc(host, m.dry_run_rejected_circuit_open);
            Action::Continue
        }
    }
}

/// Notes the status of a tracked stream's response (an upstream's or a local reply's).
pub fn on_response_headers(c: &Compiled, host: &impl Host, stream: &mut Stream, end_of_stream: bool) {
    // Only the breaker needs every response's status; the retry stats look it up in on_log, and
    // only for the rare request that was retried.
    let Stream::Admitted { policy, status, grpc_status, counted: true, .. } = stream else { return };
    *status = host.response_header(":status").and_then(|s| s.parse().ok()).unwrap_or(0);
    // A trailers-only gRPC response carries its grpc-status in the headers, and has no body:
    // only then is it worth a look (a plain HTTP 200 almost always has a body).
    if *status == 200 && end_of_stream && c.counts_grpc(*policy) {
        *grpc_status = host.response_header("grpc-status").and_then(|s| s.parse().ok());
    }
}

/// Notes the grpc-status of a tracked gRPC response.
pub fn on_response_trailers(c: &Compiled, host: &impl Host, stream: &mut Stream) {
    let Stream::Admitted { policy, grpc_status, counted: true, .. } = stream else { return };
    if c.counts_grpc(*policy) {
        *grpc_status = host.response_trailer("grpc-status").and_then(|s| s.parse().ok());
    }
}

/// Accounting, when the stream is over: the bulkhead permit back, the outcome to the breaker.
pub fn on_log(c: &Compiled, host: &impl Host, w: &Parking, ticket: u32, stream: Stream) {
    let Stream::Admitted { policy, counted, probe, mut start_ns, status, grpc_status, permit, retry } = stream else {
        return;
    };
    let forwarded = match bulkhead::finish(c, host, w, policy, ticket, permit) {
        bulkhead::Finished::Forwarded(after_wait) => {
            // Time spent queued is not the upstream's slowness.
            start_ns = after_wait.unwrap_or(start_ns);
            true
        }
        bulkhead::Finished::NotForwarded => false,
    };
    if let Some(grant) = retry {
        retry::settle(c, host, policy, grant, forwarded, status);
    }
    if !counted {
        return;
    }
    let (Some(p), Some(m)) = (c.config.policies.get(policy), c.metrics.get(policy)) else { return };
    let Some(b) = &p.breaker else { return };
    // What Breakwater itself answered, or what never left the queue, says nothing of the upstream.
    let verdict = if forwarded {
        classify(&b.failure_on, status, grpc_status, || property_u64(host, &["response", "flags"]).unwrap_or(0))
    } else {
        Verdict::Ignored
    };
    // Outcomes the breaker will see are stamped: a success's time says which failures it ends.
    let now = if probe || verdict != Verdict::Ignored { host.now_ns() } else { 0 };
    let slow = b.slow_ns.is_some_and(|limit| now.saturating_sub(start_ns) >= limit);
    // A request that never left Breakwater (refused, timed out or abandoned in the queue) is no
    // call to the upstream: it is not counted at all, only a probe slot it held is given back.
    if forwarded {
        metrics::inc(
            host,
            match verdict {
                Verdict::Success => m.success,
                Verdict::Failure => m.failure,
                Verdict::Ignored => m.ignored,
            },
        );
    }
    if slow {
        metrics::inc(host, m.slow);
    }
    let key = c.breaker_key(policy);
    let step = match verdict {
        Verdict::Ignored if probe => store::update(host, key, |s| {
            let changed = s.release_probe();
            Step { value: (), changed, transition: None }
        }),
        Verdict::Ignored => None,
        // A closed-state success is batched on this worker and handed over by `sync`: the
        // common case writes no shared data. While the breaker is failing or suspect it goes at
        // once, to end a run of failures or to weigh in on a rate, for every worker.
        Verdict::Success if !probe && matches!(c.view(policy), View::Quiet | View::Unknown) => {
            c.add_pending(policy, slow, now);
            None
        }
        _ => {
            let outcome = Outcome { failure: verdict == Verdict::Failure, slow };
            let jitter = splitmix64(now);
            let pending = c.take_pending(policy);
            store::update(host, key, |s| {
                // This worker's earlier successes come first, so a failure after them counts from zero.
                let before = s.record_successes(&b.machine, now, pending.successes, pending.slow, pending.last_at);
                before.and(s.record(&b.machine, now, outcome, probe, jitter))
            })
        }
    };
    if let Some((step, view)) = step {
        c.set_view(policy, view);
        transitioned(c, host, policy, step.transition);
    }
}

/// The worker's tick: hands each active policy's batched successes to the shared breaker and
/// refreshes its view; drops the views of idle policies. (Bulkhead permits are renewed by
/// [`bulkhead::renew`], per worker rather than per configuration.)
pub fn sync(c: &Compiled, host: &impl Host) {
    for policy in 0..c.config.policies.len() {
        retry::sync(c, host, policy);
        if !c.begin_sync(policy) {
            continue;
        }
        let Some(b) = c.config.policies.get(policy).and_then(|p| p.breaker.as_ref()) else { continue };
        let pending = c.take_pending(policy);
        let now = host.now_ns();
        let step = store::update(host, c.breaker_key(policy), |s| {
            let recorded = s.record_successes(&b.machine, now, pending.successes, pending.slow, pending.last_at);
            recorded.and(s.confirm(&b.machine, now))
        });
        if let Some((step, view)) = step {
            c.set_view(policy, view);
            transitioned(c, host, policy, step.transition);
        }
    }
}

fn transitioned(c: &Compiled, host: &impl Host, policy: usize, t: Option<Transition>) {
    if let (Some(t), Some(p), Some(m)) = (t, c.config.policies.get(policy), c.metrics.get(policy)) {
        on_transition(host, p, m, t);
    }
}

/// Classifies a finished stream. Transport errors are judged by Envoy's response flags before
/// the status, since Envoy answers them with a local 503/504; `flags` is only read when the status
/// leaves room for one (no response, or 5xx). So a response whose headers said 2xx-4xx counts by
/// its status even if the upstream reset the stream later, during the body.
pub fn classify(on: &FailureOn, status: u16, grpc_status: Option<u32>, flags: impl FnOnce() -> u64) -> Verdict {
    use flags::*;
    let counted = |yes: bool| if yes { Verdict::Failure } else { Verdict::Ignored };
    let failing_status = |code: u16| on.status.iter().any(|&(lo, hi)| (lo..=hi).contains(&code));
    if status != 0 && status < 500 && !failing_status(status) {
        return match grpc_status {
            Some(g) if on.grpc_status.contains(&g) => Verdict::Failure,
            _ => Verdict::Success,
        };
    }
    let f = flags();
    if f & (UPSTREAM_CONNECTION_FAILURE | NO_HEALTHY_UPSTREAM) != 0 {
        return counted(on.connect_failure);
    }
    if f & UPSTREAM_REQUEST_TIMEOUT != 0 {
        return counted(on.timeout);
    }
    if f & (UPSTREAM_REMOTE_RESET | UPSTREAM_CONNECTION_TERMINATION | UPSTREAM_PROTOCOL_ERROR) != 0 {
        return counted(on.reset);
    }
    // Envoy itself answered (its own circuit breaker, rate limit, ext_authz): not the upstream.
    if f & (UPSTREAM_OVERFLOW | RATE_LIMITED | UNAUTHORIZED_EXTERNAL_SERVICE) != 0 {
        return Verdict::Ignored;
    }
    // No response at all: typically the client left first (DC). An upstream 5xx that did come
    // back still counts, even if the client left right after it.
    if status == 0 {
        return Verdict::Ignored;
    }
    if failing_status(status) || grpc_status.is_some_and(|g| on.grpc_status.contains(&g)) {
        return Verdict::Failure;
    }
    Verdict::Success
}

/// Answers the current request with the policy's reject reply.
pub(crate) fn reject(host: &impl Host, p: &Policy, reason: &str, retry_after_ns: u64) {
    let retry_after = format!("{}", retry_after_ns.div_ceil(SECOND).max(1));
    let mut headers: Vec<(&str, &str)> = Vec::with_capacity(2 + p.reject.headers.len());
    headers.push(("x-breakwater", reason));
    headers.push(("retry-after", &retry_after));
    headers.extend(p.reject.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    let default_body;
    let body = match &p.reject.body {
        Some(b) => b.as_str(),
        None => {
            default_body = format!("breakwater: {reason} (policy {})\n", p.name);
            default_body.as_str()
        }
    };
    // For a gRPC request Envoy turns this into a trailers-only gRPC reply itself: grpc-status from
    // the HTTP status (503 → UNAVAILABLE, which gRPC clients retry later), grpc-message the body.
    host.send_http_reply(p.reject.status, &headers, body.as_bytes());
}

fn on_transition(host: &impl Host, p: &Policy, m: &PolicyMetrics, t: Transition) {
    let (to, id, gauge, why) = match t {
        Transition::Opened { reason, period_ns } => {
            let why = match reason {
                TripReason::ConsecutiveFailures(n) => format!("{n} consecutive failures"),
                TripReason::FailureRate { percent, requests } => {
                    format!("failure rate {percent}% of {requests} requests")
                }
                TripReason::SlowCalls { percent, requests } => format!("slow calls {percent}% of {requests} requests"),
                TripReason::ProbeFailed => "a half-open probe failed".into(),
            };
            ("open", m.to_open, 1, format!("{why}; open for {}", fmt_duration(period_ns)))
        }
        Transition::HalfOpened => ("half-open", m.to_half_open, 2, "open period over; probing".into()),
        Transition::Closed => ("closed", m.to_closed, 0, "probes succeeded".into()),
    };
    metrics::inc(host, id);
    metrics::set(host, m.circuit_state, gauge);
    log::info!("policy {}: circuit {}: {}", p.name, to, why);
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

/// A cheap mix of the clock for jitter; no need for cryptographic randomness here.
fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests;
