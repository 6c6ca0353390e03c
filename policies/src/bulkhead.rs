//! Bulkhead admission: at most `max_concurrent` requests of a policy in flight, across workers,
//! with an optional FIFO wait queue and priority classes.
//!
//! The whole state (who holds permits, who waits) is one value, updated atomically by the
//! caller (a CAS loop over shared data). Permits are counted per worker so that the permits of a
//! worker that stops reporting (its VM died) can be reclaimed; waiters name their worker and a
//! ticket so that the worker can be told, when a freed permit is handed to one of them.
//!
//! Invariant after every operation: no waiter could be admitted. A freed permit goes straight
//! to the first waiter, in arrival order, whose class may use it ([`BulkheadState::grant`]), so
//! a newcomer that is admissible never overtakes an earlier waiter of a class that could use the
//! same permit.

use crate::codec::{Reader, Writer};
use alloc::vec::Vec;

/// A priority class's limits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClassLimit {
    /// Permits only this class may use.
    pub reserved: u32,
    /// At most this many in flight; None: only `max_concurrent` bounds it.
    pub max: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BulkheadConfig {
    pub max_concurrent: u32,
    /// Waiting room; 0: no queue, over-limit requests are refused at once.
    pub queue_max: u32,
    pub queue_timeout_ns: u64,
    /// At least one class; a request names its class by index.
    pub classes: Vec<ClassLimit>,
    /// A worker that neither takes, returns nor renews its permits for this long is presumed
    /// dead (its VM failed): its permits and waiters are dropped. Live workers renew every sync.
    pub stale_after_ns: u64,
}

impl Default for BulkheadConfig {
    fn default() -> Self {
        BulkheadConfig {
            max_concurrent: 100,
            queue_max: 0,
            queue_timeout_ns: crate::SECOND,
            classes: alloc::vec![ClassLimit::default()],
            stale_after_ns: 10 * crate::SECOND,
        }
    }
}

/// One worker's permits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder {
    pub worker: u32,
    /// Last time the worker touched its permits.
    pub seen_at: u64,
    /// Permits held, by class.
    pub active: Vec<u32>,
}

/// A request waiting for a permit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Waiter {
    pub worker: u32,
    pub ticket: u32,
    pub class: u8,
    pub since: u64,
}

/// What `acquire` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Acquire {
    Admitted,
    Queued,
    /// No permit and no room to wait: reject.
    Full,
}

/// The result of an operation: its value, whether the state changed (needs writing back), and
/// the waiters that were handed a permit and must be woken by their workers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Update<T> {
    pub value: T,
    pub changed: bool,
    pub granted: Vec<Waiter>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BulkheadState {
    holders: Vec<Holder>,
    /// Arrival order.
    waiters: Vec<Waiter>,
}

const VERSION: u8 = 1;

impl BulkheadState {
    /// Permits in flight, all workers and classes.
    pub fn active(&self) -> u32 {
        self.holders.iter().flat_map(|h| h.active.iter()).fold(0u32, |a, n| a.saturating_add(*n))
    }

    /// Permits in flight of one class.
    pub fn active_of(&self, class: usize) -> u32 {
        self.holders.iter().filter_map(|h| h.active.get(class)).fold(0u32, |a, n| a.saturating_add(*n))
    }

    pub fn queued(&self) -> u32 {
        self.waiters.len() as u32
    }

    /// Permits `worker` holds.
    pub fn held_by(&self, worker: u32) -> u32 {
        self.holders.iter().find(|h| h.worker == worker).map_or(0, |h| h.active.iter().sum())
    }

    /// Whether a request of `class` may take a permit now: below the limit, below its class's
    /// max, and not eating into capacity the other classes reserve and do not use.
    pub fn admissible(&self, cfg: &BulkheadConfig, class: usize) -> bool {
        let total = self.active();
        let mine = self.active_of(class);
        if total >= cfg.max_concurrent {
            return false;
        }
        let limit = cfg.classes.get(class).copied().unwrap_or_default();
        if limit.max.is_some_and(|m| mine >= m) {
            return false;
        }
        let held_back: u32 = cfg
            .classes
            .iter()
            .enumerate()
            .filter(|(c, _)| *c != class)
            .map(|(c, l)| l.reserved.saturating_sub(self.active_of(c)))
            .fold(0u32, |a, n| a.saturating_add(n));
        cfg.max_concurrent - total > held_back
    }

    /// A request arrives: take a permit, or wait (if `may_wait` and there is room), or be refused.
    pub fn acquire(
        &mut self,
        cfg: &BulkheadConfig,
        now: u64,
        worker: u32,
        class: u8,
        ticket: u32,
        may_wait: bool,
    ) -> Update<Acquire> {
        let (pruned, granted) = self.prune(cfg, now);
        let value = if self.admissible(cfg, usize::from(class)) {
            self.take(now, worker, class);
            Acquire::Admitted
        } else if may_wait && self.queued() < cfg.queue_max {
            self.waiters.push(Waiter { worker, ticket, class, since: now });
            Acquire::Queued
        } else {
            Acquire::Full
        };
        Update { changed: pruned || value != Acquire::Full, value, granted }
    }

    /// A permit comes back; it goes to the first waiter that may use it. Returning a permit the
    /// worker does not hold (reclaimed after it was presumed dead) changes nothing.
    pub fn release(&mut self, cfg: &BulkheadConfig, now: u64, worker: u32, class: u8) -> Update<()> {
        let (pruned, mut granted) = self.prune(cfg, now);
        let mut changed = pruned;
        if let Some(i) = self.holders.iter().position(|h| h.worker == worker) {
            if let Some(h) = self.holders.get_mut(i) {
                h.seen_at = now;
                if let Some(n) = h.active.get_mut(usize::from(class)).filter(|n| **n > 0) {
                    *n -= 1;
                }
                if h.active.iter().all(|n| *n == 0) {
                    self.holders.remove(i);
                }
                changed = true;
            }
        }
        self.grant(cfg, now, &mut granted);
        Update { value: (), changed, granted }
    }

    /// A waiter leaves the queue (gave up, or its client left). False if it is not waiting:
    /// then it was granted a permit, which it now holds.
    pub fn withdraw(&mut self, cfg: &BulkheadConfig, now: u64, worker: u32, ticket: u32) -> Update<bool> {
        let (pruned, granted) = self.prune(cfg, now);
        let found = match self.waiters.iter().position(|w| w.worker == worker && w.ticket == ticket) {
            Some(i) => {
                self.waiters.remove(i);
                true
            }
            None => false,
        };
        Update { value: found, changed: pruned || found, granted }
    }

    /// A worker that holds permits says it is alive.
    pub fn renew(&mut self, cfg: &BulkheadConfig, now: u64, worker: u32) -> Update<()> {
        let (mut changed, granted) = self.prune(cfg, now);
        if let Some(h) = self.holders.iter_mut().find(|h| h.worker == worker) {
            changed |= h.seen_at != now;
            h.seen_at = now;
        }
        Update { value: (), changed, granted }
    }

    fn take(&mut self, now: u64, worker: u32, class: u8) {
        let i = match self.holders.iter().position(|h| h.worker == worker) {
            Some(i) => i,
            None => {
                self.holders.push(Holder { worker, seen_at: now, active: Vec::new() });
                self.holders.len() - 1
            }
        };
        if let Some(h) = self.holders.get_mut(i) {
            h.seen_at = now;
            let c = usize::from(class);
            if h.active.len() <= c {
                h.active.resize(c + 1, 0);
            }
            if let Some(n) = h.active.get_mut(c) {
                *n = n.saturating_add(1);
            }
        }
    }

    /// Hands permits to waiters, first in line first, while any waiter may take one.
    fn grant(&mut self, cfg: &BulkheadConfig, now: u64, granted: &mut Vec<Waiter>) {
        while let Some(i) = self.waiters.iter().position(|w| self.admissible(cfg, usize::from(w.class))) {
            let w = self.waiters.remove(i);
            self.take(now, w.worker, w.class);
            granted.push(w);
        }
    }

    /// Drops the permits and waiters of workers presumed dead, then grants what that freed.
    fn prune(&mut self, cfg: &BulkheadConfig, now: u64) -> (bool, Vec<Waiter>) {
        let (holders, waiters) = (self.holders.len(), self.waiters.len());
        self.holders.retain(|h| h.seen_at.saturating_add(cfg.stale_after_ns) >= now);
        // A live worker gives up on its waiter at `since + timeout` (one sync late at most).
        let waiter_deadline = cfg.queue_timeout_ns.saturating_add(cfg.stale_after_ns);
        self.waiters.retain(|w| w.since.saturating_add(waiter_deadline) >= now);
        let mut granted = Vec::new();
        let changed = holders != self.holders.len() || waiters != self.waiters.len();
        if changed {
            self.grant(cfg, now, &mut granted);
        }
        (changed, granted)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(8 + 24 * self.holders.len() + 17 * self.waiters.len());
        w.u8(VERSION);
        w.u8(self.holders.len().min(255) as u8);
        for h in self.holders.iter().take(255) {
            w.u32(h.worker);
            w.u64(h.seen_at);
            w.u8(h.active.len().min(255) as u8);
            for n in h.active.iter().take(255) {
                w.u32(*n);
            }
        }
        w.u32(self.waiters.len() as u32);
        for x in &self.waiters {
            w.u32(x.worker);
            w.u32(x.ticket);
            w.u8(x.class);
            w.u64(x.since);
        }
        w.buf
    }

    /// None for bytes this version did not write.
    pub fn decode(bytes: &[u8]) -> Option<BulkheadState> {
        let mut r = Reader::new(bytes);
        if r.u8()? != VERSION {
            return None;
        }
        let mut holders = Vec::new();
        for _ in 0..r.u8()? {
            let (worker, seen_at) = (r.u32()?, r.u64()?);
            let mut active = Vec::new();
            for _ in 0..r.u8()? {
                active.push(r.u32()?);
            }
            holders.push(Holder { worker, seen_at, active });
        }
        let n = r.u32()?;
        // No capacity taken from the count: a corrupt count fails on the short input instead.
        let mut waiters = Vec::new();
        for _ in 0..n {
            waiters.push(Waiter { worker: r.u32()?, ticket: r.u32()?, class: r.u8()?, since: r.u64()? });
        }
        r.is_empty().then_some(BulkheadState { holders, waiters })
    }
}

#[cfg(test)]
mod tests;
