//! Fallbacks against fake workers: what a refused request gets, what the cache stores and
//! serves, and what the healthy path pays for it.

use super::*;
use crate::fake::{FakeHost, Worker};
use crate::filter::{on_response_headers as filter_response_headers, Action, Stream};
use alloc::format;
use alloc::string::ToString;
use breakwater_policies::{MS, SECOND};

/// A per-route instance of policy `p` with a breaker that trips on one failure and opens for an
/// hour, and `fallback`.
fn worker(fallback: &str) -> Worker {
    Worker::first(&format!(
        r#"{{"policies": {{"p": {{"circuit_breaker": {{"consecutive_failures": 1, "open_for": "1h"}}, "fallback": {fallback}}}}}, "policy": "p"}}"#
    ))
}

const STATIC: &str = r#"{"static": {"status": 200, "headers": {"content-type": "application/json"}, "body": "{\"items\":[],\"degraded\":true}"}}"#;
const CACHE: &str = r#"{"cache": {"max_entries": 16, "max_body": "1KiB", "ttl": "5m"}}"#;
const CACHE_THEN_STATIC: &str = r#"{"cache": {"max_entries": 16, "max_body": 1024}, "static": {"body": "degraded"}}"#;

/// A request as the filter left it: its action, its stream, and whether its answer may be cached.
type Sent = (Action, Stream, Option<Pending>);

/// Request headers of a `method` of `path` on stream `ticket`.
fn request(w: &Worker, ticket: u32, method: &str, path: &str, extra: &[(&str, &str)]) -> Sent {
    let mut h = alloc::vec![(":method", method), (":path", path), (":authority", "shop.example.com")];
    h.extend_from_slice(extra);
    let (a, s) = w.send_with("p", ticket, &h);
    (a, s, on_request_headers(&w.c, &w.host, &w.vm, &s))
}

/// The upstream answers `status` with `headers` and `body` (one chunk), and the stream ends.
fn upstream(w: &Worker, ticket: u32, sent: Sent, status: u16, headers: &[(&str, &str)], body: &str) {
    let (_, mut s, pending) = sent;
    w.host.response_headers.borrow_mut().clear();
    w.host.set_response_header(":status", status.to_string());
    w.host.set_response_header("x-envoy-upstream-service-time", "3");
    w.host.set_response_header("date", "Mon, 01 Dec 2026 00:00:00 GMT");
    for (k, v) in headers {
        w.host.set_response_header(k, v);
    }
    let read = filter_response_headers(&w.c, &w.host, &mut s);
    let mut capture = on_response_headers(&w.c, &w.host, &w.vm, ticket, &s, read.as_deref(), body.is_empty(), pending);
    if !body.is_empty() {
        *w.host.body_chunk.borrow_mut() = body.as_bytes().to_vec();
        on_response_body(&w.host, &mut capture, body.len(), true);
    }
    w.host.set_prop_u64("response.flags", 0);
    w.log(ticket, s);
}

fn get_ok(w: &Worker, path: &str, headers: &[(&str, &str)], body: &str) {
    let sent = request(w, 1, "GET", path, &[]);
    assert_eq!(sent.0, Action::Continue);
    upstream(w, 1, sent, 200, headers, body);
}

/// One failure trips the breaker.
fn trip(w: &Worker) {
    let sent = request(w, 2, "GET", "/boom", &[]);
    upstream(w, 2, sent, 503, &[], "");
    assert_eq!(w.stat("transitions_total.policy.p.to_state.open"), 1);
}

/// A request refused by the open breaker: the reply it got.
fn refused(w: &Worker, method: &str, path: &str, extra: &[(&str, &str)]) -> crate::fake::Reply {
    w.host.replies.borrow_mut().clear();
    let (a, s, _) = request(w, 3, method, path, extra);
    assert_eq!((a, s), (Action::Stop, Stream::Untracked));
    w.host.last_reply().expect("a reply")
}

fn fallback_stat(w: &Worker, kind: &str, result: &str) -> i64 {
    w.stat(&format!("fallback_total.policy.p.kind.{kind}.result.{result}"))
}

#[test]
fn an_open_breaker_serves_the_static_answer_instead_of_the_reject_reply() {
    let w = worker(STATIC);
    trip(&w);
    let r = refused(&w, "GET", "/items", &[]);
    assert_eq!((r.status, r.body.as_str()), (200, r#"{"items":[],"degraded":true}"#));
    assert_eq!(r.header("x-breakwater"), Some("fallback-static"));
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("retry-after"), None);
    assert_eq!(fallback_stat(&w, "static", "served"), 1);
    assert_eq!(w.stat("rejections_total.policy.p.reason.circuit_open"), 1, "still a refusal");
    assert!(!w.host.has_metric("fallback_total.policy.p.kind.cache.result.served"), "only the configured kinds");
}

#[test]
fn the_last_good_response_is_served_while_the_breaker_is_open_with_its_age() {
    let w = worker(CACHE);
    w.at(SECOND);
    get_ok(&w, "/items?page=2", &[("content-type", "application/json"), ("etag", "\"v1\"")], "[1,2,3]");
    trip(&w);
    w.at(4 * SECOND + 500 * MS);
    let r = refused(&w, "GET", "/items?page=2", &[]);
    assert_eq!((r.status, r.body.as_str()), (200, "[1,2,3]"));
    assert_eq!(r.header("x-breakwater"), Some("fallback-cache"));
    assert_eq!(r.header("age"), Some("3"), "whole seconds since it was stored");
    assert_eq!((r.header("content-type"), r.header("etag")), (Some("application/json"), Some("\"v1\"")));
    for gone in ["date", "x-envoy-upstream-service-time", ":status"] {
        assert_eq!(r.header(gone), None, "{gone} is not replayed");
    }
    // HEAD shares GET's entry; another query, path or host is another key: a miss, then the reject reply.
    assert_eq!(refused(&w, "HEAD", "/items?page=2", &[]).header("x-breakwater"), Some("fallback-cache"));
    for (method, path, host) in [
        ("GET", "/items?page=3", "shop.example.com"),
        ("GET", "/other", "shop.example.com"),
        ("POST", "/items?page=2", "shop.example.com"),
    ] {
        w.host.replies.borrow_mut().clear();
        let (a, _) = w.send_with("p", 3, &[(":method", method), (":path", path), (":authority", host)]);
        assert_eq!(a, Action::Stop);
        let r = w.host.last_reply().unwrap();
        assert_eq!((r.status, r.header("x-breakwater")), (503, Some("circuit-open")), "{method} {path}");
    }
    assert_eq!((fallback_stat(&w, "cache", "served"), fallback_stat(&w, "cache", "missed")), (2, 3));
}

#[test]
fn the_age_served_is_the_upstreams_age_plus_the_time_since_it_was_stored() {
    let w = worker(CACHE);
    w.at(SECOND);
    for (path, age) in [("/aged", "100"), ("/bad", "-5"), ("/fraction", "1.5"), ("/huge", "99999999999999999999999")] {
        get_ok(&w, path, &[("age", age)], "x");
    }
    trip(&w);
    w.at(4 * SECOND);
    for (path, want) in [("/aged", "103"), ("/bad", "3"), ("/fraction", "3"), ("/huge", "2147483648")] {
        let r = refused(&w, "GET", path, &[]);
        assert_eq!(r.header("x-breakwater"), Some("fallback-cache"), "{path}");
        let ages: alloc::vec::Vec<_> = r.headers.iter().filter(|(k, _)| k == "age").collect();
        assert_eq!(ages.len(), 1, "{path}: one age: {ages:?}");
        assert_eq!(r.header("age"), Some(want), "{path}");
    }
}

/// Envoy's local reply of the last cached answer passes the filter: its content-type as the
/// client gets it, from Envoy's `envoy_set` (what `Utility::encodeLocalReply` made of it).
fn content_type_after_envoy(w: &Worker, envoy_set: Option<&str>) -> Option<alloc::string::String> {
    w.host.response_headers.borrow_mut().clear();
    w.host.set_response_header(":status", "200");
    if let Some(ct) = envoy_set {
        w.host.set_response_header("content-type", ct);
    }
    let mut s = Stream::Untracked;
    let read = filter_response_headers(&w.c, &w.host, &mut s);
    assert!(on_response_headers(&w.c, &w.host, &w.vm, 3, &s, read.as_deref(), false, None).is_none());
    let ct = w.host.response_header("content-type");
    w.log(3, s);
    ct.map(|v| alloc::string::String::from_utf8(v).unwrap())
}

#[test]
fn a_cached_answer_keeps_its_content_type_through_envoys_local_reply() {
    let w = worker(CACHE);
    get_ok(&w, "/none", &[], "plain bytes");
    get_ok(&w, "/empty", &[("content-type", "application/json")], "");
    get_ok(&w, "/json", &[("content-type", "application/json")], "[]");
    trip(&w);
    refused(&w, "GET", "/none", &[]);
    assert_eq!(content_type_after_envoy(&w, Some("text/plain")), None, "Envoy's text/plain removed");
    refused(&w, "GET", "/empty", &[]);
    assert_eq!(content_type_after_envoy(&w, None).as_deref(), Some("application/json"), "set back");
    refused(&w, "GET", "/json", &[]);
    w.host.take_calls();
    assert_eq!(content_type_after_envoy(&w, Some("application/json")).as_deref(), Some("application/json"));
    let calls = w.host.take_calls();
    assert!(!calls.contains_key("set_response_header") && !calls.contains_key("remove_header"), "{calls:?}");
    // A stream that ends first forgets it: the next stream on that context id is left alone.
    refused(&w, "GET", "/none", &[]);
    w.log(3, Stream::Untracked);
    assert_eq!(content_type_after_envoy(&w, Some("text/plain")).as_deref(), Some("text/plain"));
}

#[test]
fn an_entry_older_than_ttl_is_a_miss_and_a_miss_falls_back_to_static() {
    let w = worker(r#"{"cache": {"ttl": "60s"}, "static": {"status": 203, "body": "degraded"}}"#);
    w.at(0);
    get_ok(&w, "/items", &[], "fresh");
    trip(&w);
    w.at(60 * SECOND);
    assert_eq!(refused(&w, "GET", "/items", &[]).header("x-breakwater"), Some("fallback-cache"));
    w.at(61 * SECOND);
    let r = refused(&w, "GET", "/items", &[]);
    assert_eq!((r.status, r.body.as_str(), r.header("x-breakwater")), (203, "degraded", Some("fallback-static")));
    assert_eq!((fallback_stat(&w, "cache", "missed"), fallback_stat(&w, "static", "served")), (1, 1));
}

#[test]
fn what_must_not_be_stored_is_never_served() {
    let w = worker(CACHE_THEN_STATIC);
    type Headers<'a> = &'a [(&'a str, &'a str)];
    let never: [(&str, Headers, Headers); 8] = [
        ("/no-store", &[("cache-control", "max-age=60, No-Store")], &[]),
        ("/private", &[("cache-control", "private=\"x-user\"")], &[]),
        ("/cookie", &[("set-cookie", "session=1")], &[]),
        ("/vary", &[("vary", "Accept-Encoding")], &[]),
        ("/vary-star", &[("vary", "*")], &[]),
        ("/big", &[("content-length", "4096")], &[]),
        ("/authorized", &[], &[("authorization", "Bearer x")]),
        ("/asked-not-to", &[], &[("cache-control", "no-store")]),
    ];
    for (path, response, request_headers) in never {
        let sent = request(&w, 1, "GET", path, request_headers);
        upstream(&w, 1, sent, 200, response, "body");
    }
    // Nor another filter's reply (no upstream service time), a 206, a gRPC answer, or a 5xx (the
    // one failure that trips the breaker).
    let (_, mut s, pending) = request(&w, 1, "GET", "/local", &[]);
    assert!(pending.is_some());
    w.host.response_headers.borrow_mut().clear();
    w.host.set_response_header(":status", "200");
    let read = filter_response_headers(&w.c, &w.host, &mut s);
    assert!(on_response_headers(&w.c, &w.host, &w.vm, 1, &s, read.as_deref(), true, pending).is_none());
    for (path, status, headers) in
        [("/partial", 206, &[][..]), ("/grpc", 200, &[("content-type", "application/grpc")]), ("/error", 500, &[])]
    {
        let sent = request(&w, 1, "GET", path, &[]);
        upstream(&w, 1, sent, status, headers, "body");
    }
    trip(&w);
    for path in [
        "/no-store",
        "/private",
        "/cookie",
        "/vary",
        "/vary-star",
        "/big",
        "/authorized",
        "/asked-not-to",
        "/error",
        "/partial",
        "/grpc",
        "/local",
    ] {
        assert_eq!(refused(&w, "GET", path, &[]).header("x-breakwater"), Some("fallback-static"), "{path}");
    }
}

#[test]
fn a_body_that_outgrows_max_body_is_not_stored_and_vary_on_a_key_header_is() {
    let w = worker(r#"{"cache": {"max_body": 8, "key_headers": ["accept-encoding"]}}"#);
    get_ok(&w, "/chunked", &[], "0123456789"); // no content-length: too long as it streams
    let sent = request(&w, 1, "GET", "/gz", &[("accept-encoding", "gzip")]);
    upstream(&w, 1, sent, 200, &[("vary", "accept-encoding"), ("content-encoding", "gzip")], "gz");
    trip(&w);
    assert_eq!(refused(&w, "GET", "/chunked", &[]).status, 503);
    assert_eq!(refused(&w, "GET", "/gz", &[("accept-encoding", "identity")]).status, 503, "another encoding");
    let r = refused(&w, "GET", "/gz", &[("accept-encoding", "gzip")]);
    assert_eq!((r.body.as_str(), r.header("content-encoding")), ("gz", Some("gzip")));
}

#[test]
fn ten_thousand_distinct_keys_fill_at_most_max_entries_slots() {
    let w = worker(CACHE);
    for i in 0..10_000u32 {
        w.at(u64::from(i) * MS);
        get_ok(&w, &format!("/items/{i}"), &[], "0123456789");
    }
    let shared = w.host.process_shared_keys();
    let slots: alloc::vec::Vec<_> = shared.iter().filter(|k| k.contains("/cache/p/")).collect();
    assert!(slots.len() <= 16, "{} slots", slots.len());
    assert!(slots.len() >= 12, "10 000 keys spread over the slots: {}", slots.len());
    // Each slot holds the last key stored in it; a key that was replaced is a miss.
    trip(&w);
    let hits = (9_900..10_000)
        .filter(|i| refused(&w, "GET", &format!("/items/{i}"), &[]).header("x-breakwater") == Some("fallback-cache"))
        .count();
    assert!((1..=16).contains(&hits), "{hits} hits");
}

#[test]
fn a_slot_holding_another_key_or_garbage_is_a_miss() {
    let w = worker(CACHE);
    get_ok(&w, "/a", &[], "a");
    trip(&w);
    let slots: alloc::vec::Vec<_> =
        w.host.process_shared_keys().into_iter().filter(|k| k.contains("/cache/p/")).collect();
    assert_eq!(slots.len(), 1);
    let (bytes, _) = w.host.shared_get(&slots[0]).unwrap();
    let e = Entry::decode(&bytes).unwrap();
    let other = Entry { key: b"another key", ..e };
    w.host.shared_set(&slots[0], &other.encode(), 0).unwrap();
    assert_eq!(refused(&w, "GET", "/a", &[]).status, 503);
    for cut in 0..bytes.len() {
        assert!(Entry::decode(&bytes[..cut]).is_none(), "cut at {cut}");
        w.host.shared_set(&slots[0], &bytes[..cut], 0).unwrap();
        assert_eq!(refused(&w, "GET", "/a", &[]).status, 503);
    }
    w.host.shared_set(&slots[0], &bytes, 0).unwrap();
    assert_eq!(refused(&w, "GET", "/a", &[]).status, 200, "the whole entry again");
}

#[test]
fn an_open_breaker_sends_the_request_to_the_fallback_cluster_and_its_answer_is_marked() {
    let w = worker(r#"{"cluster": "payments-backup", "static": {"body": "unused"}}"#);
    trip(&w);
    let (a, mut s, pending) = request(&w, 7, "POST", "/pay", &[]);
    assert_eq!((a, s, pending.is_none()), (Action::Continue, Stream::Untracked, true), "it goes on, to the router");
    assert_eq!(w.host.filter_state.borrow().get(FILTER_STATE).map(|v| v.as_slice()), Some(&b"payments-backup"[..]));
    assert_eq!(w.host.route_cleared.get(), 1);
    assert!(w.host.replies.borrow().is_empty());
    // The backup answers (even with a 500): marked, and the breaker hears nothing of it.
    w.host.response_headers.borrow_mut().clear();
    w.host.set_response_header(":status", "500");
    w.host.set_prop("xds.cluster_name", b"payments-backup");
    let read = filter_response_headers(&w.c, &w.host, &mut s);
    assert!(on_response_headers(&w.c, &w.host, &w.vm, 7, &s, read.as_deref(), true, None).is_none());
    assert_eq!(w.host.response_header("x-breakwater").as_deref(), Some(&b"fallback-cluster"[..]));
    w.log(7, s);
    assert_eq!(w.stat("requests_total.policy.p.outcome.failure"), 1, "only the trip");
    assert_eq!(fallback_stat(&w, "cluster", "served"), 1);
    // Once the stream ended, its context id is no longer marked (a probe, an hour later).
    let (_, s) = w.at(3600 * SECOND).send_with("p", 7, &[(":method", "GET"), (":path", "/probe")]);
    w.host.response_headers.borrow_mut().clear();
    w.host.set_response_header(":status", "200");
    on_response_headers(&w.c, &w.host, &w.vm, 7, &s, None, true, None);
    assert_eq!(w.host.response_header("x-breakwater"), None);
}

#[test]
fn a_cache_hit_comes_before_the_cluster_and_a_grpc_request_gets_only_the_cluster_or_the_reject_reply() {
    let w = worker(r#"{"cache": {}, "cluster": "backup", "static": {"body": "degraded"}}"#);
    get_ok(&w, "/items", &[], "cached");
    trip(&w);
    assert_eq!(refused(&w, "GET", "/items", &[]).header("x-breakwater"), Some("fallback-cache"));
    let (a, ..) = request(&w, 4, "GET", "/other", &[]);
    assert_eq!(a, Action::Continue, "a miss goes to the cluster");
    let w = worker(r#"{"cache": {}, "static": {"body": "degraded"}}"#);
    trip(&w);
    let grpc = [("content-type", "application/grpc")];
    let r = refused(&w, "POST", "/pkg.Svc/Get", &grpc);
    assert_eq!((r.status, r.header("x-breakwater")), (503, Some("circuit-open")));
    let w = worker(r#"{"static": {"body": "degraded"}}"#);
    trip(&w);
    assert_eq!(refused(&w, "POST", "/pkg.Svc/Get", &grpc).status, 503);
    assert_eq!(fallback_stat(&w, "static", "missed"), 1);
}

const QUEUED: &str = r#"{"policies": {"q": {"bulkhead": {"max_concurrent": 1, "queue": {"max_size": 1, "timeout": "1s"}},
    "fallback": {"when": ["queue_timeout"], "FALLBACK": "F"}}}, "policy": "q"}"#;

fn queued(kind: &str, value: &str) -> Worker {
    Worker::first(&QUEUED.replace("\"FALLBACK\": \"F\"", &format!("\"{kind}\": {value}")))
}

#[test]
fn a_queue_timeout_gets_the_fallback_and_bulkhead_full_the_reject_reply_when_only_timeouts_are_listed() {
    let w = queued("static", r#"{"body": "later"}"#);
    let (_, _s1) = w.at(0).send("q", 1);
    let (a, _s2) = w.send("q", 2);
    assert_eq!(a, Action::Stop, "waits");
    w.send("q", 3);
    let r = w.host.last_reply().unwrap();
    assert_eq!((r.context, r.header("x-breakwater")), (3, Some("bulkhead-full")));
    w.at(SECOND).tick();
    let r = w.host.last_reply().unwrap();
    assert_eq!((r.context, r.status, r.body.as_str()), (2, 200, "later"));
    assert_eq!(w.stat("fallback_total.policy.q.kind.static.result.served"), 1);
}

#[test]
fn a_queue_timeout_sent_to_the_fallback_cluster_is_resumed_and_its_answer_marked() {
    let w = queued("cluster", r#""backup""#);
    let (_, _s1) = w.at(0).send("q", 1);
    let (_, s2) = w.send("q", 2);
    w.host.resumed.borrow_mut().clear();
    w.at(SECOND).tick();
    assert_eq!(*w.host.resumed.borrow(), [2], "resumed, to the fallback route");
    assert!(w.host.replies.borrow().is_empty());
    assert_eq!(w.host.filter_state.borrow().get(FILTER_STATE).map(|v| v.as_slice()), Some(&b"backup"[..]));
    w.host.response_headers.borrow_mut().clear();
    w.host.set_response_header(":status", "200");
    w.host.set_prop("xds.cluster_name", b"backup");
    on_response_headers(&w.c, &w.host, &w.vm, 2, &s2, None, true, None);
    assert_eq!(w.host.response_header("x-breakwater").as_deref(), Some(&b"fallback-cluster"[..]));
    w.log(2, s2);
    assert_eq!(w.stat("bulkhead_queued.policy.q"), 0);
    w.at(2 * SECOND).tick();
    assert_eq!(w.stat("fallback_total.policy.q.kind.cluster.result.served"), 1);
}

/// A request sent to the fallback cluster `payments-backup`, answered (as Envoy's
/// `xds.cluster_name` says) by `by`: the mark it got.
fn rerouted_answered_by(w: &Worker, ticket: u32, by: Option<&str>) -> Option<alloc::vec::Vec<u8>> {
    let (a, mut s, _) = request(w, ticket, "GET", "/pay", &[]);
    assert_eq!(a, Action::Continue);
    w.host.response_headers.borrow_mut().clear();
    w.host.set_response_header(":status", "503");
    w.host.props.borrow_mut().remove("xds.cluster_name");
    if let Some(by) = by {
        w.host.set_prop("xds.cluster_name", by.as_bytes());
    }
    let read = filter_response_headers(&w.c, &w.host, &mut s);
    w.host.take_calls();
    on_response_headers(&w.c, &w.host, &w.vm, ticket, &s, read.as_deref(), true, None);
    assert_eq!(w.host.take_calls().get("property"), Some(&1), "one read of xds.cluster_name");
    w.log(ticket, s);
    w.host.response_header("x-breakwater")
}

#[test]
fn a_request_the_fallback_cluster_did_not_answer_is_missed_and_not_marked() {
    let w = worker(r#"{"cluster": "payments-backup"}"#);
    trip(&w);
    let policy = w.c.policy(0).unwrap();
    // No route matches the filter state: the request stays on its route, to the failing upstream.
    assert_eq!(rerouted_answered_by(&w, 7, Some("payments")), None);
    assert!(policy.fallback_warned.get(), "warned");
    // The route's cluster does not exist: Envoy's local reply (NC), no cluster.
    assert_eq!(rerouted_answered_by(&w, 8, None), None);
    assert_eq!(rerouted_answered_by(&w, 9, Some("payments-backup")).as_deref(), Some(&b"fallback-cluster"[..]));
    // A stream that ends before its response headers (the client went away) was not served.
    let (_, s, _) = request(&w, 10, "GET", "/pay", &[]);
    w.log(10, s);
    w.at(SECOND).tick();
    assert_eq!((fallback_stat(&w, "cluster", "served"), fallback_stat(&w, "cluster", "missed")), (1, 3));
    assert_eq!(w.stat("requests_total.policy.p.outcome.failure"), 1, "only the trip");
}

#[test]
fn a_dry_run_refuses_nothing_so_no_fallback_is_served() {
    let w = Worker::first(
        r#"{"policies": {"p": {"mode": "dry_run", "circuit_breaker": {"consecutive_failures": 1}, "fallback": {"static": {}}}}, "policy": "p"}"#,
    );
    trip(&w);
    let (a, ..) = request(&w, 3, "GET", "/x", &[]);
    assert_eq!(a, Action::Continue);
    assert!(w.host.replies.borrow().is_empty());
}

// What the healthy path pays (host calls per request; see filter/tests.rs for the policies alone).

fn steady_calls(w: &Worker, path: &str, response: &[(&str, &str)]) -> hashbrown::HashMap<&'static str, u32> {
    for _ in 0..3 {
        get_ok(w, path, response, "body");
    }
    w.host.take_calls();
    get_ok(w, path, response, "body");
    w.host.take_calls()
}

#[test]
fn a_static_or_cluster_fallback_costs_the_healthy_path_nothing() {
    for fallback in [STATIC, r#"{"cluster": "backup"}"#] {
        let w = worker(fallback);
        let calls = steady_calls(&w, "/items", &[]);
        assert_eq!(FakeHost::data_calls(&calls), 1, "{fallback}: {calls:?}");
        assert_eq!(calls.len(), 1, "the response headers only: {calls:?}");
    }
}

#[test]
fn a_cache_costs_one_request_header_read_per_request_and_a_store_once_a_second() {
    let w = worker(CACHE);
    let calls = steady_calls(&w, "/items", &[]);
    assert_eq!((calls.get("request_headers"), calls.get("response_headers")), (Some(&1), Some(&1)), "{calls:?}");
    assert_eq!(calls.len(), 2, "no body read, no store within the second: {calls:?}");
    w.at(2 * SECOND).tick();
    w.host.take_calls();
    get_ok(&w, "/items", &[], "body");
    let calls = w.host.take_calls();
    assert_eq!(
        (calls.get("response_body"), calls.get("shared_set"), calls.get("clock")),
        (Some(&1), Some(&1), Some(&1)),
        "{calls:?}"
    );
    // An answer that cannot be stored costs nothing more: no body read, no store.
    for response in [&[("cache-control", "no-store")][..], &[("set-cookie", "a=b")]] {
        w.at(10 * SECOND).tick();
        let calls = steady_calls(&w, "/other", response);
        assert_eq!(calls.len(), 2, "{calls:?}");
    }
    w.host.take_calls();
    let sent = request(&w, 1, "POST", "/items", &[]);
    upstream(&w, 1, sent, 200, &[], "created");
    let calls = w.host.take_calls();
    assert_eq!(
        (calls.get("request_headers"), calls.get("response_body")),
        (Some(&1), None),
        "a POST's answer is never read: {calls:?}"
    );
}

#[test]
fn a_policy_without_a_fallback_reads_no_more_than_before() {
    let w = Worker::first(r#"{"policies": {"p": {"bulkhead": {"max_concurrent": 10}}}, "policy": "p"}"#);
    let calls = steady_calls(&w, "/items", &[]);
    assert!(calls.is_empty(), "{calls:?}");
    let w = Worker::first(
        r#"{"policies": {"p": {"bulkhead": {"max_concurrent": 10}, "fallback": {"cache": {}}}}, "policy": "p"}"#,
    );
    let calls = steady_calls(&w, "/items", &[]);
    assert_eq!(FakeHost::data_calls(&calls), 2, "a cache needs the answer's headers and the request's: {calls:?}");
}

// The configuration.

fn error_of(fallback: &str) -> alloc::string::String {
    crate::config::parse(
        format!(
            r#"{{"policies": {{"p": {{"circuit_breaker": {{}}, "bulkhead": {{"max_concurrent": 1}}, "fallback": {fallback}}}}}}}"#
        )
        .as_bytes(),
    )
    .unwrap_err()
    .to_string()
}

#[test]
fn a_bad_fallback_is_refused_at_its_path() {
    for (fallback, error) in [
        ("{}", "policies.p.fallback: expected at least one of static, cache and cluster"),
        (r#"{"static": {}, "on": ["circuit_open"]}"#, "policies.p.fallback.on: unknown key"),
        (
            r#"{"static": {}, "when": ["circuit-open"]}"#,
            "policies.p.fallback.when[0]: expected a refusal this policy makes: circuit_open, bulkhead_full, queue_timeout or shed",
        ),
        (r#"{"static": {}, "when": ["queue_timeout"]}"#, "policies.p.fallback.when[0]: expected a refusal this policy makes"),
        (
            r#"{"static": {}, "when": []}"#,
            "policies.p.fallback.when: the list is empty: list the refusals to answer, such as [circuit_open]",
        ),
        (r#"{"static": {}, "when": "circuit_open"}"#, "policies.p.fallback.when: expected a list of refusals"),
        (
            r#"{"static": {"status": 204, "body": "{}"}}"#,
            "policies.p.fallback.static.body: must be empty: a 204 answer has no body (Envoy would send it with a content-length",
        ),
        (r#"{"static": {"status": 304, "body": "x"}}"#, "policies.p.fallback.static.body: must be empty: a 304 answer"),
        (
            r#"{"static": {"body": "x", "status": 204}}"#,
            "policies.p.fallback.static.body: must be empty: a 204 answer has no body",
        ),
        (
            r#"{"static": {"headers": {"content-length": "3"}}}"#,
            "policies.p.fallback.static.headers.content-length: is set by Envoy: it describes the connection or the body's length",
        ),
        (
            r#"{"static": {"headers": {"transfer-encoding": "chunked"}}}"#,
            "policies.p.fallback.static.headers.transfer-encoding: is set by Envoy",
        ),
        (r#"{"static": {"headers": {"connection": "close"}}}"#, "policies.p.fallback.static.headers.connection: is set by Envoy"),
        (
            r#"{"static": {"status": 101}}"#,
            "policies.p.fallback.static.status: expected a whole number from 200 to 599",
        ),
        (
            r#"{"static": {"headers": {"x-breakwater": "x"}}}"#,
            "policies.p.fallback.static.headers.x-breakwater: is set by Breakwater",
        ),
        (
            r#"{"cache": {"max_body": "2MiB"}}"#,
            "policies.p.fallback.cache.max_body: expected a size from 1 byte to 1MiB",
        ),
        (r#"{"cache": {"max_body": 0}}"#, "policies.p.fallback.cache.max_body: expected a size"),
        (
            r#"{"cache": {"max_entries": 100001}}"#,
            "policies.p.fallback.cache.max_entries: expected a whole number from 1 to 100000",
        ),
        (
            r#"{"cache": {"max_entries": 1000, "max_body": "1024KiB"}}"#,
            "policies.p.fallback.cache: max_entries × (max_body + 10KiB",
        ),
        (r#"{"cache": {"ttl": "0.5s"}}"#, "policies.p.fallback.cache.ttl: must be from 1s to 24h"),
        (
            r#"{"cache": {"key_headers": ["Accept-Encoding"]}}"#,
            "policies.p.fallback.cache.key_headers[0]: expected a lower-case request header name",
        ),
        (r#"{"cluster": ""}"#, "policies.p.fallback.cluster: expected an Envoy cluster name"),
    ] {
        let e = error_of(fallback);
        assert!(e.starts_with(error), "{fallback}: {e}");
    }
    let five = (0..5)
        .map(|i| format!(r#""p{i}": {{"circuit_breaker": {{}}, "fallback": {{"cache": {{"max_entries": 1000, "max_body": "200KiB"}}}}}}"#))
        .collect::<alloc::vec::Vec<_>>()
        .join(",");
    let e = crate::config::parse(format!(r#"{{"policies": {{{five}}}}}"#).as_bytes()).unwrap_err().to_string();
    assert!(e.starts_with("policies: the fallback caches of all policies together may take at most 1GiB"), "{e}");
}

#[test]
fn a_fallback_on_a_policy_that_refuses_nothing_is_refused() {
    let e = crate::config::parse(
        br#"{"policies": {"p": {"retry": {"max_retries": 2}, "fallback": {"static": {"body": "degraded"}}}}}"#,
    )
    .unwrap_err()
    .to_string();
    assert_eq!(
        e,
        "policies.p.fallback: a fallback needs a circuit_breaker or a bulkhead: without one this policy refuses nothing"
    );
    for with in [r#""circuit_breaker": {}"#, r#""bulkhead": {"max_concurrent": 1}"#] {
        let c = format!(r#"{{"policies": {{"p": {{{with}, "fallback": {{"static": {{}}}}}}}}}}"#);
        assert!(crate::config::parse(c.as_bytes()).is_ok(), "{with}");
    }
}

#[test]
fn an_empty_204_or_304_is_accepted() {
    for status in [204, 304] {
        for body in [r#""#, r#", "body": """#] {
            let c = format!(
                r#"{{"policies": {{"p": {{"circuit_breaker": {{}}, "fallback": {{"static": {{"status": {status}{body}}}}}}}}}}}"#
            );
            let c = crate::config::parse(c.as_bytes()).unwrap();
            assert_eq!(c.policies[0].fallback.as_ref().unwrap().fixed.as_ref().unwrap().status, status);
        }
    }
}

#[test]
fn the_defaults_answer_every_refusal_the_policy_makes() {
    let c = crate::config::parse(
        br#"{"policies": {"p": {"circuit_breaker": {}, "bulkhead": {"max_concurrent": 1}, "fallback": {"cache": {}}}}}"#,
    )
    .unwrap();
    let f = c.policies[0].fallback.as_ref().unwrap();
    assert_eq!(f.when, [true, true, false, false], "no queue: no queue timeouts; no shed_at: nothing shed");
    let cache = f.cache.as_ref().unwrap();
    assert_eq!((cache.max_entries, cache.max_body, cache.ttl_ns), (1000, 64 << 10, 300 * SECOND));
}

#[test]
fn a_shed_request_can_be_answered_only_where_a_class_sheds() {
    let shedding = br#"{"policies": {"p": {"bulkhead": {"max_concurrent": 4, "priority": {"header": "x-priority",
        "default": "standard", "classes": {"batch": {"shed_at": 0.5}}}}, "fallback": {"when": ["shed"], "static": {}}}}}"#;
    let c = crate::config::parse(shedding).unwrap();
    assert_eq!(c.policies[0].fallback.as_ref().unwrap().when, [false, false, false, true]);
    let none =
        br#"{"policies": {"p": {"bulkhead": {"max_concurrent": 4}, "fallback": {"when": ["shed"], "static": {}}}}}"#;
    let e = crate::config::parse(none).unwrap_err().to_string();
    assert!(e.starts_with("policies.p.fallback.when[0]: expected a refusal this policy makes"), "{e}");
}

#[test]
fn the_status_view_shows_each_kinds_served_and_missed_as_envoy_counted_them() {
    let w = worker(CACHE_THEN_STATIC);
    get_ok(&w, "/a", &[], "a");
    trip(&w);
    refused(&w, "GET", "/a", &[]);
    refused(&w, "GET", "/b", &[]);
    w.at(SECOND).tick(); // the worker's counts reach Envoy's counters
    let control = crate::config::parse(br#"{"control": {}}"#).unwrap().control.unwrap();
    w.host.new_stream();
    w.host.set_header(":method", "GET");
    w.host.set_header(":path", "/breakwater/status/p");
    w.host.set_prop("destination.address", b"127.0.0.1:9902");
    let reply = crate::control::handle(&control, &w.host, &w.vm).unwrap();
    let body: serde_json::Value = serde_json::from_str(&reply.body).unwrap();
    assert_eq!(
        body["policies"]["p"]["fallback"],
        serde_json::json!({ "static": { "served": 1, "missed": 0 }, "cache": { "served": 1, "missed": 1 } }),
        "{body}"
    );
}
