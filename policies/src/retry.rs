//! A retry budget counted in rate, after Finagle's and tower's: every request deposits `ratio`
//! of a retry, every retry withdraws one, over a trailing `ttl`; `min_per_second` retries per
//! second are always allowed on top, so a quiet route can still retry.
//!
//! Retries are withdrawn *before* the request is forwarded (reserved), and what a request did
//! not use is refunded afterwards, into the bucket it was withdrawn from. So the budget is never
//! overdrawn, also under a burst of concurrent failing requests: at every withdrawal,
//!
//! ```text
//! withdrawn over the trailing ttl  ≤  ratio × deposited over the trailing ttl + min_per_second × ttl
//! ```
//!
//! Time is kept as [`BUCKETS`] buckets of `ttl / BUCKETS`. Withdrawals are counted over one bucket
//! more than deposits, so bucket edges can only make the budget stricter, never looser.

use crate::codec::{Reader, Writer};

pub const BUCKETS: usize = 10;
/// Withdrawals stay one bucket longer than deposits.
const RING: usize = BUCKETS + 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BudgetConfig {
    /// Retries per request, in thousandths: 200 is a ratio of 0.2.
    pub ratio_milli: u32,
    pub min_per_second: u32,
    pub ttl_ns: u64,
}

impl Default for BudgetConfig {
    fn default() -> Self {
        BudgetConfig { ratio_milli: 200, min_per_second: 10, ttl_ns: 10 * crate::SECOND }
    }
}

impl BudgetConfig {
    fn bucket_ns(&self) -> u64 {
        (self.ttl_ns / BUCKETS as u64).max(1)
    }
    /// The bucket `now` falls in; never 0, which marks an unused bucket.
    pub fn epoch(&self, now: u64) -> u64 {
        now / self.bucket_ns() + 1
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Bucket {
    epoch: u64,
    deposits: u32,
    withdrawals: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BudgetState {
    buckets: [Bucket; RING],
}

const VERSION: u8 = 1;

impl BudgetState {
    fn bucket(&mut self, epoch: u64) -> Option<&mut Bucket> {
        let b = self.buckets.get_mut((epoch % RING as u64) as usize)?;
        if b.epoch != epoch {
            *b = Bucket { epoch, ..Bucket::default() };
        }
        Some(b)
    }

    /// Requests seen (a worker's batch).
    pub fn deposit(&mut self, cfg: &BudgetConfig, now: u64, requests: u32) {
        if let Some(b) = self.bucket(cfg.epoch(now)) {
            b.deposits = b.deposits.saturating_add(requests);
        }
    }

    /// Retries the budget allows now.
    pub fn available(&self, cfg: &BudgetConfig, now: u64) -> u32 {
        let epoch = cfg.epoch(now);
        let live = |age: u64| move |b: &&Bucket| b.epoch != 0 && b.epoch <= epoch && b.epoch + age > epoch;
        let deposits: u64 = self.buckets.iter().filter(live(BUCKETS as u64)).map(|b| u64::from(b.deposits)).sum();
        let withdrawn: u64 = self.buckets.iter().filter(live(RING as u64)).map(|b| u64::from(b.withdrawals)).sum();
        // In thousandths of a retry: ratio × deposits + min_per_second × ttl.
        let reserve_milli = u64::from(cfg.min_per_second).saturating_mul(cfg.ttl_ns / 1_000_000);
        let allowed = u64::from(cfg.ratio_milli).saturating_mul(deposits).saturating_add(reserve_milli) / 1000;
        allowed.saturating_sub(withdrawn).min(u64::from(u32::MAX)) as u32
    }

    /// Withdraws up to `want` retries; returns how many, and the epoch to refund them into.
    pub fn withdraw(&mut self, cfg: &BudgetConfig, now: u64, want: u32) -> (u32, u64) {
        let got = want.min(self.available(cfg, now));
        let epoch = cfg.epoch(now);
        if let Some(b) = self.bucket(epoch) {
            b.withdrawals = b.withdrawals.saturating_add(got);
        }
        (got, epoch)
    }

    /// Records retries made beyond what was withdrawn (a dry run lets them through).
    pub fn overdraw(&mut self, cfg: &BudgetConfig, now: u64, retries: u32) {
        if let Some(b) = self.bucket(cfg.epoch(now)) {
            b.withdrawals = b.withdrawals.saturating_add(retries);
        }
    }

    /// Gives back unused retries withdrawn in `epoch`; a bucket that has left the ring needs none.
    pub fn refund(&mut self, epoch: u64, n: u32) {
        if let Some(b) = self.buckets.get_mut((epoch % RING as u64) as usize).filter(|b| b.epoch == epoch) {
            b.withdrawals = b.withdrawals.saturating_sub(n);
        }
    }

    /// Only used buckets are written.
    pub fn encode(&self) -> alloc::vec::Vec<u8> {
        let mut w = Writer::with_capacity(2 + RING * 17);
        w.u8(VERSION);
        w.u8(self.buckets.iter().filter(|b| b.epoch != 0).count() as u8);
        for (slot, b) in self.buckets.iter().enumerate().filter(|(_, b)| b.epoch != 0) {
            w.u8(slot as u8);
            w.u64(b.epoch);
            w.u32(b.deposits);
            w.u32(b.withdrawals);
        }
        w.buf
    }

    pub fn decode(bytes: &[u8]) -> Option<BudgetState> {
        let mut r = Reader::new(bytes);
        if r.u8()? != VERSION {
            return None;
        }
        let mut s = BudgetState::default();
        for _ in 0..r.u8()? {
            let slot = usize::from(r.u8()?);
            let b = Bucket { epoch: r.u64()?, deposits: r.u32()?, withdrawals: r.u32()? };
            *s.buckets.get_mut(slot)? = b;
        }
        r.is_empty().then_some(s)
    }
}

#[cfg(test)]
mod tests;
