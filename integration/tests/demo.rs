//! The shipped demo configuration, `envoy/envoy.yaml`, run as is (only ports and the Wasm path
//! swapped) in front of the test upstream.

use integration::envoy::{Envoy, OPEN};
use integration::upstream::Upstream;

async fn demo() -> (Upstream, Envoy) {
    let up = Upstream::start("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let envoy = Envoy::start_demo(up.addr()).await;
    (up, envoy)
}

#[test]
fn shipped_config_validates() {
    let (ok, output) = Envoy::validate(&Envoy::demo_yaml("127.0.0.1:8081".parse().unwrap()));
    assert!(ok, "envoy/envoy.yaml should validate:\n{output}");
    assert!(!output.contains("invalid configuration"), "{output}");
}

#[tokio::test(flavor = "multi_thread")]
async fn checkout_trips_after_five_failures_with_the_demo_reject() {
    let (up, envoy) = demo().await;
    for r in envoy.send_recorded("checkout", "/checkout?status=500", 5).await {
        assert_eq!((r.status, r.from_upstream()), (500, true), "{r:?}");
    }
    let s = envoy.wait_tripped("checkout", 1).await;
    assert_eq!((s.failure, s.to_open, s.state), (5, 1, OPEN), "{s:?}");

    let r = envoy.get("/checkout").await;
    assert_eq!(r.status, 503, "{r:?}");
    assert!(r.is_circuit_open(), "{r:?}");
    assert_eq!(r.body, "checkout is temporarily unavailable, please retry shortly\n");
    assert_eq!(r.header("x-demo"), Some("breakwater"));
    let retry = r.retry_after().expect("retry-after");
    assert!((1..=10).contains(&retry), "open_for is 10s: {retry}");
    assert_eq!(up.stats().by_path.get("/checkout"), Some(&5), "the rejected request never reached the upstream");

    // Other routes are not governed by checkout's breaker.
    let r = envoy.get("/other").await;
    assert_eq!((r.status, r.from_upstream()), (200, true), "{r:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn catalog_in_dry_run_never_rejects() {
    let (up, envoy) = demo().await;
    // consecutive_failures 3: the breaker opens after 3, in dry run only.
    for r in envoy.send_recorded("catalog", "/catalog?status=500", 3).await {
        assert_eq!((r.status, r.from_upstream()), (500, true), "{r:?}");
    }
    let s = envoy.wait_tripped("catalog", 1).await;
    assert_eq!((s.failure, s.to_open, s.state), (3, 1, OPEN), "{s:?}");
    for status in [500, 200, 500, 200, 200] {
        let r = envoy.get(&format!("/catalog?status={status}")).await;
        assert_eq!((r.status, r.from_upstream()), (status, true), "{r:?}");
        assert!(r.header("x-breakwater").is_none(), "dry run never answers for the upstream: {r:?}");
    }
    assert_eq!(up.stats().by_path.get("/catalog"), Some(&8));
    let s = envoy.wait_policy("catalog", |s| s.dry_run_rejections == 5).await;
    assert_eq!((s.dry_run_rejections, s.rejections), (5, 0), "{s:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn search_bulkhead_admits_two_queues_two_and_refuses_the_rest() {
    let (up, envoy) = demo().await;
    // The walk-through's step 5: six slow requests at once against max_concurrent 2, a queue of
    // 2 with a 500ms timeout. The queued two time out, since the first two take 1.5s.
    let paths = (0..6).map(|i| format!("/search?delay_ms=1500&i={i}")).collect();
    let replies = envoy.get_concurrently(paths).await;
    let count = |status: u16, reason: Option<&str>| {
        replies.iter().filter(|r| r.status == status && r.header("x-breakwater") == reason).count()
    };
    assert_eq!(
        (count(200, None), count(503, Some("queue-timeout")), count(503, Some("bulkhead-full"))),
        (2, 2, 2),
        "{replies:?}"
    );
    assert_eq!(up.stats().max_in_flight, 2);
    // Stats reach Envoy on each worker's tick.
    let b = envoy.wait_bulkhead("search", |b| b.queue_timeout == 2 && b.active == 0).await;
    assert_eq!((b.active, b.queue_timeout, b.full), (0, 2, 2), "{b:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn inventory_retries_rescue_every_third_failure() {
    let (up, envoy) = demo().await;
    // The walk-through's step 6, one request after another.
    for _ in 0..9 {
        let r = envoy.get("/inventory?fail_every=3").await;
        assert_eq!(r.status, 200, "{r:?}");
    }
    assert_eq!(up.stats().by_path.get("/inventory"), Some(&13), "9 requests, 4 of their attempts failed");
    let retries = envoy.wait_stat("wasmcustom.breakwater_retries_total.policy.inventory", 4).await;
    assert_eq!(retries, 4);
}
