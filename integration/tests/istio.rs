//! The Istio recipes under envoy/istio/, run through Envoy 1.40 as istiod would configure each
//! proxy (see `integration::istio`): every policy applies on the routes it names and nowhere
//! else, and a changed pluginConfig pushed through ECDS keeps an open breaker open.

use std::collections::BTreeSet;

use hyper::Method;
use integration::envoy::OPEN;
use integration::istio::{IstioEnvoy, Mesh, Proxy};
use integration::start_upstream;
use integration::upstream::Upstream;

const RECIPES: [&str; 3] =
    ["envoy/istio/gateway.yaml", "envoy/istio/client-sidecars.yaml", "envoy/istio/server-sidecar.yaml"];

fn mesh() -> Mesh {
    Mesh::read(&RECIPES)
}

fn frontend() -> Proxy {
    Proxy::outbound("shop", &[("app", "frontend")], &["checkout", "payments"])
}

fn checkout() -> Proxy {
    Proxy::inbound("shop", &[("app", "checkout")])
}

fn one(policy: &str) -> BTreeSet<String> {
    BTreeSet::from([policy.to_owned()])
}

/// The test upstream, and Envoy as `proxy` of the recipes' mesh, which must carry `plugin` alone.
async fn start(proxy: &Proxy, plugin: &str) -> (Upstream, IstioEnvoy) {
    let up = start_upstream().await;
    let envoy = IstioEnvoy::start(&mesh(), proxy, up.addr()).await;
    assert_eq!(envoy.plugins(), [plugin]);
    (up, envoy)
}

/// Each (host, method, path) reaches the upstream and gets its 200.
async fn assert_passes(envoy: &IstioEnvoy, cases: &[(&str, Method, &str)]) {
    for (host, method, path) in cases {
        let r = envoy.request_to(host, method.clone(), path).await;
        assert!(r.from_upstream() && r.status == 200, "{method} {host}{path}: {r:?}");
    }
}

/// Sends each (host, method, path) and asserts the upstream answered and which policy counted it.
async fn assert_policies(envoy: &IstioEnvoy, cases: &[(&str, Method, &str, Option<&str>)]) {
    for (host, method, path, want) in cases {
        let (reply, got) = envoy.policy_of(host, method.clone(), path).await;
        assert!(reply.from_upstream() && reply.status == 200, "{method} {host}{path}: {reply:?}");
        let want: BTreeSet<String> = want.iter().map(|p| (*p).to_owned()).collect();
        assert_eq!(got, want, "{method} {host}{path}: counted under these policies");
    }
}

/// The shipped gateway recipe with one change (`from` must occur in it once).
fn gateway_recipe_with(from: &str, to: &str) -> String {
    let shipped = std::fs::read_to_string(integration::envoy::repo_root().join(RECIPES[0])).unwrap();
    assert_eq!(shipped.matches(from).count(), 1, "{from}");
    shipped.replace(from, to)
}

/// The change that gives the gateway recipe a bare `retry: { on: [...] }`, the YAML 1.1 trap of
/// issue 11: kubectl reads the key as `true`.
const BARE_ON: (&str, &str) =
    ("bulkhead: { max_concurrent: 50 }", "bulkhead: { max_concurrent: 50 }\n        retry: { on: [5xx] }");

/// Trips `policy` with `n` failing requests, one after another.
async fn trip(envoy: &IstioEnvoy, policy: &str, host: &str, method: Method, path: &str, n: usize) {
    for _ in 0..n {
        let (reply, got) = envoy.policy_of(host, method.clone(), path).await;
        assert_eq!((reply.status, got), (500, one(policy)), "{reply:?}");
    }
    let s = envoy.wait_tripped(policy, 1).await;
    assert_eq!(s.state, OPEN, "{policy}: {s:?}");
}

#[test]
fn each_proxy_gets_the_wasmplugin_of_its_placement_and_no_other() {
    let mesh = mesh();
    let on = |p: &Proxy| -> Vec<String> {
        mesh.plugins_for(p).iter().map(|w| format!("{}/{}", w.namespace, w.name)).collect()
    };
    assert_eq!(on(&Proxy::ingress_gateway()), ["istio-system/breakwater-gateway"]);
    assert_eq!(on(&frontend()), ["shop/breakwater-callers"]);
    assert_eq!(on(&checkout()), ["shop/breakwater-checkout"]);
    // The callers' plugin is outbound only, the server's inbound only.
    assert!(on(&Proxy::inbound("shop", &[("app", "frontend")])).is_empty());
    assert!(on(&Proxy::outbound("shop", &[("app", "checkout")], &["payments"])).is_empty());
    // A workload in another namespace gets none of them.
    assert!(on(&Proxy::outbound("other", &[("app", "frontend")], &["checkout.shop"])).is_empty());
    for p in mesh.wasm_plugins() {
        assert_eq!(p.failure_policy(), Some("FAIL_RELOAD"), "{}: every recipe uses FAIL_RELOAD", p.name);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn at_the_gateway_policies_follow_the_virtualservice_route_names() {
    let (_up, envoy) = start(&Proxy::ingress_gateway(), "istio-system/breakwater-gateway").await;

    // The Wasm filter Envoy runs is the one istiod sends: no vm_id, root_id = pluginName,
    // failStrategy FAIL_RELOAD as failure_policy.
    let dump = envoy.ecds_config_dump().await;
    let config = &dump["configs"][0]["ecds_filter"]["typed_config"]["config"];
    assert_eq!(config["root_id"], "breakwater", "{dump}");
    assert_eq!(config["failure_policy"], "FAIL_RELOAD", "{dump}");
    assert!(config["vm_config"].get("vm_id").is_none(), "{dump}");
    // Envoy's own Wasm stats carry the name istiod gives the plugin configuration.
    let name = envoy.wasm_plugins()[0].config_name();
    assert_eq!(name, "istio-system.breakwater-gateway~istio-translated-wasmplugin");
    assert!(envoy.stats().await.contains_key(&format!("wasm.{name}.vm_reload_success")), "{:?}", envoy.stats().await);

    let host = "shop.example.com";
    assert_policies(
        &envoy,
        &[
            (host, Method::GET, "/checkout/cart", Some("checkout")),
            (host, Method::POST, "/checkout", Some("checkout")),
            (host, Method::GET, "/search?q=boots", Some("search")),
            (host, Method::GET, "/catalog/boots", None),
            (host, Method::GET, "/", None),
        ],
    )
    .await;

    trip(&envoy, "checkout", host, Method::GET, "/checkout?status=500", 5).await;
    let r = envoy.request_to(host, Method::GET, "/checkout").await;
    assert!(r.is_circuit_open() && r.status == 503, "{r:?}");
    assert_eq!(r.header("x-shop"), Some("checkout-unavailable"));
    // Routes the open breaker does not govern still reach their upstreams.
    assert_passes(&envoy, &[(host, Method::GET, "/search"), (host, Method::GET, "/catalog"), (host, Method::GET, "/")])
        .await;
    // A host the Gateway does not serve never reaches a route.
    let r = envoy.request_to("other.example.com", Method::GET, "/checkout").await;
    assert_eq!(r.status, 404, "{r:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn on_the_callers_sidecars_policies_follow_route_names_and_outbound_clusters() {
    let (_up, envoy) = start(&frontend(), "shop/breakwater-callers").await;
    assert_policies(
        &envoy,
        &[
            // The VirtualService route place-order (POST /checkout…).
            ("checkout:8080", Method::POST, "/checkout", Some("place-order")),
            ("checkout.shop.svc.cluster.local", Method::POST, "/checkout/confirm", Some("place-order")),
            // Every other call to checkout, by its cluster outbound|8080||checkout.shop.svc.cluster.local.
            ("checkout:8080", Method::GET, "/checkout", Some("checkout")),
            ("checkout.shop", Method::GET, "/orders/1", Some("checkout")),
            // payments has no VirtualService: its route is `default`, its cluster not checkout's.
            ("payments:8080", Method::POST, "/checkout", None),
            // Any other host goes to allow_any (PassthroughCluster).
            ("api.example.org", Method::GET, "/", None),
        ],
    )
    .await;

    trip(&envoy, "place-order", "checkout:8080", Method::POST, "/checkout?status=500", 5).await;
    let r = envoy.request_to("checkout:8080", Method::POST, "/checkout").await;
    assert!(r.is_circuit_open(), "{r:?}");
    // Reads of checkout and calls to other services go on.
    assert_passes(&envoy, &[("checkout:8080", Method::GET, "/checkout"), ("payments:8080", Method::POST, "/checkout")])
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn on_the_server_sidecar_policies_follow_path_method_and_host() {
    let (_up, envoy) = start(&checkout(), "shop/breakwater-checkout").await;
    // Every request here takes the route `default` to cluster `inbound|8080||`.
    assert_policies(
        &envoy,
        &[
            ("checkout:8080", Method::POST, "/checkout", Some("place-order")),
            ("checkout.shop.svc.cluster.local:8080", Method::POST, "/checkout/confirm", Some("place-order")),
            ("checkout:8080", Method::GET, "/checkout", None),
            ("checkout:8080", Method::POST, "/cart", None),
            // Through the gateway the Host is the public one; the first matching rule wins.
            ("shop.example.com", Method::GET, "/checkout", Some("public")),
            ("shop.example.com", Method::POST, "/checkout", Some("place-order")),
        ],
    )
    .await;

    trip(&envoy, "place-order", "checkout:8080", Method::POST, "/checkout?status=500", 5).await;
    let r = envoy.request_to("shop.example.com", Method::POST, "/checkout").await;
    assert!(r.is_circuit_open(), "{r:?}");
    assert_passes(
        &envoy,
        &[
            ("checkout:8080", Method::GET, "/checkout"),
            ("checkout:8080", Method::POST, "/cart"),
            ("shop.example.com", Method::GET, "/"),
        ],
    )
    .await;
}

/// istiod pushes a changed WasmPlugin as a new ECDS resource: Envoy gives the plugin a new
/// configuration, and the breaker state in shared data carries over. A configuration the plugin
/// refuses (the YAML 1.1 trap of issue 11) is rejected whole and the last good one stays.
#[tokio::test(flavor = "multi_thread")]
async fn a_changed_plugin_config_pushed_through_ecds_keeps_an_open_breaker() {
    let (_up, envoy) = start(&Proxy::ingress_gateway(), "istio-system/breakwater-gateway").await;
    let host = "shop.example.com";
    trip(&envoy, "checkout", host, Method::GET, "/checkout?status=500", 5).await;

    let changed = |(from, to): (&str, &str)| {
        Mesh::from_text(&gateway_recipe_with(from, to)).wasm_plugin("istio-system/breakwater-gateway")
    };

    // The reject status changes from 503 to 429.
    envoy.push(&changed(("status: 503", "status: 429"))).await.expect("Envoy takes the changed WasmPlugin");
    let r = envoy.request_to(host, Method::GET, "/checkout").await;
    assert!(r.is_circuit_open(), "the breaker is still open after the push: {r:?}");
    assert_eq!(r.status, 429, "and the new configuration answers: {r:?}");
    assert_eq!(envoy.policy("checkout").await.state, OPEN);

    // A bare `on:` key, as kubectl reads it, is refused with the reason, and nothing changes.
    let bad = changed(BARE_ON);
    assert!(bad.configuration.as_deref().unwrap().contains(r#""retry":{"true":["5xx"]}"#), "{:?}", bad.configuration);
    let log = envoy.push(&bad).await.expect_err("Envoy rejects a configuration the plugin refuses");
    assert!(log.contains("policies.search.retry.true: unknown key"), "{log}");
    let r = envoy.request_to(host, Method::GET, "/checkout").await;
    assert_eq!((r.is_circuit_open(), r.status), (true, 429), "the last good configuration stays: {r:?}");
    assert_passes(&envoy, &[(host, Method::GET, "/search")]).await;
    assert!(!envoy.log().contains("panicked"), "{}", envoy.log());
}

/// What a pluginConfig the plugin refuses does to a proxy that had no earlier configuration (a
/// new pod, or a pod the WasmPlugin newly selects): Envoy rejects the ECDS resource and, with
/// no filter configuration at all, answers every request on the listener with a 500, whatever
/// the failStrategy. Hence: run `make yaml-contract istio-crds` on a manifest before applying it.
#[tokio::test(flavor = "multi_thread")]
async fn a_refused_plugin_config_on_a_new_proxy_fails_every_request_of_its_listener() {
    let up = start_upstream().await;
    let bad = Mesh::from_text(&gateway_recipe_with(BARE_ON.0, BARE_ON.1));
    let envoy = IstioEnvoy::start(&bad, &Proxy::ingress_gateway(), up.addr()).await;
    let resource = envoy.wasm_plugins()[0].resource_name();
    let rejected =
        envoy.wait_stat(&format!("extension_config_discovery.http_filter.{resource}.update_rejected"), 1).await;
    assert_eq!(rejected, 1);
    for path in ["/checkout", "/search", "/catalog"] {
        let r = envoy.request_to("shop.example.com", Method::GET, path).await;
        assert_eq!((r.status, r.from_upstream()), (500, false), "{path}: {r:?}");
    }
    assert_eq!(up.stats().requests, 0, "nothing reached the upstream");
    assert!(envoy.log().contains("policies.search.retry.true: unknown key"), "{}", envoy.log());
}
