//! The retry budget as scenarios: ratio 0.2, 10 retries/s reserve, ttl 10 s (1 s buckets).

use super::*;
use crate::{MS, SECOND};
use alloc::vec::Vec;

fn cfg() -> BudgetConfig {
    BudgetConfig::default()
}

#[test]
fn a_fresh_budget_holds_the_reserve_min_per_second_times_ttl() {
    assert_eq!(BudgetState::default().available(&cfg(), 0), 100);
}

#[test]
fn each_request_deposits_ratio_of_a_retry() {
    let mut s = BudgetState::default();
    s.deposit(&cfg(), 0, 1000);
    assert_eq!(s.available(&cfg(), 0), 100 + 200);
    s.deposit(&cfg(), 0, 4);
    assert_eq!(s.available(&cfg(), 0), 300, "4 × 0.2 = 0.8: not yet a whole retry");
    s.deposit(&cfg(), 0, 1);
    assert_eq!(s.available(&cfg(), 0), 301);
}

#[test]
fn withdrawals_never_overdraw_however_many_ask_at_once() {
    let mut s = BudgetState::default();
    let mut granted = 0;
    for _ in 0..64 {
        granted += s.withdraw(&cfg(), 5 * MS, 3).0;
    }
    assert_eq!(granted, 100, "64 requests wanting 3 retries each share the 100 of the reserve");
    assert_eq!(s.withdraw(&cfg(), 6 * MS, 3).0, 0);
}

#[test]
fn unused_retries_are_refunded_into_the_bucket_they_came_from() {
    let mut s = BudgetState::default();
    let (got, epoch) = s.withdraw(&cfg(), 0, 3);
    assert_eq!((got, s.available(&cfg(), 0)), (3, 97));
    s.refund(epoch, 2);
    assert_eq!(s.available(&cfg(), 500 * MS), 99, "one retry was used");
}

#[test]
fn a_refund_for_a_bucket_that_left_the_ring_changes_nothing() {
    let mut s = BudgetState::default();
    let (_, old) = s.withdraw(&cfg(), 0, 50);
    s.withdraw(&cfg(), 11 * SECOND, 10);
    s.refund(old, 50);
    assert_eq!(s.available(&cfg(), 11 * SECOND), 90);
}

#[test]
fn the_budget_recovers_after_ttl() {
    let mut s = BudgetState::default();
    assert_eq!(s.withdraw(&cfg(), 0, 1000).0, 100);
    assert_eq!(s.available(&cfg(), 10 * SECOND - 1), 0, "withdrawals count one bucket longer: 11 s");
    assert_eq!(s.available(&cfg(), 11 * SECOND - 1), 0);
    assert_eq!(s.available(&cfg(), 11 * SECOND), 100);
}

#[test]
fn deposits_leave_the_window_one_bucket_before_withdrawals() {
    let mut s = BudgetState::default();
    s.deposit(&cfg(), 0, 1000); // +200
    assert_eq!(s.withdraw(&cfg(), 0, 250).0, 250);
    assert_eq!(s.available(&cfg(), 9 * SECOND), 50);
    // At 10 s the deposits are gone but the 250 withdrawals still count: nothing available.
    assert_eq!(s.available(&cfg(), 10 * SECOND), 0);
    assert_eq!(s.available(&cfg(), 11 * SECOND), 100);
}

#[test]
fn a_dry_runs_extra_retries_are_recorded_as_withdrawn() {
    let mut s = BudgetState::default();
    s.overdraw(&cfg(), 0, 130);
    assert_eq!(s.available(&cfg(), 0), 0);
}

#[test]
fn over_any_trailing_ttl_withdrawals_stay_within_ratio_times_deposits_plus_the_reserve() {
    // A steady 50 requests/s, each wanting 3 retries, for 60 s; check the bound at every step.
    let c = cfg();
    let mut s = BudgetState::default();
    let mut log: Vec<(u64, u32, u32)> = Vec::new(); // (time, deposits, withdrawals)
    for step in 0..3000u64 {
        let now = step * 20 * MS;
        s.deposit(&c, now, 1);
        let (got, _) = s.withdraw(&c, now, 3);
        log.push((now, 1, got));
        let since = now.saturating_sub(c.ttl_ns);
        let window = log.iter().filter(|(t, _, _)| *t > since || (since == 0 && *t == 0));
        let (d, w) = window.fold((0u64, 0u64), |(d, w), (_, dd, ww)| (d + u64::from(*dd), w + u64::from(*ww)));
        assert!(w * 1000 <= d * 200 + 100 * 1000, "at {now}: {w} retries over {d} requests");
    }
}

#[test]
fn state_round_trips_through_bytes_and_refuses_what_it_did_not_write() {
    let mut s = BudgetState::default();
    for i in 0..30 {
        s.deposit(&cfg(), i * 700 * MS, 7);
        s.withdraw(&cfg(), i * 700 * MS, 1);
    }
    let bytes = s.encode();
    assert_eq!(BudgetState::decode(&bytes), Some(s));
    assert!(bytes.len() <= 2 + 11 * 17);
    assert_eq!(BudgetState::decode(&bytes[..bytes.len() - 1]), None);
    assert_eq!(BudgetState::decode(&[9]), None);
    assert_eq!(BudgetState::decode(&[1, 1, 11, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0]), None, "slot 11");
}
