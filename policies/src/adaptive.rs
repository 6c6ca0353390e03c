//! An adaptive concurrency limit for a bulkhead (`bulkhead.adaptive`), and load shedding by
//! priority class (`shed_at`).
//!
//! **The limit** follows the upstream's latency against a baseline, after Netflix's
//! concurrency-limits `Gradient2Limit` and Envoy's adaptive-concurrency gradient controller:
//! once a window (`window`, at least [`MIN_SAMPLES`] samples), with `short` the window's
//! average latency and `baseline` the no-load latency,
//!
//! ```text
//! gradient = clamp(tolerance × baseline / short, 0.5, 1)
//! target   = limit × gradient, + √limit if gradient = 1 (headroom: probe for more)
//! limit    = clamp((limit + target) / 2, min, max)
//! ```
//!
//! While latency stays within `tolerance` × the baseline the limit grows by √limit / 2 a
//! window; past it, it shrinks by up to a quarter a window, with no headroom added (Gradient2
//! adds it always, which holds an overloaded limit above `min`). So it settles where latency
//! is about `tolerance` × the baseline: an upstream that serves C at once gets about
//! `tolerance` × C. The baseline is the lowest window
//! average seen (Gradient2 uses a long average instead, which drifts up under steady
//! overload and lets the limit creep up with it). A baseline that is too low for good (the
//! upstream became slower for everyone) would pin the limit at `min`; so at `min`, where
//! concurrency is as low as it goes, the window's latency *is* the no-load latency, and becomes
//! the baseline (Envoy's controller measures its minimum RTT at its minimum concurrency too).
//! A window in which never more than half the permits were taken at once does not raise the
//! limit (the limit is not what holds the traffic back), as in Gradient2. The peak is seen at
//! admissions through the shared state; admissions from a worker's lease do not show, but
//! leases are granted only while at most half the permits are taken.
//!
//! The limiter lives in the bulkhead's shared state ([`BulkheadState`]), so every admission
//! reads the current limit in the same compare-and-swap that takes its permit: the limit is
//! exact across workers. Workers add their latency samples in batches ([`BulkheadState::adapt`]).
//!
//! **Shedding** refuses a request of a class at once, before it takes a permit or a place in
//! the queue, when the permits taken reach its `shed_at` × the current limit
//! ([`BulkheadState::sheds`]): the exact count the admission's compare-and-swap reads anyway.
//! Lower classes get lower thresholds, so they are shed first.

use crate::bulkhead::{BulkheadConfig, BulkheadState, Update};
use crate::codec::{Reader, Writer};

/// `bulkhead.adaptive` in the configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AdaptiveConfig {
    pub min: u32,
    pub max: u32,
    /// The limit a fresh bulkhead starts with.
    pub initial: u32,
    /// In thousandths: 1500 lets latency reach 1.5 × the baseline before the limit shrinks.
    pub tolerance_milli: u32,
    pub window_ns: u64,
}

impl Default for AdaptiveConfig {
    fn default() -> Self {
        AdaptiveConfig { min: 1, max: 1000, initial: 1, tolerance_milli: 1500, window_ns: crate::SECOND }
    }
}

/// A window closes only with at least this many samples; fewer wait for the next window.
pub const MIN_SAMPLES: u32 = 10;

/// Latency samples of one worker not yet handed over.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Latencies {
    pub sum_ms: u64,
    pub count: u32,
}

impl Latencies {
    #[inline]
    pub fn add(&mut self, ms: u64) {
        self.sum_ms = self.sum_ms.saturating_add(ms);
        self.count = self.count.saturating_add(1);
    }
}

/// The limiter's state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limiter {
    /// The limit, in thousandths (it moves by fractions).
    limit_milli: u64,
    /// The no-load latency, µs; 0 until the first window closes.
    baseline_us: u64,
    /// When the current window began.
    since: u64,
    /// The current window's samples, µs.
    sum_us: u64,
    samples: u32,
    /// The most permits taken at once in the current window (seen at admissions).
    peak: u32,
}

impl Limiter {
    pub fn new(cfg: &AdaptiveConfig, now: u64) -> Limiter {
        Limiter { limit_milli: u64::from(cfg.initial) * 1000, since: now, ..Limiter::default() }
    }

    pub fn limit(&self, cfg: &AdaptiveConfig) -> u32 {
        (self.limit_milli / 1000).clamp(u64::from(cfg.min), u64::from(cfg.max.max(cfg.min))) as u32
    }

    pub fn baseline_us(&self) -> u64 {
        self.baseline_us
    }

    /// Notes that `taken` permits are taken (at an admission).
    pub fn saw(&mut self, taken: u32) {
        self.peak = self.peak.max(taken);
    }

    /// Adds a batch; closes the window when it is over (true: the limit was judged).
    /// `taken`: permits taken now; the window's peak counts too.
    pub fn observe(&mut self, cfg: &AdaptiveConfig, now: u64, batch: Latencies, taken: u32) -> bool {
        self.saw(taken);
        // Envoy's header truncates to whole milliseconds: half a millisecond makes up for it.
        let us = batch.sum_ms.saturating_mul(1000).saturating_add(u64::from(batch.count) * 500);
        self.sum_us = self.sum_us.saturating_add(us);
        self.samples = self.samples.saturating_add(batch.count);
        let window = cfg.window_ns.max(1);
        // A clock that went back holds the window open until it catches up.
        let elapsed = now.saturating_sub(self.since);
        if elapsed < window {
            return false;
        }
        if self.samples < MIN_SAMPLES {
            // Too few to judge: wait for more, but not with samples older than ten windows.
            if elapsed >= window.saturating_mul(10) {
                (self.since, self.sum_us, self.samples) = (now, us, batch.count);
            }
            return false;
        }
        let short = (self.sum_us / u64::from(self.samples)).max(1);
        let in_flight = self.peak;
        (self.since, self.sum_us, self.samples, self.peak) = (now, 0, 0, 0);
        let (min, max) = (u64::from(cfg.min) * 1000, u64::from(cfg.max.max(cfg.min)) * 1000);
        let limit = self.limit_milli.clamp(min, max);
        let tolerance = u64::from(cfg.tolerance_milli);
        let at_min = limit / 1000 <= u64::from(cfg.min);
        let inflated = short.saturating_mul(1000) > self.baseline_us.saturating_mul(tolerance);
        if self.baseline_us == 0 || short < self.baseline_us || (at_min && inflated) {
            self.baseline_us = short;
        }
        let gradient = (tolerance.saturating_mul(self.baseline_us) / short).clamp(500, 1000);
        let app_limited = u64::from(in_flight) * 2 < limit / 1000;
        let mut target = limit.saturating_mul(gradient) / 1000;
        if gradient == 1000 && !app_limited {
            // √limit, in thousandths: √(limit_milli × 1000).
            target = target.saturating_add(sqrt(limit.saturating_mul(1000)));
        }
        self.limit_milli = (limit / 2 + target / 2).clamp(min, max);
        true
    }

    pub(crate) fn encode(&self, w: &mut Writer) {
        w.u64(self.limit_milli);
        w.u64(self.baseline_us);
        w.u64(self.since);
        w.u64(self.sum_us);
        w.u32(self.samples);
        w.u32(self.peak);
    }

    pub(crate) fn decode(r: &mut Reader) -> Option<Limiter> {
        Some(Limiter {
            limit_milli: r.u64()?,
            baseline_us: r.u64()?,
            since: r.u64()?,
            sum_us: r.u64()?,
            samples: r.u32()?,
            peak: r.u32()?,
        })
    }
}

/// ⌊√n⌋ by Newton's method: a few divisions, and far smaller code than `u64::isqrt`.
fn sqrt(n: u64) -> u64 {
    let (mut x, mut y) = (n, n / 2 + (n & 1));
    while y < x {
        x = y;
        y = (x + n / x) / 2;
    }
    x
}

/// What [`BulkheadState::adapt`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Adapted {
    /// The limit now.
    pub limit: u32,
    /// A window closed and the limit was judged (it may not have moved).
    pub judged: bool,
    /// The limit fell below what the leases may hold, and some may hold idle permits: every
    /// worker must give back its lease's idle permits (a recall), so that leased permits never
    /// outnumber the limit.
    pub recall: bool,
}

impl BulkheadState {
    /// The concurrency limit now: `max_concurrent`, or the adaptive limit.
    pub fn limit(&self, cfg: &BulkheadConfig) -> u32 {
        match (&cfg.adaptive, &self.limiter) {
            (Some(a), Some(l)) => l.limit(a),
            (Some(a), None) => a.initial.clamp(a.min, a.max.max(a.min)),
            (None, _) => cfg.max_concurrent,
        }
    }

    /// The adaptive limiter, if any (for the stats).
    pub fn limiter(&self) -> Option<&Limiter> {
        self.limiter.as_ref()
    }

    /// `worker` hands over its latency samples (and renews its permits, as
    /// [`BulkheadState::renew`]); the limit is judged when its window is over. A higher limit
    /// goes to the waiters at once; a lower one asks lease holders for their idle permits.
    /// Without `adaptive` in the configuration it is a renewal.
    pub fn adapt(&mut self, cfg: &BulkheadConfig, now: u64, worker: u32, batch: Latencies) -> Update<Adapted> {
        let before = self.limit(cfg);
        let Update { mut changed, mut granted, mut refused, .. } = self.renew(cfg, now, worker);
        let mut value = Adapted { limit: before, judged: false, recall: false };
        if let Some(a) = &cfg.adaptive {
            let in_flight = self.active();
            value.judged = self.limiter.get_or_insert_with(|| Limiter::new(a, now)).observe(a, now, batch, in_flight);
            value.limit = self.limit(cfg);
            // Leases are granted only up to half the limit: past that after a fall, idle leased
            // permits go back (those in use go back as their requests end).
            value.recall =
                value.limit < before && in_flight > value.limit / 2 && !self.idle_capable(u32::MAX).is_empty();
            self.grant(cfg, now, &mut granted);
            self.settle_recalls(&mut refused);
            changed = true;
        }
        Update { value, changed, granted, refused }
    }

    /// Whether a request of `class` is shed now: refused at once, with no permit and no place in
    /// the queue, because the permits taken reach its `shed_at` × the limit.
    pub fn sheds(&self, cfg: &BulkheadConfig, class: usize) -> bool {
        let at = cfg.classes.get(class).and_then(|c| c.shed_at_milli);
        at.is_some_and(|f| u64::from(self.active()) * 1000 >= u64::from(self.limit(cfg)) * u64::from(f))
    }
}

#[cfg(test)]
mod tests;
