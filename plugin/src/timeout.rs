//! Adaptive timeouts, and the latency samples of an adaptive concurrency limit, on the request
//! path and on the tick.
//!
//! * **On the request headers** a policy with `timeout.adaptive` sets
//!   `x-envoy-upstream-rq-timeout-ms` to the timeout this worker last computed (one request
//!   header set); until the shared window holds `minimum_requests` samples it sets nothing, and
//!   the route's own timeout applies; so does a worker that has not handed samples over yet
//!   under this configuration (a window slice at most after its first request). Envoy's router
//!   takes the header instead of the route's timeout, longer or shorter, for this request: that
//!   is why `max` is required.
//! * **When the stream ends** the upstream's latency (`x-envoy-upstream-service-time`, from the
//!   response headers the filter reads once) joins the worker's batch, with no host call. A
//!   request cut by the timeout it was given (`UT`) is counted in the histogram bucket above
//!   that timeout ([`breakwater_policies::latency::cut_ms`]): it took at least that long, and
//!   leaving it out would keep only the calls that beat the timeout, so a timeout that is too
//!   short could never grow; counted at the timeout itself it could be read back as the same
//!   timeout (a bucket's top) and never grow either.
//! * **On the tick** the batch goes to the shared histogram (one compare-and-swap, once a
//!   window slice, at least `sync_interval` apart and at most a second), and the worker reads
//!   the new timeout from what the CAS returned: no extra read. The adaptive limit's samples go
//!   to the bulkhead's shared state the same way, four times a limiter window
//!   ([`breakwater_policies::BulkheadState::adapt`]).

use crate::config::Mode;
use crate::headers::decimal;
use crate::host::Host;
use crate::outcome::{flags, Response};
use crate::vm::Vm;
use crate::{bulkhead, metrics, store, Compiled, Policy};
use alloc::format;
use alloc::rc::Rc;
use breakwater_policies::{Histogram, Latencies, LatencyState, SECOND};

impl store::Stored for LatencyState {
    fn encode(&self) -> alloc::vec::Vec<u8> {
        LatencyState::encode(self)
    }
    fn decode(bytes: &[u8]) -> Option<Self> {
        LatencyState::decode(bytes)
    }
}

/// One worker's share of a policy's latency, under one configuration.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Local {
    /// Latencies not yet added to the shared histogram, and when the worker last added some.
    pub batch: Histogram,
    /// Samples in `batch`: the tick checks this, not the histogram's 144 buckets.
    pub batched: u32,
    pub handed_at: u64,
    /// The timeout this worker sets (ms; 0: none), as of its last hand-over.
    pub timeout_ms: u32,
    /// The adaptive limit's samples not yet handed over, and when the worker last handed some.
    pub limit: Latencies,
    pub limit_handed_at: u64,
}

/// What a request was given.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sent {
    /// The timeout set on it, ms; 0: none.
    pub timeout_ms: u32,
    /// Its latency is sampled (adaptive timeout or limit), so its response headers are read.
    pub sampled: bool,
}

const HEADER: &str = "x-envoy-upstream-rq-timeout-ms";

fn adaptive_limit(p: &Policy) -> bool {
    p.cfg.bulkhead.as_ref().is_some_and(|b| b.machine.adaptive.is_some())
}

/// On the request headers (for a request that goes on): sets its timeout.
pub fn apply(p: &Policy, host: &impl Host) -> Sent {
    let sampled = p.cfg.timeout.is_some() || adaptive_limit(p);
    // Until the worker's first hand-over under this configuration (a window slice, at most a
    // second), it sets none: the route's own timeout applies.
    let ms = p.local(|l| l.adaptive.timeout_ms);
    // A dry run computes the timeout (and shows it) but leaves the request alone.
    if ms == 0 || p.cfg.mode == Mode::DryRun {
        return Sent { timeout_ms: 0, sampled };
    }
    let mut digits = [0u8; 20];
    host.set_request_header(HEADER, decimal(ms.into(), &mut digits));
    Sent { timeout_ms: ms, sampled }
}

/// When the stream ends: its latency joins the worker's batches. `forwarded`: it reached the
/// router; `response_flags` reads Envoy's flags (only for a request that got no upstream
/// headers and had a timeout).
pub fn record(
    c: &Rc<Compiled>,
    p: &Policy,
    vm: &Vm,
    sent: Sent,
    r: &Response,
    forwarded: bool,
    response_flags: impl FnOnce() -> u64,
) {
    if !sent.sampled || !forwarded {
        return;
    }
    // (latency, what the histogram counts): a cut request one bucket above its timeout.
    let (ms, counted) = match r.upstream_ms {
        Some(ms) => (ms, ms),
        None if sent.timeout_ms > 0 && response_flags() & flags::UPSTREAM_REQUEST_TIMEOUT != 0 => {
            let ms = u64::from(sent.timeout_ms);
            (ms, breakwater_policies::latency::cut_ms(ms))
        }
        None => return,
    };
    let (timed, limited) = (p.cfg.timeout.is_some(), adaptive_limit(p));
    p.local(|l| {
        if timed {
            l.adaptive.batch.add(counted);
            l.adaptive.batched = l.adaptive.batched.saturating_add(1);
        }
        if limited {
            l.adaptive.limit.add(ms);
        }
    });
    vm.list(c, p);
}

/// The tick: hands the batches over when due: the timeout's once a window slice, the limit's
/// four times a second; each at least `sync_interval` apart. Samples whose hand-over fails
/// (shared data failing) are dropped: the next ones will do. Returns whether the next tick
/// must visit the policy again (samples are left).
pub fn sync(c: &Compiled, p: &Policy, host: &impl Host, vm: &Vm, now: u64) -> bool {
    let every = |ns: u64| ns.clamp(c.sync_interval_ns, SECOND.max(c.sync_interval_ns));
    // The histogram's hand-over runs with the worker's state borrowed (it touches nothing else
    // of it); the limit's samples are taken out for theirs, which wakes waiters.
    let (samples, left) = p.local(|l| {
        let a = &mut l.adaptive;
        if let Some(rule) = p.cfg.timeout.as_ref() {
            let slice = rule.window_ns / breakwater_policies::latency::SLICES as u64;
            if a.batched > 0 && now.saturating_sub(a.handed_at) >= every(slice) {
                let key = format!("breakwater/v1/{}/latency/{}", c.namespace, p.name());
                let done = store::apply(host, &key, |s: &mut LatencyState| {
                    s.record(rule.window_ns, now, &a.batch);
                    ((), true)
                });
                if let Some(((), s)) = done {
                    a.timeout_ms = rule.timeout_ms(&s, now).map_or(0, |ms| u32::try_from(ms).unwrap_or(u32::MAX));
                    metrics::set(host, p.metrics(host).timeout_ms, a.timeout_ms.into());
                }
                (a.handed_at, a.batch, a.batched) = (now, Histogram::default(), 0);
            }
        }
        let due = a.limit.count > 0 && now.saturating_sub(a.limit_handed_at) >= every(SECOND / 4);
        let samples = due.then(|| {
            a.limit_handed_at = now;
            core::mem::take(&mut a.limit)
        });
        (samples, a.batched > 0 || a.limit.count > 0)
    });
    if let (Some(b), Some(samples)) = (p.cfg.bulkhead.as_ref(), samples) {
        bulkhead::renew(p, b, host, vm, now, samples);
    }
    left
}

#[cfg(test)]
mod tests;
