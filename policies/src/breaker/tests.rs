//! Scenarios, in the style of sony/gobreaker's: what an operator would expect, step by step.

use super::*;
use crate::MS;

const FAIL: Outcome = Outcome { failure: true, slow: false };
const OK: Outcome = Outcome { failure: false, slow: false };
const SLOW: Outcome = Outcome { failure: false, slow: true };

fn consecutive(n: u32) -> BreakerConfig {
    BreakerConfig { consecutive_failures: n, open_for_ns: 30 * SECOND, ..BreakerConfig::default() }
}

fn run(b: &mut BreakerState, cfg: &BreakerConfig, now: u64, o: Outcome) -> Option<Transition> {
    let Admission::Allow { generation } = b.admit(cfg, now).value else { panic!("not allowed") };
    b.record(cfg, now, generation, o, 0).transition
}

/// Admits a probe and returns its generation.
fn probe(b: &mut BreakerState, cfg: &BreakerConfig, now: u64) -> u32 {
    match b.admit(cfg, now).value {
        Admission::Probe { generation } => generation,
        other => panic!("expected a probe, got {other:?}"),
    }
}

fn batch(b: &BreakerState, successes: u32, slow: u32, last_at: u64) -> Batch {
    Batch { generation: b.generation, successes, slow, last_at }
}

fn allowed(a: Admission) -> bool {
    matches!(a, Admission::Allow { .. })
}

fn open_breaker(cfg: &BreakerConfig, now: u64) -> BreakerState {
    let mut b = BreakerState::default();
    for _ in 0..cfg.consecutive_failures {
        run(&mut b, cfg, now, FAIL);
    }
    assert!(matches!(b.phase, Phase::Open { .. }));
    b
}

#[test]
fn fifth_failure_trips_with_consecutive_failures_5() {
    let cfg = consecutive(5);
    let mut b = BreakerState::default();
    for _ in 0..4 {
        assert_eq!(run(&mut b, &cfg, 0, FAIL), None);
    }
    assert_eq!(
        run(&mut b, &cfg, 0, FAIL),
        Some(Transition::Opened { reason: TripReason::ConsecutiveFailures(5), period_ns: 30 * SECOND })
    );
    assert_eq!(b.admit(&cfg, 0).value, Admission::Reject { retry_after_ns: 30 * SECOND });
}

#[test]
fn a_success_resets_the_consecutive_count() {
    let cfg = consecutive(3);
    let mut b = BreakerState::default();
    run(&mut b, &cfg, 0, FAIL);
    run(&mut b, &cfg, 0, FAIL);
    run(&mut b, &cfg, 0, OK);
    run(&mut b, &cfg, 0, FAIL);
    assert_eq!(run(&mut b, &cfg, 0, FAIL), None);
    assert_eq!(b.phase, Phase::Closed);
}

#[test]
fn open_for_minus_one_ms_is_still_open_and_then_a_probe_goes() {
    let cfg = consecutive(1);
    let mut b = open_breaker(&cfg, 0);
    assert_eq!(b.admit(&cfg, 30 * SECOND - MS).value, Admission::Reject { retry_after_ns: MS });
    let s = b.admit(&cfg, 30 * SECOND);
    assert!(matches!(s.value, Admission::Probe { .. }));
    assert_eq!(s.transition, Some(Transition::HalfOpened));
}

#[test]
fn half_open_lets_only_max_probes_through_at_a_time() {
    let cfg = BreakerConfig { max_probes: 2, successes_to_close: 2, ..consecutive(1) };
    let mut b = open_breaker(&cfg, 0);
    let t = 30 * SECOND;
    probe(&mut b, &cfg, t);
    probe(&mut b, &cfg, t);
    assert!(matches!(b.admit(&cfg, t).value, Admission::Reject { .. }));
    // One probe succeeds: its slot frees, but one success is not enough to close.
    assert_eq!(b.record(&cfg, t, b.generation, OK, 0).transition, None);
    probe(&mut b, &cfg, t);
    assert!(matches!(b.admit(&cfg, t).value, Admission::Reject { .. }));
    assert_eq!(b.record(&cfg, t, b.generation, OK, 0).transition, Some(Transition::Closed));
    assert!(allowed(b.admit(&cfg, t).value));
}

#[test]
fn a_failed_probe_reopens_for_double_the_period_with_jitter() {
    let cfg = BreakerConfig { max_open_for_ns: 100 * SECOND, ..consecutive(1) };
    let mut b = open_breaker(&cfg, 0);
    let t = 30 * SECOND;
    b.admit(&cfg, t);
    let Some(Transition::Opened { reason: TripReason::ProbeFailed, period_ns }) =
        b.record(&cfg, t, b.generation, FAIL, 12345).transition
    else {
        panic!("a failed probe must re-open the breaker");
    };
    assert!((54 * SECOND..=66 * SECOND).contains(&period_ns), "60 s ±10%, got {period_ns}");
    // And again: doubling stops at max_open_for.
    let t2 = t + period_ns;
    b.admit(&cfg, t2);
    b.record(&cfg, t2, b.generation, FAIL, 999);
    let t3 = t2 + 100 * SECOND;
    b.admit(&cfg, t3);
    let s = b.record(&cfg, t3, b.generation, FAIL, u64::MAX);
    assert_eq!(s.transition, Some(Transition::Opened { reason: TripReason::ProbeFailed, period_ns: 100 * SECOND }));
}

#[test]
fn closing_resets_the_period_so_the_next_trip_starts_at_open_for() {
    let cfg = consecutive(1);
    let mut b = open_breaker(&cfg, 0);
    b.admit(&cfg, 30 * SECOND);
    b.record(&cfg, 30 * SECOND, b.generation, OK, 0);
    assert_eq!(b.phase, Phase::Closed);
    let s = run(&mut b, &cfg, 31 * SECOND, FAIL);
    assert_eq!(s, Some(Transition::Opened { reason: TripReason::ConsecutiveFailures(1), period_ns: 30 * SECOND }));
}

#[test]
fn a_released_probe_gives_its_slot_back() {
    let cfg = consecutive(1);
    let mut b = open_breaker(&cfg, 0);
    probe(&mut b, &cfg, 30 * SECOND);
    assert!(matches!(b.admit(&cfg, 30 * SECOND).value, Admission::Reject { .. }));
    assert!(b.release_probe(b.generation));
    probe(&mut b, &cfg, 30 * SECOND);
}

#[test]
fn a_lost_probe_is_reclaimed_after_probe_timeout() {
    let cfg = BreakerConfig { probe_timeout_ns: 5 * SECOND, ..consecutive(1) };
    let mut b = open_breaker(&cfg, 0);
    let t = 30 * SECOND;
    probe(&mut b, &cfg, t);
    assert!(matches!(b.admit(&cfg, t + 5 * SECOND - MS).value, Admission::Reject { .. }));
    probe(&mut b, &cfg, t + 5 * SECOND);
}

#[test]
fn outcomes_from_before_the_trip_are_stale() {
    let cfg = consecutive(1);
    let closed = BreakerState::default().generation;
    let mut b = open_breaker(&cfg, 0);
    let s = b.record(&cfg, MS, closed, OK, 0);
    assert_eq!((s.value, s.changed), (Recorded::Stale, false));
    probe(&mut b, &cfg, 30 * SECOND);
    // A straggler admitted while closed cannot close a half-open breaker.
    assert_eq!(b.record(&cfg, 30 * SECOND, closed, OK, 0).transition, None);
    assert!(matches!(b.phase, Phase::HalfOpen { probes: 1, .. }));
}

#[test]
fn a_call_from_an_earlier_closed_period_cannot_re_trip_the_next_one() {
    // Admitted while closed, it finishes after the breaker opened and closed again.
    let cfg = consecutive(2);
    let mut b = BreakerState::default();
    let Admission::Allow { generation: straggler } = b.admit(&cfg, 0).value else { panic!() };
    run(&mut b, &cfg, 0, FAIL);
    run(&mut b, &cfg, 0, FAIL);
    let g = probe(&mut b, &cfg, 30 * SECOND);
    assert_eq!(b.record(&cfg, 30 * SECOND, g, OK, 0).transition, Some(Transition::Closed));
    run(&mut b, &cfg, 31 * SECOND, FAIL);
    // Without generations this failure would be the second in a row and re-trip.
    let s = b.record(&cfg, 31 * SECOND, straggler, FAIL, 0);
    assert_eq!((s.value, s.transition), (Recorded::Stale, None));
    assert_eq!(b.phase, Phase::Closed);
    assert_eq!(b.consecutive_failures, 1);
    // Its batch of successes is stale too.
    let old = Batch { generation: straggler, successes: 5, slow: 0, last_at: 32 * SECOND };
    assert_eq!(b.record_successes(&cfg, 32 * SECOND, old).value, Recorded::Stale);
    assert_eq!(b.consecutive_failures, 1);
}

#[test]
fn a_slow_probe_reopens_a_breaker_that_judges_slowness() {
    // slow_call {duration: 200ms, threshold: 50, minimum_requests: 4}, open_for 1s.
    let cfg = BreakerConfig {
        consecutive_failures: 0,
        slow_call: Some(SlowRule { duration_ns: 200 * MS, threshold: 50, minimum_requests: 4 }),
        open_for_ns: SECOND,
        ..BreakerConfig::default()
    };
    let mut b = BreakerState::default();
    for _ in 0..3 {
        assert_eq!(run(&mut b, &cfg, 0, SLOW), None);
    }
    assert!(matches!(run(&mut b, &cfg, 0, SLOW), Some(Transition::Opened { .. })));
    let g = probe(&mut b, &cfg, SECOND);
    let s = b.record(&cfg, SECOND + 400 * MS, g, SLOW, 0);
    assert!(
        matches!(s.transition, Some(Transition::Opened { reason: TripReason::ProbeSlow, .. })),
        "a slow probe must not close it: {s:?}"
    );
    // A fast probe then closes it.
    let until = match b.phase {
        Phase::Open { until } => until,
        other => panic!("{other:?}"),
    };
    let g = probe(&mut b, &cfg, until);
    assert_eq!(b.record(&cfg, until, g, OK, 0).transition, Some(Transition::Closed));
}

#[test]
fn a_slow_probe_is_a_success_when_slowness_is_not_judged() {
    let cfg = consecutive(1);
    let mut b = open_breaker(&cfg, 0);
    let g = probe(&mut b, &cfg, 30 * SECOND);
    assert_eq!(b.record(&cfg, 30 * SECOND, g, SLOW, 0).transition, Some(Transition::Closed));
}

#[test]
fn a_probe_of_an_earlier_half_open_period_frees_no_slot() {
    let cfg = BreakerConfig { max_probes: 2, ..consecutive(1) };
    let mut b = open_breaker(&cfg, 0);
    let old = probe(&mut b, &cfg, 30 * SECOND);
    let other = probe(&mut b, &cfg, 30 * SECOND);
    b.record(&cfg, 30 * SECOND, other, FAIL, 0); // re-opens: a new generation
    assert!(!b.release_probe(old));
}

#[test]
fn forced_open_rejects_everything_and_release_starts_fresh() {
    let cfg = consecutive(2);
    let mut b = BreakerState::default();
    run(&mut b, &cfg, 0, FAIL);
    let Admission::Allow { generation: before } = b.admit(&cfg, 0).value else { panic!() };
    assert_eq!(b.force(Some(Forced::Open)).transition, Some(Transition::Forced(Some(Forced::Open))));
    assert!(matches!(b.admit(&cfg, 0).value, Admission::Reject { .. }));
    assert!(matches!(b.admit(&cfg, 100 * SECOND).value, Admission::Reject { .. }), "no open period ends it");
    assert_eq!(b.record(&cfg, 0, before, FAIL, 0).value, Recorded::Stale);
    assert!(!b.force(Some(Forced::Open)).changed, "forcing twice changes nothing");
    assert_eq!(b.force(None).transition, Some(Transition::Forced(None)));
    assert_eq!(b.phase, Phase::Closed);
    assert_eq!(b.consecutive_failures, 0, "released to a fresh closed breaker");
    assert!(allowed(b.admit(&cfg, 0).value));
}

#[test]
fn forced_closed_allows_everything_and_records_nothing() {
    let cfg = consecutive(1);
    let mut b = open_breaker(&cfg, 0);
    b.force(Some(Forced::Closed));
    let Admission::Allow { generation } = b.admit(&cfg, MS).value else { panic!("forced closed allows") };
    assert_eq!(b.record(&cfg, MS, generation, FAIL, 0).value, Recorded::Stale);
    assert!(allowed(b.admit(&cfg, 2 * MS).value));
    let forced = b.clone();
    assert_eq!(BreakerState::decode(&forced.encode()), Some(forced));
}

fn rate(threshold: u8, minimum_requests: u32) -> BreakerConfig {
    BreakerConfig {
        consecutive_failures: 0,
        failure_rate: Some(RateRule { threshold, minimum_requests }),
        ..BreakerConfig::default()
    }
}

#[test]
fn failure_rate_waits_for_minimum_requests() {
    let cfg = rate(50, 20);
    let mut b = BreakerState::default();
    // Alternate: 50% failures, but only the 20th call reaches minimum_requests.
    for i in 0..19 {
        assert_eq!(run(&mut b, &cfg, i * MS, if i % 2 == 0 { FAIL } else { OK }), None, "call {i}");
    }
    assert_eq!(
        run(&mut b, &cfg, 19 * MS, OK),
        Some(Transition::Opened {
            reason: TripReason::FailureRate { percent: 50, requests: 20 },
            period_ns: 30 * SECOND
        })
    );
}

#[test]
fn failure_rate_below_threshold_does_not_trip() {
    let cfg = rate(50, 10);
    let mut b = BreakerState::default();
    for i in 0..100 {
        // 1 failure in 3 = 33%.
        assert_eq!(run(&mut b, &cfg, i * MS, if i % 3 == 0 { FAIL } else { OK }), None);
    }
}

#[test]
fn failures_that_slid_out_of_the_window_do_not_count() {
    let cfg = rate(50, 4);
    let mut b = BreakerState::default();
    run(&mut b, &cfg, 0, FAIL);
    run(&mut b, &cfg, 0, FAIL);
    run(&mut b, &cfg, 0, FAIL);
    // 10 s later those three are gone: 1 failure of 4 is 25%.
    for o in [FAIL, OK, OK] {
        assert_eq!(run(&mut b, &cfg, 10 * SECOND, o), None);
    }
    assert_eq!(run(&mut b, &cfg, 10 * SECOND, OK), None);
}

#[test]
fn slow_calls_trip_on_their_own_rate() {
    let cfg = BreakerConfig {
        consecutive_failures: 0,
        slow_call: Some(SlowRule { duration_ns: 500 * MS, threshold: 80, minimum_requests: 5 }),
        ..BreakerConfig::default()
    };
    let mut b = BreakerState::default();
    run(&mut b, &cfg, 0, OK);
    for _ in 0..3 {
        assert_eq!(run(&mut b, &cfg, 0, SLOW), None);
    }
    // 4 slow of 5 = 80%.
    assert_eq!(
        run(&mut b, &cfg, 0, SLOW),
        Some(Transition::Opened { reason: TripReason::SlowCalls { percent: 80, requests: 5 }, period_ns: 30 * SECOND })
    );
}

#[test]
fn state_round_trips_through_bytes_in_every_phase() {
    let cfg = BreakerConfig { failure_rate: Some(RateRule { threshold: 90, minimum_requests: 100 }), ..consecutive(3) };
    let mut b = BreakerState::default();
    run(&mut b, &cfg, 0, FAIL);
    run(&mut b, &cfg, SECOND, OK);
    assert_eq!(BreakerState::decode(&b.encode()), Some(b.clone()));
    let mut open = open_breaker(&cfg, 0);
    assert_eq!(BreakerState::decode(&open.encode()), Some(open.clone()));
    open.admit(&cfg, 30 * SECOND);
    assert_eq!(BreakerState::decode(&open.encode()), Some(open.clone()));
    assert!(open.encode().len() < 64, "state must stay compact");
}

#[test]
fn foreign_or_truncated_bytes_decode_to_none() {
    let b = open_breaker(&consecutive(1), 0).encode();
    assert_eq!(BreakerState::decode(&[]), None);
    assert_eq!(BreakerState::decode(&b[..b.len() - 1]), None);
    let mut other_version = b.clone();
    other_version[0] = 99;
    assert_eq!(BreakerState::decode(&other_version), None);
    let mut trailing = b;
    trailing.push(0);
    assert_eq!(BreakerState::decode(&trailing), None);
}

#[test]
fn changing_the_window_length_starts_a_fresh_window() {
    let mut cfg = rate(50, 2);
    let mut b = BreakerState::default();
    run(&mut b, &cfg, 0, FAIL);
    cfg.window_ns = 20 * SECOND;
    // The old failure was kept in 1 s buckets; with 2 s buckets it is dropped, so 1 of 1 → not yet 2 requests.
    assert_eq!(run(&mut b, &cfg, 0, FAIL), None);
    assert_eq!(b.window.totals(0, 2 * SECOND).total, 1);
}

#[test]
fn a_success_with_nothing_to_count_needs_no_write() {
    let cfg = consecutive(5);
    let mut b = BreakerState::default();
    assert!(!b.admit(&cfg, 0).changed);
    assert!(!b.record(&cfg, 0, b.generation, OK, 0).changed);
    assert!(b.record(&cfg, 0, b.generation, FAIL, 0).changed);
}

#[test]
fn a_batch_of_successes_resets_the_consecutive_count() {
    let cfg = consecutive(3);
    let mut b = BreakerState::default();
    run(&mut b, &cfg, 0, FAIL);
    run(&mut b, &cfg, 0, FAIL);
    assert!(b.record_successes(&cfg, 0, batch(&b, 10, 0, 0)).changed);
    assert_eq!(run(&mut b, &cfg, 0, FAIL), None);
    // Nothing to reset and no window: no write needed.
    let fresh = BreakerState::default();
    assert!(!BreakerState::default().record_successes(&cfg, 0, batch(&fresh, 10, 0, 0)).changed);
}

#[test]
fn a_batch_of_slow_successes_can_trip_on_the_slow_call_rate() {
    let cfg = BreakerConfig {
        consecutive_failures: 0,
        slow_call: Some(SlowRule { duration_ns: 500 * MS, threshold: 50, minimum_requests: 10 }),
        ..BreakerConfig::default()
    };
    let mut b = BreakerState::default();
    assert_eq!(b.record_successes(&cfg, 0, batch(&b, 9, 9, 0)).transition, None, "below minimum_requests");
    let s = b.record_successes(&cfg, 0, batch(&b, 1, 0, 0));
    assert_eq!(
        s.transition,
        Some(Transition::Opened {
            reason: TripReason::SlowCalls { percent: 90, requests: 10 },
            period_ns: 30 * SECOND
        })
    );
}

#[test]
fn successes_reported_after_a_trip_are_ignored() {
    let cfg = consecutive(1);
    let mut b = open_breaker(&cfg, 0);
    assert!(!b.record_successes(&cfg, MS, batch(&b, 100, 0, MS)).changed);
    assert!(matches!(b.phase, Phase::Open { .. }));
}

#[test]
fn successes_reported_late_count_only_against_the_failures_before_them() {
    let cfg = consecutive(3);
    let mut b = BreakerState::default();
    run(&mut b, &cfg, 10 * MS, FAIL);
    run(&mut b, &cfg, 20 * MS, FAIL);
    // Another worker's success at 15 ms arrives now: only the failure at 20 ms is after it.
    b.record_successes(&cfg, 25 * MS, batch(&b, 4, 0, 15 * MS));
    assert_eq!(b.consecutive_failures, 1);
    assert_eq!(run(&mut b, &cfg, 30 * MS, FAIL), None);
    assert!(run(&mut b, &cfg, 40 * MS, FAIL).is_some(), "20, 30, 40 ms: three in a row");
}

#[test]
fn a_success_reported_after_the_failures_ends_the_run() {
    let cfg = consecutive(3);
    let mut b = BreakerState::default();
    run(&mut b, &cfg, 10 * MS, FAIL);
    run(&mut b, &cfg, 20 * MS, FAIL);
    b.record_successes(&cfg, 25 * MS, batch(&b, 1, 0, 21 * MS));
    assert_eq!(b.consecutive_failures, 0);
}

#[test]
fn a_late_success_older_than_every_kept_failure_leaves_a_long_run_alone() {
    let cfg = consecutive(100);
    let mut b = BreakerState::default();
    for i in 0..40 {
        run(&mut b, &cfg, (10 + i) * MS, FAIL);
    }
    // Kept: the latest 32 (18..=49 ms). A success at 12 ms fell among the dropped ones.
    b.record_successes(&cfg, 50 * MS, batch(&b, 1, 0, 12 * MS));
    assert_eq!(b.consecutive_failures, 40);
    // A success at 20 ms: 29 kept failures came after it.
    b.record_successes(&cfg, 50 * MS, batch(&b, 1, 0, 20 * MS));
    assert_eq!(b.consecutive_failures, 29);
}

fn rate_confirmed_after(confirm_ns: u64) -> BreakerConfig {
    BreakerConfig { confirm_ns, ..rate(50, 4) }
}

#[test]
fn a_rate_trip_waits_for_confirmation_so_batched_successes_can_arrive() {
    let cfg = rate_confirmed_after(100 * MS);
    let mut b = BreakerState::default();
    for t in [0, 1, 2, 3] {
        assert_eq!(run(&mut b, &cfg, t * MS, FAIL), None);
    }
    assert_eq!(b.suspect_since, Some(3 * MS));
    // Another worker's batch lands within the confirmation time: 4 of 9 is under 50%.
    b.record_successes(&cfg, 50 * MS, batch(&b, 5, 0, 40 * MS));
    assert_eq!(b.suspect_since, None);
    assert_eq!(b.confirm(&cfg, 200 * MS).transition, None);
    assert_eq!(b.phase, Phase::Closed);
}

#[test]
fn a_suspect_breaker_trips_when_the_rate_still_holds_after_confirmation() {
    let cfg = rate_confirmed_after(100 * MS);
    let mut b = BreakerState::default();
    for t in [0, 1, 2, 3] {
        run(&mut b, &cfg, t * MS, FAIL);
    }
    assert_eq!(b.confirm(&cfg, 103 * MS - 1).transition, None, "confirmation time − 1 ns: still suspect");
    assert!(matches!(
        b.confirm(&cfg, 103 * MS).transition,
        Some(Transition::Opened { reason: TripReason::FailureRate { percent: 100, requests: 4 }, .. })
    ));
}

#[test]
fn admission_confirms_a_suspect_breaker_and_rejects_at_once() {
    let cfg = rate_confirmed_after(100 * MS);
    let mut b = BreakerState::default();
    for t in [0, 1, 2, 3] {
        run(&mut b, &cfg, t * MS, FAIL);
    }
    assert!(allowed(b.admit(&cfg, 50 * MS).value));
    let s = b.admit(&cfg, 103 * MS);
    assert!(matches!(s.value, Admission::Reject { .. }));
    assert!(matches!(s.transition, Some(Transition::Opened { .. })));
}

#[test]
fn a_suspect_state_round_trips_through_bytes() {
    let cfg = rate_confirmed_after(100 * MS);
    let mut b = BreakerState::default();
    for t in [0, 1, 2, 3] {
        run(&mut b, &cfg, t * MS, FAIL);
    }
    assert_eq!(BreakerState::decode(&b.encode()), Some(b));
}

#[test]
fn the_open_period_ends_on_time_without_traffic_and_the_next_call_probes() {
    let cfg = consecutive(1);
    let mut b = open_breaker(&cfg, 0);
    assert_eq!(b.expire(30 * SECOND - 1).transition, None, "open_for − 1ns: still open");
    assert_eq!(b.expire(30 * SECOND).transition, Some(Transition::HalfOpened));
    assert!(matches!(b.phase, Phase::HalfOpen { probes: 0, .. }));
    let s = b.admit(&cfg, 31 * SECOND);
    assert!(matches!(s.value, Admission::Probe { .. }));
    assert_eq!(s.transition, None, "already half-open");
    assert!(!b.expire(40 * SECOND).changed, "only an open breaker expires");
}
