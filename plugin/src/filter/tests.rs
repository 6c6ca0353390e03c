//! The request path against fake workers: what Envoy would see, without Envoy.

use super::*;
use crate::fake::{FakeHost, Worker};
use crate::outcome::flags;
use breakwater_policies::{MS, SECOND};

const CONFIG: &str = r#"{
  "policies": {
    "checkout": {
      "circuit_breaker": { "consecutive_failures": 3, "open_for": "10s",
                           "slow_call": { "duration": "500ms", "threshold": 100, "minimum_requests": 100 } },
      "reject": { "headers": { "x-team": "payments" } }
    },
    "patient": { "circuit_breaker": { "consecutive_failures": 2, "open_for": "30s", "failure_on": { "timeout": false } } },
    "slowness": { "circuit_breaker": { "slow_call": { "duration": "200ms", "threshold": 50, "minimum_requests": 4 }, "open_for": "1s" } },
    "shadow": { "mode": "dry_run", "circuit_breaker": { "consecutive_failures": 1, "open_for": "10s" } }
  },
  "routes": [
    { "match": { "route_name": "checkout" }, "policy": "checkout" },
    { "match": { "route_name": "patient" }, "policy": "patient" },
    { "match": { "route_name": "slowness" }, "policy": "slowness" },
    { "match": { "path_prefix": "/shadow" }, "policy": "shadow" }
  ]
}"#;

fn worker() -> Worker {
    Worker::first(CONFIG)
}

/// One call that reaches the upstream and gets `status` back (upstream time 1ms).
fn call(w: &Worker, route: &str, status: u16) -> Action {
    let (action, stream) = w.send(route, 1);
    if action == Action::Continue {
        w.end(1, stream, status);
    }
    action
}

/// One call Envoy answers itself (`status`, 0 for none) with response flags `f`: no upstream
/// service time, since the upstream never answered.
fn envoy_answers(w: &Worker, route: &str, status: u16, headers: &[(&str, &str)], f: u64) -> Action {
    let (action, mut stream) = w.send(route, 1);
    if action == Action::Continue {
        if status != 0 {
            w.host.response_headers.borrow_mut().clear();
            w.host.set_response_header(":status", status.to_string());
            for (k, v) in headers {
                w.host.set_response_header(k, v);
            }
            on_response_headers(&w.c, &w.host, &mut stream);
        }
        w.host.set_prop_u64("response.flags", f);
        w.log(1, stream);
    }
    action
}

fn checkout(w: &Worker, status: u16) -> Action {
    call(w, "checkout", status)
}

#[test]
fn third_consecutive_5xx_trips_and_the_fourth_request_is_fast_failed_with_retry_after() {
    let w = worker();
    for _ in 0..3 {
        assert_eq!(checkout(&w, 503), Action::Continue);
    }
    w.at(2500 * MS);
    assert_eq!(checkout(&w, 200), Action::Stop);
    let reply = w.host.last_reply().unwrap();
    assert_eq!(reply.status, 503);
    assert_eq!(reply.body, "breakwater: circuit-open (policy checkout)\n");
    assert_eq!(reply.header("x-breakwater"), Some("circuit-open"));
    assert_eq!(reply.header("retry-after"), Some("8")); // 7.5 s left, rounded up
    assert_eq!(reply.header("x-team"), Some("payments"));
    assert_eq!(w.stat("requests_total.policy.checkout.outcome.failure"), 3);
    assert_eq!(w.stat("rejections_total.policy.checkout.reason.circuit_open"), 1);
    assert_eq!(w.stat("transitions_total.policy.checkout.to_state.open"), 1);
    assert_eq!(w.stat("circuit_state.policy.checkout.state.open"), 1);
    assert_eq!(w.stat("circuit_state.policy.checkout.state.closed"), 0);
}

#[test]
fn failures_on_different_workers_add_up() {
    let w1 = worker();
    let w2 = Worker::second(&w1, CONFIG);
    checkout(&w1, 500);
    checkout(&w2, 500);
    checkout(&w1, 500);
    assert_eq!(checkout(&w2, 200), Action::Stop);
}

#[test]
fn a_4xx_is_a_success_and_breaks_the_run_of_failures() {
    let w = worker();
    checkout(&w, 500);
    checkout(&w, 500);
    checkout(&w, 404);
    checkout(&w, 500);
    assert_eq!(checkout(&w, 200), Action::Continue);
    assert_eq!(w.stat("requests_total.policy.checkout.outcome.success"), 2);
}

#[test]
fn transport_errors_count_by_their_response_flags() {
    let w = worker();
    envoy_answers(&w, "checkout", 503, &[], flags::UPSTREAM_CONNECTION_FAILURE);
    envoy_answers(&w, "checkout", 504, &[], flags::UPSTREAM_REQUEST_TIMEOUT);
    envoy_answers(&w, "checkout", 503, &[], flags::UPSTREAM_REMOTE_RESET);
    assert_eq!(checkout(&w, 200), Action::Stop);
}

#[test]
fn envoys_grpc_timeout_reply_is_not_an_upstream_failure_when_timeouts_do_not_count() {
    // Issue 9, input 3: route timeout 0.3s, an upstream delaying 1s, three gRPC calls. Envoy
    // answers each with 200 + grpc-status 14 and flag UT.
    let w = worker();
    let grpc = [("content-type", "application/grpc"), ("grpc-status", "14")];
    for _ in 0..3 {
        assert_eq!(envoy_answers(&w, "patient", 200, &grpc, flags::UPSTREAM_REQUEST_TIMEOUT), Action::Continue);
    }
    assert_eq!(w.stat("requests_total.policy.patient.outcome.failure"), 0);
    assert_eq!(w.stat("ignored_total.policy.patient.reason.not_counted"), 3);
    assert_eq!(w.stat("transitions_total.policy.patient.to_state.open"), 0);
    // The same upstream answering UNAVAILABLE itself is a failure.
    let (_, mut s) = w.send("patient", 1);
    w.respond(&mut s, 200, 5, &grpc);
    w.log(1, s);
    assert_eq!(w.stat("requests_total.policy.patient.outcome.failure"), 1);
}

#[test]
fn a_client_abort_is_ignored_and_gives_a_probe_its_slot_back() {
    let w = worker();
    for _ in 0..3 {
        checkout(&w, 500);
    }
    w.at(10 * SECOND);
    // The probe's client goes away (DC, no response).
    envoy_answers(&w, "checkout", 0, &[], flags::DOWNSTREAM_CONNECTION_TERMINATION);
    assert_eq!(w.stat("ignored_total.policy.checkout.reason.client_closed"), 1);
    assert_eq!(w.stat("transitions_total.policy.checkout.to_state.half_open"), 1);
    // The slot is free again: the next request is the probe, succeeds and closes the breaker.
    assert_eq!(checkout(&w, 200), Action::Continue);
    assert_eq!(w.stat("transitions_total.policy.checkout.to_state.closed"), 1);
    assert_eq!(w.stat("circuit_state.policy.checkout.state.closed"), 1);
}

#[test]
fn only_one_probe_at_a_time_and_the_others_are_rejected() {
    let w = worker();
    for _ in 0..3 {
        checkout(&w, 500);
    }
    w.at(10 * SECOND);
    let (first, probe) = w.send("checkout", 1);
    assert_eq!(first, Action::Continue);
    assert!(matches!(probe, Stream::Tracked(Tracked { call: Some(breaker::Call { probe: true, .. }), .. })));
    assert_eq!(w.send("checkout", 2).0, Action::Stop);
    assert_eq!(w.host.last_reply().unwrap().header("retry-after"), Some("1"));
}

#[test]
fn dry_run_counts_what_it_would_reject_and_rejects_nothing() {
    let w = worker();
    for _ in 0..5 {
        w.host.new_stream();
        let (a, s) = {
            w.host.set_header(":path", "/shadow/x");
            on_request_headers(&w.c, &w.host, &w.vm, 1)
        };
        assert_eq!(a, Action::Continue);
        w.end(1, s, 500);
    }
    assert!(w.host.replies.borrow().is_empty());
    assert_eq!(w.stat("dry_run_rejections_total.policy.shadow.reason.circuit_open"), 4);
    assert!(!w.host.has_metric("rejections_total.policy.shadow.reason.circuit_open"), "a dry run has no rejections");
    // Would-be-rejected requests stay out of the breaker: only the first failure was counted.
    assert_eq!(w.stat("requests_total.policy.shadow.outcome.failure"), 1);
}

#[test]
fn grpc_status_failures_count_from_trailers_and_from_trailers_only_replies() {
    let w = worker();
    for trailers_only in [false, true, false] {
        let (_, mut s) = w.send("checkout", 1);
        if trailers_only {
            w.respond(&mut s, 200, 1, &[("content-type", "application/grpc"), ("grpc-status", "14")]);
        } else {
            w.respond(&mut s, 200, 1, &[("content-type", "application/grpc")]);
            w.host.set_response_trailer("grpc-status", "4");
            on_response_trailers(&w.c, &w.host, &mut s);
        }
        w.log(1, s);
    }
    assert_eq!(checkout(&w, 200), Action::Stop);
}

#[test]
fn grpc_ok_is_a_success_and_a_plain_http_response_reads_no_trailers() {
    let w = worker();
    let (_, mut s) = w.send("checkout", 1);
    w.respond(&mut s, 200, 1, &[("content-type", "application/grpc")]);
    w.host.set_response_trailer("grpc-status", "0");
    on_response_trailers(&w.c, &w.host, &mut s);
    w.log(1, s);
    assert_eq!(w.stat("requests_total.policy.checkout.outcome.success"), 1);
    let (_, mut s) = w.send("checkout", 2);
    w.respond(&mut s, 200, 1, &[]);
    w.host.take_calls();
    on_response_trailers(&w.c, &w.host, &mut s);
    assert!(w.host.take_calls().is_empty(), "not gRPC: no trailer read");
}

#[test]
fn requests_matching_no_route_pass_untouched_and_are_not_counted() {
    let w = worker();
    for _ in 0..10 {
        assert_eq!(call(&w, "other", 500), Action::Continue);
    }
    assert_eq!(checkout(&w, 200), Action::Continue);
    assert_eq!(w.stat("requests_total.policy.checkout.outcome.failure"), 0);
}

#[test]
fn slow_is_judged_on_the_upstreams_time_to_response_headers() {
    let w = worker();
    let (_, mut s) = w.at(0).send("checkout", 1);
    w.respond(&mut s, 200, 600, &[]);
    w.log(1, s);
    assert_eq!(w.stat("slow_calls_total.policy.checkout"), 1);
    // A long-lived stream (a websocket, a gRPC server stream, SSE): headers after 10ms, then
    // the stream runs for minutes. It is not a slow call.
    let (_, mut s) = w.at(SECOND).send("checkout", 2);
    w.respond(&mut s, 101, 10, &[]);
    w.at(300 * SECOND).log(2, s);
    assert_eq!(w.stat("slow_calls_total.policy.checkout"), 1);
    assert_eq!(w.stat("requests_total.policy.checkout.outcome.success"), 2);
}

#[test]
fn long_streams_do_not_open_a_breaker_that_judges_slowness() {
    // Issue 9, input 5: two websockets held 1.5s on a route with slow_call {1s, 50%, 2}.
    let w = Worker::first(
        r#"{"policies": {"ws": {"circuit_breaker": {"slow_call": {"duration": "1s", "threshold": 50, "minimum_requests": 2}}}},
            "routes": [{"match": {"route_name": "ws"}, "policy": "ws"}]}"#,
    );
    for i in 0..2 {
        let (_, mut s) = w.at(0).send("ws", i);
        w.respond(&mut s, 101, 3, &[("upgrade", "websocket")]);
        w.at(1500 * MS).log(i, s);
    }
    for t in 1..5 {
        w.at(1500 * MS + t * 50 * MS).tick();
    }
    assert_eq!(w.stat("transitions_total.policy.ws.to_state.open"), 0);
    assert_eq!(call(&w, "ws", 200), Action::Continue);
}

#[test]
fn a_slow_probe_keeps_open_a_breaker_that_opened_because_calls_were_slow() {
    // Issue 9, input 4.
    let w = worker();
    for i in 0..4 {
        let (_, mut s) = w.at(0).send("slowness", i);
        w.respond(&mut s, 200, 400, &[]);
        w.log(i, s);
    }
    for t in 1..=3 {
        w.at(t * 50 * MS).tick();
    }
    assert_eq!(w.stat("transitions_total.policy.slowness.to_state.open"), 1);
    let (a, mut probe) = w.at(1200 * MS).send("slowness", 9);
    assert_eq!(a, Action::Continue, "the probe");
    w.respond(&mut probe, 200, 400, &[]);
    w.log(9, probe);
    assert_eq!(w.stat("transitions_total.policy.slowness.to_state.closed"), 0, "a slow probe does not close it");
    assert_eq!(w.stat("transitions_total.policy.slowness.to_state.open"), 2);
    assert_eq!(w.send("slowness", 10).0, Action::Stop);
}

#[test]
fn a_call_from_before_a_trip_does_not_count_after_the_breaker_closed_again() {
    // Issue 9, input 6: admitted while closed, it ends after the breaker opened and closed.
    let w = worker();
    let (_, straggler) = w.at(0).send("checkout", 1);
    for _ in 0..3 {
        checkout(&w, 500);
    }
    w.at(10 * SECOND);
    assert_eq!(checkout(&w, 200), Action::Continue, "the probe closes it");
    checkout(&w, 500);
    checkout(&w, 500);
    w.end(1, straggler, 500);
    assert_eq!(w.stat("ignored_total.policy.checkout.reason.stale"), 1);
    assert_eq!(w.stat("transitions_total.policy.checkout.to_state.open"), 1, "two failures of this period only");
    assert_eq!(checkout(&w, 200), Action::Continue);
}

#[test]
fn lost_cas_races_are_retried() {
    let w = worker();
    for _ in 0..3 {
        w.host.process.cas_conflicts.set(5);
        checkout(&w, 500);
    }
    assert_eq!(checkout(&w, 200), Action::Stop);
}

#[test]
fn garbage_in_shared_data_is_replaced_by_a_fresh_state() {
    let w = worker();
    let key = &w.c.policies[0].breaker_key;
    crate::host::Host::shared_set(&w.host, key, b"\xff\x00garbage", 0).unwrap();
    assert_eq!(checkout(&w, 500), Action::Continue);
    checkout(&w, 500);
    checkout(&w, 500);
    assert_eq!(checkout(&w, 200), Action::Stop);
}

#[test]
fn an_http_429_is_a_success_although_envoy_maps_it_to_grpc_unavailable() {
    let w = worker();
    for _ in 0..5 {
        checkout(&w, 429);
    }
    assert_eq!(w.stat("requests_total.policy.checkout.outcome.success"), 5);
    assert_eq!(checkout(&w, 200), Action::Continue);
}

#[test]
fn response_flags_are_read_only_when_the_upstream_did_not_answer() {
    let w = worker();
    checkout(&w, 200);
    w.host.take_calls();
    checkout(&w, 503);
    let calls = w.host.take_calls();
    assert_eq!(calls.get("property"), Some(&1), "the route name only: {calls:?}");
    envoy_answers(&w, "checkout", 503, &[], flags::UPSTREAM_CONNECTION_FAILURE);
    assert_eq!(w.host.take_calls().get("property"), Some(&2), "the route name and response.flags");
}

#[test]
fn an_open_breaker_rejects_from_the_workers_view_without_shared_data() {
    let w = worker();
    for _ in 0..3 {
        checkout(&w, 500);
    }
    w.host.take_calls();
    assert_eq!(checkout(&w, 200), Action::Stop);
    let calls = w.host.take_calls();
    assert_eq!(calls.get("shared_get"), None, "{calls:?}");
}

#[test]
fn batched_successes_reach_the_shared_breaker_once_a_window_bucket() {
    let w = worker();
    w.host.take_calls();
    for _ in 0..5 {
        checkout(&w, 200);
    }
    assert_eq!(w.host.take_calls().get("shared_set"), None, "successes on a quiet breaker are batched");
    w.at(50 * MS).tick();
    assert_eq!(w.host.take_calls().get("shared_set"), None, "not due yet: the window's buckets are 1s");
    w.at(SECOND).tick();
    assert_eq!(w.host.take_calls().get("shared_set"), Some(&1), "handed over once the bucket is up");
    let key = &w.c.policies[0].breaker_key;
    let state =
        breakwater_policies::BreakerState::decode(&crate::host::Host::shared_get(&w.host, key).unwrap().0).unwrap();
    assert_eq!(state.window.totals(SECOND, SECOND).total, 5);
    w.at(SECOND + 50 * MS).tick();
    assert_eq!(w.host.take_calls().get("shared_set"), None, "nothing pending, nothing written");
}

#[test]
fn a_quiet_worker_learns_of_another_workers_trip_one_queue_hop_later() {
    let w1 = worker();
    let w2 = Worker::second(&w1, CONFIG);
    checkout(&w2, 200); // worker 2 sees a quiet, closed breaker
    for _ in 0..3 {
        checkout(&w1, 500);
    }
    // Worker 1 told worker 2 (the first failure of the run, then the trip): as soon as worker 2
    // reads its queue, it drops its view and sees the trip.
    w2.wake();
    assert_eq!(checkout(&w2, 200), Action::Stop);
}

#[test]
fn a_worker_that_misses_the_message_still_learns_within_a_second() {
    let w1 = worker();
    let w2 = Worker::second(&w1, CONFIG);
    checkout(&w2, 200);
    for _ in 0..3 {
        checkout(&w1, 500);
    }
    w2.host.process.queues.borrow_mut().get_mut(&2).unwrap().clear(); // the messages are lost
    assert_eq!(checkout(w2.at(500 * MS), 200), Action::Continue, "bounded staleness");
    w2.at(SECOND).tick(); // an active view is read again at least every second
    assert_eq!(checkout(&w2, 200), Action::Stop);
}

#[test]
fn a_worker_that_saw_failures_sees_another_workers_trip_at_once() {
    let w1 = worker();
    let w2 = Worker::second(&w1, CONFIG);
    checkout(&w1, 500);
    checkout(&w2, 500); // worker 2's view: failing
    checkout(&w1, 500); // the third failure trips it
    assert_eq!(checkout(&w2, 200), Action::Stop);
}

#[test]
fn a_success_while_failing_ends_the_run_for_every_worker_at_once() {
    let w1 = worker();
    let w2 = Worker::second(&w1, CONFIG);
    checkout(&w1, 500);
    checkout(&w1, 500);
    checkout(&w2, 200); // worker 2 reads the state (failing) and writes its success at once
    checkout(&w1, 500);
    assert_eq!(checkout(&w1, 200), Action::Continue);
}

#[test]
fn an_idle_policys_view_is_dropped_after_a_second_and_read_again_on_next_use() {
    let w = worker();
    checkout(w.at(0), 200);
    w.at(500 * MS).tick(); // used recently: kept
    w.host.take_calls();
    checkout(&w, 200);
    assert_eq!(w.host.take_calls().get("shared_get"), None);
    w.at(2 * SECOND).tick(); // idle for a second: dropped (after handing its batch over)
    w.at(3 * SECOND).tick();
    w.host.take_calls();
    checkout(&w, 200);
    assert_eq!(w.host.take_calls().get("shared_get"), Some(&1));
}

#[test]
fn a_failure_carries_the_workers_own_earlier_successes_with_it() {
    let w = worker();
    checkout(&w, 500);
    checkout(&w, 500);
    checkout(&w, 200); // written at once: the view is failing
    checkout(&w, 500);
    checkout(&w, 500);
    assert_eq!(w.stat("transitions_total.policy.checkout.to_state.open"), 0, "2 failures since the success");
    checkout(&w, 500);
    assert_eq!(w.stat("transitions_total.policy.checkout.to_state.open"), 1, "and the third trips it");
}

#[test]
fn an_upstream_5xx_counts_even_if_the_client_left_right_after_it() {
    let w = worker();
    for _ in 0..3 {
        let (_, mut s) = w.send("checkout", 1);
        w.respond(&mut s, 503, 2, &[]);
        w.host.set_prop_u64("response.flags", flags::DOWNSTREAM_CONNECTION_TERMINATION);
        w.log(1, s);
    }
    assert_eq!(w.stat("requests_total.policy.checkout.outcome.failure"), 3);
    assert_eq!(checkout(&w, 200), Action::Stop);
}

#[test]
fn envoys_own_answers_and_other_filters_replies_are_not_the_upstreams_failures() {
    let w = worker();
    envoy_answers(&w, "checkout", 503, &[], flags::UPSTREAM_OVERFLOW);
    envoy_answers(&w, "checkout", 429, &[], flags::RATE_LIMITED);
    envoy_answers(&w, "checkout", 403, &[], flags::UNAUTHORIZED_EXTERNAL_SERVICE);
    envoy_answers(&w, "checkout", 503, &[], 0); // a direct reply from another filter
    assert_eq!(w.stat("requests_total.policy.checkout.outcome.failure"), 0);
    assert_eq!(w.stat("ignored_total.policy.checkout.reason.envoy_overflow"), 1);
    assert_eq!(w.stat("ignored_total.policy.checkout.reason.rate_limited"), 1);
    assert_eq!(w.stat("ignored_total.policy.checkout.reason.ext_authz"), 1);
    assert_eq!(w.stat("ignored_total.policy.checkout.reason.local_reply"), 1);
}

// Host calls per request: what the healthy path costs (each data-returning call is ~10–12k
// instructions in Envoy 1.40).

const FULL_STACK: &str = r#"{
  "circuit_breaker": { "consecutive_failures": 5, "failure_rate": { "threshold": 50, "minimum_requests": 20 },
                       "slow_call": { "duration": "500ms", "threshold": 80 } },
  "bulkhead": { "max_concurrent": 100, "queue": { "max_size": 50, "timeout": "2s" } },
  "retry": { "max_retries": 2, "budget": { "ratio": 0.2, "min_per_second": 10 } }
}"#;

/// Steady state: warm up (the first requests learn the breaker, take a lease and a retry
/// stock), then count one request.
fn healthy_request_calls(w: &Worker) -> hashbrown::HashMap<&'static str, u32> {
    for i in 0..3 {
        let (_, mut s) = w.send("full", i);
        w.respond(&mut s, 200, 5, &[("x-envoy-attempt-count", "1")]);
        w.log(i, s);
    }
    w.host.take_calls();
    let (_, mut s) = w.send("full", 9);
    w.respond(&mut s, 200, 5, &[("x-envoy-attempt-count", "1")]);
    w.log(9, s);
    w.host.take_calls()
}

#[test]
fn a_per_route_instance_with_all_three_policies_costs_one_data_call_and_no_shared_data() {
    let w = Worker::first(&alloc::format!(r#"{{"policies": {{"full": {FULL_STACK}}}, "policy": "full"}}"#));
    let calls = healthy_request_calls(&w);
    assert_eq!(FakeHost::data_calls(&calls), 1, "{calls:?}");
    assert_eq!(calls.get("response_headers"), Some(&1));
    for kind in ["shared_get", "shared_set", "set_header", "metric", "clock"] {
        assert_eq!(calls.get(kind), None, "{kind}: {calls:?}");
    }
    assert_eq!(calls.get("remove_header"), Some(&1), "x-envoy-attempt-count stripped");
}

#[test]
fn with_route_rules_the_route_name_is_the_only_extra_call() {
    let w = Worker::first(&alloc::format!(
        r#"{{"policies": {{"full": {FULL_STACK}}}, "routes": [{{"match": {{"route_name": "full"}}, "policy": "full"}}]}}"#
    ));
    let calls = healthy_request_calls(&w);
    assert_eq!(FakeHost::data_calls(&calls), 2, "{calls:?}");
    assert_eq!((calls.get("property"), calls.get("response_headers")), (Some(&1), Some(&1)));
}

#[test]
fn a_per_route_instance_breaker_alone_costs_one_data_call() {
    let w = Worker::first(
        r#"{"policies": {"full": {"circuit_breaker": {"consecutive_failures": 5, "slow_call": {"duration": "500ms", "threshold": 80}}}}, "policy": "full"}"#,
    );
    let calls = healthy_request_calls(&w);
    assert_eq!(FakeHost::data_calls(&calls), 1, "{calls:?}");
    assert_eq!(calls.len(), 1, "nothing else: {calls:?}");
}

#[test]
fn a_per_route_instance_fails_fast_from_its_view_with_the_reply_alone() {
    let w = Worker::first(
        r#"{"policies": {"full": {"circuit_breaker": {"consecutive_failures": 1, "open_for": "30s"}}}, "policy": "full"}"#,
    );
    let (_, s) = w.send("full", 1);
    w.end(1, s, 503);
    w.host.take_calls();
    assert_eq!(w.send("full", 2).0, Action::Stop);
    let calls = w.host.take_calls();
    assert_eq!(calls.len(), 1, "no clock read far from open_for's end: {calls:?}");
    assert_eq!(calls.get("reply"), Some(&1), "{calls:?}");
    assert_eq!(w.host.last_reply().unwrap().header("retry-after"), Some("30"));
}

#[test]
fn near_open_fors_end_the_clock_is_read_so_1ms_before_is_refused_and_1ms_after_is_the_probe() {
    let w = Worker::first(
        r#"{"policies": {"full": {"circuit_breaker": {"consecutive_failures": 1, "open_for": "30s"}}}, "policy": "full"}"#,
    );
    let (_, s) = w.send("full", 1);
    w.end(1, s, 503); // open from 0 to 30 s
    w.at(20 * SECOND).tick(); // ticks read the clock every sync_interval: 10 s left, within the margin
    w.at(30 * SECOND - MS);
    w.host.take_calls();
    assert_eq!(w.send("full", 2).0, Action::Stop, "30s - 1ms: still open");
    assert_eq!(w.host.take_calls().get("clock"), Some(&1));
    assert_eq!(w.host.last_reply().unwrap().header("retry-after"), Some("1"));
    w.at(30 * SECOND + MS);
    assert_eq!(w.send("full", 3).0, Action::Continue, "30s + 1ms: the probe, no tick needed");
}

#[test]
fn an_open_breaker_keeps_the_coarse_pace_until_a_coarse_tick_before_its_end_and_turns_half_open_on_time() {
    let w = worker();
    let mut t = 0;
    for i in 0..20 {
        t += 50 * MS;
        w.at(t);
        assert_eq!(checkout(&w, 200), Action::Continue);
        w.tick();
        assert_eq!(w.vm.is_coarse(), i == 19, "coarse after 20 calm ticks (tick {i})");
    }
    for _ in 0..3 {
        checkout(&w, 503); // open from t to t + 10 s
    }
    let until = t + 10 * SECOND;
    while t + 250 * MS < until - 250 * MS {
        t += 250 * MS;
        w.at(t).tick();
        assert!(w.vm.is_coarse(), "{} ms before the end: coarse", (until - t) / MS);
    }
    t += 250 * MS;
    w.at(t).tick();
    assert!(!w.vm.is_coarse(), "{} ms before the end: fine", (until - t) / MS);
    while t < until {
        assert_eq!(w.stat("circuit_state.policy.checkout.state.half_open"), 0);
        t += 50 * MS;
        w.at(t).tick();
    }
    assert_eq!(
        w.stat("circuit_state.policy.checkout.state.half_open"),
        1,
        "half-open at the first tick after open_for"
    );
}

#[test]
fn a_rate_trip_awaiting_confirmation_brings_the_fine_pace_back_at_once() {
    let w = worker();
    w.calm_ticks("checkout", 0, 20);
    assert!(w.vm.is_coarse());
    for _ in 0..4 {
        let (_, mut s) = w.send("slowness", 1);
        w.respond(&mut s, 200, 300, &[]); // slow: over 200ms
        w.log(1, s);
    }
    assert!(!w.vm.is_coarse() && w.host.tick_fine.get(), "suspect: the trip is confirmed on the tick");
}

#[test]
fn route_name_rules_alone_are_one_lookup_and_choose_as_the_general_matcher_does() {
    let policies = r#""a": { "circuit_breaker": { "consecutive_failures": 1 } },
                      "b": { "circuit_breaker": { "consecutive_failures": 1 } }"#;
    let names = r#"[{ "match": { "route_name": "r1" }, "policy": "a" }, { "match": { "route_name": "r1" }, "policy": "b" },
                    { "match": { "route_name": "r2" }, "policy": "b" }]"#;
    let only_names = Worker::first(&alloc::format!(r#"{{"policies": {{{policies}}}, "routes": {names}}}"#));
    // The same rules, and one more that needs the path: the general matcher decides.
    let mixed = Worker::first(&alloc::format!(
        r#"{{"policies": {{{policies}}}, "routes": [{}, {{ "match": {{ "path_prefix": "/never" }}, "policy": "a" }}]}}"#,
        names.trim().trim_start_matches('[').trim_end_matches(']')
    ));
    let Select::Rules(t) = &only_names.c.select else { panic!("rules") };
    assert!(t.names_only());
    let Select::Rules(t) = &mixed.c.select else { panic!("rules") };
    assert!(!t.names_only());
    for w in [&only_names, &mixed] {
        let policy_of = |route: &str| match w.send(route, 1).1 {
            Stream::Tracked(t) => Some(w.c.policy(t.policy).unwrap().name().to_owned()),
            Stream::Untracked => None,
        };
        assert_eq!(policy_of("r1").as_deref(), Some("a"), "the first rule for r1 wins");
        assert_eq!(policy_of("r2").as_deref(), Some("b"));
        assert_eq!(policy_of("r3"), None);
        assert_eq!(policy_of(""), None, "a route without a name");
    }
}
