//! Fallbacks in Envoy 1.40 (2 workers): what a request the open breaker refuses gets instead of
//! the reject reply — the last good response from the cache, a static answer, or the answer of
//! another cluster — and the cache's bounds. The policies are the README's example.

use bytes::Bytes;
use hyper::Method;
use integration::envoy::{admin_get, repo_root, Envoy, Spec};
use integration::start_upstream;
use serde_json::{json, Value};
use std::time::Duration;

/// `cache-control: no-store` on the upstream's answer (the upstream's `raw_header=name:hex`).
const NO_STORE: &str = "raw_header=cache-control:6e6f2d73746f7265";
/// `age: 100` on the upstream's answer.
const AGED: &str = "/catalog/aged?raw_header=age:313030";
/// An empty body with `content-type: application/json`.
const EMPTY_JSON: &str = "/catalog/empty?body_bytes=0&raw_header=content-type:6170706c69636174696f6e2f6a736f6e";

/// The policies of the README's Fallbacks example (its first YAML block).
fn readme_policies() -> Value {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).expect("README.md");
    let section = &readme[readme.find("\n## Fallbacks\n").expect("a Fallbacks section")..];
    let block = section.split("```yaml\n").nth(1).and_then(|b| b.split("```").next()).expect("a YAML block");
    let config: Value = serde_yaml::from_str(block).expect("the example is YAML");
    assert!(breakwater::config::parse(config.to_string().as_bytes()).is_ok(), "the plugin takes the example");
    config["policies"].clone()
}

/// Failures that trip `policy`'s breaker.
fn trip_after(policy: &Value) -> u64 {
    policy["circuit_breaker"]["consecutive_failures"].as_u64().expect("consecutive_failures")
}

fn fallback_stat(policy: &str, kind: &str, result: &str) -> String {
    format!("wasmcustom.breakwater_fallback_total.policy.{policy}.kind.{kind}.result.{result}")
}

#[tokio::test(flavor = "multi_thread")]
async fn while_open_a_cached_answer_is_served_a_miss_gets_the_static_one_and_no_store_is_never_cached() {
    let up = start_upstream().await;
    let catalog = readme_policies()["catalog"].clone();
    let failures = trip_after(&catalog);
    let spec = Spec::one_route_per_policy(up.addr(), json!({ "catalog": catalog }));
    let envoy = Envoy::start(&spec.control(json!({ "control": {} }))).await;
    let good = envoy.get("/catalog/items?page=2").await;
    assert_eq!((good.status, good.from_upstream()), (200, true));
    let private = envoy.get(&format!("/catalog/private?{NO_STORE}")).await;
    assert_eq!(private.header("cache-control"), Some("no-store"));
    assert_eq!(envoy.get(AGED).await.header("age"), Some("100"));
    assert_eq!(envoy.get(EMPTY_JSON).await.header("content-type"), Some("application/json"));
    for _ in 0..failures {
        assert_eq!(envoy.get("/catalog/boom?status=500").await.status, 500);
    }
    envoy.wait_tripped("catalog", 1).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let before = up.stats().requests;

    let hit = envoy.get("/catalog/items?page=2").await;
    assert_eq!((hit.status, hit.header("x-breakwater")), (200, Some("fallback-cache")), "{hit:?}");
    assert_eq!(hit.body, good.body, "the last good response");
    assert_eq!(hit.header("x-upstream-seq"), good.header("x-upstream-seq"), "its headers too");
    let age: u64 = hit.header("age").expect("an age").parse().unwrap();
    assert!((1..=3).contains(&age), "stored over a second ago: age {age}");
    assert_eq!(good.header("content-type"), None);
    assert_eq!(
        hit.header("content-type"),
        None,
        "as stored: Envoy's local reply adds text/plain, Breakwater takes it off"
    );
    let head = envoy.request(Method::HEAD, "/catalog/items?page=2", &[]).await;
    assert_eq!((head.status, head.header("x-breakwater"), head.body.as_str()), (200, Some("fallback-cache"), ""));
    assert_eq!(head.header("content-type"), None);
    // The upstream's Age counts (RFC 9111 §5.1), and an empty body keeps its content-type.
    let aged = envoy.get(AGED).await;
    assert_eq!(aged.header("x-breakwater"), Some("fallback-cache"));
    let age: u64 = aged.header("age").expect("an age").parse().unwrap();
    assert!((101..=103).contains(&age), "the upstream's 100 plus the time since: age {age}");
    let empty = envoy.get(EMPTY_JSON).await;
    assert_eq!(
        (empty.header("x-breakwater"), empty.header("content-type"), empty.body.as_str()),
        (Some("fallback-cache"), Some("application/json"), "")
    );
    for miss in [format!("/catalog/private?{NO_STORE}"), "/catalog/items?page=3".into()] {
        let r = envoy.get(&miss).await;
        assert_eq!((r.status, r.header("x-breakwater")), (200, Some("fallback-static")), "{miss}: {r:?}");
        assert_eq!(
            (r.header("content-type"), r.body.as_str()),
            (Some("application/json"), "{\"items\":[],\"degraded\":true}")
        );
    }
    assert_eq!(up.stats().requests, before, "the failing upstream was not contacted");
    let stats = envoy.settled(|| envoy.stats_matching("breakwater_(fallback|rejections)_total")).await;
    let stat = |kind, result| stats.get(&fallback_stat("catalog", kind, result)).copied().unwrap_or(-1);
    assert_eq!((stat("cache", "served"), stat("cache", "missed")), (4, 2), "{stats:?}");
    assert_eq!((stat("static", "served"), stat("static", "missed")), (2, 0));
    assert_eq!(stats.get("wasmcustom.breakwater_rejections_total.policy.catalog.reason.circuit_open"), Some(&6));
    let (_, status) = envoy.control(Method::GET, "/breakwater/status/catalog").await;
    assert_eq!(
        status["policies"]["catalog"]["fallback"],
        json!({ "static": { "served": 2, "missed": 0 }, "cache": { "served": 4, "missed": 2 } }),
        "{status}"
    );
    let prom = envoy.prometheus().await;
    assert!(
        prom.contains(r#"breakwater_fallback_total{policy="catalog",kind="cache",result="served"} 4"#),
        "the shipped tag extractors give kind and result labels:\n{}",
        prom.lines().filter(|l| l.contains("fallback")).collect::<Vec<_>>().join("\n")
    );
}

/// The bytes Envoy has allocated now (its admin `/memory`, read live; the
/// `server.memory_allocated` stat is refreshed only every stats flush).
async fn allocated(envoy: &Envoy) -> i64 {
    let (_, body) = admin_get(envoy.admin(), "/memory").await.expect("GET /memory");
    let v: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    v["allocated"].as_str().and_then(|n| n.parse().ok()).expect("allocated")
}

#[tokio::test(flavor = "multi_thread")]
async fn ten_thousand_distinct_keys_keep_the_cache_within_max_entries() {
    let up = start_upstream().await;
    let policy = json!({ "bounded": {
        "circuit_breaker": { "consecutive_failures": 1, "open_for": "1h" },
        "fallback": { "cache": { "max_entries": 100, "max_body": "1KiB" } }
    }});
    let envoy = Envoy::start(&Spec::one_route_per_policy(up.addr(), policy)).await;
    let conns = envoy.conns_per_worker(2, 4).await;
    let send = |from: usize| {
        let conns = &conns;
        let sends = conns.iter().flatten().enumerate().map(move |(c, conn)| async move {
            for i in (from + c..from + 10_000).step_by(8) {
                let r = conn.get(&format!("/bounded/item/{i}?body_bytes=512")).await;
                assert_eq!(r.status, 200);
            }
        });
        futures::future::join_all(sends)
    };
    // A first 10 000 keys fill the slots; the next 10 000 only replace entries: the memory Envoy
    // has allocated stays put (unbounded, they would take 10 000 × 800 bytes more).
    send(0).await;
    let before = allocated(&envoy).await;
    let started = std::time::Instant::now();
    send(10_000).await;
    let took = started.elapsed();
    let grew = allocated(&envoy).await - before;
    assert!(grew < 1_000_000, "10 000 more keys grew Envoy's memory by {grew} bytes");
    // At most max_entries keys answer from the cache: the slots hold the last keys stored in them.
    assert_eq!(envoy.get("/bounded/boom?status=500").await.status, 500);
    envoy.wait_tripped("bounded", 1).await;
    let mut hits = 0;
    for i in 19_000..20_000 {
        let r = conns[i % 2][0].get(&format!("/bounded/item/{i}?body_bytes=512")).await;
        hits += usize::from(r.header("x-breakwater") == Some("fallback-cache"));
    }
    assert!((1..=100).contains(&hits), "{hits} of the last 1000 keys answered from the cache");
    eprintln!("10 000 distinct keys through a cached policy in {took:?}; memory grew {grew} bytes; {hits} hits");
}

#[tokio::test(flavor = "multi_thread")]
async fn while_open_a_post_goes_to_the_fallback_cluster_with_its_body_intact() {
    let up = start_upstream().await;
    let backup = start_upstream().await;
    let payments = readme_policies()["payments"].clone();
    let failures = trip_after(&payments);
    let policies = json!({
        "payments": payments,
        "unrouted": { "circuit_breaker": { "consecutive_failures": 1, "open_for": "1h" },
                      "fallback": { "cluster": "no-such-route" } },
        "ghost": { "circuit_breaker": { "consecutive_failures": 1, "open_for": "1h" },
                   "fallback": { "cluster": "no-such-cluster" } }
    });
    let spec = Spec::one_route_per_policy(up.addr(), policies)
        .cluster("payments-backup", backup.addr())
        .fallback_route("payments-backup")
        .fallback_route("no-such-cluster")
        .unknown_clusters();
    let envoy = Envoy::start(&spec).await;
    for _ in 0..failures {
        assert_eq!(envoy.get("/payments/charge?status=503").await.status, 503);
    }
    envoy.wait_tripped("payments", 1).await;
    let primary = up.stats().requests;

    let body: String =
        (0..200_000u32).map(|i| char::from(b'a' + (i.wrapping_mul(2_654_435_761) >> 24) as u8 % 26)).collect();
    let r = envoy
        .h2_request(
            Method::POST,
            "/payments/charge?echo=1",
            &[("content-type", "application/octet-stream")],
            Bytes::from(body.clone()),
        )
        .await;
    assert_eq!((r.status, r.header("x-breakwater")), (200, Some("fallback-cluster")), "{:?}", r.headers);
    assert!(r.body == body, "the backup echoed the body unchanged ({} of {} bytes back)", r.body.len(), body.len());
    assert_eq!(backup.stats().by_path.get("/payments/charge"), Some(&1), "the backup got it");
    assert_eq!(up.stats().by_path.get("/payments/charge"), Some(&failures), "only the failures that tripped it");
    assert_eq!(up.stats().requests, primary, "the failing upstream was not contacted");
    let served = envoy.wait_stat(&fallback_stat("payments", "cluster", "served"), 1).await;
    assert_eq!(served, 1);

    // Without a route that matches the filter state, the request stays on its route: the
    // limit the README states (the route configuration must carry the fallback route). The
    // failing upstream answered: missed, unmarked, and a warning names the cluster.
    assert_eq!(envoy.get("/unrouted/x?status=503").await.status, 503);
    envoy.wait_tripped("unrouted", 1).await;
    let r = envoy.get("/unrouted/y").await;
    assert_eq!((r.status, r.from_upstream(), r.header("x-breakwater")), (200, true, None), "{:?}", r.headers);
    assert_eq!(envoy.wait_stat(&fallback_stat("unrouted", "cluster", "missed"), 1).await, 1);
    // A route to a cluster Envoy does not have: Envoy's own 503 (NC), missed and unmarked too.
    assert_eq!(envoy.get("/ghost/x?status=503").await.status, 503);
    envoy.wait_tripped("ghost", 1).await;
    let r = envoy.get("/ghost/y").await;
    assert_eq!((r.status, r.from_upstream(), r.header("x-breakwater")), (503, false, None), "{:?}", r.headers);
    assert_eq!(envoy.wait_stat(&fallback_stat("ghost", "cluster", "missed"), 1).await, 1);
    let stats = envoy.settled(|| envoy.stats_matching("breakwater_fallback_total")).await;
    for policy in ["unrouted", "ghost"] {
        assert_eq!(stats.get(&fallback_stat(policy, "cluster", "served")), Some(&0), "{policy}: {stats:?}");
    }
    let log = envoy.log();
    for warning in [
        "policy unrouted: fallback cluster no-such-route: request answered by cluster ",
        "policy ghost: fallback cluster no-such-cluster: request answered by no cluster",
    ] {
        assert_eq!(log.matches(warning).count(), 1, "{warning}: once per policy and configuration:\n{log}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_fallback_is_refused_whole_with_its_path() {
    let (ok, out) = Envoy::validate(
        &Spec::one_route_per_policy(
            "127.0.0.1:1".parse().unwrap(),
            json!({ "p": { "circuit_breaker": {}, "fallback": { "cache": { "max_entries": 100000, "max_body": "1024KiB" } } } }),
        )
        .yaml(),
    );
    assert!(!ok);
    assert!(
        out.contains(
            "policies.p.fallback.cache: max_entries × (max_body + 10KiB of key and headers) must be at most 256MiB"
        ),
        "{out}"
    );
}
