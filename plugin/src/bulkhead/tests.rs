//! The bulkhead on the request path, against fake workers of one process: what Envoy would see.
//! `wake()` runs a worker's `on_queue_ready` (grants, refusals and recalls from other workers),
//! as Envoy does as soon as the worker is idle.

use crate::fake::{FakeHost, Worker};
use crate::filter::{Action, Stream};
use breakwater_policies::{MS, SECOND};

const CONFIG: &str = r#"{
  "policies": {
    "orders": { "bulkhead": { "max_concurrent": 2, "queue": { "max_size": 2, "timeout": "1s" } } },
    "tight": { "bulkhead": { "max_concurrent": 2 } },
    "plain": { "bulkhead": { "max_concurrent": 1 } },
    "single": { "bulkhead": { "max_concurrent": 1, "queue": { "max_size": 2, "timeout": "1s" } } },
    "wide": { "bulkhead": { "max_concurrent": 100 } },
    "tiered": { "bulkhead": { "max_concurrent": 3,
        "priority": { "header": "x-priority", "default": "standard",
                      "classes": { "critical": { "reserved": 1 }, "background": { "max": 1 } } } } },
    "guarded": { "circuit_breaker": { "consecutive_failures": 1, "open_for": "10s" },
                 "bulkhead": { "max_concurrent": 1 } },
    "shadow": { "mode": "dry_run", "bulkhead": { "max_concurrent": 1, "queue": { "max_size": 5 } } }
  },
  "routes": [
    { "match": { "route_name": "orders" }, "policy": "orders" },
    { "match": { "route_name": "tight" }, "policy": "tight" },
    { "match": { "route_name": "plain" }, "policy": "plain" },
    { "match": { "route_name": "single" }, "policy": "single" },
    { "match": { "route_name": "wide" }, "policy": "wide" },
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

fn refused_with(w: &Worker, reason: &str) {
    let reply = w.host.last_reply().expect("a reply");
    assert_eq!(
        (reply.status, reply.header("x-breakwater"), reply.header("retry-after")),
        (503, Some(reason), Some("1"))
    );
}

fn calls(host: &FakeHost, kind: &str) -> u32 {
    host.calls.borrow().get(kind).copied().unwrap_or(0)
}

#[test]
fn the_limit_holds_across_workers_and_the_next_request_is_refused_at_once() {
    let w1 = first();
    let w2 = second(&w1);
    let (a, _) = w1.send("plain", 10);
    assert_eq!(a, Action::Continue);
    let (b, _) = w2.send("plain", 20);
    assert_eq!(b, Action::Stop, "the one permit is held on the other worker");
    refused_with(&w2, "bulkhead-full");
    assert_eq!(w2.stat("rejections_total.policy.plain.reason.bulkhead_full"), 1);
    assert_eq!(w1.stat("bulkhead_active.policy.plain"), 1);
    assert_eq!(w1.stat("bulkhead_limit.policy.plain"), 1);
}

#[test]
fn a_permit_comes_back_however_the_stream_ends() {
    let w = first();
    for status in [200, 503, 0] {
        let (a, s) = w.send("plain", 1);
        assert_eq!(a, Action::Continue, "status {status}: the previous permit was returned");
        w.end(1, s, status);
    }
    assert_eq!((w.stat("bulkhead_active.policy.plain"), w.stat("bulkhead_admitted_total.policy.plain")), (0, 3));
}

#[test]
fn far_from_full_a_worker_serves_its_requests_from_its_lease_with_no_host_call() {
    let w = first();
    w.host.take_calls();
    let (_, first_stream) = w.send("wide", 1);
    assert_eq!(calls(&w.host, "shared_set"), 1, "one CAS takes a lease of 12");
    w.host.take_calls();
    let mut streams = alloc::vec::Vec::new();
    for t in 2..=12 {
        let (a, s) = w.send("wide", t);
        assert_eq!(a, Action::Continue);
        streams.push((t, s));
    }
    for (t, s) in streams {
        w.end(t, s, 200);
    }
    let c = w.host.take_calls();
    assert_eq!((calls_of(&c, "shared_get"), calls_of(&c, "shared_set"), calls_of(&c, "clock")), (0, 0, 0), "{c:?}");
    assert_eq!(w.stat("bulkhead_active.policy.wide"), 12, "permits taken: the whole lease");
    assert_eq!(w.stat("bulkhead_admitted_total.policy.wide"), 12);
    w.end(1, first_stream, 200);
    // The lease was used since the last tick: kept. Idle through a whole tick: given back.
    w.at(50 * MS).tick();
    assert_eq!(lease(&w, "wide"), 12);
    w.at(100 * MS).tick();
    assert_eq!(lease(&w, "wide"), 0, "an unused lease goes back");
    assert_eq!(held(&w, "wide"), 0);
    assert_eq!(w.stat("bulkhead_active.policy.wide"), 0);
}

fn calls_of(c: &hashbrown::HashMap<&'static str, u32>, kind: &str) -> u32 {
    c.get(kind).copied().unwrap_or(0)
}

/// The permits `w`'s worker holds in the shared state of `policy`'s bulkhead.
fn held(w: &Worker, policy: &str) -> u32 {
    let key = alloc::format!("breakwater/v1/test/bulkhead/{policy}");
    let (s, _) = crate::store::load::<breakwater_policies::BulkheadState>(&w.host, &key);
    s.held_by(w.vm.worker.get())
}

fn lease(w: &Worker, policy: &str) -> u32 {
    let key = alloc::format!("breakwater/v1/test/bulkhead/{policy}");
    let (s, _) = crate::store::load::<breakwater_policies::BulkheadState>(&w.host, &key);
    s.lease_of(w.vm.worker.get())
}

#[test]
fn a_request_is_never_refused_while_another_workers_lease_sits_idle() {
    // 2 permits, no queue. Worker 1 leased one, and its request is over: the permit is idle.
    let w1 = first();
    let w2 = second(&w1);
    let (_, s) = w1.send("tight", 1);
    w1.end(1, s, 200);
    assert_eq!(lease(&w1, "tight"), 1);
    let (a, _s2) = w2.send("tight", 2);
    assert_eq!(a, Action::Continue);
    // Only one request is in flight, yet both permits are taken: the second waits for a recall.
    let (a, s3) = w2.send("tight", 3);
    assert_eq!(a, Action::Stop);
    assert!(w2.host.last_reply().is_none(), "not refused");
    assert!(w1.wake().is_empty(), "worker 1 answers the recall");
    assert_eq!(lease(&w1, "tight"), 0);
    assert_eq!(w2.wake(), [3], "the idle permit went to the waiter");
    w2.end(3, s3, 200);
    assert_eq!(w2.stat("bulkhead_admitted_total.policy.tight"), 2);
    assert_eq!(w2.stat("bulkhead_waited_total.policy.tight"), 1);
}

#[test]
fn a_recall_that_frees_nothing_refuses_the_request_that_had_no_place_in_a_queue() {
    let w1 = first();
    let w2 = second(&w1);
    let (_, s1) = w1.send("tight", 1);
    let (_, _s2) = w2.send("tight", 2);
    let (a, _s3) = w2.send("tight", 3);
    assert_eq!(a, Action::Stop);
    w1.wake(); // request 1 still uses the leased permit: nothing to give back
    assert!(w2.wake().is_empty());
    refused_with(&w2, "bulkhead-full");
    assert_eq!(w2.host.last_reply().unwrap().context, 3);
    assert_eq!(w2.stat("rejections_total.policy.tight.reason.bulkhead_full"), 1);
    assert_eq!(w2.stat("bulkhead_queued.policy.tight"), 0);
    // The draining lease goes back as its request ends.
    w1.end(1, s1, 200);
    assert_eq!(lease(&w1, "tight"), 0);
    assert_eq!(w1.send("tight", 4).0, Action::Continue);
}

#[test]
fn a_recall_that_no_one_answers_ends_at_the_recall_timeout() {
    let w1 = first();
    let w2 = second(&w1);
    let (_, s) = w1.at(0).send("tight", 1);
    w1.end(1, s, 200);
    let (_, _s2) = w2.at(0).send("tight", 2);
    let (a, _s3) = w2.at(0).send("tight", 3);
    assert_eq!(a, Action::Stop);
    // Worker 1 never answers (its VM is stuck or dead). Two sync intervals later: refused.
    w2.at(100 * MS - 1).tick();
    assert!(w2.host.last_reply().is_none());
    w2.at(100 * MS).tick();
    refused_with(&w2, "bulkhead-full");
}

#[test]
fn a_waiter_on_another_worker_is_woken_when_a_permit_frees_and_holds_it_until_it_ends() {
    let w1 = first();
    let w2 = second(&w1);
    let (_, s1) = w1.send("orders", 1); // a lease of 1
    let (_, _s2) = w1.send("orders", 2); // one by one
    let (queued, s3) = w2.at(5 * MS).send("orders", 3);
    assert_eq!(queued, Action::Stop);
    assert_eq!(w2.stat("bulkhead_queued.policy.orders"), 1);
    w1.wake(); // the recall: request 1 uses its leased permit, which now drains
    assert!(w2.wake().is_empty(), "nothing freed yet");
    w1.at(30 * MS).end(1, s1, 200);
    assert_eq!(w2.at(31 * MS).wake(), [3], "worker 2 resumes its own waiter");
    assert_eq!(w2.stat("bulkhead_queued.policy.orders"), 0);
    assert_eq!(w2.stat("bulkhead_waited_total.policy.orders"), 1);
    assert_eq!(w2.host.metric("bulkhead_queue_wait_milliseconds.policy.orders"), 26, "queued from 5ms to 31ms");
    w2.end(3, s3, 200);
    w1.stat("bulkhead_active.policy.orders"); // both workers' changes reach the shared gauge
    assert_eq!(w2.stat("bulkhead_active.policy.orders"), 1, "request 2 is still in flight");
}

#[test]
fn waiters_are_admitted_in_arrival_order() {
    let w1 = first();
    let w2 = second(&w1);
    let (_, s1) = w1.send("orders", 1);
    let (_, s2) = w1.send("orders", 2);
    assert_eq!(w2.send("orders", 3).0, Action::Stop);
    assert_eq!(w1.send("orders", 4).0, Action::Stop);
    w1.wake(); // the recall: the lease drains
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
    assert_eq!(w.stat("rejections_total.policy.orders.reason.queue_timeout"), 1);
    assert_eq!(w.stat("bulkhead_queued.policy.orders"), 0);
    // The local reply's 503 passes the filter; the stream then ends holding nothing.
    w.end(3, s3, 503);
    w.end(1, s1, 200);
    assert_eq!(held(&w, "orders"), 2, "request 2's permit, and request 1's idle in the lease");
    assert_eq!(w.at(SECOND + 50 * MS).stat("bulkhead_active.policy.orders"), 2);
    w.at(SECOND + 100 * MS).tick();
    assert_eq!(held(&w, "orders"), 1, "the unused lease went back: only request 2 is in flight");
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
    assert_eq!(w.stat("bulkhead_queued.policy.orders"), 0);
    assert_eq!(w.stat("bulkhead_active.policy.orders"), 2, "request 2, and request 1's permit idle in the lease");
}

#[test]
fn a_client_that_leaves_after_its_grant_but_before_its_wake_up_gives_the_permit_back() {
    let w1 = first();
    let w2 = second(&w1);
    let (_, _s1) = w1.send("plain", 1);
    let (_, s2) = w2.send("orders", 2);
    let (_, s3) = w2.send("orders", 3);
    let (_, s4) = w2.send("orders", 4); // waits
    w2.end(2, s2, 200); // its lease permit idles…
    w2.end(3, s3, 200); // …and request 3's one-by-one permit goes to the waiter: 4 is granted
    w2.end(4, s4, 0); // …but its client leaves before the wake-up
    assert!(w2.wake().is_empty(), "the wake-up finds the stream gone");
    assert_eq!(w2.stat("bulkhead_active.policy.orders"), 1, "only request 2's permit, idle in the lease");
    assert_eq!(w2.send("orders", 5).0, Action::Continue);
    assert_eq!(w2.send("orders", 6).0, Action::Continue, "both permits are free again");
}

#[test]
fn a_permit_granted_to_a_dead_workers_waiter_goes_to_the_next_in_line() {
    let w1 = first();
    let w2 = second(&w1);
    let (_, s1) = w1.send("orders", 1);
    let (_, _s2) = w1.send("orders", 2);
    assert_eq!(w2.send("orders", 3).0, Action::Stop);
    assert_eq!(w1.send("orders", 4).0, Action::Stop);
    w1.wake(); // the recall from 3: the lease drains
    w1.host.process.queues.borrow_mut().remove(&2); // worker 2's VM died: its queue is gone
    w1.end(1, s1, 200);
    assert_eq!(w1.wake(), [4]);
    assert_eq!(w1.stat("bulkhead_queued.policy.orders"), 0);
}

#[test]
fn the_priority_header_picks_the_class_and_reserved_capacity_holds_against_a_flood() {
    let w = first();
    let bg = [("x-priority", "background")];
    assert_eq!(w.send_with("tiered", 1, &bg).0, Action::Continue);
    assert_eq!(w.send_with("tiered", 2, &bg).0, Action::Stop, "background: max 1");
    assert_eq!(w.send_with("tiered", 3, &[("x-priority", "nonsense")]).0, Action::Continue, "default class");
    assert_eq!(w.send("tiered", 4).0, Action::Stop, "the last permit is critical's reserve");
    assert_eq!(w.send_with("tiered", 5, &[("x-priority", "critical")]).0, Action::Continue);
}

#[test]
fn a_priority_value_that_is_not_utf8_gets_the_default_class() {
    let w = first();
    w.host.new_stream();
    w.host.set_prop("xds.route_name", b"tiered");
    w.host.set_header("x-priority", b"crit\xe9cal");
    let (a, _) = crate::filter::on_request_headers(&w.c, &w.host, &w.vm, 1);
    assert_eq!(a, Action::Continue);
    assert_eq!(w.stat("bulkhead_admitted_total.policy.tiered"), 1);
}

#[test]
fn a_request_the_breaker_rejects_takes_no_permit_and_a_bulkhead_refusal_is_not_a_failure() {
    let w = first();
    let (_, s1) = w.send("guarded", 1);
    let (refused, s2) = w.send("guarded", 2);
    assert_eq!(refused, Action::Stop, "bulkhead full");
    assert_eq!(s2, Stream::Untracked);
    assert_eq!(w.stat("requests_total.policy.guarded.outcome.failure"), 0);
    assert_eq!(w.stat("ignored_total.policy.guarded.reason.local_reply"), 0, "a refusal is no upstream call at all");
    w.end(1, s1, 500); // trips the breaker
    assert_eq!(w.stat("transitions_total.policy.guarded.to_state.open"), 1);
    assert_eq!(w.send("guarded", 3).0, Action::Stop);
    assert_eq!(w.host.last_reply().unwrap().header("x-breakwater"), Some("circuit-open"));
    assert_eq!(w.stat("bulkhead_active.policy.guarded"), 0);
    assert_eq!(w.stat("bulkhead_admitted_total.policy.guarded"), 1);
}

#[test]
fn dry_run_counts_what_it_would_refuse_and_neither_refuses_nor_queues() {
    let w = first();
    let (a1, s1) = w.send("shadow", 1);
    let (a2, s2) = w.send("shadow", 2);
    assert_eq!((a1, a2), (Action::Continue, Action::Continue));
    assert_eq!(w.stat("dry_run_rejections_total.policy.shadow.reason.bulkhead_full"), 1);
    assert_eq!(w.stat("bulkhead_queued.policy.shadow"), 0);
    w.end(2, s2, 200);
    w.end(1, s1, 200);
    assert_eq!(w.stat("bulkhead_active.policy.shadow"), 0);
}

#[test]
fn a_worker_holding_permits_renews_them_so_they_are_never_reclaimed() {
    let w1 = first();
    let w2 = second(&w1);
    let (_, _s1) = w1.at(0).send("plain", 1);
    for t in 1..=30 {
        w1.at(t * SECOND).tick();
    }
    assert_eq!(w2.at(30 * SECOND).send("plain", 2).0, Action::Stop, "30s later, still held");
}

#[test]
fn permits_taken_before_a_configuration_reload_are_still_renewed_after_it() {
    let mut w1 = first();
    let w2 = second(&w1);
    let (_, long_stream) = w1.at(0).send("plain", 1);
    let old = w1.c.clone();
    w1.reconfigure(CONFIG); // a new root context; the old configuration only lives on in its stream
    for t in 1..=30 {
        w1.at(t * SECOND).tick();
    }
    assert_eq!(w2.at(30 * SECOND).send("plain", 2).0, Action::Stop, "the old stream's permit is still held");
    crate::filter::on_end(&old, &w1.host, &w1.vm, 1, long_stream);
    assert_eq!(w2.send("plain", 3).0, Action::Continue, "and returned when it ends");
}

#[test]
fn a_dead_workers_permits_are_reclaimed_after_ten_seconds_of_silence() {
    let w1 = first();
    let w2 = second(&w1);
    let (_, _s1) = w1.at(0).send("plain", 1);
    assert_eq!(w2.at(10 * SECOND).send("plain", 2).0, Action::Stop);
    assert_eq!(w2.at(10 * SECOND + 1).send("plain", 3).0, Action::Continue, "worker 1 never renewed");
}

#[test]
fn a_bulkhead_request_on_the_exact_path_costs_two_cas_round_trips() {
    let w = first();
    w.host.take_calls();
    let (_, s) = w.send("plain", 1);
    w.end(1, s, 200);
    let calls = w.host.take_calls();
    let n = |k: &str| calls.get(k).copied().unwrap_or(0);
    assert_eq!((n("property"), n("header"), n("shared_get"), n("shared_set")), (1, 0, 2, 2), "{calls:?}");
}

#[test]
fn a_permit_reclaimed_from_a_dead_worker_at_a_waiters_timeout_goes_to_that_waiter() {
    let w1 = first();
    let w2 = second(&w1);
    let (_, _held) = w1.at(0).send("single", 1); // worker 1 then dies holding it
    assert_eq!(w2.at(9500 * MS).send("single", 2).0, Action::Stop);
    // At its timeout, worker 2's tick withdraws it, and that very call reclaims the dead
    // worker's permit and grants it to the first in line: the same waiter. It must be woken.
    w2.at(10_500 * MS).tick();
    assert!(w2.host.last_reply().is_none(), "not timed out: it got the permit");
    assert_eq!(w2.wake(), [2]);
}

#[test]
fn a_recall_only_waiter_whose_client_leaves_before_its_refusal_arrives_gives_back_no_permit() {
    // Found by the request-path property test: leaving the queue, a waiter that was no longer
    // in it was taken to have been handed a permit, and gave one back. But a waiter that only
    // waited for a recall is also taken out when the recall frees nothing, and refused; when
    // its client left before the refusal arrived, it gave back a permit of another request.
    let w1 = first();
    let w2 = second(&w1);
    let (_, leased) = w1.send("tight", 1);
    let (a, second_permit) = w2.send("tight", 2);
    assert_eq!(a, Action::Continue, "the second of 2 permits");
    let (a, recalling) = w2.send("tight", 3);
    assert_eq!(a, Action::Stop, "waits for worker 1's lease, which is in use");
    assert!(w1.wake().is_empty());
    let taken = |w1: &Worker, w2: &Worker| held(w1, "tight") + held(w2, "tight");
    assert_eq!(taken(&w1, &w2), 2);
    w2.log(3, recalling); // its client leaves; the refusal is still on its way
    assert_eq!(taken(&w1, &w2), 2, "both requests still hold their permits");
    assert_eq!(w1.send("tight", 4).0, Action::Stop, "no third permit");
    assert!(w2.wake().is_empty(), "the late refusal resumes nothing");
    assert!(w2.host.replies.borrow().iter().all(|r| r.context != 3), "and answers no one");
    w1.log(1, leased);
    w2.log(2, second_permit);
    w1.at(50 * MS).tick();
    w2.at(50 * MS).tick();
    assert_eq!(taken(&w1, &w2), 0);
}

#[test]
fn a_grant_that_arrives_after_its_waiters_client_left_and_its_queue_timeout_passed_is_given_back() {
    // Found by the request-path property test: the worker ticked before it read its queue.
    let w = Worker::first(
        r#"{"policies": {"one": {"bulkhead": {"max_concurrent": 1, "queue": {"max_size": 1, "timeout": "100ms"},
            "priority": {"header": "x-p", "default": "d", "classes": {}}}}},
            "routes": [{"match": {}, "policy": "one"}]}"#,
    );
    let (_, s1) = w.send("one", 1);
    let (a, s2) = w.send("one", 2);
    assert_eq!(a, Action::Stop, "waits");
    w.end(1, s1, 200); // the permit goes to request 2…
    w.log(2, s2); // …whose client leaves before the grant arrives
    w.at(SECOND).tick();
    assert!(w.wake().is_empty(), "the grant, late, resumes nothing");
    assert_eq!(held(&w, "one"), 0, "and its permit is back");
    assert_eq!(w.send("one", 3).0, Action::Continue);
}

#[test]
fn a_waiter_the_shared_state_lost_is_answered_with_queue_timeout_soon_after_its_deadline() {
    // Found by the request-path property test: garbage under the bulkhead's key (another
    // version's state, a stray writer) loses the queue. A waiter that is not in the queue any
    // more was taken to have been handed a permit whose wake-up is on its way, and it waited
    // for it until its client gave up.
    let w = first();
    let (_, _s1) = w.send("plain", 1);
    let (_, _s2) = w.send("orders", 2);
    let (_, _s3) = w.send("orders", 3);
    let (a, s4) = w.send("orders", 4);
    assert_eq!(a, Action::Stop, "waits");
    use crate::host::Host;
    w.host.shared_set("breakwater/v1/test/bulkhead/orders", b"", 0).unwrap();
    w.at(SECOND).tick(); // its timeout: not in the queue; its wake-up may be on the way
    assert!(w.host.replies.borrow().iter().all(|r| r.context != 4));
    w.at(SECOND + 100 * MS).tick(); // none came
    refused_with(&w, "queue-timeout");
    assert_eq!(w.host.last_reply().map(|r| r.context), Some(4));
    assert_eq!(w.stat("bulkhead_queued.policy.orders"), 0);
    w.log(4, s4);
    assert!(w.wake().is_empty());
}

// The tick's pace (`Vm::pace`): fine while something is timed to `sync_interval`.

#[test]
fn a_healthy_worker_slows_its_tick_after_a_calm_second_and_still_flushes_stats_every_tick() {
    let w = first();
    let t = w.calm_ticks("orders", 0, 19);
    assert!(!w.vm.is_coarse(), "19 calm ticks: still every sync_interval");
    let t = w.calm_ticks("orders", t, 1);
    assert!(w.vm.is_coarse() && !w.host.tick_fine.get(), "the 20th: coarse");
    assert_eq!(w.host.take_calls().get("pace_tick"), Some(&1));
    // At the coarse pace (250 ms) every tick flushes: a count reaches Envoy within one.
    let (_, s) = w.at(t + 10 * MS).send("orders", 7);
    w.end(7, s, 200);
    let admitted = || w.host.metric("bulkhead_admitted_total.policy.orders");
    let before = admitted();
    w.at(t + 60 * MS).tick();
    assert_eq!(admitted(), before + 1);
}

#[test]
fn a_request_that_starts_waiting_brings_the_fine_pace_back_until_the_queue_is_empty() {
    let w = first();
    let t = w.calm_ticks("orders", 0, 20);
    assert!(w.vm.is_coarse());
    let (_, s1) = w.at(t).send("orders", 1);
    let (_, s2) = w.send("orders", 2);
    assert!(w.vm.is_coarse(), "nothing waits yet: the pace stays coarse");
    let (action, s3) = w.send("orders", 3);
    assert_eq!(action, Action::Stop);
    assert!(!w.vm.is_coarse() && w.host.tick_fine.get(), "request 3 waits: its timeout needs the fine tick");
    w.wake(); // the recall from 3: the lease drains
    let mut s1 = Some(s1);
    for k in 1..=32 {
        w.at(t + k * 50 * MS).tick();
        if k == 10 {
            w.end(1, s1.take().unwrap(), 200); // back to the lease; the next tick hands it on
        }
        if k == 11 {
            assert_eq!(w.wake(), [3], "request 1's permit went to request 3");
        }
        assert_eq!(w.vm.is_coarse(), k >= 31, "fine while request 3 waits, coarse 20 calm ticks after (tick {k})");
    }
    w.end(2, s2, 200);
    w.end(3, s3, 200);
}
