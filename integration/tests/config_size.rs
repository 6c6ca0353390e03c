//! A large configuration in Envoy 1.40 (2 workers): 20 000 policies and 20 000 route rules, one
//! Envoy route each, pushed to a running Envoy as a new listener (as a control plane would).
//! The test checks that the configuration works (the last rule's policy trips on its own route,
//! a route of the old configuration keeps flowing); it prints how long the push took and the
//! slowest request of a steady stream meanwhile, which the README quotes. Nothing here depends
//! on the machine's speed.

use integration::envoy::{Envoy, Spec};
use integration::start_upstream;
use serde_json::{json, Map, Value};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const N: usize = 20_000;

fn spec(up: std::net::SocketAddr, n: usize, lds: Option<Spec>) -> Spec {
    let mut policies = Map::new();
    let mut rules = Vec::new();
    policies.insert("hot".into(), json!({ "circuit_breaker": { "consecutive_failures": 5 } }));
    rules.push(json!({ "match": { "route_name": "hot" }, "policy": "hot" }));
    for i in 0..n {
        policies
            .insert(format!("p{i}"), json!({ "circuit_breaker": { "consecutive_failures": 3, "open_for": "30s" } }));
        rules.push(json!({ "match": { "route_name": format!("r{i}") }, "policy": format!("p{i}") }));
    }
    let plugin = json!({ "policies": Value::Object(policies), "routes": rules });
    // The same LDS file (and port) when this is the reload of `lds`.
    let mut spec = match lds {
        Some(s) => s.plugin(plugin).without_routes(),
        None => Spec::new(up).reloadable().plugin(plugin),
    };
    spec = spec.route("hot", "/hot", "backend");
    for i in 0..n {
        spec = spec.route(&format!("r{i}"), &format!("/r/{i}/"), "backend");
    }
    spec
}

#[tokio::test(flavor = "multi_thread")]
async fn twenty_thousand_policies_and_routes_apply_and_work_while_traffic_flows() {
    let up = start_upstream().await;
    let small = spec(up.addr(), 1, None);
    let envoy = Arc::new(Envoy::start(&small).await);

    // A steady stream on each worker, timing every request.
    let stop = Arc::new(AtomicBool::new(false));
    let mut streams = Vec::new();
    // Each request on a new connection: the push replaces the listener, and Envoy drains the
    // old one's connections.
    for _ in 0..2 {
        let stop = stop.clone();
        let envoy = envoy.clone();
        streams.push(tokio::spawn(async move {
            let (mut n, mut slowest, mut failed) = (0u32, Duration::ZERO, 0u32);
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                let r = envoy.get("/hot").await;
                slowest = slowest.max(t.elapsed());
                n += 1;
                failed += u32::from(r.status != 200);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (n, slowest, failed)
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    let big = spec(up.addr(), N, Some(small.clone()));
    let t = Instant::now();
    envoy.reload_within(&big, Duration::from_secs(300)).await;
    let applied = t.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let mut slowest = Duration::ZERO;
    for s in streams {
        let (n, slow, failed) = s.await.unwrap();
        assert!(n > 0);
        assert_eq!(failed, 0, "every request of the steady stream got its 200");
        slowest = slowest.max(slow);
    }
    eprintln!(
        "config size: {N} policies and {N} route rules (one Envoy route each) applied in {:.2}s; \
         the slowest /hot request meanwhile took {:.0}ms",
        applied.as_secs_f64(),
        slowest.as_secs_f64() * 1000.0
    );

    // The last rule's policy is in force on its own route, and only there.
    let last = N - 1;
    for _ in 0..3 {
        let r = envoy.get(&format!("/r/{last}/x?status=500")).await;
        assert_eq!((r.status, r.from_upstream()), (500, true), "{r:?}");
    }
    let opened = format!("wasmcustom.breakwater_transitions_total.policy.p{last}.to_state.open");
    assert_eq!(envoy.wait_stat(&opened, 1).await, 1, "p{last} tripped");
    assert!(envoy.get(&format!("/r/{last}/x")).await.is_circuit_open());
    assert!(envoy.get("/r/0/x").await.from_upstream(), "p0 is another breaker");
    assert!(envoy.get("/hot").await.from_upstream());
}
