//! Retries on the request path, and the retry budget that bounds them.
//!
//! Envoy's router makes the retries, out of the plugin's sight. So a request *reserves* its
//! retries from the shared budget before it is forwarded, the router is capped at what was
//! reserved, and when the stream ends the attempt count says how many were used: the rest is
//! refunded. The budget can never be overdrawn, however many requests fail at once.
//!
//! Two ways to drive the router:
//! * **The route's own `retry_policy`** (or Istio's VirtualService `retries`), with a `retry`
//!   section that has no `retry_on`: Breakwater only budgets it. A request the budget allows
//!   in full gets no header at all; one it cannot gets `x-envoy-max-retries` with what there
//!   is (0 when denied). The attempt count comes from `x-envoy-attempt-count` in the response
//!   headers Breakwater reads anyway (the route's `include_attempt_count_in_response`), else
//!   from `upstream.request_attempt_count` (one more host call per request).
//! * **`retry_on` in the policy**: every request gets `x-envoy-retry-on` (and the other retry
//!   headers that are set) and `x-envoy-max-retries`, ~4–8k instructions each.
//!
//! Reserving through shared data on every request would cost two round trips, so each worker
//! withdraws a small stock of retries at a time (only while the budget is far from empty) and
//! serves requests from it; unused stock goes back as soon as its time bucket has passed.
//! Deposits (one per request) and refunds are handed over on the tick.

use crate::config::Mode;
use crate::headers::decimal;
use crate::host::{property_u64, Host};
use crate::local::RetryLocal;
use crate::outcome::Response;
use crate::vm::Vm;
use crate::{metrics, store, Compiled, Policy};
use alloc::rc::Rc;
use breakwater_policies::{BudgetConfig, BudgetState};

/// What one request was granted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Grant {
    /// Retries the router may make.
    pub allowed: u32,
    /// Retries withdrawn from the budget for it, in bucket `epoch`.
    pub reserved: u32,
    pub epoch: u64,
}

/// A worker withdraws this many requests' worth of retries at a time…
const STOCK_REQUESTS: u32 = 8;
/// …but only while the budget holds this many times what it takes; nearer empty, every request
/// withdraws exactly its own retries, so no worker sits on retries another one needs.
const STOCK_HEADROOM: u32 = 4;

/// Tells the router how to retry an admitted request, and reserves its retries.
pub fn reserve(c: &Rc<Compiled>, p: &Policy, host: &impl Host, vm: &Vm) -> Option<Grant> {
    let r = p.cfg.retry.as_ref()?;
    for (name, value) in &r.router_headers {
        host.set_request_header(name, value.as_bytes());
    }
    let want = r.max_retries;
    let grant = match &r.budget {
        None => Grant { allowed: want, reserved: 0, epoch: 0 },
        Some(b) => {
            p.local(|l| l.retry.deposits = l.retry.deposits.saturating_add(1));
            vm.list(c, p);
            let (reserved, epoch) = take(p, host, vm, b, want);
            if reserved == 0 && want > 0 {
                p.local(|l| match p.cfg.mode {
                    Mode::Enforce => l.counts.denied += 1,
                    Mode::DryRun => l.counts.dry_run_denied += 1,
                });
            }
            // A dry run lets every retry through; the budget still records them (see `settle`).
            let allowed = if p.cfg.mode == Mode::DryRun { want } else { reserved };
            Grant { allowed, reserved, epoch }
        }
    };
    // Without retry_on the route's own retry policy applies as it is, unless the budget caps it.
    if r.drives_router() || grant.allowed < want {
        let mut digits = [0u8; 20];
        host.set_request_header("x-envoy-max-retries", decimal(grant.allowed.into(), &mut digits));
    }
    Some(grant)
}

/// Takes `want` retries from the worker's stock, or withdraws them from the shared budget.
fn take(p: &Policy, host: &impl Host, vm: &Vm, b: &BudgetConfig, want: u32) -> (u32, u64) {
    // The stock is per time bucket (ttl/10): the time of the last clock read tells which.
    let now = vm.coarse_now();
    let epoch = b.epoch(now);
    let from_stock = p.local(|l| {
        let ok = l.retry.epoch == epoch && l.retry.idle >= want;
        if ok {
            l.retry.idle -= want;
        }
        ok
    });
    if from_stock {
        return (want, epoch);
    }
    let now = vm.clock(host);
    // Hand over what is pending with the withdrawal: one write for both.
    let pending = p.local(|l| core::mem::take(&mut l.retry));
    let stock = want.saturating_mul(STOCK_REQUESTS);
    let result = store::apply(host, &p.budget_key, |s: &mut BudgetState| {
        hand_over(s, b, now, &pending);
        let ask = if s.available(b, now) >= STOCK_HEADROOM.saturating_mul(want + stock) { want + stock } else { want };
        (s.withdraw(b, now, ask), true)
    });
    match result {
        Some(((got, epoch), state)) => {
            metrics::set(host, p.metrics(host).retry.budget_remaining, u64::from(state.available(b, now)));
            let reserved = got.min(want);
            p.local(|l| {
                l.retry.idle = got - reserved;
                l.retry.epoch = epoch;
                l.retry.handed_epoch = epoch;
            });
            (reserved, epoch)
        }
        // Shared data failing entirely: put the pending counts back, and let the request retry
        // as Envoy would without Breakwater (the budget must not become the outage).
        None => {
            p.local(|l| l.retry = pending);
            (want, 0)
        }
    }
}

/// Applies a worker's pending deposits, refunds and dry-run overdraws, and returns its stock.
fn hand_over(s: &mut BudgetState, b: &BudgetConfig, now: u64, pending: &RetryLocal) {
    s.refund(pending.epoch, pending.idle);
    for &(epoch, n) in &pending.refunds {
        s.refund(epoch, n);
    }
    s.deposit(b, now, pending.deposits);
    s.overdraw(b, now, pending.overdrawn);
}

/// When the stream is over: counts the retries Envoy made, and gives back the unused ones.
/// `forwarded`: the request reached the router (it was not refused or abandoned in a queue).
pub fn settle(c: &Rc<Compiled>, p: &Policy, host: &impl Host, vm: &Vm, grant: Grant, forwarded: bool, r: &Response) {
    let retries = if forwarded && grant.allowed > 0 {
        // 0 attempts: the router never sent it; 1: no retry.
        let attempts = r
            .attempts
            .map(u64::from)
            .or_else(|| property_u64(host, &["upstream", "request_attempt_count"]))
            .unwrap_or(1);
        u32::try_from(attempts.saturating_sub(1)).unwrap_or(u32::MAX)
    } else {
        0
    };
    if retries > 0 {
        let status = match r.status {
            0 => property_u64(host, &["response", "code"]).unwrap_or(0),
            s => u64::from(s),
        };
        p.local(|l| {
            l.counts.retries = l.counts.retries.saturating_add(retries);
            l.counts.rescued += u32::from((1..500).contains(&status));
        });
        vm.list(c, p);
    }
    if p.cfg.retry.as_ref().and_then(|r| r.budget.as_ref()).is_none() {
        return;
    }
    let used = retries.min(grant.reserved);
    let unused = grant.reserved - used;
    p.local(|l| {
        l.retry.overdrawn = l.retry.overdrawn.saturating_add(retries - used);
        if unused == 0 {
            // nothing to give back
        } else if l.retry.epoch == grant.epoch {
            l.retry.idle = l.retry.idle.saturating_add(unused);
        } else if let Some(r) = l.retry.refunds.iter_mut().find(|(e, _)| *e == grant.epoch) {
            r.1 = r.1.saturating_add(unused);
        } else {
            l.retry.refunds.push((grant.epoch, unused));
        }
    });
    vm.list(c, p);
}

/// The tick: hands deposits (once a bucket), refunds and a stock from a past bucket over to the
/// shared budget. Returns whether the next tick must visit the policy again.
pub fn sync(p: &Policy, host: &impl Host, now: u64) -> bool {
    let Some(b) = p.cfg.retry.as_ref().and_then(|r| r.budget.as_ref()) else { return false };
    let epoch = b.epoch(now);
    let pending = p.local(|l| {
        if !l.retry.has_news(epoch) {
            return None;
        }
        let mut pending = core::mem::take(&mut l.retry);
        l.retry.handed_epoch = epoch;
        // A stock of the current bucket stays with the worker.
        if pending.epoch == epoch {
            (l.retry.idle, l.retry.epoch, pending.idle) = (pending.idle, pending.epoch, 0);
        }
        Some(pending)
    });
    if let Some(pending) = pending {
        let result = store::apply(host, &p.budget_key, |s: &mut BudgetState| {
            hand_over(s, b, now, &pending);
            ((), true)
        });
        match result {
            Some(((), state)) => {
                metrics::set(host, p.metrics(host).retry.budget_remaining, u64::from(state.available(b, now)))
            }
            None => p.local(|l| {
                l.retry.deposits = l.retry.deposits.saturating_add(pending.deposits);
                l.retry.overdrawn = l.retry.overdrawn.saturating_add(pending.overdrawn);
                l.retry.refunds.extend(pending.refunds);
            }),
        }
    }
    // Visit again while anything is left to hand over (the current bucket's stock, deposits).
    p.local(|l| !l.retry.is_idle())
}

#[cfg(test)]
mod tests;
