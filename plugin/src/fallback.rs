//! Fallbacks: what a request Breakwater refused gets instead of the `reject` reply, for the
//! refusals a policy's `fallback.when` lists. In order:
//!
//! 1. **cache**: the last good response to the same key (GET and HEAD only), from shared data,
//!    with `x-breakwater: fallback-cache` and its `age`;
//! 2. **cluster**: the request goes on to another Envoy cluster. Breakwater sets the filter state
//!    `wasm.breakwater_fallback` to the cluster's name and clears the route cache; the route
//!    configuration has a route that matches that filter state and sends to that cluster. The
//!    router has seen nothing yet, so the body streams on as usual (gRPC included) and the
//!    failing upstream is never contacted. Its answer is marked `x-breakwater: fallback-cluster`;
//! 3. **static**: a fixed answer, `x-breakwater: fallback-static`;
//! 4. else the reject reply. A gRPC request gets neither a cached nor a static answer (Envoy
//!    would turn a local reply into a gRPC error): only the cluster, or the reject reply.
//!
//! Caching costs only policies with a cache, and only on cacheable answers: the response headers
//! (read anyway for a breaker), then the request headers (one call, for the key), then the body
//! chunks as they pass (never held back) and one shared-data write, at most once a second per
//! key and worker. An entry lives in one of `max_entries` slots (`hash(key) mod max_entries`), so
//! the number of keys and the memory are bounded by configuration, never by traffic; a
//! collision replaces the slot's entry, and a lookup checks the whole key.

use crate::config::fallback::{Cache, MAX_HEADERS, MAX_KEY};
use crate::filter::Stream;
use crate::headers::{decimal, parse_u64, HeaderMap};
use crate::host::Host;
use crate::reply::{reject, Refusal};
use crate::vm::Vm;
use crate::{Compiled, Policy};
use alloc::rc::Rc;
use alloc::string::String;
use alloc::vec::Vec;
use breakwater_policies::SECOND;
use core::cell::{Cell, RefCell};

/// The filter state (`wasm.` + this) the fallback route matches on.
pub const FILTER_STATE: &str = "breakwater_fallback";

/// Fallback kinds, as the `kind` label names them; with `result` (`served`, `missed`) they index
/// the counts: `2 * kind + missed`.
pub const KINDS: [&str; 3] = ["static", "cache", "cluster"];
/// The labels of `fallback_total`, in that order.
pub const LABELS: [&str; 6] = [
    ".kind.static.result.served",
    ".kind.static.result.missed",
    ".kind.cache.result.served",
    ".kind.cache.result.missed",
    ".kind.cluster.result.served",
    ".kind.cluster.result.missed",
];
const STATIC: usize = 0;
const CACHE: usize = 1;
const CLUSTER: usize = 2;

/// Slots of a worker's table of recent stores.
const RECENT: usize = 256;

/// A stream sent to a fallback cluster, until it ends.
#[derive(Debug, Clone, Copy)]
struct Reroute {
    ticket: u32,
    /// The index of the policy whose fallback sent it.
    policy: usize,
    /// Its response headers came, and it was counted served or missed.
    decided: bool,
}

/// One worker's fallback state.
#[derive(Debug)]
pub struct Worker {
    /// Streams sent to a fallback cluster, until they end: counted, and marked if the fallback
    /// cluster answered, at their response headers.
    rerouted: RefCell<Vec<Reroute>>,
    /// The request whose headers are being decided was just sent to a fallback cluster by this
    /// policy (its index).
    pending: Cell<Option<usize>>,
    /// (key hash, when) of recent stores, direct-mapped: a worker stores a key at most once a second.
    recent: RefCell<[(u64, u64); RECENT]>,
    /// Streams answered from the cache whose `content-type` Envoy's local reply changes, until
    /// their response headers: the stored one to set back, or None to remove Envoy's.
    replayed: RefCell<Vec<(u32, ContentType)>>,
    /// Likewise for the request whose headers are being decided.
    pending_replay: RefCell<Option<ContentType>>,
}

/// The `content-type` a cached answer had (None: it had none).
type ContentType = Option<Vec<u8>>;

impl Default for Worker {
    fn default() -> Self {
        Worker {
            rerouted: RefCell::default(),
            pending: Cell::default(),
            recent: RefCell::new([(0, 0); RECENT]),
            replayed: RefCell::default(),
            pending_replay: RefCell::default(),
        }
    }
}

impl Worker {
    /// Whether the request refused on its headers just now was sent to a fallback cluster (it
    /// goes on); it is remembered as `ticket` until it ends.
    pub fn take_rerouted(&self, ticket: u32) -> bool {
        if let Some(fix) = self.pending_replay.try_borrow_mut().ok().and_then(|mut p| p.take()) {
            self.replay(ticket, fix);
        }
        match self.pending.take() {
            Some(policy) => {
                self.mark(ticket, policy);
                true
            }
            None => false,
        }
    }

    fn replay(&self, ticket: u32, fix: ContentType) {
        if let Ok(mut r) = self.replayed.try_borrow_mut() {
            r.push((ticket, fix));
        }
    }

    /// The content-type fix of stream `ticket`, answered from the cache, once.
    fn take_replay(&self, ticket: u32) -> Option<ContentType> {
        let mut r = self.replayed.try_borrow_mut().ok()?;
        let i = r.iter().position(|(t, _)| *t == ticket)?;
        Some(r.swap_remove(i).1)
    }

    fn mark(&self, ticket: u32, policy: usize) {
        if let Ok(mut r) = self.rerouted.try_borrow_mut() {
            r.push(Reroute { ticket, policy, decided: false });
        }
    }

    /// Whether stream `ticket` was sent to a fallback cluster.
    pub fn is_rerouted(&self, ticket: u32) -> bool {
        self.rerouted.try_borrow().is_ok_and(|r| r.iter().any(|t| t.ticket == ticket))
    }

    /// The policy that sent stream `ticket` to its fallback cluster, the first time its
    /// response headers come (then it is decided); None for any other stream.
    fn decide(&self, ticket: u32) -> Option<usize> {
        let mut r = self.rerouted.try_borrow_mut().ok()?;
        let t = r.iter_mut().find(|t| t.ticket == ticket && !t.decided)?;
        t.decided = true;
        Some(t.policy)
    }

    /// The stream is over. Returns the policy that sent it to its fallback cluster if no
    /// response headers came (it was not served).
    pub fn done(&self, ticket: u32) -> Option<usize> {
        self.take_replay(ticket);
        let mut r = self.rerouted.try_borrow_mut().ok()?;
        let i = r.iter().position(|t| t.ticket == ticket)?;
        let t = r.swap_remove(i);
        (!t.decided).then_some(t.policy)
    }

    /// Whether this worker stored `hash` less than a second before `now`; `store`: it is
    /// about to (noted now).
    fn stored_lately(&self, hash: u64, now: u64, store: bool) -> bool {
        let Ok(mut recent) = self.recent.try_borrow_mut() else { return true };
        let Some(slot) = recent.get_mut(hash as usize % RECENT) else { return true };
        if slot.0 == hash && now.saturating_sub(slot.1) < SECOND {
            return true;
        }
        if store {
            *slot = (hash, now);
        }
        false
    }
}

/// Whether the policy keeps a cache (and so reads the answers it may store).
pub fn caches(p: &Policy) -> bool {
    p.cfg.fallback.as_ref().is_some_and(|f| f.cache.is_some())
}

/// Answers a request Breakwater refused for `why`: with the policy's fallback if it has one for
/// `why` and one applies, else with the reject reply. `paused`: the ticket of a request this
/// worker paused (a queued one, the current context after `enter`), which a fallback cluster
/// resumes; None for the request whose headers are being decided (see
/// [`Worker::take_rerouted`]). The caller has listed the policy for the tick.
pub fn refuse(host: &impl Host, vm: &Vm, p: &Policy, why: Refusal, retry_after_ns: u64, paused: Option<u32>) {
    let applies = p.cfg.fallback.as_ref().filter(|f| f.when.get(why.index()).copied().unwrap_or(false));
    if !applies.is_some_and(|f| answer(host, vm, p, f, paused)) {
        reject(host, p, why, retry_after_ns);
    }
}

fn count(p: &Policy, kind: usize, served: bool) {
    p.local(|l| {
        if let Some(n) = l.counts.fallback.get_mut(2 * kind + usize::from(!served)) {
            *n = n.saturating_add(1);
        }
    });
}

fn answer(host: &impl Host, vm: &Vm, p: &Policy, f: &crate::config::Fallback, paused: Option<u32>) -> bool {
    let mut grpc = None;
    if let Some(cache) = &f.cache {
        let request = host.request_headers().unwrap_or_default();
        let request = HeaderMap::new(&request);
        let is_grpc = request.get(b"content-type").is_some_and(is_grpc);
        grpc = Some(is_grpc);
        let hit = !is_grpc && serve_cached(host, vm, p, cache, &request, paused);
        count(p, CACHE, hit);
        if hit {
            return true;
        }
    }
    if let Some(cluster) = &f.cluster {
        // Counted when its response headers show which cluster answered (or missed now).
        let sent = host.set_property(FILTER_STATE, cluster.as_bytes()) && host.clear_route_cache();
        if !sent {
            count(p, CLUSTER, false);
        } else {
            match paused {
                Some(ticket) => {
                    vm.fallback.mark(ticket, p.index);
                    host.resume_request();
                }
                None => vm.fallback.pending.set(Some(p.index)),
            }
            return true;
        }
    }
    if let Some(s) = &f.fixed {
        let is_grpc = grpc.unwrap_or_else(|| host.request_header("content-type").as_deref().is_some_and(is_grpc));
        count(p, STATIC, !is_grpc);
        if !is_grpc {
            let mut headers: Vec<(&str, &[u8])> = Vec::with_capacity(1 + s.headers.len());
            headers.push(("x-breakwater", b"fallback-static"));
            headers.extend(s.headers.iter().map(|(k, v)| (k.as_str(), v.as_bytes())));
            host.send_http_reply(s.status, &headers, s.body.as_deref().unwrap_or_default().as_bytes());
            return true;
        }
    }
    false
}

fn is_grpc(content_type: &[u8]) -> bool {
    content_type.starts_with(b"application/grpc")
}

/// Answers from the cache if it holds a fresh entry for the request's key.
fn serve_cached(
    host: &impl Host,
    vm: &Vm,
    p: &Policy,
    cache: &Cache,
    request: &HeaderMap,
    paused: Option<u32>,
) -> bool {
    let method = request.get(b":method").unwrap_or_default();
    if method != b"GET" && method != b"HEAD" {
        return false;
    }
    let Some(key) = key(cache, request) else { return false };
    let Some((bytes, _)) = host.shared_get(&slot_key(p, cache, hash(p, &key))) else { return false };
    let Some(e) = Entry::decode(&bytes).filter(|e| e.key == key.as_slice()) else { return false };
    let age = vm.clock(host).saturating_sub(e.stored_at);
    if age > cache.ttl_ns {
        return false;
    }
    let mut digits = [0u8; 20];
    let mut headers: Vec<(&str, &[u8])> = Vec::new();
    let mut upstream_age = 0;
    let mut content_type = None;
    for (name, value) in HeaderMap::new(e.headers).iter() {
        if name == b"age" {
            upstream_age = age_seconds(value).unwrap_or(upstream_age);
        }
        if name == b"content-type" {
            content_type = Some(value);
        }
        let stored = !(name.starts_with(b":") || name.starts_with(b"x-envoy-") || NOT_STORED.contains(&name));
        if let (true, Ok(name)) = (stored, core::str::from_utf8(name)) {
            headers.push((name, value));
        }
    }
    headers.push(("x-breakwater", b"fallback-cache"));
    // RFC 9111 §5.1: the age it had when stored (the upstream's Age) plus the time since.
    let age = upstream_age.saturating_add(age / SECOND).min(MAX_AGE);
    headers.push(("age", decimal(age, &mut digits)));
    host.send_http_reply(u32::from(e.status), &headers, e.body);
    // Envoy's local reply adds `content-type: text/plain` to a body without one, and drops it
    // from an empty body: put it back as it was when the reply passes this filter.
    let fix = match (content_type, e.body.is_empty()) {
        (None, false) => Some(None),
        (Some(ct), true) => Some(Some(ct.to_vec())),
        _ => None,
    };
    if let Some(fix) = fix {
        match paused {
            Some(ticket) => vm.fallback.replay(ticket, fix),
            None => {
                if let Ok(mut p) = vm.fallback.pending_replay.try_borrow_mut() {
                    *p = Some(fix);
                }
            }
        }
    }
    true
}

/// The largest `Age` sent (RFC 9111 §1.2.2: a larger or overflowing one is sent as this).
const MAX_AGE: u64 = 1 << 31;

/// An `Age` value: delta-seconds (digits only, at most [`MAX_AGE`]); None if it is not one (it
/// is then ignored).
fn age_seconds(value: &[u8]) -> Option<u64> {
    let digits = !value.is_empty() && value.iter().all(u8::is_ascii_digit);
    digits.then(|| parse_u64(value).unwrap_or(MAX_AGE).min(MAX_AGE))
}

/// The cache key of a request: its method, host (`:authority`), path and query, then the key
/// headers' values, each length-prefixed. HEAD shares GET's entry. None if it is longer than
/// [`MAX_KEY`].
fn key(cache: &Cache, request: &HeaderMap) -> Option<Vec<u8>> {
    let path = request.get(b":path").unwrap_or_default();
    let (path, query) = match path.iter().position(|b| *b == b'?') {
        Some(i) => path.split_at(i),
        None => (path, &b""[..]),
    };
    let method = match request.get(b":method") {
        Some(b"HEAD") | None => &b"GET"[..],
        Some(m) => m,
    };
    let parts = [method, request.get(b":authority").unwrap_or_default(), path, query];
    let mut key = Vec::with_capacity(64);
    let headers = cache.key_headers.iter().map(|h| request.get(h.as_bytes()).unwrap_or_default());
    for part in parts.into_iter().chain(headers) {
        key.extend_from_slice(&(part.len() as u32).to_le_bytes());
        key.extend_from_slice(part);
    }
    (key.len() <= MAX_KEY).then_some(key)
}

/// FNV-1a (64 bits) of the policy's cache and the key.
fn hash(p: &Policy, key: &[u8]) -> u64 {
    p.cache_key
        .as_bytes()
        .iter()
        .chain(key)
        .fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3))
}

/// The shared-data key of the slot of the key hashed `hash`.
fn slot_key(p: &Policy, cache: &Cache, hash: u64) -> String {
    alloc::format!("{}{}", p.cache_key, hash % u64::from(cache.max_entries.max(1)))
}

/// A GET whose answer the cache may store: its key, read with its headers (Envoy lets a filter
/// read request headers only while it handles them).
#[derive(Debug)]
pub struct Pending {
    hash: u64,
    key: Vec<u8>,
}

/// A response being captured for the cache as its body passes.
#[derive(Debug)]
pub struct Capture {
    slot: String,
    key: Vec<u8>,
    status: u16,
    headers: Vec<u8>,
    body: Vec<u8>,
    max_body: usize,
}

/// At the request headers of a stream under a policy with a cache: a GET without
/// `Authorization` and without `Cache-Control: no-store`, whose key this worker did not store
/// in the last second, may have its answer stored. One read of the request headers.
pub fn on_request_headers(c: &Compiled, host: &impl Host, vm: &Vm, stream: &Stream) -> Option<Pending> {
    let Stream::Tracked(t) = stream else { return None };
    let p = c.policy(t.policy)?;
    let cache = p.cfg.fallback.as_ref()?.cache.as_ref()?;
    let request = host.request_headers()?;
    let request = HeaderMap::new(&request);
    let no_store = request.get(b"cache-control").is_some_and(|v| any_token(v, &[b"no-store"], true));
    if request.get(b":method") != Some(b"GET") || request.get(b"authorization").is_some() || no_store {
        return None;
    }
    let key = key(cache, &request)?;
    let hash = hash(p, &key);
    (!vm.fallback.stored_lately(hash, vm.coarse_now(), false)).then_some(Pending { hash, key })
}

/// Response headers that are not stored: they describe this hop or this moment, or Envoy and
/// Breakwater set them (so do pseudo-headers and `x-envoy-*`).
const NOT_STORED: [&[u8]; 11] = [
    b"connection",
    b"keep-alive",
    b"transfer-encoding",
    b"te",
    b"trailer",
    b"upgrade",
    b"proxy-connection",
    b"content-length",
    b"date",
    b"age",
    b"x-breakwater",
];

/// Whether a token of a comma-separated header value (trimmed, without its `=value`:
/// `private="x"` is `private`) is among `names` (`among`), or is not (`!among`).
fn any_token(value: &[u8], names: &[&[u8]], among: bool) -> bool {
    let mut rest = value;
    loop {
        let end = rest.iter().position(|b| *b == b',').unwrap_or(rest.len());
        let (t, more) = rest.split_at(end);
        let t = t.split_at(t.iter().position(|b| *b == b'=').unwrap_or(t.len())).0.trim_ascii();
        if !t.is_empty() && names.iter().any(|n| t.eq_ignore_ascii_case(n)) == among {
            return true;
        }
        match more.split_first() {
            Some((_, more)) => rest = more,
            None => return false,
        }
    }
}

/// At the response headers. A stream sent to a fallback cluster is counted served, and marked,
/// if the fallback cluster answered (see `answered`). An upstream's
/// cacheable answer to a request that may be stored ([`Pending`]) starts a capture (stored at
/// once if it has no body): 2xx but 206, not gRPC, no `Cache-Control: no-store` or `private`,
/// no `Set-Cookie`, no `Vary` beyond the key's headers, a body that may fit.
#[allow(clippy::too_many_arguments)]
pub fn on_response_headers(
    c: &Rc<Compiled>,
    host: &impl Host,
    vm: &Vm,
    ticket: u32,
    stream: &Stream,
    response: Option<&[u8]>,
    end_of_stream: bool,
    pending: Option<Pending>,
) -> Option<Capture> {
    if let Some(fix) = vm.fallback.take_replay(ticket) {
        match fix {
            Some(content_type) => host.set_response_header("content-type", &content_type),
            None => host.remove_response_header("content-type"),
        }
        return None;
    }
    if vm.fallback.is_rerouted(ticket) {
        if let Some(p) = vm.fallback.decide(ticket).and_then(|i| c.policy(i)) {
            answered(c, host, vm, p);
        }
        return None;
    }
    let (Stream::Tracked(t), Some(response), Some(pending)) = (stream, response, pending) else { return None };
    let p = c.policy(t.policy)?;
    let cache = p.cfg.fallback.as_ref()?.cache.as_ref()?;
    let r = &t.response;
    if !(200..300).contains(&r.status) || r.status == 206 || r.grpc || !r.from_upstream() {
        return None;
    }
    let max_body = cache.max_body as usize;
    for (name, value) in HeaderMap::new(response).iter() {
        let refused = match name {
            b"cache-control" => any_token(value, &[b"no-store", b"private"], true),
            b"set-cookie" => true,
            b"vary" => any_token(value, &cache.key_headers.iter().map(String::as_bytes).collect::<Vec<_>>(), false),
            b"content-length" => parse_u64(value).is_none_or(|n| n > max_body as u64),
            _ => false,
        };
        if refused {
            return None;
        }
    }
    if response.len() > MAX_HEADERS || vm.fallback.stored_lately(pending.hash, vm.coarse_now(), true) {
        return None;
    }
    let slot = slot_key(p, cache, pending.hash);
    let capture =
        Capture { slot, key: pending.key, status: r.status, headers: response.to_vec(), body: Vec::new(), max_body };
    if end_of_stream {
        store(host, capture);
        return None;
    }
    Some(capture)
}

/// The response headers of a stream the policy sent to its fallback cluster: served (and marked
/// `x-breakwater: fallback-cluster`) only if that cluster answered, by Envoy's `xds.cluster_name`;
/// else missed, with one warning per policy and configuration on a worker: no route matched the
/// filter state (the request went where it was going), or its cluster does not exist (Envoy's
/// local reply, no cluster). One property read, on rerouted streams only.
fn answered(c: &Rc<Compiled>, host: &impl Host, vm: &Vm, p: &Policy) {
    let Some(cluster) = p.cfg.fallback.as_ref().and_then(|f| f.cluster.as_deref()) else { return };
    let by = host.property(&["xds", "cluster_name"]);
    let served = by.as_deref() == Some(cluster.as_bytes());
    if served {
        host.set_response_header("x-breakwater", b"fallback-cluster");
    } else if !p.fallback_warned.replace(true) {
        let why = match &by {
            Some(by) => alloc::format!(
                "request answered by cluster {}: no route matches filter state wasm.{FILTER_STATE}",
                String::from_utf8_lossy(by)
            ),
            None => alloc::format!(
                "request answered by no cluster: Envoy has no cluster for the route that matches filter state wasm.{FILTER_STATE}"
            ),
        };
        log::warn!("policy {}: fallback cluster {cluster}: {why}", p.cfg.name);
    }
    count(p, CLUSTER, served);
    vm.list(c, p);
}

/// At the end of a stream: one sent to a fallback cluster that got no response headers (reset,
/// cancelled) was not served.
pub fn on_end(c: &Rc<Compiled>, vm: &Vm, ticket: u32) {
    if let Some(p) = vm.fallback.done(ticket).and_then(|i| c.policy(i)) {
        count(p, CLUSTER, false);
        vm.list(c, p);
    }
}

/// A chunk of the response body passes (it is never held back): added to the capture, which is
/// dropped if the body outgrows `max_body`, and stored when the body ends.
pub fn on_response_body(host: &impl Host, capture: &mut Option<Capture>, size: usize, end_of_stream: bool) {
    let Some(c) = capture else { return };
    if size > 0 {
        match host.response_body(size) {
            Some(chunk) if c.body.len() + chunk.len() <= c.max_body => c.body.extend_from_slice(&chunk),
            _ => {
                *capture = None;
                return;
            }
        }
    }
    if end_of_stream {
        if let Some(c) = capture.take() {
            store(host, c);
        }
    }
}

fn store(host: &impl Host, c: Capture) {
    let e = Entry { stored_at: host.now_ns(), status: c.status, key: &c.key, headers: &c.headers, body: &c.body };
    if let Err(err) = host.shared_set(&c.slot, &e.encode(), 0) {
        log::debug!("could not store {}: {err:?}", c.slot);
    }
}

/// A cache entry in shared data: version 1, when it was stored, the status, the lengths of the
/// three parts that follow: the key, the response headers (proxy-wasm's serialized map) and the
/// body.
#[derive(Debug, PartialEq, Eq)]
pub struct Entry<'a> {
    pub stored_at: u64,
    pub status: u16,
    pub key: &'a [u8],
    pub headers: &'a [u8],
    pub body: &'a [u8],
}

impl<'a> Entry<'a> {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(23 + self.key.len() + self.headers.len() + self.body.len());
        out.push(1);
        out.extend_from_slice(&self.stored_at.to_le_bytes());
        out.extend_from_slice(&self.status.to_le_bytes());
        for part in [self.key, self.headers, self.body] {
            out.extend_from_slice(&(part.len() as u32).to_le_bytes());
        }
        for part in [self.key, self.headers, self.body] {
            out.extend_from_slice(part);
        }
        out
    }

    /// None for bytes that are not an entry (another version, a foreign writer, a cut).
    pub fn decode(bytes: &'a [u8]) -> Option<Entry<'a>> {
        let (&version, rest) = bytes.split_first()?;
        let (stored_at, rest) = rest.split_first_chunk::<8>()?;
        let (status, rest) = rest.split_first_chunk::<2>()?;
        let (key_len, rest) = rest.split_first_chunk::<4>()?;
        let (headers_len, rest) = rest.split_first_chunk::<4>()?;
        let (body_len, rest) = rest.split_first_chunk::<4>()?;
        let (key, rest) = rest.split_at_checked(u32::from_le_bytes(*key_len) as usize)?;
        let (headers, body) = rest.split_at_checked(u32::from_le_bytes(*headers_len) as usize)?;
        let whole = body.len() == u32::from_le_bytes(*body_len) as usize;
        (version == 1 && whole).then_some(Entry {
            stored_at: u64::from_le_bytes(*stored_at),
            status: u16::from_le_bytes(*status),
            key,
            headers,
            body,
        })
    }
}

#[cfg(test)]
mod tests;
