//! A new plugin configuration pushed to a running Envoy (as a control plane or Istio would, here
//! through a watched LDS file): requests waiting in a bulkhead queue under the old configuration
//! are still woken and accounted, permits do not leak, an open breaker stays open, and new
//! requests get the new limits.

use std::time::Duration;

use integration::envoy::{Envoy, Spec, OPEN};
use integration::start_upstream;
use serde_json::{json, Value};

fn plugin(max_concurrent: u32) -> Value {
    json!({
        "policies": {
            "p": { "bulkhead": { "max_concurrent": max_concurrent, "queue": { "max_size": 10, "timeout": "5s" } } },
            "b": { "circuit_breaker": { "consecutive_failures": 2, "open_for": "30s" } }
        },
        "routes": [
            { "match": { "route_name": "p" }, "policy": "p" },
            { "match": { "route_name": "b" }, "policy": "b" }
        ]
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn a_configuration_change_keeps_waiters_permits_and_breakers() {
    let up = start_upstream().await;
    let spec = Spec::new(up.addr()).route("p", "/p", "backend").route("b", "/b", "backend").reloadable();
    let envoy = Envoy::start(&spec.clone().plugin(plugin(1))).await;

    // Under the first configuration: the breaker of b opens; p's one permit is held and a second
    // request waits for it.
    for r in envoy.send_recorded("b", "/b?status=500", 2).await {
        assert_eq!(r.status, 500, "{r:?}");
    }
    assert_eq!(envoy.wait_tripped("b", 1).await.state, OPEN);
    let addr = envoy.listener();
    let get = |path: &'static str| tokio::spawn(async move { integration::envoy::Call::get(path).send(addr).await });
    let holder = get("/p?delay_ms=1500&id=holder");
    envoy.wait_bulkhead("p", |b| b.active == 1).await;
    let waiter = get("/p?id=waiter");
    let b = envoy.wait_bulkhead("p", |b| b.queued == 1).await;
    assert_eq!((b.active, b.queued), (1, 1), "{b:?}");

    // The new configuration allows 2 at once.
    envoy.reload(&spec.clone().plugin(plugin(2))).await;

    // The breaker is the same breaker: still open.
    let r = envoy.get("/b").await;
    assert!(r.is_circuit_open(), "an open breaker stays open across a configuration change: {r:?}");

    // The waiter from before the change is woken when the holder finishes.
    let holder = holder.await.unwrap().expect("holder answered");
    let waiter = waiter.await.unwrap().expect("waiter answered");
    assert_eq!((holder.status, waiter.status), (200, 200), "{holder:?} {waiter:?}");
    let log = up.stats().arrivals;
    let at =
        |id: &str| log.iter().find(|a| a.id == id).unwrap_or_else(|| panic!("{id} never arrived: {log:?}")).clone();
    assert!(at("waiter").arrived_us >= at("holder").finished_us, "the waiter went only after the holder");

    // New requests get the new limit: two slow ones run at once.
    up.reset_stats();
    let slow = [get("/p?delay_ms=300"), get("/p?delay_ms=300"), get("/p?delay_ms=300")];
    for t in slow {
        assert_eq!(t.await.unwrap().expect("answered").status, 200);
    }
    assert_eq!(up.stats().max_in_flight, 2, "the new max_concurrent");

    let b = envoy.wait_bulkhead("p", |b| b.active == 0 && b.queued == 0).await;
    assert_eq!((b.active, b.queued), (0, 0), "no permit left behind: {b:?}");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!envoy.log().contains("panicked"), "{}", envoy.log());
}

/// A stream that outlives a configuration change by longer than the 10 s after which a silent
/// worker's permits are reclaimed keeps its permit, so the limit still holds. (In this run the
/// old root context keeps ticking while its stream lives; the worker renews its permits from
/// whichever root context ticks, which also covers an old one retired early.)
#[tokio::test(flavor = "multi_thread")]
async fn a_long_stream_keeps_its_permit_across_a_configuration_change() {
    let up = start_upstream().await;
    // The route's timeout must outlast the stream (the harness default is 5 s).
    let spec = Spec::new(up.addr()).route_with_timeout("p", "/p", "backend", Duration::from_secs(30)).reloadable();
    let config = |queue: bool| {
        let mut bulkhead = json!({ "max_concurrent": 1 });
        if queue {
            bulkhead["queue"] = json!({ "max_size": 1, "timeout": "100ms" });
        }
        json!({ "policies": { "p": { "bulkhead": bulkhead } }, "routes": [{ "match": { "route_name": "p" }, "policy": "p" }] })
    };
    let envoy = Envoy::start(&spec.clone().plugin(config(false))).await;
    let addr = envoy.listener();
    let long = tokio::spawn(async move { integration::envoy::Call::get("/p?delay_ms=12000").send(addr).await });
    envoy.wait_bulkhead("p", |b| b.active == 1).await;
    envoy.reload(&spec.clone().plugin(config(true))).await;
    tokio::time::sleep(Duration::from_millis(11_000)).await;
    let r = envoy.get("/p").await;
    assert!(r.is_queue_timeout(), "11 s later the long stream still holds the only permit: {r:?}");
    assert_eq!(up.stats().max_in_flight, 1);
    assert_eq!(long.await.unwrap().expect("answered").status, 200);
    let b = envoy.wait_bulkhead("p", |b| b.active == 0).await;
    assert_eq!((b.active, b.queued), (0, 0), "{b:?}");
}
