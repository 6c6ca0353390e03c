//! How finished calls are classified: transport errors Envoy answers itself (connect failure,
//! upstream reset, route timeout) are failures unless `failure_on` says otherwise; gRPC status
//! codes from an h2 upstream.

use std::time::Duration;

use bytes::Bytes;
use hyper::Method;
use integration::envoy::{Envoy, Reply, Spec, CLOSED, OPEN};
use integration::start_upstream;
use integration::upstream::Upstream;
use serde_json::{json, Value};

/// Envoy with a single route `p` (prefix `/p`) to `cluster`, governed by policy `p`.
async fn single_route(up: &Upstream, cluster: &str, timeout: Duration, breaker: Value) -> Envoy {
    let spec = Spec::new(up.addr())
        .plugin(json!({
            "policies": { "p": { "circuit_breaker": breaker } },
            "routes": [{ "match": { "route_name": "p" }, "policy": "p" }]
        }))
        .route_with_timeout("p", "/p", cluster, timeout);
    Envoy::start(&spec).await
}

fn two_failures() -> Value {
    json!({ "consecutive_failures": 2, "open_for": "3s" })
}

/// Sends `path` twice (each answered by Envoy with `status` and a body containing `body_part`),
/// then checks that the breaker opened and the third request is fast-failed.
async fn two_errors_trip(envoy: &Envoy, path: &str, status: u16, body_part: &str) {
    for r in envoy.send_recorded("p", path, 2).await {
        assert_eq!(r.status, status, "{r:?}");
        assert!(!r.from_upstream() && !r.is_circuit_open(), "Envoy itself answers: {r:?}");
        assert!(r.body.contains(body_part), "{r:?}");
    }
    let s = envoy.wait_tripped("p", 1).await;
    assert_eq!((s.failure, s.success, s.ignored, s.to_open, s.state), (2, 0, 0, 1, OPEN), "{s:?}");
    let r = envoy.get(path).await;
    assert_eq!(r.status, 503, "{r:?}");
    assert!(r.is_circuit_open(), "{r:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn connect_failure_counts_as_failure() {
    let up = start_upstream().await;
    let envoy = single_route(&up, "dead", Duration::from_secs(5), two_failures()).await;
    two_errors_trip(&envoy, "/p", 503, "remote connection failure").await;
    assert_eq!(envoy.stat("cluster.dead.upstream_cx_connect_fail").await, 2, "exactly 2 connect attempts");
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_reset_counts_as_failure() {
    let up = start_upstream().await;
    let envoy = single_route(&up, "backend", Duration::from_secs(5), two_failures()).await;
    two_errors_trip(&envoy, "/p?reset=1", 503, "reset").await;
    let stats = up.stats();
    assert_eq!((stats.requests, stats.resets), (2, 2), "{stats:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_stream_reset_over_h2_counts_as_failure() {
    let up = start_upstream().await;
    let envoy = single_route(&up, "backend_h2", Duration::from_secs(5), two_failures()).await;
    two_errors_trip(&envoy, "/p?reset=1", 503, "reset").await;
    let stats = up.stats();
    assert_eq!((stats.requests, stats.resets), (2, 2), "{stats:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn route_timeout_counts_as_failure() {
    let up = start_upstream().await;
    let envoy = single_route(&up, "backend", Duration::from_millis(200), two_failures()).await;
    two_errors_trip(&envoy, "/p?delay_ms=500", 504, "upstream request timeout").await;
    assert_eq!(up.stats().requests, 2);
    assert_eq!(envoy.stat("cluster.backend.upstream_rq_timeout").await, 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn connect_failure_is_ignored_when_failure_on_says_so() {
    let up = start_upstream().await;
    let breaker = json!({ "consecutive_failures": 2, "open_for": "3s", "failure_on": { "connect_failure": false } });
    let envoy = single_route(&up, "dead", Duration::from_secs(5), breaker).await;
    for r in envoy.send_recorded("p", "/p", 4).await {
        assert_eq!(r.status, 503, "{r:?}");
        assert!(!r.is_circuit_open(), "connect failures must not trip this breaker: {r:?}");
        assert!(r.body.contains("remote connection failure"), "{r:?}");
    }
    let s = envoy.policy("p").await;
    assert_eq!((s.ignored, s.failure, s.success, s.to_open, s.state), (4, 0, 0, 0, CLOSED), "{s:?}");
    assert_eq!(envoy.stat("cluster.dead.upstream_cx_connect_fail").await, 4);
}

async fn grpc_call(envoy: &Envoy, grpc_status: u32) -> Reply {
    envoy
        .h2_request(
            Method::POST,
            &format!("/p/pkg.Svc/Call?grpc_status={grpc_status}"),
            &[("content-type", "application/grpc"), ("te", "trailers")],
            Bytes::from_static(&[0, 0, 0, 0, 0]),
        )
        .await
}

#[tokio::test(flavor = "multi_thread")]
async fn grpc_unavailable_is_a_failure_and_not_found_is_not() {
    let up = start_upstream().await;
    let envoy = single_route(&up, "backend_h2", Duration::from_secs(5), two_failures()).await;
    // NOT_FOUND (5) is not in the default failure_on.grpc_status [4, 13, 14].
    for i in 1..=3 {
        let r = grpc_call(&envoy, 5).await;
        assert_eq!((r.status, r.from_upstream()), (200, true), "{r:?}");
        let s = envoy.wait_policy("p", |s| s.success == i).await;
        assert_eq!((s.success, s.failure), (i, 0), "{s:?}");
    }
    // UNAVAILABLE (14), in trailers of an HTTP 200: failures; two trip the breaker.
    for i in 1..=2 {
        let r = grpc_call(&envoy, 14).await;
        assert_eq!((r.status, r.from_upstream()), (200, true), "{r:?}");
        let s = envoy.wait_policy("p", |s| s.failure == i).await;
        assert_eq!(s.failure, i, "{s:?}");
    }
    let s = envoy.wait_tripped("p", 1).await;
    assert_eq!((s.to_open, s.state), (1, OPEN), "{s:?}");
    let r = grpc_call(&envoy, 0).await;
    assert_eq!((r.status, r.header("grpc-status")), (200, Some("14")), "{r:?}");
    assert!(r.is_circuit_open(), "{r:?}");
    assert_eq!(up.stats().requests, 5);
}
