//! The latency histogram and the adaptive timeout, as scenarios: a 10 s window (1 s slices).

use super::*;
use crate::{MS, SECOND};

const WINDOW: u64 = 10 * SECOND;

/// The example: p95 × 1.5 + 50ms, from 100ms to 5s, once 50 samples are in.
fn rule() -> TimeoutRule {
    TimeoutRule {
        percentile_tenths: 950,
        multiplier_milli: 1500,
        margin_ms: 50,
        min_ms: 100,
        max_ms: 5000,
        minimum_requests: 50,
        window_ns: WINDOW,
    }
}

fn batch(ms: u64, n: u32) -> Histogram {
    let mut h = Histogram::default();
    for _ in 0..n {
        h.add(ms);
    }
    h
}

#[test]
fn buckets_are_exact_below_16ms_then_an_eighth_of_their_edge_wide() {
    for ms in 0..16 {
        assert_eq!((bucket(ms), upper_ms(bucket(ms))), (ms as usize, ms));
    }
    assert_eq!((bucket(16), bucket(17), bucket(18)), (16, 16, 17));
    assert_eq!(upper_ms(bucket(200)), 207, "200 ms is in 192..=207");
    assert_eq!(upper_ms(bucket(1000)), 1023);
    assert_eq!((bucket((1 << 20) - 1), bucket(u64::MAX)), (BUCKETS - 1, BUCKETS - 1));
    assert_eq!(upper_ms(BUCKETS - 1), (1 << 20) - 1);
    // Every latency lies in its bucket, and the bucket's upper edge is at most 12.5% above it.
    let mut ms = 1u64;
    while ms < 1 << 20 {
        let up = upper_ms(bucket(ms));
        assert!(up >= ms && up * 8 <= ms * 9 + 8, "{ms}: {up}");
        assert!(bucket(ms) == 0 || upper_ms(bucket(ms) - 1) < ms, "{ms}: buckets overlap");
        ms = ms * 9 / 8 + 1;
    }
}

#[test]
fn a_percentile_is_the_upper_edge_of_its_bucket() {
    let mut h = batch(20, 95);
    h.merge(&batch(200, 5));
    assert_eq!(h.total(), 100);
    assert_eq!(h.percentile(950), Some(21), "the 95th of 100 samples is still a 20ms one");
    assert_eq!(h.percentile(960), Some(207));
    assert_eq!(h.percentile(1000), Some(207));
    assert_eq!(Histogram::default().percentile(950), None);
}

#[test]
fn no_timeout_until_the_window_holds_minimum_requests() {
    let mut s = LatencyState::default();
    s.record(WINDOW, 0, &batch(20, 49));
    assert_eq!(rule().timeout_ms(&s, 0), None);
    s.record(WINDOW, 0, &batch(20, 1));
    assert_eq!(rule().timeout_ms(&s, 0), Some(100), "21 × 1.5 + 50 = 81, raised to min");
}

#[test]
fn a_shift_from_20ms_to_200ms_moves_the_timeout_within_the_window_and_is_forgotten_after_it() {
    let r = rule();
    let mut s = LatencyState::default();
    for sec in 0..10 {
        s.record(WINDOW, sec * SECOND, &batch(20, 20));
    }
    assert_eq!(r.timeout_ms(&s, 9 * SECOND), Some(100));
    // From 10 s on the upstream answers in 200 ms. Once more than 5% of the window is slow,
    // p95 is a slow call: 207 × 1.5 + 50 = 360.
    s.record(WINDOW, 10 * SECOND, &batch(200, 9));
    assert_eq!(r.timeout_ms(&s, 10 * SECOND), Some(100), "9 of 189: under 5%");
    s.record(WINDOW, 10 * SECOND + 500 * MS, &batch(200, 2));
    assert_eq!(r.timeout_ms(&s, 10 * SECOND + 500 * MS), Some(360), "11 of 191");
    // A window later the fast calls are gone, and a return to 20 ms is followed the same way.
    for sec in 11..21 {
        s.record(WINDOW, sec * SECOND, &batch(20, 20));
    }
    assert_eq!(r.timeout_ms(&s, 20 * SECOND), Some(100));
    assert_eq!(r.timeout_ms(&s, 40 * SECOND), None, "nothing in the window");
}

#[test]
fn the_timeout_is_clamped_to_max() {
    let mut s = LatencyState::default();
    s.record(WINDOW, 0, &batch(9000, 100));
    assert_eq!(rule().timeout_ms(&s, 0), Some(5000));
}

#[test]
fn batches_of_many_workers_merge_into_one_histogram() {
    let mut s = LatencyState::default();
    s.record(WINDOW, 100 * MS, &batch(10, 30));
    s.record(WINDOW, 200 * MS, &batch(1000, 30));
    let all = s.window(WINDOW, 300 * MS);
    assert_eq!((all.total(), all.percentile(500), all.percentile(510)), (60, Some(10), Some(1023)));
}

#[test]
fn round_trips_through_bytes_and_refuses_what_it_did_not_write() {
    let mut s = LatencyState::default();
    for i in 0..25u64 {
        s.record(WINDOW, i * 700 * MS, &batch(i * i * 37, 1 + i as u32));
    }
    let bytes = s.encode();
    assert_eq!(LatencyState::decode(&bytes), Some(s.clone()));
    for cut in 0..bytes.len() {
        assert_eq!(LatencyState::decode(&bytes[..cut]), None, "{cut}");
    }
    assert_eq!(bytes.len(), 1 + SLICES * (8 + 4 * BUCKETS), "one fixed layout");
    assert_eq!(LatencyState::decode(&[&bytes[..], &[0]].concat()), None, "a byte too many");
    assert_eq!(LatencyState::decode(&[&[2], &bytes[1..]].concat()), None, "another version");
    assert_eq!(LatencyState::decode(&LatencyState::default().encode()), Some(LatencyState::default()));
}

#[test]
fn a_cut_request_counts_in_the_bucket_above_its_timeout() {
    assert_eq!(upper_ms(bucket(100)), 103, "100 ms answers make a 103 ms timeout (× 1 + 0)");
    assert_eq!((cut_ms(103), upper_ms(bucket(cut_ms(103)))), (104, 111), "one bucket up");
    assert_eq!(cut_ms(5), 6, "exact buckets below 16 ms");
    let mut t = 1u64;
    while t <= upper_ms(BUCKETS - 2) {
        assert_eq!(bucket(cut_ms(t)), bucket(t) + 1, "{t}");
        assert!(upper_ms(bucket(cut_ms(t))) > t, "{t}");
        t += 1 + t / 64;
    }
    assert_eq!(bucket(cut_ms((1 << 20) - 1)), BUCKETS - 1, "the top bucket holds the rest");
}

/// With a multiplier of 1, no margin and every request cut by its timeout, the timeout grows
/// each window until max, for any percentile: it can never lock below the upstream.
#[test]
fn with_every_request_cut_the_timeout_grows_each_window_until_max() {
    for percentile_tenths in [1, 500, 950, 999, 1000] {
        for start in [1u64, 15, 16, 100, 103, 1000, 4095] {
            let r = TimeoutRule {
                percentile_tenths,
                multiplier_milli: 1000,
                margin_ms: 0,
                min_ms: 1,
                max_ms: 600_000,
                minimum_requests: 3,
                window_ns: 2 * SECOND,
            };
            let mut s = LatencyState::default();
            let (mut timeout, mut now, mut windows) = (start, 0, 0);
            while timeout < r.max_ms {
                // A whole window later only the cut requests of this one count.
                now += r.window_ns;
                s.record(r.window_ns, now, &batch(cut_ms(timeout), 5));
                let next = r.timeout_ms(&s, now).unwrap_or(0);
                assert!(next > timeout, "p{percentile_tenths}‰ from {start}: {timeout} → {next}");
                (timeout, windows) = (next, windows + 1);
            }
            assert_eq!(timeout, r.max_ms);
            assert!(windows < BUCKETS, "at least a bucket a window: {windows}");
        }
    }
}
