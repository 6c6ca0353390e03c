//! What one worker knows of each breaker (by its shared-data key, whatever configuration of
//! the VM uses it), and what it has yet to tell the others.
//!
//! Reading shared data costs a VM re-entry, so a worker keeps a [`View`] of each breaker and
//! goes to shared data only when the view says it must. Views are not polled: a worker that
//! changes a breaker in a way others must know (a transition, the first failure of a run, a
//! rate trip awaiting confirmation) tells every other worker through its wake-up queue, and
//! they drop their view and hand over their batch at once ([`crate::breaker::refresh`]). So a
//! trip made on one worker is seen by the others one queue hop later (about a millisecond).
//! As a safety net against a lost message, an active view is refreshed at least every second.

use crate::registry::{Listed, Listing, Registry};
use crate::Compiled;
use alloc::rc::Rc;
use alloc::string::String;
use alloc::vec::Vec;
use breakwater_policies::{Batch, BreakerState, Phase};
use core::cell::Cell;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum View {
    /// Not known (never read, idle for a while, or told it changed): admission reads the
    /// shared state.
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

/// This worker's picture of one breaker.
#[derive(Debug, Default)]
pub struct Watch {
    pub key: String,
    pub view: Cell<View>,
    /// Successes of one generation not yet handed to the shared breaker.
    pub batch: Cell<Batch>,
    /// Used by a request since the last tick.
    pub active: Cell<bool>,
    /// When this worker last read the shared state (and handed its batch over).
    pub synced_at: Cell<u64>,
    /// When a request last used it.
    pub used_at: Cell<u64>,
    /// The configuration to act with, kept only while listed; on the tick's list.
    listing: Listing,
}

impl Listed for Watch {
    fn listing(&self) -> &Listing {
        &self.listing
    }
}

impl Watch {
    pub fn owner(&self) -> Option<(Rc<Compiled>, usize)> {
        self.listing.owner()
    }

    /// Takes the batch, leaving an empty one of the same generation.
    pub fn take_batch(&self) -> Batch {
        let b = self.batch.get();
        self.batch.set(Batch { generation: b.generation, ..Batch::default() });
        b
    }
}

/// Every breaker this worker has used, by key; listed while the tick has something to do for it.
#[derive(Debug, Default)]
pub struct Watches(Registry<Watch>);

impl Watches {
    /// The watch of breaker `key`, made on first use.
    pub fn of(&self, key: &str) -> Option<Rc<Watch>> {
        self.0.of(key, || Watch { key: key.into(), ..Watch::default() })
    }

    /// An existing watch (for a message from another worker).
    pub fn find(&self, key: &[u8]) -> Option<Rc<Watch>> {
        self.0.find(key)
    }

    /// Records that `c`'s policy acts on `w`, and lists it for the tick.
    pub fn touch(&self, w: &Rc<Watch>, c: &Rc<Compiled>, policy: usize) {
        self.0.touch(w, c, policy);
    }

    /// The listed watches, for the tick.
    pub fn listed(&self) -> Vec<Rc<Watch>> {
        self.0.listed()
    }

    /// Takes `w` off the list (its view dropped, nothing to hand over), letting go of its
    /// configuration.
    pub fn unlist(&self, w: &Watch) {
        self.0.unlist(w);
    }
}
