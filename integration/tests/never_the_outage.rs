//! Issue 9's inputs, each against the real Envoy 1.40: no input may crash the plugin, and
//! outcomes are counted as operators mean them.

use bytes::Bytes;
use hyper::Method;
use integration::envoy::{Envoy, Spec, CLOSED};
use integration::{setup, start_upstream};
use serde_json::json;
use std::time::{Duration, Instant};

fn no_trap(envoy: &Envoy) {
    let log = envoy.log();
    assert!(
        !log.contains("Uncaught RuntimeError") && !log.contains("wasm_fail_stream"),
        "the VM trapped:\n{}",
        log.lines().filter(|l| l.contains("wasm")).collect::<Vec<_>>().join("\n")
    );
}

/// Input 1 and 2: bytes that are not UTF-8 in every header a configuration can name (the
/// priority header, a `match.headers` header) and in a response `grpc-status`.
#[tokio::test(flavor = "multi_thread")]
async fn bytes_that_are_not_utf8_in_every_header_the_plugin_reads_leave_both_workers_working() {
    let up = start_upstream().await;
    let plugin = json!({
        "policies": {
            "gold": { "circuit_breaker": { "consecutive_failures": 3 } },
            "p": {
                "circuit_breaker": { "consecutive_failures": 3 },
                "bulkhead": { "max_concurrent": 10, "priority": {
                    "header": "x-priority", "default": "standard", "classes": { "critical": { "reserved": 2 } } } }
            }
        },
        "routes": [
            { "match": { "route_name": "p", "headers": { "x-tenant": "gold" } }, "policy": "gold" },
            { "match": { "route_name": "p" }, "policy": "p" }
        ]
    });
    let envoy = Envoy::start(&Spec::new(up.addr()).plugin(plugin).route("p", "/p", "backend")).await;
    let conns = envoy.conn_per_worker(2).await;
    for conn in &conns {
        let headers: [(&str, &[u8]); 2] = [("x-priority", b"crit\xe9cal"), ("x-tenant", b"g\xffld")];
        let r = conn.try_request(Method::GET, "/p", &headers).await.expect("answered");
        assert_eq!((r.status, r.from_upstream()), (200, true), "{r:?}");
        // An upstream answering 200 with grpc-status 0xFF and no body.
        let r =
            conn.try_request(Method::GET, "/p?raw_header=grpc-status:ff&body_bytes=0", &[]).await.expect("answered");
        assert_eq!((r.status, r.from_upstream()), (200, true), "{r:?}");
        let r = conn.get("/p").await;
        assert_eq!((r.status, r.from_upstream()), (200, true), "still working: {r:?}");
    }
    let s = envoy.wait_policy("p", |s| s.success == 6).await;
    assert_eq!((s.success, s.failure), (6, 0), "{s:?}");
    let b = envoy.wait_bulkhead_idle("p").await;
    assert_eq!((b.active, b.queued), (0, 0), "no permit left taken: {b:?}");
    no_trap(&envoy);
}

/// Input 3: Envoy's own answer to a gRPC call whose route timed out (HTTP 200, grpc-status 14,
/// flag UT) is a timeout, so `failure_on.timeout: false` keeps it out of the breaker.
#[tokio::test(flavor = "multi_thread")]
async fn envoys_own_grpc_timeout_replies_are_not_upstream_failures_when_timeouts_do_not_count() {
    let up = start_upstream().await;
    let plugin = json!({
        "policies": { "p": { "circuit_breaker": { "consecutive_failures": 2, "open_for": "30s", "failure_on": { "timeout": false } } } },
        "routes": [{ "match": { "route_name": "p" }, "policy": "p" }]
    });
    let spec =
        Spec::new(up.addr()).plugin(plugin).route_with_timeout("p", "/p", "backend_h2", Duration::from_millis(300));
    let envoy = Envoy::start(&spec).await;
    for i in 1..=3 {
        let r = envoy
            .h2_request(
                Method::POST,
                "/p/pkg.Svc/Call?delay_ms=1000",
                &[("content-type", "application/grpc"), ("te", "trailers")],
                Bytes::from_static(&[0, 0, 0, 0, 0]),
            )
            .await;
        assert_eq!((r.status, r.header("grpc-status"), r.from_upstream()), (200, Some("14"), false), "{r:?}");
        let s = envoy.wait_policy("p", |s| s.ignored == i).await;
        assert_eq!((s.ignored, s.failure), (i, 0), "{s:?}");
    }
    let s = envoy.policy("p").await;
    assert_eq!((s.to_open, s.state), (0, CLOSED), "a healthy upstream's breaker stays closed: {s:?}");
    assert_eq!(envoy.stat("wasmcustom.breakwater_ignored_total.policy.p.reason.not_counted").await, 3);
}

/// Input 4: a breaker that opened because calls were slow does not close on a slow probe.
#[tokio::test(flavor = "multi_thread")]
async fn a_slow_probe_does_not_close_a_breaker_that_opened_on_slow_calls() {
    let (_up, envoy) = setup(json!({ "p": { "circuit_breaker": {
        "slow_call": { "duration": "200ms", "threshold": 50, "minimum_requests": 4 }, "open_for": "1s" } } }))
    .await;
    let replies = envoy.get_concurrently(vec!["/p?delay_ms=400".to_owned(); 4]).await;
    assert!(replies.iter().all(|r| r.status == 200), "{replies:?}");
    envoy.wait_tripped("p", 1).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let probe = envoy.get("/p?delay_ms=400").await;
    assert_eq!((probe.status, probe.from_upstream()), (200, true), "the probe: {probe:?}");
    let s = envoy.wait_policy("p", |s| s.to_open == 2).await;
    assert_eq!((s.to_open, s.to_closed), (2, 0), "{s:?}");
    let line = envoy.wait_log_line("circuit open: a half-open probe was slow").await;
    assert!(line.is_some(), "the reason is logged");
    assert!(envoy.get("/p").await.is_circuit_open());
}

/// Input 5: long-lived streams (SSE here; gRPC server streams and websockets alike) whose
/// headers came at once are not slow calls: slowness is the time to the upstream's headers.
#[tokio::test(flavor = "multi_thread")]
async fn long_lived_streams_are_not_slow_calls() {
    let (_up, envoy) = setup(json!({ "p": { "circuit_breaker": {
        "slow_call": { "duration": "1s", "threshold": 50, "minimum_requests": 2 } } } }))
    .await;
    let started = Instant::now();
    let streams = envoy.get_concurrently(vec!["/p?stream_ms=1500".to_owned(); 2]).await;
    assert!(started.elapsed() >= Duration::from_millis(1500));
    assert!(streams.iter().all(|r| r.status == 200 && r.body.starts_with("data:")), "{streams:?}");
    let s = envoy.wait_policy("p", |s| s.success == 2).await;
    tokio::time::sleep(Duration::from_millis(300)).await; // several ticks: a trip would show
    let s2 = envoy.policy("p").await;
    assert_eq!((s.slow, s2.to_open), (0, 0), "{s2:?}");
    let r = envoy.get("/p").await;
    assert_eq!((r.status, r.from_upstream()), (200, true), "plain GETs still pass: {r:?}");
}

/// Input 6: a call admitted while the breaker was closed, finishing after it opened and closed
/// again, says nothing about the new closed period.
#[tokio::test(flavor = "multi_thread")]
async fn a_call_from_before_a_trip_does_not_count_after_the_breaker_closed_again() {
    let (_up, envoy) =
        setup(json!({ "p": { "circuit_breaker": { "consecutive_failures": 2, "open_for": "1s" } } })).await;
    let straggler = {
        let url = envoy.listener();
        tokio::spawn(async move { integration::envoy::Conn::open(url).await.get("/p?delay_ms=2500&status=500").await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    envoy.get("/p?status=500").await;
    envoy.get("/p?status=500").await;
    envoy.wait_tripped("p", 1).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(envoy.get("/p").await.status, 200, "the probe closes it");
    envoy.wait_policy("p", |s| s.to_closed == 1).await;
    envoy.get("/p?status=500").await; // one failure of the new period
    assert_eq!(straggler.await.unwrap().status, 500);
    let s = envoy.wait_policy("p", |s| s.stale == 1).await;
    assert_eq!((s.stale, s.to_open, s.state), (1, 1, CLOSED), "the straggler did not re-trip it: {s:?}");
}
