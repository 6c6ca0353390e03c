//! `fallback`: what a refused request gets instead of the `reject` reply (see
//! [`crate::fallback`]). Parsed after the policy's other sections: which refusals it may answer
//! depends on them.

use super::{bounded, duration_in, err, expected, is_header_name, Obj, Reject, Result, DAY, SECOND};
use crate::reply::Refusal;
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use serde_json::Value;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fallback {
    /// The refusals it answers, by [`Refusal::index`].
    pub when: [bool; Refusal::ALL.len()],
    pub cache: Option<Cache>,
    /// The Envoy cluster a refused request is sent to instead (through the filter state its
    /// route matches, see [`crate::fallback`]).
    pub cluster: Option<String>,
    /// `static`: a fixed, degraded answer (parsed as `reject` is, any status from 200).
    pub fixed: Option<Reject>,
}

/// `cache`: the last good response per key, in shared data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cache {
    pub max_entries: u32,
    pub max_body: u32,
    pub ttl_ns: u64,
    /// Lower-case request header names whose values are in the key too (after the method, the
    /// host, the path and the query); a response may `Vary` on them.
    pub key_headers: Vec<String>,
}

/// What an entry may hold besides its body: the key (at most this many bytes, else the request
/// is not cached) and the response headers (likewise).
pub const MAX_KEY: usize = 2048;
pub const MAX_HEADERS: usize = 8192;
/// Largest cached body: Envoy's default buffer limit.
pub const MAX_CACHE_BODY: u32 = 1 << 20;
pub const MAX_ENTRIES: u32 = 100_000;
/// Shared memory one policy's cache may take at most, and all policies' together.
pub const MAX_CACHE_BYTES: u64 = 256 << 20;
pub const MAX_TOTAL_CACHE_BYTES: u64 = 1 << 30;

impl Cache {
    /// The most shared memory its entries can take.
    pub fn bound(&self) -> u64 {
        u64::from(self.max_entries) * (u64::from(self.max_body) + (MAX_KEY + MAX_HEADERS) as u64)
    }
}

/// Which refusals the policy can make: (circuit_open, bulkhead_full, queue_timeout, shed).
pub type Makes = [bool; Refusal::ALL.len()];

/// `path[i]`
#[inline(never)]
fn item(path: &str, i: usize) -> String {
    format!("{path}[{i}]")
}

pub fn fallback(v: &Value, path: &str, makes: Makes) -> Result<Fallback> {
    let o = Obj::new(v, path, &["when", "static", "cache", "cluster"])?;
    let mut when = makes;
    if let Some((v, p)) = o.get("when") {
        let list = match v.as_array() {
            Some(l) if !l.is_empty() => l,
            Some(_) => {
                return err(&p, "the list is empty: list the refusals to answer, such as [circuit_open], or leave out when for all of them")
            }
            None => return Err(expected(&p, "a list of refusals such as [circuit_open]", v)),
        };
        when = [false; Refusal::ALL.len()];
        for (i, v) in list.iter().enumerate() {
            let r = Refusal::ALL.into_iter().position(|r| v.as_str() == Some(r.label()));
            match r.filter(|r| makes.get(*r) == Some(&true)).and_then(|r| when.get_mut(r)) {
                Some(slot) => *slot = true,
                None => {
                    let what = "a refusal this policy makes: circuit_open, bulkhead_full, queue_timeout or shed";
                    return Err(expected(&item(&p, i), what, v));
                }
            }
        }
    }
    let fixed = o.get("static").map(|(v, p)| super::reject(v, &p, true)).transpose()?;
    let cache = o.get("cache").map(|(v, p)| cache(v, &p)).transpose()?;
    let cluster = match o.get("cluster") {
        None => None,
        Some((v, p)) => match v.as_str() {
            Some(c) if !c.is_empty() && c.len() <= 255 && !c.chars().any(char::is_control) => Some(c.to_string()),
            _ => return Err(expected(&p, "an Envoy cluster name", v)),
        },
    };
    if fixed.is_none() && cache.is_none() && cluster.is_none() {
        return err(path, "expected at least one of static, cache and cluster");
    }
    Ok(Fallback { when, cache, cluster, fixed })
}

#[inline(never)]
fn cache(v: &Value, path: &str) -> Result<Cache> {
    let o = Obj::new(v, path, &["max_entries", "max_body", "ttl", "key_headers"])?;
    let mut c = Cache { max_entries: 1000, max_body: 64 << 10, ttl_ns: 300 * SECOND, key_headers: Vec::new() };
    if let Some((v, p)) = o.get("max_entries") {
        c.max_entries = bounded(v, &p, 1, MAX_ENTRIES)?;
    }
    if let Some((v, p)) = o.get("max_body") {
        c.max_body = size(v).ok_or_else(|| {
            expected(&p, "a size from 1 byte to 1MiB: a number of bytes, or a string such as \"64KiB\"", v)
        })?;
    }
    if let Some((v, p)) = o.get("ttl") {
        c.ttl_ns = duration_in(v, &p, SECOND, DAY)?;
    }
    if let Some((v, p)) = o.get("key_headers") {
        let list = v.as_array().ok_or_else(|| expected(&p, "a list of request header names", v))?;
        for (i, v) in list.iter().enumerate() {
            match v.as_str() {
                Some(h) if is_header_name(h) && !h.bytes().any(|b| b.is_ascii_uppercase()) && i < 8 => {
                    c.key_headers.push(h.to_string())
                }
                _ => return Err(expected(&item(&p, i), "a lower-case request header name (at most 8)", v)),
            }
        }
    }
    if c.bound() > MAX_CACHE_BYTES {
        return err(
            path,
            "max_entries × (max_body + 10KiB of key and headers) must be at most 256MiB of shared memory",
        );
    }
    Ok(c)
}

/// Bytes: a whole number, or a string such as "64KiB"; from 1 byte to 1 MiB.
fn size(v: &Value) -> Option<u32> {
    let n = match v.as_str() {
        None => u32::try_from(v.as_u64()?).ok()?,
        Some(s) => {
            let digits = s.strip_suffix("KiB").filter(|d| d.bytes().all(|b| b.is_ascii_digit()))?;
            digits.parse::<u32>().ok()?.checked_mul(1 << 10)?
        }
    };
    (1..=MAX_CACHE_BODY).contains(&n).then_some(n)
}

/// All caches together fit in [`MAX_TOTAL_CACHE_BYTES`].
pub fn check_total(policies: &[super::Policy]) -> Result<()> {
    let total: u64 = policies.iter().filter_map(|p| p.fallback.as_ref()?.cache.as_ref()).map(Cache::bound).sum();
    if total > MAX_TOTAL_CACHE_BYTES {
        return err("policies", "the fallback caches of all policies together may take at most 1GiB of shared memory");
    }
    Ok(())
}
