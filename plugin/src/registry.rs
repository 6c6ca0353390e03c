//! A worker's records of shared things (breakers, bulkheads), by their shared-data key, kept per
//! VM whatever configuration uses them; and the list of those the tick visits. The watches
//! ([`crate::watch`]) and the holdings ([`crate::holdings`]) are both kept this way.

use crate::Compiled;
use alloc::rc::Rc;
use alloc::string::String;
use alloc::vec::Vec;
use core::cell::{Cell, RefCell};
use hashbrown::HashMap;

/// What a record needs to be listed: the configuration to act with (the latest that used it,
/// kept only while listed), and whether it is on the list.
#[derive(Debug, Default)]
pub struct Listing {
    owner: RefCell<Option<(Rc<Compiled>, usize)>>,
    listed: Cell<bool>,
}

impl Listing {
    /// The configuration and policy index to act with.
    pub fn owner(&self) -> Option<(Rc<Compiled>, usize)> {
        self.owner.try_borrow().ok().and_then(|o| o.clone())
    }

    /// Off the list: lets go of its configuration.
    fn release(&self) {
        self.listed.set(false);
        if let Ok(mut o) = self.owner.try_borrow_mut() {
            *o = None;
        }
    }
}

/// A record a [`Registry`] keeps.
pub trait Listed {
    fn listing(&self) -> &Listing;
}

/// Records by key, made on first use (bounded by configuration: one per breaker or bulkhead),
/// and the listed ones.
#[derive(Debug)]
pub struct Registry<T> {
    by_key: RefCell<HashMap<String, Rc<T>>>,
    listed: RefCell<Vec<Rc<T>>>,
}

impl<T> Default for Registry<T> {
    fn default() -> Self {
        Registry { by_key: RefCell::default(), listed: RefCell::default() }
    }
}

impl<T: Listed> Registry<T> {
    /// The record of `key`, made by `make` on first use.
    pub fn of(&self, key: &str, make: impl FnOnce() -> T) -> Option<Rc<T>> {
        let mut m = self.by_key.try_borrow_mut().ok()?;
        if let Some(r) = m.get(key) {
            return Some(r.clone());
        }
        let r = Rc::new(make());
        m.insert(key.into(), r.clone());
        Some(r)
    }

    /// An existing record (for a message from another worker).
    pub fn find(&self, key: &[u8]) -> Option<Rc<T>> {
        let key = core::str::from_utf8(key).ok()?;
        self.by_key.try_borrow().ok()?.get(key).cloned()
    }

    /// Records that `c`'s policy `policy` acts on `r`, and lists it for the tick.
    pub fn touch(&self, r: &Rc<T>, c: &Rc<Compiled>, policy: usize) {
        let l = r.listing();
        if let Ok(mut o) = l.owner.try_borrow_mut() {
            if !o.as_ref().is_some_and(|(oc, op)| Rc::ptr_eq(oc, c) && *op == policy) {
                *o = Some((c.clone(), policy));
            }
        }
        if !l.listed.replace(true) {
            if let Ok(mut list) = self.listed.try_borrow_mut() {
                list.push(r.clone());
            }
        }
    }

    /// The listed records, for the tick.
    pub fn listed(&self) -> Vec<Rc<T>> {
        self.listed.try_borrow().map(|l| l.clone()).unwrap_or_default()
    }

    /// The listed records for which `keep` holds; the others are unlisted (and let go of their
    /// configuration).
    pub fn keep_listed(&self, keep: impl Fn(&T) -> bool) -> Vec<Rc<T>> {
        let Ok(mut list) = self.listed.try_borrow_mut() else { return Vec::new() };
        list.retain(|r| {
            let kept = keep(r);
            if !kept {
                r.listing().release();
            }
            kept
        });
        list.clone()
    }

    /// Takes `r` off the list, letting go of its configuration.
    pub fn unlist(&self, r: &T) {
        r.listing().release();
        if let Ok(mut list) = self.listed.try_borrow_mut() {
            list.retain(|x| !core::ptr::eq(Rc::as_ptr(x), r));
        }
    }
}
