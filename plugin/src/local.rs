//! What one worker knows of each policy's breaker, and what it has yet to tell the others.
//!
//! Reading shared data costs a VM re-entry per request, so a worker keeps a [`View`] of each
//! breaker and only goes to shared data when the view says it must. Views are refreshed, or
//! dropped, on every sync tick, so a view is never older than `sync_interval`.

use breakwater_policies::{BreakerState, Phase};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum View {
    /// Not known (never read, or idle for a sync interval): admission reads the shared state.
    #[default]
    Unknown,
    /// Closed, no failure in the current run: admit without reading shared data.
    Quiet,
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
}

impl View {
    pub fn of(state: &BreakerState) -> View {
        match state.phase {
            Phase::Closed if state.suspect_since.is_some() => View::Suspect,
            Phase::Closed if state.consecutive_failures == 0 => View::Quiet,
            Phase::Closed => View::Failing,
            Phase::Open { until } => View::Open { until },
            Phase::HalfOpen { .. } => View::HalfOpen,
        }
    }
}

/// Successes this worker saw since it last wrote the shared breaker.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pending {
    pub successes: u32,
    /// Of which slow.
    pub slow: u32,
    /// When the latest of them ended: where it breaks a run of failures.
    pub last_at: u64,
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

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Local {
    pub view: View,
    pub pending: Pending,
    /// Handled a request since the last sync: its view is worth refreshing.
    pub active: bool,
    pub retry: RetryLocal,
}
