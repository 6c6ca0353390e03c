//! One worker's state, shared by all of its root contexts (one per filter instance, and a new
//! one at every configuration change): Envoy runs one Wasm VM per worker thread.
//!
//! * its id in bulkhead state (the token of its wake-up queue) and whether requests may wait;
//! * its [`Waiters`]: requests it paused in a bulkhead queue;
//! * its [`Holdings`]: bulkhead permits and leases it holds;
//! * its [`Watches`]: its picture of each breaker, and the successes it has yet to hand over;
//! * the policies its next tick must visit (anything counted, batched or viewed since the last
//!   one): the tick costs in proportion to what changed, not to the number of policies;
//! * the time as of its last clock read, for what only needs the bucket it falls in.

use crate::holdings::Holdings;
use crate::host::Host;
use crate::waiters::Waiters;
use crate::watch::Watches;
use crate::{Compiled, Policy};
use alloc::rc::{Rc, Weak};
use alloc::vec::Vec;
use breakwater_policies::{Roster, SECOND};
use core::cell::{Cell, RefCell};

#[derive(Debug, Default)]
pub struct Vm {
    /// This worker's id in bulkhead state: the token of its wake-up queue, unique in the process.
    pub worker: Cell<u32>,
    /// Whether the wake-up queue exists; without it no request may be paused.
    pub can_wait: Cell<bool>,
    pub waiters: Waiters,
    pub holdings: Holdings,
    pub watches: Watches,
    /// Requests sent to a fallback cluster, and the cache's recent stores.
    pub fallback: crate::fallback::Worker,
    listed: RefCell<Vec<(Rc<Compiled>, usize)>>,
    /// Every configuration of this VM still in use, oldest first: what the control endpoint
    /// shows and steers.
    configs: RefCell<Vec<Weak<Compiled>>>,
    now: Cell<u64>,
    /// When this worker last renewed its place in the roster.
    roster_at: Cell<u64>,
    /// The tick runs at the coarse pace ([`crate::tick::COARSE_NS`]), and for how many ticks
    /// nothing has needed the fine one.
    coarse: Cell<bool>,
    calm_ticks: Cell<u32>,
    /// The next tick flushes every count: the pace just turned fine because something happened
    /// (a trip, a request waiting), and its counts belong with it on the dashboards.
    flush_next: Cell<bool>,
}

/// The roster of Breakwater's workers in this process (see `breakwater_policies::roster`).
pub const ROSTER_KEY: &str = "breakwater/v1/roster";
/// A worker renews its place this often, and is dropped after `ROSTER_STALE` of silence.
const ROSTER_RENEW: u64 = 2 * SECOND;
const ROSTER_STALE: u64 = 10 * SECOND;
/// Ticks with nothing timed to `sync_interval` before the tick slows to the coarse pace (a
/// second at the default 50 ms), so a worker that briefly queues does not flap.
const CALM_TICKS: u32 = 20;

impl Vm {
    pub fn new(worker: u32, can_wait: bool) -> Self {
        Vm { worker: Cell::new(worker), can_wait: Cell::new(can_wait), ..Vm::default() }
    }

    /// Reads the clock (~1k instructions) and remembers it.
    pub fn clock(&self, host: &impl Host) -> u64 {
        let now = host.now_ns();
        self.now.set(now);
        now
    }

    /// The time of the last clock read: at most one tick old. Good enough for what only needs
    /// the bucket a moment falls in (batched successes, the retry budget's stock).
    pub fn coarse_now(&self) -> u64 {
        self.now.get()
    }

    /// Paces the tick, at the end of each: every `sync_interval` while something on this worker
    /// is timed to it (`fine`: requests waiting in a bulkhead queue, a breaker open or about to
    /// trip), at the coarse pace after `CALM_TICKS` (20) ticks with nothing of the kind. A tick costs
    /// Envoy about 10k instructions whatever it does; what a healthy worker hands over
    /// (stats every 250 ms, batches once a second) needs no more.
    pub fn pace(&self, host: &impl Host, fine: bool) {
        if fine {
            self.calm_ticks.set(0);
            self.hurry(host);
        } else if !self.coarse.get() {
            let calm = self.calm_ticks.get().saturating_add(1);
            self.calm_ticks.set(calm);
            if calm >= CALM_TICKS && host.pace_tick(false) {
                self.coarse.set(true);
            }
        }
    }

    /// Back to the fine pace at once (the request path: a request starts waiting, a breaker
    /// opens or turns suspect). Free when the pace is fine already.
    pub fn hurry(&self, host: &impl Host) {
        if self.coarse.get() && host.pace_tick(true) {
            self.coarse.set(false);
            self.calm_ticks.set(0);
            self.flush_next.set(true);
        }
    }

    /// Whether this tick flushes every count it visits: at the coarse pace, and on the first
    /// tick after the pace turned fine.
    pub fn flushes_all(&self) -> bool {
        self.flush_next.replace(false) || self.coarse.get()
    }

    /// The tick runs at the coarse pace.
    pub fn is_coarse(&self) -> bool {
        self.coarse.get()
    }

    /// A (re-)elected ticker starts at the fine pace.
    pub fn paced_fine(&self) {
        self.coarse.set(false);
        self.calm_ticks.set(0);
    }

    /// Renews this worker's place in the roster, at most every two seconds (`force`: now).
    pub fn renew_roster(&self, host: &impl Host, now: u64, force: bool) {
        if !force && now.saturating_sub(self.roster_at.get()) < ROSTER_RENEW {
            return;
        }
        let worker = self.worker.get();
        let done = crate::store::apply(host, ROSTER_KEY, |r: &mut Roster| ((), r.renew(worker, now, ROSTER_STALE)));
        if done.is_some() {
            self.roster_at.set(now);
        }
    }

    /// Sends `message` to every other worker of the roster. Rare (breaker transitions and the
    /// like), so the roster is read afresh each time.
    pub fn broadcast(&self, host: &impl Host, message: &[u8]) {
        let (roster, _) = crate::store::load::<Roster>(host, ROSTER_KEY);
        for peer in roster.others(self.worker.get()) {
            host.enqueue(peer, message);
        }
    }

    /// Adds a new configuration (from `on_configure`) to what the control endpoint sees.
    pub fn register(&self, c: &Rc<Compiled>) {
        if let Ok(mut configs) = self.configs.try_borrow_mut() {
            configs.retain(|w| w.strong_count() > 0);
            configs.push(Rc::downgrade(c));
        }
    }

    /// The configurations still in use, newest first (an old one lives on while its streams
    /// finish).
    pub fn configs(&self) -> Vec<Rc<Compiled>> {
        self.configs.try_borrow().map(|c| c.iter().rev().filter_map(Weak::upgrade).collect()).unwrap_or_default()
    }

    /// Puts the policy on the next tick's list (once).
    pub fn list(&self, c: &Rc<Compiled>, p: &Policy) {
        let newly = p.local(|l| !core::mem::replace(&mut l.listed, true));
        if newly {
            if let Ok(mut listed) = self.listed.try_borrow_mut() {
                listed.push((c.clone(), p.index));
            }
        }
    }

    /// The policies listed since the last tick; each is unlisted as it is taken.
    pub fn take_listed(&self) -> Vec<(Rc<Compiled>, usize)> {
        let taken = self.listed.try_borrow_mut().map(|mut l| core::mem::take(&mut *l)).unwrap_or_default();
        for (c, i) in &taken {
            if let Some(p) = c.policy(*i) {
                p.local(|l| l.listed = false);
            }
        }
        taken
    }
}

/// Messages on a worker's wake-up queue: a one-byte kind, then its data.
pub mod message {
    use alloc::vec::Vec;

    /// A waiter was handed a permit: resume it. Data: its ticket (u32 LE).
    pub const GRANT: u8 = 0;
    /// A recall-only waiter got nothing: refuse it. Data: its ticket.
    pub const REFUSE: u8 = 1;
    /// Give back the idle permits of your lease of this bulkhead. Data: the bulkhead's key.
    pub const RECALL: u8 = 2;
    /// A breaker changed: drop your view of it and hand over your batch. Data: its key.
    pub const REFRESH: u8 = 3;

    pub fn ticket(kind: u8, ticket: u32) -> Vec<u8> {
        let mut m = Vec::with_capacity(5);
        m.push(kind);
        m.extend_from_slice(&ticket.to_le_bytes());
        m
    }

    /// A message about the policy state under `key`.
    pub fn about(kind: u8, key: &str) -> Vec<u8> {
        let mut m = Vec::with_capacity(1 + key.len());
        m.push(kind);
        m.extend_from_slice(key.as_bytes());
        m
    }
}
