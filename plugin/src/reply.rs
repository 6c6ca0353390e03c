//! What a refused request gets: the policy's reject reply, with `x-breakwater` naming the reason
//! and `retry-after` saying when to come back. For a gRPC request Envoy turns the reply into a
//! trailers-only gRPC reply itself: `grpc-status` from the HTTP status (503 → UNAVAILABLE,
//! which gRPC clients retry later) and `grpc-message` from the body.

use crate::headers::decimal;
use crate::host::Host;
use crate::Policy;
use breakwater_policies::SECOND;

/// Why Breakwater refused a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    CircuitOpen,
    BulkheadFull,
    QueueTimeout,
    /// Its priority class is shed (`shed_at`).
    Shed,
}

impl Refusal {
    pub const ALL: [Refusal; 4] = [Refusal::CircuitOpen, Refusal::BulkheadFull, Refusal::QueueTimeout, Refusal::Shed];

    /// The `x-breakwater` header value.
    pub fn header(self) -> &'static str {
        match self {
            Refusal::CircuitOpen => "circuit-open",
            Refusal::BulkheadFull => "bulkhead-full",
            Refusal::QueueTimeout => "queue-timeout",
            Refusal::Shed => "shed",
        }
    }

    /// The `reason` label of `breakwater_rejections_total`.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::CircuitOpen => "circuit_open",
            Refusal::BulkheadFull => "bulkhead_full",
            Refusal::QueueTimeout => "queue_timeout",
            Refusal::Shed => "shed",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// Answers the current request with the policy's reject reply. `retry_after_ns` is rounded up
/// to whole seconds, at least 1.
pub fn reject(host: &impl Host, p: &Policy, why: Refusal, retry_after_ns: u64) {
    let r = &p.cfg.reject;
    let mut digits = [0u8; 20];
    let retry_after = decimal(retry_after_ns.div_ceil(SECOND).max(1), &mut digits);
    let ours: [(&str, &[u8]); 2] = [("x-breakwater", why.header().as_bytes()), ("retry-after", retry_after)];
    let body = match &r.body {
        Some(b) => b.as_bytes(),
        None => p.default_body(why).as_bytes(),
    };
    if r.headers.is_empty() {
        // The usual case, without building a list: a fast-fail is mostly this reply.
        host.send_http_reply(r.status, &ours, body);
        return;
    }
    let mut headers: alloc::vec::Vec<(&str, &[u8])> = alloc::vec::Vec::with_capacity(2 + r.headers.len());
    headers.extend_from_slice(&ours);
    headers.extend(r.headers.iter().map(|(k, v)| (k.as_str(), v.as_bytes())));
    host.send_http_reply(r.status, &headers, body);
}
