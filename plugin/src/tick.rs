//! Each worker's tick: every `sync_interval` while something is timed to it, every
//! [`COARSE_NS`] otherwise ([`Vm::pace`]). It visits only what changed since the last one
//! (see [`Vm::list`]), and most of what it visits has nothing due, so an idle Envoy with
//! thousands of policies does next to nothing and a busy one touches shared data about once a
//! second per policy:
//! * stats counted on the worker go to Envoy's counters every quarter second;
//! * the retry budget gets its deposits once a bucket, refunds and old stock at once;
//! * breakers: batches handed over once due, suspect and open breakers moved on time
//!   ([`breaker::tick`]);
//! * bulkheads: idle leases back, held permits renewed, waiters past their time answered;
//! * latency samples to the adaptive timeouts' histograms once a window slice, and to adaptive
//!   limits four times a window ([`timeout::sync`]);
//! * the worker's place in the roster renewed every two seconds.

use crate::host::Host;
use crate::vm::Vm;
use crate::{breaker, bulkhead, retry, timeout};
use breakwater_policies::MS;

/// Stats reach Envoy this long after they are counted, at most (plus a tick).
const FLUSH_NS: u64 = 250 * MS;
/// The tick's pace while nothing on the worker is timed to `sync_interval` (or `sync_interval`
/// if longer): see [`Vm::pace`]. Each coarse tick flushes the stats.
pub const COARSE_NS: u64 = FLUSH_NS;

pub fn tick(host: &impl Host, vm: &Vm) {
    let now = vm.clock(host);
    vm.renew_roster(host, now, false);
    let flush_all = vm.flushes_all();
    for (c, i) in vm.take_listed() {
        let Some(p) = c.policy(i) else { continue };
        let flush = p.local(|l| {
            let due = flush_all || now.saturating_sub(l.flushed_at) >= FLUSH_NS;
            if due {
                l.flushed_at = now;
                Some(core::mem::take(&mut l.counts))
            } else {
                None
            }
        });
        if let Some(counts) = &flush {
            if !counts.is_empty() {
                p.metrics(host).flush(host, counts);
            }
        }
        let counts_left = p.local(|l| !l.counts.is_empty());
        let samples_left = timeout::sync(&c, p, host, vm, now);
        if retry::sync(p, host, now) || counts_left || samples_left {
            vm.list(&c, p);
        }
    }
    let watching = breaker::tick(host, vm, now);
    bulkhead::maintain(host, vm, now);
    bulkhead::expire(host, vm, now);
    vm.pace(host, watching || vm.waiters.any_timed());
}

/// Adds every count still on the worker to Envoy's stats now (a root context retiring).
pub fn flush_all(host: &impl Host, vm: &Vm) {
    for (c, i) in vm.take_listed() {
        if let Some(p) = c.policy(i) {
            let counts = p.local(|l| core::mem::take(&mut l.counts));
            p.metrics(host).flush(host, &counts);
            if retry::sync(p, host, vm.coarse_now()) {
                vm.list(&c, p);
            }
        }
    }
}
