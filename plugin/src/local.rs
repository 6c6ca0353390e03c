//! What one worker has yet to tell the others or the stats about a policy, under one
//! configuration: its share of the retry budget and its counted stats. (Its picture of the
//! breaker is per breaker, shared by the VM's configurations: [`crate::watch`].)

use crate::metrics::Counts;

/// This worker's share of a policy's retry budget, and what it has yet to hand over.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RetryLocal {
    /// Retries withdrawn from the shared budget in bucket `epoch` and not yet handed to a request.
    pub idle: u32,
    pub epoch: u64,
    /// Requests seen since the last sync (the budget's deposits).
    pub deposits: u32,
    /// Unused retries of finished requests, by the bucket they were withdrawn from.
    pub refunds: alloc::vec::Vec<(u64, u32)>,
    /// Retries a dry run let through beyond what the budget granted.
    pub overdrawn: u32,
    /// The bucket deposits were last handed over in: they go at most once a bucket.
    pub handed_epoch: u64,
}

impl RetryLocal {
    /// Whether the tick must hand something over now. Deposits can wait for the next bucket
    /// (they only make the budget larger); a stock of a past bucket, refunds and overdraws go
    /// at once.
    pub fn has_news(&self, epoch: u64) -> bool {
        let deposits_due = self.deposits > 0 && self.handed_epoch != epoch;
        deposits_due || !self.refunds.is_empty() || self.overdrawn > 0 || (self.epoch != epoch && self.idle > 0)
    }

    /// Anything not yet handed over at all.
    pub fn is_idle(&self) -> bool {
        self.deposits == 0 && self.refunds.is_empty() && self.overdrawn == 0 && self.idle == 0
    }
}

/// One worker's state of one policy under one configuration.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Local {
    pub retry: RetryLocal,
    /// Stats not yet added to Envoy's counters.
    pub counts: Counts,
    /// Latency samples and the timeout (adaptive timeout and limit): [`crate::timeout`].
    pub adaptive: crate::timeout::Local,
    /// When the counts were last added to Envoy's.
    pub flushed_at: u64,
    /// On the worker's list of policies the next tick must visit.
    pub listed: bool,
}
