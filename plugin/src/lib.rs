//! Breakwater: per-route circuit breakers, bulkheads and retry budgets for Envoy, as a
//! proxy-wasm HTTP filter.
//!
//! Data flows one way on every request: **host → outcome → policy state → reply**.
//!
//! * [`config`] parses and validates the plugin configuration once, in `on_configure`; a
//!   [`Compiled`] configuration resolves everything the request path needs per policy.
//! * [`filter`] is the request path: which policy ([`routes`], or the filter instance's own
//!   `policy`), admission on the request headers ([`breaker`], then [`bulkhead`], then
//!   [`retry`]), what the response said ([`outcome`]), and the accounting when the stream ends.
//! * [`control`] is the status and control endpoint: a filter instance of its own, on an
//!   operator-only listener, that reads and steers the policies of every other instance in
//!   the VM.
//! * [`timeout`] sets each request's adaptive timeout and batches the latency samples of
//!   adaptive timeouts and adaptive concurrency limits.
//! * [`reply`] answers refused requests; [`metrics`] counts on the worker and flushes on the tick.
//! * [`tick`] is each worker's periodic sync: batched successes, views of the breakers, retry
//!   budget hand-overs, bulkhead leases and queue timeouts, in proportion to what changed.
//! * [`vm`] is one worker's state shared by all its root contexts: its [`waiters`] (requests
//!   paused in a bulkhead queue), its [`holdings`] (bulkhead permits and leases), its
//!   [`watch`]es (its picture of each breaker), the policies its tick must visit.
//! * [`store`] keeps policy state in proxy-wasm shared data with CAS retry loops.
//! * `per_route` (native only) turns a route-rule configuration into per-route filter instances.
//! * [`host`] is the seam to the proxy; `wasm` implements it over the proxy-wasm ABI (calling
//!   the imports directly: the SDK's wrappers panic on host data), `fake` for unit tests.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing))]

extern crate alloc;

pub mod breaker;
pub mod bulkhead;
pub mod config;
pub mod control;
#[cfg(test)]
pub mod fake;
pub mod fallback;
pub mod filter;
pub mod headers;
pub mod holdings;
pub mod host;
pub mod local;
pub mod metrics;
pub mod outcome;
#[cfg(not(target_arch = "wasm32"))]
pub mod per_route;
pub mod registry;
pub mod reply;
pub mod retry;
pub mod routes;
pub mod store;
pub mod tick;
pub mod timeout;
pub mod vm;
pub mod waiters;
#[cfg(target_arch = "wasm32")]
mod wasm;
pub mod watch;

use alloc::format;
use alloc::rc::Rc;
use alloc::string::String;
use alloc::vec::Vec;
use config::Config;
use core::cell::{OnceCell, RefCell};
use host::Host;
use local::Local;
use metrics::PolicyMetrics;

/// Which policy governs a request seen by this filter instance.
#[derive(Debug)]
pub enum Select {
    /// One filter for many routes (Istio's `WasmPlugin`): the first matching rule wins.
    Rules(routes::RouteTable),
    /// A filter instance enabled per route (`policy` in its configuration): every request it
    /// sees falls under this policy, with no route lookup at all.
    Only(usize),
}

/// A configuration ready for the request path: one [`Policy`] per configured policy, with its
/// shared-data keys, metric ids and this worker's [`Local`] state resolved once.
#[derive(Debug)]
pub struct Compiled {
    pub policies: Vec<Policy>,
    pub select: Select,
    pub sync_interval_ns: u64,
    /// The shared-data namespace of its keys (the plugin's root id).
    pub namespace: String,
    /// This instance is the status and control endpoint ([`control`]), with no policies.
    pub control: Option<config::Control>,
    /// Some policy has a `fallback`: only then does a stream of this configuration go through
    /// the fallback's bookkeeping (a few hundred instructions a stream otherwise saved).
    pub fallbacks: bool,
}

/// One policy as the request path uses it.
#[derive(Debug)]
pub struct Policy {
    pub index: usize,
    pub cfg: config::Policy,
    pub breaker_key: String,
    pub bulkhead_key: String,
    pub budget_key: String,
    /// The prefix of its fallback cache's slot keys (the slot number follows).
    pub cache_key: String,
    /// Its stats, defined at configure time or on first use (see [`EAGER_METRICS`]).
    metrics: OnceCell<PolicyMetrics>,
    /// This worker's state for the policy under this configuration. Single-threaded and never
    /// re-entered (host calls do not call back into it): `borrow_mut` cannot fail in practice,
    /// and [`Policy::local`] skips the update if it ever did.
    local: RefCell<Local>,
    /// This worker's holding of the policy's bulkhead, looked up on first use.
    holding: OnceCell<Rc<holdings::Holding>>,
    /// This worker's watch of the policy's breaker, looked up on first use.
    watch: OnceCell<Rc<watch::Watch>>,
    /// This worker warned that a request its fallback sent on was answered by another cluster.
    pub fallback_warned: core::cell::Cell<bool>,
    /// The reject reply's body when the configuration sets none, by [`reply::Refusal::index`]:
    /// written on the first refusal, not on each (formatting is a good part of a fast-fail's
    /// own work).
    default_bodies: OnceCell<[String; 4]>,
}

/// A configuration with at most this many policies defines their stats when it is configured,
/// so every series exists (at 0) before the first event, as Prometheus users expect. A larger
/// one defines a policy's stats when it first needs them: Envoy took 13 s of its main thread to
/// define the 19 stats of each of 20 000 policies (tag extraction with the shipped
/// `stats_config`; `integration/tests/config_size.rs`).
pub const EAGER_METRICS: usize = 1000;

impl Policy {
    /// The policy's stats, defined (with the gauges that describe its configuration and state)
    /// on first use.
    pub fn metrics(&self, host: &impl Host) -> &PolicyMetrics {
        self.metrics.get_or_init(|| {
            use breakwater_policies::BreakerState;
            let m = PolicyMetrics::define(host, &self.cfg);
            if let Some(b) = &self.cfg.breaker {
                // The state gauges start from the shared state (a breaker may be open already),
                // unless this configuration forces the breaker.
                let (state, _) = store::load::<BreakerState>(host, &self.breaker_key);
                m.set_state(host, metrics::state_name(&state, b.force));
            }
            // An adaptive limit is set by the worker that judges it (the gauge keeps its value
            // across a configuration change).
            if let Some(b) = self.cfg.bulkhead.as_ref().filter(|b| b.machine.adaptive.is_none()) {
                metrics::set(host, m.bulkhead.limit, u64::from(b.machine.max_concurrent));
            }
            m
        })
    }

    /// Runs `f` on this worker's state of the policy.
    pub fn local<T: Default>(&self, f: impl FnOnce(&mut Local) -> T) -> T {
        self.local.try_borrow_mut().map(|mut l| f(&mut l)).unwrap_or_default()
    }

    pub fn name(&self) -> &str {
        &self.cfg.name
    }

    /// The reject reply's default body for `why`: `breakwater: <x-breakwater value> (policy <name>)`.
    pub fn default_body(&self, why: reply::Refusal) -> &str {
        let bodies = self.default_bodies.get_or_init(|| {
            reply::Refusal::ALL.map(|r| format!("breakwater: {} (policy {})\n", r.header(), self.name()))
        });
        bodies.get(why.index()).map_or("", String::as_str)
    }

    /// The worker's watch of this policy's breaker: `make` finds it the first time.
    pub fn watch(&self, make: impl FnOnce() -> Option<Rc<watch::Watch>>) -> Option<Rc<watch::Watch>> {
        if let Some(w) = self.watch.get() {
            return Some(w.clone());
        }
        let w = make()?;
        let _ = self.watch.set(w.clone());
        Some(w)
    }

    /// The worker's holding of this policy's bulkhead: `make` finds it the first time.
    pub fn holding(&self, make: impl FnOnce() -> Option<Rc<holdings::Holding>>) -> Option<Rc<holdings::Holding>> {
        if let Some(h) = self.holding.get() {
            return Some(h.clone());
        }
        let h = make()?;
        let _ = self.holding.set(h.clone());
        Some(h)
    }
}

impl Compiled {
    /// `namespace` keeps plugins apart in shared data: Istio sets no vm_id, so every plugin in a
    /// proxy shares one key space. The plugin's root id serves.
    pub fn new(config: Config, namespace: &str) -> Self {
        let Config { policies, routes, sync_interval_ns, only, control } = config;
        let key = |kind: &str, name: &str| format!("breakwater/v1/{namespace}/{kind}/{name}");
        let policies: Vec<Policy> = policies
            .into_iter()
            .enumerate()
            .map(|(index, cfg)| Policy {
                index,
                breaker_key: key("breaker", &cfg.name),
                bulkhead_key: key("bulkhead", &cfg.name),
                budget_key: key("retry_budget", &cfg.name),
                cache_key: key("cache", &cfg.name) + "/",
                metrics: OnceCell::new(),
                cfg,
                local: RefCell::new(Local::default()),
                holding: OnceCell::new(),
                watch: OnceCell::new(),
                fallback_warned: core::cell::Cell::new(false),
                default_bodies: OnceCell::new(),
            })
            .collect();
        let select = match only {
            Some(i) => Select::Only(i),
            None => Select::Rules(routes),
        };
        let fallbacks = policies.iter().any(|p: &Policy| p.cfg.fallback.is_some());
        Compiled { policies, select, sync_interval_ns, namespace: namespace.into(), control, fallbacks }
    }

    pub fn policy(&self, index: usize) -> Option<&Policy> {
        self.policies.get(index)
    }

    /// Whether any request can fall under a policy (else the filter passes everything at once).
    pub fn is_idle(&self) -> bool {
        match &self.select {
            Select::Rules(r) => r.is_empty(),
            Select::Only(_) => false,
        }
    }

    /// Creates the shared-data keys of every policy that does not have them yet (see
    /// [`store::ensure`]), and defines the policies' stats unless there are more than
    /// [`EAGER_METRICS`]. Envoy runs `on_configure` in a canary VM before the workers start, so
    /// the keys exist before the first request.
    pub fn create_shared_state(&self, host: &impl Host) {
        use breakwater_policies::{BreakerState, BudgetState, BulkheadState};
        let eager = self.policies.len() <= EAGER_METRICS;
        for p in &self.policies {
            if p.cfg.breaker.is_some() {
                store::ensure::<BreakerState>(host, &p.breaker_key);
            }
            if p.cfg.bulkhead.is_some() {
                store::ensure::<BulkheadState>(host, &p.bulkhead_key);
            }
            if p.cfg.retry.as_ref().is_some_and(|r| r.budget.is_some()) {
                store::ensure::<BudgetState>(host, &p.budget_key);
            }
            if eager {
                p.metrics(host);
            }
        }
    }
}
