//! The seam between Breakwater's request logic and the proxy: every host call goes through
//! [`Host`], so the logic runs natively against `fake::FakeHost` in unit tests and
//! against Envoy through `wasm::WasmHost` in production.
//!
//! Everything the host returns is bytes: header values, attributes and shared data are never
//! assumed to be UTF-8, and nothing the host says can make the plugin panic.
//!
//! Cost model (Envoy 1.40, V8, callgrind): a call that returns data costs ~10–12k instructions,
//! because the host calls back into the VM to allocate the buffer; a call that returns only a
//! status (a set, a counter, the clock) ~1–4k. The request path is designed around that.

use alloc::vec::Vec;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SharedError {
    /// Someone else wrote the key since we read it: read again and retry.
    CasMismatch,
    Other,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricKind {
    Counter,
    Gauge,
    Histogram,
}

pub trait Host {
    /// Wall-clock time in nanoseconds.
    fn now_ns(&self) -> u64;
    /// An Envoy attribute such as `["response", "flags"]`, as raw bytes (integers arrive as
    /// 8-byte little-endian).
    fn property(&self, path: &[&str]) -> Option<Vec<u8>>;
    /// `xds.route_name` (a property; a host may have a cheaper way to ask for it).
    fn route_name(&self) -> Option<Vec<u8>> {
        self.property(&["xds", "route_name"])
    }
    /// One request header's value, as raw bytes.
    fn request_header(&self, name: &str) -> Option<Vec<u8>>;
    /// Sets (replaces) a request header, before the request goes on to the router.
    fn set_request_header(&self, name: &str, value: &[u8]);
    /// All response headers in one call, in proxy-wasm's serialized map format (see
    /// [`crate::headers::HeaderMap`]): one VM re-entry instead of one per header.
    fn response_headers(&self) -> Option<Vec<u8>>;
    fn remove_response_header(&self, name: &str);
    /// Sets (replaces) a response header.
    fn set_response_header(&self, name: &str, value: &[u8]);
    /// All request headers in one call (the serialized map, as [`Host::response_headers`]).
    fn request_headers(&self) -> Option<Vec<u8>>;
    /// The response body chunk passing now (`size` bytes), as bytes.
    fn response_body(&self, size: usize) -> Option<Vec<u8>>;
    /// Sets a filter state value of the stream (`wasm.<name>` in Envoy); false if refused.
    fn set_property(&self, name: &str, value: &[u8]) -> bool;
    /// Makes Envoy pick the stream's route again; false if it cannot.
    fn clear_route_cache(&self) -> bool;
    fn response_trailer(&self, name: &str) -> Option<Vec<u8>>;
    /// The value under `key` and its CAS token; None when the key holds nothing.
    fn shared_get(&self, key: &str) -> Option<(Vec<u8>, u32)>;
    /// Writes `value` if `key` is still at `cas` (0: unconditionally).
    fn shared_set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), SharedError>;
    /// A local reply to the current request. Called at most once per stream.
    fn send_http_reply(&self, status: u32, headers: &[(&str, &[u8])], body: &[u8]);
    fn define_metric(&self, kind: MetricKind, name: &str) -> Option<u32>;
    fn metric_add(&self, id: u32, delta: i64);
    /// A metric's value (all workers'), None if the host cannot say.
    fn metric_get(&self, id: u32) -> Option<u64>;
    /// Sets a gauge, or records a value into a histogram.
    fn metric_set(&self, id: u32, value: u64);

    // Waking paused requests. Only the worker that paused a request can resume it, so a worker
    // hands a freed permit to another worker's waiter through that worker's shared queue.

    /// Makes `context_id` (a context of this worker) the target of the calls that follow;
    /// false if it is gone.
    fn enter(&self, context_id: u32) -> bool;
    /// Lets the current (paused) request continue to the upstream.
    fn resume_request(&self);
    /// Appends a message to a shared queue (any worker's); false if the queue is gone.
    fn enqueue(&self, queue: u32, message: &[u8]) -> bool;
    /// Takes the next message from one of this worker's shared queues.
    fn dequeue(&self, queue: u32) -> Option<Vec<u8>>;
    /// Paces this worker's tick: every `sync_interval` (`fine`), or every
    /// [`crate::tick::COARSE_NS`] at most (see [`crate::vm::Vm::pace`]). Callable from any
    /// context; false if the pace could not be set.
    fn pace_tick(&self, fine: bool) -> bool;
}

/// Reads an integer attribute (8 bytes, little-endian); None for anything else.
pub fn property_u64(host: &impl Host, path: &[&str]) -> Option<u64> {
    let bytes = host.property(path)?;
    let arr: [u8; 8] = bytes.get(..8)?.try_into().ok()?;
    Some(u64::from_le_bytes(arr))
}
