//! Each worker's tick (every `sync_interval`): it visits only the policies that changed since
//! the last one (see [`Vm::list`]), so an idle Envoy with thousands of policies does next to
//! nothing. For each: add the counted stats to Envoy's, hand the breaker its batch of successes
//! and refresh (or drop) the view, hand the retry budget its deposits and refunds. Then the
//! bulkhead: idle leases back, held permits renewed, waiters past their time answered.

use crate::host::Host;
use crate::vm::Vm;
use crate::{breaker, bulkhead, retry};

pub fn tick(host: &impl Host, vm: &Vm) {
    let now = vm.clock(host);
    for (c, i) in vm.take_listed() {
        let Some(p) = c.policy(i) else { continue };
        let counts = p.local(|l| core::mem::take(&mut l.counts));
        if !counts.is_empty() {
            p.metrics.flush(host, &counts);
        }
        let again = breaker::sync(p, host, now) | retry::sync(p, host, now);
        if again {
            vm.list(&c, p);
        }
    }
    bulkhead::maintain(host, vm, now);
    bulkhead::expire(host, vm, now);
}
