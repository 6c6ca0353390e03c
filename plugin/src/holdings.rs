//! The bulkhead permits this worker holds, per bulkhead (shared-data key), whatever
//! configuration took them: permits held one by one, and its lease.
//!
//! A lease is a block of permits taken at once while the bulkhead is far from full (see
//! `breakwater_policies::bulkhead`); requests take and return its permits here, with no host
//! call. Kept per VM rather than per root context: after a configuration change, permits taken
//! under the old configuration must still be renewed and returned.

use crate::registry::{Listed, Listing, Registry};
use crate::Compiled;
use alloc::rc::Rc;
use alloc::string::String;
use alloc::vec::Vec;
use core::cell::Cell;

#[derive(Debug, Default)]
pub struct Holding {
    pub key: String,
    /// The configuration to act with, kept only while permits are held; on the tick's list.
    listing: Listing,
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
}

impl Listed for Holding {
    fn listing(&self) -> &Listing {
        &self.listing
    }
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
        self.listing.owner()
    }
}

/// Every bulkhead this worker has used, by key; listed while it holds permits (or did at the
/// last tick).
#[derive(Debug, Default)]
pub struct Holdings(Registry<Holding>);

impl Holdings {
    /// The holding of bulkhead `key`, made on first use.
    pub fn of(&self, key: &str) -> Option<Rc<Holding>> {
        self.0.of(key, || Holding { key: key.into(), ..Holding::default() })
    }

    /// An existing holding (for a recall).
    pub fn find(&self, key: &[u8]) -> Option<Rc<Holding>> {
        self.0.find(key)
    }

    /// Records that `c`'s policy now acts on `h`, and lists it for the tick.
    pub fn touch(&self, h: &Rc<Holding>, c: &Rc<Compiled>, policy: usize) {
        self.0.touch(h, c, policy);
    }

    /// The listed holdings, for the tick; those left empty are unlisted (and let go of their
    /// configuration).
    pub fn take_listed(&self) -> Vec<Rc<Holding>> {
        self.0.keep_listed(|h| !h.is_empty())
    }
}
