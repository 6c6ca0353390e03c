//! The request logic against a fake host: what Envoy would see, without Envoy.

use super::*;
use crate::config;
use crate::fake::FakeHost;
use breakwater_policies::MS;

const CONFIG: &str = r#"{
  "policies": {
    "checkout": {
      "circuit_breaker": { "consecutive_failures": 3, "open_for": "10s", "slow_call": { "duration": "500ms", "threshold": 100, "minimum_requests": 100 } },
      "reject": { "headers": { "x-team": "payments" } }
    },
    "shadow": { "mode": "dry_run", "circuit_breaker": { "consecutive_failures": 1, "open_for": "10s" } }
  },
  "routes": [
    { "match": { "route_name": "checkout" }, "policy": "checkout" },
    { "match": { "path_prefix": "/shadow" }, "policy": "shadow" }
  ]
}"#;

fn compiled(host: &FakeHost) -> Rc<Compiled> {
    Rc::new(Compiled::new(config::parse(CONFIG.as_bytes()).unwrap(), host, "test"))
}

// These are breaker tests: no bulkhead, so no request waits and no ticket matters.
fn headers(c: &Rc<Compiled>, host: &FakeHost) -> (Action, Stream) {
    on_request_headers(c, host, &Parking::default(), 1)
}

fn log(c: &Compiled, host: &FakeHost, stream: Stream) {
    on_log(c, host, &Parking::default(), 1, stream)
}

/// One request through the filter: headers, then `on_log` with the given response.
/// One request through the filter: request headers, response headers with `code` (none if 0),
/// then `on_log` with the given response flags.
fn request(c: &Rc<Compiled>, host: &FakeHost, route: &str, path: &str, code: u64, flags: u64) -> Action {
    host.new_stream();
    host.set_prop("xds.route_name", route.as_bytes());
    host.set_header(":path", path);
    let (action, mut stream) = headers(c, host);
    if action == Action::Continue {
        if code != 0 {
            host.set_response_header(":status", &code.to_string());
            on_response_headers(c, host, &mut stream, false);
        }
        host.set_prop_u64("response.flags", flags);
        log(c, host, stream);
    }
    action
}

fn checkout(c: &Rc<Compiled>, host: &FakeHost, code: u64) -> Action {
    request(c, host, "checkout", "/checkout", code, 0)
}

#[test]
fn third_consecutive_5xx_trips_and_the_fourth_request_is_fast_failed_with_retry_after() {
    let host = FakeHost::new();
    let c = compiled(&host);
    for _ in 0..3 {
        assert_eq!(checkout(&c, &host, 503), Action::Continue);
    }
    host.now.set(2500 * MS);
    assert_eq!(checkout(&c, &host, 200), Action::Rejected);
    let reply = host.last_reply().unwrap();
    assert_eq!(reply.status, 503);
    assert_eq!(reply.body, "breakwater: circuit-open (policy checkout)\n");
    assert_eq!(reply.header("x-breakwater"), Some("circuit-open"));
    assert_eq!(reply.header("retry-after"), Some("8")); // 7.5 s left, rounded up
    assert_eq!(reply.header("x-team"), Some("payments"));
    assert_eq!(host.metric("requests.policy.checkout.outcome.failure"), 3);
    assert_eq!(host.metric("rejections.policy.checkout.reason.circuit_open"), 1);
    assert_eq!(host.metric("transitions.policy.checkout.to.open"), 1);
    assert_eq!(host.metric("circuit_state.policy.checkout"), 1);
}

#[test]
fn failures_on_different_workers_add_up() {
    let w1 = FakeHost::new();
    let w2 = FakeHost::worker_of(&w1);
    let (c1, c2) = (compiled(&w1), compiled(&w2));
    checkout(&c1, &w1, 500);
    checkout(&c2, &w2, 500);
    checkout(&c1, &w1, 500);
    assert_eq!(checkout(&c2, &w2, 200), Action::Rejected);
}

#[test]
fn a_4xx_is_a_success_and_breaks_the_run_of_failures() {
    let host = FakeHost::new();
    let c = compiled(&host);
    checkout(&c, &host, 500);
    checkout(&c, &host, 500);
    checkout(&c, &host, 404);
    checkout(&c, &host, 500);
    assert_eq!(checkout(&c, &host, 200), Action::Continue);
    assert_eq!(host.metric("requests.policy.checkout.outcome.success"), 2);
}

#[test]
fn transport_errors_count_by_their_response_flags() {
    let host = FakeHost::new();
    let c = compiled(&host);
    request(&c, &host, "checkout", "/", 503, flags::UPSTREAM_CONNECTION_FAILURE);
    request(&c, &host, "checkout", "/", 504, flags::UPSTREAM_REQUEST_TIMEOUT);
    request(&c, &host, "checkout", "/", 503, flags::UPSTREAM_REMOTE_RESET);
    assert_eq!(checkout(&c, &host, 200), Action::Rejected);
}

#[test]
fn a_client_abort_is_ignored_and_gives_a_probe_its_slot_back() {
    let host = FakeHost::new();
    let c = compiled(&host);
    for _ in 0..3 {
        checkout(&c, &host, 500);
    }
    host.now.set(10 * SECOND);
    // The probe's client goes away (DC, no response code).
    request(&c, &host, "checkout", "/", 0, flags::DOWNSTREAM_CONNECTION_TERMINATION);
    assert_eq!(host.metric("requests.policy.checkout.outcome.ignored"), 1);
    assert_eq!(host.metric("transitions.policy.checkout.to.half_open"), 1);
    // The slot is free again: the next request is the probe, succeeds and closes the breaker.
    assert_eq!(checkout(&c, &host, 200), Action::Continue);
    assert_eq!(host.metric("transitions.policy.checkout.to.closed"), 1);
    assert_eq!(host.metric("circuit_state.policy.checkout"), 0);
}

#[test]
fn only_one_probe_at_a_time_and_the_others_are_rejected() {
    let host = FakeHost::new();
    let c = compiled(&host);
    for _ in 0..3 {
        checkout(&c, &host, 500);
    }
    host.now.set(10 * SECOND);
    host.set_prop("xds.route_name", b"checkout");
    let (first, probe) = headers(&c, &host);
    assert_eq!(first, Action::Continue);
    assert!(matches!(probe, Stream::Admitted { probe: true, .. }));
    assert_eq!(headers(&c, &host).0, Action::Rejected);
    assert_eq!(host.last_reply().unwrap().header("retry-after"), Some("1"));
}

#[test]
fn dry_run_counts_what_it_would_reject_and_rejects_nothing() {
    let host = FakeHost::new();
    let c = compiled(&host);
    for _ in 0..5 {
        assert_eq!(request(&c, &host, "", "/shadow/x", 500, 0), Action::Continue);
    }
    assert!(host.replies.borrow().is_empty());
    assert_eq!(host.metric("dry_run_rejections.policy.shadow.reason.circuit_open"), 4);
    assert_eq!(host.metric("rejections.policy.shadow.reason.circuit_open"), 0);
    // Would-be-rejected requests stay out of the breaker: only the first failure was counted.
    assert_eq!(host.metric("requests.policy.shadow.outcome.failure"), 1);
}

#[test]
fn grpc_status_failures_count_even_with_http_200_from_trailers_or_trailers_only_headers() {
    let host = FakeHost::new();
    let c = compiled(&host);
    for trailers_only in [false, true, false] {
        host.new_stream();
        host.set_prop("xds.route_name", b"checkout");
        let (_, mut stream) = headers(&c, &host);
        host.set_response_header(":status", "200");
        if trailers_only {
            host.set_response_header("grpc-status", "14");
            on_response_headers(&c, &host, &mut stream, true);
        } else {
            on_response_headers(&c, &host, &mut stream, false);
            host.set_response_trailer("grpc-status", "4");
            on_response_trailers(&c, &host, &mut stream);
        }
        log(&c, &host, stream);
    }
    assert_eq!(checkout(&c, &host, 200), Action::Rejected);
}

#[test]
fn grpc_ok_is_a_success() {
    let host = FakeHost::new();
    let c = compiled(&host);
    host.set_prop("xds.route_name", b"checkout");
    let (_, mut stream) = headers(&c, &host);
    host.set_response_header(":status", "200");
    on_response_headers(&c, &host, &mut stream, false);
    host.set_response_trailer("grpc-status", "0");
    on_response_trailers(&c, &host, &mut stream);
    log(&c, &host, stream);
    assert_eq!(host.metric("requests.policy.checkout.outcome.success"), 1);
}

#[test]
fn requests_matching_no_route_pass_untouched_and_are_not_counted() {
    let host = FakeHost::new();
    let c = compiled(&host);
    for _ in 0..10 {
        assert_eq!(request(&c, &host, "other", "/other", 500, 0), Action::Continue);
    }
    assert_eq!(checkout(&c, &host, 200), Action::Continue);
    assert_eq!(host.metric("requests.policy.checkout.outcome.failure"), 0);
}

#[test]
fn slow_calls_are_counted_from_request_headers_to_log() {
    let host = FakeHost::new();
    let c = compiled(&host);
    host.set_prop("xds.route_name", b"checkout");
    let (_, mut stream) = headers(&c, &host);
    host.now.set(600 * MS);
    host.set_response_header(":status", "200");
    on_response_headers(&c, &host, &mut stream, false);
    log(&c, &host, stream);
    assert_eq!(host.metric("requests.policy.checkout.outcome.slow"), 1);
    assert_eq!(host.metric("requests.policy.checkout.outcome.success"), 1);
}

#[test]
fn lost_cas_races_are_retried() {
    let host = FakeHost::new();
    let c = compiled(&host);
    for _ in 0..3 {
        host.process.cas_conflicts.set(5);
        checkout(&c, &host, 500);
    }
    assert_eq!(checkout(&c, &host, 200), Action::Rejected);
}

#[test]
fn garbage_in_shared_data_is_replaced_by_a_fresh_state() {
    let host = FakeHost::new();
    let c = compiled(&host);
    host.shared_set(c.breaker_key(0), b"\xff\x00garbage", 0).unwrap();
    assert_eq!(checkout(&c, &host, 500), Action::Continue);
    checkout(&c, &host, 500);
    checkout(&c, &host, 500);
    assert_eq!(checkout(&c, &host, 200), Action::Rejected);
}

#[test]
fn duration_formatting_for_log_lines() {
    assert_eq!(fmt_duration(250 * MS), "250ms");
    assert_eq!(fmt_duration(10 * SECOND), "10s");
    assert_eq!(fmt_duration(1500 * MS), "1.5s");
}

#[test]
fn an_http_429_is_a_success_although_envoy_maps_it_to_grpc_unavailable() {
    let host = FakeHost::new();
    let c = compiled(&host);
    for _ in 0..5 {
        checkout(&c, &host, 429);
    }
    assert_eq!(host.metric("requests.policy.checkout.outcome.success"), 5);
    assert_eq!(checkout(&c, &host, 200), Action::Continue);
}

#[test]
fn a_transport_error_flag_is_only_read_when_the_status_leaves_room_for_one() {
    let host = FakeHost::new();
    let c = compiled(&host);
    checkout(&c, &host, 200);
    checkout(&c, &host, 404);
    assert_eq!(host.take_calls().get("property"), Some(&2), "the route names only");
    checkout(&c, &host, 503);
    assert_eq!(host.take_calls().get("property"), Some(&2), "the route name and response.flags");
}

#[test]
fn a_success_on_a_quiet_breaker_costs_two_data_reads_and_no_shared_data() {
    let host = FakeHost::new();
    let c = compiled(&host);
    checkout(&c, &host, 200); // the first request learns the breaker's state
    host.take_calls();
    checkout(&c, &host, 200);
    let calls = host.take_calls();
    // The route name, :status, the success counter, and two clock reads for slow_call.
    let expected = [("property", 1), ("header", 1), ("metric", 1), ("clock", 2)];
    assert_eq!(calls, expected.into_iter().collect(), "{calls:?}");
}

#[test]
fn an_open_breaker_rejects_from_the_workers_view_without_shared_data() {
    let host = FakeHost::new();
    let c = compiled(&host);
    for _ in 0..3 {
        checkout(&c, &host, 500);
    }
    host.take_calls();
    assert_eq!(checkout(&c, &host, 200), Action::Rejected);
    let calls = host.take_calls();
    assert_eq!(calls.get("shared_get"), None, "{calls:?}");
}

#[test]
fn batched_successes_reach_the_shared_breaker_on_sync() {
    let host = FakeHost::new();
    let c = compiled(&host);
    for _ in 0..5 {
        checkout(&c, &host, 200);
    }
    assert_eq!(host.take_calls().get("shared_set"), None, "successes on a quiet breaker are batched");
    sync(&c, &host);
    assert_eq!(host.take_calls().get("shared_set"), Some(&1), "and written once per sync");
    let state = breakwater_policies::BreakerState::decode(&host.shared_get(c.breaker_key(0)).unwrap().0).unwrap();
    assert_eq!(state.window.totals(0, SECOND).total, 5);
    sync(&c, &host);
    assert_eq!(host.take_calls().get("shared_set"), None, "nothing pending, nothing written");
}

#[test]
fn a_quiet_worker_learns_of_another_workers_trip_at_its_next_sync() {
    let w1 = FakeHost::new();
    let w2 = FakeHost::worker_of(&w1);
    let (c1, c2) = (compiled(&w1), compiled(&w2));
    checkout(&c2, &w2, 200); // worker 2 sees a quiet, closed breaker
    for _ in 0..3 {
        checkout(&c1, &w1, 500);
    }
    // Bounded staleness: until its next sync, worker 2 still admits.
    assert_eq!(checkout(&c2, &w2, 200), Action::Continue);
    sync(&c2, &w2);
    assert_eq!(checkout(&c2, &w2, 200), Action::Rejected);
}

#[test]
fn a_worker_that_saw_failures_sees_another_workers_trip_at_once() {
    let w1 = FakeHost::new();
    let w2 = FakeHost::worker_of(&w1);
    let (c1, c2) = (compiled(&w1), compiled(&w2));
    checkout(&c1, &w1, 500);
    checkout(&c2, &w2, 500); // worker 2's view: failing
    checkout(&c1, &w1, 500); // the third failure trips it
    assert_eq!(checkout(&c2, &w2, 200), Action::Rejected);
}

#[test]
fn a_success_while_failing_ends_the_run_for_every_worker_at_once() {
    let w1 = FakeHost::new();
    let w2 = FakeHost::worker_of(&w1);
    let (c1, c2) = (compiled(&w1), compiled(&w2));
    checkout(&c1, &w1, 500);
    checkout(&c1, &w1, 500);
    checkout(&c2, &w2, 200); // worker 2 reads the state (failing) and writes its success at once
    checkout(&c1, &w1, 500);
    assert_eq!(checkout(&c1, &w1, 200), Action::Continue);
}

#[test]
fn an_idle_policys_view_is_dropped_at_sync_and_read_again_on_next_use() {
    let host = FakeHost::new();
    let c = compiled(&host);
    checkout(&c, &host, 200);
    sync(&c, &host); // active since the last sync: refreshed
    sync(&c, &host); // idle for a whole interval: dropped
    host.take_calls();
    checkout(&c, &host, 200);
    assert_eq!(host.take_calls().get("shared_get"), Some(&1));
}

#[test]
fn a_failure_carries_the_workers_own_earlier_successes_with_it() {
    let host = FakeHost::new();
    let c = compiled(&host);
    checkout(&c, &host, 500);
    checkout(&c, &host, 500);
    checkout(&c, &host, 200); // pending, not yet synced
    checkout(&c, &host, 500);
    checkout(&c, &host, 500);
    assert_eq!(host.metric("transitions.policy.checkout.to.open"), 0, "2 failures since the success");
    checkout(&c, &host, 500);
    assert_eq!(host.metric("transitions.policy.checkout.to.open"), 1, "and the third trips it");
}

#[test]
fn an_upstream_5xx_counts_even_if_the_client_left_right_after_it() {
    let host = FakeHost::new();
    let c = compiled(&host);
    for _ in 0..3 {
        request(&c, &host, "checkout", "/", 503, flags::DOWNSTREAM_CONNECTION_TERMINATION);
    }
    assert_eq!(host.metric("requests.policy.checkout.outcome.failure"), 3);
    assert_eq!(checkout(&c, &host, 200), Action::Rejected);
}

#[test]
fn envoys_own_answers_are_not_the_upstreams_failures() {
    let host = FakeHost::new();
    let c = compiled(&host);
    request(&c, &host, "checkout", "/", 503, flags::UPSTREAM_OVERFLOW);
    request(&c, &host, "checkout", "/", 429, flags::RATE_LIMITED);
    request(&c, &host, "checkout", "/", 503, flags::UPSTREAM_OVERFLOW);
    assert_eq!(host.metric("requests.policy.checkout.outcome.ignored"), 2, "the 429 is a plain success");
    assert_eq!(host.metric("requests.policy.checkout.outcome.failure"), 0);
}
