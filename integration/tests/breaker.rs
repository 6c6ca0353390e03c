//! Tripping the breaker behind a real Envoy (2 workers): by consecutive failures, failure rate
//! and slow calls; what a fast-failed client sees; isolation between routes; dry-run mode.
//!
//! Every scenario checks three views: what the client got, what the test upstream saw, and
//! Envoy's stats for the policy.

use integration::envoy::{Envoy, PolicyStats, Reply, Spec, CLOSED, OPEN};
use integration::{setup, start_upstream};
use serde_json::json;

/// `n` failing calls (upstream answers 500), each on a new connection, each recorded before the next.
async fn fail(envoy: &Envoy, policy: &str, n: usize) {
    for r in envoy.send_recorded(policy, &format!("/{policy}?status=500"), n).await {
        assert_eq!((r.status, r.from_upstream()), (500, true), "a failing call should pass through: {r:?}");
    }
}

/// `n` succeeding calls, each on a new connection, each recorded before the next.
async fn succeed(envoy: &Envoy, policy: &str, n: usize) {
    for r in envoy.send_recorded(policy, &format!("/{policy}?status=200"), n).await {
        assert_eq!((r.status, r.from_upstream()), (200, true), "a good call should pass through: {r:?}");
    }
}

async fn wait_open(envoy: &Envoy, policy: &str) -> PolicyStats {
    let s = envoy.wait_tripped(policy, 1).await;
    assert_eq!((s.to_open, s.state), (1, OPEN), "breaker {policy} should have opened: {s:?}");
    s
}

fn assert_circuit_open(r: &Reply, max_retry_after: u64) {
    assert_eq!(r.status, 503, "{r:?}");
    assert!(r.is_circuit_open(), "expected x-breakwater: circuit-open: {r:?}");
    assert!(!r.from_upstream(), "a fast-failed request must not come from the upstream: {r:?}");
    let retry = r.retry_after().expect("retry-after header");
    assert!((1..=max_retry_after).contains(&retry), "retry-after {retry} not in 1..={max_retry_after}");
}

#[tokio::test(flavor = "multi_thread")]
async fn trip_by_consecutive_failures_counts_across_workers() {
    let (up, envoy) = setup(json!({
        "p": {
            "circuit_breaker": { "consecutive_failures": 5, "open_for": "2s" },
            "reject": { "status": 503, "body": "p is resting\n", "headers": { "x-test": "rejected" } }
        }
    }))
    .await;
    // One kept-alive connection on each of the 2 workers: failures alternate between them, so
    // the trip after 5 can only happen if both workers' counts go into one breaker.
    let conns = envoy.conn_per_worker(2).await;
    let (w0, w1) = (&conns[0], &conns[1]);
    for (i, conn) in [w0, w1, w0, w1].into_iter().enumerate() {
        let r = conn.get("/p?status=500").await;
        assert_eq!((r.status, r.from_upstream()), (500, true), "{r:?}");
        let s = envoy.wait_policy("p", |s| s.failure == i as i64 + 1).await;
        assert_eq!(s.failure, i as i64 + 1, "{s:?}");
    }
    let s = envoy.policy("p").await;
    assert_eq!((s.to_open, s.state, s.rejections), (0, CLOSED, 0), "4 failures must not trip: {s:?}");
    assert_eq!(up.stats().requests, 4);

    // The 5th failure, on worker 0, trips the breaker ...
    let r = w0.get("/p?status=500").await;
    assert_eq!((r.status, r.from_upstream()), (500, true), "the 5th failure itself still passes: {r:?}");
    let s = envoy.wait_policy("p", |s| s.to_open >= 1).await;
    assert_eq!((s.to_open, s.state), (1, OPEN), "{s:?}");

    // ... and worker 1, which saw failures of this run itself, rejects the very next request
    // without contacting the upstream: no waiting for a sync.
    let r = w1.get("/p?status=200").await;
    assert_circuit_open(&r, 2);
    assert_eq!(r.body, "p is resting\n");
    assert_eq!(r.header("x-test"), Some("rejected"));
    assert_eq!(up.stats().requests, 5, "the rejected request must not reach the upstream");

    // Fresh connections, whichever worker takes them, are rejected too.
    for r in envoy.get_concurrently(vec!["/p?status=200".to_owned(); 6]).await {
        assert_circuit_open(&r, 2);
    }
    assert_eq!(up.stats().requests, 5);
    let s = envoy.wait_policy("p", |s| s.rejections == 7).await;
    assert_eq!((s.failure, s.success, s.rejections, s.to_open, s.state), (5, 0, 7, 1, OPEN), "{s:?}");
    let workers = envoy.worker_connections().await;
    assert!(workers.len() == 2 && workers.iter().all(|&n| n > 0), "both workers took connections: {workers:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn not_found_is_a_success_and_does_not_trip() {
    let (up, envoy) =
        setup(json!({ "p": { "circuit_breaker": { "consecutive_failures": 2, "open_for": "2s" } } })).await;
    for r in envoy.send_recorded("p", "/p?status=404", 5).await {
        assert_eq!((r.status, r.from_upstream()), (404, true), "{r:?}");
    }
    let s = envoy.policy("p").await;
    assert_eq!((s.success, s.failure, s.to_open, s.state), (5, 0, 0, CLOSED), "404 must count as success: {s:?}");
    // The breaker is live: two 5xx in a row do trip it.
    fail(&envoy, "p", 2).await;
    wait_open(&envoy, "p").await;
    assert_circuit_open(&envoy.get("/p").await, 2);
    assert_eq!(up.stats().requests, 7);
}

/// Plain HTTP (not gRPC) 4xx answers are the client's fault and must count as successes under
/// the default `failure_on` (status 5xx). Each status is checked on its own, so a failure names it.
#[tokio::test(flavor = "multi_thread")]
async fn every_plain_http_4xx_is_a_success() {
    let (up, envoy) =
        setup(json!({ "p": { "circuit_breaker": { "consecutive_failures": 1000, "open_for": "2s" } } })).await;
    let mut misclassified = Vec::new();
    for status in [400, 401, 403, 404, 409, 422, 429] {
        let before = envoy.policy("p").await;
        let r = &envoy.send_recorded("p", &format!("/p?status={status}"), 1).await[0];
        assert_eq!((r.status, r.from_upstream()), (status, true), "{r:?}");
        let after = envoy.policy("p").await;
        if after.failure != before.failure {
            misclassified.push(status);
        }
    }
    assert_eq!(up.stats().requests, 7);
    let s = envoy.policy("p").await;
    assert!(
        misclassified.is_empty(),
        "plain HTTP 4xx counted as failures: {misclassified:?} ({s:?}); Envoy infers response.grpc_status \
         from the HTTP status for non-gRPC responses (400→INTERNAL, 429→UNAVAILABLE), and the default \
         failure_on.grpc_status [4, 13, 14] then matches"
    );
    assert_eq!((s.success, s.failure), (7, 0), "{s:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn trip_by_failure_rate_needs_minimum_requests_and_threshold() {
    let rate = json!({
        "circuit_breaker": {
            "consecutive_failures": 1000,
            "failure_rate": { "threshold": 50, "minimum_requests": 10, "window": "10s" },
            "open_for": "2s"
        }
    });
    let (up, envoy) = setup(json!({ "few": rate, "low": rate })).await;

    // `few`: 5 failures in 9 calls is over 50% but under minimum_requests ...
    for i in 0..9 {
        if i % 2 == 0 {
            fail(&envoy, "few", 1).await
        } else {
            succeed(&envoy, "few", 1).await
        }
    }
    let s = envoy.policy("few").await;
    assert_eq!((s.failure, s.success, s.to_open), (5, 4, 0), "9 calls are below minimum_requests: {s:?}");
    // ... the 10th call (a success: 5 of 10 = 50%) trips it.
    succeed(&envoy, "few", 1).await;
    let s = wait_open(&envoy, "few").await;
    assert_eq!((s.failure, s.success), (5, 5));
    assert_circuit_open(&envoy.get("/few").await, 2);
    let line = envoy.wait_log_line("policy few: circuit open").await.expect("transition logged");
    assert!(line.contains("failure rate 50% of 10 requests"), "{line}");

    // `low`: 2 successes, then failure and success alternating: from the 10th call on there are
    // enough calls, but at most 5 of 12 (41%) fail: under the threshold ...
    for i in 0..12 {
        if i >= 2 && i % 2 == 0 {
            fail(&envoy, "low", 1).await
        } else {
            succeed(&envoy, "low", 1).await
        }
    }
    let s = envoy.policy("low").await;
    assert_eq!((s.failure, s.success, s.to_open), (5, 7, 0), "41% is under the 50% threshold: {s:?}");
    // ... 6 of 13 (46%) still not, 7 of 14 (50%) trips.
    fail(&envoy, "low", 1).await;
    assert_eq!(envoy.policy("low").await.to_open, 0);
    fail(&envoy, "low", 1).await;
    let s = wait_open(&envoy, "low").await;
    assert_eq!((s.failure, s.success), (7, 7));
    assert_circuit_open(&envoy.get("/low").await, 2);
    assert_eq!(up.stats().requests, 10 + 14);
}

#[tokio::test(flavor = "multi_thread")]
async fn trip_by_slow_calls_but_not_by_fast_ones() {
    let (up, envoy) = setup(json!({
        "s": {
            "circuit_breaker": {
                "slow_call": { "duration": "200ms", "threshold": 50, "minimum_requests": 4 },
                "open_for": "2s"
            }
        }
    }))
    .await;
    succeed(&envoy, "s", 4).await;
    let s = envoy.policy("s").await;
    assert_eq!((s.success, s.slow, s.to_open), (4, 0, 0), "fast calls are not slow: {s:?}");

    // 4 slow calls at once (300ms > 200ms): 4 slow of 8 = 50% trips when the last one lands.
    let replies = envoy.get_concurrently(vec!["/s?delay_ms=300".to_owned(); 4]).await;
    assert!(replies.iter().all(|r| r.status == 200 && r.from_upstream()), "{replies:?}");
    let s = wait_open(&envoy, "s").await;
    assert_eq!((s.success, s.slow, s.failure), (8, 4, 0), "slow calls are successes that are also slow: {s:?}");
    assert_circuit_open(&envoy.get("/s").await, 2);
    assert_eq!(up.stats().requests, 8);
    let line = envoy.wait_log_line("policy s: circuit open").await.expect("transition logged");
    assert!(line.contains("slow calls 50% of 8 requests"), "{line}");
}

#[tokio::test(flavor = "multi_thread")]
async fn fast_fail_does_not_contact_upstream() {
    let (up, envoy) =
        setup(json!({ "p": { "circuit_breaker": { "consecutive_failures": 2, "open_for": "3s" } } })).await;
    fail(&envoy, "p", 2).await;
    wait_open(&envoy, "p").await;
    up.reset_stats();
    let workers_before = envoy.worker_connections().await;

    let replies = envoy.get_concurrently(vec!["/p?status=200".to_owned(); 50]).await;
    for r in &replies {
        assert_circuit_open(r, 3);
    }
    assert_eq!(up.stats().requests, 0, "no rejected request may reach the upstream: {:?}", up.stats());
    let s = envoy.wait_policy("p", |s| s.rejections == 50).await;
    assert_eq!((s.rejections, s.failure, s.success, s.to_open), (50, 2, 0, 1), "{s:?}");
    let workers_after = envoy.worker_connections().await;
    let per_worker: Vec<i64> = workers_after.iter().zip(&workers_before).map(|(a, b)| a - b).collect();
    assert!(per_worker.iter().all(|&n| n > 0), "50 connections should land on both workers: {per_worker:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn per_route_isolation() {
    let up = start_upstream().await;
    let breaker = json!({ "circuit_breaker": { "consecutive_failures": 2, "open_for": "3s" } });
    let spec = Spec::new(up.addr())
        .plugin(json!({
            "policies": { "a": breaker, "b": breaker },
            "routes": [
                { "match": { "route_name": "a" }, "policy": "a" },
                { "match": { "route_name": "b" }, "policy": "b" }
            ]
        }))
        .route("a", "/a", "backend")
        .route("b", "/b", "backend")
        .route("c", "/c", "backend");
    let envoy = Envoy::start(&spec).await;

    fail(&envoy, "a", 2).await;
    wait_open(&envoy, "a").await;
    assert_circuit_open(&envoy.get("/a").await, 3);

    // `b` is untouched by `a`'s trip.
    succeed(&envoy, "b", 2).await;
    let b = envoy.policy("b").await;
    assert_eq!((b.success, b.failure, b.rejections, b.to_open, b.state), (2, 0, 0, 0, CLOSED), "{b:?}");

    // Route `c` matches no rule: failures pass untouched however many there are.
    let replies = envoy.get_concurrently(vec!["/c?status=500".to_owned(); 10]).await;
    assert!(replies.iter().all(|r| r.status == 500 && r.from_upstream() && !r.is_circuit_open()), "{replies:?}");
    for r in envoy.get_concurrently(vec!["/c".to_owned(); 3]).await {
        assert_eq!((r.status, r.from_upstream()), (200, true), "{r:?}");
    }
    assert_eq!(up.stats().by_path.get("/c"), Some(&13));
    let stats = envoy.stats().await;
    assert!(!stats.keys().any(|k| k.contains(".policy.c")), "no policy c exists");
    // And `c`'s failures changed nothing for `a` and `b`.
    let (a, b) = (envoy.policy("a").await, envoy.policy("b").await);
    assert_eq!((a.failure, a.to_open, a.state), (2, 1, OPEN), "{a:?}");
    assert_eq!((b.failure, b.to_open, b.state), (0, 0, CLOSED), "{b:?}");
    assert_circuit_open(&envoy.get("/a").await, 3);
    assert_eq!(up.stats().by_path.get("/a"), Some(&2));
}

#[tokio::test(flavor = "multi_thread")]
async fn dry_run_counts_rejections_but_lets_everything_through() {
    let (up, envoy) = setup(json!({
        "d": { "mode": "dry_run", "circuit_breaker": { "consecutive_failures": 3, "open_for": "3s" } }
    }))
    .await;
    fail(&envoy, "d", 3).await;
    let s = wait_open(&envoy, "d").await;
    assert_eq!(s.failure, 3);

    // Open in dry run: every request still reaches the upstream, unmarked.
    for i in 1..=5 {
        let r = envoy.get("/d?status=200").await;
        assert_eq!((r.status, r.from_upstream()), (200, true), "{r:?}");
        assert!(r.header("x-breakwater").is_none() && r.header("retry-after").is_none(), "{r:?}");
        let s = envoy.wait_policy("d", |s| s.dry_run_rejections == i).await;
        assert_eq!(s.dry_run_rejections, i, "{s:?}");
    }
    assert_eq!(up.stats().requests, 8);
    let s = envoy.policy("d").await;
    // Would-be rejections are kept out of the breaker, exactly as enforce would never see them.
    assert_eq!((s.rejections, s.dry_run_rejections, s.success, s.to_open, s.state), (0, 5, 0, 1, OPEN), "{s:?}");
}

/// The README's tip: on routes without a policy, Envoy's per-route `FilterConfig.disabled`
/// switches Breakwater off, so not even a catch-all rule sees those requests.
#[tokio::test(flavor = "multi_thread")]
async fn a_route_with_the_filter_disabled_is_never_seen() {
    let up = start_upstream().await;
    let policies = json!({ "all": { "circuit_breaker": { "consecutive_failures": 2, "open_for": "2s" } } });
    let spec = Spec::new(up.addr())
        .plugin(json!({ "policies": policies, "routes": [{ "match": {}, "policy": "all" }] }))
        .route_without_breakwater("static", "/static", "backend")
        .route("api", "/api", "backend");
    let envoy = Envoy::start(&spec).await;
    for _ in 0..5 {
        let r = envoy.get("/static?status=500").await;
        assert_eq!((r.status, r.from_upstream()), (500, true), "{r:?}");
    }
    let s = envoy.policy("all").await;
    assert_eq!((s.failure, s.to_open), (0, 0), "the disabled route is invisible to the plugin: {s:?}");
    // The filter runs on the other route: two failures there trip the catch-all policy.
    for r in envoy.send_recorded("all", "/api?status=500", 2).await {
        assert_eq!(r.status, 500, "{r:?}");
    }
    wait_open(&envoy, "all").await;
    assert_circuit_open(&envoy.get("/api").await, 2);
    assert_eq!(envoy.get("/static").await.status, 200, "and still not on the disabled route");
}
