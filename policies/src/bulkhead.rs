//! Bulkhead admission: at most `max_concurrent` requests of a policy in flight, across workers,
//! with an optional FIFO wait queue and priority classes.
//!
//! The whole state (who holds permits, who waits) is one value, updated atomically by the
//! caller (a CAS loop over shared data). Permits are counted per worker so that the permits of a
//! worker that stops reporting (its VM died) can be reclaimed; waiters name their worker and a
//! ticket so that the worker can be told, when a freed permit is handed to one of them.
//!
//! Invariant after every operation: no waiter could be admitted. A freed permit goes straight
//! to the first waiter, in arrival order, whose class may use it (`BulkheadState::grant`), so
//! a newcomer that is admissible never overtakes an earlier waiter of a class that could use the
//! same permit.
//!
//! **Leases.** Taking every permit through shared data costs two round trips per request, so
//! while the bulkhead is far from full (at most half of `max_concurrent` taken, nobody waiting)
//! a worker may take a small block of permits at once, its *lease*, and hand them to its
//! requests without touching shared data; a permit whose request ended stays with the lease,
//! idle. Leased permits count as taken, so the limit stays exact. Idle ones must never make
//! anyone wait or be refused: a request that finds no permit while other workers hold leases
//! waits for a *recall* instead ([`Acquire::Recalling`]): the lease holders give back their idle
//! permits ([`BulkheadState::trim_lease`]), which go to the waiters in arrival order. A waiter
//! that is waiting only for a recall (no room in the queue, or no queue) is refused once no
//! lease that may hold idle permits is left ([`Update::refused`]). Leases are for bulkheads
//! without priority classes.

use crate::adaptive::{AdaptiveConfig, Limiter};
use crate::codec::{Reader, Writer};
use alloc::vec::Vec;

/// A priority class's limits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClassLimit {
    /// Permits only this class may use.
    pub reserved: u32,
    /// At most this many in flight; None: only `max_concurrent` bounds it.
    pub max: Option<u32>,
    /// Shed (refuse at once) when the permits taken reach this many thousandths of the limit.
    pub shed_at_milli: Option<u32>,
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
    /// How long a request waits for lease holders to answer a recall, when it may not wait in
    /// the queue; they answer within one cross-worker hop unless their VM died.
    pub recall_timeout_ns: u64,
    /// An adaptive limit (see [`crate::adaptive`]) instead of `max_concurrent`, which is then
    /// its `max`.
    pub adaptive: Option<AdaptiveConfig>,
}

impl Default for BulkheadConfig {
    fn default() -> Self {
        BulkheadConfig {
            max_concurrent: 100,
            queue_max: 0,
            queue_timeout_ns: crate::SECOND,
            classes: alloc::vec![ClassLimit::default()],
            stale_after_ns: 10 * crate::SECOND,
            recall_timeout_ns: 100 * crate::MS,
            adaptive: None,
        }
    }
}

/// One worker's permits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder {
    pub worker: u32,
    /// Last time the worker touched its permits.
    pub seen_at: u64,
    /// Permits held one by one, by class.
    pub active: Vec<u32>,
    /// Permits of class 0 held as a block (the lease); some may be idle.
    pub lease: u32,
    /// The lease is being given back as its requests end: every permit in it is in use, so a
    /// recall has nothing to gain from it.
    pub draining: bool,
}

impl Holder {
    /// Whether some of its permits may sit idle (a lease not being drained).
    fn may_idle(&self) -> bool {
        self.lease > 0 && !self.draining
    }
}

/// A request waiting for a permit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Waiter {
    pub worker: u32,
    pub ticket: u32,
    pub class: u8,
    pub since: u64,
    /// Waits only for a recall of idle leased permits: it has no place in the queue, and is
    /// refused when no lease is left that could hold one.
    pub recall_only: bool,
}

/// What `acquire` did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Acquire {
    /// One permit, held one by one.
    Admitted,
    /// A lease of this many permits (the request uses one of them).
    Leased(u32),
    Queued,
    /// No permit free, but `workers` hold leases that may have idle permits: the request waits
    /// (as a waiter) while they are asked to give them back. `recall_only`: it has no place in
    /// the queue, and is refused if the recall frees nothing for it.
    Recalling {
        workers: Vec<u32>,
        recall_only: bool,
    },
    /// No permit and no room to wait: reject.
    Full,
    /// Its class is shed (see [`BulkheadState::sheds`]): reject.
    Shed,
}

/// The result of an operation: its value, whether the state changed (needs writing back), the
/// waiters that were handed a permit and must be woken by their workers, and the recall-only
/// waiters that must now be refused by theirs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Update<T> {
    pub value: T,
    pub changed: bool,
    pub granted: Vec<Waiter>,
    pub refused: Vec<Waiter>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BulkheadState {
    pub(crate) holders: Vec<Holder>,
    /// Arrival order.
    pub(crate) waiters: Vec<Waiter>,
    /// The adaptive limit, for a bulkhead that has one.
    pub(crate) limiter: Option<Limiter>,
}

const VERSION: u8 = 3;

/// Most permits a worker takes as one lease.
pub const MAX_LEASE: u32 = 16;

impl BulkheadState {
    /// Permits taken (in flight, or idle in a lease), all workers and classes.
    pub fn active(&self) -> u32 {
        self.holders
            .iter()
            .map(|h| h.active.iter().fold(h.lease, |a, n| a.saturating_add(*n)))
            .fold(0u32, |a, n| a.saturating_add(n))
    }

    /// Permits taken of one class (leases are of class 0).
    pub fn active_of(&self, class: usize) -> u32 {
        let leased = if class == 0 { self.leased() } else { 0 };
        self.holders.iter().filter_map(|h| h.active.get(class)).fold(leased, |a, n| a.saturating_add(*n))
    }

    /// Permits held in leases, all workers.
    pub fn leased(&self) -> u32 {
        self.holders.iter().fold(0u32, |a, h| a.saturating_add(h.lease))
    }

    pub fn queued(&self) -> u32 {
        self.waiters.len() as u32
    }

    /// Permits `worker` holds, one by one and leased.
    pub fn held_by(&self, worker: u32) -> u32 {
        self.holder(worker).map_or(0, |h| h.active.iter().sum::<u32>() + h.lease)
    }

    /// The lease `worker` holds.
    pub fn lease_of(&self, worker: u32) -> u32 {
        self.holder(worker).map_or(0, |h| h.lease)
    }

    fn holder(&self, worker: u32) -> Option<&Holder> {
        self.holders.iter().find(|h| h.worker == worker)
    }

    /// The size of a lease [`BulkheadState::ask`] would grant now, counting the request's own permit:
    /// 0 unless leasing is allowed (one class without a max of its own, nobody waiting) and taking
    /// it keeps the bulkhead at most half full. A quarter of the room left below half, at most
    /// [`MAX_LEASE`].
    fn lease_size(&self, cfg: &BulkheadConfig) -> u32 {
        if cfg.classes.len() > 1 || cfg.classes.iter().any(|c| c.max.is_some()) || !self.waiters.is_empty() {
            return 0;
        }
        let room = (self.limit(cfg) / 2).saturating_sub(self.active());
        (room / 4).max(u32::from(room > 0)).min(MAX_LEASE)
    }

    /// Workers other than `worker` whose leases may hold idle permits.
    pub(crate) fn idle_capable(&self, worker: u32) -> Vec<u32> {
        self.holders.iter().filter(|h| h.worker != worker && h.may_idle()).map(|h| h.worker).collect()
    }

    /// Whether a request of `class` may take a permit now: below the limit, below its class's
    /// max, and not eating into capacity the other classes reserve and do not use. A class the
    /// configuration does not have (a waiter from before a reload) has no limits of its own;
    /// class 255 is never admitted: a holder's counts are stored for 255 classes at most.
    pub fn admissible(&self, cfg: &BulkheadConfig, class: usize) -> bool {
        let (total, limit) = (self.active(), self.limit(cfg));
        let mine = self.active_of(class);
        if total >= limit || class >= usize::from(u8::MAX) {
            return false;
        }
        let own = cfg.classes.get(class).copied().unwrap_or_default();
        if own.max.is_some_and(|m| mine >= m) {
            return false;
        }
        let held_back: u32 = cfg
            .classes
            .iter()
            .enumerate()
            .filter(|(c, _)| *c != class)
            .map(|(c, l)| l.reserved.saturating_sub(self.active_of(c)))
            .fold(0u32, |a, n| a.saturating_add(n));
        limit - total > held_back
    }

    /// A request arrives: take a permit, or wait (if `may_wait` and there is room), or be refused.
    /// Never takes a lease (see [`BulkheadState::ask`]).
    pub fn acquire(
        &mut self,
        cfg: &BulkheadConfig,
        now: u64,
        worker: u32,
        class: u8,
        ticket: u32,
        may_wait: bool,
    ) -> Update<Acquire> {
        self.ask(cfg, now, Ask { worker, class, ticket, may_wait, may_pause: may_wait, lease: false })
    }

    /// A request arrives, as [`Ask`] says: with `lease`, while the bulkhead is far from full the
    /// worker takes a lease ([`Acquire::Leased`]); with `may_pause`, the request can be paused
    /// (its worker can be woken), so it may wait for a recall even where `may_wait` (a place in
    /// the queue) is false.
    pub fn ask(&mut self, cfg: &BulkheadConfig, now: u64, ask: Ask) -> Update<Acquire> {
        let (pruned, granted, refused) = self.prune(cfg, now);
        let Ask { worker, class, ticket, may_wait, may_pause, lease } = ask;
        let value = if self.sheds(cfg, usize::from(class)) {
            Acquire::Shed
        } else if self.admissible(cfg, usize::from(class)) {
            let size = if lease && class == 0 { self.lease_size(cfg) } else { 0 };
            if let Some(h) = self.holder_mut(now, worker).filter(|_| size > 0) {
                h.lease = h.lease.saturating_add(size);
                h.draining = false;
                self.saw_taken();
                Acquire::Leased(size)
            } else {
                self.take(now, worker, class);
                Acquire::Admitted
            }
        } else {
            let room = may_wait && self.queued() < cfg.queue_max;
            let holders = self.idle_capable(worker);
            if may_pause && !holders.is_empty() && self.queued() < MAX_WAITERS {
                self.waiters.push(Waiter { worker, ticket, class, since: now, recall_only: !room });
                Acquire::Recalling { workers: holders, recall_only: !room }
            } else if room {
                self.waiters.push(Waiter { worker, ticket, class, since: now, recall_only: false });
                Acquire::Queued
            } else {
                Acquire::Full
            }
        };
        Update { changed: pruned || !matches!(value, Acquire::Full | Acquire::Shed), value, granted, refused }
    }

    /// `worker` keeps only `keep` permits of its lease (those in use) and gives the rest back;
    /// `draining`: it will give back each of those too as its request ends. Answers a recall,
    /// returns an idle lease, and gives back a drained permit (`keep` one less).
    pub fn trim_lease(&mut self, cfg: &BulkheadConfig, now: u64, worker: u32, keep: u32, draining: bool) -> Update<()> {
        let (mut changed, mut granted, mut refused) = self.prune(cfg, now);
        if let Some(h) = self.holders.iter_mut().find(|h| h.worker == worker) {
            h.seen_at = now;
            h.lease = h.lease.min(keep);
            h.draining = draining && h.lease > 0;
            changed = true;
        }
        self.holders.retain(|h| h.lease > 0 || h.active.iter().any(|n| *n > 0));
        self.grant(cfg, now, &mut granted);
        self.settle_recalls(&mut refused);
        Update { value: (), changed, granted, refused }
    }

    /// A permit comes back; it goes to the first waiter that may use it. Returning a permit the
    /// worker does not hold (reclaimed after it was presumed dead) changes nothing.
    pub fn release(&mut self, cfg: &BulkheadConfig, now: u64, worker: u32, class: u8) -> Update<()> {
        let (pruned, mut granted, mut refused) = self.prune(cfg, now);
        let mut changed = pruned;
        if let Some(i) = self.holders.iter().position(|h| h.worker == worker) {
            if let Some(h) = self.holders.get_mut(i) {
                h.seen_at = now;
                if let Some(n) = h.active.get_mut(usize::from(class)).filter(|n| **n > 0) {
                    *n -= 1;
                }
                if h.lease == 0 && h.active.iter().all(|n| *n == 0) {
                    self.holders.remove(i);
                }
                changed = true;
            }
        }
        self.grant(cfg, now, &mut granted);
        self.settle_recalls(&mut refused);
        Update { value: (), changed, granted, refused }
    }

    /// A waiter leaves the queue (gave up, or its client left). False if it is not waiting:
    /// then it was granted a permit, which it now holds.
    pub fn withdraw(&mut self, cfg: &BulkheadConfig, now: u64, worker: u32, ticket: u32) -> Update<bool> {
        let (pruned, granted, refused) = self.prune(cfg, now);
        let found = match self.waiters.iter().position(|w| w.worker == worker && w.ticket == ticket) {
            Some(i) => {
                self.waiters.remove(i);
                true
            }
            None => false,
        };
        Update { value: found, changed: pruned || found, granted, refused }
    }

    /// A worker that holds permits says it is alive.
    pub fn renew(&mut self, cfg: &BulkheadConfig, now: u64, worker: u32) -> Update<()> {
        let (mut changed, granted, refused) = self.prune(cfg, now);
        if let Some(h) = self.holders.iter_mut().find(|h| h.worker == worker) {
            changed |= h.seen_at != now;
            h.seen_at = now;
        }
        Update { value: (), changed, granted, refused }
    }

    /// The holder of `worker`'s permits, made if it has none; marked as seen.
    fn holder_mut(&mut self, now: u64, worker: u32) -> Option<&mut Holder> {
        if !self.holders.iter().any(|h| h.worker == worker) {
            self.holders.push(Holder { worker, seen_at: now, active: Vec::new(), lease: 0, draining: false });
        }
        let h = self.holders.iter_mut().find(|h| h.worker == worker)?;
        h.seen_at = now;
        Some(h)
    }

    fn take(&mut self, now: u64, worker: u32, class: u8) {
        let Some(h) = self.holder_mut(now, worker) else { return };
        let c = usize::from(class);
        if h.active.len() <= c {
            h.active.resize(c + 1, 0);
        }
        if let Some(n) = h.active.get_mut(c) {
            *n = n.saturating_add(1);
        }
        self.saw_taken();
    }

    /// An adaptive limiter notes the permits taken (its window's peak).
    fn saw_taken(&mut self) {
        let taken = self.active();
        if let Some(l) = self.limiter.as_mut() {
            l.saw(taken);
        }
    }

    /// Hands permits to waiters, first in line first, while any waiter may take one.
    pub(crate) fn grant(&mut self, cfg: &BulkheadConfig, now: u64, granted: &mut Vec<Waiter>) {
        while let Some(i) = self.waiters.iter().position(|w| self.admissible(cfg, usize::from(w.class))) {
            let w = self.waiters.remove(i);
            self.take(now, w.worker, w.class);
            granted.push(w);
        }
    }

    /// Refuses the recall-only waiters once no lease is left that may hold an idle permit.
    pub(crate) fn settle_recalls(&mut self, refused: &mut Vec<Waiter>) {
        if self.holders.iter().any(Holder::may_idle) || !self.waiters.iter().any(|w| w.recall_only) {
            return;
        }
        let (gone, stay): (Vec<Waiter>, Vec<Waiter>) = self.waiters.drain(..).partition(|w| w.recall_only);
        self.waiters = stay;
        refused.extend(gone);
    }

    /// Drops the permits and waiters of workers presumed dead, then grants what that freed.
    fn prune(&mut self, cfg: &BulkheadConfig, now: u64) -> (bool, Vec<Waiter>, Vec<Waiter>) {
        let (holders, waiters) = (self.holders.len(), self.waiters.len());
        let dead: Vec<u32> = self
            .holders
            .iter()
            .filter(|h| h.seen_at.saturating_add(cfg.stale_after_ns) < now)
            .map(|h| h.worker)
            .collect();
        self.holders.retain(|h| !dead.contains(&h.worker));
        // A dead worker's waiters die with it: granting them a permit would hand it to nobody.
        self.waiters.retain(|w| !dead.contains(&w.worker));
        // A live worker gives up on its waiter at `since + timeout` (one sync late at most).
        let deadline = |w: &Waiter| {
            let timeout = if w.recall_only { cfg.recall_timeout_ns } else { cfg.queue_timeout_ns };
            w.since.saturating_add(timeout).saturating_add(cfg.stale_after_ns)
        };
        self.waiters.retain(|w| deadline(w) >= now);
        let (mut granted, mut refused) = (Vec::new(), Vec::new());
        let changed = holders != self.holders.len() || waiters != self.waiters.len();
        if changed {
            self.grant(cfg, now, &mut granted);
            self.settle_recalls(&mut refused);
        }
        (changed, granted, refused)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(45 + 24 * self.holders.len() + 17 * self.waiters.len());
        w.u8(VERSION);
        w.u8(self.holders.len().min(255) as u8);
        for h in self.holders.iter().take(255) {
            w.u32(h.worker);
            w.u64(h.seen_at);
            w.u32(h.lease);
            w.u8(u8::from(h.draining));
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
            w.u8(u8::from(x.recall_only));
        }
        match &self.limiter {
            None => w.u8(0),
            Some(l) => {
                w.u8(1);
                l.encode(&mut w);
            }
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
            let (worker, seen_at, lease, draining) = (r.u32()?, r.u64()?, r.u32()?, flag(r.u8()?)?);
            let mut active = Vec::new();
            for _ in 0..r.u8()? {
                active.push(r.u32()?);
            }
            holders.push(Holder { worker, seen_at, active, lease, draining });
        }
        let n = r.u32()?;
        // No capacity taken from the count: a corrupt count fails on the short input instead.
        let mut waiters = Vec::new();
        for _ in 0..n {
            let (worker, ticket, class, since) = (r.u32()?, r.u32()?, r.u8()?, r.u64()?);
            waiters.push(Waiter { worker, ticket, class, since, recall_only: flag(r.u8()?)? });
        }
        let limiter = if flag(r.u8()?)? { Some(Limiter::decode(&mut r)?) } else { None };
        r.is_empty().then_some(BulkheadState { holders, waiters, limiter })
    }
}

fn flag(b: u8) -> Option<bool> {
    match b {
        0 => Some(false),
        1 => Some(true),
        _ => None,
    }
}

/// How a request asks for a permit (see [`BulkheadState::ask`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ask {
    pub worker: u32,
    pub class: u8,
    pub ticket: u32,
    /// It may take a place in the queue.
    pub may_wait: bool,
    /// It can be paused and woken at all (even without a place in the queue, for a recall).
    pub may_pause: bool,
    /// It may take a lease.
    pub lease: bool,
}

/// Waiters of every kind together, recall-only ones included, are bounded too.
const MAX_WAITERS: u32 = 2 * 10_000;

#[cfg(test)]
mod tests;
