//! Breaker state in proxy-wasm shared data, shared by every worker thread.
//!
//! Read, change, write back with the CAS token; on a mismatch another worker won the race,
//! so read again and redo the step. Keys are per policy, so their number is bounded by the
//! configuration, never by traffic.

use crate::host::{Host, SharedError};
use crate::local::View;
use breakwater_policies::breaker::Step;
use breakwater_policies::BreakerState;

/// Beyond this many lost races in a row something is badly wrong; give up on this request.
const MAX_ATTEMPTS: usize = 32;

pub fn load(host: &impl Host, key: &str) -> (BreakerState, u32) {
    match host.shared_get(key) {
        // Unknown bytes (another version, a foreign plugin's key): start fresh rather than fail.
        Some((bytes, cas)) => (BreakerState::decode(&bytes).unwrap_or_default(), cas),
        None => (BreakerState::default(), 0),
    }
}

/// Applies `f` atomically to the state under `key`, and returns the step with a view of the
/// state it left; None if shared data kept failing.
pub fn update<T>(
    host: &impl Host,
    key: &str,
    mut f: impl FnMut(&mut BreakerState) -> Step<T>,
) -> Option<(Step<T>, View)> {
    for _ in 0..MAX_ATTEMPTS {
        let (mut state, cas) = load(host, key);
        let step = f(&mut state);
        if !step.changed {
            return Some((step, View::of(&state)));
        }
        match host.shared_set(key, &state.encode(), cas) {
            Ok(()) => return Some((step, View::of(&state))),
            Err(SharedError::CasMismatch) => continue,
            Err(SharedError::Other) => return None,
        }
    }
    log::warn!("gave up updating {key} after {MAX_ATTEMPTS} CAS conflicts");
    None
}
