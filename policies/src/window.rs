//! A sliding time window of call outcomes, kept as a ring of fixed buckets.
//!
//! The window of length `W` is split into [`BUCKETS`] buckets of `W / BUCKETS`; a bucket is
//! identified by its epoch (`now / bucket_len`), so stale buckets are recognised and reused
//! without any timer. Counts cover between `W - W/BUCKETS` and `W` of trailing time.

use crate::codec::{Reader, Writer};

pub const BUCKETS: usize = 10;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Bucket {
    epoch: u64,
    total: u32,
    failures: u32,
    slow: u32,
}

/// Totals over the live part of a [`Window`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub total: u32,
    pub failures: u32,
    pub slow: u32,
}

impl Totals {
    /// `part` as a percentage of `total` is at least `percent`.
    pub fn at_least(part: u32, total: u32, percent: u8) -> bool {
        total > 0 && u64::from(part) * 100 >= u64::from(total) * u64::from(percent)
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Window {
    buckets: [Bucket; BUCKETS],
}

impl Window {
    fn epoch(now: u64, bucket_ns: u64) -> u64 {
        // +1 so that epoch 0 always means "never used".
        now / bucket_ns.max(1) + 1
    }

    pub fn record(&mut self, now: u64, bucket_ns: u64, failure: bool, slow: bool) {
        self.add(now, bucket_ns, Totals { total: 1, failures: u32::from(failure), slow: u32::from(slow) });
    }

    /// Adds several calls at once (a worker's batch of successes).
    pub fn add(&mut self, now: u64, bucket_ns: u64, calls: Totals) {
        let epoch = Self::epoch(now, bucket_ns);
        let slot = (epoch % BUCKETS as u64) as usize;
        if let Some(b) = self.buckets.get_mut(slot) {
            if b.epoch != epoch {
                *b = Bucket { epoch, ..Bucket::default() };
            }
            b.total = b.total.saturating_add(calls.total);
            b.failures = b.failures.saturating_add(calls.failures);
            b.slow = b.slow.saturating_add(calls.slow);
        }
    }

    pub fn totals(&self, now: u64, bucket_ns: u64) -> Totals {
        let epoch = Self::epoch(now, bucket_ns);
        let oldest = epoch.saturating_sub(BUCKETS as u64 - 1);
        let mut t = Totals::default();
        for b in self.buckets.iter().filter(|b| b.epoch >= oldest && b.epoch <= epoch) {
            t.total = t.total.saturating_add(b.total);
            t.failures = t.failures.saturating_add(b.failures);
            t.slow = t.slow.saturating_add(b.slow);
        }
        t
    }

    pub fn clear(&mut self) {
        *self = Window::default();
    }

    /// Only live buckets are written: a count byte, then each bucket's slot and contents.
    pub fn encode(&self, w: &mut Writer) {
        w.u8(self.buckets.iter().filter(|b| b.epoch != 0).count() as u8);
        for (slot, b) in self.buckets.iter().enumerate().filter(|(_, b)| b.epoch != 0) {
            w.u8(slot as u8);
            w.u64(b.epoch);
            w.u32(b.total);
            w.u32(b.failures);
            w.u32(b.slow);
        }
    }

    pub fn decode(r: &mut Reader) -> Option<Window> {
        let mut win = Window::default();
        for _ in 0..r.u8()? {
            let slot = r.u8()? as usize;
            let bucket = Bucket { epoch: r.u64()?, total: r.u32()?, failures: r.u32()?, slow: r.u32()? };
            *win.buckets.get_mut(slot)? = bucket;
        }
        Some(win)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SECOND;

    const BUCKET: u64 = SECOND; // a 10 s window

    #[test]
    fn counts_only_the_trailing_window() {
        let mut w = Window::default();
        w.record(0, BUCKET, true, false);
        w.record(5 * SECOND, BUCKET, false, true);
        assert_eq!(w.totals(9 * SECOND, BUCKET), Totals { total: 2, failures: 1, slow: 1 });
        // At 10 s the bucket of t=0 has slid out; the one of t=5 s is still in.
        assert_eq!(w.totals(10 * SECOND, BUCKET), Totals { total: 1, failures: 0, slow: 1 });
        assert_eq!(w.totals(15 * SECOND, BUCKET), Totals::default());
    }

    #[test]
    fn a_reused_slot_starts_from_zero() {
        let mut w = Window::default();
        w.record(SECOND, BUCKET, true, true);
        w.record(11 * SECOND, BUCKET, false, false); // same slot, ten buckets later
        assert_eq!(w.totals(11 * SECOND, BUCKET), Totals { total: 1, failures: 0, slow: 0 });
    }

    #[test]
    fn round_trips_through_bytes() {
        let mut w = Window::default();
        for i in 0..25 {
            w.record(i * 400 * crate::MS, BUCKET, i % 3 == 0, i % 5 == 0);
        }
        let mut out = Writer::with_capacity(64);
        w.encode(&mut out);
        let back = Window::decode(&mut Reader::new(&out.buf)).unwrap();
        assert_eq!(back, w);
    }

    #[test]
    fn percent_threshold_is_inclusive() {
        assert!(Totals::at_least(10, 20, 50));
        assert!(!Totals::at_least(9, 20, 50));
        assert!(!Totals::at_least(0, 0, 0));
    }
}
