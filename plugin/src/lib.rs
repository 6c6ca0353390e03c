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
use host::Host;
use metrics::PolicyMetrics;

/// A configuration ready for the request path: parsed, indexed, metrics defined, keys built.
#[derive(Debug)]
pub struct Compiled {
    pub config: Config,
    pub metrics: Vec<PolicyMetrics>,
    breaker_keys: Vec<String>,
}

impl Compiled {
    /// `namespace` keeps plugins apart in shared data: Istio sets no vm_id, so every plugin in a
    /// proxy shares one key space. The plugin's root id serves.
    pub fn new(config: Config, host: &impl Host, namespace: &str) -> Self {
        let metrics = config.policies.iter().map(|p| PolicyMetrics::define(host, &p.name)).collect();
        let breaker_keys =
            config.policies.iter().map(|p| format!("breakwater/v1/{namespace}/breaker/{}", p.name)).collect();
        Compiled { config, metrics, breaker_keys }
    }

    pub fn breaker_key(&self, policy: usize) -> &str {
        self.breaker_keys.get(policy).map_or("", String::as_str)
    }
}
