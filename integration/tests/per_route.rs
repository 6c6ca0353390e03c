//! Per-route filter instances (one disabled Breakwater filter per policy, enabled on its routes
//! with `typed_per_filter_config`), the cheap way to attach Breakwater in plain Envoy: the same
//! guarantees as one filter with route rules, in Envoy 1.40 with 2 workers.

use futures::future::join_all;
use hyper::Method;
use integration::envoy::{Attach, Call, Envoy, Spec, OPEN};
use integration::{setup_per_route, start_upstream};
use serde_json::{json, Value};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread")]
async fn each_instance_trips_on_its_own_route_across_workers() {
    let (up, envoy) = setup_per_route(json!({
        "a": { "circuit_breaker": { "consecutive_failures": 4, "open_for": "10s" } },
        "b": { "circuit_breaker": { "consecutive_failures": 4, "open_for": "10s" } }
    }))
    .await;
    let conns = envoy.conn_per_worker(2).await;
    for i in 0..4 {
        let r = conns[i % 2].get("/a?status=500").await;
        assert_eq!((r.status, r.from_upstream()), (500, true));
    }
    envoy.wait_tripped("a", 1).await;
    let s = envoy.wait_policy("a", |s| s.failure == 4).await;
    assert_eq!((s.to_open, s.state, s.failure), (1, OPEN, 4), "4 failures over both workers: {s:?}");
    for c in &conns {
        assert!(c.get("/a").await.is_circuit_open());
        let r = c.get("/b").await;
        assert_eq!((r.status, r.from_upstream()), (200, true), "b is another instance, another breaker: {r:?}");
    }
    assert_eq!(up.stats().by_path.get("/a"), Some(&4));
}

#[tokio::test(flavor = "multi_thread")]
async fn at_the_limit_nobody_is_refused_while_a_permit_idles_in_another_workers_lease() {
    // 4 permits, no queue. Worker 0 takes a lease and goes idle; worker 1 then needs all 4.
    let (up, envoy) = setup_per_route(json!({ "p": { "bulkhead": { "max_concurrent": 4 } } })).await;
    let conns = envoy.conns_per_worker(2, 5).await;
    let (w0, w1) = (&conns[0], &conns[1]);
    for round in 0..5 {
        assert_eq!(w0[0].get("/p").await.status, 200, "worker 0 leases a permit and leaves it idle");
        let four: Vec<_> = (0..4).map(|i| w1[i].request(Method::GET, "/p?delay_ms=300", &[])).collect();
        let replies = join_all(four).await;
        assert!(
            replies.iter().all(|r| r.status == 200 && r.from_upstream()),
            "round {round}: 4 requests for 4 permits, none refused: {:?}",
            replies.iter().map(|r| (r.status, r.header("x-breakwater").map(str::to_owned))).collect::<Vec<_>>()
        );
        // A fifth at once is one too many, however the permits are spread.
        let five: Vec<_> = (0..5).map(|i| w1[i].request(Method::GET, "/p?delay_ms=300", &[])).collect();
        let replies = join_all(five).await;
        let refused = replies.iter().filter(|r| r.is_bulkhead_full()).count();
        assert_eq!(refused, 1, "round {round}: {replies:?}");
    }
    assert_eq!(up.stats().max_in_flight, 4, "never more than max_concurrent at the upstream");
    // Where all 4 permits were taken with one idle in worker 0's lease, the last of the four got
    // it through a recall (it waited for it, briefly) rather than a refusal.
    let b = envoy.wait_bulkhead_idle("p").await;
    assert!(b.waited >= 1, "a recall happened: {b:?}");
    assert_eq!(b.full, 5, "one refusal per round of five, none in the rounds of four: {b:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_limit_holds_exactly_under_a_flood_over_both_workers() {
    let (up, envoy) = setup_per_route(
        json!({ "p": { "bulkhead": { "max_concurrent": 8, "queue": { "max_size": 100, "timeout": "5s" } } } }),
    )
    .await;
    let calls = (0..300).map(|_| Call::get("/p?delay_ms=20")).collect();
    let replies = envoy.send_all(64, calls).await;
    assert!(replies.iter().flatten().all(|r| r.status == 200), "everyone waits their turn");
    assert_eq!(up.stats().max_in_flight, 8, "max_concurrent reached, never exceeded");
    let b = envoy.wait_bulkhead_idle("p").await;
    assert_eq!((b.active, b.queued, b.admitted), (0, 0, 300), "{b:?}");
}

/// The route's own retry policy, budgeted by an instance that sets no header on a request the
/// budget allows; the attempt count comes from the response, and is stripped from it.
#[tokio::test(flavor = "multi_thread")]
async fn the_routes_own_retry_policy_is_budgeted_and_the_attempt_count_stays_inside() {
    let up = start_upstream().await;
    let plugin = json!({
        "policies": { "p": { "retry": { "max_retries": 3, "budget": { "ratio": 0, "min_per_second": 1, "ttl": "10s" } } } },
        "routes": [{ "match": { "route_name": "budgeted" }, "policy": "p" }]
    });
    let spec = Spec::new(up.addr())
        .plugin(plugin)
        .attach(Attach::PerRoute)
        .attempt_count_in_response()
        .route_with_retry_policy("budgeted", "/budgeted", "5xx", 3)
        .route_with_retry_policy("free", "/free", "5xx", 3);
    let envoy = Envoy::start(&spec).await;
    let healthy = envoy.get("/budgeted").await;
    assert_eq!(healthy.header("x-envoy-attempt-count"), None, "stripped on a Breakwater route: {healthy:?}");
    assert_eq!(envoy.get("/free").await.header("x-envoy-attempt-count"), Some("1"), "untouched elsewhere");
    let calls = (0..30).map(|_| Call::get("/budgeted?status=503")).collect();
    envoy.send_all(8, calls).await;
    assert_eq!(
        up.stats().by_path.get("/budgeted"),
        Some(&(1 + 30 + 10)),
        "30 requests within a budget of 10 retries (1/s × 10s), plus the healthy one"
    );
    let retries = envoy.wait_stat("wasmcustom.breakwater_retries_total.policy.p", 10).await;
    assert_eq!(retries, 10);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_route_that_enables_no_instance_is_not_seen() {
    let up = start_upstream().await;
    let plugin = json!({
        "policies": { "p": { "circuit_breaker": { "consecutive_failures": 1 } } },
        "routes": [{ "match": { "route_name": "p" }, "policy": "p" }]
    });
    let spec = Spec::new(up.addr())
        .plugin(plugin)
        .attach(Attach::PerRoute)
        .route("p", "/p", "backend")
        .route("other", "/other", "backend");
    let envoy = Envoy::start(&spec).await;
    for _ in 0..3 {
        assert_eq!(envoy.get("/other?status=500").await.status, 500);
    }
    assert_eq!(envoy.get("/p").await.status, 200, "the other route's failures are not p's");
    let s = envoy.wait_policy("p", |s| s.success == 1).await;
    assert_eq!((s.success, s.failure, s.ignored), (1, 0, 0), "{s:?}");
}

fn instances(max_concurrent: u32, body: &str) -> Value {
    json!({
        "policies": {
            "p": { "bulkhead": { "max_concurrent": max_concurrent, "queue": { "max_size": 10, "timeout": "400ms" } } },
            "b": { "circuit_breaker": { "consecutive_failures": 2, "open_for": "30s" }, "reject": { "body": body } }
        },
        "routes": [
            { "match": { "route_name": "p" }, "policy": "p" },
            { "match": { "route_name": "b" }, "policy": "b" }
        ]
    })
}

/// New instances replace the old ones (new root contexts): the tick and the wake-up queue move
/// to a live one, so queue timeouts, wake-ups and stats keep working, and state carries over.
#[tokio::test(flavor = "multi_thread")]
async fn after_a_configuration_change_the_tick_and_the_wake_up_queue_live_on() {
    let up = start_upstream().await;
    let spec = Spec::new(up.addr())
        .attach(Attach::PerRoute)
        .route("p", "/p", "backend")
        .route("b", "/b", "backend")
        .reloadable();
    let envoy = Envoy::start(&spec.clone().plugin(instances(1, "old\n"))).await;
    envoy.get("/b?status=500").await;
    envoy.get("/b?status=500").await;
    envoy.wait_tripped("b", 1).await;
    for round in 0..3 {
        envoy.reload(&spec.clone().plugin(instances(1, &format!("new {round}\n")))).await;
        tokio::time::sleep(Duration::from_millis(200)).await; // the old root contexts retire
        let r = envoy.get("/b").await;
        assert!(r.is_circuit_open(), "{r:?}");
        assert_eq!(r.body, format!("new {round}\n"), "the new configuration answers");
        // A waiter times out on schedule: the tick runs on a live root context.
        let addr = envoy.listener();
        let holder = tokio::spawn(async move { Call::get("/p?delay_ms=1200").send(addr).await });
        envoy.wait_bulkhead("p", |b| b.active == 1).await;
        let started = std::time::Instant::now();
        let r = envoy.get("/p").await;
        let waited = started.elapsed();
        assert!(r.is_queue_timeout(), "round {round}: {r:?}");
        assert!(waited < Duration::from_millis(700), "round {round}: timed out after {waited:?}");
        assert_eq!(holder.await.unwrap().map(|r| r.status), Some(200));
        let b = envoy.wait_bulkhead("p", |b| b.queue_timeout == round + 1).await;
        assert_eq!(b.queue_timeout, round + 1, "stats still reach Envoy: {b:?}");
    }
}
