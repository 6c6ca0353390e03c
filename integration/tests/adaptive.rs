//! Adaptive timeouts, priority load shedding and adaptive concurrency limits behind a real Envoy
//! (2 workers), against the test upstream. Timings are asserted with wide margins: the machine
//! is shared; what is checked is behaviour (a timeout that moved, an order of shedding, a limit
//! that fell and rose again). `--nocapture` prints the figures.

use std::future::Future;
use std::time::{Duration, Instant};

use integration::envoy::{Call, Envoy, Reply, Spec};
use integration::start_upstream;
use serde_json::{json, Value};

/// A plugin configuration with the one policy `api` for the route `api`.
fn api(policy: Value) -> Value {
    json!({ "policies": { "api": policy }, "routes": [{ "match": { "route_name": "api" }, "policy": "api" }] })
}

fn stat_name(metric: &str) -> String {
    format!("wasmcustom.breakwater_{metric}.policy.api")
}

/// Polls `read` until `done` holds, for at most `limit`; returns the last value.
async fn until<T, F: Future<Output = T>>(limit: Duration, mut read: impl FnMut() -> F, done: impl Fn(&T) -> bool) -> T {
    let deadline = Instant::now() + limit;
    loop {
        let v = read().await;
        if done(&v) || Instant::now() > deadline {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn gauge(envoy: &Envoy, metric: &str) -> i64 {
    envoy.stat(&stat_name(metric)).await
}

/// `n` GETs of `path` from 8 clients, each on a new connection (so both workers see them).
async fn load(envoy: &Envoy, path: &str, n: usize) -> Vec<Reply> {
    envoy.send_all(8, (0..n).map(|_| Call::get(path)).collect()).await.into_iter().map(Option::unwrap).collect()
}

/// The example, with a 10 s window and 20 samples to start; the route's own timeout is
/// 8 s. 20 ms answers give the floor (100 ms); a shift to 200 ms moves it to ~360 ms
/// (200 ms's bucket tops at 207: × 1.5 + 50); then a 10 s stall is cut there, not at 8 s.
#[tokio::test(flavor = "multi_thread")]
async fn the_adaptive_timeout_follows_a_latency_shift_and_cuts_a_stall_at_it() {
    let up = start_upstream().await;
    let policy = json!({ "timeout": { "adaptive": {
        "percentile": 95, "multiplier": 1.5, "margin": "50ms", "min": "100ms", "max": "5s",
        "minimum_requests": 20, "window": "10s" } } });
    let spec =
        Spec::new(up.addr()).plugin(api(policy)).route_with_timeout("api", "/api", "backend", Duration::from_secs(8));
    let envoy = Envoy::start(&spec).await;
    assert_eq!(gauge(&envoy, "timeout_milliseconds").await, 0, "no samples: the route's own timeout");

    for r in load(&envoy, "/api?delay_ms=20", 60).await {
        assert_eq!(r.status, 200, "{r:?}");
    }
    let fast = until(Duration::from_secs(5), || gauge(&envoy, "timeout_milliseconds"), |ms| *ms > 0).await;
    assert_eq!(fast, 100, "p95 of ~20 ms × 1.5 + 50 is below min");

    // The upstream slows to 200 ms. The first calls are cut at 100 ms (Envoy answers 504): they
    // count a bucket above the timeout they were cut at, so the timeout grows (111 × 1.5 + 50 =
    // 216, then ~360) until the calls fit.
    let (mut sent, mut cut, mut steps) = (0, 0, vec![fast]);
    let shifted = Instant::now();
    let slow = loop {
        let replies = load(&envoy, "/api?delay_ms=200", 20).await;
        assert!(replies.iter().all(|r| r.status == 200 || r.status == 504), "{replies:?}");
        (sent, cut) = (sent + 20, cut + replies.iter().filter(|r| r.status == 504).count());
        let ms = gauge(&envoy, "timeout_milliseconds").await;
        if steps.last() != Some(&ms) {
            steps.push(ms);
        }
        if ms > 250 || sent >= 400 {
            break ms;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    println!(
        "adaptive timeout: {fast} ms at 20 ms, {slow} ms at 200 ms after {:?} (steps {steps:?}; {cut} of {sent} slow calls cut on the way)",
        shifted.elapsed()
    );
    assert!((250..=700).contains(&slow), "{slow} ms: ~207 × 1.5 + 50 = 360 expected");
    // Every worker learns it at its next hand-over (a slice, 1 s): then 200 ms calls all pass.
    load(&envoy, "/api?delay_ms=200", 20).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    for r in load(&envoy, "/api?delay_ms=200", 20).await {
        assert_eq!(r.status, 200, "{r:?}");
    }

    // A stall: requests on new connections reach both workers; each is cut at about the
    // adaptive timeout by Envoy itself (504, upstream request timeout).
    let started = Instant::now();
    let stalls = envoy.get_concurrently((0..4).map(|_| "/api?delay_ms=10000".to_string()).collect()).await;
    let took = started.elapsed();
    println!("a 10 s stall was cut after {took:?} (route timeout 8 s)");
    for r in &stalls {
        assert_eq!((r.status, r.body.as_str()), (504, "upstream request timeout"), "{r:?}");
    }
    assert!(took < Duration::from_secs(3), "cut at ~{slow} ms, not the route's 8 s: {took:?}");
    assert!(took >= Duration::from_millis(slow as u64 - 50), "not before the adaptive timeout: {took:?}");
}

/// Envoy takes `x-envoy-upstream-rq-timeout-ms` instead of the route's timeout, also when it is
/// longer: the reason `max` is required, and must stay at or below the route's timeout.
/// The reported outage: p50 × 1 from 100 ms answers is 103 ms, the top of 100 ms's bucket. When
/// the upstream slows to 300 ms every request is cut; counted at 103 they gave back 103 and the
/// timeout stayed there, cutting every request. Counted a bucket above, it climbs until 300 ms fit.
#[tokio::test(flavor = "multi_thread")]
async fn a_timeout_of_p50_times_1_climbs_past_a_slower_upstream_instead_of_locking() {
    let up = start_upstream().await;
    let policy = json!({ "timeout": { "adaptive": {
        "percentile": 50, "multiplier": 1, "min": "1ms", "max": "3s", "minimum_requests": 3, "window": "2s" } } });
    let spec =
        Spec::new(up.addr()).plugin(api(policy)).route_with_timeout("api", "/api", "backend", Duration::from_secs(8));
    let envoy = Envoy::start(&spec).await;
    let fast = until(
        Duration::from_secs(10),
        || async {
            load(&envoy, "/api?delay_ms=100", 8).await;
            gauge(&envoy, "timeout_milliseconds").await
        },
        |ms| *ms > 0,
    )
    .await;
    assert!((100..=111).contains(&fast), "p50 of 100 ms answers: 103 expected, got {fast}");
    let (shifted, mut steps, mut cut, mut sent) = (Instant::now(), vec![fast], 0, 0);
    let slow = loop {
        let replies = load(&envoy, "/api?delay_ms=300", 16).await;
        (sent, cut) = (sent + 16, cut + replies.iter().filter(|r| r.status == 504).count());
        let ms = gauge(&envoy, "timeout_milliseconds").await;
        if steps.last() != Some(&ms) {
            steps.push(ms);
        }
        if ms > 300 || shifted.elapsed() > Duration::from_secs(40) {
            break ms;
        }
    };
    println!(
        "p50 × 1: {fast} ms at 100 ms, {slow} ms at 300 ms after {:?} (steps {steps:?}; {cut} of {sent} slow calls cut)",
        shifted.elapsed()
    );
    assert!(slow > 300, "locked below the upstream: {steps:?}");
    // Every worker learns it within a slice: then 300 ms calls pass.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let replies = load(&envoy, "/api?delay_ms=300", 16).await;
    let ok = replies.iter().filter(|r| r.status == 200).count();
    assert!(ok >= 12, "{ok} of 16 passed at {slow} ms: {replies:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn envoy_takes_the_header_over_the_routes_timeout_even_when_longer() {
    let up = start_upstream().await;
    let policy = json!({ "timeout": { "adaptive": { "min": "1s", "max": "1s", "minimum_requests": 5 } } });
    let spec = Spec::new(up.addr()).plugin(api(policy)).route_with_timeout(
        "api",
        "/api",
        "backend",
        Duration::from_millis(300),
    );
    let envoy = Envoy::start(&spec).await;
    let r = envoy.get("/api?delay_ms=600").await;
    assert_eq!(r.status, 504, "no adaptive timeout yet: the route's 300 ms applies: {r:?}");
    load(&envoy, "/api", 20).await;
    assert_eq!(until(Duration::from_secs(5), || gauge(&envoy, "timeout_milliseconds"), |ms| *ms == 1000).await, 1000);
    // Both workers must have learnt it: a few requests, on new connections.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    load(&envoy, "/api", 20).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let replies = envoy.get_concurrently((0..4).map(|_| "/api?delay_ms=600".to_string()).collect()).await;
    for r in replies {
        assert_eq!((r.status, r.from_upstream()), (200, true), "1 s from the header beat the route's 300 ms: {r:?}");
    }
}

/// Background shed from half the permits, standard from 90%, critical never: under a flood of
/// background requests, background is held to half the bulkhead and shed, while standard
/// requests all pass; pushing standard past 90% sheds standard too, and critical still passes.
#[tokio::test(flavor = "multi_thread")]
async fn shedding_refuses_the_lowest_class_first_under_a_background_flood() {
    let up = start_upstream().await;
    let policy = json!({ "bulkhead": { "max_concurrent": 10, "priority": {
        "header": "x-priority", "default": "standard", "classes": {
            "critical": { "reserved": 1 }, "standard": { "shed_at": 0.9 }, "background": { "shed_at": 0.5 } } } } });
    let envoy = Envoy::start(&Spec::new(up.addr()).plugin(api(policy)).route("api", "/api", "backend")).await;
    let addr = envoy.listener();
    // Clients that send `class` requests (300 ms upstream) until `until`, counting the answers.
    let clients = |class: &'static str, n: usize, until: Instant| {
        (0..n)
            .map(|_| {
                let call = Call::get(format!("/api?delay_ms=300&tag={class}")).header("x-priority", class);
                tokio::spawn(async move {
                    let (mut passed, mut shed, mut other) = (0, 0, 0);
                    while Instant::now() < until {
                        let r = call.send(addr).await.unwrap();
                        match (r.status, r.header("x-breakwater")) {
                            (200, None) => passed += 1,
                            (503, Some("shed")) => {
                                shed += 1;
                                assert_eq!(r.retry_after(), Some(1), "{r:?}");
                                tokio::time::sleep(Duration::from_millis(20)).await;
                            }
                            _ => other += 1,
                        }
                    }
                    (passed, shed, other)
                })
            })
            .collect::<Vec<_>>()
    };
    let sum =
        |results: Vec<(i32, i32, i32)>| results.into_iter().fold((0, 0, 0), |a, r| (a.0 + r.0, a.1 + r.1, a.2 + r.2));
    async fn join(tasks: Vec<tokio::task::JoinHandle<(i32, i32, i32)>>) -> Vec<(i32, i32, i32)> {
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    }

    // 16 background clients flood for 5 s; after 1 s, 4 standard clients for 3 s.
    let start = Instant::now();
    let background = clients("background", 16, start + Duration::from_secs(5));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let standard = sum(join(clients("standard", 4, Instant::now() + Duration::from_secs(3))).await);
    let background = sum(join(background).await);
    let s = up.stats();
    println!(
        "flood: background {background:?} (passed, shed, other), standard {standard:?}; at once upstream: {:?}",
        s.max_in_flight_by_tag
    );
    assert!(background.1 > 0 && background.0 > 0, "background is admitted up to half, then shed: {background:?}");
    assert_eq!((standard.1, standard.2), (0, 0), "no standard request is shed: {standard:?}");
    assert!(standard.0 >= 4, "{standard:?}");
    let bg_max = s.max_in_flight_by_tag["background"];
    assert!((4..=5).contains(&bg_max), "background never past half of 10 at once: {bg_max}");
    assert_eq!(background.2, 0, "{background:?}");

    // Standard past 90% (12 clients on 10 permits): standard is shed too; critical passes.
    up.reset_stats();
    let until = Instant::now() + Duration::from_secs(3);
    let standard = clients("standard", 12, until);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let critical = sum(join(clients("critical", 1, until)).await);
    let standard = sum(join(standard).await);
    println!("standard past 90%: standard {standard:?}, critical {critical:?}");
    assert!(standard.1 > 0, "standard is shed at 9 of 10: {standard:?}");
    assert_eq!((critical.1, critical.2), (0, 0), "critical is never shed: {critical:?}");
    assert!(critical.0 > 0);
    let shed = envoy.stat(&format!("{}.reason.shed", stat_name("rejections_total"))).await;
    assert!(shed > 0, "counted as rejections_total{{reason=\"shed\"}}: {shed}");
}

/// An adaptive limit in front of an upstream that serves 20 requests at once (100 ms each) and
/// queues the rest, under 40 closed-loop clients that wait in the bulkhead's queue: the limit
/// climbs from min and settles about 1.5 × 20 (latency at 1.5 × its baseline); when the
/// capacity halves it falls to about half; when the capacity returns it climbs back.
#[tokio::test(flavor = "multi_thread")]
async fn the_adaptive_limit_follows_a_capacity_drop_and_recovers() {
    let up = start_upstream().await;
    up.set_capacity(Some(20));
    let policy =
        json!({ "bulkhead": { "adaptive": { "min": 4, "max": 100 }, "queue": { "max_size": 100, "timeout": "10s" } } });
    let spec =
        Spec::new(up.addr()).plugin(api(policy)).route("api", "/api", "backend").control(json!({ "control": {} }));
    let envoy = Envoy::start(&spec).await;
    let addr = envoy.listener();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients: Vec<_> = (0..40)
        .map(|_| {
            let stop = stop.clone();
            tokio::spawn(async move {
                let call = Call::get("/api?delay_ms=100");
                let mut refused = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if call.send(addr).await.unwrap().status != 200 {
                        refused += 1;
                    }
                }
                refused
            })
        })
        .collect();
    let limit = || gauge(&envoy, "bulkhead_limit");
    // The limit each second for `seconds`.
    let watch = |seconds: u64| async move {
        let mut seen = Vec::new();
        for _ in 0..seconds {
            tokio::time::sleep(Duration::from_secs(1)).await;
            seen.push(limit().await);
        }
        seen
    };
    let up_phase = watch(20).await;
    // The status endpoint shows the live limit admission uses (the gauge's), and its bounds.
    let (status, gauged) = until(
        Duration::from_secs(5),
        || async {
            let (_, body) = envoy.control(hyper::Method::GET, "/breakwater/status/api").await;
            let gauged = limit().await;
            (body["policies"]["api"]["bulkhead"].clone(), gauged)
        },
        |(b, gauged)| b["limit"] == *gauged,
    )
    .await;
    println!("status while settled: {status}");
    assert_eq!(status["limit"], gauged, "{status}");
    assert_eq!((&status["min"], &status["max"]), (&json!(4), &json!(100)), "{status}");
    assert!(gauged > 4 && gauged < 100, "the live limit, not min or max: {status}");
    up.set_capacity(Some(10));
    let down = watch(10).await;
    up.set_capacity(Some(20));
    let back = watch(12).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut refused = 0;
    for c in clients {
        refused += c.await.unwrap();
    }
    println!("adaptive limit, each second: capacity 20 {up_phase:?}; 10 {down:?}; 20 again {back:?}");
    let settled = up_phase[16..].iter().sum::<i64>() / 4;
    let fell = down[6..].iter().sum::<i64>() / 4;
    let recovered = back[8..].iter().sum::<i64>() / 4;
    assert!((22..=45).contains(&settled), "about 1.5 × 20: {up_phase:?}");
    assert!(fell <= 22 && fell * 4 <= settled * 3, "about half after the drop: {settled} → {down:?}");
    assert!(recovered >= 22 && recovered * 4 >= settled * 3, "back after the recovery: {back:?}");
    assert_eq!(refused, 0, "clients wait in the queue; none refused");
    let s = up.stats();
    assert!(s.max_in_flight <= 100, "{}", s.max_in_flight);
}
