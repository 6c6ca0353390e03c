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
            ClassLimit { reserved: 2, ..ClassLimit::default() },
            ClassLimit { max: Some(1), ..ClassLimit::default() },
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
    assert_eq!(u.granted, alloc::vec![Waiter { worker: B, ticket: 2, class: STANDARD, since: 0, recall_only: false }]);
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
    assert!(bytes.len() < 144, "{} bytes", bytes.len());
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

// Leases.

fn ask(worker: u32, ticket: u32, may_wait: bool) -> Ask {
    Ask { worker, class: STANDARD, ticket, may_wait, may_pause: true, lease: true }
}

fn leasing(s: &mut BulkheadState, c: &BulkheadConfig, worker: u32, ticket: u32) -> Acquire {
    s.ask(c, 0, ask(worker, ticket, true)).value
}

#[test]
fn far_from_full_a_worker_takes_a_lease_of_a_quarter_of_the_room_below_half() {
    let c = cfg(100, 0);
    let mut s = BulkheadState::default();
    assert_eq!(leasing(&mut s, &c, A, 1), Acquire::Leased(12), "room below half 50, a quarter");
    assert_eq!(leasing(&mut s, &c, B, 2), Acquire::Leased(9), "(50 - 12) / 4");
    assert_eq!((s.active(), s.leased(), s.lease_of(A)), (21, 21, 12));
}

#[test]
fn no_lease_past_half_full_nor_while_anyone_waits_nor_with_classes() {
    let c = cfg(4, 2);
    let mut s = BulkheadState::default();
    assert_eq!(leasing(&mut s, &c, A, 1), Acquire::Leased(1), "a quarter of 2, at least 1");
    assert_eq!(leasing(&mut s, &c, A, 2), Acquire::Leased(1));
    assert_eq!(leasing(&mut s, &c, A, 3), Acquire::Admitted, "half full: one by one");
    assert_eq!(leasing(&mut s, &c, B, 4), Acquire::Admitted, "4 of 4");
    assert!(matches!(leasing(&mut s, &c, B, 5), Acquire::Recalling { .. }), "full: A's lease may idle");
    s.trim_lease(&c, 0, A, 2, true);
    assert_eq!(leasing(&mut s, &c, B, 6), Acquire::Queued);
    s.release(&c, 0, B, STANDARD);
    assert_eq!(leasing(&mut s, &c, B, 7), Acquire::Queued, "someone waits: no lease, no overtaking");
    let mut p = BulkheadState::default();
    assert_eq!(p.ask(&classes(), 0, ask(A, 1, true)).value, Acquire::Admitted, "classes: never leased");
}

#[test]
fn a_request_that_finds_only_idle_leases_waits_for_a_recall_and_gets_the_permit() {
    // 4 permits. Worker A leased 2 earlier; they are idle now. Worker B takes the other 2.
    let c = cfg(4, 0);
    let mut s = BulkheadState::default();
    assert_eq!(leasing(&mut s, &c, A, 1), Acquire::Leased(1));
    assert_eq!(leasing(&mut s, &c, A, 2), Acquire::Leased(1));
    assert_eq!(leasing(&mut s, &c, B, 3), Acquire::Admitted);
    assert_eq!(leasing(&mut s, &c, B, 4), Acquire::Admitted);
    // B's third request: no permit free, no queue, yet only 2 are really in flight.
    assert_eq!(leasing(&mut s, &c, B, 5), Acquire::Recalling { workers: alloc::vec![A], recall_only: true });
    assert_eq!(s.queued(), 1);
    // A answers the recall: both its permits are idle.
    let u = s.trim_lease(&c, MS, A, 0, false);
    assert_eq!(u.granted.iter().map(|w| w.ticket).collect::<Vec<_>>(), [5]);
    assert!(u.refused.is_empty());
    assert_eq!((s.active(), s.lease_of(A), s.held_by(B)), (3, 0, 3));
}

#[test]
fn a_recall_only_waiter_is_refused_once_no_lease_may_hold_an_idle_permit() {
    let c = cfg(2, 0);
    let mut s = BulkheadState::default();
    assert_eq!(leasing(&mut s, &c, A, 1), Acquire::Leased(1));
    assert_eq!(leasing(&mut s, &c, B, 2), Acquire::Admitted);
    assert_eq!(leasing(&mut s, &c, B, 3), Acquire::Recalling { workers: alloc::vec![A], recall_only: true });
    // A's one leased permit is in use: it keeps it, draining.
    let u = s.trim_lease(&c, MS, A, 1, true);
    assert!(u.granted.is_empty());
    assert_eq!(u.refused.iter().map(|w| w.ticket).collect::<Vec<_>>(), [3], "really full: refused");
    assert_eq!(s.queued(), 0);
    // A draining lease is never recalled.
    assert_eq!(leasing(&mut s, &c, B, 4), Acquire::Full);
}

#[test]
fn a_recalled_request_with_room_in_the_queue_stays_queued_when_nothing_was_idle() {
    let c = cfg(2, 5);
    let mut s = BulkheadState::default();
    leasing(&mut s, &c, A, 1);
    leasing(&mut s, &c, B, 2);
    assert_eq!(leasing(&mut s, &c, B, 3), Acquire::Recalling { workers: alloc::vec![A], recall_only: false });
    let u = s.trim_lease(&c, MS, A, 1, true);
    assert!(u.granted.is_empty() && u.refused.is_empty());
    assert_eq!(s.queued(), 1, "a queued waiter keeps waiting for a permit");
    // A's leased request ends: the drained permit goes to the waiter.
    let u = s.trim_lease(&c, 2 * MS, A, 0, true);
    assert_eq!(u.granted.iter().map(|w| w.ticket).collect::<Vec<_>>(), [3]);
}

#[test]
fn the_limit_holds_with_leases_whatever_the_order() {
    // Every interleaving of three workers taking, recalling and returning leases keeps the
    // count within max_concurrent.
    let c = cfg(6, 3);
    let mut s = BulkheadState::default();
    let mut seed = 0x1234_5678_u64;
    for step in 0..5_000u64 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let worker = 1 + (seed % 3) as u32;
        let now = step * MS;
        match (seed >> 8) % 4 {
            0 | 1 => {
                s.ask(&c, now, ask(worker, step as u32, true));
            }
            2 => {
                let keep = s.lease_of(worker).saturating_sub(1);
                s.trim_lease(&c, now, worker, keep, false);
            }
            _ => {
                s.release(&c, now, worker, STANDARD);
            }
        }
        assert!(s.active() <= c.max_concurrent, "step {step}: {} taken of {}", s.active(), c.max_concurrent);
        // Nobody waits while a permit is free.
        assert!(s.queued() == 0 || !s.admissible(&c, 0), "step {step}: a waiter could be admitted");
    }
}

#[test]
fn a_dead_workers_lease_is_reclaimed_after_stale_after() {
    let c = cfg(4, 2);
    let mut s = BulkheadState::default();
    leasing(&mut s, &c, A, 1);
    leasing(&mut s, &c, A, 2);
    assert_eq!(s.lease_of(A), 2);
    s.renew(&c, c.stale_after_ns + 1, B);
    assert_eq!((s.lease_of(A), s.active()), (0, 0));
}

#[test]
fn leases_round_trip_through_bytes() {
    let c = cfg(8, 4);
    let mut s = BulkheadState::default();
    leasing(&mut s, &c, A, 1);
    s.trim_lease(&c, 0, A, 1, true);
    s.acquire(&c, 0, B, STANDARD, 2, true);
    assert_eq!(BulkheadState::decode(&s.encode()), Some(s));
}

#[test]
fn a_dead_workers_waiters_go_with_its_permits_so_nothing_is_granted_to_a_dead_worker() {
    let c = cfg(1, 5);
    let mut s = BulkheadState::default();
    acquire(&mut s, &c, A, 1); // A's VM holds the permit…
    s.acquire(&c, MS, A, STANDARD, 2, true); // …and has a waiter; then it dies.
    s.acquire(&c, 2 * MS, B, STANDARD, 3, true);
    let u = s.renew(&c, c.stale_after_ns + 1, B);
    assert_eq!(u.granted.iter().map(|w| (w.worker, w.ticket)).collect::<Vec<_>>(), [(B, 3)], "not A's waiter");
    assert_eq!((s.held_by(A), s.held_by(B), s.queued()), (0, 1, 0));
}
