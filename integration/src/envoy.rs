//! Real-Envoy harness for the integration tests: writes a bootstrap, runs `$ENVOY_BIN` with the
//! Breakwater Wasm filter, learns its ports from the admin interface, reads stats and logs, and
//! kills the process on drop.
//!
//! * [`Spec`] builds a bootstrap: the plugin configuration (JSON), Envoy routes, and the clusters
//!   `backend` (HTTP/1.1 to the test upstream), `backend_h2` (h2c to the same upstream) and `dead`
//!   (a loopback port nobody listens on), and an access log if asked. The `stats_config` block
//!   is copied verbatim from the shipped `envoy/envoy.yaml`, so tests see the shipped tag
//!   extractors. Envoy runs with `TZ=UTC`: its log lines' times compare with epoch times.
//! * [`Envoy::demo_yaml`] is the shipped demo configuration with only ports and the Wasm path swapped.
//! * [`Envoy::validate`] runs `--mode validate`.
//! * The client helpers open a **new TCP connection per request** ([`Envoy::get`]): Envoy balances
//!   connections, not requests, over its workers, so only fresh connections spread load over them.
//!   [`Envoy::conn_per_worker`] gives one kept-alive connection pinned to each worker instead,
//!   [`Envoy::conns_per_worker`] several.
//! * [`Envoy::send_all`] drives many concurrent clients through a list of [`Call`]s; a call may
//!   give up early (a client abort: its connection is closed without waiting for the answer).
//!
//! Environment: `ENVOY_BIN` (default `envoy` on PATH), `BREAKWATER_WASM` (default
//! `<repo>/target/wasm32-wasip1/release/breakwater.wasm`).

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{HeaderMap, HeaderValue};
use hyper::{Method, Request};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use tokio::net::TcpStream;

/// How long a single client request may take before the harness gives up on it.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// How long Envoy may take to come up.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Repository root (the workspace), from this crate's manifest dir.
/// The plugin's default `sync_interval`: how often each worker ticks.
pub const SYNC_INTERVAL: Duration = Duration::from_millis(50);
/// Long enough for every count a worker holds to reach Envoy (its flush every 250ms, a tick).
pub const SETTLE: Duration = Duration::from_millis(400);

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("integration/ has a parent").to_path_buf()
}

/// The Envoy binary: `$ENVOY_BIN`, else `envoy` on PATH.
pub fn envoy_bin() -> String {
    std::env::var("ENVOY_BIN").unwrap_or_else(|_| "envoy".to_owned())
}

/// The plugin: `$BREAKWATER_WASM`, else the release build in the workspace target dir.
pub fn wasm_path() -> PathBuf {
    let p = match std::env::var_os("BREAKWATER_WASM") {
        Some(p) => PathBuf::from(p),
        None => repo_root().join("target/wasm32-wasip1/release/breakwater.wasm"),
    };
    assert!(
        p.is_file(),
        "Breakwater Wasm not found at {}: run `cargo build -p breakwater --release --target wasm32-wasip1` or set BREAKWATER_WASM",
        p.display()
    );
    std::fs::canonicalize(&p).unwrap_or(p)
}

/// The shipped demo configuration, unchanged.
pub fn demo_yaml_text() -> String {
    let path = repo_root().join("envoy/envoy.yaml");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// The `stats_config:` block of the shipped demo configuration, verbatim: from the line starting
/// with `stats_config:` up to (not including) the next top-level key.
pub fn shipped_stats_config() -> String {
    let text = demo_yaml_text();
    let mut out = String::new();
    let mut inside = false;
    for line in text.lines() {
        if line.starts_with("stats_config:") {
            inside = true;
        } else if inside {
            let top_level_key = !line.is_empty() && !line.starts_with([' ', '\t', '#', '-']);
            if top_level_key {
                break;
            }
        }
        if inside {
            out.push_str(line);
            out.push('\n');
        }
    }
    assert!(!out.is_empty(), "envoy/envoy.yaml has no stats_config block");
    out
}

/// A loopback port where nothing listens (bound, then released).
pub fn dead_port() -> u16 {
    let l = StdTcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local_addr").port()
}

pub(crate) fn unique_dir(tag: &str) -> PathBuf {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    let dir = std::env::temp_dir().join(format!(
        "breakwater-it-{tag}-{}-{}-{nanos}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
    dir
}

pub(crate) fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The log lines worth showing when a test fails: the plugin's, warnings and errors.
fn notable(text: &str, lines: usize) -> String {
    let keep = ["][wasm]", "][warning]", "][error]", "][critical]", "rror"];
    let picked: Vec<&str> = text.lines().filter(|l| keep.iter().any(|k| l.contains(k))).collect();
    picked[picked.len().saturating_sub(lines)..].join("\n")
}

// ---------------------------------------------------------------------------------------------
// Spec: a generated bootstrap
// ---------------------------------------------------------------------------------------------

/// One Envoy route in the generated bootstrap.
#[derive(Clone, Debug)]
pub struct RouteSpec {
    /// Envoy's route name (what the plugin sees as `xds.route_name`); None: unnamed.
    pub name: Option<String>,
    pub prefix: String,
    pub cluster: String,
    pub timeout: Duration,
    /// Switch the Breakwater filter off on this route (per-route `FilterConfig.disabled`).
    pub filter_disabled: bool,
    /// The route's own `retry_policy` (Envoy's), if any.
    pub retry_policy: Option<Value>,
    /// The route's `idle_timeout` (Envoy's stream idle timeout for the route), if any.
    pub idle_timeout: Option<Duration>,
}

#[derive(Clone, Debug)]
enum PluginConfig {
    Json(Value),
    Raw(String),
}

/// How the plugin is attached to the routes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attach {
    /// One Breakwater filter for all routes; its route rules pick the policy (Istio's way).
    Rules,
    /// One disabled filter instance per policy, enabled on the routes its rules name (see
    /// `breakwater::per_route`).
    PerRoute,
}

/// A generated Envoy bootstrap with the Breakwater filter in front of the router.
#[derive(Clone, Debug)]
pub struct Spec {
    backend: SocketAddr,
    plugin: PluginConfig,
    routes: Vec<RouteSpec>,
    concurrency: u32,
    /// Serve the listener from this LDS file instead of the bootstrap (see [`Spec::reloadable`]).
    lds: Option<(PathBuf, u16)>,
    attach: Attach,
    /// The virtual host's `include_attempt_count_in_response`.
    attempt_count: bool,
    failure_policy: &'static str,
    /// Another build of the plugin (the test-trap build), instead of [`wasm_path`].
    wasm: Option<PathBuf>,
    /// The control endpoint's configuration (`{"control": …}`), on a listener of its own named
    /// `control` (see [`Spec::control`]).
    control: Option<Value>,
    /// An entry of the connection manager's `access_log` list (see [`Spec::access_log`]).
    access_log: Option<Value>,
    /// More clusters, by name, each to one loopback address (see [`Spec::cluster`]).
    clusters: Vec<(String, SocketAddr)>,
    /// Routes matched before the named ones (see [`Spec::fallback_route`]).
    front_routes: Vec<Value>,
    /// The route configuration's `validate_clusters` (see [`Spec::unknown_clusters`]).
    validate_clusters: bool,
}

impl Spec {
    /// `backend` is where the `backend` and `backend_h2` clusters point (the test upstream).
    pub fn new(backend: SocketAddr) -> Spec {
        Spec {
            backend,
            plugin: PluginConfig::Json(json!({})),
            routes: Vec::new(),
            concurrency: 2,
            lds: None,
            attach: Attach::Rules,
            attempt_count: false,
            failure_policy: "FAIL_RELOAD",
            wasm: None,
            control: None,
            access_log: None,
            clusters: Vec::new(),
            front_routes: Vec::new(),
            validate_clusters: true,
        }
    }

    /// One more cluster, `name`, of HTTP/1.1 to `addr` (another upstream).
    pub fn cluster(mut self, name: &str, addr: SocketAddr) -> Spec {
        self.clusters.push((name.to_owned(), addr));
        self
    }

    /// The route a fallback cluster needs, ahead of all others: a request whose filter state
    /// `wasm.breakwater_fallback` Breakwater set to `cluster` goes to `cluster`.
    pub fn fallback_route(mut self, cluster: &str) -> Spec {
        self.front_routes.push(json!({
            "name": format!("fallback-{cluster}"),
            "match": { "prefix": "/", "filter_state": [{
                "key": "wasm.breakwater_fallback", "string_match": { "exact": cluster }
            }]},
            "route": { "cluster": cluster, "timeout": "5s" }
        }));
        self
    }

    /// The ingress route configuration may name clusters Envoy does not have
    /// (`validate_clusters: false`): a request routed to one gets Envoy's 503 (response flag NC).
    pub fn unknown_clusters(mut self) -> Spec {
        self.validate_clusters = false;
        self
    }

    /// Adds Breakwater's status and control endpoint: a Breakwater filter instance configured
    /// with `control` (e.g. `{"control": {"writes": true}}`), sharing the data plane's VM, on a
    /// loopback listener of its own named `control` whose routes answer 404 to anything else.
    /// [`Envoy::control`] sends requests to it.
    pub fn control(mut self, admin: Value) -> Spec {
        self.control = Some(admin);
        self
    }

    /// Envoy writes an access log: `entry` is one entry of the HTTP connection manager's
    /// `access_log` list (`breakwater access-log-format --output json` prints the one
    /// `breakwater simulate` reads).
    pub fn access_log(mut self, entry: Value) -> Spec {
        self.access_log = Some(entry);
        self
    }

    /// Attach the plugin as per-route filter instances instead of one filter with rules.
    pub fn attach(mut self, attach: Attach) -> Spec {
        self.attach = attach;
        self
    }

    /// Envoy reports each response's attempts in `x-envoy-attempt-count` (the virtual host's
    /// `include_attempt_count_in_response`), which Breakwater reads for its retry budget.
    pub fn attempt_count_in_response(mut self) -> Spec {
        self.attempt_count = true;
        self
    }

    /// The Wasm filter's `failure_policy` (default `FAIL_RELOAD`, the shipped default).
    pub fn failure_policy(mut self, policy: &'static str) -> Spec {
        self.failure_policy = policy;
        self
    }

    /// Loads another build of the plugin.
    pub fn wasm(mut self, path: PathBuf) -> Spec {
        self.wasm = Some(path);
        self
    }

    /// The plugin configuration, as JSON.
    pub fn plugin(mut self, config: Value) -> Spec {
        self.plugin = PluginConfig::Json(config);
        self
    }

    /// The plugin configuration as raw text (for configurations that are not JSON at all).
    pub fn plugin_raw(mut self, text: &str) -> Spec {
        self.plugin = PluginConfig::Raw(text.to_owned());
        self
    }

    /// A named route `prefix` → `cluster` with a 5s timeout.
    pub fn route(self, name: &str, prefix: &str, cluster: &str) -> Spec {
        self.route_with_timeout(name, prefix, cluster, Duration::from_secs(5))
    }

    pub fn route_with_timeout(mut self, name: &str, prefix: &str, cluster: &str, timeout: Duration) -> Spec {
        self.routes.push(RouteSpec {
            name: Some(name.to_owned()),
            prefix: prefix.to_owned(),
            cluster: cluster.to_owned(),
            timeout,
            filter_disabled: false,
            retry_policy: None,
            idle_timeout: None,
        });
        self
    }

    /// A named route with Envoy's own `retry_policy` on it (`retry_on`, `num_retries`).
    pub fn route_with_retry_policy(mut self, name: &str, prefix: &str, retry_on: &str, num_retries: u32) -> Spec {
        self = self.route(name, prefix, "backend");
        if let Some(r) = self.routes.last_mut() {
            r.retry_policy = Some(json!({ "retry_on": retry_on, "num_retries": num_retries }));
        }
        self
    }

    /// Sets the last route's `idle_timeout`: Envoy answers a stream idle that long (408 before
    /// any response), whatever the filters do.
    pub fn idle_timeout(mut self, idle: Duration) -> Spec {
        if let Some(r) = self.routes.last_mut() {
            r.idle_timeout = Some(idle);
        }
        self
    }

    /// A named route on which the Breakwater filter is switched off by Envoy's per-route config.
    pub fn route_without_breakwater(mut self, name: &str, prefix: &str, cluster: &str) -> Spec {
        self = self.route(name, prefix, cluster);
        if let Some(r) = self.routes.last_mut() {
            r.filter_disabled = true;
        }
        self
    }

    /// A route without a name (no `xds.route_name`).
    pub fn unnamed_route(mut self, prefix: &str, cluster: &str) -> Spec {
        self.routes.push(RouteSpec {
            name: None,
            prefix: prefix.to_owned(),
            cluster: cluster.to_owned(),
            timeout: Duration::from_secs(5),
            filter_disabled: false,
            retry_policy: None,
            idle_timeout: None,
        });
        self
    }

    /// For each policy in `policies` (a JSON object of policy bodies by name): an Envoy route
    /// named after it with prefix `/<name>` to `backend`, and a plugin rule mapping that route
    /// name to the policy.
    pub fn one_route_per_policy(backend: SocketAddr, policies: Value) -> Spec {
        let names: Vec<String> = policies.as_object().expect("policies object").keys().cloned().collect();
        let rules: Vec<Value> = names.iter().map(|n| json!({ "match": { "route_name": n }, "policy": n })).collect();
        let mut spec = Spec::new(backend).plugin(json!({ "policies": policies, "routes": rules }));
        for n in &names {
            spec = spec.route(n, &format!("/{n}"), "backend");
        }
        spec
    }

    /// The listener comes from a file that Envoy watches (LDS from a path), on a fixed port, so
    /// [`Envoy::reload`] can change the plugin configuration of the running Envoy, as a control
    /// plane (or Istio) would.
    pub fn reloadable(mut self) -> Spec {
        self.lds = Some((unique_dir("lds").join("lds.json"), dead_port()));
        self
    }

    /// The same bootstrap without its routes (to add others).
    pub fn without_routes(mut self) -> Spec {
        self.routes.clear();
        self
    }

    /// Worker threads (default 2).
    pub fn concurrency(mut self, n: u32) -> Spec {
        self.concurrency = n;
        self
    }

    fn plugin_text(&self) -> String {
        match &self.plugin {
            PluginConfig::Json(v) => serde_json::to_string_pretty(v).expect("serialize plugin config"),
            PluginConfig::Raw(s) => s.clone(),
        }
    }

    /// The bootstrap as YAML: block keys at the top, JSON (a YAML flow subset) inside, and the
    /// shipped `stats_config` block verbatim.
    pub fn yaml(&self) -> String {
        let cluster = |name: &str, port: u16, h2: bool| {
            let mut c = json!({
                "name": name,
                "type": "STATIC",
                "connect_timeout": "1s",
                // Envoy's own per-cluster limits would cap what the tests measure (its default
                // max_retries allows only 3 retries in flight at once): lift them, so Breakwater's
                // policies are the only limits in play.
                "circuit_breakers": { "thresholds": [{
                    "max_connections": 100000, "max_pending_requests": 100000,
                    "max_requests": 100000, "max_retries": 100000
                }]},
                "load_assignment": {
                    "cluster_name": name,
                    "endpoints": [{ "lb_endpoints": [{ "endpoint": { "address": {
                        "socket_address": { "address": "127.0.0.1", "port_value": port }
                    }}}]}]
                }
            });
            if h2 {
                c["typed_extension_protocol_options"] = json!({
                    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                        "explicit_http_config": { "http2_protocol_options": {} }
                    }
                });
            }
            c
        };
        let mut static_resources = json!({
            "listeners": [self.listener_config()],
            "clusters": [
                cluster("backend", self.backend.port(), false),
                cluster("backend_h2", self.backend.port(), true),
                cluster("dead", dead_port(), false),
            ]
        });
        if let Some(clusters) = static_resources["clusters"].as_array_mut() {
            clusters.extend(self.clusters.iter().map(|(name, addr)| cluster(name, addr.port(), false)));
        }
        let mut dynamic = String::new();
        if let Some((path, _)) = &self.lds {
            static_resources["listeners"] = json!([]);
            let lds = json!({ "lds_config": { "path_config_source": { "path": path }, "resource_api_version": "V3" } });
            // Dynamic resources need a node identity, even from a file.
            dynamic = format!(
                "dynamic_resources: {}\nnode: {{ id: breakwater-test, cluster: breakwater-test }}\n",
                serde_json::to_string(&lds).expect("json")
            );
        }
        if let (Some(admin), Some(listeners)) = (&self.control, static_resources["listeners"].as_array_mut()) {
            // Static even when the ingress comes from LDS: a reload of the data plane's
            // configuration leaves the control endpoint in place.
            listeners.push(self.control_listener(admin));
        }
        let admin = json!({ "address": { "socket_address": { "address": "127.0.0.1", "port_value": 0 } } });
        format!(
            "admin: {}\n{}static_resources: {}\n{dynamic}",
            serde_json::to_string(&admin).expect("json"),
            shipped_stats_config(),
            serde_json::to_string(&static_resources).expect("json"),
        )
    }

    /// The LDS file's contents: the listener as its one resource.
    fn lds_json(&self) -> String {
        let mut listener = self.listener_config();
        listener["@type"] = json!("type.googleapis.com/envoy.config.listener.v3.Listener");
        serde_json::to_string_pretty(&json!({ "resources": [listener] })).expect("json")
    }

    /// Writes the LDS file, atomically (Envoy reacts to the file being moved into place).
    fn write_lds(&self) {
        if let Some((path, _)) = &self.lds {
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, self.lds_json()).expect("write the LDS file");
            std::fs::rename(&tmp, path).expect("move the LDS file into place");
        }
    }

    /// The Envoy routes, as JSON; in per-route mode each route enables its instance.
    fn route_configs(&self, enabled: &[(String, String)]) -> Vec<Value> {
        let front = self.front_routes.iter().cloned();
        front
            .chain(self.routes.iter().map(|r| {
                let mut route = json!({
                    "match": { "prefix": r.prefix },
                    "route": { "cluster": r.cluster, "timeout": format!("{}s", r.timeout.as_secs_f64()) }
                });
                if let Some(name) = &r.name {
                    route["name"] = json!(name);
                }
                if let Some(policy) = &r.retry_policy {
                    route["route"]["retry_policy"] = policy.clone();
                }
                if let Some(idle) = r.idle_timeout {
                    route["route"]["idle_timeout"] = json!(format!("{}s", idle.as_secs_f64()));
                }
                if r.filter_disabled {
                    route["typed_per_filter_config"] = json!({ "breakwater": {
                        "@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig",
                        "disabled": true
                    }});
                } else if let Some((_, filter)) = enabled.iter().find(|(n, _)| Some(n) == r.name.as_ref()) {
                    let (name, config) = breakwater::per_route::enable(filter);
                    route["typed_per_filter_config"] = json!({ name: config });
                }
                route
            }))
            .collect()
    }

    /// The Wasm filter's `config`, without its plugin configuration.
    fn wasm_config(&self) -> Value {
        let wasm = self.wasm.clone().unwrap_or_else(wasm_path);
        json!({
            "name": "breakwater",
            "root_id": "breakwater",
            // Set explicitly: the default changed between Envoy versions.
            "failure_policy": self.failure_policy,
            // A trapped VM is reloaded after 0.1s (Envoy's default: 1s), backing off to 5s.
            "reload_config": { "backoff": { "base_interval": "0.1s", "max_interval": "5s" } },
            "vm_config": {
                "vm_id": "breakwater",
                "runtime": "envoy.wasm.runtime.v8",
                "code": { "local": { "filename": wasm.to_string_lossy() } }
            }
        })
    }

    /// The Breakwater filters, and (per-route mode) which route enables which.
    fn breakwater_filters(&self) -> (Vec<Value>, Vec<(String, String)>) {
        match (self.attach, &self.plugin) {
            (Attach::PerRoute, PluginConfig::Json(plugin)) => {
                let split = breakwater::per_route::split(plugin).unwrap_or_else(|e| panic!("per-route split: {e}"));
                let wasm = self.wasm_config();
                let filters = split.instances.iter().map(|i| breakwater::per_route::http_filter(i, &wasm)).collect();
                (filters, split.routes)
            }
            _ => {
                let mut config = self.wasm_config();
                config["configuration"] = json!({
                    "@type": "type.googleapis.com/google.protobuf.StringValue",
                    "value": self.plugin_text()
                });
                let filter = json!({
                    "name": "breakwater",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
                        "config": config
                    }
                });
                (vec![filter], Vec::new())
            }
        }
    }

    /// The control listener: the `control` filter instance, then a router that answers 404.
    fn control_listener(&self, admin: &Value) -> Value {
        let mut config = self.wasm_config();
        config["name"] = json!("breakwater-control");
        config["configuration"] = json!({
            "@type": "type.googleapis.com/google.protobuf.StringValue",
            "value": admin.to_string()
        });
        json!({
            "name": "control",
            "address": { "socket_address": { "address": "127.0.0.1", "port_value": 0 } },
            "filter_chains": [{ "filters": [{
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                    "stat_prefix": "control_endpoint",
                    "route_config": {
                        "name": "control",
                        "virtual_hosts": [{ "name": "control", "domains": ["*"], "routes": [{
                            "match": { "prefix": "/" },
                            "direct_response": { "status": 404, "body": { "inline_string": "not found\n" } }
                        }]}]
                    },
                    "http_filters": [
                        { "name": "breakwater-control", "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
                            "config": config
                        }},
                        { "name": "envoy.filters.http.router", "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                        }}
                    ]
                }
            }]}]
        })
    }

    /// The ingress listener: the Breakwater filter(s) in front of the router.
    fn listener_config(&self) -> Value {
        let (mut filters, enabled) = self.breakwater_filters();
        let routes = self.route_configs(&enabled);
        filters.push(json!({
            "name": "envoy.filters.http.router",
            "typed_config": { "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router" }
        }));
        let port = self.lds.as_ref().map_or(0, |(_, port)| *port);
        let mut listener = json!({
            "name": "ingress",
            "address": { "socket_address": { "address": "127.0.0.1", "port_value": port } },
            "filter_chains": [{ "filters": [{
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                    "stat_prefix": "ingress",
                    "codec_type": "AUTO",
                    "route_config": {
                        "name": "local",
                        "virtual_hosts": [{
                            "name": "test", "domains": ["*"], "routes": routes,
                            "include_attempt_count_in_response": self.attempt_count
                        }]
                    },
                    "http_filters": filters
                }
            }]}]
        });
        if let Some(entry) = &self.access_log {
            listener["filter_chains"][0]["filters"][0]["typed_config"]["access_log"] = json!([entry]);
        }
        if !self.validate_clusters {
            listener["filter_chains"][0]["filters"][0]["typed_config"]["route_config"]["validate_clusters"] =
                json!(false);
        }
        listener
    }
}

// ---------------------------------------------------------------------------------------------
// Envoy: the process
// ---------------------------------------------------------------------------------------------

/// Envoy exited (or never became ready) during start.
#[derive(Debug)]
pub struct StartError {
    pub status: Option<ExitStatus>,
    pub reason: String,
    /// envoy.log followed by stderr.
    pub log: String,
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Envoy did not start ({}; exit {:?}); log tail:\n{}", self.reason, self.status, tail(&self.log, 40))
    }
}

/// A running Envoy; killed (and waited for) on drop.
pub struct Envoy {
    child: Child,
    dir: PathBuf,
    admin: SocketAddr,
    listener: SocketAddr,
    /// The folder of a [`Spec::reloadable`] Envoy's LDS file, removed with the rest.
    lds_dir: Option<PathBuf>,
}

impl Envoy {
    /// Starts Envoy with a generated bootstrap; panics with the log tail if it does not come up.
    pub async fn start(spec: &Spec) -> Envoy {
        Self::try_start(spec).await.unwrap_or_else(|e| panic!("{e}"))
    }

    /// Starts Envoy with a generated bootstrap, reporting a failed start instead of panicking.
    pub async fn try_start(spec: &Spec) -> Result<Envoy, StartError> {
        spec.write_lds();
        let mut envoy = Self::try_start_yaml(&spec.yaml(), spec.concurrency).await;
        if let (Ok(e), Some((path, _))) = (&mut envoy, &spec.lds) {
            e.lds_dir = path.parent().map(PathBuf::from);
        }
        envoy
    }

    /// Hands the running Envoy `spec`'s listener (a [`Spec::reloadable`] one, with a new plugin
    /// configuration, say) and waits until Envoy has taken it. Envoy keeps the Wasm VMs and gives
    /// the plugin a new root context; streams already running stay with the old configuration.
    pub async fn reload(&self, spec: &Spec) {
        self.reload_within(spec, Duration::from_secs(5)).await;
    }

    /// As [`Envoy::reload`], waiting up to `limit` for Envoy to take the new listener.
    pub async fn reload_within(&self, spec: &Spec, limit: Duration) {
        assert!(spec.lds.is_some(), "only a Spec::reloadable() Envoy can reload");
        let before = self.stat("listener_manager.lds.update_success").await;
        spec.write_lds();
        // The admin port may not answer while the main thread applies a large configuration.
        let read = || async {
            let path = "/stats?format=json&filter=%5Elistener_manager%5C.lds%5C.update_success%24";
            match admin_get(self.admin, path).await {
                Ok((200, body)) => serde_json::from_str::<Value>(&body)
                    .ok()
                    .and_then(|v| v["stats"].as_array()?.iter().find_map(|s| s["value"].as_i64())),
                _ => None,
            }
            .unwrap_or(before)
        };
        let after = poll_for(limit, read, |n| *n > before).await;
        assert!(after > before, "Envoy did not take the new listener:\n{}", tail(&self.log(), 20));
        // The new filter chain is in place once the listener reports ready again.
        let warming = poll(|| self.stat("listener_manager.total_listeners_warming"), |n| *n == 0).await;
        assert_eq!(warming, 0, "the new listener is still warming");
    }

    /// Starts the shipped demo configuration, pointed at `upstream` (see [`Envoy::demo_yaml`]).
    pub async fn start_demo(upstream: SocketAddr) -> Envoy {
        Self::try_start_yaml(&Self::demo_yaml(upstream), 2).await.unwrap_or_else(|e| panic!("{e}"))
    }

    /// The shipped `envoy/envoy.yaml` with only these changes: listener ports 10000 and 9902 (the
    /// control endpoint) → 0, admin port 9901 → 0, upstream port 8081 → `upstream`'s port, the
    /// Wasm filename → the absolute path.
    pub fn demo_yaml(upstream: SocketAddr) -> String {
        let mut text = demo_yaml_text();
        let wasm = wasm_path();
        let swaps = [
            ("port_value: 10000".to_owned(), "port_value: 0".to_owned()),
            ("port_value: 9901".to_owned(), "port_value: 0".to_owned()),
            ("port_value: 9902".to_owned(), "port_value: 0".to_owned()),
            ("port_value: 8081".to_owned(), format!("port_value: {}", upstream.port())),
        ];
        for (from, to) in swaps {
            let n = text.matches(&from).count();
            assert_eq!(n, 1, "envoy/envoy.yaml should contain `{from}` exactly once, found {n}");
            text = text.replace(&from, &to);
        }
        // Every Breakwater filter (the per-route instances and the one with rules) loads the build.
        let path = "filename: target/wasm32-wasip1/release/breakwater.wasm";
        assert!(text.matches(path).count() >= 1, "envoy/envoy.yaml loads no Breakwater filter");
        text.replace(path, &format!("filename: {}", wasm.display()))
    }

    pub async fn try_start_yaml(yaml: &str, concurrency: u32) -> Result<Envoy, StartError> {
        Self::try_start_yaml_listening(yaml, concurrency, "ingress").await
    }

    /// As [`Envoy::try_start_yaml`], for a bootstrap whose client-facing listener is named
    /// `listener` (the one [`Envoy::listener`] returns).
    pub async fn try_start_yaml_listening(yaml: &str, concurrency: u32, listener: &str) -> Result<Envoy, StartError> {
        let dir = unique_dir("envoy");
        let config = dir.join("envoy.yaml");
        std::fs::write(&config, yaml).expect("write envoy.yaml");
        let stderr = std::fs::File::create(dir.join("stderr")).expect("create stderr file");
        let stdout = std::fs::File::create(dir.join("stdout")).expect("create stdout file");
        let child = Command::new(envoy_bin())
            .arg("-c")
            .arg(&config)
            // No hot restart: it would leave /dev/shm/envoy_shared_memory_* behind, even on SIGTERM.
            .args(["--concurrency", &concurrency.to_string(), "--use-dynamic-base-id", "--disable-hot-restart"])
            .arg("--admin-address-path")
            .arg(dir.join("control"))
            .arg("--log-path")
            .arg(dir.join("envoy.log"))
            .args(["-l", "info"])
            // Log lines carry UTC times, comparable with the access log's epoch times.
            .env("TZ", "UTC")
            // The log file is flushed every 10s by default; tests read it within milliseconds.
            .args(["--file-flush-interval-msec", "50"])
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {} (set ENVOY_BIN): {e}", envoy_bin()));
        // From here on, Drop kills the child whatever happens.
        let mut envoy = Envoy {
            child,
            dir,
            admin: ([127, 0, 0, 1], 0).into(),
            listener: ([127, 0, 0, 1], 0).into(),
            lds_dir: None,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = envoy.child.try_wait() {
                return Err(envoy.start_error(Some(status), "Envoy exited"));
            }
            if Instant::now() > deadline {
                return Err(envoy.start_error(None, "timed out waiting for the listener"));
            }
            if envoy.admin.port() == 0 {
                if let Ok(text) = std::fs::read_to_string(envoy.dir.join("control")) {
                    if let Ok(addr) = text.trim().parse() {
                        envoy.admin = addr;
                    }
                }
            }
            if envoy.admin.port() != 0 && envoy.listener.port() == 0 {
                if let Some(port) = envoy.bound_listener_port(listener).await {
                    envoy.listener = ([127, 0, 0, 1], port).into();
                }
            }
            if envoy.listener.port() != 0 && envoy.is_live().await {
                return Ok(envoy);
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    fn start_error(&mut self, status: Option<ExitStatus>, reason: &str) -> StartError {
        if status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        StartError { status, reason: reason.to_owned(), log: format!("{}\n{}", self.log(), self.stderr()) }
    }

    async fn bound_listener_port(&self, name: &str) -> Option<u16> {
        let (status, body) = admin_get(self.admin, "/listeners?format=json").await.ok()?;
        if status != 200 {
            return None;
        }
        let v: Value = serde_json::from_str(&body).ok()?;
        let port = v["listener_statuses"].as_array()?.iter().find(|l| l["name"] == name)?["local_address"]
            ["socket_address"]["port_value"]
            .as_u64()?;
        (port != 0).then_some(port as u16)
    }

    async fn is_live(&self) -> bool {
        matches!(admin_get(self.admin, "/ready").await, Ok((200, _)))
    }

    /// Runs `envoy --mode validate` on `yaml`: (exited successfully, stdout + stderr).
    pub fn validate(yaml: &str) -> (bool, String) {
        let dir = unique_dir("validate");
        let config = dir.join("envoy.yaml");
        std::fs::write(&config, yaml).expect("write envoy.yaml");
        let out = Command::new(envoy_bin())
            .args(["--mode", "validate", "--use-dynamic-base-id", "--disable-hot-restart", "-l", "info", "-c"])
            .arg(&config)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {} (set ENVOY_BIN): {e}", envoy_bin()));
        let _ = std::fs::remove_dir_all(&dir);
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        (out.status.success(), text)
    }

    /// The ingress listener's address.
    pub fn listener(&self) -> SocketAddr {
        self.listener
    }

    pub fn admin(&self) -> SocketAddr {
        self.admin
    }

    /// The address of the listener named `name` (e.g. `control`, or the demo's
    /// `breakwater-control`).
    pub async fn listener_named(&self, name: &str) -> SocketAddr {
        let port = poll(|| self.bound_listener_port(name), |p| p.is_some()).await;
        let port = port.unwrap_or_else(|| panic!("no listener named {name}"));
        ([127, 0, 0, 1], port).into()
    }

    /// A request to the control endpoint (the listener named `control`, see [`Spec::control`]):
    /// its status and its body as JSON (Null if the body is not JSON).
    pub async fn control(&self, method: Method, path: &str) -> (u16, Value) {
        let addr = self.listener_named("control").await;
        control_request(addr, method, path).await
    }

    /// `http://<listener><path>`
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.listener, path)
    }

    /// `http://<admin><path>`
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }

    /// Counters and gauges by full name (histograms left out). A value beyond `i64::MAX` (a
    /// gauge decremented below zero wraps around in Envoy) reads as the negative number it is.
    pub async fn stats(&self) -> BTreeMap<String, i64> {
        self.stats_at("/stats?format=json").await
    }

    /// The stats whose names match the regular expression `filter` (Envoy's `/stats?filter=`):
    /// cheap where the whole set is large.
    pub async fn stats_matching(&self, filter: &str) -> BTreeMap<String, i64> {
        self.stats_at(&format!("/stats?format=json&filter={filter}")).await
    }

    async fn stats_at(&self, path: &str) -> BTreeMap<String, i64> {
        let (status, body) = admin_get(self.admin, path).await.expect("GET /stats");
        assert_eq!(status, 200, "GET /stats: {body}");
        let v: Value = serde_json::from_str(&body).expect("stats JSON");
        v["stats"]
            .as_array()
            .expect("stats array")
            .iter()
            .filter_map(|s| {
                let value = s["value"].as_i64().or_else(|| s["value"].as_u64().map(|v| v as i64))?;
                Some((s["name"].as_str()?.to_owned(), value))
            })
            .collect()
    }

    /// One stat; 0 if absent.
    pub async fn stat(&self, name: &str) -> i64 {
        // Only this stat: the whole set can be large (thousands of policies).
        let exact = format!("%5E{}%24", name.replace('.', "%5C."));
        self.stats_matching(&exact).await.get(name).copied().unwrap_or(0)
    }

    /// Polls until `name` equals `want` (stats are written when the stream ends, which may be
    /// just after the client has its response); returns the last value seen, so callers assert
    /// on it.
    pub async fn wait_stat(&self, name: &str, want: i64) -> i64 {
        poll(|| self.stat(name), |v| *v == want).await
    }

    /// Breakwater's stats for one policy, read at once.
    pub async fn policy(&self, policy: &str) -> PolicyStats {
        PolicyStats::from_stats(&self.stats().await, policy)
    }

    /// Polls the policy's stats until `done` holds (or 5s pass); returns the last reading, so
    /// callers assert on it and a failure shows every counter.
    pub async fn wait_policy(&self, policy: &str, done: impl Fn(&PolicyStats) -> bool) -> PolicyStats {
        poll(|| self.policy(policy), done).await
    }

    /// Breakwater's bulkhead stats for one policy, read at once.
    pub async fn bulkhead(&self, policy: &str) -> BulkheadStats {
        BulkheadStats::from_stats(&self.stats().await, policy)
    }

    /// Polls the policy's bulkhead stats until `done` holds (or 5s pass); returns the last
    /// reading, so callers assert on it.
    pub async fn wait_bulkhead(&self, policy: &str, done: impl Fn(&BulkheadStats) -> bool) -> BulkheadStats {
        poll(|| self.bulkhead(policy), done).await
    }

    /// Polls until the policy's bulkhead holds no permit and has nobody waiting, and its
    /// counters have settled (or 5s pass); returns the last reading.
    pub async fn wait_bulkhead_idle(&self, policy: &str) -> BulkheadStats {
        self.wait_bulkhead(policy, |s| s.active == 0 && s.queued == 0).await;
        self.settled(|| self.bulkhead(policy)).await
    }

    /// Reads `read` until it stops changing for [`SETTLE`] (or 5s pass): the gauges move at once, but
    /// counters reach Envoy on each worker's tick, a quarter second later at most.
    pub async fn settled<T: PartialEq, F: std::future::Future<Output = T>>(&self, mut read: impl FnMut() -> F) -> T {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut last = read().await;
        let mut since = Instant::now();
        loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let now = read().await;
            if now != last {
                (last, since) = (now, Instant::now());
            }
            // The deadline holds for readings that never stop changing too.
            if since.elapsed() >= SETTLE || Instant::now() > deadline {
                return last;
            }
        }
    }

    /// Waits until the policy's breaker has opened `times` times, then one sync interval more:
    /// a worker that saw no failure itself (its view: closed and quiet) learns of a trip made on
    /// another worker at its next sync tick, `SYNC_INTERVAL` at most. Returns the stats seen.
    pub async fn wait_tripped(&self, policy: &str, times: i64) -> PolicyStats {
        let s = self.wait_policy(policy, |s| s.to_open >= times).await;
        tokio::time::sleep(2 * SYNC_INTERVAL).await;
        s
    }

    /// Sends `path` `n` times, one after another, each on a new connection, and after each waits
    /// until `policy` has recorded its outcome (the stream may end just after the client has its
    /// answer). For requests the breaker admits; returns the replies.
    pub async fn send_recorded(&self, policy: &str, path: &str, n: usize) -> Vec<Reply> {
        let mut replies = Vec::new();
        for _ in 0..n {
            let before = self.policy(policy).await.recorded();
            replies.push(self.get(path).await);
            let after = self.wait_policy(policy, |s| s.recorded() > before).await;
            assert!(after.recorded() > before, "policy {policy} did not record GET {path}: {after:?}");
        }
        replies
    }

    /// `GET /stats/prometheus`.
    pub async fn prometheus(&self) -> String {
        let (status, body) = admin_get(self.admin, "/stats/prometheus").await.expect("GET /stats/prometheus");
        assert_eq!(status, 200);
        body
    }

    /// Connections accepted per worker on the ingress listener, worker 0 first.
    pub async fn worker_connections(&self) -> Vec<i64> {
        self.per_worker("downstream_cx_total").await
    }

    async fn per_worker(&self, stat: &str) -> Vec<i64> {
        // The stat prefix carries the *configured* address (`listener.127.0.0.1_0.worker_1.…`);
        // the bootstrap has a single ingress listener.
        let mut by_worker: BTreeMap<u32, i64> = BTreeMap::new();
        for (name, value) in self.stats().await {
            let rest = name.strip_prefix("listener.127.0.0.1_").and_then(|r| r.split_once(".worker_")).map(|(_, r)| r);
            if let Some(rest) = rest {
                if let Some((worker, s)) = rest.split_once('.') {
                    if s == stat {
                        if let Ok(w) = worker.parse() {
                            by_worker.insert(w, value);
                        }
                    }
                }
            }
        }
        by_worker.into_values().collect()
    }

    /// envoy.log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("envoy.log")).unwrap_or_default()
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.join("stderr")).unwrap_or_default()
    }

    /// Polls the log until a line contains `needle`; returns that line.
    pub async fn wait_log_line(&self, needle: &str) -> Option<String> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(l) = self.log().lines().find(|l| l.contains(needle)) {
                return Some(l.to_owned());
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    // --- clients ------------------------------------------------------------------------------

    /// GET over a new HTTP/1.1 connection.
    pub async fn get(&self, path: &str) -> Reply {
        self.request(Method::GET, path, &[]).await
    }

    /// A request over a new HTTP/1.1 connection.
    pub async fn request(&self, method: Method, path: &str, headers: &[(&str, &str)]) -> Reply {
        let conn = Conn::open(self.listener).await;
        conn.request(method, path, headers).await
    }

    /// Many GETs at once, each on its own new connection; replies in the order of `paths`.
    pub async fn get_concurrently(&self, paths: Vec<String>) -> Vec<Reply> {
        let addr = self.listener;
        let tasks: Vec<_> = paths
            .into_iter()
            .map(|p| tokio::spawn(async move { Conn::open(addr).await.request(Method::GET, &p, &[]).await }))
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.expect("request task"));
        }
        out
    }

    /// Sends `calls` from `clients` concurrent clients. Each client takes the next call, sends
    /// it on a **new connection** (so calls spread over the workers), waits for its answer or
    /// gives up as the call says, then takes the next. Replies come back in the order of
    /// `calls`; `None` for a call whose client gave up.
    pub async fn send_all(&self, clients: usize, calls: Vec<Call>) -> Vec<Option<Reply>> {
        let addr = self.listener;
        let n = calls.len();
        let calls = std::sync::Arc::new(calls);
        let next = std::sync::Arc::new(AtomicU64::new(0));
        let tasks: Vec<_> = (0..clients.max(1))
            .map(|_| {
                let (calls, next) = (calls.clone(), next.clone());
                tokio::spawn(async move {
                    let mut got = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                        let Some(call) = calls.get(i) else { break };
                        got.push((i, call.send(addr).await));
                    }
                    got
                })
            })
            .collect();
        let mut out: Vec<Option<Reply>> = (0..n).map(|_| None).collect();
        for t in tasks {
            for (i, reply) in t.await.expect("client task") {
                out[i] = reply;
            }
        }
        out
    }

    /// A request over a new HTTP/2 (prior knowledge, h2c) connection.
    pub async fn h2_request(&self, method: Method, path: &str, headers: &[(&str, &str)], body: Bytes) -> Reply {
        let stream = TcpStream::connect(self.listener).await.expect("connect to Envoy");
        stream.set_nodelay(true).ok();
        let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2 handshake");
        tokio::spawn(conn);
        let mut req = Request::builder().method(method).uri(self.url(path));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Full::new(body)).expect("request");
        let fut = async {
            let resp = sender.send_request(req).await.expect("h2 request");
            Reply::read(resp).await
        };
        tokio::time::timeout(REQUEST_TIMEOUT, fut).await.expect("h2 request timed out")
    }

    /// One kept-alive HTTP/1.1 connection on each worker, worker 0 first.
    pub async fn conn_per_worker(&self, workers: usize) -> Vec<Conn> {
        self.conns_per_worker(workers, 1).await.into_iter().flatten().collect()
    }
}

impl Envoy {
    /// `per_worker` kept-alive HTTP/1.1 connections on each of `workers` workers: element `w`
    /// holds worker `w`'s. Other connections may be open meanwhile (they must stay open, and
    /// idle). Connections are opened until every worker has its share (identified by the
    /// per-worker `downstream_cx_active` gauges); extra ones are closed.
    pub async fn conns_per_worker(&self, workers: usize, per_worker: usize) -> Vec<Vec<Conn>> {
        let mut pinned: Vec<Vec<Conn>> = (0..workers).map(|_| Vec::new()).collect();
        let baseline: i64 = self.per_worker("downstream_cx_active").await.iter().sum();
        let mut kept = 0i64;
        for _ in 0..(64 * workers * per_worker) {
            if pinned.iter().all(|p| p.len() >= per_worker) {
                break;
            }
            let before = self.per_worker("downstream_cx_active").await;
            let conn = Conn::open(self.listener).await;
            let deadline = Instant::now() + Duration::from_secs(5);
            let worker = loop {
                let after = self.per_worker("downstream_cx_active").await;
                let grew: Vec<usize> = (0..after.len())
                    .filter(|&i| after.get(i).copied().unwrap_or(0) > before.get(i).copied().unwrap_or(0))
                    .collect();
                if grew.len() == 1 {
                    break grew[0];
                }
                assert!(
                    Instant::now() < deadline,
                    "could not tell which worker took a connection: {before:?} -> {after:?}"
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            };
            match pinned.get_mut(worker) {
                Some(p) if p.len() < per_worker => {
                    p.push(conn.with_worker(worker));
                    kept += 1;
                }
                _ => {
                    drop(conn);
                    // Let Envoy see the close before the next diff.
                    let deadline = Instant::now() + Duration::from_secs(5);
                    while self.per_worker("downstream_cx_active").await.iter().sum::<i64>() != baseline + kept {
                        assert!(Instant::now() < deadline, "Envoy did not see a closed connection");
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            }
        }
        assert!(pinned.iter().all(|p| p.len() >= per_worker), "could not pin {per_worker} connections per worker");
        pinned
    }
}

/// Reads `read` every 10ms until `done` holds or 5s pass; returns the last reading, so the
/// caller asserts on it and a failure shows what was seen.
pub(crate) async fn poll<T, F: std::future::Future<Output = T>>(
    read: impl FnMut() -> F,
    done: impl Fn(&T) -> bool,
) -> T {
    poll_for(Duration::from_secs(5), read, done).await
}

/// As [`poll`], for up to `limit`.
pub(crate) async fn poll_for<T, F: std::future::Future<Output = T>>(
    limit: Duration,
    mut read: impl FnMut() -> F,
    done: impl Fn(&T) -> bool,
) -> T {
    let deadline = Instant::now() + limit;
    loop {
        let v = read().await;
        if done(&v) || Instant::now() > deadline {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- Envoy log kept in {} ; plugin lines, warnings and errors:\n{}\n---",
                self.dir.display(),
                notable(&format!("{}\n{}", self.log(), self.stderr()), 40)
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
            if let Some(lds) = &self.lds_dir {
                let _ = std::fs::remove_dir_all(lds);
            }
        }
    }
}

/// Breakwater's stats for one policy (`wasmcustom.breakwater_*.policy.<P>…`). Counters reach
/// Envoy on each worker's tick, `SYNC_INTERVAL` after the event at most.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyStats {
    pub success: i64,
    pub failure: i64,
    pub slow: i64,
    /// Calls whose outcome did not count (every reason but `stale`).
    pub ignored: i64,
    /// Calls admitted in an earlier breaker generation, dropped (`ignored_total{reason="stale"}`).
    pub stale: i64,
    pub rejections: i64,
    pub dry_run_rejections: i64,
    pub to_open: i64,
    pub to_half_open: i64,
    pub to_closed: i64,
    /// From the per-state gauges: [`CLOSED`], [`OPEN`] or [`HALF_OPEN`] (-1: none set).
    pub state: i64,
}

/// The `reason` labels of `breakwater_ignored_total`, `stale` last.
pub const IGNORED_REASONS: [&str; 7] =
    ["client_closed", "local_reply", "envoy_overflow", "rate_limited", "ext_authz", "not_counted", "stale"];

impl PolicyStats {
    pub fn from_stats(stats: &BTreeMap<String, i64>, p: &str) -> PolicyStats {
        let get = |name: String| stats.get(&name).copied().unwrap_or(0);
        let stat = |metric: &str, label: &str| get(format!("wasmcustom.breakwater_{metric}.policy.{p}{label}"));
        let outcome = |o: &str| stat("requests_total", &format!(".outcome.{o}"));
        let to = |t: &str| stat("transitions_total", &format!(".to_state.{t}"));
        let ignored = |r: &str| stat("ignored_total", &format!(".reason.{r}"));
        let state = [
            ("closed", CLOSED),
            ("open", OPEN),
            ("half_open", HALF_OPEN),
            ("forced_open", FORCED_OPEN),
            ("forced_closed", FORCED_CLOSED),
        ]
        .iter()
        .find(|(s, _)| stat("circuit_state", &format!(".state.{s}")) == 1)
        .map_or(-1, |(_, v)| *v);
        PolicyStats {
            success: outcome("success"),
            failure: outcome("failure"),
            slow: stat("slow_calls_total", ""),
            ignored: IGNORED_REASONS[..6].iter().map(|r| ignored(r)).sum(),
            stale: ignored("stale"),
            rejections: stat("rejections_total", ".reason.circuit_open"),
            dry_run_rejections: stat("dry_run_rejections_total", ".reason.circuit_open"),
            to_open: to("open"),
            to_half_open: to("half_open"),
            to_closed: to("closed"),
            state,
        }
    }

    /// Finished calls whose outcome was accounted (slow is on top of success/failure).
    pub fn recorded(&self) -> i64 {
        self.success + self.failure + self.ignored
    }
}

/// Breakwater's bulkhead stats for one policy (`wasmcustom.breakwater_bulkhead_*.policy.<P>` and
/// the bulkhead reasons of the rejection stats).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BulkheadStats {
    /// Gauge: requests in flight.
    pub active: i64,
    /// Gauge: requests waiting in the queue.
    pub queued: i64,
    /// All admissions, at once or after waiting.
    pub admitted: i64,
    /// Admissions that waited in the queue first.
    pub waited: i64,
    /// Rejected: no permit and no room in the queue (`reason="bulkhead_full"`).
    pub full: i64,
    /// Rejected after waiting `queue.timeout` (`reason="queue_timeout"`).
    pub queue_timeout: i64,
    /// dry_run: would have been rejected or queued (`dry_run_rejections_total{reason="bulkhead_full"}`).
    pub dry_run_full: i64,
}

impl BulkheadStats {
    pub fn from_stats(stats: &BTreeMap<String, i64>, p: &str) -> BulkheadStats {
        let get = |name: String| stats.get(&name).copied().unwrap_or(0);
        let stat = |metric: &str, label: &str| get(format!("wasmcustom.breakwater_{metric}.policy.{p}{label}"));
        BulkheadStats {
            active: stat("bulkhead_active", ""),
            queued: stat("bulkhead_queued", ""),
            admitted: stat("bulkhead_admitted_total", ""),
            waited: stat("bulkhead_waited_total", ""),
            full: stat("rejections_total", ".reason.bulkhead_full"),
            queue_timeout: stat("rejections_total", ".reason.queue_timeout"),
            dry_run_full: stat("dry_run_rejections_total", ".reason.bulkhead_full"),
        }
    }

    /// Real rejections of both kinds.
    pub fn rejected(&self) -> i64 {
        self.full + self.queue_timeout
    }
}

pub const CLOSED: i64 = 0;
pub const OPEN: i64 = 1;
pub const HALF_OPEN: i64 = 2;
/// Set by an operator at the control endpoint, or by `circuit_breaker.force`.
pub const FORCED_OPEN: i64 = 3;
pub const FORCED_CLOSED: i64 = 4;

// ---------------------------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------------------------

/// What a client saw.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: String,
}

impl Reply {
    async fn read(resp: hyper::Response<hyper::body::Incoming>) -> Reply {
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        Reply {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Answered by the test upstream (it stamps every response).
    pub fn from_upstream(&self) -> bool {
        self.header("x-upstream") == Some("breakwater-upstream")
    }

    /// `retry-after` as whole seconds; panics if present but not an integer.
    pub fn retry_after(&self) -> Option<u64> {
        self.header("retry-after")
            .map(|v| v.parse().unwrap_or_else(|_| panic!("retry-after is not whole seconds: {v:?}")))
    }

    /// Fast-failed by Breakwater's breaker.
    pub fn is_circuit_open(&self) -> bool {
        self.header("x-breakwater") == Some("circuit-open")
    }

    /// Rejected by Breakwater's bulkhead at once: no permit, no room to wait.
    pub fn is_bulkhead_full(&self) -> bool {
        self.header("x-breakwater") == Some("bulkhead-full")
    }

    /// Rejected by Breakwater's bulkhead after waiting out the queue timeout.
    pub fn is_queue_timeout(&self) -> bool {
        self.header("x-breakwater") == Some("queue-timeout")
    }
}

/// One request for [`Envoy::send_all`]: a GET on a new connection.
#[derive(Clone, Debug, Default)]
pub struct Call {
    pub path: String,
    pub headers: Vec<(String, String)>,
    /// The client gives up after this long: it closes the connection without reading the
    /// answer (a client abort).
    pub give_up_after: Option<Duration>,
}

impl Call {
    pub fn get(path: impl Into<String>) -> Call {
        Call { path: path.into(), ..Call::default() }
    }

    pub fn header(mut self, name: &str, value: &str) -> Call {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    pub fn give_up_after(mut self, after: Duration) -> Call {
        self.give_up_after = Some(after);
        self
    }

    /// Sends the call to `addr` on a new connection; `None` if the client gave up.
    pub async fn send(&self, addr: SocketAddr) -> Option<Reply> {
        let headers: Vec<(&str, &str)> = self.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let fut = async { Conn::open(addr).await.request(Method::GET, &self.path, &headers).await };
        match self.give_up_after {
            // Dropping the future drops the connection, which closes the socket.
            Some(limit) => tokio::time::timeout(limit, fut).await.ok(),
            None => Some(fut.await),
        }
    }
}

/// One HTTP/1.1 connection to Envoy, kept alive across requests (so it stays on one worker).
pub struct Conn {
    sender: tokio::sync::Mutex<hyper::client::conn::http1::SendRequest<Full<Bytes>>>,
    addr: SocketAddr,
    worker: Option<usize>,
    task: tokio::task::JoinHandle<()>,
}

impl Conn {
    pub async fn open(addr: SocketAddr) -> Conn {
        let stream = TcpStream::connect(addr).await.expect("connect to Envoy");
        stream.set_nodelay(true).ok();
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.expect("h1 handshake");
        let task = tokio::spawn(async move {
            let _ = conn.await;
        });
        Conn { sender: tokio::sync::Mutex::new(sender), addr, worker: None, task }
    }

    fn with_worker(mut self, w: usize) -> Conn {
        self.worker = Some(w);
        self
    }

    /// The worker this connection is known to be on (from [`Envoy::conn_per_worker`]).
    pub fn worker(&self) -> Option<usize> {
        self.worker
    }

    pub async fn get(&self, path: &str) -> Reply {
        self.request(Method::GET, path, &[]).await
    }

    pub async fn request(&self, method: Method, path: &str, headers: &[(&str, &str)]) -> Reply {
        let headers: Vec<(&str, &[u8])> = headers.iter().map(|(k, v)| (*k, v.as_bytes())).collect();
        self.try_request(method, path, &headers).await.unwrap_or_else(|e| panic!("request {path}: {e}"))
    }

    /// A request whose header values may be any bytes (not UTF-8, say); an error instead of a
    /// panic when the connection fails or the answer takes longer than the harness waits.
    pub async fn try_request(&self, method: Method, path: &str, headers: &[(&str, &[u8])]) -> Result<Reply, String> {
        let mut req = Request::builder().method(method).uri(path);
        for (k, v) in headers {
            req = req.header(*k, HeaderValue::from_bytes(v).map_err(|e| e.to_string())?);
        }
        let mut req = req.body(Full::new(Bytes::new())).map_err(|e| e.to_string())?;
        // The listener's address, unless the caller names a host (a virtual host to reach).
        if !req.headers().contains_key(hyper::header::HOST) {
            req.headers_mut().insert(hyper::header::HOST, HeaderValue::from_str(&self.addr.to_string()).expect("host"));
        }
        let fut = async {
            let mut sender = self.sender.lock().await;
            sender.ready().await.map_err(|e| format!("connection not ready: {e}"))?;
            let resp = sender.send_request(req).await.map_err(|e| format!("send: {e}"))?;
            Ok(Reply::read(resp).await)
        };
        tokio::time::timeout(REQUEST_TIMEOUT, fut).await.map_err(|_| "timed out".to_owned())?
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A plain GET to the admin interface: (status, body).
pub async fn admin_get(admin: SocketAddr, path: &str) -> Result<(u16, String), String> {
    http_call(admin, Method::GET, path).await
}

/// A request to Breakwater's control endpoint at `addr`: its status and its JSON body (Null if
/// the body is not JSON).
pub async fn control_request(addr: SocketAddr, method: Method, path: &str) -> (u16, Value) {
    let (status, body) = http_call(addr, method, path).await.unwrap_or_else(|e| panic!("control {path}: {e}"));
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

/// One HTTP/1.1 request without a body, on a new connection.
async fn http_call(admin: SocketAddr, method: Method, path: &str) -> Result<(u16, String), String> {
    let fut = async {
        let stream = TcpStream::connect(admin).await.map_err(|e| e.to_string())?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| e.to_string())?;
        let task = tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = Request::builder()
            .method(method.clone())
            .uri(path)
            .header(hyper::header::HOST, admin.to_string())
            .body(Full::new(Bytes::new()))
            .map_err(|e| e.to_string())?;
        let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
        task.abort();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(Duration::from_secs(10), fut).await.map_err(|_| format!("{method} {path} timed out"))?
}

/// Sends a GET on a new raw TCP connection and closes the connection after `after` without
/// reading the answer: a client that gives up mid-request.
pub async fn get_and_abort(addr: SocketAddr, path: &str, after: Duration) {
    use tokio::io::AsyncWriteExt;
    let mut stream = TcpStream::connect(addr).await.expect("connect to Envoy");
    let req = format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\n\r\n");
    stream.write_all(req.as_bytes()).await.expect("write request");
    tokio::time::sleep(after).await;
    drop(stream);
}
