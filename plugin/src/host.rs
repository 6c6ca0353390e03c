//! The seam between Breakwater's request logic and the proxy: every host call goes through
//! [`Host`], so the logic runs natively against [`crate::fake::FakeHost`] in unit tests and
//! against Envoy through [`crate::wasm`] in production.

use alloc::string::String;
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
}

pub trait Host {
    /// Wall-clock time in nanoseconds.
    fn now_ns(&self) -> u64;
    /// An Envoy attribute such as `["response", "code"]`; integers arrive as 8-byte little-endian.
    fn property(&self, path: &[&str]) -> Option<Vec<u8>>;
    fn request_header(&self, name: &str) -> Option<String>;
    fn response_header(&self, name: &str) -> Option<String>;
    fn response_trailer(&self, name: &str) -> Option<String>;
    /// The value under `key` and its CAS token; None when the key holds nothing.
    fn shared_get(&self, key: &str) -> Option<(Vec<u8>, u32)>;
    /// Writes `value` if `key` is still at `cas` (0: unconditionally).
    fn shared_set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), SharedError>;
    fn send_http_reply(&self, status: u32, headers: &[(&str, &str)], body: &[u8]);
    fn define_metric(&self, kind: MetricKind, name: &str) -> Option<u32>;
    fn metric_add(&self, id: u32, delta: i64);
    fn metric_set(&self, id: u32, value: u64);
}

/// Reads an integer attribute (8 bytes, little-endian).
pub fn property_u64(host: &impl Host, path: &[&str]) -> Option<u64> {
    let bytes = host.property(path)?;
    let arr: [u8; 8] = bytes.get(..8)?.try_into().ok()?;
    Some(u64::from_le_bytes(arr))
}
