//! Retries and the retry budget behind a real Envoy (2 workers): retries rescue a flaky upstream;
//! under a total outage the budget holds what the upstream receives to
//! (1 + ratio) × requests + min_per_second × ttl, where unbudgeted retries multiply it by
//! 1 + max_retries; the budget recovers after ttl; the per-try timeout takes effect; a retry
//! policy on the Envoy route itself is budgeted too.
//!
//! Every count of attempts is taken at the upstream, which records each request it receives.

use std::time::{Duration, Instant};

use integration::envoy::{Call, Envoy, Reply, Spec};
use integration::upstream::Upstream;
use integration::{setup, start_upstream};
use serde_json::json;

/// Requests the upstream received on `path`.
fn received(up: &Upstream, path: &str) -> u64 {
    up.stats().by_path.get(path).copied().unwrap_or(0)
}

/// One Breakwater stat of a policy, e.g. `retries_total.policy.p`; polled until it stops
/// changing (stats reach Envoy on each worker's tick, just after the client has its answer).
async fn settled(envoy: &Envoy, name: &str) -> i64 {
    let full = format!("wasmcustom.breakwater_{name}");
    envoy.settled(|| envoy.stat(&full)).await
}

/// `n` GETs of `path` from `clients` concurrent clients, each on a new connection.
async fn load(envoy: &Envoy, clients: usize, path: &str, n: usize) -> Vec<Reply> {
    let calls = (0..n).map(|_| Call::get(path)).collect();
    envoy.send_all(clients, calls).await.into_iter().map(|r| r.expect("no client gives up")).collect()
}

const BUDGET: f64 = 0.2;
const MIN_PER_SECOND: u64 = 10;
const TTL_S: u64 = 10;

/// A flaky upstream (every third request fails) is rescued: every client gets a 200, the upstream
/// received exactly the extra attempts Breakwater counted as retries, and each retry rescued a
/// request. One client at a time, each request on a new connection (so both workers serve),
/// keeps "every third" deterministic: a retry always lands on a good turn.
#[tokio::test(flavor = "multi_thread")]
async fn retries_rescue_a_flaky_upstream() {
    let (up, envoy) = setup(json!({
        "p": { "retry": { "retry_on": ["5xx"], "max_retries": 2, "budget": {} } }
    }))
    .await;
    let replies = load(&envoy, 1, "/p?fail_every=3", 90).await;
    let ok = replies.iter().filter(|r| r.status == 200).count();
    assert_eq!(ok, 90, "every request rescued: {:?}", replies.iter().find(|r| r.status != 200));
    let attempts = received(&up, "/p");
    let retries = settled(&envoy, "retries_total.policy.p").await;
    assert_eq!(attempts - 90, attempts / 3, "one attempt in three failed and was retried: {attempts}");
    assert_eq!(retries, attempts as i64 - 90, "retries counted by the plugin match the upstream");
    assert_eq!(settled(&envoy, "retry_rescued_total.policy.p").await, retries, "each failure was one retry");
}

/// Under a total outage, with `max_retries: 3`, 32 concurrent clients over both workers: with a
/// budget the upstream receives at most (1 + ratio) × requests + min_per_second × ttl; the same
/// run without a budget gets (1 + max_retries) × requests.
#[tokio::test(flavor = "multi_thread")]
async fn the_budget_bounds_amplification_under_a_total_outage() {
    let retry = |budget: bool| {
        let mut r = json!({ "retry_on": ["5xx"], "max_retries": 3 });
        if budget {
            r["budget"] = json!({ "ratio": BUDGET, "min_per_second": MIN_PER_SECOND, "ttl": format!("{TTL_S}s") });
        }
        json!({ "retry": r })
    };
    let (up, envoy) = setup(json!({ "budgeted": retry(true), "unbudgeted": retry(false) })).await;
    let n = 800usize;
    let before = envoy.worker_connections().await;
    for r in load(&envoy, 32, "/budgeted?status=503", n).await {
        assert_eq!(r.status, 503, "{r:?}");
    }
    let after = envoy.worker_connections().await;
    assert!(after.iter().zip(&before).all(|(a, b)| a - b > 100), "both workers served: {before:?} -> {after:?}");
    let budgeted = received(&up, "/budgeted");
    let bound = ((1.0 + BUDGET) * n as f64) as u64 + MIN_PER_SECOND * TTL_S;
    for r in load(&envoy, 32, "/unbudgeted?status=503", n).await {
        assert_eq!(r.status, 503, "{r:?}");
    }
    let unbudgeted = received(&up, "/unbudgeted");
    println!(
        "outage, {n} requests, max_retries 3, 32 clients, 2 workers: upstream received {budgeted} with the budget \
         ({:.2}x; bound {bound}), {unbudgeted} without ({:.2}x)",
        budgeted as f64 / n as f64,
        unbudgeted as f64 / n as f64
    );
    assert!(budgeted <= bound, "budget overdrawn: {budgeted} attempts for {n} requests, bound {bound}");
    assert!(budgeted > n as u64 + MIN_PER_SECOND * TTL_S / 2, "the budget was spent, not hoarded: {budgeted}");
    assert_eq!(unbudgeted, 4 * n as u64, "without a budget every request is tried 1 + 3 times");
    let denied = settled(&envoy, "retry_denied_total.policy.budgeted.reason.budget_exhausted").await;
    assert!(denied > n as i64 / 2, "most requests were forwarded without retries: {denied}");
    let retries = settled(&envoy, "retries_total.policy.budgeted").await;
    assert_eq!(retries, budgeted as i64 - n as i64, "the plugin counts the retries the upstream saw");
}

/// The budget recovers after ttl: with a reserve of 2/s over a 2 s ttl (4 retries) and no
/// ratio, an outage gets 4 retries, then none, and 4 again once ttl (plus one bucket) has passed.
#[tokio::test(flavor = "multi_thread")]
async fn the_budget_recovers_after_ttl() {
    let (up, envoy) = setup(json!({
        "p": { "retry": { "retry_on": ["5xx"], "max_retries": 1,
                          "budget": { "ratio": 0, "min_per_second": 2, "ttl": "2s" } } }
    }))
    .await;
    let started = Instant::now();
    load(&envoy, 4, "/p?status=503", 10).await;
    assert_eq!(received(&up, "/p"), 10 + 4, "the reserve: 2/s × 2 s");
    load(&envoy, 4, "/p?status=503", 10).await;
    assert!(started.elapsed() < Duration::from_secs(2), "the second round ran within ttl");
    assert_eq!(received(&up, "/p"), 20 + 4, "nothing left within ttl");
    // Withdrawals count for ttl plus one bucket (ttl / 10).
    tokio::time::sleep(Duration::from_millis(2300).saturating_sub(started.elapsed())).await;
    load(&envoy, 4, "/p?status=503", 10).await;
    assert_eq!(received(&up, "/p"), 30 + 8, "recovered after ttl");
}

/// The per-try timeout takes effect: against an upstream that answers after 1 s, a policy with
/// `per_try_timeout: 200ms` and 2 retries gives up after three short tries (504) instead of
/// waiting; without it the one try waits the whole second and succeeds.
#[tokio::test(flavor = "multi_thread")]
async fn the_per_try_timeout_takes_effect() {
    let (up, envoy) = setup(json!({
        "short": { "retry": { "retry_on": ["5xx"], "max_retries": 2, "per_try_timeout": "200ms" } },
        "patient": { "retry": { "retry_on": ["5xx"], "max_retries": 2 } }
    }))
    .await;
    let t = Instant::now();
    let r = envoy.get("/short?delay_ms=1000").await;
    let took = t.elapsed();
    assert_eq!(r.status, 504, "{r:?}");
    assert!(took >= Duration::from_millis(600) && took < Duration::from_millis(1000), "three 200ms tries: {took:?}");
    assert_eq!(received(&up, "/short"), 3);
    let t = Instant::now();
    let r = envoy.get("/patient?delay_ms=1000").await;
    assert_eq!((r.status, received(&up, "/patient")), (200, 1), "{r:?}");
    assert!(t.elapsed() >= Duration::from_millis(1000));
}

/// A retry policy on the Envoy route itself (`num_retries: 3`) is respected and budgeted: a
/// Breakwater policy with a budget but no `on` of its own caps it.
#[tokio::test(flavor = "multi_thread")]
async fn a_retry_policy_on_the_envoy_route_is_budgeted_too() {
    let up = start_upstream().await;
    let plugin = json!({
        "policies": { "p": { "retry": { "max_retries": 3, "budget": { "ratio": 0, "min_per_second": 1, "ttl": "10s" } } } },
        "routes": [{ "match": { "route_name": "budgeted" }, "policy": "p" }]
    });
    let spec = Spec::new(up.addr())
        .plugin(plugin)
        .route_with_retry_policy("budgeted", "/budgeted", "5xx", 3)
        .route_with_retry_policy("free", "/free", "5xx", 3);
    let envoy = Envoy::start(&spec).await;
    load(&envoy, 8, "/budgeted?status=503", 30).await;
    load(&envoy, 8, "/free?status=503", 30).await;
    assert_eq!(received(&up, "/free"), 120, "the route's own policy: 1 + 3 tries each");
    assert_eq!(received(&up, "/budgeted"), 30 + 10, "the same policy within a budget of 10 retries");
}

/// dry_run lets every retry through and counts the requests the budget would have denied.
#[tokio::test(flavor = "multi_thread")]
async fn dry_run_counts_what_the_budget_would_deny() {
    let (up, envoy) = setup(json!({
        "p": { "mode": "dry_run",
               "retry": { "retry_on": ["5xx"], "max_retries": 2, "budget": { "ratio": 0, "min_per_second": 1, "ttl": "10s" } } }
    }))
    .await;
    load(&envoy, 4, "/p?status=503", 20).await;
    assert_eq!(received(&up, "/p"), 60, "all retries made");
    // 10 retries in the budget, 2 per request: the first 5 requests fit, the other 15 would not.
    let would = settled(&envoy, "dry_run_retry_denied_total.policy.p.reason.budget_exhausted").await;
    assert_eq!(would, 15);
    assert_eq!(settled(&envoy, "retry_denied_total.policy.p.reason.budget_exhausted").await, 0);
}

/// With a breaker: the breaker counts each request's final outcome, so retries that rescue a
/// flaky upstream keep it closed; and a request the open breaker refuses is never retried.
#[tokio::test(flavor = "multi_thread")]
async fn the_breaker_counts_final_outcomes_and_refused_requests_make_no_retries() {
    let (up, envoy) = setup(json!({
        "p": { "circuit_breaker": { "consecutive_failures": 2, "open_for": "10s" },
               "retry": { "retry_on": ["5xx"], "max_retries": 2, "budget": {} } }
    }))
    .await;
    let replies = load(&envoy, 1, "/p?fail_every=2", 20).await;
    assert!(replies.iter().all(|r| r.status == 200));
    let s = envoy.wait_policy("p", |s| s.success == 20).await;
    assert_eq!((s.success, s.failure, s.to_open), (20, 0, 0), "the 503s were retried away: {s:?}");
    let rescued = received(&up, "/p") - 20;
    assert!(rescued >= 9, "every second attempt failed: {rescued}");

    for r in load(&envoy, 1, "/p?status=503", 2).await {
        assert_eq!(r.status, 503);
    }
    envoy.wait_tripped("p", 1).await;
    up.reset_stats();
    let r = envoy.get("/p?status=503").await;
    assert!(r.is_circuit_open(), "{r:?}");
    assert_eq!(received(&up, "/p"), 0, "refused: no attempt, no retry");
}

/// The retry stats carry the policy (and the denial reason) as Prometheus labels.
#[tokio::test(flavor = "multi_thread")]
async fn retry_stats_are_labelled_in_prometheus() {
    let (_up, envoy) = setup(json!({
        "p": { "retry": { "retry_on": ["5xx"], "max_retries": 1, "budget": { "ratio": 0, "min_per_second": 1, "ttl": "1s" } } }
    }))
    .await;
    load(&envoy, 2, "/p?status=503", 4).await;
    settled(&envoy, "retries_total.policy.p").await;
    let prom = envoy.prometheus().await;
    for needle in [
        "breakwater_retries_total{policy=\"p\"} 1",
        "breakwater_retry_denied_total{policy=\"p\",reason=\"budget_exhausted\"} 3",
        "breakwater_retry_budget_remaining{policy=\"p\"}",
        "breakwater_retry_rescued_total{policy=\"p\"} 0",
    ] {
        assert!(
            prom.contains(needle),
            "missing {needle}:\n{}",
            prom.lines().filter(|l| l.contains("retr")).collect::<Vec<_>>().join("\n")
        );
    }
}
