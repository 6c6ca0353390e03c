//! The adaptive limit and shedding, as scenarios. Windows are 1 s.

use super::*;
use crate::bulkhead::{Acquire, Ask, ClassLimit};
use crate::{MS, SECOND};
use alloc::vec;
use alloc::vec::Vec;

fn cfg(min: u32, max: u32, initial: u32) -> AdaptiveConfig {
    AdaptiveConfig { min, max, initial, ..AdaptiveConfig::default() }
}

/// `n` samples of `ms` each.
fn samples(ms: u64, n: u32) -> Latencies {
    Latencies { sum_ms: ms * u64::from(n), count: n }
}

/// An upstream that serves `capacity` requests at once in `service_ms` each and queues the rest,
/// under `clients` closed-loop clients: with `in_flight` requests, each takes
/// `service_ms × in_flight / capacity` (Little's law), at least `service_ms`. Runs `seconds`
/// windows and returns the limit after each.
fn run(l: &mut Limiter, c: &AdaptiveConfig, t: &mut u64, seconds: u32, capacity: u64, clients: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for _ in 0..seconds {
        let in_flight = clients.min(l.limit(c));
        let latency = (100 * u64::from(in_flight) / capacity).max(100);
        *t += SECOND;
        l.observe(c, *t, samples(latency, 200), in_flight);
        out.push(l.limit(c));
    }
    out
}

#[test]
fn newtons_square_root_is_exact() {
    for n in (0..10_000u64).chain([u64::MAX, u64::MAX - 1, 1 << 62, (1 << 32) - 1, 1 << 32]) {
        assert_eq!(sqrt(n), n.isqrt(), "{n}");
    }
}

#[test]
fn the_limit_follows_a_capacity_drop_and_recovers_when_it_returns() {
    let c = cfg(2, 100, 2);
    let (mut l, mut t) = (Limiter::new(&c, 0), 0);
    // 40 clients; the upstream serves 20 at once in 100 ms. From 2 the limit climbs until
    // latency passes 1.5 × the baseline, and settles about 1.5 × 20.
    let up = run(&mut l, &c, &mut t, 20, 20, 40);
    assert!(up.windows(2).take(12).all(|w| w[1] > w[0]), "climbs: {up:?}");
    assert!(up.iter().skip(15).all(|n| (26..=34).contains(n)), "{up:?}");
    assert_eq!(l.baseline_us(), 100_500, "the no-load latency, half a ms added back");
    // Capacity halves: the limit falls to about half within a few windows, and stays there.
    let down = run(&mut l, &c, &mut t, 15, 10, 40);
    assert!(down.iter().skip(3).all(|n| (12..=20).contains(n)), "{down:?}");
    // Capacity returns: the limit climbs back.
    let back = run(&mut l, &c, &mut t, 15, 20, 40);
    assert!(back.iter().skip(10).all(|n| (26..=34).contains(n)), "{back:?}");
}

#[test]
fn an_idle_bulkhead_does_not_raise_its_limit() {
    let c = cfg(1, 100, 10);
    let mut l = Limiter::new(&c, 0);
    for s in 1..20 {
        assert!(l.observe(&c, s * SECOND, samples(50, 20), 2));
    }
    assert_eq!(l.limit(&c), 10, "2 in flight of 10: the limit holds nothing back");
    l.observe(&c, 20 * SECOND, samples(50, 20), 5);
    assert_eq!(l.limit(&c), 11, "half the permits taken: room to probe, √10 / 2");
}

#[test]
fn a_window_is_judged_only_with_enough_samples() {
    let c = cfg(1, 100, 10);
    let mut l = Limiter::new(&c, 0);
    assert!(!l.observe(&c, 500 * MS, samples(50, 100), 10), "the window is not over");
    let mut l = Limiter::new(&c, 0);
    assert!(!l.observe(&c, 2 * SECOND, samples(50, MIN_SAMPLES - 1), 10));
    assert!(l.observe(&c, 2500 * MS, samples(50, 1), 10), "the samples of both batches");
    let mut l = Limiter::new(&c, 0);
    assert!(!l.observe(&c, 2 * SECOND, samples(5000, 3), 10));
    assert!(!l.observe(&c, 11 * SECOND, samples(50, 3), 10), "older than ten windows: dropped");
    assert!(l.observe(&c, 12 * SECOND, samples(50, 7), 10));
    assert_eq!(l.baseline_us(), 50_500, "without the old samples");
}

#[test]
fn an_upstream_that_became_slower_for_good_is_measured_again_at_min() {
    let c = cfg(2, 100, 20);
    let mut l = Limiter::new(&c, 0);
    l.observe(&c, SECOND, samples(20, 100), 20);
    // A new release takes 200 ms whatever the load: the limit falls to min…
    let mut t = SECOND;
    let mut falls = Vec::new();
    while l.limit(&c) > 2 && falls.len() < 20 {
        t += SECOND;
        l.observe(&c, t, samples(200, 100), 20);
        falls.push(l.limit(&c));
    }
    assert_eq!((l.limit(&c), l.baseline_us()), (2, 20_500), "{falls:?}");
    t += SECOND;
    l.observe(&c, t, samples(200, 100), 2);
    assert_eq!(l.baseline_us(), 200_500, "…where 200 ms becomes the baseline");
    for _ in 0..10 {
        t += SECOND;
        l.observe(&c, t, samples(200, 100), l.limit(&c));
    }
    assert!(l.limit(&c) >= 10, "and it climbs again: {}", l.limit(&c));
}

#[test]
fn the_limit_stays_within_min_and_max() {
    let c = cfg(3, 8, 5);
    let mut l = Limiter::new(&c, 0);
    let mut seen = Vec::new();
    for s in 1..60 {
        let ms = if s < 30 { 10 } else { 10_000 };
        l.observe(&c, s * SECOND, samples(ms, 100), 8);
        seen.push(l.limit(&c));
    }
    assert!(seen.iter().all(|n| (3..=8).contains(n)), "{seen:?}");
    assert!(seen.contains(&8) && seen.contains(&3), "{seen:?}");
}

// --- the limit in the bulkhead ------------------------------------------------------------------

fn adaptive(min: u32, max: u32, initial: u32, queue: u32) -> BulkheadConfig {
    BulkheadConfig {
        max_concurrent: max,
        queue_max: queue,
        adaptive: Some(cfg(min, max, initial)),
        ..BulkheadConfig::default()
    }
}

/// `n` windows of 50 samples of `ms`, handed over by worker 1 from t = 0 (when the limiter
/// starts); the last one's update.
fn windows(s: &mut BulkheadState, c: &BulkheadConfig, n: u64, ms: u64) -> Update<Adapted> {
    let mut u = s.adapt(c, 0, 1, Latencies::default());
    for w in 1..=n {
        u = s.adapt(c, w * SECOND, 1, samples(ms, 50));
    }
    u
}

fn ask(s: &mut BulkheadState, c: &BulkheadConfig, worker: u32, ticket: u32, lease: bool) -> Acquire {
    s.ask(c, 0, Ask { worker, class: 0, ticket, may_wait: true, may_pause: true, lease }).value
}

#[test]
fn admission_uses_the_current_limit_exactly() {
    let c = adaptive(1, 100, 3, 0);
    let mut s = BulkheadState::default();
    for t in 0..3 {
        assert_eq!(ask(&mut s, &c, 1, t, false), Acquire::Admitted, "{t} of 3");
    }
    assert_eq!(ask(&mut s, &c, 1, 9, false), Acquire::Full, "the initial limit is 3, not max");
    // Fast answers with 3 in flight of 3: the limit grows (√3 / 2 a window), and the next
    // request is admitted.
    let u = windows(&mut s, &c, 2, 10);
    assert!(u.value.judged && u.value.limit == 4, "{u:?}");
    assert_eq!(ask(&mut s, &c, 1, 10, false), Acquire::Admitted);
}

#[test]
fn a_higher_limit_goes_to_the_waiters_at_once() {
    let c = adaptive(1, 100, 1, 5);
    let mut s = BulkheadState::default();
    assert_eq!(ask(&mut s, &c, 1, 1, false), Acquire::Admitted);
    assert_eq!(ask(&mut s, &c, 2, 2, false), Acquire::Queued);
    assert!(windows(&mut s, &c, 1, 10).granted.is_empty(), "1.5: still 1");
    let u = s.adapt(&c, 2 * SECOND, 1, samples(10, 50));
    assert_eq!(u.value.limit, 2);
    assert_eq!(u.granted.iter().map(|w| (w.worker, w.ticket)).collect::<Vec<_>>(), vec![(2, 2)]);
    assert_eq!((s.active(), s.queued()), (2, 0));
}

#[test]
fn a_lower_limit_recalls_idle_leases_so_leased_permits_never_outnumber_it() {
    let c = adaptive(1, 100, 40, 0);
    let mut s = BulkheadState::default();
    // Far from full: both workers take leases.
    assert!(matches!(ask(&mut s, &c, 1, 1, true), Acquire::Leased(_)));
    assert!(matches!(ask(&mut s, &c, 2, 2, true), Acquire::Leased(_)));
    let leased = s.leased();
    assert!(leased > 5, "{leased}");
    // Latency explodes: the limit falls below what the leases hold.
    let mut t = SECOND;
    windows(&mut s, &c, 1, 10);
    let mut recalled = false;
    for _ in 0..10 {
        t += SECOND;
        recalled |= s.adapt(&c, t, 1, samples(1000, 50)).value.recall;
    }
    assert!(s.limit(&c) < leased, "{} < {leased}", s.limit(&c));
    assert!(recalled, "the lease holders are asked for their idle permits");
    s.trim_lease(&c, t, 1, 1, true);
    s.trim_lease(&c, t, 2, 0, false);
    assert_eq!(s.leased(), 1, "only the permit in use is kept, and it goes back when its request ends");
    assert_eq!(ask(&mut s, &c, 2, 3, true), Acquire::Admitted, "no lease past half the limit");
}

#[test]
fn the_limiter_round_trips_with_the_bulkhead_state() {
    let c = adaptive(1, 100, 7, 2);
    let mut s = BulkheadState::default();
    ask(&mut s, &c, 1, 1, false);
    s.adapt(&c, 3 * SECOND, 1, samples(30, 25));
    s.adapt(&c, 3 * SECOND + 100 * MS, 2, samples(40, 3));
    let bytes = s.encode();
    assert_eq!(BulkheadState::decode(&bytes), Some(s.clone()));
    for cut in 0..bytes.len() {
        assert_eq!(BulkheadState::decode(&bytes[..cut]), None, "{cut}");
    }
    let mut flag = bytes.clone();
    let at = bytes.len() - 41;
    flag[at] = 2;
    assert_eq!(BulkheadState::decode(&flag), None, "a limiter flag of 2");
}

#[test]
fn without_adaptive_nothing_changes() {
    let c = BulkheadConfig { max_concurrent: 4, ..BulkheadConfig::default() };
    let mut s = BulkheadState::default();
    let u = s.adapt(&c, SECOND, 1, samples(10, 50));
    assert_eq!((u.value.limit, u.changed, s.limiter()), (4, false, None));
}

// --- shedding -----------------------------------------------------------------------------------

const STANDARD: u8 = 0;
const CRITICAL: u8 = 1;
const BACKGROUND: u8 = 2;

/// 10 permits; background shed from half of them, standard from 90%, critical never.
fn shedding(queue: u32) -> BulkheadConfig {
    BulkheadConfig {
        max_concurrent: 10,
        queue_max: queue,
        classes: vec![
            ClassLimit { shed_at_milli: Some(900), ..ClassLimit::default() },
            ClassLimit { reserved: 1, ..ClassLimit::default() },
            ClassLimit { shed_at_milli: Some(500), ..ClassLimit::default() },
        ],
        ..BulkheadConfig::default()
    }
}

fn take(s: &mut BulkheadState, c: &BulkheadConfig, now: u64, class: u8, ticket: u32) -> Acquire {
    s.ask(c, now, Ask { worker: 1, class, ticket, may_wait: true, may_pause: true, lease: false }).value
}

#[test]
fn the_lowest_classes_are_shed_first_as_the_bulkhead_fills() {
    let c = shedding(0);
    let mut s = BulkheadState::default();
    for t in 0..5 {
        assert_eq!(take(&mut s, &c, 0, BACKGROUND, t), Acquire::Admitted);
    }
    let before = s.clone();
    let u =
        s.ask(&c, 0, Ask { worker: 1, class: BACKGROUND, ticket: 5, may_wait: true, may_pause: true, lease: false });
    assert_eq!((u.value, u.changed), (Acquire::Shed, false), "5 of 10 taken: background is shed");
    assert_eq!(s, before, "a shed request takes nothing");
    for t in 6..10 {
        assert_eq!(take(&mut s, &c, 0, STANDARD, t), Acquire::Admitted);
    }
    assert_eq!(take(&mut s, &c, 0, STANDARD, 10), Acquire::Shed, "9 of 10: standard is shed too");
    assert_eq!(take(&mut s, &c, 0, CRITICAL, 11), Acquire::Admitted, "critical never is");
    assert_eq!(take(&mut s, &c, 0, CRITICAL, 12), Acquire::Full);
}

#[test]
fn a_shed_class_never_queues_while_a_higher_class_still_may() {
    let c = shedding(10);
    let mut s = BulkheadState::default();
    for t in 0..9 {
        take(&mut s, &c, 0, STANDARD, t);
    }
    assert_eq!(take(&mut s, &c, 0, CRITICAL, 9), Acquire::Admitted);
    assert_eq!(take(&mut s, &c, 0, CRITICAL, 10), Acquire::Queued, "full: critical waits");
    assert_eq!(take(&mut s, &c, 0, BACKGROUND, 11), Acquire::Shed, "background is refused at once");
    assert_eq!(s.queued(), 1);
}

#[test]
fn shedding_follows_the_adaptive_limit() {
    let mut c = shedding(0);
    c.adaptive = Some(cfg(1, 10, 4));
    let mut s = BulkheadState::default();
    take(&mut s, &c, 0, STANDARD, 0);
    assert_eq!(take(&mut s, &c, 0, BACKGROUND, 1), Acquire::Admitted, "1 of 4");
    assert_eq!(take(&mut s, &c, 0, BACKGROUND, 2), Acquire::Shed, "2 of 4: half the current limit");
}
