//! Upstream latency as a small histogram that every worker adds to, and the adaptive timeout
//! read from it: `clamp(percentile × multiplier + margin, min, max)`.
//!
//! **Buckets** are log-linear over whole milliseconds (the resolution of Envoy's
//! `x-envoy-upstream-service-time`): one per millisecond below 16 ms, then eight per power of
//! two, so a bucket is at most an eighth of its lower edge wide; [`BUCKETS`] of them cover
//! 0 ms to 2²⁰ ms (17 minutes; anything longer counts as that). A percentile is read as the
//! *upper* edge of the bucket it falls in: at most 12.5% above the true value, never below it,
//! so a timeout made from it errs long.
//!
//! Every histogram is a plain array of counts (fixed sizes, no allocation: small code), so
//! histograms merge by adding counts and a worker's batch is a histogram too.
//!
//! **Time**: the shared [`LatencyState`] is a sliding window of [`SLICES`] slices of
//! `window / SLICES`, like the breaker's window: a batch goes into the slice of the moment it
//! is handed over, and a slice older than the window no longer counts (its slot is reused).

use crate::codec::{Reader, Writer};
use alloc::vec::Vec;

/// Buckets in all: `bucket(2²⁰ - 1) == 143`.
pub const BUCKETS: usize = 144;
/// Slices of the sliding window.
pub const SLICES: usize = 10;

/// The bucket of a latency of `ms` milliseconds.
pub fn bucket(ms: u64) -> usize {
    let v = ms.min((1 << 20) - 1);
    if v < 16 {
        return v as usize;
    }
    // v ≥ 16: its top bit e ≥ 4; the three bits below it pick one of eight sub-buckets.
    let e = (63 - v.leading_zeros()) as usize;
    (e - 2) * 8 + ((v >> (e - 3)) & 7) as usize
}

/// The largest latency (ms) in bucket `b`.
pub fn upper_ms(b: usize) -> u64 {
    let b = b.min(BUCKETS - 1);
    if b < 16 {
        return b as u64;
    }
    let (e, sub) = (b / 8 + 2, (b % 8) as u64);
    ((9 + sub) << (e - 3)) - 1
}

/// The latency to count for a request cut by its timeout of `timeout_ms`: the first value of
/// the bucket above the timeout's. A percentile is read as the upper edge of its bucket, so
/// counting the cut request at the timeout itself could read back the timeout exactly when it
/// is its bucket's top (103 ms: `bucket(103)` ends at 103), and with a multiplier of 1 and no
/// margin the timeout would stay there while every request is cut. One bucket up, a
/// percentile that falls on cut requests is above the timeout (`upper_ms(bucket(t) + 1) >
/// upper_ms(bucket(t)) ≥ t`): the timeout grows at every hand-over while they decide it,
/// whatever the multiplier (≥ 1) and margin (≥ 0), until `max`, or the top bucket
/// (2²⁰ − 1 ms, 17 minutes), past which nothing grows.
pub fn cut_ms(timeout_ms: u64) -> u64 {
    upper_ms(bucket(timeout_ms)).saturating_add(1)
}

/// Samples, counted by bucket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Histogram {
    counts: [u32; BUCKETS],
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram { counts: [0; BUCKETS] }
    }
}

impl Histogram {
    /// One sample of `ms` milliseconds.
    pub fn add(&mut self, ms: u64) {
        if let Some(c) = self.counts.get_mut(bucket(ms)) {
            *c = c.saturating_add(1);
        }
    }

    /// Adds every sample of `other`.
    pub fn merge(&mut self, other: &Histogram) {
        for (c, n) in self.counts.iter_mut().zip(other.counts) {
            *c = c.saturating_add(n);
        }
    }

    pub fn total(&self) -> u32 {
        self.counts.iter().fold(0u32, |a, n| a.saturating_add(*n))
    }

    pub fn is_empty(&self) -> bool {
        self.counts.iter().all(|n| *n == 0)
    }

    /// The upper edge of the bucket holding the `tenths`/1000 quantile (`950`: p95), if any
    /// sample is held.
    pub fn percentile(&self, tenths: u32) -> Option<u64> {
        let total = u64::from(self.total());
        // The rank of the quantile sample, 1-based: at least the first, at most the last.
        let rank = (total * u64::from(tenths.min(1000))).div_ceil(1000).max(1);
        let mut seen = 0u64;
        let b = self.counts.iter().position(|n| {
            seen += u64::from(*n);
            seen >= rank
        })?;
        Some(upper_ms(b))
    }
}

/// A policy's upstream latencies over the trailing window, shared by every worker: a ring of
/// [`SLICES`] slices, each its epoch (`now / slice + 1`; 0: never used) and its histogram.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LatencyState {
    epochs: [u64; SLICES],
    slices: [Histogram; SLICES],
}

impl Default for LatencyState {
    fn default() -> Self {
        LatencyState { epochs: [0; SLICES], slices: core::array::from_fn(|_| Histogram::default()) }
    }
}

const VERSION: u8 = 1;

/// The epoch of `now`, and the oldest one still in the window.
fn epochs(now: u64, window_ns: u64) -> (u64, u64) {
    let e = now / (window_ns / SLICES as u64).max(1) + 1;
    (e, e.saturating_sub(SLICES as u64 - 1))
}

impl LatencyState {
    /// Adds a worker's batch to the slice of `now`.
    pub fn record(&mut self, window_ns: u64, now: u64, batch: &Histogram) {
        let (e, _) = epochs(now, window_ns);
        let slot = (e % SLICES as u64) as usize;
        if let (Some(at), Some(h)) = (self.epochs.get_mut(slot), self.slices.get_mut(slot)) {
            if *at != e {
                (*at, *h) = (e, Histogram::default());
            }
            h.merge(batch);
        }
    }

    /// Every sample of the trailing window, as one histogram.
    pub fn window(&self, window_ns: u64, now: u64) -> Histogram {
        let (e, oldest) = epochs(now, window_ns);
        let mut all = Histogram::default();
        for (_, h) in self.epochs.iter().zip(&self.slices).filter(|(at, _)| (oldest..=e).contains(*at)) {
            all.merge(h);
        }
        all
    }

    /// Every slot, in order: its epoch, then its counts (5.8 KB: one fixed layout keeps the
    /// code small).
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(1 + SLICES * (8 + 4 * BUCKETS));
        w.u8(VERSION);
        for (at, h) in self.epochs.iter().zip(&self.slices) {
            w.u64(*at);
            for n in h.counts {
                w.u32(n);
            }
        }
        w.buf
    }

    /// None for bytes this version did not write (of another length).
    pub fn decode(bytes: &[u8]) -> Option<LatencyState> {
        let mut r = Reader::new(bytes);
        if r.u8()? != VERSION {
            return None;
        }
        let mut s = LatencyState::default();
        for (at, h) in s.epochs.iter_mut().zip(s.slices.iter_mut()) {
            *at = r.u64()?;
            for c in h.counts.iter_mut() {
                *c = r.u32()?;
            }
        }
        r.is_empty().then_some(s)
    }
}

/// How the adaptive timeout is made (`timeout.adaptive` in the configuration).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimeoutRule {
    /// The percentile, in tenths of a percent: 950 is p95.
    pub percentile_tenths: u32,
    /// In thousandths: 1500 is 1.5.
    pub multiplier_milli: u32,
    pub margin_ms: u64,
    pub min_ms: u64,
    pub max_ms: u64,
    /// No timeout is set until the window holds this many samples.
    pub minimum_requests: u32,
    pub window_ns: u64,
}

impl Default for TimeoutRule {
    fn default() -> Self {
        TimeoutRule {
            percentile_tenths: 990,
            multiplier_milli: 1500,
            margin_ms: 0,
            min_ms: 100,
            max_ms: 5000,
            minimum_requests: 100,
            window_ns: 30 * crate::SECOND,
        }
    }
}

impl TimeoutRule {
    /// The timeout for the samples of the trailing window, in ms; None while the window holds
    /// fewer than `minimum_requests` (the route's own timeout applies). The same as
    /// `window(…).percentile(…)`, without building the merged histogram.
    pub fn timeout_ms(&self, s: &LatencyState, now: u64) -> Option<u64> {
        let (e, oldest) = epochs(now, self.window_ns);
        let mut all = [0u64; BUCKETS];
        for (_, h) in s.epochs.iter().zip(&s.slices).filter(|(at, _)| (oldest..=e).contains(*at)) {
            for (a, n) in all.iter_mut().zip(h.counts) {
                *a += u64::from(n);
            }
        }
        let total: u64 = all.iter().sum();
        if total < u64::from(self.minimum_requests.max(1)) {
            return None;
        }
        let rank = (total * u64::from(self.percentile_tenths.min(1000))).div_ceil(1000).max(1);
        let mut seen = 0;
        let p = upper_ms(all.iter().position(|n| {
            seen += n;
            seen >= rank
        })?);
        let scaled = p.saturating_mul(u64::from(self.multiplier_milli)) / 1000;
        Some(scaled.saturating_add(self.margin_ms).clamp(self.min_ms, self.max_ms.max(self.min_ms)))
    }
}

#[cfg(test)]
mod tests;
