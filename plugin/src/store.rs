//! Policy state in proxy-wasm shared data, shared by every worker thread.
//!
//! Read, change, write back with the CAS token; on a mismatch another worker won the race,
//! so read again and redo the step. Keys are per policy, so their number is bounded by the
//! configuration, never by traffic.

use crate::host::{Host, SharedError};
use crate::watch::View;
use alloc::vec::Vec;
use breakwater_policies::breaker::Step;
use breakwater_policies::bulkhead::Update;
use breakwater_policies::{BreakerState, BudgetState, BulkheadState, Roster};

/// Beyond this many lost races in a row something is badly wrong; give up on this request.
const MAX_ATTEMPTS: usize = 32;

/// A state kept in shared data.
pub trait Stored: Default {
    fn encode(&self) -> Vec<u8>;
    /// None for bytes it cannot read.
    fn decode(bytes: &[u8]) -> Option<Self>;
}

impl Stored for BreakerState {
    fn encode(&self) -> Vec<u8> {
        BreakerState::encode(self)
    }
    fn decode(bytes: &[u8]) -> Option<Self> {
        BreakerState::decode(bytes)
    }
}

impl Stored for BulkheadState {
    fn encode(&self) -> Vec<u8> {
        BulkheadState::encode(self)
    }
    fn decode(bytes: &[u8]) -> Option<Self> {
        BulkheadState::decode(bytes)
    }
}

impl Stored for BudgetState {
    fn encode(&self) -> Vec<u8> {
        BudgetState::encode(self)
    }
    fn decode(bytes: &[u8]) -> Option<Self> {
        BudgetState::decode(bytes)
    }
}

impl Stored for Roster {
    fn encode(&self) -> Vec<u8> {
        Roster::encode(self)
    }
    fn decode(bytes: &[u8]) -> Option<Self> {
        Roster::decode(bytes)
    }
}

pub fn load<S: Stored>(host: &impl Host, key: &str) -> (S, u32) {
    match host.shared_get(key) {
        // Unknown bytes (another version, a foreign plugin's key): start fresh rather than fail.
        Some((bytes, cas)) => (S::decode(&bytes).unwrap_or_default(), cas),
        None => (S::default(), 0),
    }
}

/// Creates `key` with a fresh state if it does not exist yet. Called from `on_configure`,
/// before any request: proxy-wasm has no insert-if-absent, and a write to a missing key
/// succeeds whatever CAS token it carries, so two workers racing to create a key on the request
/// path could both win, one overwriting the other (a lost permit, a lost failure).
pub fn ensure<S: Stored>(host: &impl Host, key: &str) {
    if host.shared_get(key).is_none() {
        if let Err(e) = host.shared_set(key, &S::default().encode(), 0) {
            log::warn!("could not create {key}: {e:?}");
        }
    }
}

/// Applies `f` atomically to the state under `key`: `f` returns its result and whether it
/// changed the state. Returns the result and the state as left; None if shared data kept failing.
pub fn apply<S: Stored, R>(host: &impl Host, key: &str, mut f: impl FnMut(&mut S) -> (R, bool)) -> Option<(R, S)> {
    for _ in 0..MAX_ATTEMPTS {
        let (mut state, cas) = load::<S>(host, key);
        let (result, changed) = f(&mut state);
        if !changed {
            return Some((result, state));
        }
        match host.shared_set(key, &state.encode(), cas) {
            Ok(()) => return Some((result, state)),
            Err(SharedError::CasMismatch) => continue,
            Err(SharedError::Other) => return None,
        }
    }
    log::warn!("gave up updating {key} after {MAX_ATTEMPTS} CAS conflicts");
    None
}

/// A breaker step, with a view of the state it left.
pub fn update<T>(
    host: &impl Host,
    key: &str,
    mut f: impl FnMut(&mut BreakerState) -> Step<T>,
) -> Option<(Step<T>, View)> {
    apply(host, key, |s: &mut BreakerState| {
        let step = f(s);
        let changed = step.changed;
        (step, changed)
    })
    .map(|(step, state)| (step, View::of(&state)))
}

/// Permits taken and requests waiting, as a bulkhead operation left them (for the gauges).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Taken {
    pub active: u32,
    pub queued: u32,
}

/// A bulkhead operation, with the counts it left.
pub fn bulkhead<T>(
    host: &impl Host,
    key: &str,
    mut f: impl FnMut(&mut BulkheadState) -> Update<T>,
) -> Option<(Update<T>, Taken)> {
    apply(host, key, |s: &mut BulkheadState| {
        let u = f(s);
        let changed = u.changed;
        (u, changed)
    })
    .map(|(u, s)| (u, Taken { active: s.active(), queued: s.queued() }))
}
