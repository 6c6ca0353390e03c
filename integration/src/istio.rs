//! Istio-shaped Envoy: what istiod and its agent (Istio 1.30.3) hand a proxy, emulated from the
//! shipped manifests, so the recipes under `envoy/istio/` run through the real Envoy.
//!
//! * [`Mesh::read`] reads manifests as kubectl sends them to the API server (YAML 1.1, by
//!   `tools/meshyaml.py`), with each WasmPlugin's `pluginConfig` converted as istiod converts it:
//!   to JSON, sent as a `StringValue`.
//! * A [`Proxy`] is one Istio proxy, with its namespace and labels, and the listener under test:
//!   an ingress gateway's, a sidecar's outbound (callers) or a sidecar's inbound (the server).
//!   [`IstioEnvoy::start`] gives it the configuration istiod would, for the Gateways and
//!   VirtualServices of the mesh and the WasmPlugins that select it:
//!   - gateway: listener `0.0.0.0_8080`, route configuration `http.8080`, a virtual host per
//!     Gateway host, Envoy routes named after the VirtualService http routes (`<name>`, or
//!     `<name>.<match name>`), clusters `outbound|<port>|<subset>|<FQDN>`, and Istio's default
//!     retry policy on every route;
//!   - outbound: listener `0.0.0.0_8080`, route configuration `8080`, a virtual host per service
//!     (its VirtualService's routes, or one route named `default`), and `allow_any` to
//!     `PassthroughCluster` for any other host;
//!   - inbound: listener `virtualInbound`, route configuration `inbound|8080||`, one virtual host
//!     `inbound|http|8080` with one route named `default` to cluster `inbound|8080||`.
//!
//!   Every cluster is the test upstream on loopback, with Istio's (maximal) circuit breakers.
//! * Each selected WasmPlugin arrives through ECDS from a file Envoy watches, as istiod sends it
//!   after the agent has pulled the module: the filter and resource named
//!   `extensions.istio.io/trafficextension/<ns>.<name>~istio-translated-wasmplugin` (1.30
//!   translates a WasmPlugin into a TrafficExtension; 1.27–1.29 name it
//!   `extensions.istio.io/wasmplugin/<ns>.<name>`), no `vm_id`, `root_id` = `pluginName`, the
//!   runtime V8, the code a local file (the agent's rewrite of the `oci://` url; it also strips
//!   the `ISTIO_META_*` VM environment istiod adds), and `failStrategy` mapped to
//!   `failure_policy`. [`IstioEnvoy::push`] writes a changed WasmPlugin, as istiod pushes one.
//!
//! Emulated, not Istio: no mTLS, no traffic capture (clients connect to the listener directly,
//! naming the host they want), none of Istio's other filters, one port (8080) for everything.
//! A manifest using a feature this translation does not know makes the test fail, never pass.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use hyper::Method;
use serde_json::{json, Value};

use crate::envoy::{poll, repo_root, shipped_stats_config, tail, unique_dir, wasm_path, Envoy, Reply};

/// The Istio release whose xDS output this module emulates (and whose CRDs the manifests are
/// checked against: `envoy/istio/crds/`).
pub const ISTIO_VERSION: &str = "1.30.3";
/// The one port of every emulated service and workload.
pub const PORT: u16 = 8080;
const ROOT_NAMESPACE: &str = "istio-system";
const WASM_HTTP: &str = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm";
const RBAC_HTTP: &str = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC";

/// The Python with the project's YAML readers: `$BREAKWATER_PYTHON`, else `<repo>/.venv/bin/python`.
fn python() -> PathBuf {
    std::env::var_os("BREAKWATER_PYTHON").map_or_else(|| repo_root().join(".venv/bin/python"), PathBuf::from)
}

/// Istio resources as the API server holds them.
#[derive(Clone, Debug, Default)]
pub struct Mesh {
    documents: Vec<Value>,
    /// `<namespace>/<name>` → the configuration istiod sends the plugin.
    plugin_configs: BTreeMap<String, Option<String>>,
}

impl Mesh {
    /// The manifests at these paths (relative to the repository root), read as kubectl reads them.
    pub fn read(files: &[&str]) -> Mesh {
        let mut mesh = Mesh::default();
        for f in files {
            mesh.add(&repo_root().join(f));
        }
        mesh
    }

    /// One manifest given as text (say, a shipped one with a change), read as kubectl reads it.
    pub fn from_text(text: &str) -> Mesh {
        let dir = unique_dir("manifest");
        let path = dir.join("manifest.yaml");
        std::fs::write(&path, text).expect("write the manifest");
        let mut mesh = Mesh::default();
        mesh.add(&path);
        let _ = std::fs::remove_dir_all(&dir);
        mesh
    }

    fn add(&mut self, path: &Path) {
        let out = Command::new(python())
            .arg(repo_root().join("tools/meshyaml.py"))
            .arg("kubectl")
            .arg(path)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {} (set BREAKWATER_PYTHON): {e}", python().display()));
        assert!(out.status.success(), "tools/meshyaml.py {}: {}", path.display(), String::from_utf8_lossy(&out.stderr));
        let v: Value = serde_json::from_slice(&out.stdout).expect("meshyaml output");
        self.documents.extend(v["documents"].as_array().expect("documents").iter().cloned());
        for (k, c) in v["plugin_configs"].as_object().expect("plugin_configs") {
            self.plugin_configs.insert(k.clone(), c.as_str().map(str::to_owned));
        }
    }

    fn of_kind<'a>(&'a self, kind: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
        self.documents.iter().filter(move |d| d["kind"] == kind)
    }

    /// Every WasmPlugin of the mesh.
    pub fn wasm_plugins(&self) -> Vec<WasmPlugin> {
        self.of_kind("WasmPlugin")
            .map(|d| {
                let (namespace, name) = namespaced(d);
                let configuration = self.plugin_configs.get(&format!("{namespace}/{name}")).cloned().flatten();
                WasmPlugin { namespace, name, spec: d["spec"].clone(), configuration }
            })
            .collect()
    }

    /// The WasmPlugin `<namespace>/<name>`.
    pub fn wasm_plugin(&self, key: &str) -> WasmPlugin {
        self.wasm_plugins()
            .into_iter()
            .find(|p| format!("{}/{}", p.namespace, p.name) == key)
            .unwrap_or_else(|| panic!("no WasmPlugin {key}"))
    }

    /// The WasmPlugins istiod would give this proxy's listener, in filter order.
    pub fn plugins_for(&self, proxy: &Proxy) -> Vec<WasmPlugin> {
        let mut plugins: Vec<WasmPlugin> = self.wasm_plugins().into_iter().filter(|p| p.selects(proxy)).collect();
        for p in &plugins {
            assert!(
                matches!(p.spec.get("phase").and_then(Value::as_str), None | Some("UNSPECIFIED_PHASE")),
                "{}: only the unspecified phase (just before the router) is emulated",
                p.name
            );
        }
        // Higher priority first, then by name (istiod also orders by creation time).
        plugins.sort_by_key(|p| (-p.spec["priority"].as_i64().unwrap_or(0), p.namespace.clone(), p.name.clone()));
        plugins
    }

    /// The Gateways that select this proxy: `<namespace>/<name>` → the Gateway.
    fn gateways_for(&self, proxy: &Proxy) -> BTreeMap<String, &Value> {
        self.of_kind("Gateway")
            .filter(|g| labels_match(&g["spec"]["selector"], &proxy.labels))
            .map(|g| {
                let (ns, name) = namespaced(g);
                (format!("{ns}/{name}"), g)
            })
            .collect()
    }

    /// The route configuration istiod gives this proxy's listener: (its name, its virtual hosts).
    fn route_config(&self, proxy: &Proxy) -> (String, Vec<Value>) {
        match proxy.listener {
            Listener::Gateway => (format!("http.{PORT}"), self.gateway_virtual_hosts(proxy)),
            Listener::Outbound => (PORT.to_string(), self.outbound_virtual_hosts(proxy)),
            Listener::Inbound => {
                let cluster = format!("inbound|{PORT}||");
                let route = json!({
                    "name": "default",
                    "match": { "prefix": "/" },
                    "route": { "cluster": cluster, "timeout": "0s" }
                });
                let vhost = json!({ "name": format!("inbound|http|{PORT}"), "domains": ["*"], "routes": [route] });
                (cluster, vec![vhost])
            }
        }
    }

    fn gateway_virtual_hosts(&self, proxy: &Proxy) -> Vec<Value> {
        let gateways = self.gateways_for(proxy);
        let mut vhosts = Vec::new();
        for (key, gw) in &gateways {
            for server in gw["spec"]["servers"].as_array().expect("Gateway servers") {
                assert_eq!(server["port"]["protocol"], "HTTP", "{key}: only HTTP servers are emulated");
                let port = server["port"]["number"].as_u64().expect("server port");
                for host in server["hosts"].as_array().expect("server hosts").iter().filter_map(Value::as_str) {
                    let routes: Vec<Value> = self
                        .of_kind("VirtualService")
                        .filter(|vs| bound_to(vs, key) && strs(&vs["spec"]["hosts"]).any(|h| h == host))
                        .flat_map(envoy_routes)
                        .collect();
                    if !routes.is_empty() {
                        vhosts.push(json!({
                            "name": format!("{host}:{port}"),
                            "domains": [host, format!("{host}:*")],
                            "routes": routes
                        }));
                    }
                }
            }
        }
        vhosts
    }

    fn outbound_virtual_hosts(&self, proxy: &Proxy) -> Vec<Value> {
        let mut vhosts = Vec::new();
        for service in &proxy.services {
            let fqdn = fqdn_in(service, &proxy.namespace);
            let mesh_vs: Vec<&Value> = self
                .of_kind("VirtualService")
                .filter(|vs| {
                    let ns = namespaced(vs).0;
                    bound_to(vs, "mesh") && strs(&vs["spec"]["hosts"]).any(|h| fqdn_in(h, &ns) == fqdn)
                })
                .collect();
            let routes: Vec<Value> = if mesh_vs.is_empty() {
                vec![json!({
                    "name": "default",
                    "match": { "prefix": "/" },
                    "route": route_action(&format!("outbound|{PORT}||{fqdn}"), None)
                })]
            } else {
                mesh_vs.into_iter().flat_map(envoy_routes).collect()
            };
            let short = fqdn.trim_end_matches(".svc.cluster.local");
            let name = short.split('.').next().unwrap_or(short);
            let mut domains = vec![fqdn.clone(), format!("{fqdn}:{PORT}")];
            // Short names resolve only in the service's own namespace.
            if short.ends_with(&format!(".{}", proxy.namespace)) {
                domains.extend([name.to_owned(), format!("{name}:{PORT}")]);
            }
            domains.extend([short.to_owned(), format!("{short}:{PORT}")]);
            vhosts.push(json!({ "name": format!("{fqdn}:{PORT}"), "domains": domains, "routes": routes }));
        }
        vhosts.push(json!({
            "name": "allow_any",
            "domains": ["*"],
            "routes": [{ "name": "allow_any", "match": { "prefix": "/" }, "route": { "cluster": "PassthroughCluster", "timeout": "0s" } }]
        }));
        vhosts
    }
}

fn namespaced(doc: &Value) -> (String, String) {
    let meta = &doc["metadata"];
    (meta["namespace"].as_str().unwrap_or("default").to_owned(), meta["name"].as_str().unwrap_or_default().to_owned())
}

fn strs(v: &Value) -> impl Iterator<Item = &str> {
    v.as_array().into_iter().flatten().filter_map(Value::as_str)
}

fn labels_match(selector: &Value, labels: &BTreeMap<String, String>) -> bool {
    selector.as_object().into_iter().flatten().all(|(k, v)| labels.get(k).map(String::as_str) == v.as_str())
}

/// Whether the VirtualService applies to `gateway` (`<ns>/<name>`, or `mesh` for sidecars).
fn bound_to(vs: &Value, gateway: &str) -> bool {
    let ns = namespaced(vs).0;
    let gateways: Vec<&str> = strs(&vs["spec"]["gateways"]).collect();
    if gateways.is_empty() {
        return gateway == "mesh";
    }
    gateways.iter().any(
        |g| {
            if *g == "mesh" || g.contains('/') {
                *g == gateway
            } else {
                format!("{ns}/{g}") == gateway
            }
        },
    )
}

/// A service host as Istio resolves it from `namespace`: `checkout` → `checkout.<ns>.svc.cluster.local`.
fn fqdn_in(host: &str, namespace: &str) -> String {
    match host.matches('.').count() {
        0 => format!("{host}.{namespace}.svc.cluster.local"),
        1 => format!("{host}.svc.cluster.local"),
        _ => host.to_owned(),
    }
}

/// Istio's default retry policy for a route without VirtualService `retries`.
fn default_retry_policy() -> Value {
    json!({
        "retry_on": "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes",
        "num_retries": 2,
        "retry_host_predicate": [{
            "name": "envoy.retry_host_predicates.previous_hosts",
            "typed_config": { "@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate" }
        }],
        "host_selection_retry_max_attempts": 5
    })
}

fn route_action(cluster: &str, timeout: Option<&str>) -> Value {
    json!({ "cluster": cluster, "timeout": timeout.unwrap_or("0s"), "retry_policy": default_retry_policy() })
}

/// A VirtualService's http routes as istiod translates them, for the subset the recipes use.
fn envoy_routes(vs: &Value) -> Vec<Value> {
    let (ns, vs_name) = namespaced(vs);
    let known = ["name", "match", "route", "timeout"];
    let mut out = Vec::new();
    for http in vs["spec"]["http"].as_array().expect("http routes") {
        for k in http.as_object().expect("http route").keys() {
            assert!(known.contains(&k.as_str()), "VirtualService {ns}/{vs_name}: `{k}` is not emulated");
        }
        let destinations = http["route"].as_array().expect("route");
        assert_eq!(destinations.len(), 1, "VirtualService {ns}/{vs_name}: one destination per route is emulated");
        let d = &destinations[0]["destination"];
        let port = d["port"]["number"].as_u64().unwrap_or(u64::from(PORT));
        let subset = d["subset"].as_str().unwrap_or("");
        let cluster =
            format!("outbound|{port}|{subset}|{}", fqdn_in(d["host"].as_str().expect("destination host"), &ns));
        let name = http["name"].as_str().unwrap_or("");
        let matches: Vec<Value> = http["match"].as_array().cloned().unwrap_or_else(|| vec![Value::Null]);
        for m in matches {
            let mut route_match = json!({ "prefix": "/" });
            if let Some(o) = m.as_object() {
                for k in o.keys() {
                    assert!(
                        ["name", "uri", "method"].contains(&k.as_str()),
                        "{ns}/{vs_name}: match `{k}` is not emulated"
                    );
                }
                match (m["uri"]["prefix"].as_str(), m["uri"]["exact"].as_str()) {
                    (Some(p), None) => route_match = json!({ "prefix": p }),
                    (None, Some(p)) => route_match = json!({ "path": p }),
                    (None, None) => {
                        assert!(m.get("uri").is_none(), "{ns}/{vs_name}: only uri prefix/exact is emulated")
                    }
                    _ => panic!("{ns}/{vs_name}: a uri match has one kind"),
                }
                if let Some(method) = m.get("method") {
                    let exact = method["exact"].as_str().expect("only method exact is emulated");
                    route_match["headers"] = json!([{ "name": ":method", "string_match": { "exact": exact } }]);
                }
            }
            let route_name = match m["name"].as_str() {
                Some(match_name) => format!("{name}.{match_name}"),
                None => name.to_owned(),
            };
            let mut route = json!({ "match": route_match, "route": route_action(&cluster, http["timeout"].as_str()) });
            if !route_name.is_empty() {
                route["name"] = json!(route_name);
            }
            out.push(route);
        }
    }
    out
}

/// Which of a proxy's listeners is under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listener {
    /// An ingress gateway's HTTP listener (Istio's listener class Gateway: WasmPlugin mode CLIENT).
    Gateway,
    /// A sidecar's outbound HTTP listener: the workload's own calls (mode CLIENT).
    Outbound,
    /// A sidecar's inbound HTTP listener: calls to the workload (mode SERVER).
    Inbound,
}

/// One Istio proxy: a gateway or a sidecar, its namespace and labels, and the listener under test.
#[derive(Clone, Debug)]
pub struct Proxy {
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    pub listener: Listener,
    /// Outbound: the mesh's services on port 8080 (short names in the proxy's namespace).
    pub services: Vec<String>,
}

impl Proxy {
    /// Istio's default ingress gateway (`istio-system`, `istio: ingressgateway`).
    pub fn ingress_gateway() -> Proxy {
        Proxy {
            namespace: ROOT_NAMESPACE.to_owned(),
            labels: labels(&[("istio", "ingressgateway"), ("app", "istio-ingressgateway")]),
            listener: Listener::Gateway,
            services: Vec::new(),
        }
    }

    /// A workload's sidecar, seen from its outbound listener, in a mesh with these services.
    pub fn outbound(namespace: &str, workload_labels: &[(&str, &str)], services: &[&str]) -> Proxy {
        Proxy {
            namespace: namespace.to_owned(),
            labels: labels(workload_labels),
            listener: Listener::Outbound,
            services: services.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    /// A workload's sidecar, seen from its inbound listener.
    pub fn inbound(namespace: &str, workload_labels: &[(&str, &str)]) -> Proxy {
        Proxy {
            namespace: namespace.to_owned(),
            labels: labels(workload_labels),
            listener: Listener::Inbound,
            services: Vec::new(),
        }
    }

    fn listener_name(&self) -> &'static str {
        match self.listener {
            Listener::Gateway | Listener::Outbound => "0.0.0.0_8080",
            Listener::Inbound => "virtualInbound",
        }
    }

    fn node(&self) -> Value {
        let kind = if self.listener == Listener::Gateway { "router" } else { "sidecar" };
        let app = self.labels.get("app").map_or("workload", String::as_str);
        json!({
            "id": format!("{kind}~10.0.0.1~{app}-0.{ns}~{ns}.svc.cluster.local", ns = self.namespace),
            "cluster": format!("{app}.{}", self.namespace)
        })
    }
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
}

/// A WasmPlugin as the API server holds it, with its configuration as istiod converts it.
#[derive(Clone, Debug)]
pub struct WasmPlugin {
    pub namespace: String,
    pub name: String,
    spec: Value,
    /// The JSON istiod sends the plugin (a `StringValue`); None: no pluginConfig.
    pub configuration: Option<String>,
}

impl WasmPlugin {
    /// The name of the Wasm plugin configuration (Envoy's `wasm.<name>.*` stats).
    pub fn config_name(&self) -> String {
        format!("{}.{}~istio-translated-wasmplugin", self.namespace, self.name)
    }

    /// The ECDS resource name, also the HTTP filter's name.
    pub fn resource_name(&self) -> String {
        format!("extensions.istio.io/trafficextension/{}", self.config_name())
    }

    /// `failStrategy` as istiod maps it to the Wasm `failure_policy`.
    pub fn failure_policy(&self) -> Option<&'static str> {
        match self.spec.get("failStrategy").and_then(Value::as_str) {
            None => None,
            Some("FAIL_CLOSE") => Some("FAIL_CLOSED"),
            Some("FAIL_OPEN") => Some("FAIL_OPEN"),
            Some("FAIL_RELOAD") => Some("FAIL_RELOAD"),
            Some(other) => panic!("{}: unknown failStrategy {other}", self.name),
        }
    }

    /// Whether istiod would put this plugin on `proxy`'s listener under test: same namespace (or
    /// the root namespace), selector labels, and a `match` entry for the listener's mode and port.
    pub fn selects(&self, proxy: &Proxy) -> bool {
        assert!(
            self.spec.get("targetRefs").is_none() && self.spec.get("targetRef").is_none(),
            "targetRefs not emulated"
        );
        let namespace = self.namespace == proxy.namespace || self.namespace == ROOT_NAMESPACE;
        let selector = labels_match(&self.spec["selector"]["matchLabels"], &proxy.labels);
        let mode = match proxy.listener {
            Listener::Gateway | Listener::Outbound => "CLIENT",
            Listener::Inbound => "SERVER",
        };
        let matches = match self.spec["match"].as_array() {
            None => true,
            Some(list) if list.is_empty() => true,
            Some(list) => list.iter().any(|m| {
                let mode_ok = matches!(m["mode"].as_str(), None | Some("UNDEFINED") | Some("CLIENT_AND_SERVER"))
                    || m["mode"] == mode;
                let ports: Vec<u64> =
                    m["ports"].as_array().into_iter().flatten().filter_map(|p| p["number"].as_u64()).collect();
                mode_ok && (ports.is_empty() || ports.contains(&u64::from(PORT)))
            }),
        };
        namespace && selector && matches
    }

    /// The ECDS resource istiod sends (after the agent's rewrite to the local module).
    fn ecds_resource(&self) -> Value {
        let mut config = json!({
            "name": self.config_name(),
            "root_id": self.spec["pluginName"].as_str().unwrap_or_default(),
            "vm_config": {
                "runtime": "envoy.wasm.runtime.v8",
                "code": { "local": { "filename": wasm_path().to_string_lossy() } }
            }
        });
        if let Some(c) = &self.configuration {
            config["configuration"] = json!({ "@type": "type.googleapis.com/google.protobuf.StringValue", "value": c });
        }
        if let Some(policy) = self.failure_policy() {
            config["failure_policy"] = json!(policy);
        }
        json!({
            "@type": "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig",
            "name": self.resource_name(),
            "typed_config": { "@type": WASM_HTTP, "config": config }
        })
    }
}

/// An Envoy configured as istiod would configure `proxy`, in front of one upstream.
pub struct IstioEnvoy {
    envoy: Envoy,
    dir: PathBuf,
    plugins: Vec<WasmPlugin>,
}

impl std::ops::Deref for IstioEnvoy {
    type Target = Envoy;
    fn deref(&self) -> &Envoy {
        &self.envoy
    }
}

impl IstioEnvoy {
    /// Starts Envoy (2 workers) as `proxy` of `mesh`, every cluster pointing at `upstream`.
    pub async fn start(mesh: &Mesh, proxy: &Proxy, upstream: SocketAddr) -> IstioEnvoy {
        let dir = unique_dir("istio");
        let plugins = mesh.plugins_for(proxy);
        for p in &plugins {
            write_ecds(&dir, p);
        }
        let yaml = bootstrap(mesh, proxy, upstream, &dir, &plugins);
        let envoy = Envoy::try_start_yaml_listening(&yaml, 2, proxy.listener_name())
            .await
            .unwrap_or_else(|e| panic!("{e}\n--- bootstrap:\n{yaml}"));
        IstioEnvoy { envoy, dir, plugins }
    }

    /// The WasmPlugins on this proxy's listener, `<namespace>/<name>`.
    pub fn plugins(&self) -> Vec<String> {
        self.plugins.iter().map(|p| format!("{}/{}", p.namespace, p.name)).collect()
    }

    /// The WasmPlugins on this proxy's listener, in filter order.
    pub fn wasm_plugins(&self) -> &[WasmPlugin] {
        &self.plugins
    }

    /// Pushes a changed WasmPlugin through ECDS and waits until Envoy took it (Ok) or refused
    /// it (Err: the update was rejected; Envoy keeps the previous one).
    pub async fn push(&self, plugin: &WasmPlugin) -> Result<(), String> {
        assert!(self.plugins.iter().any(|p| p.resource_name() == plugin.resource_name()), "not on this proxy");
        let stat = |s: &str| format!("extension_config_discovery.http_filter.{}.{s}", plugin.resource_name());
        let seen = |stats: &BTreeMap<String, i64>| {
            (
                stats.get(&stat("update_success")).copied().unwrap_or(0),
                stats.get(&stat("update_rejected")).copied().unwrap_or(0),
            )
        };
        let before = seen(&self.envoy.stats().await);
        write_ecds(&self.dir, plugin);
        let after = poll(|| async { seen(&self.envoy.stats().await) }, |now| *now != before).await;
        if after.0 > before.0 {
            Ok(())
        } else if after.1 > before.1 {
            Err(tail(&self.envoy.log(), 20))
        } else {
            panic!("Envoy did not react to the ECDS update within 5s:\n{}", tail(&self.envoy.log(), 20))
        }
    }

    /// A request with this `:authority` over a new connection.
    pub async fn request_to(&self, host: &str, method: Method, path: &str) -> Reply {
        self.envoy.request(method, path, &[("host", host)]).await
    }

    /// Sends the request and says which Breakwater policy counted it: the policies any of whose
    /// counters moved (none for a request no route rule matched).
    pub async fn policy_of(&self, host: &str, method: Method, path: &str) -> (Reply, BTreeSet<String>) {
        // A previous request's counters may still be on their way (some are flushed on the tick):
        // start from counters that stay put for a while, or they are put on this request.
        let mut before = policy_counters(&self.envoy).await;
        let settle = std::time::Instant::now() + Duration::from_secs(3);
        loop {
            tokio::time::sleep(Duration::from_millis(150)).await;
            let again = policy_counters(&self.envoy).await;
            if again == before || std::time::Instant::now() > settle {
                before = again;
                break;
            }
            before = again;
        }
        let reply = self.request_to(host, method, path).await;
        // Counters move when the stream ends, just after the client has its answer.
        let moved = |now: &BTreeMap<String, i64>| -> BTreeSet<String> {
            now.iter()
                .filter(|(k, v)| before.get(*k).copied().unwrap_or(0) < **v)
                .filter_map(|(k, _)| k.split(".policy.").nth(1)?.split('.').next().map(str::to_owned))
                .collect()
        };
        let deadline = std::time::Instant::now() + Duration::from_millis(300);
        loop {
            let now = policy_counters(&self.envoy).await;
            let m = moved(&now);
            if !m.is_empty() || std::time::Instant::now() > deadline {
                return (reply, m);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Envoy's view of the ECDS-delivered Wasm filters (`/config_dump?resource=ecds_filters`).
    pub async fn ecds_config_dump(&self) -> Value {
        let (status, body) = crate::envoy::admin_get(self.envoy.admin(), "/config_dump?resource=ecds_filters")
            .await
            .expect("config_dump");
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).expect("config_dump JSON")
    }
}

impl Drop for IstioEnvoy {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Breakwater's per-policy counters, name → value: Envoy's counters (`type=Counters`, so no
/// gauge) whose name starts with `wasmcustom.breakwater` and names a policy.
async fn policy_counters(envoy: &Envoy) -> BTreeMap<String, i64> {
    let path = "/stats?format=json&type=Counters&filter=%5Ewasmcustom%5C.breakwater";
    let (status, body) = crate::envoy::admin_get(envoy.admin(), path).await.expect("GET /stats");
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).expect("stats JSON");
    v["stats"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| Some((s["name"].as_str()?.to_owned(), s["value"].as_i64()?)))
        .filter(|(k, _)| k.contains(".policy."))
        .collect()
}

fn ecds_path(dir: &Path, plugin: &WasmPlugin) -> PathBuf {
    dir.join(format!("ecds-{}.{}.json", plugin.namespace, plugin.name))
}

/// Writes the plugin's ECDS file atomically (Envoy reacts to the file being moved into place).
fn write_ecds(dir: &Path, plugin: &WasmPlugin) {
    let path = ecds_path(dir, plugin);
    let tmp = path.with_extension("tmp");
    let text = serde_json::to_string_pretty(&json!({ "resources": [plugin.ecds_resource()] })).expect("json");
    std::fs::write(&tmp, text).expect("write the ECDS file");
    std::fs::rename(&tmp, &path).expect("move the ECDS file into place");
}

fn bootstrap(mesh: &Mesh, proxy: &Proxy, upstream: SocketAddr, dir: &Path, plugins: &[WasmPlugin]) -> String {
    let (route_config_name, virtual_hosts) = mesh.route_config(proxy);
    let mut clusters: BTreeSet<String> = BTreeSet::new();
    for vh in &virtual_hosts {
        for r in vh["routes"].as_array().expect("routes") {
            clusters.insert(r["route"]["cluster"].as_str().expect("cluster").to_owned());
        }
    }
    let mut http_filters: Vec<Value> = plugins
        .iter()
        .map(|p| {
            json!({
                "name": p.resource_name(),
                "config_discovery": {
                    "config_source": {
                        "path_config_source": { "path": ecds_path(dir, p) },
                        "resource_api_version": "V3",
                        // istiod: block until the extension is there (it may be authn/authz).
                        "initial_fetch_timeout": "0s"
                    },
                    "type_urls": [WASM_HTTP, RBAC_HTTP]
                }
            })
        })
        .collect();
    http_filters.push(json!({
        "name": "envoy.filters.http.router",
        "typed_config": { "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router" }
    }));
    let direction = if proxy.listener == Listener::Inbound { "inbound" } else { "outbound" };
    let listener = json!({
        "name": proxy.listener_name(),
        "address": { "socket_address": { "address": "127.0.0.1", "port_value": 0 } },
        "filter_chains": [{ "filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": format!("{direction}_0.0.0.0_{PORT}"),
                "route_config": { "name": route_config_name, "virtual_hosts": virtual_hosts, "validate_clusters": false },
                "http_filters": http_filters
            }
        }]}]
    });
    let clusters: Vec<Value> = clusters
        .iter()
        .map(|name| {
            json!({
                "name": name,
                "type": "STATIC",
                "connect_timeout": "10s",
                // Istio's defaults: no limits from Envoy's own per-cluster circuit breakers.
                "circuit_breakers": { "thresholds": [{
                    "max_connections": 4294967295u64, "max_pending_requests": 4294967295u64,
                    "max_requests": 4294967295u64, "max_retries": 4294967295u64, "track_remaining": true
                }]},
                "load_assignment": {
                    "cluster_name": name,
                    "endpoints": [{ "lb_endpoints": [{ "endpoint": { "address": {
                        "socket_address": { "address": "127.0.0.1", "port_value": upstream.port() }
                    }}}]}]
                }
            })
        })
        .collect();
    let admin = json!({ "address": { "socket_address": { "address": "127.0.0.1", "port_value": 0 } } });
    format!(
        "node: {}\nadmin: {}\n{}static_resources: {}\n",
        proxy.node(),
        admin,
        shipped_stats_config(),
        json!({ "listeners": [listener], "clusters": clusters })
    )
}
