//! The bulkhead on the request path: take a permit (or wait, or be refused) on the request
//! headers, give it back when the stream ends, wake waiters when permits free up, answer
//! recalls, and on the tick return idle leases, renew held permits and time out waiters.
//!
//! While the bulkhead is far from full a worker serves its requests from its lease
//! ([`crate::holdings`]) with no host call. Otherwise every permit change is one CAS on the
//! policy's shared state, so the limit is exact across workers either way. A waiter handed a
//! permit is woken by its own worker ([`crate::waiters`]).

use crate::config::Mode;
use crate::holdings::Holding;
use crate::host::Host;
use crate::reply::Refusal;
use crate::vm::{message, Vm};
use crate::waiters::{Parked, Wait};
use crate::{metrics, store, Compiled, Policy};
use alloc::rc::Rc;
use alloc::vec::Vec;
use breakwater_policies::bulkhead::{Ask, Waiter};
use breakwater_policies::{Acquire, MS, SECOND};

/// Where a stream stands with the bulkhead.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Permit {
    /// No bulkhead, a dry run past the limit, or shared data failed us (fail open).
    #[default]
    None,
    /// A permit of this worker's lease.
    Leased,
    /// A permit held one by one, of this class.
    Exact(u8),
    /// Paused in the queue (see the worker's waiters for how the wait ended).
    Waiting(u8),
    /// Refused at once; Breakwater answered it.
    Refused,
}

/// How a stream that passed the bulkhead's admission ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finished {
    /// Went on to the upstream; Some(t): only after waiting, from `t`.
    Forwarded(Option<u64>),
    /// Never went on: refused, timed out, or its client left while it waited.
    NotForwarded,
}

/// Retry-After for a full bulkhead or a queue timeout: the pressure is momentary.
const RETRY_AFTER_NS: u64 = SECOND;

/// This worker's holding of the policy's bulkhead (looked up once per policy, then cached).
fn holding(vm: &Vm, p: &Policy) -> Option<Rc<Holding>> {
    p.holding(|| vm.holdings.of(&p.bulkhead_key))
}

/// Takes a permit for request `ticket`, or queues it, or refuses it (with the reply sent).
pub fn admit(c: &Rc<Compiled>, p: &Policy, host: &impl Host, vm: &Vm, ticket: u32) -> Permit {
    let Some(b) = &p.cfg.bulkhead else { return Permit::None };
    let Some(h) = holding(vm, p) else { return Permit::None };
    let enforce = p.cfg.mode == Mode::Enforce;
    // Leases need one class; a dry run takes the exact path so its counts are exact.
    let leasing = enforce && b.priority.is_none();
    if leasing && !h.draining.get() && h.idle() > 0 {
        h.in_use.set(h.in_use.get() + 1);
        h.used.set(true);
        admitted(c, p, vm, false);
        return Permit::Leased;
    }
    let class = b.priority.as_ref().map_or(0, |pr| pr.class_of(host.request_header(&pr.header).as_deref()));
    let now = vm.clock(host);
    let may_pause = enforce && vm.can_wait.get();
    let ask = Ask {
        worker: vm.worker.get(),
        class,
        ticket,
        may_wait: may_pause && b.machine.queue_max > 0,
        may_pause,
        lease: leasing,
    };
    let Some((u, taken)) = store::bulkhead(host, &p.bulkhead_key, |s| s.ask(&b.machine, now, ask)) else {
        // Shared data failing entirely: fail open, the bulkhead must not become the outage.
        return Permit::None;
    };
    vm.holdings.touch(&h, c, p.index);
    gauges(p, host, taken);
    notify(p, host, vm, u.granted, u.refused);
    match u.value {
        Acquire::Leased(size) => {
            h.lease.set(h.lease.get() + size);
            h.draining.set(false);
            h.in_use.set(h.in_use.get() + 1);
            h.used.set(true);
            h.renewed_at.set(now);
            admitted(c, p, vm, false);
            Permit::Leased
        }
        Acquire::Admitted => {
            h.exact.set(h.exact.get() + 1);
            h.renewed_at.set(now);
            admitted(c, p, vm, false);
            Permit::Exact(class)
        }
        Acquire::Queued => park(c, p, vm, ticket, class, now, false),
        Acquire::Recalling { workers, recall_only } => {
            // Ask the lease holders for their idle permits; they go to the waiters in order.
            let recall = message::about(message::RECALL, &p.bulkhead_key);
            for w in workers {
                host.enqueue(w, &recall);
            }
            park(c, p, vm, ticket, class, now, recall_only)
        }
        Acquire::Full | Acquire::Shed => {
            let why = if u.value == Acquire::Shed { Refusal::Shed } else { Refusal::BulkheadFull };
            vm.list(c, p);
            if !enforce {
                p.local(|l| l.counts.dry_run_reject(why));
                return Permit::None;
            }
            p.local(|l| l.counts.reject(why));
            crate::fallback::refuse(host, vm, p, why, RETRY_AFTER_NS, None);
            Permit::Refused
        }
    }
}

fn admitted(c: &Rc<Compiled>, p: &Policy, vm: &Vm, waited: bool) {
    p.local(|l| {
        l.counts.admitted += 1;
        l.counts.waited += u32::from(waited);
    });
    vm.list(c, p);
}

/// The gauges follow the shared state: permits taken (in flight, or idle in a worker's lease)
/// and requests waiting, as of the last change any worker made. Set, not added, so a worker
/// that dies takes nothing with it: the counts heal when its permits are reclaimed.
pub(crate) fn gauges(p: &Policy, host: &impl Host, taken: store::Taken) {
    metrics::set(host, p.metrics(host).bulkhead.active, u64::from(taken.active));
    metrics::set(host, p.metrics(host).bulkhead.queued, u64::from(taken.queued));
}

fn park(c: &Rc<Compiled>, p: &Policy, vm: &Vm, ticket: u32, class: u8, now: u64, recall_only: bool) -> Permit {
    let parked = Parked { compiled: c.clone(), policy: p.index, class, since: now, recall_only, state: Wait::Waiting };
    vm.waiters.park(ticket, parked);
    vm.list(c, p);
    Permit::Waiting(class)
}

/// The stream is over: give its permit back, or leave the queue.
pub fn finish(p: &Policy, host: &impl Host, vm: &Vm, ticket: u32, permit: Permit) -> Finished {
    match permit {
        Permit::None => Finished::Forwarded(None),
        Permit::Refused => Finished::NotForwarded,
        Permit::Leased => {
            return_leased(p, host, vm);
            Finished::Forwarded(None)
        }
        Permit::Exact(class) => {
            release(p, host, vm, class);
            Finished::Forwarded(None)
        }
        Permit::Waiting(class) => match vm.waiters.take(ticket) {
            Some(Parked { state: Wait::Granted { at }, .. }) => {
                release(p, host, vm, class);
                Finished::Forwarded(Some(at))
            }
            Some(Parked { state: Wait::TimedOut | Wait::Refused, .. }) => Finished::NotForwarded,
            // Answered without word of its grant (see `expire`): the entry waits on for it.
            Some(parked @ Parked { state: Wait::Left, .. }) => {
                vm.waiters.park(ticket, parked);
                Finished::NotForwarded
            }
            // The client left while waiting: leave the queue. Not in it any more: it was handed
            // a permit or refused, and word of which is on its way (see `Wait::Left`).
            Some(parked @ Parked { state: Wait::Waiting, .. }) => {
                let now = vm.clock(host);
                let since = parked.since;
                if !leave(p, host, vm, ticket, now) {
                    vm.waiters.park(ticket, Parked { state: Wait::Left, since: now, ..parked });
                }
                metrics::set(host, p.metrics(host).bulkhead.queue_ms, now.saturating_sub(since) / MS);
                Finished::NotForwarded
            }
            None => Finished::NotForwarded,
        },
    }
}

/// A leased permit's request ended: the permit stays with the lease, idle, unless the lease is
/// draining (after a recall), when it goes back at once.
fn return_leased(p: &Policy, host: &impl Host, vm: &Vm) {
    let Some(h) = holding(vm, p) else { return };
    h.in_use.set(h.in_use.get().saturating_sub(1));
    if h.draining.get() {
        let keep = h.lease.get().saturating_sub(1);
        trim(p, host, vm, &h, keep, keep > 0);
    }
}

/// Returns a permit held one by one.
fn release(p: &Policy, host: &impl Host, vm: &Vm, class: u8) {
    if let Some(h) = holding(vm, p) {
        h.exact.set(h.exact.get().saturating_sub(1));
    }
    give_back(p, host, vm, class, vm.clock(host));
}

/// Returns one of this worker's permits of `class` to the shared state.
fn give_back(p: &Policy, host: &impl Host, vm: &Vm, class: u8, now: u64) {
    let Some(b) = &p.cfg.bulkhead else { return };
    let worker = vm.worker.get();
    if let Some((u, taken)) = store::bulkhead(host, &p.bulkhead_key, |s| s.release(&b.machine, now, worker, class)) {
        gauges(p, host, taken);
        notify(p, host, vm, u.granted, u.refused);
    }
}

/// A waiter leaves the queue (its client left). False if it was not in it any more.
fn leave(p: &Policy, host: &impl Host, vm: &Vm, ticket: u32, now: u64) -> bool {
    let Some(b) = &p.cfg.bulkhead else { return true };
    let worker = vm.worker.get();
    match store::bulkhead(host, &p.bulkhead_key, |s| s.withdraw(&b.machine, now, worker, ticket)) {
        Some((u, taken)) => {
            gauges(p, host, taken);
            notify(p, host, vm, u.granted, u.refused);
            u.value
        }
        // Shared data failing us entirely: there is nothing to wait for.
        None => true,
    }
}

/// Gives back the lease's permits beyond `keep`.
fn trim(p: &Policy, host: &impl Host, vm: &Vm, h: &Holding, keep: u32, draining: bool) {
    let Some(b) = &p.cfg.bulkhead else { return };
    let (worker, now) = (vm.worker.get(), vm.clock(host));
    let u = store::bulkhead(host, &p.bulkhead_key, |s| s.trim_lease(&b.machine, now, worker, keep, draining));
    if let Some((u, taken)) = u {
        gauges(p, host, taken);
        h.lease.set(keep.min(h.lease.get()));
        h.draining.set(draining && h.lease.get() > 0);
        h.renewed_at.set(now);
        notify(p, host, vm, u.granted, u.refused);
    }
}

/// Tells each granted waiter's worker to resume it, and each refused one's to refuse it. A
/// waiter whose worker is gone (its queue no longer exists) cannot use the permit: it is
/// returned at once, which may grant others.
pub(crate) fn notify(p: &Policy, host: &impl Host, vm: &Vm, granted: Vec<Waiter>, refused: Vec<Waiter>) {
    for w in refused {
        host.enqueue(w.worker, &message::ticket(message::REFUSE, w.ticket));
    }
    let Some(b) = &p.cfg.bulkhead else { return };
    let mut todo = granted;
    // Each round returns a permit for good; the bound only guards against a bug looping forever.
    for _ in 0..1024 {
        let Some(w) = todo.pop() else { return };
        if host.enqueue(w.worker, &message::ticket(message::GRANT, w.ticket)) {
            continue;
        }
        let now = vm.coarse_now();
        if let Some((u, taken)) =
            store::bulkhead(host, &p.bulkhead_key, |s| s.release(&b.machine, now, w.worker, w.class))
        {
            gauges(p, host, taken);
            todo.extend(u.granted);
            for r in u.refused {
                host.enqueue(r.worker, &message::ticket(message::REFUSE, r.ticket));
            }
        }
    }
}

/// `on_queue_ready`: this worker's messages (see [`message`]).
pub fn on_message(host: &impl Host, vm: &Vm, queue: u32) {
    while let Some(m) = host.dequeue(queue) {
        let (kind, data) = match m.split_first() {
            Some((k, d)) => (*k, d),
            None => continue,
        };
        let ticket = data.get(..4).and_then(|b| b.try_into().ok()).map(u32::from_le_bytes);
        match (kind, ticket) {
            (message::GRANT, Some(t)) => wake(host, vm, t),
            (message::REFUSE, Some(t)) => refuse(host, vm, t),
            (message::RECALL, _) => recall(host, vm, data),
            (message::REFRESH, _) => crate::breaker::refresh(host, vm, data),
            _ => {}
        }
    }
}

/// Resumes a waiter that was handed a permit.
fn wake(host: &impl Host, vm: &Vm, ticket: u32) {
    let now = vm.clock(host);
    // Its client left before this grant arrived: the permit goes back.
    if let Some(gone) = vm.waiters.take_left(ticket) {
        if let Some(p) = gone.compiled.policy(gone.policy) {
            give_back(p, host, vm, gone.class, now);
        }
        return;
    }
    // Not waiting any more: it timed out first, or its stream left the queue and is over.
    let Some(s) = vm.waiters.settle(ticket, Wait::Granted { at: now }) else { return };
    let Some(p) = s.compiled.policy(s.policy) else { return };
    if let Some(h) = holding(vm, p) {
        h.exact.set(h.exact.get() + 1);
        h.renewed_at.set(now);
        vm.holdings.touch(&h, &s.compiled, p.index);
    }
    admitted(&s.compiled, p, vm, true);
    metrics::set(host, p.metrics(host).bulkhead.queue_ms, now.saturating_sub(s.since) / MS);
    if host.enter(ticket) {
        host.resume_request();
    }
}

/// Refuses a waiter whose recall freed nothing.
fn refuse(host: &impl Host, vm: &Vm, ticket: u32) {
    let now = vm.clock(host);
    // Its client left before this refusal arrived: there is no one to answer.
    if vm.waiters.take_left(ticket).is_some() {
        return;
    }
    let Some(s) = vm.waiters.settle(ticket, Wait::Refused) else { return };
    let Some(p) = s.compiled.policy(s.policy) else { return };
    ended_waiting(&s.compiled, p, host, vm, Refusal::BulkheadFull, now.saturating_sub(s.since));
    if host.enter(ticket) {
        crate::fallback::refuse(host, vm, p, Refusal::BulkheadFull, RETRY_AFTER_NS, Some(ticket));
    }
}

fn ended_waiting(c: &Rc<Compiled>, p: &Policy, host: &impl Host, vm: &Vm, why: Refusal, waited_ns: u64) {
    p.local(|l| l.counts.reject(why));
    vm.list(c, p);
    metrics::set(host, p.metrics(host).bulkhead.queue_ms, waited_ns / MS);
}

/// Another worker needs a permit while this one's lease may sit idle: give back the idle ones,
/// and the rest as their requests end.
fn recall(host: &impl Host, vm: &Vm, key: &[u8]) {
    let Some(h) = vm.holdings.find(key) else { return };
    let Some((c, i)) = h.owner() else { return };
    let Some(p) = c.policy(i) else { return };
    if h.lease.get() > 0 && !h.draining.get() {
        let keep = h.in_use.get();
        trim(p, host, vm, &h, keep, keep > 0);
    }
}

/// On every tick: returns leases unused since the last tick, and renews held permits now and
/// then so that other workers know this one is alive (see `stale_after`).
pub fn maintain(host: &impl Host, vm: &Vm, now: u64) {
    for h in vm.holdings.take_listed() {
        let Some((c, i)) = h.owner() else { continue };
        let Some(p) = c.policy(i) else { continue };
        let Some(b) = &p.cfg.bulkhead else { continue };
        let unused = !h.used.replace(false);
        if h.idle() > 0 && unused && !h.draining.get() {
            let keep = h.in_use.get();
            trim(p, host, vm, &h, keep, false);
        } else if now.saturating_sub(h.renewed_at.get()) >= b.machine.stale_after_ns / 4 {
            // A renewal is a hand-over of no latency samples.
            if renew(p, b, host, vm, now, Default::default()) {
                h.renewed_at.set(now);
            }
        }
    }
}

/// Hands `batch` to the bulkhead's adaptive limit, renewing this worker's permits (also
/// [`maintain`]'s renewal, with no samples); false if shared data failed.
pub fn renew(
    p: &Policy,
    b: &crate::config::Bulkhead,
    host: &impl Host,
    vm: &Vm,
    now: u64,
    batch: breakwater_policies::Latencies,
) -> bool {
    let worker = vm.worker.get();
    let Some((u, taken)) = store::bulkhead(host, &p.bulkhead_key, |s| s.adapt(&b.machine, now, worker, batch)) else {
        return false;
    };
    if u.value.judged {
        metrics::set(host, p.metrics(host).bulkhead.limit, u.value.limit.into());
    }
    // A lower limit: lease holders give back their idle permits (this worker too, through its
    // own queue; a worker without a lease ignores the message).
    if u.value.recall {
        let recall = message::about(message::RECALL, &p.bulkhead_key);
        vm.broadcast(host, &recall);
        host.enqueue(worker, &recall);
    }
    gauges(p, host, taken);
    notify(p, host, vm, u.granted, u.refused);
    true
}

/// On every tick: answers the waiters whose time is up: `queue-timeout`, or `bulkhead-full`
/// for those that waited only for a recall; forgets those whose client left and whose grant or
/// refusal never came.
pub fn expire(host: &impl Host, vm: &Vm, now: u64) {
    if vm.waiters.is_empty() {
        return;
    }
    vm.waiters.drop_left(now);
    let worker = vm.worker.get();
    for ticket in vm.waiters.overdue(now) {
        let Some(parked) = vm.waiters.take(ticket) else { continue };
        let c = parked.compiled.clone();
        let Some(p) = c.policy(parked.policy) else { continue };
        let Some(b) = &p.cfg.bulkhead else { continue };
        let left = store::bulkhead(host, &p.bulkhead_key, |s| s.withdraw(&b.machine, now, worker, ticket));
        let withdrawn = left.as_ref().is_some_and(|(u, _)| u.value);
        if let Some((u, taken)) = left {
            gauges(p, host, taken);
            notify(p, host, vm, u.granted, u.refused);
        }
        // Not in the queue: it was just handed a permit, and its wake-up is on the way. Unless
        // none came within a cross-worker hop of its deadline: then the shared state lost it
        // (another writer rewrote it), and it is answered now; a grant that still arrives is
        // given back (see `Wait::Left`).
        if !withdrawn && now < parked.deadline().saturating_add(b.machine.recall_timeout_ns) {
            vm.waiters.park(ticket, parked);
            continue;
        }
        let (why, state) = if parked.recall_only {
            (Refusal::BulkheadFull, Wait::Refused)
        } else {
            (Refusal::QueueTimeout, Wait::TimedOut)
        };
        let since = parked.since;
        let parked =
            if withdrawn { Parked { state, ..parked } } else { Parked { state: Wait::Left, since: now, ..parked } };
        vm.waiters.park(ticket, parked);
        ended_waiting(&c, p, host, vm, why, now.saturating_sub(since));
        if host.enter(ticket) {
            crate::fallback::refuse(host, vm, p, why, RETRY_AFTER_NS, Some(ticket));
        }
    }
}

#[cfg(test)]
mod tests;
