//! Retries and the retry budget on the request path, against fake workers of one process.

use crate::fake::Worker;
use crate::filter::{Action, Stream};
use alloc::string::String;
use alloc::vec::Vec;
use breakwater_policies::{MS, SECOND};

const CONFIG: &str = r#"{
  "policies": {
    "checkout": { "retry": { "retry_on": ["5xx", "reset", "connect-failure", "retriable-status-codes", "unavailable"],
                             "retriable_status_codes": [409], "max_retries": 3, "per_try_timeout": "500ms",
                             "budget": { "ratio": 0, "min_per_second": 1, "ttl": "10s" } } },
    "plenty": { "retry": { "retry_on": ["5xx"], "max_retries": 3, "budget": { "min_per_second": 1000 } } },
    "earned": { "retry": { "retry_on": ["5xx"], "max_retries": 1, "budget": { "ratio": 0.5, "min_per_second": 0 } } },
    "unbudgeted": { "retry": { "retry_on": ["reset"], "max_retries": 2 } },
    "route_policy": { "retry": { "max_retries": 2, "budget": {} } },
    "starved": { "retry": { "max_retries": 2, "budget": { "ratio": 0, "min_per_second": 0 } } },
    "visible": { "retry": { "max_retries": 1, "budget": {}, "strip_attempt_count": false } },
    "shadow": { "mode": "dry_run", "retry": { "retry_on": ["5xx"], "max_retries": 3, "budget": { "ratio": 0, "min_per_second": 0 } } },
    "full": { "bulkhead": { "max_concurrent": 1 }, "retry": { "retry_on": ["5xx"], "max_retries": 3, "budget": {} } }
  },
  "routes": [
    { "match": { "route_name": "checkout" }, "policy": "checkout" },
    { "match": { "route_name": "plenty" }, "policy": "plenty" },
    { "match": { "route_name": "earned" }, "policy": "earned" },
    { "match": { "route_name": "unbudgeted" }, "policy": "unbudgeted" },
    { "match": { "route_name": "route_policy" }, "policy": "route_policy" },
    { "match": { "route_name": "starved" }, "policy": "starved" },
    { "match": { "route_name": "visible" }, "policy": "visible" },
    { "match": { "route_name": "shadow" }, "policy": "shadow" },
    { "match": { "route_name": "full" }, "policy": "full" }
  ]
}"#;

fn first() -> Worker {
    Worker::first(CONFIG)
}

/// Request headers on `route`: the action, the stream, and the `x-envoy-max-retries` sent.
fn send(w: &Worker, route: &str) -> (Action, Stream, Option<String>) {
    let (action, stream) = w.send(route, 1);
    (action, stream, w.host.header_text("x-envoy-max-retries"))
}

/// The retries a new request on `route` is allowed.
fn allowed(w: &Worker, route: &str) -> u32 {
    send(w, route).2.unwrap().parse().unwrap()
}

/// The stream ends after `attempts` attempts with `status`.
fn end(w: &Worker, stream: Stream, attempts: u64, status: u16) {
    w.end_after(1, stream, attempts, status);
}

#[test]
fn the_router_is_told_how_to_retry_each_request() {
    let w = first();
    send(&w, "checkout");
    let h = |name: &str| w.host.header_text(name);
    assert_eq!(h("x-envoy-retry-on").as_deref(), Some("5xx,reset,connect-failure,retriable-status-codes"));
    assert_eq!(h("x-envoy-retry-grpc-on").as_deref(), Some("unavailable"));
    assert_eq!(h("x-envoy-retriable-status-codes").as_deref(), Some("409"));
    assert_eq!(h("x-envoy-upstream-rq-per-try-timeout-ms").as_deref(), Some("500"));
    assert_eq!(h("x-envoy-max-retries").as_deref(), Some("3"));
}

#[test]
fn without_retry_on_the_routes_own_retry_policy_is_kept_and_no_header_is_set_while_the_budget_allows() {
    let w = first();
    w.host.take_calls();
    let (_, s, max) = send(&w, "route_policy");
    assert_eq!((w.host.header_text("x-envoy-retry-on"), max), (None, None));
    assert_eq!(w.host.take_calls().get("set_header"), None, "no header on a request the budget allows");
    w.end(1, s, 200);
}

#[test]
fn without_retry_on_a_request_the_budget_denies_gets_max_retries_0() {
    // "starved": 2 retries wanted, a budget of nothing.
    let w = first();
    let (_, _, max) = send(&w, "starved");
    assert_eq!(max.as_deref(), Some("0"));
    assert_eq!(w.stat("retry_denied_total.policy.starved.reason.budget_exhausted"), 1);
}

#[test]
fn the_attempt_count_comes_from_the_response_headers_and_is_stripped_from_the_client_response() {
    let w = first();
    let (_, mut s, _) = send(&w, "route_policy");
    w.host.take_calls();
    w.respond(&mut s, 200, 3, &[("x-envoy-attempt-count", "2")]);
    assert_eq!(w.host.response_header("x-envoy-attempt-count"), None, "stripped: Breakwater asked for it");
    w.log(1, s);
    let calls = w.host.take_calls();
    assert_eq!(
        (calls.get("response_headers"), calls.get("property"), calls.get("remove_header")),
        (Some(&1), None, Some(&1)),
        "{calls:?}"
    );
    assert_eq!(
        (w.stat("retries_total.policy.route_policy"), w.stat("retry_rescued_total.policy.route_policy")),
        (1, 1)
    );
}

#[test]
fn a_policy_may_keep_the_attempt_count_for_clients() {
    let w = first();
    let (_, mut s, _) = send(&w, "visible");
    w.respond(&mut s, 200, 3, &[("x-envoy-attempt-count", "1")]);
    assert_eq!(w.host.response_header("x-envoy-attempt-count").as_deref(), Some(&b"1"[..]));
    w.log(1, s);
}

#[test]
fn concurrent_requests_share_the_budget_and_never_overdraw_it_across_workers() {
    // Budget: 1/s × 10 s = 10 retries, nothing deposited yet; 3 wanted per request.
    let w1 = first();
    let w2 = Worker::second(&w1, CONFIG);
    let granted: Vec<u32> =
        (0..6).map(|i| if i % 2 == 0 { allowed(&w1, "checkout") } else { allowed(&w2, "checkout") }).collect();
    assert_eq!(granted, [3, 3, 3, 1, 0, 0]);
    w1.stat("retry_denied_total.policy.checkout.reason.budget_exhausted");
    assert_eq!(w2.stat("retry_denied_total.policy.checkout.reason.budget_exhausted"), 2);
}

#[test]
fn retries_a_request_did_not_use_are_refunded() {
    let w = first();
    let streams: Vec<Stream> = (0..3).map(|_| send(&w, "checkout").1).collect();
    assert_eq!(allowed(&w, "checkout"), 1, "9 of 10 reserved");
    for s in streams {
        end(&w, s, 2, 200); // one retry each: two of three come back
    }
    assert_eq!(allowed(&w, "checkout"), 3);
    assert_eq!((w.stat("retries_total.policy.checkout"), w.stat("retry_rescued_total.policy.checkout")), (3, 3));
}

#[test]
fn a_request_that_failed_after_its_retries_is_not_rescued() {
    let w = first();
    let (_, s, _) = send(&w, "checkout");
    end(&w, s, 4, 503);
    assert_eq!((w.stat("retries_total.policy.checkout"), w.stat("retry_rescued_total.policy.checkout")), (3, 0));
}

#[test]
fn each_request_earns_ratio_of_a_retry_and_the_budget_never_runs_ahead_of_it() {
    // ratio 0.5, no reserve: requests 1..=n may have used floor(n / 2) retries between them.
    let w = first();
    let mut total = 0;
    for n in 1..=10 {
        total += allowed(&w, "earned");
        assert_eq!(total, n / 2, "after {n} requests");
    }
    assert_eq!(w.stat("retry_budget_remaining.policy.earned"), 0);
}

#[test]
fn deposits_reach_the_budget_once_a_bucket_and_an_old_stock_goes_back() {
    let w = first();
    for _ in 0..5 {
        let (_, s, _) = send(&w, "plenty");
        end(&w, s, 1, 200);
    }
    // The first request withdrew 3 + a stock of 24; every request took its 3 from the stock
    // and gave them back unused.
    assert_eq!(w.host.metric("retry_budget_remaining.policy.plenty"), 10_000 - 27);
    w.at(500 * MS).tick();
    assert_eq!(
        w.host.metric("retry_budget_remaining.policy.plenty"),
        10_000 - 27,
        "deposits wait for the bucket's end"
    );
    w.at(SECOND).tick();
    assert_eq!(
        w.host.metric("retry_budget_remaining.policy.plenty"),
        10_000 + 1,
        "a new bucket: five deposits of 0.2 make one retry, and the stock of the old bucket is back"
    );
}

#[test]
fn with_budget_to_spare_a_worker_serves_retries_from_its_stock_without_shared_data() {
    let w = first();
    let (_, first, _) = send(&w, "plenty");
    w.host.take_calls();
    let mut streams = Vec::new();
    for _ in 0..8 {
        let (_, s, allowed) = send(&w, "plenty");
        assert_eq!(allowed.as_deref(), Some("3"));
        streams.push(s);
    }
    let calls = w.host.take_calls();
    assert_eq!((calls.get("shared_get"), calls.get("clock")), (None, None), "{calls:?}");
    for s in streams.into_iter().chain([first]) {
        end(&w, s, 1, 200);
    }
    assert_eq!(w.host.take_calls().get("shared_get"), None, "refunds go back to the stock");
}

#[test]
fn a_stock_from_a_past_bucket_goes_back_at_sync() {
    let w = first();
    w.at(0);
    send(&w, "plenty");
    w.at(2 * SECOND).tick();
    let remaining = w.host.metric("retry_budget_remaining.policy.plenty");
    assert_eq!(remaining, 10_000 - 3, "the stock of 24 went back; the request in flight keeps its 3");
}

#[test]
fn without_the_attempt_count_header_the_attempts_are_read_from_the_attribute() {
    let w = first();
    let (_, s, _) = send(&w, "plenty");
    w.host.take_calls();
    end(&w, s, 2, 200);
    let calls = w.host.take_calls();
    assert_eq!((calls.get("response_headers"), calls.get("property")), (Some(&1), Some(&1)), "{calls:?}");
    assert_eq!(w.stat("retry_rescued_total.policy.plenty"), 1);
}

#[test]
fn an_unbudgeted_policy_allows_max_retries_and_touches_no_shared_data() {
    let w = first();
    w.host.take_calls();
    assert_eq!(allowed(&w, "unbudgeted"), 2);
    assert_eq!(w.host.take_calls().get("shared_get"), None);
}

#[test]
fn dry_run_lets_every_retry_through_and_counts_what_the_budget_would_deny() {
    let w = first();
    let (_, s, allowed) = send(&w, "shadow");
    assert_eq!(allowed.as_deref(), Some("3"));
    assert_eq!(w.stat("dry_run_retry_denied_total.policy.shadow.reason.budget_exhausted"), 1);
    assert_eq!(w.stat("retry_denied_total.policy.shadow.reason.budget_exhausted"), 0);
    end(&w, s, 3, 200);
    assert_eq!(w.stat("retries_total.policy.shadow"), 2);
}

#[test]
fn a_request_the_bulkhead_refuses_reserves_no_retries() {
    let w = first();
    let (a, _held, _) = send(&w, "full");
    assert_eq!(a, Action::Continue);
    w.host.headers.borrow_mut().clear();
    let (refused, _, allowed) = send(&w, "full");
    assert_eq!((refused, allowed), (Action::Stop, None));
}
