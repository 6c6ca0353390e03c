//! The bulkhead permits this worker holds, per bulkhead (shared-data key), whatever
//! configuration took them: permits held one by one, and its lease.
//!
//! A lease is a block of permits taken at once while the bulkhead is far from full (see
//! `breakwater_policies::bulkhead`); requests take and return its permits here, with no host
//! call. Kept per VM rather than per root context: after a configuration change, permits taken
//! under the old configuration must still be renewed and returned.

use crate::Compiled;
use alloc::rc::Rc;
use alloc::string::String;
use alloc::vec::Vec;
use core::cell::{Cell, RefCell};
use hashbrown::HashMap;

#[derive(Debug)]
pub struct Holding {
    pub key: String,
    /// The configuration to act with (the latest that used it); kept only while permits are held.
    owner: RefCell<Option<(Rc<Compiled>, usize)>>,
    /// Permits of the lease (all of class 0), and how many of them requests are using.
    pub lease: Cell<u32>,
    pub in_use: Cell<u32>,
    /// Every leased permit is in use and goes back as its request ends (after a recall).
    pub draining: Cell<bool>,
    /// A request used the lease since the last tick.
    pub used: Cell<bool>,
    /// Permits held one by one (every class).
    pub exact: Cell<u32>,
    /// When the shared state last heard from this worker about this bulkhead.
    pub renewed_at: Cell<u64>,
    /// On the list of holdings the tick visits.
    listed: Cell<bool>,
}

impl Holding {
    /// Leased permits free for a request now.
    pub fn idle(&self) -> u32 {
        self.lease.get().saturating_sub(self.in_use.get())
    }

    pub fn is_empty(&self) -> bool {
        self.lease.get() == 0 && self.exact.get() == 0
    }

    pub fn owner(&self) -> Option<(Rc<Compiled>, usize)> {
        self.owner.try_borrow().ok().and_then(|o| o.clone())
    }
}

#[derive(Debug, Default)]
pub struct Holdings {
    /// Every bulkhead this worker has used, by key: bounded by configuration.
    by_key: RefCell<HashMap<String, Rc<Holding>>>,
    /// Those that hold permits (or did at the last tick).
    listed: RefCell<Vec<Rc<Holding>>>,
}

impl Holdings {
    /// The holding of bulkhead `key`, made on first use.
    pub fn of(&self, key: &str) -> Option<Rc<Holding>> {
        let mut m = self.by_key.try_borrow_mut().ok()?;
        if let Some(h) = m.get(key) {
            return Some(h.clone());
        }
        let h = Rc::new(Holding {
            key: key.into(),
            owner: RefCell::new(None),
            lease: Cell::new(0),
            in_use: Cell::new(0),
            draining: Cell::new(false),
            used: Cell::new(false),
            exact: Cell::new(0),
            renewed_at: Cell::new(0),
            listed: Cell::new(false),
        });
        m.insert(key.into(), h.clone());
        Some(h)
    }

    /// An existing holding (for a recall).
    pub fn find(&self, key: &[u8]) -> Option<Rc<Holding>> {
        let key = core::str::from_utf8(key).ok()?;
        self.by_key.try_borrow().ok()?.get(key).cloned()
    }

    /// Records that `c`'s policy now acts on `h`, and lists it for the tick.
    pub fn touch(&self, h: &Rc<Holding>, c: &Rc<Compiled>, policy: usize) {
        if let Ok(mut o) = h.owner.try_borrow_mut() {
            if !o.as_ref().is_some_and(|(oc, op)| Rc::ptr_eq(oc, c) && *op == policy) {
                *o = Some((c.clone(), policy));
            }
        }
        if !h.listed.replace(true) {
            if let Ok(mut l) = self.listed.try_borrow_mut() {
                l.push(h.clone());
            }
        }
    }

    /// The listed holdings, for the tick; those left empty are unlisted (and let go of their
    /// configuration).
    pub fn take_listed(&self) -> Vec<Rc<Holding>> {
        let Ok(mut l) = self.listed.try_borrow_mut() else { return Vec::new() };
        l.retain(|h| {
            let keep = !h.is_empty();
            if !keep {
                h.listed.set(false);
                if let Ok(mut o) = h.owner.try_borrow_mut() {
                    *o = None;
                }
            }
            keep
        });
        l.clone()
    }
}
