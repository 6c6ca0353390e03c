//! Scenarios: a configuration, log lines made for it, and what the replay must find.

use super::*;
use serde_json::json;

const T0: u64 = 1_700_000_000; // seconds since the epoch
const SEC: u64 = 1_000_000_000;

/// One request of route `route`: starting `at_ms` after T0, lasting `ms`, with status `status`
/// from the upstream; `extra` overrides or adds fields.
fn line(route: &str, at_ms: u64, ms: u64, status: u16, extra: serde_json::Value) -> String {
    let mut l = json!({
        "start_time": format!("{T0}.{:03}000", at_ms % 1000).replacen(&T0.to_string(), &(T0 + at_ms / 1000).to_string(), 1),
        "duration_ms": ms,
        "to_upstream_us": 0,
        "route_name": route,
        "method": "GET",
        "path": format!("/{route}"),
        "authority": "shop.example.com",
        "cluster": "backend",
        "status": status,
        "response_flags": "-",
        "code_details": "via_upstream",
        "upstream_service_time": ms.to_string(),
        "attempts": 1,
        "breakwater": null,
    });
    if let (Some(l), Some(e)) = (l.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            l.insert(k.clone(), v.clone());
        }
    }
    l.to_string()
}

fn config(c: serde_json::Value) -> Config {
    breakwater::config::parse(c.to_string().as_bytes()).unwrap()
}

/// Reads `lines` (in that order, as one file), sorts them as the command does, and replays.
fn run(c: &Config, lines: &[String]) -> Report {
    let mut reading = Reading::new();
    let f = reading.file("test.log");
    for (n, l) in lines.iter().enumerate() {
        reading.line(c, f, n as u64 + 1, l);
    }
    reading.requests.sort_by_key(|r| (r.start, r.file, r.line));
    replay(c, &reading, &mut |_| {})
}

fn one(route: &str, body: serde_json::Value) -> Config {
    config(json!({ "policies": { route: body }, "routes": [ { "match": { "route_name": route }, "policy": route } ] }))
}

fn at(t: &TransitionReport) -> u64 {
    t.when.ns - T0 * SEC
}

#[test]
fn the_fifth_consecutive_failure_trips_when_it_ends_and_the_open_period_refuses() {
    let c = one("p", json!({ "circuit_breaker": { "consecutive_failures": 5, "open_for": "10s" } }));
    // A failure every 100 ms, each lasting 20 ms; then requests every second for 12 s.
    let mut lines: Vec<String> = (0..5).map(|i| line("p", i * 100, 20, 500, json!({}))).collect();
    lines.extend((1..=12).map(|s| line("p", 400 + s * 1000, 5, 200, json!({}))));
    let r = run(&c, &lines);
    let p = &r.policies[0];
    let b = p.breaker.as_ref().unwrap();
    let t = &b.transitions;
    assert_eq!(
        (t[0].to, t[0].reason, t[0].detail.as_str()),
        ("open", Some("consecutive_failures"), "5 consecutive failures; open for 10s")
    );
    assert_eq!(at(&t[0]), 420 * MS, "the 5th failure (at 400 ms, 20 ms long) trips when it ends");
    assert_eq!(t[0].open_for_s, Some(10.0));
    // Open until 10.42 s: the requests at 1.4 s … 10.4 s are refused; the one at 11.4 s is a probe.
    assert_eq!(p.refused.circuit_open, 10);
    assert_eq!((t[1].to, at(&t[1])), ("half_open", 10_420 * MS), "half-open exactly when the period ends");
    assert_eq!((t[2].to, t[2].detail.as_str(), at(&t[2])), ("closed", "probes succeeded", 11_405 * MS));
    assert_eq!((b.opened, b.half_opened, b.closed, b.final_state), (1, 1, 1, "closed"));
    assert_eq!((b.calls.success, b.calls.failure), (2, 5));
    assert!((b.open_s - 10.0).abs() < 1e-9, "{}", b.open_s);
    assert_eq!((p.versus_live.only_simulation_refused, p.versus_live.only_simulation_refused_failed), (10, 0));
}

#[test]
fn four_failures_and_a_success_do_not_trip() {
    let c = one("p", json!({ "circuit_breaker": { "consecutive_failures": 5 } }));
    let mut lines: Vec<String> = (0..4).map(|i| line("p", i * 100, 20, 503, json!({}))).collect();
    lines.push(line("p", 400, 20, 200, json!({})));
    lines.extend((5..9).map(|i| line("p", i * 100, 20, 503, json!({}))));
    let r = run(&c, &lines);
    let b = r.policies[0].breaker.as_ref().unwrap();
    assert_eq!((b.opened, b.calls.failure, b.calls.success), (0, 8, 1));
}

#[test]
fn a_failure_rate_trip_is_confirmed_two_sync_intervals_later() {
    let c = one(
        "p",
        json!({ "circuit_breaker": { "failure_rate": { "threshold": 50, "minimum_requests": 10, "window": "10s" }, "open_for": "5s" } }),
    );
    // Ten calls 100 ms apart, 10 ms each; every other one fails: 50% over 10 calls at 910 ms.
    let lines: Vec<String> =
        (0..10).map(|i| line("p", i * 100, 10, if i % 2 == 1 { 500 } else { 200 }, json!({}))).collect();
    let r = run(&c, &lines);
    let t = &r.policies[0].breaker.as_ref().unwrap().transitions;
    assert_eq!(t.len(), 1, "{t:?}");
    assert_eq!(
        (t[0].reason, t[0].detail.as_str()),
        (Some("failure_rate"), "failure rate 50% of 10 requests; open for 5s")
    );
    assert_eq!(at(&t[0]), 910 * MS + 100 * MS, "suspect at 910 ms, confirmed 2 × sync_interval (50 ms) later");
}

#[test]
fn a_failed_probe_reopens_for_twice_the_period_within_its_jitter() {
    let c =
        one("p", json!({ "circuit_breaker": { "consecutive_failures": 2, "open_for": "1s", "max_open_for": "10s" } }));
    let lines = vec![
        line("p", 0, 10, 500, json!({})),
        line("p", 100, 10, 500, json!({})),  // trips at 110 ms, open until 1.11 s
        line("p", 1500, 10, 500, json!({})), // the probe fails at 1.51 s: open for 2 s ±10%
        line("p", 2000, 10, 200, json!({})), // refused
        line("p", 5000, 10, 200, json!({})), // the next probe closes it
    ];
    let r = run(&c, &lines);
    let p = &r.policies[0];
    let t = &p.breaker.as_ref().unwrap().transitions;
    let kinds: Vec<&str> = t.iter().map(|t| t.to).collect();
    assert_eq!(kinds, ["open", "half_open", "open", "half_open", "closed"]);
    assert_eq!((at(&t[1]), at(&t[2])), (1110 * MS, 1510 * MS));
    assert_eq!(t[2].reason, Some("probe_failed"));
    let period = t[2].open_for_s.unwrap();
    assert!((1.8..=2.2).contains(&period), "{period}");
    assert_eq!(at(&t[3]), 1510 * MS + (period * 1e9).round() as u64);
    assert_eq!((p.refused.circuit_open, at(&t[4])), (1, 5010 * MS));
}

#[test]
fn a_request_refused_live_is_admitted_with_an_unknown_outcome_and_a_probe_gives_its_slot_back() {
    let c = one("p", json!({ "circuit_breaker": { "consecutive_failures": 2, "open_for": "1s" } }));
    let refused = json!({ "breakwater": "circuit-open", "attempts": 0, "upstream_service_time": null, "code_details": "", "to_upstream_us": null });
    let lines = vec![
        line("p", 0, 10, 500, json!({})),
        // Live, the breaker was open here (say it had tripped earlier): here it is closed.
        line("p", 100, 0, 503, refused.clone()),
        line("p", 200, 10, 500, json!({})),  // the 2nd failure: trips at 210 ms
        line("p", 1300, 0, 503, refused),    // the first probe: outcome unknown, slot back
        line("p", 1400, 10, 200, json!({})), // so this one is a probe too, and closes it
    ];
    let r = run(&c, &lines);
    let p = &r.policies[0];
    let b = p.breaker.as_ref().unwrap();
    assert_eq!((b.calls.unknown, b.calls.failure, b.calls.success), (2, 2, 1));
    assert_eq!((b.opened, b.closed, p.refused.total()), (1, 1, 0));
    assert_eq!((p.versus_live.live_refused.circuit_open, p.versus_live.only_live_refused), (2, 2));
}

#[test]
fn a_call_admitted_before_the_trip_that_ends_after_it_is_stale() {
    let c = one("p", json!({ "circuit_breaker": { "consecutive_failures": 2, "open_for": "5s" } }));
    let lines = vec![
        line("p", 0, 1000, 200, json!({})), // ends at 1 s, after the trip
        line("p", 100, 10, 500, json!({})),
        line("p", 200, 10, 500, json!({})), // trips at 210 ms
    ];
    let b = run(&c, &lines).policies[0].breaker.clone().unwrap();
    assert_eq!((b.opened, b.calls.success, b.calls.ignored.get("stale").copied()), (1, 1, Some(1)));
}

#[test]
fn the_bulkhead_peaks_queues_times_out_and_refuses_from_start_times_and_durations() {
    let c = one("s", json!({ "bulkhead": { "max_concurrent": 2, "queue": { "max_size": 1, "timeout": "500ms" } } }));
    let lines = vec![
        line("s", 0, 1000, 200, json!({})),   // holds a permit until 1 s
        line("s", 10, 1000, 200, json!({})),  // and one until 1.01 s
        line("s", 20, 100, 200, json!({})),   // queued; times out at 520 ms
        line("s", 30, 100, 200, json!({})),   // no room in the queue: bulkhead-full
        line("s", 600, 100, 200, json!({})),  // queued; granted at 1 s, ends at 1.1 s
        line("s", 1100, 100, 200, json!({})), // free again
    ];
    let r = run(&c, &lines);
    let p = &r.policies[0];
    let b = p.bulkhead.as_ref().unwrap();
    assert_eq!((b.peak_in_flight, b.peak_queued, b.admitted, b.waited), (2, 1, 4, 1));
    assert_eq!((p.refused.bulkhead_full, p.refused.queue_timeout), (1, 1));
    assert_eq!(b.peak_at.as_ref().unwrap().ns - T0 * SEC, 10 * MS);
}

/// The replay moves an adaptive limit as the plugin does, and the report says where it went:
/// not "of 200" (its max) when it stayed far below.
#[test]
fn an_adaptive_limit_is_reported_as_the_replay_moved_it_not_as_its_max() {
    let c = one(
        "a",
        json!({ "bulkhead": { "adaptive": { "min": 2, "max": 200 }, "queue": { "max_size": 100, "timeout": "10s" } } }),
    );
    // Four at a time for 8 s, 10 ms each: the limit is full and fast, so it climbs.
    let lines: Vec<String> =
        (0..8000u64).step_by(10).flat_map(|t| (0..4).map(move |_| line("a", t, 10, 200, json!({})))).collect();
    let r = run(&c, &lines);
    let b = r.policies[0].bulkhead.clone().unwrap();
    let a = b.adaptive.clone().unwrap();
    assert_eq!((a.min, a.max, b.max_concurrent), (2, 200, 200));
    assert!(a.highest > 2 && a.highest < 200 && a.last <= a.highest, "{a:?}");
    assert!(b.peak_in_flight <= a.limit_at_peak && a.limit_at_peak <= a.highest, "{b:?}");
    let text = text::render(&r);
    let want = format!(
        "peak {} in flight of {} (adaptive limit, 2 to 200: it reached {}, and ended at {})",
        b.peak_in_flight, a.limit_at_peak, a.highest, a.last
    );
    assert!(text.contains(&want), "{text}");
    assert!(svg::render(&r).contains(&format!("adaptive limit 2 to 200, reached {}", a.highest)));
    // A fixed bulkhead has no such part.
    let c = one("s", json!({ "bulkhead": { "max_concurrent": 2 } }));
    assert!(run(&c, &lines[..4]).policies[0].bulkhead.as_ref().unwrap().adaptive.is_none());
}

#[test]
fn time_a_request_spent_before_its_upstream_attempt_is_not_held_again() {
    // Live, the second request waited 400 ms in a queue before going upstream for 100 ms; here,
    // without a bulkhead wait, it ends 100 ms after it started.
    let c = one("p", json!({ "circuit_breaker": { "consecutive_failures": 2 } }));
    let lines = vec![line("p", 0, 10, 500, json!({})), line("p", 100, 500, 500, json!({ "to_upstream_us": 400_000 }))];
    let b = run(&c, &lines).policies.remove(0).breaker.unwrap();
    assert_eq!(at(&b.transitions[0]), 200 * MS);
}

#[test]
fn priority_classes_come_from_the_logged_header() {
    let c = one(
        "s",
        json!({ "bulkhead": { "max_concurrent": 2, "priority": { "header": "x-priority", "default": "standard",
                "classes": { "critical": { "reserved": 1 } } } } }),
    );
    let lines = vec![
        line("s", 0, 1000, 200, json!({ "request_headers": { "x-priority": null } })),
        line("s", 10, 1000, 200, json!({ "request_headers": { "x-priority": "gold" } })), // standard: refused
        line("s", 20, 1000, 200, json!({ "request_headers": { "x-priority": "critical" } })), // its reserve
    ];
    let p = run(&c, &lines).policies.remove(0);
    assert_eq!((p.refused.bulkhead_full, p.bulkhead.unwrap().peak_in_flight), (1, 2));
}

#[test]
fn the_retry_budget_allows_and_denies_the_retries_the_log_shows() {
    // ratio 0, 1 retry per second over 1 s: one retry at a time in the budget.
    let c =
        one("r", json!({ "retry": { "max_retries": 2, "budget": { "ratio": 0, "min_per_second": 1, "ttl": "1s" } } }));
    let lines = vec![
        line("r", 0, 10, 200, json!({ "attempts": 3 })), // reserved 1 of 2: one retry denied, rescued live
        line("r", 100, 10, 503, json!({ "attempts": 3 })), // none left: both denied
        line("r", 1500, 10, 200, json!({ "attempts": 1 })), // a new second: 1 reserved, unused
    ];
    let r = run(&c, &lines).policies.remove(0).retry.unwrap();
    assert_eq!((r.requests, r.retries_in_log, r.retries_allowed, r.retries_denied), (3, 4, 1, 3));
    assert_eq!((r.requests_denied, r.requests_capped, r.rescued_by_denied), (1, 2, 1));
}

#[test]
fn dry_run_counts_what_it_would_refuse_and_refuses_nothing() {
    let c = one("p", json!({ "mode": "dry_run", "circuit_breaker": { "consecutive_failures": 2, "open_for": "10s" } }));
    let lines: Vec<String> = (0..6).map(|i| line("p", i * 100, 10, 500, json!({}))).collect();
    let p = run(&c, &lines).policies.remove(0);
    let b = p.breaker.unwrap();
    // Trips at 110 ms; the four after it would be refused, and their outcomes stay out.
    assert_eq!((b.opened, p.refused.circuit_open, b.calls.failure), (1, 4, 2));
}

#[test]
fn lines_are_routed_by_the_rules_sorted_by_start_and_bad_ones_counted() {
    let c = config(json!({
        "policies": { "a": { "circuit_breaker": { "consecutive_failures": 2 } }, "b": {} },
        "routes": [
            { "match": { "path_prefix": "/api/", "methods": ["POST"] }, "policy": "a" },
            { "match": { "host": "*.example.com", "headers": { "x-tenant": "gold" } }, "policy": "b" }
        ]
    }));
    let post = json!({ "method": "POST", "path": "/api/orders" });
    let lines = vec![
        line("x", 300, 10, 500, post.clone()), // written first, started last
        "not json".to_string(),
        line("x", 100, 10, 500, post.clone()),
        r#"{"start_time":"yesterday","duration_ms":1}"#.to_string(),
        line("x", 200, 10, 200, json!({ "request_headers": { "x-tenant": "gold" } })),
        line("x", 250, 10, 200, json!({})), // no rule
        String::new(),
    ];
    let r = run(&c, &lines);
    assert_eq!((r.lines, r.malformed, r.unmatched, r.requests), (6, 2, 1, 3));
    assert_eq!((r.malformed_shown[0].line, r.malformed_shown[1].line), (2, 4));
    assert!(r.malformed_shown[1].error.starts_with("start_time: expected seconds"), "{:?}", r.malformed_shown);
    assert_eq!((r.policies[0].requests, r.policies[1].requests), (2, 1));
    // Sorted: the 500 at 100 ms, then the one at 300 ms: the 2nd failure trips at 310 ms.
    assert_eq!(at(&r.policies[0].breaker.as_ref().unwrap().transitions[0]), 310 * MS);
    assert_eq!(r.from.as_ref().unwrap().at, "2023-11-14T22:13:20.100000Z");
}

#[test]
fn outcomes_are_judged_as_the_plugin_judges_them() {
    let c = one(
        "p",
        json!({ "circuit_breaker": { "consecutive_failures": 100, "slow_call": { "duration": "500ms", "threshold": 100, "minimum_requests": 100 } } }),
    );
    let local = json!({ "upstream_service_time": null, "code_details": "" });
    let lines = vec![
        line("p", 0, 10, 404, json!({})), // success
        line("p", 10, 10, 200, json!({ "content_type": "application/grpc", "grpc_status_trailer": "14" })), // failure
        line("p", 20, 10, 200, json!({ "grpc_status_trailer": "14" })), // not gRPC: success
        line(
            "p",
            30,
            10,
            503,
            json!({ "upstream_service_time": null, "response_flags": "URX,UC", "code_details": "upstream_reset_before_response_started{connection_termination}" }),
        ), // failure
        line("p", 40, 300, 0, json!({ "upstream_service_time": null, "response_flags": "DC" })), // client_closed
        line(
            "p",
            50,
            10,
            429,
            json!({ "response_flags": "RL" })
                .as_object()
                .map(|o| {
                    let mut m = local.as_object().unwrap().clone();
                    m.extend(o.clone());
                    serde_json::Value::Object(m)
                })
                .unwrap(),
        ), // rate_limited
        line("p", 60, 10, 403, local),    // local_reply
        line("p", 70, 900, 200, json!({ "upstream_service_time": "700" })), // slow success
    ];
    let b = run(&c, &lines).policies.remove(0).breaker.unwrap();
    assert_eq!((b.calls.success, b.calls.failure, b.calls.slow), (3, 2, 1));
    let ignored: Vec<(&str, u64)> = b.calls.ignored.iter().map(|(k, v)| (*k, *v)).collect();
    assert_eq!(ignored, [("client_closed", 1), ("local_reply", 1), ("rate_limited", 1)]);
}

#[test]
fn the_warnings_name_what_the_log_lacks() {
    let c = one(
        "s",
        json!({ "bulkhead": { "max_concurrent": 2, "priority": { "header": "x-priority", "default": "standard", "classes": { "critical": {} } } },
                "retry": { "max_retries": 1 } }),
    );
    let r = run(&c, &[r#"{"start_time":"1.0","duration_ms":1,"route_name":"s"}"#.to_string()]);
    assert_eq!(r.requests, 1);
    assert!(r.warnings.iter().any(|w| w.starts_with("no line has `request_headers.x-priority`")), "{:?}", r.warnings);
    assert!(r.warnings.iter().any(|w| w.starts_with("no line has `attempts`")), "{:?}", r.warnings);
    assert!(r.warnings.iter().any(|w| w.starts_with("no line has `breakwater`")), "{:?}", r.warnings);
    let full = run(&c, &[line("s", 0, 1, 200, json!({ "request_headers": { "x-priority": "critical" } }))]);
    assert_eq!(full.warnings, Vec::<String>::new());
}

#[test]
fn a_breaker_the_configuration_forces_refuses_every_call_or_judges_none() {
    let lines: Vec<String> = (0..8).map(|i| line("p", i * 100, 20, 500, json!({}))).collect();
    let open = run(&one("p", json!({ "circuit_breaker": { "consecutive_failures": 2, "force": "open" } })), &lines);
    let p = &open.policies[0];
    assert_eq!(p.refused.circuit_open, 8, "forced open: all 8 refused");
    assert_eq!(p.breaker.as_ref().unwrap().opened, 0, "and no transition: it never ran");
    let closed = run(&one("p", json!({ "circuit_breaker": { "consecutive_failures": 2, "force": "closed" } })), &lines);
    let p = &closed.policies[0];
    let b = p.breaker.as_ref().unwrap();
    assert_eq!(
        (p.refused.circuit_open, b.opened, b.calls.failure),
        (0, 0, 0),
        "forced closed: all through, none judged"
    );
}
