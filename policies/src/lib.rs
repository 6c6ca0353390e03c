//! Breakwater's resilience policies as pure state machines.
//!
//! `no_std` + `alloc`, no I/O and no clock: the caller passes the time in (nanoseconds) and
//! stores the state wherever it likes. The plugin keeps it in proxy-wasm shared data, so every
//! state encodes to compact, versioned bytes ([`codec`]).
#![no_std]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing))]

extern crate alloc;

pub mod adaptive;
pub mod breaker;
pub mod bulkhead;
pub mod codec;
pub mod latency;
pub mod retry;
pub mod roster;
pub mod window;

pub use adaptive::{AdaptiveConfig, Latencies};
pub use breaker::{
    Admission, Batch, BreakerConfig, BreakerState, Forced, Outcome, Phase, Recorded, Transition, TripReason,
};
pub use bulkhead::{Acquire, BulkheadConfig, BulkheadState, ClassLimit};
pub use latency::{Histogram, LatencyState, TimeoutRule};
pub use retry::{BudgetConfig, BudgetState};
pub use roster::Roster;
pub use window::Window;

/// Nanoseconds per millisecond / second, for readable constants.
pub const MS: u64 = 1_000_000;
pub const SECOND: u64 = 1_000_000_000;
