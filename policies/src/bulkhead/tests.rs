//! Scenarios for the bulkhead, read top to bottom. Workers are 1 and 2; tickets are request ids.

use super::*;
use crate::{MS, SECOND};

const A: u32 = 1;
const B: u32 = 2;
const STANDARD: u8 = 0;
const CRITICAL: u8 = 1;
const BACKGROUND: u8 = 2;

fn cfg(max: u32, queue: u32) -> BulkheadConfig {
    BulkheadConfig { max_concurrent: max, queue_max: queue, ..BulkheadConfig::default() }
}

/// standard (no limits), critical reserves 2, background at most 1; 5 permits.
fn classes() -> BulkheadConfig {
    BulkheadConfig {
        max_concurrent: 5,
        queue_max: 10,
        classes: alloc::vec![
            ClassLimit::default(),
            ClassLimit { reserved: 2, max: None },
            ClassLimit { reserved: 0, max: Some(1) },
        ],
        ..BulkheadConfig::default()
    }
}

fn acquire(s: &mut BulkheadState, c: &BulkheadConfig, worker: u32, ticket: u32) -> Acquire {
    s.acquire(c, 0, worker, STANDARD, ticket, true).value
}

#[test]
fn admits_up_to_the_limit_across_workers_then_refuses_without_a_queue() {
    let c = cfg(3, 0);
    let mut s = BulkheadState::default();
    assert_eq!(acquire(&mut s, &c, A, 1), Acquire::Admitted);
    assert_eq!(acquire(&mut s, &c, B, 2), Acquire::Admitted);
    assert_eq!(acquire(&mut s, &c, A, 3), Acquire::Admitted);
    assert_eq!(acquire(&mut s, &c, B, 4), Acquire::Full, "4th of 3");
    assert_eq!((s.active(), s.held_by(A), s.held_by(B)), (3, 2, 1));
}

#[test]
fn a_refusal_changes_nothing() {
    let c = cfg(1, 0);
    let mut s = BulkheadState::default();
    acquire(&mut s, &c, A, 1);
    let before = s.clone();
    let u = s.acquire(&c, 0, B, STANDARD, 2, true);
    assert_eq!((u.value, u.changed), (Acquire::Full, false));
    assert_eq!(s, before);
}

#[test]
fn over_the_limit_waits_while_there_is_room_then_is_refused() {
    let c = cfg(1, 2);
    let mut s = BulkheadState::default();
    assert_eq!(acquire(&mut s, &c, A, 1), Acquire::Admitted);
    assert_eq!(acquire(&mut s, &c, A, 2), Acquire::Queued);
    assert_eq!(acquire(&mut s, &c, B, 3), Acquire::Queued);
    assert_eq!(acquire(&mut s, &c, B, 4), Acquire::Full, "queue of 2 is full");
    assert_eq!(s.queued(), 2);
}

#[test]
fn a_request_that_may_not_wait_is_refused_when_full_even_with_room_in_the_queue() {
    let c = cfg(1, 5);
    let mut s = BulkheadState::default();
    acquire(&mut s, &c, A, 1);
    assert_eq!(s.acquire(&c, 0, B, STANDARD, 2, false).value, Acquire::Full);
    assert_eq!(s.queued(), 0);
}

#[test]
fn a_freed_permit_goes_to_the_first_waiter_and_names_its_worker() {
    let c = cfg(1, 5);
    let mut s = BulkheadState::default();
    acquire(&mut s, &c, A, 1);
    acquire(&mut s, &c, B, 2);
    acquire(&mut s, &c, A, 3);
    let u = s.release(&c, 10, A, STANDARD);
    assert_eq!(u.granted, alloc::vec![Waiter { worker: B, ticket: 2, class: STANDARD, since: 0 }]);
    assert_eq!((s.active(), s.held_by(B), s.held_by(A), s.queued()), (1, 1, 0, 1));
    let u = s.release(&c, 20, B, STANDARD);
    assert_eq!(u.granted.iter().map(|w| w.ticket).collect::<Vec<_>>(), [3], "then the next in line");
    let u = s.release(&c, 30, A, STANDARD);
    assert!(u.granted.is_empty());
    assert_eq!((s.active(), s.queued()), (0, 0));
}

#[test]
fn a_newcomer_does_not_overtake_a_waiter() {
    let c = cfg(1, 5);
    let mut s = BulkheadState::default();
    acquire(&mut s, &c, A, 1);
    acquire(&mut s, &c, B, 2);
    s.release(&c, 0, A, STANDARD); // goes to ticket 2
    assert_eq!(acquire(&mut s, &c, A, 3), Acquire::Queued, "the permit is taken by the waiter");
}

#[test]
fn a_waiter_that_withdraws_leaves_the_queue_and_gets_nothing_later() {
    let c = cfg(1, 5);
    let mut s = BulkheadState::default();
    acquire(&mut s, &c, A, 1);
    acquire(&mut s, &c, B, 2);
    let u = s.withdraw(&c, 5, B, 2);
    assert!(u.value && u.changed);
    assert_eq!(s.queued(), 0);
    assert!(s.release(&c, 6, A, STANDARD).granted.is_empty());
    assert_eq!(s.active(), 0);
}

#[test]
fn withdrawing_after_the_grant_reports_the_permit_is_held() {
    let c = cfg(1, 5);
    let mut s = BulkheadState::default();
    acquire(&mut s, &c, A, 1);
    acquire(&mut s, &c, B, 2);
    s.release(&c, 0, A, STANDARD);
    let u = s.withdraw(&c, 1, B, 2);
    assert!(!u.value && !u.changed, "not waiting: it holds a permit, to be released");
    assert_eq!(s.held_by(B), 1);
}

#[test]
fn releasing_a_permit_never_taken_changes_no_count() {
    let c = cfg(2, 0);
    let mut s = BulkheadState::default();
    acquire(&mut s, &c, A, 1);
    s.release(&c, 0, B, STANDARD);
    s.release(&c, 0, A, CRITICAL);
    assert_eq!(s.active(), 1);
}

#[test]
fn reserved_capacity_is_kept_for_its_class_while_others_flood() {
    let c = classes();
    let mut s = BulkheadState::default();
    // 5 permits, 2 reserved for critical: standard gets 3.
    for t in 0..3 {
        assert_eq!(s.acquire(&c, 0, A, STANDARD, t, false).value, Acquire::Admitted);
    }
    assert_eq!(s.acquire(&c, 0, A, STANDARD, 3, false).value, Acquire::Full, "4th standard eats the reserve");
    assert_eq!(s.acquire(&c, 0, B, CRITICAL, 4, false).value, Acquire::Admitted);
    assert_eq!(s.acquire(&c, 0, B, CRITICAL, 5, false).value, Acquire::Admitted);
    assert_eq!(s.acquire(&c, 0, B, CRITICAL, 6, false).value, Acquire::Full, "the limit binds critical too");
}

#[test]
fn critical_may_use_shared_capacity_beyond_its_reserve() {
    let c = classes();
    let mut s = BulkheadState::default();
    for t in 0..5 {
        assert_eq!(s.acquire(&c, 0, A, CRITICAL, t, false).value, Acquire::Admitted);
    }
    assert_eq!(s.active_of(usize::from(CRITICAL)), 5);
}

#[test]
fn background_never_exceeds_its_max() {
    let c = classes();
    let mut s = BulkheadState::default();
    assert_eq!(s.acquire(&c, 0, A, BACKGROUND, 1, true).value, Acquire::Admitted);
    assert_eq!(s.acquire(&c, 0, A, BACKGROUND, 2, true).value, Acquire::Queued, "max 1 though 4 are free");
    assert_eq!(s.active(), 1);
}

#[test]
fn a_waiter_its_class_blocks_does_not_block_a_later_waiter_that_fits() {
    let c = classes();
    let mut s = BulkheadState::default();
    s.acquire(&c, 0, A, BACKGROUND, 1, true);
    s.acquire(&c, 0, A, STANDARD, 2, true);
    // 2 in flight (1 background, 1 standard); standard may use one more before the reserve.
    assert_eq!(s.acquire(&c, 0, A, BACKGROUND, 4, true).value, Acquire::Queued);
    assert_eq!(s.acquire(&c, 0, B, STANDARD, 5, true).value, Acquire::Admitted, "background waiter is capped");
    assert_eq!(s.acquire(&c, 0, B, STANDARD, 6, true).value, Acquire::Queued, "now only the reserve is left");
    // A standard permit comes back: the standard waiter gets it, the capped background waiter cannot.
    let u = s.release(&c, 1, A, STANDARD);
    assert_eq!(u.granted.iter().map(|w| w.ticket).collect::<Vec<_>>(), [6]);
    // The background permit comes back: the background waiter is first in line.
    let u = s.release(&c, 2, A, BACKGROUND);
    assert_eq!(u.granted.iter().map(|w| w.ticket).collect::<Vec<_>>(), [4]);
}

#[test]
fn a_freed_reserved_permit_goes_to_a_waiting_critical_request_past_earlier_standard_waiters() {
    let c = classes();
    let mut s = BulkheadState::default();
    for t in 0..3 {
        s.acquire(&c, 0, A, STANDARD, t, true);
    }
    for t in 3..5 {
        s.acquire(&c, 0, A, CRITICAL, t, true);
    }
    assert_eq!(s.acquire(&c, 0, B, STANDARD, 5, true).value, Acquire::Queued);
    assert_eq!(s.acquire(&c, 0, B, CRITICAL, 6, true).value, Acquire::Queued);
    let u = s.release(&c, 1, A, CRITICAL);
    assert_eq!(u.granted.iter().map(|w| w.ticket).collect::<Vec<_>>(), [6], "reserved: not for standard");
}

#[test]
fn a_silent_workers_permits_are_reclaimed_after_stale_after_not_before() {
    let c = cfg(2, 5);
    let mut s = BulkheadState::default();
    s.acquire(&c, 0, A, STANDARD, 1, true);
    s.acquire(&c, 0, A, STANDARD, 2, true);
    assert_eq!(s.acquire(&c, c.stale_after_ns, B, STANDARD, 3, true).value, Acquire::Queued, "A still counts");
    // One nanosecond later A has been silent too long: its two permits are dropped, and the
    // waiter gets one of them.
    let u = s.renew(&c, c.stale_after_ns + 1, B);
    assert_eq!(u.granted.iter().map(|w| w.ticket).collect::<Vec<_>>(), [3]);
    assert_eq!(s.held_by(A), 0);
    assert_eq!(s.acquire(&c, c.stale_after_ns + 2, B, STANDARD, 4, true).value, Acquire::Admitted);
    assert_eq!(s.held_by(B), 2);
}

#[test]
fn renewing_keeps_a_live_workers_permits() {
    let c = cfg(1, 0);
    let mut s = BulkheadState::default();
    s.acquire(&c, 0, A, STANDARD, 1, false);
    let u = s.renew(&c, 9 * SECOND, A);
    assert!(u.changed);
    assert_eq!(s.acquire(&c, 15 * SECOND, B, STANDARD, 2, false).value, Acquire::Full);
}

#[test]
fn a_dead_workers_waiters_are_dropped_after_timeout_and_stale_after() {
    let c = cfg(1, 5);
    let mut s = BulkheadState::default();
    s.acquire(&c, 0, A, STANDARD, 1, true);
    s.acquire(&c, 0, B, STANDARD, 2, true);
    let deadline = c.queue_timeout_ns + c.stale_after_ns;
    // A stays alive (renews every second); B, the waiter's worker, has died.
    for t in 1..=deadline / SECOND {
        s.renew(&c, t * SECOND, A);
    }
    assert_eq!(s.queued(), 1, "at timeout + stale_after the waiter is still kept");
    s.renew(&c, deadline + MS, A);
    assert_eq!(s.queued(), 0);
}

#[test]
fn state_round_trips_through_bytes() {
    let c = classes();
    let mut s = BulkheadState::default();
    s.acquire(&c, 7, A, STANDARD, 1, true);
    s.acquire(&c, 8, B, CRITICAL, 2, true);
    for t in 3..8 {
        s.acquire(&c, 9, B, BACKGROUND, t, true);
    }
    let bytes = s.encode();
    assert_eq!(BulkheadState::decode(&bytes), Some(s.clone()));
    assert!(bytes.len() < 128, "{} bytes", bytes.len());
}

#[test]
fn bytes_it_did_not_write_decode_to_none() {
    let bytes = BulkheadState::default().encode();
    assert_eq!(BulkheadState::decode(&[]), None);
    assert_eq!(BulkheadState::decode(&[9]), None);
    assert_eq!(BulkheadState::decode(&bytes[..bytes.len() - 1]), None);
    let mut long = bytes.clone();
    long.push(0);
    assert_eq!(BulkheadState::decode(&long), None);
    assert_eq!(BulkheadState::decode(&[1, 0, 255, 255, 255, 255]), None, "a huge waiter count");
}
