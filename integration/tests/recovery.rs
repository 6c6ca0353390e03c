//! After the trip: the open period, half-open probes (limited across Envoy's 2 workers),
//! closing after successful probes, re-opening with a doubled period, and a probe the client
//! abandons.

use std::time::{Duration, Instant};

use integration::envoy::{get_and_abort, Envoy, PolicyStats, Reply, CLOSED, HALF_OPEN, OPEN};
use integration::setup;
use integration::upstream::Upstream;
use serde_json::{json, Value};

const OPEN_FOR: Duration = Duration::from_secs(1);

/// A policy `p` with consecutive_failures 2, open_for 1s and the given half_open settings.
fn policy(half_open: Value, max_open_for: &str) -> Value {
    json!({ "p": { "circuit_breaker": {
        "consecutive_failures": 2,
        "open_for": "1s",
        "max_open_for": max_open_for,
        "half_open": half_open
    } } })
}

/// Two failures trip `p`; returns when the trip is recorded.
async fn trip(envoy: &Envoy) -> Instant {
    for r in envoy.send_recorded("p", "/p?status=500", 2).await {
        assert_eq!((r.status, r.from_upstream()), (500, true), "{r:?}");
    }
    let s = envoy.wait_tripped("p", 1).await;
    assert_eq!((s.to_open, s.state), (1, OPEN), "{s:?}");
    Instant::now()
}

/// Sleeps until `period` after `since`, plus a margin.
async fn wait_past(since: Instant, period: Duration) {
    tokio::time::sleep_until((since + period + Duration::from_millis(150)).into()).await;
}

fn assert_rejected(r: &Reply) {
    assert_eq!(r.status, 503, "{r:?}");
    assert!(r.is_circuit_open() && !r.from_upstream(), "{r:?}");
}

async fn assert_closed_and_flowing(envoy: &Envoy, up: &Upstream) -> PolicyStats {
    let before = up.stats().requests;
    let replies = envoy.get_concurrently(vec!["/p/after".to_owned(); 6]).await;
    assert!(replies.iter().all(|r| r.status == 200 && r.from_upstream()), "traffic should flow: {replies:?}");
    assert_eq!(up.stats().requests, before + 6);
    let s = envoy.wait_policy("p", |s| s.state == CLOSED).await;
    assert_eq!(s.state, CLOSED, "{s:?}");
    s
}

/// After the open period, a burst of 20 slow requests on fresh connections (spread over both
/// workers): exactly `max_probes` of them reach the upstream, all others are rejected.
async fn probe_limit(max_probes: u32) {
    let (up, envoy) = setup(policy(json!({ "max_probes": max_probes }), "10s")).await;
    let tripped = trip(&envoy).await;
    wait_past(tripped, OPEN_FOR).await;
    up.reset_stats();
    let workers_before = envoy.worker_connections().await;

    let replies = envoy.get_concurrently(vec!["/p?delay_ms=800".to_owned(); 20]).await;
    let probes: Vec<&Reply> = replies.iter().filter(|r| r.from_upstream()).collect();
    let rejected: Vec<&Reply> = replies.iter().filter(|r| r.is_circuit_open()).collect();
    let stats = up.stats();
    assert_eq!(stats.requests, u64::from(max_probes), "exactly max_probes may reach the upstream: {stats:?}");
    assert_eq!(stats.max_in_flight, u64::from(max_probes), "{stats:?}");
    assert_eq!(probes.len(), max_probes as usize, "{replies:?}");
    assert!(probes.iter().all(|r| r.status == 200), "{probes:?}");
    assert_eq!(rejected.len(), 20 - max_probes as usize, "{replies:?}");
    for r in &rejected {
        assert_rejected(r);
        assert_eq!(r.retry_after(), Some(1), "half-open rejections ask to retry in 1s");
    }
    let workers_after = envoy.worker_connections().await;
    let spread: Vec<i64> = workers_after.iter().zip(&workers_before).map(|(a, b)| a - b).collect();
    assert!(spread.len() == 2 && spread.iter().all(|&n| n > 0), "the burst should use both workers: {spread:?}");

    // The probe succeeded: closed, and traffic flows.
    let s = envoy.wait_policy("p", |s| s.to_closed == 1).await;
    assert_eq!((s.to_half_open, s.to_closed, s.rejections), (1, 1, 20 - i64::from(max_probes)), "{s:?}");
    assert_closed_and_flowing(&envoy, &up).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn half_open_admits_one_probe_across_workers() {
    probe_limit(1).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn half_open_admits_two_probes_across_workers() {
    probe_limit(2).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn closes_after_successes_to_close_probes() {
    let (up, envoy) = setup(policy(json!({ "max_probes": 1, "successes_to_close": 2 }), "10s")).await;
    let tripped = trip(&envoy).await;
    assert_rejected(&envoy.get("/p").await);
    wait_past(tripped, OPEN_FOR).await;

    // First probe succeeds: half-open still, one more success needed.
    let r = envoy.get("/p/probe1").await;
    assert_eq!((r.status, r.from_upstream()), (200, true), "{r:?}");
    let s = envoy.wait_policy("p", |s| s.success == 1).await;
    assert_eq!((s.success, s.to_half_open, s.to_closed, s.state), (1, 1, 0, HALF_OPEN), "{s:?}");

    // Second probe succeeds: closed.
    let r = envoy.get("/p/probe2").await;
    assert_eq!((r.status, r.from_upstream()), (200, true), "{r:?}");
    let s = envoy.wait_policy("p", |s| s.to_closed == 1 && s.success == 2).await;
    assert_eq!((s.success, s.to_closed, s.state), (2, 1, CLOSED), "{s:?}");
    let log = envoy.wait_log_line("policy p: circuit closed").await;
    assert!(log.is_some(), "closing is logged");
    let s = assert_closed_and_flowing(&envoy, &up).await;
    assert_eq!((s.to_open, s.rejections), (1, 1), "{s:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn failed_probe_reopens_with_a_doubled_period() {
    let (up, envoy) = setup(policy(json!({ "max_probes": 1 }), "10s")).await;
    let tripped = trip(&envoy).await;
    let r = envoy.get("/p").await;
    assert_rejected(&r);
    assert_eq!(r.retry_after(), Some(1), "first period is 1s");
    wait_past(tripped, OPEN_FOR).await;

    // The probe fails: open again, for 2s ±10%.
    let r = envoy.get("/p/probe?status=500").await;
    assert_eq!((r.status, r.from_upstream()), (500, true), "{r:?}");
    // Half-open views are exact on every worker: no sync to wait for.
    let s = envoy.wait_policy("p", |s| s.to_open == 2).await;
    let reopened = Instant::now();
    assert_eq!((s.to_open, s.to_half_open, s.state), (2, 1, OPEN), "{s:?}");
    let r = envoy.get("/p").await;
    assert_rejected(&r);
    let retry = r.retry_after().expect("retry-after");
    assert!((2..=3).contains(&retry), "doubled period (1.8s-2.2s) rounded up, got retry-after {retry}");
    let line = envoy.wait_log_line("a half-open probe failed").await.expect("re-open logged");
    assert!(line.contains("policy p: circuit open"), "{line}");

    // Past the first period (1s) but inside the doubled one (>= 1.8s): still open.
    tokio::time::sleep_until((reopened + Duration::from_millis(1300)).into()).await;
    let r = envoy.get("/p/early").await;
    assert_rejected(&r);
    assert_eq!(up.stats().by_path.get("/p/early"), None);

    // After the doubled period: a probe goes through and closes it.
    wait_past(reopened, Duration::from_millis(2200)).await;
    let r = envoy.get("/p/late").await;
    assert_eq!((r.status, r.from_upstream()), (200, true), "{r:?}");
    let s = envoy.wait_policy("p", |s| s.to_closed == 1).await;
    assert_eq!((s.to_open, s.to_half_open, s.to_closed, s.rejections), (2, 2, 1, 3), "{s:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn probe_aborted_by_client_gives_its_slot_back() {
    // probe_timeout is the 30s default: only the abort can free the slot within this test.
    let (up, envoy) = setup(policy(json!({ "max_probes": 1 }), "10s")).await;
    let tripped = trip(&envoy).await;
    wait_past(tripped, OPEN_FOR).await;

    // The probe is slow; its client gives up after 200ms.
    get_and_abort(envoy.listener(), "/p/probe?delay_ms=3000", Duration::from_millis(200)).await;
    let s = envoy.wait_policy("p", |s| s.ignored == 1).await;
    assert_eq!((s.ignored, s.to_half_open, s.state), (1, 1, HALF_OPEN), "an aborted probe is ignored: {s:?}");
    assert_eq!(up.stats().by_path.get("/p/probe"), Some(&1), "the probe did reach the upstream");

    // The slot is free again: the next request is a probe, reaches the upstream and closes.
    let r = envoy.get("/p/next").await;
    assert_eq!((r.status, r.from_upstream()), (200, true), "the next request should be a probe, not rejected: {r:?}");
    assert_eq!(up.stats().by_path.get("/p/next"), Some(&1));
    let s = envoy.wait_policy("p", |s| s.to_closed == 1).await;
    assert_eq!((s.to_closed, s.state, s.rejections, s.ignored), (1, CLOSED, 0, 1), "{s:?}");
}
