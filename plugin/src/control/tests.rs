//! The control endpoint against fake workers: what an operator sees and does.

use super::*;
use crate::fake::Worker;
use crate::filter::Action;
use breakwater_policies::SECOND;
use serde_json::Value;

const CONFIG: &str = r#"{
  "policies": {
    "checkout": { "circuit_breaker": { "consecutive_failures": 3, "open_for": "10s" } },
    "search": { "bulkhead": { "max_concurrent": 2, "queue": { "max_size": 5 } } },
    "held": { "circuit_breaker": { "force": "open" } }
  },
  "routes": [
    { "match": { "route_name": "checkout" }, "policy": "checkout" },
    { "match": { "route_name": "search" }, "policy": "search" },
    { "match": { "route_name": "held" }, "policy": "held" }
  ]
}"#;

fn control(writes: bool) -> Control {
    let text = format!(r#"{{ "control": {{ "writes": {writes} }} }}"#);
    crate::config::parse(text.as_bytes()).unwrap().control.unwrap()
}

/// A request to the endpoint on worker `w`'s VM, from loopback to loopback.
fn ask(w: &Worker, a: &Control, method: &str, path: &str) -> Option<(u32, Value)> {
    ask_at(w, a, method, path, "127.0.0.1:9902")
}

fn ask_at(w: &Worker, a: &Control, method: &str, path: &str, local: &str) -> Option<(u32, Value)> {
    w.host.new_stream();
    w.host.set_header(":method", method);
    w.host.set_header(":path", path);
    w.host.set_prop("destination.address", local.as_bytes());
    w.host.set_prop("source.address", b"127.0.0.1:40000");
    let r = handle(a, &w.host, &w.vm)?;
    let body: Value = serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", r.body));
    Some((r.status, body))
}

fn state(w: &Worker, a: &Control, policy: &str) -> String {
    let (code, body) = ask(w, a, "GET", &format!("/breakwater/status/{policy}")).unwrap();
    assert_eq!(code, 200, "{body}");
    body["policies"][policy]["circuit_breaker"]["state"].as_str().unwrap().to_string()
}

fn call(w: &Worker, route: &str, status: u16) -> Action {
    let (action, stream) = w.send(route, 1);
    if action == Action::Continue {
        w.end(1, stream, status);
    }
    action
}

#[test]
fn status_shows_every_policy_with_what_it_has() {
    let w = Worker::first(CONFIG);
    let a = control(false);
    let (code, body) = ask(&w, &a, "GET", "/breakwater/status").unwrap();
    assert_eq!(code, 200);
    let p = &body["policies"];
    assert_eq!(p["checkout"]["circuit_breaker"]["state"], "closed");
    assert_eq!(p["checkout"]["circuit_breaker"]["forced"], Value::Null);
    assert!(p["checkout"].get("bulkhead").is_none(), "no bulkhead section for a policy without one");
    assert_eq!(p["search"]["bulkhead"]["limit"], 2);
    assert_eq!(p["search"]["bulkhead"]["active"], 0);
    assert!(p["search"].get("circuit_breaker").is_none());
    assert_eq!(p["held"]["circuit_breaker"]["state"], "forced_open");
    assert_eq!(p["held"]["circuit_breaker"]["forced_by"], "configuration");
}

#[test]
fn the_third_failure_shows_as_open_with_its_remaining_time() {
    let w = Worker::first(CONFIG);
    let a = control(false);
    w.at(SECOND);
    call(&w, "checkout", 503);
    call(&w, "checkout", 503);
    let (_, body) = ask(&w, &a, "GET", "/breakwater/status/checkout").unwrap();
    assert_eq!(body["policies"]["checkout"]["circuit_breaker"]["consecutive_failures"], 2);
    call(&w, "checkout", 503);
    w.at(3 * SECOND);
    let (_, body) = ask(&w, &a, "GET", "/breakwater/status/checkout").unwrap();
    let cb = &body["policies"]["checkout"]["circuit_breaker"];
    assert_eq!(cb["state"], "open");
    assert_eq!(cb["open_remaining_ms"], 8000, "opened at 1s for 10s, asked at 3s: {cb}");
    assert_eq!(cb["open_period_ms"], 10_000);
}

#[test]
fn force_open_holds_every_worker_until_released() {
    let w1 = Worker::first(CONFIG);
    let w2 = Worker::second(&w1, CONFIG);
    let a = control(true);
    // Worker 2 has a view of the breaker: the command must reach it.
    assert_eq!(call(&w2, "checkout", 200), Action::Continue);
    let (code, body) = ask(&w1, &a, "POST", "/breakwater/policies/checkout/force_open").unwrap();
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["changed"][0]["before"], "closed");
    assert_eq!(body["changed"][0]["after"], "forced_open");
    w2.wake(); // the broadcast arrives
    assert_eq!(call(&w2, "checkout", 200), Action::Stop, "worker 2 refuses");
    assert_eq!(w2.host.last_reply().unwrap().status, 503);
    // Much later, still open: a forced breaker has no open period.
    w1.at(3600 * SECOND);
    w2.at(3600 * SECOND);
    w1.tick();
    w2.tick();
    assert_eq!(call(&w1, "checkout", 200), Action::Stop);
    assert_eq!(state(&w2, &a, "checkout"), "forced_open");
    assert_eq!(w1.stat("circuit_state.policy.checkout.state.forced_open"), 1);
    let (code, body) = ask(&w2, &a, "POST", "/breakwater/policies/checkout/release").unwrap();
    assert_eq!((code, &body["changed"][0]["after"]), (200, &Value::from("closed")));
    w1.wake();
    assert_eq!(call(&w1, "checkout", 200), Action::Continue, "released: worker 1 lets it through");
    assert_eq!(w1.stat("circuit_state.policy.checkout.state.closed"), 1);
}

#[test]
fn force_closed_lets_failures_through_and_records_none() {
    let w = Worker::first(CONFIG);
    let a = control(true);
    assert_eq!(ask(&w, &a, "POST", "/breakwater/policies/checkout/force_closed").unwrap().0, 200);
    for _ in 0..10 {
        assert_eq!(call(&w, "checkout", 503), Action::Continue);
    }
    let (_, body) = ask(&w, &a, "GET", "/breakwater/status/checkout").unwrap();
    let cb = &body["policies"]["checkout"]["circuit_breaker"];
    assert_eq!((cb["state"].as_str(), cb["consecutive_failures"].as_u64()), (Some("forced_closed"), Some(0)));
}

#[test]
fn a_forced_state_survives_a_configuration_reload() {
    let mut w = Worker::first(CONFIG);
    let a = control(true);
    ask(&w, &a, "POST", "/breakwater/policies/checkout/force_open").unwrap();
    w.reconfigure(CONFIG);
    assert_eq!(call(&w, "checkout", 200), Action::Stop);
    assert_eq!(state(&w, &a, "checkout"), "forced_open");
}

#[test]
fn reset_closes_and_clears_the_counts() {
    let w = Worker::first(CONFIG);
    let a = control(true);
    for _ in 0..3 {
        call(&w, "checkout", 503);
    }
    assert_eq!(state(&w, &a, "checkout"), "open");
    let (code, body) = ask(&w, &a, "POST", "/breakwater/policies/checkout/reset").unwrap();
    assert_eq!((code, body["changed"][0]["before"].as_str()), (200, Some("open")));
    assert_eq!(state(&w, &a, "checkout"), "closed");
    assert_eq!(call(&w, "checkout", 503), Action::Continue);
    call(&w, "checkout", 503);
    assert_eq!(state(&w, &a, "checkout"), "closed", "two failures after the reset: not three");
}

#[test]
fn writes_are_refused_unless_switched_on() {
    let w = Worker::first(CONFIG);
    let (code, body) = ask(&w, &control(false), "POST", "/breakwater/policies/checkout/force_open").unwrap();
    assert_eq!(code, 403, "{body}");
    assert!(body["error"].as_str().unwrap().contains("control.writes"));
    assert_eq!(state(&w, &control(false), "checkout"), "closed");
}

#[test]
fn a_breaker_forced_by_its_configuration_is_not_steered_here() {
    let w = Worker::first(CONFIG);
    let a = control(true);
    let (code, body) = ask(&w, &a, "POST", "/breakwater/policies/held/release").unwrap();
    assert_eq!(code, 409, "{body}");
    assert_eq!(call(&w, "held", 200), Action::Stop, "forced open by the configuration");
    assert_eq!(w.stat("circuit_state.policy.held.state.forced_open"), 1);
    let (code, _) = ask(&w, &a, "POST", "/breakwater/policies/search/force_open").unwrap();
    assert_eq!(code, 409, "search has no breaker");
}

#[test]
fn the_endpoint_answers_only_its_paths_on_loopback() {
    let w = Worker::first(CONFIG);
    let a = control(true);
    assert_eq!(ask(&w, &a, "GET", "/checkout"), None, "not ours: passes through");
    assert_eq!(ask(&w, &a, "GET", "/breakwaterish/status"), None);
    assert_eq!(ask(&w, &a, "GET", "/breakwater/status?pretty").unwrap().0, 200);
    assert_eq!(ask(&w, &a, "GET", "/breakwater/status/nope").unwrap().0, 404);
    assert_eq!(ask(&w, &a, "GET", "/breakwater").unwrap().0, 404);
    assert_eq!(ask(&w, &a, "POST", "/breakwater/policies/nope/reset").unwrap().0, 404);
    assert_eq!(ask(&w, &a, "POST", "/breakwater/policies/checkout/explode").unwrap().0, 404);
    assert_eq!(ask(&w, &a, "GET", "/breakwater/policies/checkout/reset").unwrap().0, 405);
    assert_eq!(ask(&w, &a, "POST", "/breakwater/status").unwrap().0, 405);
    let (code, _) = ask_at(&w, &a, "GET", "/breakwater/status", "10.0.0.7:15006").unwrap();
    assert_eq!(code, 403);
    let (code, _) = ask_at(&w, &a, "POST", "/breakwater/policies/checkout/force_open", "").unwrap();
    assert_eq!(code, 403, "no address known: refused");
    assert_eq!(state(&w, &a, "checkout"), "closed");
    assert_eq!(ask_at(&w, &a, "GET", "/breakwater/status", "[::1]:9902").unwrap().0, 200);
}

#[test]
fn odd_bytes_in_the_path_are_answered_not_trapped() {
    let w = Worker::first(CONFIG);
    let a = control(true);
    for path in ["/breakwater/status/\u{7f}\"\\", "/breakwater//status//", "/breakwater/policies/\"/reset"] {
        let (code, body) = ask(&w, &a, "GET", path).unwrap();
        assert!(code == 200 || code == 404 || code == 405, "{path}: {code} {body}");
    }
    w.host.new_stream();
    w.host.set_header(":path", [b'/', b'b', 0xff]);
    assert_eq!(handle(&a, &w.host, &w.vm), None);
    w.host.set_header(":path", b"/breakwater/status/\xff\xfe");
    w.host.set_header(":method", "GET");
    w.host.set_prop("destination.address", b"127.0.0.1:1");
    let r = handle(&a, &w.host, &w.vm).unwrap();
    assert_eq!(r.status, 404, "{}", r.body);
}

#[test]
fn json_strings_are_escaped() {
    let mut out = String::new();
    escape(&mut out, "a\"b\\c\nd\u{1}");
    assert_eq!(out, r#""a\"b\\c\nd\u0001""#.replace("\\n", "\\u000a"));
    assert_eq!(serde_json::from_str::<String>(&out).unwrap(), "a\"b\\c\nd\u{1}");
    assert_eq!(percent(1, 3), "33.3");
    assert_eq!(percent(0, 0), "0.0");
}

/// The bulkhead's `limit` is the one admission uses: for an adaptive bulkhead the live limit
/// (as the gauge shows it), with its `min` and `max`; `leased` counts every permit in workers'
/// leases, in use or idle.
#[test]
fn status_shows_the_live_adaptive_limit_and_the_leased_permits() {
    let w = Worker::first(
        r#"{"policies": {"api": {"bulkhead": {"adaptive": {"min": 4, "max": 200}}}},
            "routes": [{"match": {"route_name": "api"}, "policy": "api"}]}"#,
    );
    let a = control(false);
    let bulkhead =
        |w: &Worker| ask(w, &a, "GET", "/breakwater/status/api").unwrap().1["policies"]["api"]["bulkhead"].clone();
    let b = bulkhead(&w);
    assert_eq!(
        (&b["limit"], &b["min"], &b["max"]),
        (&Value::from(4), &Value::from(4), &Value::from(200)),
        "starts at min, not max: {b}"
    );
    // Fast answers with the bulkhead full: the limit climbs (judged once a second).
    let mut t = 0;
    for _ in 0..24 {
        let streams: alloc::vec::Vec<_> = (0..4).map(|i| (10 + i, w.send("api", 10 + i).1)).collect();
        for (ticket, mut s) in streams {
            w.respond(&mut s, 200, 10, &[]);
            w.log(ticket, s);
        }
        t += 250 * breakwater_policies::MS;
        w.at(t).tick();
        w.wake();
    }
    let b = bulkhead(&w);
    let live = w.stat("bulkhead_limit.policy.api");
    assert!(live > 4 && live < 200, "{live}");
    assert_eq!(b["limit"], live, "the live limit, as the gauge shows it: {b}");
    // One request in flight and its worker's lease: leased counts the whole lease, in use or not.
    let (_, s) = w.send("api", 1);
    let b = bulkhead(&w);
    let (active, leased) = (b["active"].as_u64().unwrap(), b["leased"].as_u64().unwrap());
    assert!(leased >= 1 && leased <= active, "{b}");
    assert!(b.get("leased_idle").is_none(), "{b}");
    w.end(1, s, 200);
    assert_eq!(bulkhead(&w)["leased"], leased, "still leased, now idle: {b}");
}

#[test]
fn a_fixed_bulkhead_shows_max_concurrent_and_no_bounds() {
    let w = Worker::first(CONFIG);
    let a = control(false);
    let (_, body) = ask(&w, &a, "GET", "/breakwater/status/search").unwrap();
    let b = &body["policies"]["search"]["bulkhead"];
    assert_eq!((&b["limit"], b.get("min"), b.get("max")), (&Value::from(2), None, None), "{b}");
}
