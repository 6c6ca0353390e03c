//! Breakwater: per-route circuit breakers, bulkheads and retry budgets for Envoy, as a proxy-wasm HTTP filter.
//!
//! * [`config`] parses and validates the plugin configuration once, in `on_configure`.
//! * [`routes`] picks the policy for a request (first matching rule wins).
//! * [`filter`] is the request logic: admission on request headers, accounting in `on_log`.
//! * [`bulkhead`] takes and returns permits; [`parking`] holds this worker's queued requests.
//! * [`retry`] tells Envoy's router how to retry each request, within the retry budget.
//! * [`store`] keeps breaker state in proxy-wasm shared data with CAS retry loops.
//! * [`host`] is the seam to the proxy; [`wasm`] implements it over proxy-wasm, [`fake`] for tests.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing))]

extern crate alloc;

pub mod bulkhead;
pub mod config;
#[cfg(test)]
pub mod fake;
pub mod filter;
pub mod host;
pub mod local;
pub mod metrics;
pub mod parking;
pub mod retry;
pub mod routes;
pub mod store;
#[cfg(target_arch = "wasm32")]
mod wasm;

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use config::Config;
use core::cell::RefCell;
use host::Host;
use local::{Local, Pending, View};
use metrics::PolicyMetrics;

/// A configuration ready for the request path (parsed, indexed, metrics defined, keys built),
/// and this worker's [`Local`] picture of each policy's breaker.
#[derive(Debug)]
pub struct Compiled {
    pub config: Config,
    pub metrics: Vec<PolicyMetrics>,
    breaker_keys: Vec<String>,
    bulkhead_keys: Vec<String>,
    retry_keys: Vec<String>,
    local: RefCell<Vec<Local>>,
}

impl Compiled {
    /// `namespace` keeps plugins apart in shared data: Istio sets no vm_id, so every plugin in a
    /// proxy shares one key space. The plugin's root id serves.
    pub fn new(config: Config, host: &impl Host, namespace: &str) -> Self {
        let metrics = config.policies.iter().map(|p| PolicyMetrics::define(host, p)).collect();
        let key = |kind: &str| -> Vec<String> {
            config.policies.iter().map(|p| format!("breakwater/v1/{namespace}/{kind}/{}", p.name)).collect()
        };
        let (breaker_keys, bulkhead_keys, retry_keys) = (key("breaker"), key("bulkhead"), key("retry_budget"));
        let local = RefCell::new(alloc::vec![Local::default(); config.policies.len()]);
        Compiled { config, metrics, breaker_keys, bulkhead_keys, retry_keys, local }
    }

    /// Creates the shared-data keys of every policy that does not have them yet (see
    /// [`store::ensure`]). Envoy runs `on_configure` in a canary VM before the workers start, so
    /// the keys exist before the first request.
    pub fn create_shared_state(&self, host: &impl Host) {
        use breakwater_policies::{BreakerState, BudgetState, BulkheadState};
        for (i, p) in self.config.policies.iter().enumerate() {
            if p.breaker.is_some() {
                store::ensure::<BreakerState>(host, self.breaker_key(i));
            }
            if p.bulkhead.is_some() {
                store::ensure::<BulkheadState>(host, self.bulkhead_key(i));
            }
            if p.retry.as_ref().is_some_and(|r| r.budget.is_some()) {
                store::ensure::<BudgetState>(host, self.retry_key(i));
            }
        }
    }

    pub fn breaker_key(&self, policy: usize) -> &str {
        self.breaker_keys.get(policy).map_or("", String::as_str)
    }

    pub fn bulkhead_key(&self, policy: usize) -> &str {
        self.bulkhead_keys.get(policy).map_or("", String::as_str)
    }

    pub fn retry_key(&self, policy: usize) -> &str {
        self.retry_keys.get(policy).map_or("", String::as_str)
    }

    pub fn retry(&self, policy: usize) -> Option<&config::Retry> {
        self.config.policies.get(policy).and_then(|p| p.retry.as_ref())
    }

    /// This worker's share of the policy's retry budget.
    pub fn with_retry<T>(&self, policy: usize, f: impl FnOnce(&mut local::RetryLocal) -> T) -> Option<T> {
        self.with_local(policy, |l| f(&mut l.retry))
    }

    pub fn bulkhead(&self, policy: usize) -> Option<&config::Bulkhead> {
        self.config.policies.get(policy).and_then(|p| p.bulkhead.as_ref())
    }

    /// Whether the policy counts any gRPC status as a failure (else grpc-status is never read).
    pub fn counts_grpc(&self, policy: usize) -> bool {
        self.config
            .policies
            .get(policy)
            .and_then(|p| p.breaker.as_ref())
            .is_some_and(|b| !b.failure_on.grpc_status.is_empty())
    }

    /// This worker's picture of the policy's breaker; marks the policy active.
    pub fn view(&self, policy: usize) -> View {
        self.with_local(policy, |l| {
            l.active = true;
            l.view
        })
        .unwrap_or_default()
    }

    pub fn set_view(&self, policy: usize, view: View) {
        self.with_local(policy, |l| l.view = view);
    }

    pub fn add_pending(&self, policy: usize, slow: bool, at: u64) {
        self.with_local(policy, |l| {
            l.pending.successes = l.pending.successes.saturating_add(1);
            l.pending.slow = l.pending.slow.saturating_add(u32::from(slow));
            l.pending.last_at = l.pending.last_at.max(at);
        });
    }

    pub fn take_pending(&self, policy: usize) -> Pending {
        self.with_local(policy, |l| core::mem::take(&mut l.pending)).unwrap_or_default()
    }

    /// Starts a sync round for the policy: whether to sync it (it was active since the last
    /// round, or is suspect). An idle policy's view is dropped rather than refreshed, so no view
    /// outlives a sync interval.
    pub fn begin_sync(&self, policy: usize) -> bool {
        self.with_local(policy, |l| {
            let sync = core::mem::take(&mut l.active) || l.view == View::Suspect;
            if !sync {
                l.view = View::Unknown;
            }
            sync
        })
        .unwrap_or(false)
    }

    // Single-threaded, and never re-entered (host calls do not call back into this state):
    // try_borrow_mut cannot fail in practice, and a failure only skips the update.
    fn with_local<T>(&self, policy: usize, f: impl FnOnce(&mut Local) -> T) -> Option<T> {
        self.local.try_borrow_mut().ok().and_then(|mut all| all.get_mut(policy).map(f))
    }
}
