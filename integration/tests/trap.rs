//! A crashed VM is not an outage. A test-only build of the plugin (`--features test-trap`,
//! never the release `.wasm`) traps its VM on a request carrying `x-breakwater-test-trap`;
//! these tests check what traffic sees afterwards under each `failure_policy`, in Envoy 1.40.
//!
//! What they establish (and the README's "Failure modes" section reports):
//! * `FAIL_RELOAD` (shipped): the worker's VM is reloaded and that worker serves again at once;
//!   shared data (breakers, bulkheads, budgets) survives the reload.
//! * `FAIL_CLOSED`: the worker answers 503 on every route until Envoy restarts.
//! * `FAIL_OPEN`: the worker's requests bypass Breakwater until Envoy restarts.
//! * Whatever the policy, what the dead VM held is recovered: its bulkhead permits are
//!   reclaimed after `stale_after` (10 s), a half-open probe it ran after `probe_timeout`, and a
//!   request it had paused in a queue is answered by Envoy's route `idle_timeout` (nothing else
//!   can answer it once the VM that paused it is gone).
//!
//! Requires `BREAKWATER_TRAP_WASM` (set by `make integration`).

use hyper::Method;
use integration::envoy::{Envoy, Reply, Spec};
use integration::start_upstream;
use serde_json::json;
use std::path::PathBuf;
use std::time::{Duration, Instant};

const TRAP: (&str, &[u8]) = ("x-breakwater-test-trap", b"1");

fn trap_wasm() -> PathBuf {
    let p = PathBuf::from(std::env::var("BREAKWATER_TRAP_WASM").expect("BREAKWATER_TRAP_WASM: the test-trap build"));
    assert!(p.is_file(), "{} missing: make integration builds it", p.display());
    p
}

fn spec(up: std::net::SocketAddr, policies: serde_json::Value, failure_policy: &'static str) -> Spec {
    Spec::one_route_per_policy(up, policies).failure_policy(failure_policy).wasm(trap_wasm())
}

/// Sends requests on `conn` every 50 ms until `ok` holds for 5 in a row, or `limit` passes;
/// returns how long it took, and the statuses seen.
async fn until_ok(
    conn: &integration::envoy::Conn,
    path: &str,
    limit: Duration,
    ok: impl Fn(&Reply) -> bool,
) -> (Duration, Vec<u16>) {
    let start = Instant::now();
    let (mut streak, mut seen) = (0, Vec::new());
    while start.elapsed() < limit && streak < 5 {
        match conn.try_request(Method::GET, path, &[]).await {
            Ok(r) => {
                seen.push(r.status);
                streak = if ok(&r) { streak + 1 } else { 0 };
            }
            Err(_) => streak = 0,
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (start.elapsed(), seen)
}

#[tokio::test(flavor = "multi_thread")]
async fn with_fail_reload_a_trapped_worker_serves_again_at_once_and_shared_state_survives() {
    let up = start_upstream().await;
    let policies = json!({ "p": { "circuit_breaker": { "consecutive_failures": 2, "open_for": "30s" } } });
    let envoy = Envoy::start(&spec(up.addr(), policies, "FAIL_RELOAD")).await;
    let conns = envoy.conns_per_worker(2, 2).await;
    // Trip the breaker before the crash: it lives in shared data, not in the VM.
    envoy.get("/p?status=500").await;
    envoy.get("/p?status=500").await;
    envoy.wait_tripped("p", 1).await;
    let trapped = conns[0][0].try_request(Method::GET, "/p", &[TRAP]).await.expect("an answer");
    assert_eq!(trapped.status, 503, "the trapping request itself fails: {trapped:?}");
    let (took, seen) = until_ok(&conns[0][1], "/p", Duration::from_secs(10), |r| r.is_circuit_open()).await;
    println!("FAIL_RELOAD: the trapped worker answered as before after {took:?}: {seen:?}");
    assert!(took < Duration::from_secs(2), "the worker must serve again within a reload backoff: {seen:?}");
    assert!(conns[1][0].get("/p").await.is_circuit_open(), "the other worker never stopped");
    assert!(envoy.stat("wasm.breakwater.vm_reload_success").await >= 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn fail_closed_leaves_the_worker_answering_503_and_fail_open_bypasses_the_plugin() {
    for (policy, expect_ok) in [("FAIL_CLOSED", false), ("FAIL_OPEN", true)] {
        let up = start_upstream().await;
        let policies = json!({ "p": { "circuit_breaker": { "consecutive_failures": 1, "open_for": "30s" } } });
        let envoy = Envoy::start(&spec(up.addr(), policies, policy)).await;
        let conns = envoy.conns_per_worker(2, 2).await;
        envoy.get("/p?status=500").await;
        envoy.wait_tripped("p", 1).await;
        conns[0][0].try_request(Method::GET, "/p", &[TRAP]).await.ok();
        // Three seconds on: FAIL_CLOSED still 503 (not Breakwater's reply: the VM is dead);
        // FAIL_OPEN lets the request through to the upstream although the breaker is open.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let r = conns[0][1].try_request(Method::GET, "/p", &[]).await.expect("an answer");
        println!("{policy}: 3s after the trap the worker answers {} (from upstream: {})", r.status, r.from_upstream());
        if expect_ok {
            assert!(r.from_upstream() && r.status == 200, "{policy}: {r:?}");
        } else {
            assert!(r.status == 503 && r.header("x-breakwater").is_none(), "{policy}: {r:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn what_a_dead_vm_held_comes_back_permits_after_the_reclaim_waiters_by_the_idle_timeout() {
    let up = start_upstream().await;
    let policies = json!({ "p": { "bulkhead": { "max_concurrent": 1, "queue": { "max_size": 4, "timeout": "1s" } } } });
    // Route timeout 5s + queue timeout 1s: a 7s idle timeout answers a waiter whose VM died
    // without ever cutting a request that Breakwater or the route still looks after.
    let spec = spec(up.addr(), policies, "FAIL_RELOAD").idle_timeout(Duration::from_secs(7));
    let envoy = Envoy::start(&spec).await;
    let conns = envoy.conns_per_worker(2, 3).await;
    let (w0, w1) = (&conns[0], &conns[1]);
    let started = Instant::now();
    let (holder, waiter, _) = tokio::join!(
        w0[0].try_request(Method::GET, "/p?delay_ms=600", &[]),
        async {
            tokio::time::sleep(Duration::from_millis(150)).await;
            w0[1].try_request(Method::GET, "/p", &[]).await
        },
        async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            w0[2].try_request(Method::GET, "/p", &[TRAP]).await
        }
    );
    let waited = started.elapsed();
    let waiter = waiter.expect("the waiter is answered");
    println!("holder {:?}; waiter {} after {waited:?}", holder.as_ref().map(|r| r.status), waiter.status);
    // Envoy's stream idle timeout answers it (its 408 turns into a 503 on its way out through
    // the dead filter), at the idle timeout rather than after Envoy's default 300s.
    assert!(!waiter.from_upstream() && waiter.status >= 400, "{waiter:?}");
    assert!((Duration::from_secs(7)..Duration::from_secs(9)).contains(&waited), "answered after {waited:?}");
    // The holder's permit died with its VM: reclaimed after stale_after (10 s of silence).
    let (took, seen) = until_ok(&w1[0], "/p", Duration::from_secs(15), |r| r.status == 200 && r.from_upstream()).await;
    let since_trap = started.elapsed();
    println!("the permit was free again {since_trap:?} after the trap ({took:?} of polling): {seen:?}");
    assert!(since_trap < Duration::from_secs(12), "reclaimed after 10s of silence, not later");
    let b = envoy.wait_bulkhead_idle("p").await;
    assert_eq!((b.active, b.queued), (0, 0), "the gauges heal with the reclaim: {b:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_probe_lost_with_its_vm_holds_the_breaker_only_until_probe_timeout() {
    let up = start_upstream().await;
    let policies = json!({ "p": { "circuit_breaker": {
        "consecutive_failures": 1, "open_for": "1s", "half_open": { "probe_timeout": "2s" } } } });
    let envoy = Envoy::start(&spec(up.addr(), policies, "FAIL_RELOAD")).await;
    let conns = envoy.conns_per_worker(2, 2).await;
    conns[1][0].get("/p?status=500").await;
    envoy.wait_tripped("p", 1).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // The probe goes out on worker 0 and its VM dies while it is in flight.
    let (probe, _) = tokio::join!(conns[0][0].try_request(Method::GET, "/p?delay_ms=500", &[]), async {
        tokio::time::sleep(Duration::from_millis(150)).await;
        conns[0][1].try_request(Method::GET, "/p", &[TRAP]).await
    });
    let lost_at = Instant::now();
    println!("the probe ended {:?}", probe.map(|r| r.status));
    let r = conns[1][0].get("/p").await;
    assert!(r.is_circuit_open(), "its slot is still taken: {r:?}");
    let (took, seen) = until_ok(&conns[1][0], "/p", Duration::from_secs(6), |r| r.status == 200).await;
    println!("a new probe went through {:?} after the loss ({took:?} of polling): {seen:?}", lost_at.elapsed());
    assert!(lost_at.elapsed() < Duration::from_secs(4), "probe_timeout 2s, then one probe closes it");
    let s = envoy.wait_policy("p", |s| s.to_closed == 1).await;
    assert_eq!(s.to_closed, 1, "{s:?}");
}
