//! Retries on the request path: each admitted request tells Envoy's router how to retry it
//! (`x-envoy-retry-on`, `x-envoy-max-retries`, …) and how many retries the budget allows it.
//!
//! The router makes the retries; Breakwater cannot see them one by one. So a request *reserves*
//! its retries from the shared budget before it is forwarded, `x-envoy-max-retries` caps the
//! router at what was reserved, and when the stream ends `upstream.request_attempt_count` says
//! how many were used: the rest is refunded. The budget can never be overdrawn, however many
//! requests fail at once.
//!
//! Reserving through shared data on every request would cost two round trips, so each worker
//! withdraws a small stock of retries at a time (only while the budget is far from empty) and
//! serves requests from it; unused stock goes back as soon as its time bucket has passed.
//! Deposits (one per request) and refunds are handed over at every sync.

use crate::config::Mode;
use crate::host::{property_u64, Host};
use crate::metrics::{self, RetryMetrics};
use crate::store;
use crate::Compiled;
use alloc::format;
use breakwater_policies::{BudgetConfig, BudgetState};

/// What one request was granted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Grant {
    /// The `x-envoy-max-retries` sent.
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

fn m(c: &Compiled, policy: usize) -> RetryMetrics {
    c.metrics.get(policy).map(|m| m.retry).unwrap_or_default()
}

/// Sets the router's retry headers on an admitted request and reserves its retries.
pub fn reserve(c: &Compiled, host: &impl Host, policy: usize, now: u64) -> Option<Grant> {
    let p = c.config.policies.get(policy)?;
    let r = p.retry.as_ref()?;
    if !r.on.is_empty() {
        host.set_request_header("x-envoy-retry-on", &r.on);
    }
    if !r.grpc_on.is_empty() {
        host.set_request_header("x-envoy-retry-grpc-on", &r.grpc_on);
    }
    if !r.status_codes.is_empty() {
        host.set_request_header("x-envoy-retriable-status-codes", &r.status_codes);
    }
    if let Some(ms) = r.per_try_timeout_ms {
        host.set_request_header("x-envoy-upstream-rq-per-try-timeout-ms", &format!("{ms}"));
    }
    let want = r.max_retries;
    let grant = match &r.budget {
        None => Grant { allowed: want, reserved: 0, epoch: 0 },
        Some(b) => {
            c.with_retry(policy, |l| l.deposits = l.deposits.saturating_add(1));
            let now = if now == 0 { host.now_ns() } else { now };
            let (reserved, epoch) = take(c, host, policy, b, want, now);
            if reserved == 0 && want > 0 {
                let mx = m(c, policy);
                metrics::inc(host, if p.mode == Mode::DryRun { mx.dry_run_denied } else { mx.denied });
            }
            // A dry run lets every retry through; the budget still records them (see `settle`).
            let allowed = if p.mode == Mode::DryRun { want } else { reserved };
            Grant { allowed, reserved, epoch }
        }
    };
    // Also caps a retry policy the Envoy route has of its own: budgeted too.
    host.set_request_header("x-envoy-max-retries", &format!("{}", grant.allowed));
    Some(grant)
}

/// Takes `want` retries from the worker's stock, or withdraws them from the shared budget.
fn take(c: &Compiled, host: &impl Host, policy: usize, b: &BudgetConfig, want: u32, now: u64) -> (u32, u64) {
    let epoch = b.epoch(now);
    let from_stock = c.with_retry(policy, |l| {
        let ok = l.epoch == epoch && l.idle >= want;
        if ok {
            l.idle -= want;
        }
        ok
    });
    if from_stock == Some(true) {
        return (want, epoch);
    }
    // Hand over what is pending with the withdrawal: one write for both.
    let Some(pending) = c.with_retry(policy, core::mem::take) else { return (want, 0) };
    let stock = want.saturating_mul(STOCK_REQUESTS);
    let result = store::apply(host, c.retry_key(policy), |s: &mut BudgetState| {
        hand_over(s, b, now, &pending);
        let ask = if s.available(b, now) >= STOCK_HEADROOM.saturating_mul(want + stock) { want + stock } else { want };
        let (got, epoch) = s.withdraw(b, now, ask);
        ((got, epoch), true)
    });
    match result {
        Some(((got, epoch), state)) => {
            metrics::set(host, m(c, policy).budget_remaining, u64::from(state.available(b, now)));
            let reserved = got.min(want);
            c.with_retry(policy, |l| {
                l.idle = got - reserved;
                l.epoch = epoch;
            });
            (reserved, epoch)
        }
        // Shared data failing entirely: put the pending counts back, and let the request retry
        // as Envoy would without Breakwater (the budget must not become the outage).
        None => {
            c.with_retry(policy, |l| *l = pending);
            (want, 0)
        }
    }
}

/// Applies a worker's pending deposits, refunds and dry-run overdraws, and returns its stock.
fn hand_over(s: &mut BudgetState, b: &BudgetConfig, now: u64, pending: &crate::local::RetryLocal) {
    s.refund(pending.epoch, pending.idle);
    for &(epoch, n) in &pending.refunds {
        s.refund(epoch, n);
    }
    s.deposit(b, now, pending.deposits);
    s.overdraw(b, now, pending.overdrawn);
}

/// When the stream is over: counts the retries Envoy made, and gives back the unused ones.
/// `forwarded`: the request reached the router (it was not refused or abandoned in a queue).
pub fn settle(c: &Compiled, host: &impl Host, policy: usize, grant: Grant, forwarded: bool, status: u16) {
    let retries = if forwarded && grant.allowed > 0 {
        // 0 attempts: the router never sent it; 1: no retry.
        let attempts = property_u64(host, &["upstream", "request_attempt_count"]).unwrap_or(1);
        u32::try_from(attempts.saturating_sub(1)).unwrap_or(u32::MAX)
    } else {
        0
    };
    let mx = m(c, policy);
    if retries > 0 {
        metrics::add(host, mx.retries, i64::from(retries));
        // Without a breaker the response headers were not read: ask now, for this rare case.
        let status = match status {
            0 => property_u64(host, &["response", "code"]).unwrap_or(0),
            s => u64::from(s),
        };
        if (1..500).contains(&status) {
            metrics::inc(host, mx.rescued);
        }
    }
    if c.retry(policy).and_then(|r| r.budget.as_ref()).is_none() {
        return;
    }
    let used = retries.min(grant.reserved);
    let unused = grant.reserved - used;
    c.with_retry(policy, |l| {
        l.overdrawn = l.overdrawn.saturating_add(retries - used);
        if unused == 0 {
            // nothing to give back
        } else if l.epoch == grant.epoch {
            l.idle = l.idle.saturating_add(unused);
        } else if let Some(r) = l.refunds.iter_mut().find(|(e, _)| *e == grant.epoch) {
            r.1 = r.1.saturating_add(unused);
        } else {
            l.refunds.push((grant.epoch, unused));
        }
    });
}

/// The worker's tick: hands deposits, refunds and a stock from a past bucket over to the shared
/// budget (nothing to do, no host call).
pub fn sync(c: &Compiled, host: &impl Host, policy: usize) {
    let Some(b) = c.retry(policy).and_then(|r| r.budget.as_ref()) else { return };
    let now = host.now_ns();
    let epoch = b.epoch(now);
    let Some(pending) = c
        .with_retry(policy, |l| {
            let stale_stock = l.epoch != epoch && l.idle > 0;
            if l.deposits == 0 && l.refunds.is_empty() && l.overdrawn == 0 && !stale_stock {
                return None;
            }
            let mut pending = core::mem::take(l);
            // A stock of the current bucket stays with the worker.
            if !stale_stock {
                (l.idle, l.epoch, pending.idle) = (pending.idle, pending.epoch, 0);
            }
            Some(pending)
        })
        .flatten()
    else {
        return;
    };
    let result = store::apply(host, c.retry_key(policy), |s: &mut BudgetState| {
        hand_over(s, b, now, &pending);
        ((), true)
    });
    match result {
        Some(((), state)) => metrics::set(host, m(c, policy).budget_remaining, u64::from(state.available(b, now))),
        None => {
            c.with_retry(policy, |l| {
                l.deposits = l.deposits.saturating_add(pending.deposits);
                l.overdrawn = l.overdrawn.saturating_add(pending.overdrawn);
                l.refunds.extend(pending.refunds);
            });
        }
    }
}

#[cfg(test)]
mod tests;
