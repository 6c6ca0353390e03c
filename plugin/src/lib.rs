//! Breakwater: per-route circuit breakers for Envoy, as a proxy-wasm HTTP filter.
//!
//! * [`config`] parses and validates the plugin configuration once, in `on_configure`.
//! * [`routes`] picks the policy for a request (first matching rule wins).
//! * [`filter`] is the request logic: admission on request headers, accounting in `on_log`.
//! * [`store`] keeps breaker state in proxy-wasm shared data with CAS retry loops.
//! * [`host`] is the seam to the proxy; [`wasm`] implements it over proxy-wasm, [`fake`] for tests.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing))]

extern crate alloc;

pub mod config;
#[cfg(test)]
pub mod fake;
pub mod filter;
pub mod host;
pub mod metrics;
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
use metrics::PolicyMetrics;

/// A configuration ready for the request path (parsed, indexed, metrics defined, keys built),
/// and what this worker has yet to hand over to the shared breakers.
#[derive(Debug)]
pub struct Compiled {
    pub config: Config,
    pub metrics: Vec<PolicyMetrics>,
    breaker_keys: Vec<String>,
    /// Per policy: successes this worker saw since it last wrote the shared breaker.
    pending: RefCell<Vec<Pending>>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pending {
    pub successes: u32,
    /// Of which slow.
    pub slow: u32,
}

impl Compiled {
    /// `namespace` keeps plugins apart in shared data: Istio sets no vm_id, so every plugin in a
    /// proxy shares one key space. The plugin's root id serves.
    pub fn new(config: Config, host: &impl Host, namespace: &str) -> Self {
        let metrics = config.policies.iter().map(|p| PolicyMetrics::define(host, &p.name)).collect();
        let breaker_keys =
            config.policies.iter().map(|p| format!("breakwater/v1/{namespace}/breaker/{}", p.name)).collect();
        let pending = RefCell::new(alloc::vec![Pending::default(); config.policies.len()]);
        Compiled { config, metrics, breaker_keys, pending }
    }

    pub fn breaker_key(&self, policy: usize) -> &str {
        self.breaker_keys.get(policy).map_or("", String::as_str)
    }

    /// Whether the policy counts any gRPC status as a failure (else grpc-status is never read).
    pub fn counts_grpc(&self, policy: usize) -> bool {
        self.config
            .policies
            .get(policy)
            .and_then(|p| p.breaker.as_ref())
            .is_some_and(|b| !b.failure_on.grpc_status.is_empty())
    }

    pub fn add_pending(&self, policy: usize, slow: bool) {
        if let Ok(mut all) = self.pending.try_borrow_mut() {
            if let Some(p) = all.get_mut(policy) {
                p.successes = p.successes.saturating_add(1);
                p.slow = p.slow.saturating_add(u32::from(slow));
            }
        }
    }

    pub fn take_pending(&self, policy: usize) -> Pending {
        self.pending
            .try_borrow_mut()
            .ok()
            .and_then(|mut all| all.get_mut(policy).map(core::mem::take))
            .unwrap_or_default()
    }
}
