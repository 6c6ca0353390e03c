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
}

impl PolicyMetrics {
    pub fn define(host: &impl Host, policy: &str) -> Self {
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
        }
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
