//! The workers of one Envoy process that run Breakwater: each one's id (the token of its
//! wake-up queue) and when it last said it was alive. A worker that changes a breaker tells the
//! others through their queues, so nobody has to poll shared data to learn of a trip; the
//! roster says who the others are. A worker silent for `stale_after` is dropped (its VM died,
//! or it was a configuration's throw-away canary VM).

use crate::codec::{Reader, Writer};
use alloc::vec::Vec;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Roster {
    /// (worker, last seen), in joining order.
    members: Vec<(u32, u64)>,
}

const VERSION: u8 = 1;
/// A bound that no real process reaches (workers × reloads), so a corrupt or hostile roster
/// cannot make broadcasts unbounded.
pub const MAX_MEMBERS: usize = 1024;

impl Roster {
    /// `worker` is alive at `now`; members silent for longer than `stale_after_ns` are dropped.
    /// Returns whether the roster changed.
    pub fn renew(&mut self, worker: u32, now: u64, stale_after_ns: u64) -> bool {
        let before = self.members.clone();
        self.members.retain(|(w, seen)| *w == worker || seen.saturating_add(stale_after_ns) >= now);
        let full = self.members.len() >= MAX_MEMBERS;
        match self.members.iter_mut().find(|(w, _)| *w == worker) {
            Some(m) => m.1 = now,
            None if !full => self.members.push((worker, now)),
            None => {}
        }
        self.members != before
    }

    /// Every member but `worker`.
    pub fn others(&self, worker: u32) -> Vec<u32> {
        self.members.iter().map(|(w, _)| *w).filter(|w| *w != worker).collect()
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(3 + 12 * self.members.len());
        w.u8(VERSION);
        w.u32(self.members.len() as u32);
        for (worker, seen) in &self.members {
            w.u32(*worker);
            w.u64(*seen);
        }
        w.buf
    }

    pub fn decode(bytes: &[u8]) -> Option<Roster> {
        let mut r = Reader::new(bytes);
        if r.u8()? != VERSION {
            return None;
        }
        let n = r.u32()? as usize;
        if n > MAX_MEMBERS {
            return None;
        }
        let mut members = Vec::new();
        for _ in 0..n {
            members.push((r.u32()?, r.u64()?));
        }
        r.is_empty().then_some(Roster { members })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SECOND;

    #[test]
    fn workers_join_renew_and_the_silent_ones_are_dropped() {
        let mut r = Roster::default();
        assert!(r.renew(1, 0, 10 * SECOND));
        assert!(r.renew(2, SECOND, 10 * SECOND));
        assert_eq!(r.others(1), [2]);
        assert!(r.renew(1, 5 * SECOND, 10 * SECOND), "seen again: changed");
        // Worker 2 has been silent for more than 10 s.
        r.renew(1, 11 * SECOND + 1, 10 * SECOND);
        assert_eq!((r.len(), r.others(1)), (1, alloc::vec![]));
    }

    #[test]
    fn round_trips_and_refuses_what_it_did_not_write() {
        let mut r = Roster::default();
        r.renew(7, 3, SECOND);
        r.renew(9, 4, SECOND);
        assert_eq!(Roster::decode(&r.encode()), Some(r.clone()));
        let bytes = r.encode();
        assert_eq!(Roster::decode(&bytes[..bytes.len() - 1]), None);
        let mut huge = bytes.clone();
        huge[1..5].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(Roster::decode(&huge), None);
    }

    #[test]
    fn the_roster_is_bounded() {
        let mut r = Roster::default();
        for w in 0..(MAX_MEMBERS as u32 + 10) {
            r.renew(w, 0, SECOND);
        }
        assert_eq!(r.len(), MAX_MEMBERS);
    }
}
