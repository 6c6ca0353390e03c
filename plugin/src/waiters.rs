//! Requests this worker paused in a bulkhead queue, by ticket (their HTTP context id).
//!
//! Only the worker that paused a request can resume it. The worker that frees a permit hands it
//! to the first waiter in the shared state, then posts the waiter's ticket to the waiter's
//! worker through that worker's shared queue; `on_queue_ready` there resumes it. Entries keep
//! their [`Compiled`] configuration, so a request that waits across a plugin configuration
//! reload is still woken, timed out and accounted under the policy it started with.

use crate::Compiled;
use alloc::rc::Rc;
use alloc::vec::Vec;
use core::cell::RefCell;
use hashbrown::HashMap;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    Waiting,
    /// Handed a permit and resumed at `at`.
    Granted {
        at: u64,
    },
    /// Withdrawn from the queue and answered with `queue-timeout`.
    TimedOut,
    /// Waited only for a recall that freed nothing: answered with `bulkhead-full`.
    Refused,
    /// Out of the queue (handed a permit, or refused when a recall freed nothing), but word of
    /// which has not reached this worker, and the request is done with: its client left, or
    /// it was answered when no word came (the shared state lost it). A grant that arrives is
    /// given back, a refusal dropped.
    Left,
}

#[derive(Debug)]
pub struct Parked {
    pub compiled: Rc<Compiled>,
    pub policy: usize,
    pub class: u8,
    pub since: u64,
    /// Waits for a recall of idle leased permits only (no place in the queue).
    pub recall_only: bool,
    pub state: Wait,
}

impl Parked {
    /// When its wait ends: its queue timeout, or the recall timeout. An entry whose client left
    /// waits for word up to `stale_after`, as long as a live worker can take to send it.
    pub fn deadline(&self) -> u64 {
        let timeout = self.compiled.policy(self.policy).and_then(|p| p.cfg.bulkhead.as_ref()).map_or(0, |b| {
            match (self.state, self.recall_only) {
                (Wait::Left, _) => b.machine.stale_after_ns,
                (_, true) => b.machine.recall_timeout_ns,
                _ => b.machine.queue_timeout_ns,
            }
        });
        self.since.saturating_add(timeout)
    }
}

#[derive(Debug, Default)]
pub struct Waiters {
    parked: RefCell<HashMap<u32, Parked>>,
}

impl Waiters {
    pub fn park(&self, ticket: u32, p: Parked) {
        if let Ok(mut m) = self.parked.try_borrow_mut() {
            m.insert(ticket, p);
        }
    }

    /// Removes and returns the entry (its stream is over).
    pub fn take(&self, ticket: u32) -> Option<Parked> {
        self.parked.try_borrow_mut().ok().and_then(|mut m| m.remove(&ticket))
    }

    /// Ends the wait of a waiting entry; returns what the caller needs to finish it: its
    /// configuration, policy and when it started waiting. None if it was not waiting.
    pub fn settle(&self, ticket: u32, state: Wait) -> Option<Settled> {
        let mut m = self.parked.try_borrow_mut().ok()?;
        let p = m.get_mut(&ticket).filter(|p| p.state == Wait::Waiting)?;
        p.state = state;
        Some(Settled { compiled: p.compiled.clone(), policy: p.policy, since: p.since })
    }

    /// Removes and returns the entry if its client left (see [`Wait::Left`]).
    pub fn take_left(&self, ticket: u32) -> Option<Parked> {
        let mut m = self.parked.try_borrow_mut().ok()?;
        if m.get(&ticket)?.state != Wait::Left {
            return None;
        }
        m.remove(&ticket)
    }

    /// Forgets the entries whose client left and whose word never came by their deadline.
    pub fn drop_left(&self, now: u64) {
        if let Ok(mut m) = self.parked.try_borrow_mut() {
            m.retain(|_, p| p.state != Wait::Left || p.deadline() > now);
        }
    }

    /// Tickets still waiting whose deadline has passed.
    pub fn overdue(&self, now: u64) -> Vec<u32> {
        let Ok(m) = self.parked.try_borrow() else { return Vec::new() };
        m.iter().filter(|(_, p)| p.state == Wait::Waiting && p.deadline() <= now).map(|(t, _)| *t).collect()
    }

    /// Whether a request still waits, or an entry waits for word (`Left`): what the tick must
    /// time at the fine pace. A granted request only waits for its stream to end.
    pub fn any_timed(&self) -> bool {
        self.parked.try_borrow().is_ok_and(|m| m.values().any(|p| matches!(p.state, Wait::Waiting | Wait::Left)))
    }

    pub fn is_empty(&self) -> bool {
        self.parked.try_borrow().map_or(true, |m| m.is_empty())
    }
}

/// A wait that just ended.
#[derive(Debug)]
pub struct Settled {
    pub compiled: Rc<Compiled>,
    pub policy: usize,
    pub since: u64,
}
