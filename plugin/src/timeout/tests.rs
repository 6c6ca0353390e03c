//! Adaptive timeouts, adaptive limits and shedding on the request path, against fake workers.

use crate::fake::{FakeHost, Worker};
use crate::filter::{on_response_headers, Action, Stream};
use crate::outcome::flags;
use breakwater_policies::{BulkheadState, MS, SECOND};

const HEADER: &str = "x-envoy-upstream-rq-timeout-ms";

/// The issue's example, with a 10 s window and 20 samples to start: a per-route instance.
const TIMEOUT: &str = r#"{"policies": {"api": {"timeout": {"adaptive": {
    "percentile": 95, "multiplier": 1.5, "margin": "50ms", "min": "100ms", "max": "5s",
    "minimum_requests": 20, "window": "10s" }}}}, "policy": "api"}"#;

/// One request that the upstream answers after `ms`; returns the timeout it was sent with.
fn call(w: &Worker, ms: u64) -> Option<u64> {
    let (action, mut s) = w.send("api", 1);
    assert_eq!(action, Action::Continue);
    let sent = w.host.header_text(HEADER).map(|v| v.parse().unwrap());
    w.respond(&mut s, 200, ms, &[]);
    w.log(1, s);
    sent
}

/// `n` requests of `ms`, then a tick at `at`.
fn calls(w: &Worker, n: u32, ms: u64, at: u64) -> Option<u64> {
    let mut last = None;
    for _ in 0..n {
        last = call(w, ms);
    }
    w.at(at).tick();
    last
}

#[test]
fn no_timeout_until_enough_samples_then_the_percentile_times_the_multiplier_plus_the_margin() {
    let w = Worker::first(TIMEOUT);
    assert_eq!(calls(&w, 19, 20, SECOND), None, "19 samples: the route's own timeout");
    assert_eq!(w.stat("timeout_milliseconds.policy.api"), 0);
    assert_eq!(calls(&w, 1, 20, 2 * SECOND), None, "the 20th is handed over on the tick…");
    assert_eq!(call(&w, 20), Some(100), "…and the next request has 21 × 1.5 + 50 = 81, raised to min");
    assert_eq!(w.stat("timeout_milliseconds.policy.api"), 100);
}

#[test]
fn a_shift_from_20ms_to_200ms_moves_the_timeout_within_the_window() {
    let w = Worker::first(TIMEOUT);
    for s in 1..=5 {
        calls(&w, 10, 20, s * SECOND);
    }
    assert_eq!(call(&w, 20), Some(100));
    // The upstream slows down to 200 ms: a few slow calls (5% of the window) move p95.
    calls(&w, 5, 200, 6 * SECOND);
    assert_eq!(call(&w, 200), Some(360), "207 × 1.5 + 50");
    assert_eq!(w.stat("timeout_milliseconds.policy.api"), 360);
    // Back to 20 ms: the slow calls (handed over at 6 s) leave the window ten seconds later.
    for s in 7..=15 {
        calls(&w, 10, 20, s * SECOND);
    }
    assert_eq!(call(&w, 20), Some(360), "still in the window");
    calls(&w, 10, 20, 16 * SECOND);
    assert_eq!(call(&w, 20), Some(100));
}

/// One request that Envoy cuts at the timeout it was sent with (504, flag UT); returns that
/// timeout.
fn cut(w: &Worker) -> Option<String> {
    let (_, mut s) = w.send("api", 1);
    let sent = w.host.header_text(HEADER);
    w.host.response_headers.borrow_mut().clear();
    w.host.set_response_header(":status", "504");
    on_response_headers(&w.c, &w.host, &mut s);
    w.host.set_prop_u64("response.flags", flags::UPSTREAM_REQUEST_TIMEOUT);
    w.log(1, s);
    w.host.set_prop_u64("response.flags", 0);
    sent
}

#[test]
fn a_request_cut_by_its_timeout_counts_above_that_timeout_so_a_short_timeout_grows() {
    let w = Worker::first(TIMEOUT);
    calls(&w, 40, 20, SECOND);
    assert_eq!(call(&w, 20), Some(100));
    // The upstream now needs 150 ms: every call is cut at 100 ms by Envoy (504, flag UT).
    for _ in 0..3 {
        cut(&w);
    }
    w.at(2 * SECOND).tick();
    assert_eq!(cut(&w).as_deref(), Some("216"), "p95 is now a cut call, one bucket above 100: 111 × 1.5 + 50");
    for _ in 0..3 {
        cut(&w);
    }
    w.at(3 * SECOND).tick();
    assert_eq!(
        call(&w, 150),
        Some(408),
        "and again (cut at 216, counted at 224), until the upstream fits: 239 × 1.5 + 50"
    );
}

/// A timeout at its bucket's top (103 ms, from 100 ms answers), with a multiplier of 1 and no
/// margin: counted at the timeout, the cut requests gave back 103 and the timeout locked there
/// while the upstream needed 300 ms. Counted a bucket up, it grows each window until 300 ms fit.
#[test]
fn a_timeout_at_its_bucket_top_with_multiplier_1_does_not_lock_below_the_upstream() {
    let w = Worker::first(
        r#"{"policies": {"api": {"timeout": {"adaptive": {"percentile": 50, "multiplier": 1,
            "min": "1ms", "max": "3s", "minimum_requests": 3, "window": "2s"}}}}, "policy": "api"}"#,
    );
    calls(&w, 10, 100, SECOND);
    assert_eq!(call(&w, 100), Some(103));
    // The upstream slows to 300 ms: every request is cut until the timeout passes 300.
    let (mut t, mut timeout, mut windows) = (SECOND, 103u64, 0);
    while timeout <= 300 {
        assert!(windows < 20, "locked at {timeout}");
        for _ in 0..10 {
            assert_eq!(cut(&w), Some(timeout.to_string()));
        }
        // A window later only the cut requests are in it.
        t += 2 * SECOND;
        w.at(t).tick();
        let next = w.stat("timeout_milliseconds.policy.api") as u64;
        assert!(next > timeout, "{timeout} → {next}");
        (timeout, windows) = (next, windows + 1);
    }
    assert_eq!(call(&w, 300), Some(timeout), "300 ms answers now fit");
}

#[test]
fn workers_share_one_histogram() {
    let w1 = Worker::first(TIMEOUT);
    let w2 = Worker::second(&w1, TIMEOUT);
    calls(&w1, 30, 20, SECOND);
    calls(&w2, 10, 1000, SECOND);
    assert_eq!(call(&w2, 20), Some(1584), "worker 2 saw both batches: 1023 × 1.5 + 50");
    assert_eq!(call(&w1, 20), Some(100), "worker 1 keeps its last look…");
    w1.at(2 * SECOND).tick();
    assert_eq!(call(&w1, 20), Some(1584), "…and learns at its next hand-over");
}

#[test]
fn a_worker_new_to_the_policy_sets_none_until_its_first_hand_over() {
    let w1 = Worker::first(TIMEOUT);
    calls(&w1, 30, 20, SECOND);
    let w2 = Worker::second(&w1, TIMEOUT);
    assert_eq!(calls(&w2, 1, 20, SECOND + 10 * MS), None, "the route's own timeout");
    assert_eq!(call(&w2, 20), Some(100), "learnt with its hand-over: no read of its own");
}

#[test]
fn the_healthy_path_costs_one_header_set_and_the_response_headers_and_no_shared_data() {
    let w = Worker::first(TIMEOUT);
    calls(&w, 30, 20, 2 * SECOND);
    call(&w, 20);
    w.host.take_calls();
    call(&w, 20);
    let c = w.host.take_calls();
    assert_eq!(FakeHost::data_calls(&c), 1, "{c:?}");
    assert_eq!((c.get("set_header"), c.get("response_headers")), (Some(&1), Some(&1)), "{c:?}");
    assert_eq!(c.len(), 2, "nothing else: {c:?}");
    // The tick hands the batch over once a slice: one CAS (a read and a write).
    w.at(3 * SECOND).tick();
    let c = w.host.take_calls();
    assert_eq!((c.get("shared_get"), c.get("shared_set")), (Some(&1), Some(&1)), "{c:?}");
}

#[test]
fn a_dry_run_computes_and_shows_the_timeout_but_sets_nothing() {
    let w = Worker::first(&TIMEOUT.replace(r#""timeout""#, r#""mode": "dry_run", "timeout""#));
    calls(&w, 30, 20, SECOND);
    assert_eq!(call(&w, 20), None);
    assert_eq!(w.stat("timeout_milliseconds.policy.api"), 100);
}

#[test]
fn a_policy_without_the_adaptive_parts_reads_no_response_headers() {
    let w = Worker::first(r#"{"policies": {"api": {"bulkhead": {"max_concurrent": 10}}}, "policy": "api"}"#);
    call(&w, 20);
    w.host.take_calls();
    call(&w, 20);
    assert!(w.host.take_calls().is_empty(), "a leased permit and nothing else");
}

// --- the adaptive limit ---------------------------------------------------------------------------

const LIMIT: &str = r#"{"policies": {"api": {"bulkhead": {"adaptive": {"min": 4, "max": 50},
    "queue": {"max_size": 10, "timeout": "5s"}}}}, "policy": "api"}"#;

fn limit_of(w: &Worker) -> u32 {
    let b = w.c.policies[0].cfg.bulkhead.as_ref().unwrap();
    let (s, _) = crate::store::load::<BulkheadState>(&w.host, &w.c.policies[0].bulkhead_key);
    s.limit(&b.machine)
}

/// `in_flight` requests of `ms` held at once and ended, for each of `windows` windows, a tick
/// every quarter second.
fn load(w: &Worker, t: &mut u64, windows: u32, in_flight: u32, ms: u64) {
    for _ in 0..windows {
        for _ in 0..4 {
            let streams: alloc::vec::Vec<(u32, Stream)> =
                (0..in_flight).map(|i| (100 + i, w.send("api", 100 + i).1)).collect();
            for (ticket, mut s) in streams {
                w.respond(&mut s, 200, ms, &[]);
                w.log(ticket, s);
            }
            *t += 250 * MS;
            w.at(*t).tick();
            w.wake();
        }
    }
}

#[test]
fn the_limit_follows_latency_and_the_gauge_shows_it() {
    let w = Worker::first(LIMIT);
    assert_eq!((limit_of(&w), w.stat("bulkhead_limit.policy.api")), (4, 0), "the gauge waits for a judged window");
    let mut t = 0;
    // Fast answers with the bulkhead full: the limit climbs.
    load(&w, &mut t, 6, 4, 10);
    let up = limit_of(&w);
    assert!(up >= 8, "{up}");
    assert_eq!(w.stat("bulkhead_limit.policy.api"), i64::from(up));
    // Latency 10× the baseline: it falls by a quarter a window, to min.
    let mut falls = alloc::vec::Vec::new();
    while limit_of(&w) > 4 && falls.len() < 10 {
        load(&w, &mut t, 1, limit_of(&w), 100);
        falls.push(limit_of(&w));
    }
    assert!(falls.windows(2).all(|f| f[1] < f[0]) && falls.len() <= 8, "{up}: {falls:?}");
    assert_eq!((limit_of(&w), w.stat("bulkhead_limit.policy.api")), (4, 4));
}

#[test]
fn a_higher_limit_wakes_a_waiter() {
    let w = Worker::first(LIMIT);
    let mut t = 0;
    load(&w, &mut t, 1, 4, 10);
    let held: alloc::vec::Vec<(u32, Stream)> = (1..=4).map(|i| (i, w.send("api", i).1)).collect();
    let (action, waiting) = w.send("api", 5);
    assert_eq!(action, Action::Stop, "4 of 4: the fifth waits");
    for (ticket, mut s) in held.into_iter().take(2) {
        w.respond(&mut s, 200, 10, &[]);
        w.log(ticket, s);
    }
    let before = limit_of(&w);
    t += SECOND;
    // The samples of the two that ended raise the limit: the waiter is let through at once.
    for i in 10..20 {
        let (_, mut s) = w.send("api", i);
        w.respond(&mut s, 200, 10, &[]);
        w.log(i, s);
    }
    w.at(t).tick();
    assert!(limit_of(&w) > before);
    assert_eq!(w.wake(), [5]);
    w.end(5, waiting, 200);
}

#[test]
fn the_limit_path_costs_nothing_more_per_request_than_the_response_headers() {
    let w = Worker::first(LIMIT);
    let mut t = 0;
    load(&w, &mut t, 2, 1, 10);
    w.host.take_calls();
    let (_, mut s) = w.send("api", 1);
    w.respond(&mut s, 200, 10, &[]);
    w.log(1, s);
    let c = w.host.take_calls();
    assert_eq!((FakeHost::data_calls(&c), c.get("response_headers")), (1, Some(&1)), "{c:?}");
}

// --- shedding -------------------------------------------------------------------------------------

const SHED: &str = r#"{"policies": {"api": {"bulkhead": {"max_concurrent": 4,
    "priority": {"header": "x-priority", "default": "standard", "classes": {
        "critical": {"reserved": 1}, "standard": {"shed_at": 0.75}, "background": {"shed_at": 0.5}}}}}},
    "policy": "api"}"#;

fn send_class(w: &Worker, ticket: u32, class: &str) -> (Action, Stream) {
    w.send_with("api", ticket, &[("x-priority", class)])
}

#[test]
fn the_lowest_class_is_shed_first_with_503_shed_and_retry_after() {
    let w = Worker::first(SHED);
    assert_eq!(send_class(&w, 1, "background").0, Action::Continue);
    assert_eq!(send_class(&w, 2, "background").0, Action::Continue);
    w.host.take_calls();
    assert_eq!(send_class(&w, 3, "background").0, Action::Stop, "2 of 4 taken: background is shed");
    let c = w.host.take_calls();
    assert_eq!((c.get("shared_get"), c.get("shared_set")), (Some(&1), None), "the bulkhead's own read, nothing more");
    let r = w.host.last_reply().unwrap();
    assert_eq!((r.status, r.header("x-breakwater"), r.header("retry-after")), (503, Some("shed"), Some("1")));
    assert_eq!(send_class(&w, 4, "standard").0, Action::Continue, "standard is not");
    assert_eq!(send_class(&w, 5, "standard").0, Action::Stop, "3 of 4: standard is shed too");
    assert_eq!(send_class(&w, 6, "critical").0, Action::Continue, "critical never is");
    assert_eq!(w.stat("rejections_total.policy.api.reason.shed"), 2);
    assert_eq!(w.stat("rejections_total.policy.api.reason.bulkhead_full"), 0);
}

#[test]
fn a_dry_run_counts_the_requests_it_would_shed_and_lets_them_through() {
    let w = Worker::first(&SHED.replace(r#""bulkhead""#, r#""mode": "dry_run", "bulkhead""#));
    for t in 1..=3 {
        assert_eq!(send_class(&w, t, "background").0, Action::Continue);
    }
    assert_eq!(w.stat("dry_run_rejections_total.policy.api.reason.shed"), 1);
    assert!(w.host.last_reply().is_none());
}
