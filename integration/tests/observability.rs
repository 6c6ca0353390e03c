//! What the outside world sees of an open breaker: the gRPC form of a rejection over HTTP/2,
//! Prometheus labels from the shipped tag extractors, and the transition log line.

use bytes::Bytes;
use hyper::Method;
use integration::envoy::{Envoy, Spec, OPEN};
use integration::upstream::Upstream;
use serde_json::json;

/// Upstream and Envoy with policy `p` on route `/p`, tripped by two failures.
async fn tripped() -> (Upstream, Envoy) {
    let up = Upstream::start("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let policies = json!({ "p": { "circuit_breaker": { "consecutive_failures": 2, "open_for": "2s" } } });
    let envoy = Envoy::start(&Spec::one_route_per_policy(up.addr(), policies)).await;
    for r in envoy.send_recorded("p", "/p?status=500", 2).await {
        assert_eq!((r.status, r.from_upstream()), (500, true), "{r:?}");
    }
    let s = envoy.wait_tripped("p", 1).await;
    assert_eq!((s.to_open, s.state), (1, OPEN), "{s:?}");
    (up, envoy)
}

#[tokio::test(flavor = "multi_thread")]
async fn grpc_request_is_rejected_with_grpc_unavailable() {
    let (up, envoy) = tripped().await;
    let r = envoy
        .h2_request(
            Method::POST,
            "/p/pkg.Svc/Call",
            &[("content-type", "application/grpc"), ("te", "trailers")],
            Bytes::from_static(&[0, 0, 0, 0, 0]),
        )
        .await;
    // Trailers-only: HTTP 200 with grpc-status in the headers.
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("grpc-status"), Some("14"), "UNAVAILABLE: {r:?}");
    assert_eq!(r.header("content-type"), Some("application/grpc"), "{r:?}");
    assert!(r.is_circuit_open(), "{r:?}");
    assert!(r.header("grpc-message").is_some_and(|m| m.contains("circuit-open")), "{r:?}");
    let retry = r.retry_after().expect("retry-after");
    assert!((1..=2).contains(&retry), "{retry}");
    assert!(r.body.is_empty(), "{r:?}");

    // A plain request over HTTP/2 gets the plain 503.
    let r = envoy.h2_request(Method::GET, "/p", &[], Bytes::new()).await;
    assert_eq!(r.status, 503, "{r:?}");
    assert!(r.is_circuit_open(), "{r:?}");
    assert_eq!(r.body, "breakwater: circuit-open (policy p)\n");

    assert_eq!(up.stats().requests, 2, "rejections never reach the upstream");
    let s = envoy.wait_policy("p", |s| s.rejections == 2).await;
    assert_eq!(s.rejections, 2, "{s:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn prometheus_labels_and_transition_log() {
    let (_up, envoy) = tripped().await;
    let r = envoy.get("/p").await;
    assert!(r.is_circuit_open(), "{r:?}");
    envoy.wait_policy("p", |s| s.rejections == 1).await;

    let text = envoy.prometheus().await;
    // As Envoy 1.40 prints them with the shipped stats_config: the tag extractors turn the
    // segments into labels, and custom (wasmcustom) stats get neither that prefix nor `envoy_`.
    for line in [
        "# TYPE breakwater_requests_total counter",
        r#"breakwater_requests_total{policy="p",outcome="failure"} 2"#,
        r#"breakwater_requests_total{policy="p",outcome="success"} 0"#,
        r#"breakwater_ignored_total{policy="p",reason="client_closed"} 0"#,
        r#"breakwater_ignored_total{policy="p",reason="stale"} 0"#,
        r#"breakwater_rejections_total{policy="p",reason="circuit_open"} 1"#,
        r#"breakwater_transitions_total{policy="p",to_state="open"} 1"#,
        r#"breakwater_transitions_total{policy="p",to_state="half_open"} 0"#,
        r#"breakwater_transitions_total{policy="p",to_state="closed"} 0"#,
        "# TYPE breakwater_circuit_state gauge",
        r#"breakwater_circuit_state{policy="p",state="open"} 1"#,
        r#"breakwater_circuit_state{policy="p",state="closed"} 0"#,
        r#"breakwater_circuit_state{policy="p",state="half_open"} 0"#,
    ] {
        assert!(text.lines().any(|l| l == line), "missing `{line}` in:\n{}", breakwater_lines(&text));
    }
    // Only what the policy has: no slow_call, no bulkhead, no dry run.
    for absent in ["breakwater_slow_calls_total", "breakwater_bulkhead", "breakwater_dry_run", "breakwater_retr"] {
        assert!(!text.contains(absent), "{absent} should not exist:\n{}", breakwater_lines(&text));
    }
    assert!(
        !text.lines().any(|l| l.contains("wasmcustom")),
        "no untagged wasmcustom names should remain:\n{}",
        breakwater_lines(&text)
    );

    let line = envoy.wait_log_line("policy p: circuit open").await.expect("transition log line");
    assert!(line.contains("[info][wasm]"), "{line}");
    assert!(line.ends_with("policy p: circuit open: 2 consecutive failures; open for 2s"), "{line}");
}

fn breakwater_lines(text: &str) -> String {
    text.lines().filter(|l| l.contains("breakwater")).collect::<Vec<_>>().join("\n")
}
