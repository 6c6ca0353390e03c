//! Inputs the state-decoder fuzzer (`decode_fuzz.rs`) found, kept as scenarios. Most are states
//! no sequence of operations makes, read from shared data that another version of the plugin (or
//! anything else) wrote: the state machines must carry on with them, never panic or lose count.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use breakwater_policies::{
    Acquire, BreakerConfig, BreakerState, BulkheadConfig, BulkheadState, ClassLimit, Outcome, Transition, SECOND,
};

/// A half-open breaker as version 3 writes it: generation 7, not forced, `probes` in flight,
/// `successes` so far, last probe at 5 ns; no failures, no window; `period` the last open period.
fn half_open(probes: u32, successes: u32, period: u64) -> BreakerState {
    let bytes = [
        &[3u8][..],
        &7u32.to_le_bytes(),
        &[0, 2],
        &probes.to_le_bytes(),
        &successes.to_le_bytes(),
        &5u64.to_le_bytes(),
        &0u32.to_le_bytes(),
        &[0, 0],
        &period.to_le_bytes(),
        &0u64.to_le_bytes(),
        &[0],
    ]
    .concat();
    BreakerState::decode(&bytes).expect("a valid encoding")
}

#[test]
fn a_half_open_breaker_read_with_successes_at_u32_max_closes_on_a_success_without_overflow() {
    let cfg = BreakerConfig { successes_to_close: 1000, ..BreakerConfig::default() };
    let mut s = half_open(1, u32::MAX, 0);
    let step = s.record(&cfg, 10, 7, Outcome::default(), 0);
    assert_eq!(step.transition, Some(Transition::Closed));
}

#[test]
fn a_probe_failing_after_an_open_period_near_u64_max_reopens_for_max_open_for() {
    let cfg = BreakerConfig::default();
    // A period this long doubles to just under u64::MAX; with this jitter it went past.
    let mut s = half_open(1, 0, 0x7af5_2159_9ffe_3067);
    let step = s.record(&cfg, 10, 7, Outcome { failure: true, slow: false }, 2_498_699_954_375_102_278);
    match step.transition {
        Some(Transition::Opened { period_ns, .. }) => assert_eq!(period_ns, cfg.max_open_for_ns),
        other => panic!("expected a re-open, got {other:?}"),
    }
}

/// A bulkhead state as version 3 writes it: no holders, one waiter (worker 2, ticket 9) of
/// `class`, since 0, in the queue; no adaptive limiter.
fn one_waiter(class: u8) -> BulkheadState {
    let bytes = [
        &[3u8, 0][..],
        &1u32.to_le_bytes(),
        &2u32.to_le_bytes(),
        &9u32.to_le_bytes(),
        &[class],
        &0u64.to_le_bytes(),
        &[0],
        &[0],
    ]
    .concat();
    BulkheadState::decode(&bytes).expect("a valid encoding")
}

#[test]
fn a_waiter_read_with_class_255_is_never_handed_a_permit() {
    // Class 255 made a holder count permits for 256 classes, and the encoding (a count byte)
    // dropped the last one: a permit taken and lost, the limit exceeded by one.
    let cfg = BulkheadConfig { max_concurrent: 3, ..BulkheadConfig::default() };
    let mut s = one_waiter(255);
    let u = s.release(&cfg, SECOND, 1, 0);
    assert!(u.granted.is_empty(), "granted {:?}", u.granted);
    assert_eq!(s.active(), 0);
    assert_eq!(s.acquire(&cfg, SECOND, 1, 255, 1, false).value, Acquire::Full);
    assert_eq!(BulkheadState::decode(&s.encode()), Some(s));
}

#[test]
fn a_waiter_of_a_class_the_configuration_no_longer_has_still_gets_a_permit() {
    // After a reload with fewer classes: it is admitted under no limits of its own.
    let cfg = BulkheadConfig { max_concurrent: 3, ..BulkheadConfig::default() };
    let mut s = one_waiter(2);
    let u = s.release(&cfg, SECOND, 1, 0);
    assert_eq!(u.granted.iter().map(|w| (w.worker, w.ticket)).collect::<Vec<_>>(), [(2, 9)]);
    assert_eq!(s.active_of(2), 1);
    assert_eq!(BulkheadState::decode(&s.encode()), Some(s));
}

#[test]
fn a_single_class_with_a_max_of_its_own_is_never_leased_past_it() {
    let cfg = BulkheadConfig {
        max_concurrent: 100,
        classes: vec![ClassLimit { max: Some(2), ..ClassLimit::default() }],
        ..BulkheadConfig::default()
    };
    let mut s = BulkheadState::default();
    let ask = breakwater_policies::bulkhead::Ask {
        worker: 1,
        class: 0,
        ticket: 1,
        may_wait: false,
        may_pause: false,
        lease: true,
    };
    let got: Vec<Acquire> = (0..3).map(|_| s.ask(&cfg, 0, ask).value).collect();
    assert_eq!(got, [Acquire::Admitted, Acquire::Admitted, Acquire::Full]);
    assert_eq!(s.active_of(0), 2);
}
