//! Envoy stats per policy. Names carry the policy (and outcome, reason, state) as dot-separated
//! segments that the `stats_config` tag extractors in `envoy/` turn into Prometheus labels:
//! `wasmcustom.breakwater.requests.policy.checkout.outcome.failure` becomes
//! `breakwater_requests{policy="checkout",outcome="failure"}` in /stats/prometheus (Envoy 1.40 drops the
//! `wasmcustom` prefix there).

use crate::host::{Host, MetricKind};
use alloc::format;

/// Metric ids of one policy; None where the host refused to define one (stats then go missing,
/// requests do not).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyMetrics {
    pub success: Option<u32>,
    pub failure: Option<u32>,
    pub slow: Option<u32>,
    pub ignored: Option<u32>,
    pub rejected_circuit_open: Option<u32>,
    pub dry_run_rejected_circuit_open: Option<u32>,
    pub to_open: Option<u32>,
    pub to_half_open: Option<u32>,
    pub to_closed: Option<u32>,
    /// 0 closed, 1 open, 2 half-open, as last seen by a transition.
    pub circuit_state: Option<u32>,
    pub bulkhead: BulkheadMetrics,
    pub retry: RetryMetrics,
}

/// The retry policy's stats; all None for a policy without one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RetryMetrics {
    /// Retries made (attempts beyond the first), as Envoy reports them.
    pub retries: Option<u32>,
    /// Requests that succeeded after at least one retry.
    pub rescued: Option<u32>,
    /// Requests forwarded with no retry allowed, for want of budget.
    pub denied: Option<u32>,
    pub dry_run_denied: Option<u32>,
    /// Gauge: retries the shared budget allows, as of this worker's last look at it.
    pub budget_remaining: Option<u32>,
}

/// The bulkhead's stats; all None for a policy without a bulkhead.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BulkheadMetrics {
    /// Gauges, kept exact by adding the change each worker makes to the shared counts.
    pub active: Option<u32>,
    pub queued: Option<u32>,
    /// Every admission, at once or after waiting.
    pub admitted: Option<u32>,
    /// Admissions that waited first.
    pub waited: Option<u32>,
    pub rejected_full: Option<u32>,
    pub rejected_queue_timeout: Option<u32>,
    pub dry_run_rejected_full: Option<u32>,
    /// Histogram: milliseconds each waiting request spent queued, however its wait ended.
    pub queue_ms: Option<u32>,
}

impl PolicyMetrics {
    pub fn define(host: &impl Host, p: &crate::config::Policy) -> Self {
        let policy = p.name.as_str();
        let counter = |name: &str| host.define_metric(MetricKind::Counter, &format!("breakwater.{name}"));
        let requests = |outcome: &str| counter(&format!("requests.policy.{policy}.outcome.{outcome}"));
        PolicyMetrics {
            success: requests("success"),
            failure: requests("failure"),
            slow: requests("slow"),
            ignored: requests("ignored"),
            rejected_circuit_open: counter(&format!("rejections.policy.{policy}.reason.circuit_open")),
            dry_run_rejected_circuit_open: counter(&format!("dry_run_rejections.policy.{policy}.reason.circuit_open")),
            to_open: counter(&format!("transitions.policy.{policy}.to.open")),
            to_half_open: counter(&format!("transitions.policy.{policy}.to.half_open")),
            to_closed: counter(&format!("transitions.policy.{policy}.to.closed")),
            circuit_state: host.define_metric(MetricKind::Gauge, &format!("breakwater.circuit_state.policy.{policy}")),
            bulkhead: if p.bulkhead.is_some() {
                BulkheadMetrics::define(host, policy)
            } else {
                BulkheadMetrics::default()
            },
            retry: match &p.retry {
                Some(r) => RetryMetrics::define(host, policy, r.budget.is_some()),
                None => RetryMetrics::default(),
            },
        }
    }
}

impl BulkheadMetrics {
    fn define(host: &impl Host, policy: &str) -> Self {
        let metric = |kind, name: &str| host.define_metric(kind, &format!("breakwater.{name}"));
        use MetricKind::{Counter, Gauge, Histogram};
        BulkheadMetrics {
            active: metric(Gauge, &format!("bulkhead_active.policy.{policy}")),
            queued: metric(Gauge, &format!("bulkhead_queued.policy.{policy}")),
            admitted: metric(Counter, &format!("bulkhead_admitted.policy.{policy}")),
            waited: metric(Counter, &format!("bulkhead_waited.policy.{policy}")),
            rejected_full: metric(Counter, &format!("rejections.policy.{policy}.reason.bulkhead_full")),
            rejected_queue_timeout: metric(Counter, &format!("rejections.policy.{policy}.reason.queue_timeout")),
            dry_run_rejected_full: metric(Counter, &format!("dry_run_rejections.policy.{policy}.reason.bulkhead_full")),
            queue_ms: metric(Histogram, &format!("bulkhead_queue_ms.policy.{policy}")),
        }
    }
}

impl RetryMetrics {
    fn define(host: &impl Host, policy: &str, budget: bool) -> Self {
        // The budget's stats only exist for a policy that has a budget.
        let metric = |kind, name: &str| host.define_metric(kind, &format!("breakwater.{name}"));
        let budgeted = |kind, name: &str| if budget { metric(kind, name) } else { None };
        use MetricKind::{Counter, Gauge};
        RetryMetrics {
            retries: metric(Counter, &format!("retries.policy.{policy}")),
            rescued: metric(Counter, &format!("retry_rescued.policy.{policy}")),
            denied: budgeted(Counter, &format!("retry_denied.policy.{policy}.reason.budget_exhausted")),
            dry_run_denied: budgeted(Counter, &format!("dry_run_retry_denied.policy.{policy}.reason.budget_exhausted")),
            budget_remaining: budgeted(Gauge, &format!("retry_budget_remaining.policy.{policy}")),
        }
    }
}

pub fn add(host: &impl Host, id: Option<u32>, delta: i64) {
    if let (Some(id), true) = (id, delta != 0) {
        host.metric_add(id, delta);
    }
}

pub fn inc(host: &impl Host, id: Option<u32>) {
    if let Some(id) = id {
        host.metric_add(id, 1);
    }
}

pub fn set(host: &impl Host, id: Option<u32>, value: u64) {
    if let Some(id) = id {
        host.metric_set(id, value);
    }
}
