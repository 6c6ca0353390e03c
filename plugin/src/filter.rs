//! The request path, host-agnostic: which policy a request falls under, admission on the
//! request headers, what the response said, and the accounting when the stream ends
//! ([`on_end`], from `proxy_on_delete`, which Envoy calls last on every stream: responses,
//! resets, timeouts and client aborts alike). Data flows one way: host → [`crate::outcome`] → policy state → reply.
//!
//! Host calls per request on the healthy path (nothing tripping, the bulkhead far from full,
//! the retry budget from the worker's stock), counted by the unit tests:
//! * request headers: none with a per-route filter instance (`policy` in its configuration);
//!   the route name (and whatever else the rules look at) with route rules;
//! * request headers: one header set (`x-envoy-upstream-rq-timeout-ms`) for a policy with an
//!   adaptive timeout, once it has enough samples;
//! * response headers: one read of all of them, for a policy with a breaker, retries, an
//!   adaptive timeout or an adaptive limit;
//! * [`on_end`]: none. Stats are counted on the worker and flushed on the tick.

use crate::breaker::{self, Call};
use crate::bulkhead::{self, Finished, Permit};
use crate::headers::HeaderMap;
use crate::host::{property_u64, Host};
use crate::outcome::{self, grpc_status, Response};
use crate::retry::{self, Grant};
use crate::routes::HostAttributes;
use crate::timeout;
use crate::vm::Vm;
use crate::{Compiled, Policy, Select};
use alloc::rc::Rc;

/// Per-stream state; lives in the HTTP context.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Stream {
    /// No policy applies, or Breakwater refused it at once: nothing to account.
    #[default]
    Untracked,
    Tracked(Tracked),
}

/// A stream under a policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tracked {
    pub policy: usize,
    /// The breaker counts its outcome (None: no breaker, or it goes uncounted).
    pub call: Option<Call>,
    pub permit: Permit,
    /// The retries it was allowed, if its policy has a retry section.
    pub retry: Option<Grant>,
    /// Its adaptive timeout, and whether its latency is sampled.
    pub adaptive: timeout::Sent,
    /// What the response headers (and trailers) said; all zero until they pass.
    pub response: Response,
}

impl Tracked {
    /// Whether its outcome needs the response headers: the breaker judges it, or retries are
    /// counted from its attempt count.
    fn reads_response(&self) -> bool {
        self.call.is_some() || self.retry.is_some() || self.adaptive.sampled
    }
}

/// What the HTTP context should return from on_http_request_headers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Continue,
    /// A local reply was sent, or the request waits in a bulkhead queue: stop iteration.
    Stop,
}

/// The policy of a request, if any.
fn select<'c>(c: &'c Compiled, host: &impl Host) -> Option<&'c Policy> {
    let index = match &c.select {
        Select::Only(i) => *i,
        Select::Rules(rules) if rules.names_only() => {
            let name = host.route_name().filter(|n| !n.is_empty())?;
            rules.by_route_name(&name)?
        }
        Select::Rules(rules) => rules.find(&mut HostAttributes::new(host))?,
    };
    c.policy(index)
}

/// Admission, on the request headers: the breaker first (a request it refuses never takes a
/// bulkhead permit), then the bulkhead, then the retries. `ticket` is the stream's context id,
/// for waking it.
pub fn on_request_headers(c: &Rc<Compiled>, host: &impl Host, vm: &Vm, ticket: u32) -> (Action, Stream) {
    let Some(p) = select(c, host) else { return (Action::Continue, Stream::Untracked) };
    let call = match breaker::admit(c, p, host, vm) {
        breaker::Admit::Pass(call) => call,
        breaker::Admit::Rejected => return refused(c, vm, ticket),
    };
    let permit = bulkhead::admit(c, p, host, vm, ticket);
    if permit == Permit::Refused {
        if let Some(call) = call.filter(|c| c.probe) {
            breaker::record(c, p, host, vm, call, None, false);
        }
        return refused(c, vm, ticket);
    }
    // A waiting request reserves its retries now, with its headers.
    let retry = retry::reserve(c, p, host, vm);
    let adaptive = timeout::apply(p, host);
    let stream = Tracked { policy: p.index, call, permit, retry, adaptive, response: Response::default() };
    let action = if matches!(permit, Permit::Waiting(_)) {
        vm.hurry(host); // its queue timeout is checked on the tick
        Action::Stop
    } else {
        Action::Continue
    };
    (action, Stream::Tracked(stream))
}

/// A request Breakwater refused: answered (stop), or sent to a fallback cluster (it goes on).
fn refused(c: &Compiled, vm: &Vm, ticket: u32) -> (Action, Stream) {
    let action = if c.fallbacks && vm.fallback.take_rerouted(ticket) { Action::Continue } else { Action::Stop };
    (action, Stream::Untracked)
}

/// Notes what the response headers say (an upstream's response, or a local reply): one read of
/// all of them. Returns them for a policy with a fallback cache, which may store the answer.
pub fn on_response_headers(c: &Compiled, host: &impl Host, stream: &mut Stream) -> Option<alloc::vec::Vec<u8>> {
    let Stream::Tracked(t) = stream else { return None };
    let caches = c.policy(t.policy).is_some_and(crate::fallback::caches);
    if !t.reads_response() && !caches {
        return None;
    }
    let bytes = host.response_headers()?;
    t.response = Response::read(&HeaderMap::new(&bytes));
    let strip = c.policy(t.policy).and_then(|p| p.cfg.retry.as_ref()).is_some_and(|r| r.strip_attempt_count);
    if strip && t.response.attempts.is_some() {
        host.remove_response_header("x-envoy-attempt-count");
    }
    caches.then_some(bytes)
}

/// Notes the grpc-status of a gRPC response that carries it in trailers.
pub fn on_response_trailers(c: &Compiled, host: &impl Host, stream: &mut Stream) {
    let Stream::Tracked(t) = stream else { return };
    let counts_grpc =
        c.policy(t.policy).and_then(|p| p.cfg.breaker.as_ref()).is_some_and(|b| !b.failure_on.grpc_status.is_empty());
    if t.call.is_some() && counts_grpc && t.response.grpc && t.response.grpc_status.is_none() {
        t.response.grpc_status = host.response_trailer("grpc-status").as_deref().and_then(grpc_status);
    }
}

/// Accounting, when the stream is over: the bulkhead permit back, the retries settled, the
/// outcome to the breaker.
pub fn on_end(c: &Rc<Compiled>, host: &impl Host, vm: &Vm, ticket: u32, stream: Stream) {
    if c.fallbacks {
        crate::fallback::on_end(c, vm, ticket);
    }
    let Stream::Tracked(t) = stream else { return };
    let Some(p) = c.policy(t.policy) else { return };
    let forwarded = bulkhead::finish(p, host, vm, ticket, t.permit) != Finished::NotForwarded;
    if let Some(grant) = t.retry {
        retry::settle(c, p, host, vm, grant, forwarded, &t.response);
    }
    // Envoy's response flags, read at most once, and only when needed.
    let read = core::cell::Cell::new(None);
    let flags = || {
        let f = read.get().unwrap_or_else(|| property_u64(host, &["response", "flags"]).unwrap_or(0));
        read.set(Some(f));
        f
    };
    timeout::record(c, p, vm, t.adaptive, &t.response, forwarded, flags);
    let (Some(call), Some(b)) = (t.call, &p.cfg.breaker) else { return };
    // What Breakwater itself answered, or what never left the queue, says nothing of the
    // upstream: not counted at all; a probe slot it held is given back.
    let verdict = forwarded.then(|| {
        outcome::classify(&b.failure_on, &t.response, flags, || {
            host.property(&["response", "code_details"]).is_some_and(|d| d == b"via_upstream")
        })
    });
    // Slow is judged on the time to the upstream's response headers, so time spent queued, a
    // long stream body (websocket, gRPC stream, SSE) or a slow client never make a call slow.
    let slow = outcome::is_slow(b.slow_ns, &t.response, verdict);
    breaker::record(c, p, host, vm, call, verdict, slow);
}

#[cfg(test)]
mod props;
#[cfg(test)]
mod tests;
