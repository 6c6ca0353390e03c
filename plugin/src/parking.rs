//! What this worker (one Wasm VM) has at stake in the bulkheads: the requests it paused in a
//! queue, and the permits it holds.
//!
//! Only the worker that paused a request can resume it. The worker that frees a permit hands it
//! to the first waiter in the shared state, then posts the waiter's ticket (its HTTP context id)
//! to the waiter's worker through that worker's shared queue; `on_queue_ready` there resumes it.
//! Entries keep their [`Compiled`] configuration, so a request that waits across a plugin
//! configuration reload is still woken, timed out and accounted under the policy it started with.

use crate::Compiled;
use alloc::rc::Rc;
use core::cell::{Cell, RefCell};
use hashbrown::HashMap;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParkState {
    Waiting,
    /// Handed a permit and resumed at `at`.
    Granted {
        at: u64,
    },
    /// Withdrawn from the queue and answered with `queue-timeout`.
    TimedOut,
}

#[derive(Debug)]
pub struct Parked {
    pub compiled: Rc<Compiled>,
    pub policy: usize,
    pub class: u8,
    pub since: u64,
    pub state: ParkState,
}

/// Permits this worker holds of one policy's bulkhead under one configuration.
#[derive(Debug)]
pub struct Holding {
    pub compiled: Rc<Compiled>,
    pub policy: usize,
    pub held: u32,
}

#[derive(Debug, Default)]
pub struct Parking {
    /// This worker's id in bulkhead state: the token of its wake-up queue, unique in the process.
    pub worker: Cell<u32>,
    /// Whether the wake-up queue exists; without it no request may wait.
    pub can_wait: Cell<bool>,
    parked: RefCell<HashMap<u32, Parked>>,
    /// By configuration and policy: a handful of entries, scanned. Kept per VM, not per root
    /// context: after a reload the old root context may stop ticking, yet its streams still hold
    /// permits that must be renewed.
    holdings: RefCell<alloc::vec::Vec<Holding>>,
}

impl Parking {
    pub fn new(worker: u32, can_wait: bool) -> Self {
        Parking { worker: Cell::new(worker), can_wait: Cell::new(can_wait), ..Parking::default() }
    }

    pub fn park(&self, ticket: u32, p: Parked) {
        if let Ok(mut m) = self.parked.try_borrow_mut() {
            m.insert(ticket, p);
        }
    }

    /// Removes and returns the entry (the stream is over).
    pub fn take(&self, ticket: u32) -> Option<Parked> {
        self.parked.try_borrow_mut().ok().and_then(|mut m| m.remove(&ticket))
    }

    /// Sets the state of a waiting entry; returns the entry's policy data if it was waiting.
    pub fn settle(&self, ticket: u32, state: ParkState) -> Option<(Rc<Compiled>, usize, u8, u64)> {
        let mut m = self.parked.try_borrow_mut().ok()?;
        let p = m.get_mut(&ticket).filter(|p| p.state == ParkState::Waiting)?;
        p.state = state;
        Some((p.compiled.clone(), p.policy, p.class, p.since))
    }

    /// Tickets still waiting whose deadline (`since` + their policy's queue timeout) is past.
    pub fn overdue(&self, now: u64) -> alloc::vec::Vec<u32> {
        let Ok(m) = self.parked.try_borrow() else { return alloc::vec::Vec::new() };
        m.iter()
            .filter(|(_, p)| {
                p.state == ParkState::Waiting
                    && p.compiled
                        .bulkhead(p.policy)
                        .is_some_and(|b| p.since.saturating_add(b.machine.queue_timeout_ns) <= now)
            })
            .map(|(t, _)| *t)
            .collect()
    }

    /// Counts a permit taken under `c`'s policy.
    pub fn took(&self, c: &Rc<Compiled>, policy: usize) {
        let Ok(mut h) = self.holdings.try_borrow_mut() else { return };
        match h.iter_mut().find(|e| e.policy == policy && Rc::ptr_eq(&e.compiled, c)) {
            Some(entry) => entry.held = entry.held.saturating_add(1),
            None => h.push(Holding { compiled: c.clone(), policy, held: 1 }),
        }
    }

    /// Counts a permit given back under `c`'s policy.
    pub fn returned(&self, c: &Compiled, policy: usize) {
        let Ok(mut h) = self.holdings.try_borrow_mut() else { return };
        if let Some(i) = h.iter().position(|e| e.policy == policy && core::ptr::eq(Rc::as_ptr(&e.compiled), c)) {
            if let Some(entry) = h.get_mut(i) {
                entry.held = entry.held.saturating_sub(1);
                if entry.held == 0 {
                    // Lets go of a retired configuration; the Vec keeps its capacity.
                    h.swap_remove(i);
                }
            }
        }
    }

    /// The bulkheads this worker holds permits of, with the configuration to renew them by.
    pub fn holdings(&self) -> alloc::vec::Vec<(Rc<Compiled>, usize)> {
        self.holdings
            .try_borrow()
            .map_or_else(|_| alloc::vec::Vec::new(), |h| h.iter().map(|e| (e.compiled.clone(), e.policy)).collect())
    }

    /// Nobody waiting on this worker: the tick has nothing to time out.
    pub fn is_empty(&self) -> bool {
        self.parked.try_borrow().map_or(true, |m| m.is_empty())
    }
}
