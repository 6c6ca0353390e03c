//! Bulkhead admission behind a real Envoy (2 workers): the concurrency limit across workers, the
//! rejection without a queue, the FIFO queue and its timeout, clients that go away, permits that
//! must never leak, priority classes, the wake-up of a waiter on another worker, the breaker in
//! front of the bulkhead, dry-run, and the Prometheus names.
//!
//! The test upstream is the judge of concurrency: it records its own in-flight maximum (in total
//! and by `tag=`) and an arrival log (`id=`, with arrival and finish times on its own clock).
//! Its in-flight interval of a request lies inside the plugin's permit for it (it stops counting
//! when the response body is handed over, before Envoy has the response), so the upstream's
//! maximum can never be above the true number of permits held. The one exception is a client
//! abort: Envoy frees the permit before the upstream notices the closed connection.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use integration::envoy::{BulkheadStats, Call, Conn, Envoy, Reply, CLOSED, OPEN};
use integration::setup;
use integration::upstream::{Arrival, Stats, Upstream};
use serde_json::{json, Value};
use tokio::task::JoinHandle;

/// A GET on a new connection, in the background.
fn spawn_get(envoy: &Envoy, path: &str) -> JoinHandle<Reply> {
    let (addr, call) = (envoy.listener(), Call::get(path));
    tokio::spawn(async move { call.send(addr).await.expect("no give-up set") })
}

/// Polls the upstream until `f` holds; panics after 5s naming `what`.
async fn wait_upstream(up: &Upstream, what: &str, f: impl Fn(&Stats) -> bool) -> Stats {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let s = up.stats();
        if f(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "upstream: {what} never happened: {}", brief(&s));
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Polls the bulkhead stats until `f` holds; panics after 5s naming `what`.
async fn wait_bulkhead(envoy: &Envoy, policy: &str, what: &str, f: impl Fn(&BulkheadStats) -> bool) -> BulkheadStats {
    let s = envoy.wait_bulkhead(policy, &f).await;
    assert!(f(&s), "bulkhead {policy}: {what} never happened: {s:?}");
    s
}

/// Idle afterwards: no permit held, nobody waiting.
async fn assert_idle(envoy: &Envoy, policy: &str) -> BulkheadStats {
    let s = envoy.wait_bulkhead_idle(policy).await;
    assert_eq!((s.active, s.queued), (0, 0), "bulkhead {policy} should be idle: {s:?}");
    s
}

fn assert_passed(r: &Reply) {
    assert_eq!((r.status, r.from_upstream()), (200, true), "{r:?}");
    assert!(r.header("x-breakwater").is_none(), "{r:?}");
}

/// A bulkhead rejection of `kind` (`bulkhead-full`, `queue-timeout`) with the default status.
fn assert_rejected(r: &Reply, kind: &str) {
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(r.header("x-breakwater"), Some(kind), "{r:?}");
    assert_eq!(r.retry_after(), Some(1), "{r:?}");
    assert!(!r.from_upstream(), "a rejected request must not come from the upstream: {r:?}");
}

/// The upstream's counters for a failure message: the arrival log only by its length.
fn brief(s: &Stats) -> String {
    let Stats { requests, in_flight, max_in_flight, responses_by_status, resets, .. } = s;
    format!(
        "upstream: requests {requests}, in flight {in_flight} (max {max_in_flight}), by tag {:?} (max {:?}), \
         statuses {responses_by_status:?}, resets {resets}, {} logged arrivals",
        s.in_flight_by_tag,
        s.max_in_flight_by_tag,
        s.arrivals.len()
    )
}

fn ids(log: &[Arrival]) -> Vec<&str> {
    log.iter().map(|a| a.id.as_str()).collect()
}

fn arrival<'a>(log: &'a [Arrival], id: &str) -> &'a Arrival {
    log.iter().find(|a| a.id == id).unwrap_or_else(|| panic!("{id} never reached the upstream: {log:?}"))
}

/// The most requests of `log` (filtered by `keep`) in flight at once at the upstream.
fn max_overlap(log: &[Arrival], keep: impl Fn(&Arrival) -> bool) -> usize {
    let mut events: Vec<(u64, i32)> = Vec::new();
    for a in log.iter().filter(|a| keep(a)) {
        assert!(a.finished_us > 0, "still running: {a:?}");
        events.push((a.arrived_us, 1));
        events.push((a.finished_us, -1));
    }
    // At equal times an end comes before a start.
    events.sort();
    let (mut now, mut max) = (0i32, 0i32);
    for (_, d) in events {
        now += d;
        max = max.max(now);
    }
    max as usize
}

/// Per-worker connections accepted between two readings.
fn per_worker(before: &[i64], after: &[i64]) -> Vec<i64> {
    after.iter().zip(before.iter().chain(std::iter::repeat(&0))).map(|(a, b)| a - b).collect()
}

/// `max_concurrent` is exact across both workers: 64 clients, each request on its own connection,
/// 320 requests of 50ms against a limit of 8 with room for everyone in the queue. The upstream
/// sees 8 at once, never 9; all get 200; the gauges return to 0.
#[tokio::test(flavor = "multi_thread")]
async fn limit_holds_exactly_across_workers() {
    let (up, envoy) =
        setup(json!({ "p": { "bulkhead": { "max_concurrent": 8, "queue": { "max_size": 200, "timeout": "10s" } } } }))
            .await;
    let workers_before = envoy.worker_connections().await;
    let replies = envoy.send_all(64, (0..320).map(|_| Call::get("/p?delay_ms=50")).collect()).await;
    for r in &replies {
        assert_passed(r.as_ref().expect("no client gives up"));
    }
    let s = wait_upstream(&up, "all finished", |s| s.in_flight == 0).await;
    assert_eq!(s.requests, 320, "{}", brief(&s));
    assert_eq!(s.max_in_flight, 8, "the upstream must see exactly max_concurrent at once: {}", brief(&s));
    let b = assert_idle(&envoy, "p").await;
    assert_eq!((b.admitted, b.full, b.queue_timeout), (320, 0, 0), "{b:?}");
    assert!(b.waited > 0 && b.waited <= 320, "64 clients against 8 permits must wait: {b:?}");
    let spread = per_worker(&workers_before, &envoy.worker_connections().await);
    assert!(spread.len() == 2 && spread.iter().all(|&n| n > 0), "both workers took connections: {spread:?}");
}

/// The limit holds from a policy's very first request on, when its shared state does not exist
/// yet: for each of 16 fresh policies (max_concurrent 1, no queue), one request on each worker
/// at the same instant is the policy's first. Exactly one of the two may pass; the other is
/// refused; the active gauge returns to 0.
#[tokio::test(flavor = "multi_thread")]
async fn the_limit_holds_from_the_first_request_on() {
    let names: Vec<String> = (b'a'..=b'p').map(|c| format!("first_{}", c as char)).collect();
    let policies = names.iter().map(|n| (n.clone(), json!({ "bulkhead": { "max_concurrent": 1 } }))).collect();
    let (up, envoy) = setup(Value::Object(policies)).await;
    let conns = envoy.conn_per_worker(2).await;
    let mut both_passed = Vec::new();
    for n in &names {
        let path = format!("/{n}?tag={n}&delay_ms=100");
        let (a, b) = tokio::join!(conns[0].get(&path), conns[1].get(&path));
        match [&a, &b].iter().filter(|r| r.status == 200).count() {
            1 => {}
            2 => both_passed.push(n.as_str()),
            _ => panic!("{n}: one of the two must pass: {a:?} {b:?}"),
        }
        [&a, &b].iter().filter(|r| r.status == 200).for_each(|r| assert_passed(r));
        [&a, &b].iter().filter(|r| r.status != 200).for_each(|r| assert_rejected(r, "bulkhead-full"));
    }
    let s = wait_upstream(&up, "all finished", |s| s.in_flight == 0).await;
    let over: Vec<&str> =
        names.iter().filter(|n| s.max_in_flight_by_tag.get(n.as_str()) != Some(&1)).map(String::as_str).collect();
    envoy.wait_bulkhead_idle(names.last().unwrap()).await;
    let stats = envoy.stats().await;
    let stuck: Vec<(&str, i64)> = names
        .iter()
        .map(|n| (n.as_str(), BulkheadStats::from_stats(&stats, n).active))
        .filter(|&(_, active)| active != 0)
        .collect();
    assert!(
        both_passed.is_empty() && over.is_empty() && stuck.is_empty(),
        "max_concurrent 1 broken on a policy's first requests: both admitted for {both_passed:?} (upstream \
         saw 2 at once for {over:?}); bulkhead_active left non-zero with nothing in flight: {stuck:?}"
    );
}

/// Without a queue, an over-limit request is refused at once with the policy's reject status,
/// `x-breakwater: bulkhead-full` and `retry-after: 1`, and never reaches the upstream.
#[tokio::test(flavor = "multi_thread")]
async fn without_a_queue_over_limit_requests_are_refused_at_once() {
    let (up, envoy) = setup(json!({
        "p": { "bulkhead": { "max_concurrent": 4 } },
        "q": { "bulkhead": { "max_concurrent": 1 }, "reject": { "status": 429 } }
    }))
    .await;
    let replies: Vec<Reply> = envoy
        .send_all(64, (0..64).map(|_| Call::get("/p?delay_ms=600")).collect())
        .await
        .into_iter()
        .map(|r| r.expect("no client gives up"))
        .collect();
    let ok = replies.iter().filter(|r| r.status == 200).count();
    for r in replies.iter().filter(|r| r.status != 200) {
        assert_rejected(r, "bulkhead-full");
    }
    replies.iter().filter(|r| r.status == 200).for_each(assert_passed);
    let s = wait_upstream(&up, "all finished", |s| s.in_flight == 0).await;
    assert_eq!(s.requests as usize, ok, "only the admitted reached the upstream: {}", brief(&s));
    assert_eq!(s.max_in_flight, 4, "{}", brief(&s));
    assert!(ok < 64, "64 requests of 600ms at once must overflow 4 permits: {ok} passed");
    let b = assert_idle(&envoy, "p").await;
    assert_eq!((b.admitted, b.full, b.waited, b.queue_timeout), (ok as i64, 64 - ok as i64, 0, 0), "{b:?}");

    // The rejection is immediate (the holder has most of its second left) and uses the
    // policy's reject status.
    let holder = spawn_get(&envoy, "/q?delay_ms=1000");
    wait_bulkhead(&envoy, "q", "the holder's admission", |b| b.active == 1).await;
    let t = Instant::now();
    let r = envoy.get("/q").await;
    assert!(t.elapsed() < Duration::from_millis(500), "not refused at once: {:?}", t.elapsed());
    assert_eq!((r.status, r.header("x-breakwater"), r.retry_after()), (429, Some("bulkhead-full"), Some(1)), "{r:?}");
    assert_passed(&holder.await.unwrap());
    assert_eq!(up.stats().by_path.get("/q"), Some(&1));
}

/// The queue is FIFO across workers: while one request holds the only permit, 8 requests are
/// queued one after another, alternating between the two workers (each is seen queued before
/// the next is sent). The upstream receives them in exactly that order, one at a time.
#[tokio::test(flavor = "multi_thread")]
async fn queued_requests_are_admitted_in_arrival_order_across_workers() {
    let (up, envoy) =
        setup(json!({ "p": { "bulkhead": { "max_concurrent": 1, "queue": { "max_size": 16, "timeout": "10s" } } } }))
            .await;
    let mut pinned = envoy.conns_per_worker(2, 4).await;
    let (mut w1, mut w0) = (pinned.pop().unwrap(), pinned.pop().unwrap());
    // w0[0], w1[0], w0[1], w1[1], …
    let mut conns: Vec<Conn> = Vec::new();
    while let (Some(a), Some(b)) = (w0.pop(), w1.pop()) {
        conns.push(a);
        conns.push(b);
    }
    let holder = spawn_get(&envoy, "/p?id=holder&delay_ms=1500");
    wait_upstream(&up, "the holder's arrival", |s| s.in_flight == 1).await;

    let mut waiters = Vec::new();
    let mut sent = Vec::new();
    for (i, conn) in conns.into_iter().enumerate() {
        let id = format!("w{i}-worker{}", conn.worker().unwrap());
        let path = format!("/p?id={id}&delay_ms=10");
        waiters.push(tokio::spawn(async move { conn.get(&path).await }));
        sent.push(id);
        wait_bulkhead(&envoy, "p", &format!("{} queued", i + 1), |b| b.queued == i as i64 + 1).await;
    }
    assert_eq!(up.stats().in_flight, 1, "all 8 must be queued while the holder runs");
    assert_passed(&holder.await.unwrap());
    for w in waiters {
        assert_passed(&w.await.unwrap());
    }
    let s = wait_upstream(&up, "all finished", |s| s.in_flight == 0).await;
    let mut want = vec!["holder"];
    want.extend(sent.iter().map(String::as_str));
    assert_eq!(ids(&s.arrivals), want, "admitted in send order");
    for pair in s.arrivals.windows(2) {
        assert!(pair[1].arrived_us >= pair[0].finished_us, "one at a time: {pair:?}");
    }
    let b = assert_idle(&envoy, "p").await;
    assert_eq!((b.admitted, b.waited, b.full, b.queue_timeout), (9, 8, 0, 0), "{b:?}");
}

/// A queued request is refused with `x-breakwater: queue-timeout` once its queue timeout has
/// passed: no earlier than 500ms, and not much later (the contract allows one sync interval of
/// 50ms; the bound here is 300ms for a busy machine). It never reaches the upstream.
#[tokio::test(flavor = "multi_thread")]
async fn a_queued_request_times_out_on_schedule() {
    let (up, envoy) =
        setup(json!({ "p": { "bulkhead": { "max_concurrent": 1, "queue": { "max_size": 4, "timeout": "500ms" } } } }))
            .await;
    let holder = spawn_get(&envoy, "/p?id=holder&delay_ms=2000");
    wait_upstream(&up, "the holder's arrival", |s| s.in_flight == 1).await;

    let conn = Conn::open(envoy.listener()).await;
    let t = Instant::now();
    let r = conn.get("/p?id=waiter").await;
    let waited = t.elapsed();
    assert_rejected(&r, "queue-timeout");
    println!("queue timeout 500ms: rejected after {waited:?}");
    assert!(
        waited >= Duration::from_millis(500) && waited < Duration::from_millis(800),
        "rejected after {waited:?}, want 500ms..800ms"
    );
    let b = wait_bulkhead(&envoy, "p", "the timeout counted", |b| b.queue_timeout == 1 && b.queued == 0).await;
    assert_eq!((b.active, b.queued, b.queue_timeout, b.full, b.admitted), (1, 0, 1, 0, 1), "{b:?}");
    assert_passed(&holder.await.unwrap());
    let s = wait_upstream(&up, "the holder finished", |s| s.in_flight == 0).await;
    assert_eq!(ids(&s.arrivals), ["holder"], "the timed-out request never reached the upstream");
    let b = assert_idle(&envoy, "p").await;
    assert_eq!(b.queue_timeout, 1, "{b:?}");
}

/// A queued client that closes its connection leaves the queue at once, and leaves nothing
/// behind: the next queued request is admitted as soon as the holder finishes (no permit handed
/// to the ghost), and the ghost never reaches the upstream.
#[tokio::test(flavor = "multi_thread")]
async fn a_waiting_client_that_goes_away_leaves_the_queue() {
    let (up, envoy) =
        setup(json!({ "p": { "bulkhead": { "max_concurrent": 1, "queue": { "max_size": 4, "timeout": "10s" } } } }))
            .await;
    let holder = spawn_get(&envoy, "/p?id=holder&delay_ms=1200");
    wait_upstream(&up, "the holder's arrival", |s| s.in_flight == 1).await;

    let ghost = spawn_get(&envoy, "/p?id=ghost");
    wait_bulkhead(&envoy, "p", "the ghost queued", |b| b.queued == 1).await;
    // Dropping the client task closes its connection.
    ghost.abort();
    let b = wait_bulkhead(&envoy, "p", "the ghost gone from the queue", |b| b.queued == 0).await;
    assert_eq!((b.active, b.queued), (1, 0), "{b:?}");

    let next = spawn_get(&envoy, "/p?id=next");
    wait_bulkhead(&envoy, "p", "next queued", |b| b.queued == 1).await;
    assert_passed(&holder.await.unwrap());
    let t = Instant::now();
    assert_passed(&next.await.unwrap());
    assert!(t.elapsed() < Duration::from_millis(500), "next was held back after the holder: {:?}", t.elapsed());
    let s = wait_upstream(&up, "all finished", |s| s.in_flight == 0).await;
    assert_eq!(ids(&s.arrivals), ["holder", "next"], "the ghost must never reach the upstream");
    let gap = s.arrivals[1].arrived_us - s.arrivals[0].finished_us;
    assert!(gap < 250_000, "next admitted {gap}µs after the holder finished");
    let b = assert_idle(&envoy, "p").await;
    assert_eq!((b.admitted, b.waited, b.queue_timeout, b.full), (2, 1, 0, 0), "{b:?}");
}

/// No permit leaks: 400 requests from 64 clients, 10% of them abandoned by their client (some
/// while queued, some while at the upstream) and 5% reset by the upstream. Afterwards nothing is
/// held or queued, and a fresh burst still gets exactly `max_concurrent` through at once.
/// (One request first creates the policy's shared state, so that a race on its creation, tested
/// on its own above, cannot pass for a leak here.)
#[tokio::test(flavor = "multi_thread")]
async fn no_permit_leaks_after_client_aborts_and_upstream_resets() {
    let (up, envoy) =
        setup(json!({ "p": { "bulkhead": { "max_concurrent": 8, "queue": { "max_size": 256, "timeout": "10s" } } } }))
            .await;
    assert_passed(&envoy.get("/p/warm-up").await);
    assert_idle(&envoy, "p").await;
    let calls: Vec<Call> = (0..400)
        .map(|i| match i % 20 {
            // Gives up early, usually while still queued.
            5 => Call::get(format!("/p?id=q{i}&delay_ms=300&reset_pct=5")).give_up_after(Duration::from_millis(100)),
            // Gives up while the upstream is working on it.
            15 => Call::get(format!("/p?id=a{i}&delay_ms=2000&reset_pct=5")).give_up_after(Duration::from_millis(400)),
            _ => Call::get(format!("/p?id=n{i}&delay_ms=20&reset_pct=5")),
        })
        .collect();
    let replies = envoy.send_all(64, calls).await;
    let gave_up = replies.iter().filter(|r| r.is_none()).count();
    let upstream_reset = replies.iter().flatten().filter(|r| r.status == 503 && !r.from_upstream()).count();
    for r in replies.iter().flatten() {
        assert!(r.header("x-breakwater").is_none(), "nobody should be rejected: {r:?}");
        assert!(r.status == 200 || (r.status == 503 && !r.from_upstream()), "200 or Envoy's reset reply: {r:?}");
    }
    let s = wait_upstream(&up, "all finished", |s| s.in_flight == 0).await;
    let aborted_at_upstream = s.arrivals.iter().filter(|a| a.id.starts_with('a')).count();
    println!(
        "client aborts: {gave_up} (reached the upstream first: {aborted_at_upstream}); upstream resets: {}",
        s.resets
    );
    assert_eq!(gave_up, 40, "every 10th call is abandoned");
    assert!(aborted_at_upstream > 0, "some aborts must happen while the upstream holds the request");
    assert!(s.resets > 0 && upstream_reset > 0, "some requests must be reset: {} / {upstream_reset}", s.resets);
    // No check of the upstream's maximum here: when a client aborts, Envoy frees the permit
    // before the upstream sees the connection close, so for a few hundred µs the upstream may
    // count one request more than the permits held (measured: 9 at 100–450µs overlaps).
    let after_run = envoy.wait_bulkhead_idle("p").await;
    assert_eq!((after_run.full, after_run.queue_timeout), (0, 0), "{after_run:?}");

    // Every permit came back: a fresh burst gets exactly 8 through at once. (Run even if the
    // gauges above are off, so a failure tells a leaked permit from a drifted gauge.)
    up.reset_stats();
    let replies = envoy.send_all(64, (0..64).map(|_| Call::get("/p/again?delay_ms=100")).collect()).await;
    replies.iter().for_each(|r| assert_passed(r.as_ref().unwrap()));
    let s = wait_upstream(&up, "the burst finished", |s| s.in_flight == 0).await;
    let after_burst = envoy.wait_bulkhead_idle("p").await;
    assert!(
        (after_run.active, after_run.queued, s.requests, s.max_in_flight) == (0, 0, 64, 8)
            && (after_burst.active, after_burst.queued) == (0, 0),
        "after the run: {after_run:?}; a fresh burst of 64 reached the upstream {} at once (a leaked permit shows \
         as fewer than 8); after the burst: {after_burst:?}",
        s.max_in_flight
    );
}

/// Priority classes under a flood: of 10 permits, 4 are reserved for `critical`, and
/// `background` may hold at most 3. 64 background clients and 16 standard clients (no header:
/// the default class) flood the route, without a queue, while 3 critical clients send 5
/// requests each. Every critical request is admitted; background never holds more than 3 at
/// the upstream; the non-critical classes together never more than the 6 unreserved permits,
/// and they do fill them.
#[tokio::test(flavor = "multi_thread")]
async fn priority_reservation_and_class_limit_under_a_background_flood() {
    let (up, envoy) = setup(json!({ "p": { "bulkhead": {
        "max_concurrent": 10,
        "priority": {
            "header": "x-priority",
            "default": "standard",
            "classes": { "critical": { "reserved": 4 }, "background": { "max": 3 } }
        }
    } } }))
    .await;
    let addr = envoy.listener();
    let stop = Arc::new(AtomicBool::new(false));
    let seq = Arc::new(AtomicU64::new(0));
    // (class, passed, refused) per flood client.
    let mut flood = Vec::new();
    for k in 0..80 {
        let (stop, seq) = (stop.clone(), seq.clone());
        let class = if k < 64 { "background" } else { "standard" };
        flood.push(tokio::spawn(async move {
            let (mut passed, mut refused) = (0u32, 0u32);
            while !stop.load(Ordering::Relaxed) {
                let n = seq.fetch_add(1, Ordering::Relaxed);
                let mut call = Call::get(format!("/p?tag={class}&id={class}{n}&delay_ms=100"));
                if class == "background" {
                    call = call.header("x-priority", "background");
                }
                let r = call.send(addr).await.unwrap();
                if r.status == 200 {
                    assert_passed(&r);
                    passed += 1;
                } else {
                    assert_rejected(&r, "bulkhead-full");
                    refused += 1;
                    // Pace the retry so the flood does not starve the machine.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            (class, passed, refused)
        }));
    }
    let busy = |s: &Stats, tag: &str| s.in_flight_by_tag.get(tag).copied().unwrap_or(0);
    wait_upstream(&up, "the flood saturating the unreserved permits", |s| {
        busy(s, "background") == 3 && busy(s, "standard") >= 3
    })
    .await;

    let critical: Vec<_> = (0..3)
        .map(|c| {
            tokio::spawn(async move {
                let mut replies = Vec::new();
                for i in 0..5 {
                    let call = Call::get(format!("/p?tag=critical&id=critical{c}-{i}&delay_ms=100"))
                        .header("x-priority", "critical");
                    replies.push(call.send(addr).await.unwrap());
                }
                replies
            })
        })
        .collect();
    let mut critical_replies = Vec::new();
    for c in critical {
        critical_replies.extend(c.await.unwrap());
    }
    stop.store(true, Ordering::Relaxed);
    let (mut passed, mut refused) = (std::collections::BTreeMap::new(), std::collections::BTreeMap::new());
    for f in flood {
        let (class, p, r) = f.await.unwrap();
        *passed.entry(class).or_insert(0u32) += p;
        *refused.entry(class).or_insert(0u32) += r;
    }
    println!("flood passed {passed:?}, refused {refused:?}");

    let rejected_critical: Vec<&Reply> = critical_replies.iter().filter(|r| r.status != 200).collect();
    assert!(rejected_critical.is_empty(), "critical requests were refused under the flood: {rejected_critical:?}");
    critical_replies.iter().for_each(assert_passed);
    let s = wait_upstream(&up, "all finished", |s| s.in_flight == 0).await;
    assert_eq!(s.max_in_flight_by_tag.get("background"), Some(&3), "background is capped at 3: {}", brief(&s));
    assert_eq!(s.max_in_flight_by_tag.get("critical"), Some(&3), "the 3 critical clients ran side by side");
    let non_critical = max_overlap(&s.arrivals, |a| !a.id.starts_with("critical"));
    assert_eq!(non_critical, 6, "standard + background fill exactly the 6 unreserved permits");
    assert!(s.max_in_flight <= 10, "{:?}", s.max_in_flight);
    assert!(refused["background"] > 0 && refused["standard"] > 0, "the flood must overflow: {refused:?}");
    let b = assert_idle(&envoy, "p").await;
    assert_eq!(b.full as u32, refused.values().sum::<u32>(), "{b:?}");
}

/// Latency of handing a freed permit to a waiter on the other worker. The permit (limit 1) is
/// held for 30ms by a request on one worker while a request on the other waits; the upstream's
/// clock gives the gap from the holder's finish to the waiter's arrival. Also measured on the
/// same worker, for comparison. A sanity bound only: p99 under 100ms.
#[tokio::test(flavor = "multi_thread")]
async fn cross_worker_wake_up_latency() {
    let (up, envoy) =
        setup(json!({ "p": { "bulkhead": { "max_concurrent": 1, "queue": { "max_size": 4, "timeout": "5s" } } } }))
            .await;
    let pinned = envoy.conns_per_worker(2, 2).await;
    let (w0, w1) = (&pinned[0], &pinned[1]);

    let cross: Vec<_> = (0..60).map(|i| if i % 2 == 0 { (&w0[0], &w1[0]) } else { (&w1[0], &w0[0]) }).collect();
    let same: Vec<_> = (0..30).map(|i| if i % 2 == 0 { (&w0[0], &w0[1]) } else { (&w1[0], &w1[1]) }).collect();
    let cross = wake_up_rounds(&up, &envoy, "x", cross).await;
    let same = wake_up_rounds(&up, &envoy, "s", same).await;

    let summary = |name: &str, mut v: Vec<u64>| {
        v.sort_unstable();
        let q = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
        let (p50, p99, max) = (q(0.50), q(0.99), *v.last().unwrap());
        println!(
            "wake-up gap, holder finished -> waiter arrived (upstream clock), {name}: n={} p50={:.2}ms p99={:.2}ms max={:.2}ms",
            v.len(),
            p50 as f64 / 1000.0,
            p99 as f64 / 1000.0,
            max as f64 / 1000.0
        );
        p99
    };
    assert!(cross.len() >= 54 && same.len() >= 27, "too few rounds waited: {} / {}", cross.len(), same.len());
    let p99 = summary("across workers", cross);
    summary("same worker", same);
    assert!(p99 < 100_000, "cross-worker wake-up p99 {p99}µs");
}

/// One round per (holder, waiter) pair: the holder takes the only permit for 30ms, the waiter is
/// sent once the holder is at the upstream. Returns the gaps (µs, upstream clock) from the
/// holder's finish to the waiter's arrival, of the rounds in which the waiter really waited.
async fn wake_up_rounds(up: &Upstream, envoy: &Envoy, kind: &str, pairs: Vec<(&Conn, &Conn)>) -> Vec<u64> {
    let mut gaps = Vec::new();
    for (i, (holder, waiter)) in pairs.into_iter().enumerate() {
        let before = envoy.bulkhead("p").await;
        let (h, w) = (format!("{kind}-h{i}"), format!("{kind}-w{i}"));
        let (hold_path, wait_path) = (format!("/p?id={h}&delay_ms=30"), format!("/p?id={w}"));
        let (hr, wr) = tokio::join!(holder.get(&hold_path), async {
            wait_upstream(up, "the holder's arrival", |s| s.arrivals.last().is_some_and(|a| a.id == h)).await;
            waiter.get(&wait_path).await
        });
        assert_passed(&hr);
        assert_passed(&wr);
        // Stats reach Envoy on each worker's tick: wait for both admissions to be counted.
        let b =
            wait_bulkhead(envoy, "p", "the round accounted", |b| b.active == 0 && b.admitted == before.admitted + 2)
                .await;
        let log = wait_upstream(up, "the round finished", |s| s.in_flight == 0).await.arrivals;
        let (ha, wa) = (arrival(&log, &h), arrival(&log, &w));
        assert!(wa.arrived_us >= ha.finished_us, "the waiter overtook the holder: {ha:?} {wa:?}");
        if b.waited > before.waited {
            gaps.push(wa.arrived_us - ha.finished_us);
        }
    }
    gaps
}

/// The breaker comes first and the two do not mix: bulkhead-full rejections (503s) are not
/// breaker failures, so the breaker stays closed; and once the breaker is open, its rejections
/// take no permit and never reach the upstream.
#[tokio::test(flavor = "multi_thread")]
async fn breaker_and_bulkhead_compose() {
    let (up, envoy) = setup(json!({ "p": {
        "circuit_breaker": { "consecutive_failures": 2, "open_for": "3s" },
        "bulkhead": { "max_concurrent": 2 }
    } }))
    .await;
    // Two holders fill the permits; 10 more are refused by the bulkhead.
    let holders = [spawn_get(&envoy, "/p?delay_ms=800"), spawn_get(&envoy, "/p?delay_ms=800")];
    wait_upstream(&up, "both holders' arrival", |s| s.in_flight == 2).await;
    for r in envoy.get_concurrently(vec!["/p".to_owned(); 10]).await {
        assert_rejected(&r, "bulkhead-full");
    }
    for h in holders {
        assert_passed(&h.await.unwrap());
    }
    let s = envoy.wait_policy("p", |s| s.success == 2).await;
    assert_eq!(
        (s.success, s.failure, s.ignored, s.rejections, s.to_open, s.state),
        (2, 0, 0, 0, 0, CLOSED),
        "10 bulkhead-full 503s must not count in the breaker: {s:?}"
    );
    assert_eq!(envoy.bulkhead("p").await.full, 10);
    assert_passed(&envoy.get("/p").await);

    // A holder takes one permit; two failures through the other trip the breaker.
    let holder = spawn_get(&envoy, "/p?delay_ms=1500");
    wait_upstream(&up, "the holder's arrival", |s| s.in_flight == 1).await;
    for r in envoy.send_recorded("p", "/p?status=500", 2).await {
        assert_eq!((r.status, r.from_upstream()), (500, true), "{r:?}");
    }
    let s = envoy.wait_tripped("p", 1).await;
    assert_eq!((s.to_open, s.state), (1, OPEN), "{s:?}");
    let requests = up.stats().requests;
    let before = envoy.bulkhead("p").await;
    assert_eq!(before.active, 1, "only the holder: {before:?}");

    // With one permit free and the breaker open, every request is refused by the breaker and
    // takes no permit.
    for r in envoy.get_concurrently(vec!["/p".to_owned(); 10]).await {
        assert_eq!(r.status, 503, "{r:?}");
        assert!(r.is_circuit_open() && !r.from_upstream(), "the breaker answers first: {r:?}");
    }
    let s = envoy.wait_policy("p", |s| s.rejections == 10).await;
    assert_eq!(s.rejections, 10, "{s:?}");
    let after = envoy.bulkhead("p").await;
    assert_eq!(after, before, "breaker rejections must not touch the bulkhead");
    assert_eq!(up.stats().requests, requests, "nor reach the upstream");
    assert_passed(&holder.await.unwrap());
    let b = assert_idle(&envoy, "p").await;
    assert_eq!((b.admitted, b.full), (before.admitted, 10), "{b:?}");
}

/// dry_run: with 2 permits and no queue, 16 concurrent requests all reach the upstream
/// untouched, and the ones enforce would have refused are counted as dry-run rejections only.
#[tokio::test(flavor = "multi_thread")]
async fn dry_run_counts_but_admits_everyone() {
    let (up, envoy) = setup(json!({ "d": { "mode": "dry_run", "bulkhead": { "max_concurrent": 2 } } })).await;
    let replies = envoy.send_all(16, (0..16).map(|_| Call::get("/d?delay_ms=400")).collect()).await;
    replies.iter().for_each(|r| assert_passed(r.as_ref().unwrap()));
    let s = wait_upstream(&up, "all finished", |s| s.in_flight == 0).await;
    assert_eq!(s.requests, 16);
    assert!(s.max_in_flight > 2, "dry run must hold nobody back: {}", brief(&s));
    let b = wait_bulkhead(&envoy, "d", "the dry-run rejections counted", |b| b.dry_run_full > 0).await;
    assert!(
        (s.max_in_flight as i64 - 2..=14).contains(&b.dry_run_full),
        "with {} in flight at once, at least {} would have been refused: {b:?}",
        s.max_in_flight,
        s.max_in_flight - 2
    );
    assert_eq!((b.full, b.queue_timeout, b.waited), (0, 0, 0), "{b:?}");
    assert_idle(&envoy, "d").await;
}

/// The bulkhead stats under their Prometheus names (the shipped tag extractors make the policy
/// and reason labels): after one admission, one wait, one refusal and one queue timeout.
#[tokio::test(flavor = "multi_thread")]
async fn prometheus_names() {
    let (up, envoy) =
        setup(json!({ "p": { "bulkhead": { "max_concurrent": 1, "queue": { "max_size": 1, "timeout": "500ms" } } } }))
            .await;
    let holder = spawn_get(&envoy, "/p?delay_ms=800");
    wait_upstream(&up, "the holder's arrival", |s| s.in_flight == 1).await;
    let timing_out = spawn_get(&envoy, "/p");
    wait_bulkhead(&envoy, "p", "one queued", |b| b.queued == 1).await;
    assert_rejected(&envoy.get("/p").await, "bulkhead-full");
    assert_rejected(&timing_out.await.unwrap(), "queue-timeout");
    // Queued after the timeout, admitted when the holder finishes.
    let waiter = spawn_get(&envoy, "/p");
    assert_passed(&holder.await.unwrap());
    assert_passed(&waiter.await.unwrap());
    let b = assert_idle(&envoy, "p").await;
    assert_eq!((b.admitted, b.waited, b.full, b.queue_timeout), (2, 1, 1, 1), "{b:?}");

    let text = envoy.prometheus().await;
    let shown = || text.lines().filter(|l| l.contains("breakwater_")).collect::<Vec<_>>().join("\n");
    for line in [
        "# TYPE breakwater_bulkhead_active gauge",
        r#"breakwater_bulkhead_active{policy="p"} 0"#,
        "# TYPE breakwater_bulkhead_queued gauge",
        r#"breakwater_bulkhead_queued{policy="p"} 0"#,
        r#"breakwater_bulkhead_limit{policy="p"} 1"#,
        "# TYPE breakwater_bulkhead_admitted_total counter",
        r#"breakwater_bulkhead_admitted_total{policy="p"} 2"#,
        r#"breakwater_bulkhead_waited_total{policy="p"} 1"#,
        r#"breakwater_rejections_total{policy="p",reason="bulkhead_full"} 1"#,
        r#"breakwater_rejections_total{policy="p",reason="queue_timeout"} 1"#,
        "# TYPE breakwater_bulkhead_queue_wait_milliseconds histogram",
    ] {
        assert!(text.lines().any(|l| l == line), "missing `{line}` in:\n{}", shown());
    }
    // Only what the policy has: no breaker, so no breaker series.
    assert!(!text.contains("breakwater_circuit_state") && !text.contains("breakwater_requests_total"), "{}", shown());
    assert!(
        text.lines().any(|l| l.starts_with(r#"breakwater_bulkhead_queue_wait_milliseconds_count{policy="p"}"#)),
        "no queue-time histogram for p:\n{}",
        shown()
    );
    assert!(!text.contains("wasmcustom"), "no untagged names:\n{}", shown());
    assert_eq!(up.stats().requests, 2, "only the holder and the waiter reached the upstream");
}

/// gRPC over HTTP/2 through the queue: a waiting gRPC call that times out gets a trailers-only
/// gRPC reply (UNAVAILABLE, `x-breakwater: queue-timeout`), although Breakwater sends it from its
/// tick rather than from the request's own callback; one that a freed permit wakes goes through
/// to the upstream.
#[tokio::test(flavor = "multi_thread")]
async fn grpc_calls_wait_and_time_out_as_grpc() {
    let (up, envoy) =
        setup(json!({ "p": { "bulkhead": { "max_concurrent": 1, "queue": { "max_size": 4, "timeout": "300ms" } } } }))
            .await;
    let grpc = [("content-type", "application/grpc"), ("te", "trailers")];
    let holder = spawn_get(&envoy, "/p?delay_ms=800");
    wait_bulkhead(&envoy, "p", "the holder admitted", |b| b.active == 1).await;
    let t = Instant::now();
    let r = envoy
        .h2_request(hyper::Method::POST, "/p/pkg.Svc/Call?grpc_status=0", &grpc, bytes::Bytes::from_static(&[0; 5]))
        .await;
    assert_eq!((r.status, r.header("grpc-status")), (200, Some("14")), "trailers-only UNAVAILABLE: {r:?}");
    assert!(r.is_queue_timeout(), "{r:?}");
    assert!(r.header("grpc-message").is_some_and(|m| m.contains("queue-timeout")), "{r:?}");
    assert!(t.elapsed() >= Duration::from_millis(300), "{:?}", t.elapsed());
    assert_passed(&holder.await.unwrap());

    // Now a gRPC call waits behind a short holder and is woken.
    let holder = spawn_get(&envoy, "/p?delay_ms=100");
    wait_bulkhead(&envoy, "p", "the holder admitted", |b| b.active == 1).await;
    let r = envoy
        .h2_request(hyper::Method::POST, "/p/pkg.Svc/Call?grpc_status=0", &grpc, bytes::Bytes::from_static(&[0; 5]))
        .await;
    // The upstream's own answer: grpc-status comes in its trailers, and no Breakwater header.
    assert!(r.from_upstream() && r.status == 200 && r.header("x-breakwater").is_none(), "woken: {r:?}");
    assert_passed(&holder.await.unwrap());
    let b = assert_idle(&envoy, "p").await;
    assert_eq!((b.waited, b.queue_timeout), (1, 1), "{b:?}");
    assert_eq!(up.stats().requests, 3, "two holders and the woken call");
}
