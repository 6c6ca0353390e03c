//! What one worker knows of a policy, and what it has yet to tell the others or the stats.
//!
//! Reading shared data costs a VM re-entry, so a worker keeps a [`View`] of each breaker and
//! only goes to shared data when the view says it must; it batches its successes, serves retry
//! reservations from a small stock, and counts its stats locally. The tick ([`crate::tick`])
//! hands all of it over and refreshes the view, so nothing here is older than `sync_interval`.

use crate::metrics::Counts;
use breakwater_policies::{Batch, BreakerState, Phase};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum View {
    /// Not known (never read, or idle for a sync interval): admission reads the shared state.
    #[default]
    Unknown,
    /// Closed, no failure in the current run: admit without reading shared data, as a call of
    /// this generation.
    Quiet {
        generation: u32,
    },
    /// Closed with failures in the current run: admission reads the shared state, so a trip made
    /// on another worker is seen at once, and a success is written at once to end the run.
    Failing,
    /// Closed, with a window-based trip awaiting confirmation: as `Failing`, and the worker keeps
    /// syncing even when idle, so the trip is confirmed (or called off) on time.
    Suspect,
    /// Reject without reading shared data until `until`, then take the exact path to half-open.
    Open {
        until: u64,
    },
    HalfOpen,
    /// Forced open by an operator: reject without reading shared data until the next sync.
    ForcedOpen,
    /// Forced closed (disabled) by an operator: admit, record nothing.
    ForcedClosed,
}

impl View {
    pub fn of(state: &BreakerState) -> View {
        use breakwater_policies::Forced;
        match (state.forced, state.phase) {
            (Some(Forced::Open), _) => View::ForcedOpen,
            (Some(Forced::Closed), _) => View::ForcedClosed,
            (None, Phase::Closed) if state.suspect_since.is_some() => View::Suspect,
            (None, Phase::Closed) if state.consecutive_failures == 0 => View::Quiet { generation: state.generation },
            (None, Phase::Closed) => View::Failing,
            (None, Phase::Open { until }) => View::Open { until },
            (None, Phase::HalfOpen { .. }) => View::HalfOpen,
        }
    }
}

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
}

impl RetryLocal {
    pub fn has_news(&self, epoch: u64) -> bool {
        self.deposits > 0 || !self.refunds.is_empty() || self.overdrawn > 0 || (self.epoch != epoch && self.idle > 0)
    }
}

/// One worker's state of one policy under one configuration.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Local {
    pub view: View,
    /// Successes of the view's generation not yet handed to the shared breaker.
    pub batch: Batch,
    /// Handled a request since the last sync: its view is worth refreshing.
    pub active: bool,
    pub retry: RetryLocal,
    /// Stats not yet added to Envoy's counters.
    pub counts: Counts,
    /// On the worker's list of policies the next tick must visit.
    pub listed: bool,
}
