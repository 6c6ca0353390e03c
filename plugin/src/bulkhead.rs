//! The bulkhead on the request path: take a permit (or wait, or be refused) on the request
//! headers, give it back when the stream ends, and wake waiters when permits free up.
//!
//! Every permit change is one CAS on the policy's shared state ([`store::bulkhead`]), so the
//! limit is exact across workers. The gauges move by the change each CAS made, so they are exact
//! too. A waiter handed a permit is woken by its own worker ([`crate::parking`]).

use crate::config::Mode;
use crate::filter::reject;
use crate::host::Host;
use crate::metrics::{self, BulkheadMetrics};
use crate::parking::{ParkState, Parked, Parking};
use crate::store::{self, Moved};
use crate::Compiled;
use alloc::rc::Rc;
use alloc::vec::Vec;
use breakwater_policies::bulkhead::{Update, Waiter};
use breakwater_policies::{Acquire, MS, SECOND};

/// Where a stream stands with the bulkhead.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Permit {
    /// No bulkhead, a dry run past the limit, or shared data failed us (fail open).
    #[default]
    None,
    Held(u8),
    /// Paused in the queue (see the worker's [`Parking`] for how the wait ended).
    Waiting(u8),
    /// Refused at once; Breakwater answered it.
    Refused,
}

/// What admission decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admit {
    Pass(Permit),
    /// Paused until woken or timed out.
    Wait(u8),
    /// Answered with `bulkhead-full`.
    Refused,
}

/// Retry-After for a full bulkhead or a queue timeout: the pressure is momentary.
const RETRY_AFTER_NS: u64 = SECOND;

fn m(c: &Compiled, policy: usize) -> BulkheadMetrics {
    c.metrics.get(policy).map(|m| m.bulkhead).unwrap_or_default()
}

fn moved(host: &impl Host, m: &BulkheadMetrics, by: Moved) {
    metrics::add(host, m.active, by.active);
    metrics::add(host, m.queued, by.queued);
}

/// Takes a permit for request `ticket`, or queues it, or refuses it (with the reply sent).
pub fn admit(c: &Rc<Compiled>, host: &impl Host, w: &Parking, policy: usize, ticket: u32, now: u64) -> Admit {
    let (Some(p), Some(b)) = (c.config.policies.get(policy), c.bulkhead(policy)) else {
        return Admit::Pass(Permit::None);
    };
    let class = b.priority.as_ref().map_or(0, |pr| pr.class_of(host.request_header(&pr.header).as_deref()));
    let may_wait = p.mode == Mode::Enforce && b.machine.queue_max > 0 && w.can_wait.get();
    let worker = w.worker.get();
    let Some((u, by)) =
        store::bulkhead(host, c.bulkhead_key(policy), |s| s.acquire(&b.machine, now, worker, class, ticket, may_wait))
    else {
        // Shared data failing entirely: fail open, the bulkhead must not become the outage.
        return Admit::Pass(Permit::None);
    };
    let mx = m(c, policy);
    moved(host, &mx, by);
    notify(c, host, policy, u.granted);
    match (u.value, p.mode) {
        (Acquire::Admitted, _) => {
            metrics::inc(host, mx.admitted);
            w.took(c, policy);
            Admit::Pass(Permit::Held(class))
        }
        (Acquire::Queued, _) => {
            w.park(ticket, Parked { compiled: c.clone(), policy, class, since: now, state: ParkState::Waiting });
            Admit::Wait(class)
        }
        (Acquire::Full, Mode::Enforce) => {
            metrics::inc(host, mx.rejected_full);
            reject(host, p, "bulkhead-full", RETRY_AFTER_NS);
            Admit::Refused
        }
        (Acquire::Full, Mode::DryRun) => {
            metrics::inc(host, mx.dry_run_rejected_full);
            Admit::Pass(Permit::None)
        }
    }
}

/// The stream is over: give its permit back, or leave the queue.
pub fn finish(c: &Compiled, host: &impl Host, w: &Parking, policy: usize, ticket: u32, permit: Permit) -> Finished {
    match permit {
        Permit::None => Finished::Forwarded(None),
        Permit::Refused => Finished::NotForwarded,
        Permit::Held(class) => {
            release(c, host, w, policy, class, None);
            Finished::Forwarded(None)
        }
        Permit::Waiting(class) => match w.take(ticket) {
            Some(Parked { state: ParkState::Granted { at }, .. }) => {
                release(c, host, w, policy, class, None);
                Finished::Forwarded(Some(at))
            }
            Some(Parked { state: ParkState::TimedOut, .. }) => Finished::NotForwarded,
            // The client left while waiting: leave the queue, or, if a permit was handed over
            // in the meantime (its wake-up still on the way), give that back.
            Some(Parked { state: ParkState::Waiting, since, .. }) => {
                release(c, host, w, policy, class, Some(ticket));
                let now = host.now_ns();
                metrics::set(host, m(c, policy).queue_ms, now.saturating_sub(since) / MS);
                Finished::NotForwarded
            }
            None => {
                release(c, host, w, policy, class, Some(ticket));
                Finished::NotForwarded
            }
        },
    }
}

/// How a stream that passed the bulkhead's admission ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finished {
    /// Went on to the upstream; Some(t): only after waiting, from `t`.
    Forwarded(Option<u64>),
    /// Never went on: refused, timed out, or its client left while it waited.
    NotForwarded,
}

/// Returns a permit. With `waiting`, the stream may still be queued under that ticket instead:
/// then it only leaves the queue.
fn release(c: &Compiled, host: &impl Host, w: &Parking, policy: usize, class: u8, waiting: Option<u32>) {
    let Some(b) = c.bulkhead(policy) else { return };
    let (worker, now) = (w.worker.get(), host.now_ns());
    let result = store::bulkhead(host, c.bulkhead_key(policy), |s| {
        if let Some(ticket) = waiting {
            let left = s.withdraw(&b.machine, now, worker, ticket);
            if left.value {
                return left;
            }
        }
        let u = s.release(&b.machine, now, worker, class);
        Update { value: false, changed: u.changed, granted: u.granted }
    });
    if let Some((u, by)) = result {
        moved(host, &m(c, policy), by);
        notify(c, host, policy, u.granted);
    }
    // A permit this worker counted as held (at admission, or at wake-up) is back. One handed
    // over but never woken up was never counted.
    if waiting.is_none() {
        w.returned(c, policy);
    }
}

/// Tells each granted waiter's worker to resume it. A waiter whose worker is gone (its queue no
/// longer exists) cannot use the permit: it is returned at once, which may grant others.
fn notify(c: &Compiled, host: &impl Host, policy: usize, granted: Vec<Waiter>) {
    let mut todo = granted;
    // Each round returns a permit for good; the bound only guards against a bug looping forever.
    for _ in 0..1024 {
        let Some(waiter) = todo.pop() else { return };
        if host.enqueue(waiter.worker, &waiter.ticket.to_le_bytes()) {
            continue;
        }
        let Some(b) = c.bulkhead(policy) else { return };
        let now = host.now_ns();
        if let Some((u, by)) =
            store::bulkhead(host, c.bulkhead_key(policy), |s| s.release(&b.machine, now, waiter.worker, waiter.class))
        {
            moved(host, &m(c, policy), by);
            todo.extend(u.granted);
        }
    }
}

/// `on_queue_ready`: resumes this worker's waiters that other workers (or this one) handed a
/// permit to.
pub fn wake(host: &impl Host, w: &Parking, queue: u32) {
    while let Some(message) = host.dequeue(queue) {
        let Some(ticket) = message.get(..4).and_then(|b| b.try_into().ok()).map(u32::from_le_bytes) else {
            continue;
        };
        let now = host.now_ns();
        // Not waiting any more: its stream ended, and its on_log gave the permit back.
        let Some((c, policy, _class, since)) = w.settle(ticket, ParkState::Granted { at: now }) else { continue };
        let mx = m(&c, policy);
        metrics::inc(host, mx.admitted);
        metrics::inc(host, mx.waited);
        metrics::set(host, mx.queue_ms, now.saturating_sub(since) / MS);
        w.took(&c, policy);
        if host.enter(ticket) {
            host.resume_request();
        }
    }
}

/// On every tick: answers the waiters whose queue timeout has passed with `queue-timeout`.
pub fn expire(host: &impl Host, w: &Parking) {
    if w.is_empty() {
        return;
    }
    let now = host.now_ns();
    let worker = w.worker.get();
    for ticket in w.overdue(now) {
        let Some(parked) = w.take(ticket) else { continue };
        let (c, policy, since) = (parked.compiled.clone(), parked.policy, parked.since);
        let (Some(p), Some(b)) = (c.config.policies.get(policy), c.bulkhead(policy)) else { continue };
        let left = store::bulkhead(host, c.bulkhead_key(policy), |s| s.withdraw(&b.machine, now, worker, ticket));
        let Some((u, by)) = left.filter(|(u, _)| u.value) else {
            // Not in the queue: it was just handed a permit; its wake-up is on the way.
            w.park(ticket, parked);
            continue;
        };
        w.park(ticket, Parked { state: ParkState::TimedOut, ..parked });
        let mx = m(&c, policy);
        moved(host, &mx, by);
        notify(&c, host, policy, u.granted);
        metrics::inc(host, mx.rejected_queue_timeout);
        metrics::set(host, mx.queue_ms, now.saturating_sub(since) / MS);
        if host.enter(ticket) {
            reject(host, p, "queue-timeout", RETRY_AFTER_NS);
        }
    }
}

/// On every tick: a worker holding permits says it is alive (see `stale_after`), for every
/// bulkhead it holds permits of, under whichever configuration took them.
pub fn renew(host: &impl Host, w: &Parking) {
    let holdings = w.holdings();
    if holdings.is_empty() {
        return;
    }
    let (worker, now) = (w.worker.get(), host.now_ns());
    for (c, policy) in holdings {
        let Some(b) = c.bulkhead(policy) else { continue };
        if let Some((u, by)) = store::bulkhead(host, c.bulkhead_key(policy), |s| s.renew(&b.machine, now, worker)) {
            moved(host, &m(&c, policy), by);
            notify(&c, host, policy, u.granted);
        }
    }
}

#[cfg(test)]
mod tests;
