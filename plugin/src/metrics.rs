//! Envoy stats per policy, named for Prometheus.
//!
//! A stat is `breakwater_<metric>.policy.<P>[.<label>.<value>]`; Envoy prefixes custom Wasm
//! stats with `wasmcustom.`, and the `stats_config` tag extractors shipped in `envoy/` turn the
//! segments into labels, so `wasmcustom.breakwater_requests_total.policy.checkout.outcome.failure`
//! is `breakwater_requests_total{policy="checkout",outcome="failure"}` in `/stats/prometheus`
//! (Envoy 1.40 drops the `wasmcustom` prefix there). Counters end in `_total`; units are in
//! the names. A policy gets only the stats of the sections it has.
//!
//! Counters are counted on the worker ([`Counts`]) and added to Envoy's on the tick: one host
//! call per changed counter per sync interval instead of one per event.

use crate::config;
use crate::host::{Host, MetricKind};
use crate::outcome::Ignored;
use crate::reply::Refusal;
use alloc::format;

/// Circuit states, one gauge series each (1 for the current one, 0 for the others), so that
/// `max by (policy, state)` across pods reads right.
pub const STATES: [&str; 5] = ["closed", "open", "half_open", "forced_open", "forced_closed"];

/// Counts not yet added to Envoy's counters (and the gauges' changes not yet applied).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub success: u32,
    pub failure: u32,
    pub slow: u32,
    pub ignored: [u32; Ignored::ALL.len()],
    pub rejected: [u32; Refusal::ALL.len()],
    pub dry_run_rejected: [u32; Refusal::ALL.len()],
    pub admitted: u32,
    pub waited: u32,
    pub retries: u32,
    pub rescued: u32,
    pub denied: u32,
    pub dry_run_denied: u32,
    /// Fallbacks served and missed, by kind (see [`crate::fallback::KINDS`]): `2 * kind + missed`.
    pub fallback: [u32; 6],
}

impl Counts {
    pub fn is_empty(&self) -> bool {
        *self == Counts::default()
    }

    /// `n` more calls ignored for `why`.
    pub fn ignore(&mut self, why: Ignored, n: u32) {
        bump(self.ignored.get_mut(why.index()), n);
    }

    /// One more request refused for `why`.
    pub fn reject(&mut self, why: Refusal) {
        bump(self.rejected.get_mut(why.index()), 1);
    }

    /// One more request a dry run would have refused for `why`.
    pub fn dry_run_reject(&mut self, why: Refusal) {
        bump(self.dry_run_rejected.get_mut(why.index()), 1);
    }
}

fn bump(slot: Option<&mut u32>, n: u32) {
    if let Some(slot) = slot {
        *slot = slot.saturating_add(n);
    }
}

/// Metric ids of one policy; None where the policy has no such stat, or where the host
/// refused to define one (stats then go missing, requests do not).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyMetrics {
    pub success: Option<u32>,
    pub failure: Option<u32>,
    pub slow: Option<u32>,
    pub ignored: [Option<u32>; Ignored::ALL.len()],
    pub rejected: [Option<u32>; Refusal::ALL.len()],
    pub dry_run_rejected: [Option<u32>; Refusal::ALL.len()],
    pub transitions: [Option<u32>; 3],
    /// One gauge per entry of [`STATES`].
    pub circuit_state: [Option<u32>; STATES.len()],
    pub bulkhead: BulkheadMetrics,
    pub retry: RetryMetrics,
    /// `fallback_total{kind, result}`, as [`Counts::fallback`]; only the kinds configured.
    pub fallback: [Option<u32>; 6],
    /// Gauge: the adaptive timeout set on requests now, ms (0: none yet, the route's applies).
    pub timeout_ms: Option<u32>,
}

/// The bulkhead's stats; all None for a policy without a bulkhead.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BulkheadMetrics {
    /// Gauges: permits taken (in flight, or idle in a worker's lease) and requests waiting,
    /// all workers, set from the shared state by whichever worker changed it last.
    pub active: Option<u32>,
    pub queued: Option<u32>,
    /// Gauge: `max_concurrent`, or the adaptive limit now.
    pub limit: Option<u32>,
    /// Every admission, at once or after waiting.
    pub admitted: Option<u32>,
    /// Admissions that waited first.
    pub waited: Option<u32>,
    /// Histogram: milliseconds each waiting request spent queued, however its wait ended.
    pub queue_ms: Option<u32>,
}

/// The retry policy's stats; all None for a policy without one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RetryMetrics {
    /// Retries made (attempts beyond the first), as Envoy reports them.
    pub retries: Option<u32>,
    /// Requests that got a status below 500 after at least one retry.
    pub rescued: Option<u32>,
    /// Requests forwarded with no retry allowed, for want of budget.
    pub denied: Option<u32>,
    pub dry_run_denied: Option<u32>,
    /// Gauge: retries the shared budget allows, as of this worker's last look at it.
    pub budget_remaining: Option<u32>,
}

impl PolicyMetrics {
    pub fn define(host: &impl Host, p: &config::Policy) -> Self {
        let policy = p.name.as_str();
        let define = |kind, metric: &str, label: &str| {
            host.define_metric(kind, &format!("breakwater_{metric}.policy.{policy}{label}"))
        };
        let counter = |metric: &str| define(MetricKind::Counter, metric, "");
        let labelled =
            |metric: &str, label: &str, value: &str| define(MetricKind::Counter, metric, &format!(".{label}.{value}"));
        let mut m = PolicyMetrics::default();
        let breaker = p.breaker.as_ref();
        let bulkhead = p.bulkhead.as_ref();
        if let Some(b) = breaker {
            m.success = labelled("requests_total", "outcome", "success");
            m.failure = labelled("requests_total", "outcome", "failure");
            // The "ignored" outcome is the sum of the ignored stat's reasons.
            if b.slow_ns.is_some() {
                m.slow = counter("slow_calls_total");
            }
            for (id, reason) in m.ignored.iter_mut().zip(Ignored::ALL) {
                *id = labelled("ignored_total", "reason", reason.label());
            }
            for (id, to) in m.transitions.iter_mut().zip(["open", "half_open", "closed"]) {
                *id = labelled("transitions_total", "to_state", to);
            }
            for (id, state) in m.circuit_state.iter_mut().zip(STATES) {
                *id = define(MetricKind::Gauge, "circuit_state", &format!(".state.{state}"));
            }
        }
        for (i, reason) in Refusal::ALL.into_iter().enumerate() {
            let applies = match reason {
                Refusal::CircuitOpen => breaker.is_some(),
                Refusal::BulkheadFull => bulkhead.is_some(),
                Refusal::QueueTimeout => bulkhead.is_some_and(|b| b.machine.queue_max > 0),
                Refusal::Shed => bulkhead.is_some_and(|b| b.machine.classes.iter().any(|c| c.shed_at_milli.is_some())),
            };
            if !applies {
                continue;
            }
            let dry_run = p.mode == config::Mode::DryRun;
            let slot = if dry_run { m.dry_run_rejected.get_mut(i) } else { m.rejected.get_mut(i) };
            let metric = if dry_run { "dry_run_rejections_total" } else { "rejections_total" };
            if let Some(slot) = slot.filter(|_| !(dry_run && reason == Refusal::QueueTimeout)) {
                *slot = labelled(metric, "reason", reason.label());
            }
        }
        if bulkhead.is_some() {
            use MetricKind::{Counter, Gauge, Histogram};
            m.bulkhead = BulkheadMetrics {
                active: define(Gauge, "bulkhead_active", ""),
                queued: define(Gauge, "bulkhead_queued", ""),
                limit: define(Gauge, "bulkhead_limit", ""),
                admitted: define(Counter, "bulkhead_admitted_total", ""),
                waited: define(Counter, "bulkhead_waited_total", ""),
                queue_ms: define(Histogram, "bulkhead_queue_wait_milliseconds", ""),
            };
        }
        if p.timeout.is_some() {
            m.timeout_ms = define(MetricKind::Gauge, "timeout_milliseconds", "");
        }
        if let Some(r) = &p.retry {
            let budgeted = |id: Option<u32>| if r.budget.is_some() { id } else { None };
            let dry_run = p.mode == config::Mode::DryRun;
            m.retry = RetryMetrics {
                retries: counter("retries_total"),
                rescued: counter("retry_rescued_total"),
                denied: budgeted(if dry_run {
                    None
                } else {
                    labelled("retry_denied_total", "reason", "budget_exhausted")
                }),
                dry_run_denied: budgeted(if dry_run {
                    labelled("dry_run_retry_denied_total", "reason", "budget_exhausted")
                } else {
                    None
                }),
                budget_remaining: budgeted(define(MetricKind::Gauge, "retry_budget_remaining", "")),
            };
        }
        if let Some(f) = &p.fallback {
            let configured = [f.fixed.is_some(), f.fixed.is_some(), f.cache.is_some(), f.cache.is_some()];
            let configured = configured.into_iter().chain([f.cluster.is_some(); 2]);
            for ((id, labels), on) in m.fallback.iter_mut().zip(crate::fallback::LABELS).zip(configured) {
                if on {
                    *id = define(MetricKind::Counter, "fallback_total", labels);
                }
            }
        }
        m
    }

    /// Adds what the worker counted to Envoy's stats.
    pub fn flush(&self, host: &impl Host, c: &Counts) {
        add(host, self.success, c.success.into());
        add(host, self.failure, c.failure.into());
        add(host, self.slow, c.slow.into());
        for (id, n) in self.ignored.iter().zip(c.ignored) {
            add(host, *id, n.into());
        }
        for (id, n) in self.rejected.iter().zip(c.rejected) {
            add(host, *id, n.into());
        }
        for (id, n) in self.dry_run_rejected.iter().zip(c.dry_run_rejected) {
            add(host, *id, n.into());
        }
        add(host, self.bulkhead.admitted, c.admitted.into());
        add(host, self.bulkhead.waited, c.waited.into());
        add(host, self.retry.retries, c.retries.into());
        add(host, self.retry.rescued, c.rescued.into());
        add(host, self.retry.denied, c.denied.into());
        add(host, self.retry.dry_run_denied, c.dry_run_denied.into());
        for (id, n) in self.fallback.iter().zip(c.fallback) {
            add(host, *id, n.into());
        }
    }

    /// Sets the circuit-state gauges: 1 for `state` (an entry of [`STATES`]), 0 for the others.
    pub fn set_state(&self, host: &impl Host, state: &str) {
        for (id, s) in self.circuit_state.iter().zip(STATES) {
            set(host, *id, u64::from(s == state));
        }
    }
}

/// The entry of [`STATES`] a breaker state is in; `configured`: the configuration's `force`,
/// which wins over the shared state.
pub fn state_name(
    s: &breakwater_policies::BreakerState,
    configured: Option<breakwater_policies::Forced>,
) -> &'static str {
    use breakwater_policies::{Forced, Phase};
    match (configured.or(s.forced), s.phase) {
        (Some(Forced::Open), _) => "forced_open",
        (Some(Forced::Closed), _) => "forced_closed",
        (None, Phase::Closed) => "closed",
        (None, Phase::Open { .. }) => "open",
        (None, Phase::HalfOpen { .. }) => "half_open",
    }
}

pub fn add(host: &impl Host, id: Option<u32>, delta: i64) {
    if let (Some(id), true) = (id, delta != 0) {
        host.metric_add(id, delta);
    }
}

pub fn set(host: &impl Host, id: Option<u32>, value: u64) {
    if let Some(id) = id {
        host.metric_set(id, value);
    }
}
