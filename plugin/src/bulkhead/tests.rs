//! The bulkhead on the request path, against fake workers of one process: what Envoy would see.

use crate::fake::Worker;
use crate::filter::Action;
use breakwater_policies::{MS, SECOND};

const CONFIG: &str = r#"{
  "policies": {
    "orders": { "bulkhead": { "max_concurrent": 2, "queue": { "max_size": 2, "timeout": "1s" } } },
    "plain": { "bulkhead": { "max_concurrent": 1 } },
    "tiered": { "bulkhead": { "max_concurrent": 3,
        "priority": { "header": "x-priority", "default": "standard",
                      "classes": { "critical": { "reserved": 1 }, "background": { "max": 1 } } } } },
    "guarded": { "circuit_breaker": { "consecutive_failures": 1, "open_for": "10s" },
                 "bulkhead": { "max_concurrent": 1 } },
    "shadow": { "mode": "dry_run", "bulkhead": { "max_concurrent": 1, "queue": { "max_size": 5 } } }
  },
  "routes": [
    { "match": { "route_name": "orders" }, "policy": "orders" },
    { "match": { "route_name": "plain" }, "policy": "plain" },
    { "match": { "route_name": "tiered" }, "policy": "tiered" },
    { "match": { "route_name": "guarded" }, "policy": "guarded" },
    { "match": { "route_name": "shadow" }, "policy": "shadow" }
  ]
}"#;

fn first() -> Worker {
    Worker::first(CONFIG)
}

fn second(of: &Worker) -> Worker {
    Worker::second(of, CONFIG)
}

#[test]
fn the_limit_holds_across_workers_and_the_next_request_is_refused_at_once() {
    let w1 = first();
    let w2 = second(&w1);
    let (a, _) = w1.send("plain", 10);
    assert_eq!(a, Action::Continue);
    let (b, _) = w2.send("plain", 20);
    assert_eq!(b, Action::Rejected, "the one permit is held on the other worker");
    let reply = w2.host.last_reply().unwrap();
    assert_eq!(
        (reply.status, reply.header("x-breakwater"), reply.header("retry-after")),
        (503, Some("bulkhead-full"), Some("1"))
    );
    assert_eq!(w1.stat("rejections.policy.plain.reason.bulkhead_full"), 1);
    assert_eq!(w1.stat("bulkhead_active.policy.plain"), 1);
}

#[test]
fn a_permit_comes_back_however_the_stream_ends() {
    let w = first();
    for status in [200, 503, 0] {
        let (a, s) = w.send("plain", 1);
        assert_eq!(a, Action::Continue, "status {status}: the previous permit was returned");
        w.end(1, s, status);
    }
    assert_eq!((w.stat("bulkhead_active.policy.plain"), w.stat("bulkhead_admitted.policy.plain")), (0, 3));
}

#[test]
fn a_waiter_on_another_worker_is_woken_when_a_permit_frees_and_holds_it_until_it_ends() {
    let w1 = first();
    let w2 = second(&w1);
    let (_, s1) = w1.send("orders", 1);
    let (_, _s2) = w1.send("orders", 2);
    let (queued, s3) = w2.at(5 * MS).send("orders", 3);
    assert_eq!(queued, Action::Queued);
    assert_eq!(w2.stat("bulkhead_queued.policy.orders"), 1);
    assert!(w2.wake().is_empty(), "nothing freed yet");
    w1.at(30 * MS).end(1, s1, 200);
    assert_eq!(w2.at(31 * MS).wake(), [3], "worker 2 resumes its own waiter");
    assert_eq!(w2.stat("bulkhead_queued.policy.orders"), 0);
    assert_eq!(w2.stat("bulkhead_active.policy.orders"), 2);
    assert_eq!(w2.stat("bulkhead_waited.policy.orders"), 1);
    assert_eq!(w2.stat("bulkhead_queue_ms.policy.orders"), 26, "queued from 5ms to 31ms");
    w2.end(3, s3, 200);
    assert_eq!(w2.stat("bulkhead_active.policy.orders"), 1);
}

#[test]
fn waiters_are_admitted_in_arrival_order() {
    let w1 = first();
    let w2 = second(&w1);
    let (_, s1) = w1.send("orders", 1);
    let (_, s2) = w1.send("orders", 2);
    assert_eq!(w2.send("orders", 3).0, Action::Queued);
    assert_eq!(w1.send("orders", 4).0, Action::Queued);
    assert_eq!(w2.send("orders", 5).0, Action::Rejected, "queue of 2 is full");
    w1.end(2, s2, 200);
    assert_eq!((w2.wake(), w1.wake()), (alloc::vec![3], alloc::vec![]));
    w1.end(1, s1, 200);
    assert_eq!((w2.wake(), w1.wake()), (alloc::vec![], alloc::vec![4]));
}

#[test]
fn a_waiter_past_its_timeout_gets_queue_timeout_at_the_next_tick_and_nothing_leaks() {
    let w = first();
    let (_, s1) = w.send("orders", 1);
    let (_, _s2) = w.send("orders", 2);
    let (_, s3) = w.at(0).send("orders", 3);
    w.at(SECOND - MS).tick();
    assert!(w.host.replies.borrow().is_empty(), "1ms before the timeout it still waits");
    w.at(SECOND).tick();
    let reply = w.host.last_reply().unwrap();
    assert_eq!((reply.context, reply.header("x-breakwater")), (3, Some("queue-timeout")));
    assert_eq!(w.stat("rejections.policy.orders.reason.queue_timeout"), 1);
    assert_eq!(w.stat("bulkhead_queued.policy.orders"), 0);
    // The local reply's 503 passes the filter; the stream then ends holding nothing.
    w.end(3, s3, 503);
    w.end(1, s1, 200);
    assert_eq!(w.stat("bulkhead_active.policy.orders"), 1, "only request 2 is still in flight");
    assert!(w.wake().is_empty(), "a timed-out waiter is never granted");
}

#[test]
fn a_waiter_whose_client_leaves_leaves_the_queue() {
    let w = first();
    let (_, s1) = w.send("orders", 1);
    let (_, _s2) = w.send("orders", 2);
    let (_, s3) = w.send("orders", 3);
    w.end(3, s3, 0);
    assert_eq!(w.stat("bulkhead_queued.policy.orders"), 0);
    w.end(1, s1, 200);
    assert!(w.wake().is_empty(), "no ghost takes the freed permit");
    assert_eq!(w.stat("bulkhead_active.policy.orders"), 1);
}

#[test]
fn a_client_that_leaves_after_its_grant_but_before_its_wake_up_gives_the_permit_back() {
    let w1 = first();
    let w2 = second(&w1);
    let (_, s1) = w1.send("orders", 1);
    let (_, _s2) = w1.send("orders", 2);
    let (_, s3) = w2.send("orders", 3);
    w1.end(1, s1, 200); // grants to 3; the wake-up sits in worker 2's queue
    w2.end(3, s3, 0);
    assert!(w2.wake().is_empty(), "the wake-up finds the stream gone");
    assert_eq!(w1.stat("bulkhead_active.policy.orders"), 1);
    assert_eq!(w1.send("orders", 4).0, Action::Continue, "the permit is free again");
}

#[test]
fn a_permit_granted_to_a_dead_workers_waiter_goes_to_the_next_in_line() {
    let w1 = first();
    let w2 = second(&w1);
    let (_, s1) = w1.send("orders", 1);
    let (_, _s2) = w1.send("orders", 2);
    assert_eq!(w2.send("orders", 3).0, Action::Queued);
    assert_eq!(w1.send("orders", 4).0, Action::Queued);
    w1.host.process.queues.borrow_mut().remove(&2); // worker 2's VM died: its queue is gone
    w1.end(1, s1, 200);
    assert_eq!(w1.wake(), [4]);
    assert_eq!((w1.stat("bulkhead_active.policy.orders"), w1.stat("bulkhead_queued.policy.orders")), (2, 0));
}

#[test]
fn the_priority_header_picks_the_class_and_reserved_capacity_holds_against_a_flood() {
    let w = first();
    let bg = [("x-priority", "background")];
    assert_eq!(w.send_with("tiered", 1, &bg).0, Action::Continue);
    assert_eq!(w.send_with("tiered", 2, &bg).0, Action::Rejected, "background: max 1");
    assert_eq!(w.send_with("tiered", 3, &[("x-priority", "nonsense")]).0, Action::Continue, "default class");
    assert_eq!(w.send("tiered", 4).0, Action::Rejected, "the last permit is critical's reserve");
    assert_eq!(w.send_with("tiered", 5, &[("x-priority", "critical")]).0, Action::Continue);
}

#[test]
fn a_request_the_breaker_rejects_takes_no_permit_and_a_bulkhead_refusal_is_not_a_failure() {
    let w = first();
    let (_, s1) = w.send("guarded", 1);
    let (refused, s2) = w.send("guarded", 2);
    assert_eq!(refused, Action::Rejected, "bulkhead full");
    w.end(2, s2, 503); // the local reply passes the filter, then the stream ends
    assert_eq!(w.stat("requests.policy.guarded.outcome.failure"), 0);
    assert_eq!(w.stat("requests.policy.guarded.outcome.ignored"), 0, "a refusal is no upstream call at all");
    assert_eq!(w.stat("transitions.policy.guarded.to.open"), 0, "one failure would trip it");
    w.end(1, s1, 500); // trips the breaker
    assert_eq!(w.stat("transitions.policy.guarded.to.open"), 1);
    assert_eq!(w.send("guarded", 3).0, Action::Rejected);
    assert_eq!(w.host.last_reply().unwrap().header("x-breakwater"), Some("circuit-open"));
    assert_eq!(w.stat("bulkhead_active.policy.guarded"), 0);
    assert_eq!(w.stat("bulkhead_admitted.policy.guarded"), 1);
}

#[test]
fn dry_run_counts_what_it_would_refuse_and_neither_refuses_nor_queues() {
    let w = first();
    let (a1, s1) = w.send("shadow", 1);
    let (a2, s2) = w.send("shadow", 2);
    assert_eq!((a1, a2), (Action::Continue, Action::Continue));
    assert_eq!(w.stat("dry_run_rejections.policy.shadow.reason.bulkhead_full"), 1);
    assert_eq!(w.stat("bulkhead_queued.policy.shadow"), 0);
    w.end(2, s2, 200);
    w.end(1, s1, 200);
    assert_eq!(w.stat("bulkhead_active.policy.shadow"), 0);
}

#[test]
fn a_worker_holding_permits_renews_them_at_sync_so_they_are_never_reclaimed() {
    let w1 = first();
    let w2 = second(&w1);
    let (_, _s1) = w1.at(0).send("plain", 1);
    for t in 1..=30 {
        w1.at(t * SECOND).tick();
    }
    assert_eq!(w2.at(30 * SECOND).send("plain", 2).0, Action::Rejected, "30s later, still held");
}

#[test]
fn permits_taken_before_a_configuration_reload_are_still_renewed_after_it() {
    let w1 = first();
    let w2 = second(&w1);
    let (_, _long_stream) = w1.at(0).send("plain", 1);
    // A reload: a new root context with its own configuration; the old one never ticks again.
    let reloaded =
        alloc::rc::Rc::new(crate::Compiled::new(crate::config::parse(CONFIG.as_bytes()).unwrap(), &w1.host, "test"));
    for t in 1..=30 {
        w1.at(t * SECOND);
        crate::filter::sync(&reloaded, &w1.host);
        super::renew(&w1.host, &w1.parking);
    }
    assert_eq!(w2.at(30 * SECOND).send("plain", 2).0, Action::Rejected, "the old stream's permit is still held");
}

#[test]
fn a_dead_workers_permits_are_reclaimed_after_ten_seconds_of_silence() {
    let w1 = first();
    let w2 = second(&w1);
    let (_, _s1) = w1.at(0).send("plain", 1);
    assert_eq!(w2.at(10 * SECOND).send("plain", 2).0, Action::Rejected);
    assert_eq!(w2.at(10 * SECOND + 1).send("plain", 3).0, Action::Continue, "worker 1 never renewed");
    assert_eq!(w2.stat("bulkhead_active.policy.plain"), 1, "the gauge dropped the reclaimed permit");
}

#[test]
fn a_bulkhead_request_costs_the_route_name_and_two_cas_round_trips() {
    let w = first();
    w.host.take_calls();
    let (_, s) = w.send("plain", 1);
    w.end(1, s, 200);
    let calls = w.host.take_calls();
    let n = |k: &str| calls.get(k).copied().unwrap_or(0);
    assert_eq!((n("property"), n("header"), n("shared_get"), n("shared_set")), (1, 0, 2, 2), "{calls:?}");
}
