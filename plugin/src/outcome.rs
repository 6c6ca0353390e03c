//! What a finished call says about the upstream, from what the host reported: the response
//! headers (read once, all together), the gRPC trailers, and, only when those leave a doubt,
//! Envoy's response flags.
//!
//! The rule: a response that came from the upstream is judged by its status (and gRPC status);
//! anything else — no response, or a reply Envoy or another filter made — is judged by Envoy's
//! response flags, for HTTP and gRPC alike, so that Envoy's own `200 + grpc-status: 14` for a
//! route timeout counts as a timeout, not as an upstream answer.
//!
//! A response came from the upstream when it carries `x-envoy-upstream-service-time`, which
//! Envoy's router adds to upstream responses only. Where it is absent and the flags name no
//! error, `response.code_details` (`via_upstream`) settles it: a route that suppresses Envoy's
//! headers pays two more host calls per request.

use crate::config::FailureOn;
use crate::headers::{parse_u64, HeaderMap};

/// Envoy's legacy response-flag bits (`response.flags`).
pub mod flags {
    pub const NO_HEALTHY_UPSTREAM: u64 = 0x2; // UH
    pub const UPSTREAM_REQUEST_TIMEOUT: u64 = 0x4; // UT
    pub const UPSTREAM_REMOTE_RESET: u64 = 0x10; // UR
    pub const UPSTREAM_CONNECTION_FAILURE: u64 = 0x20; // UF
    pub const UPSTREAM_CONNECTION_TERMINATION: u64 = 0x40; // UC
    pub const UPSTREAM_OVERFLOW: u64 = 0x80; // UO: Envoy's own circuit breaker
    pub const RATE_LIMITED: u64 = 0x800; // RL
    pub const UNAUTHORIZED_EXTERNAL_SERVICE: u64 = 0x1000; // UAEX
    pub const DOWNSTREAM_CONNECTION_TERMINATION: u64 = 0x4000; // DC
    pub const UPSTREAM_PROTOCOL_ERROR: u64 = 0x80_0000; // UPE

    /// The flags above by the short names Envoy's access log writes (`%RESPONSE_FLAGS%`).
    pub const NAMES: [(&str, u64); 10] = [
        ("UH", NO_HEALTHY_UPSTREAM),
        ("UT", UPSTREAM_REQUEST_TIMEOUT),
        ("UR", UPSTREAM_REMOTE_RESET),
        ("UF", UPSTREAM_CONNECTION_FAILURE),
        ("UC", UPSTREAM_CONNECTION_TERMINATION),
        ("UO", UPSTREAM_OVERFLOW),
        ("RL", RATE_LIMITED),
        ("UAEX", UNAUTHORIZED_EXTERNAL_SERVICE),
        ("DC", DOWNSTREAM_CONNECTION_TERMINATION),
        ("UPE", UPSTREAM_PROTOCOL_ERROR),
    ];

    /// The bits of an access log's `%RESPONSE_FLAGS%` (`UF,URX`; `-` for none) that
    /// [`super::classify`] looks at; other flags are left out.
    pub fn from_names(names: &str) -> u64 {
        names
            .split(',')
            .filter_map(|n| NAMES.iter().find(|(s, _)| *s == n.trim()).map(|(_, bit)| *bit))
            .fold(0, |a, b| a | b)
    }
}

/// What the response headers (and trailers) said. All fields are read from bytes: a value
/// that is not a plain number reads as absent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Response {
    /// `:status`; 0 until response headers pass (they may never come).
    pub status: u16,
    /// `grpc-status`, from the headers of a trailers-only reply or from the trailers.
    pub grpc_status: Option<u32>,
    /// A gRPC response (`content-type: application/grpc…`): its status may come in trailers.
    pub grpc: bool,
    /// `x-envoy-upstream-service-time`: ms from the request to the upstream's response
    /// headers. Present only on responses that came from the upstream.
    pub upstream_ms: Option<u64>,
    /// `x-envoy-attempt-count` (with the route's `include_attempt_count_in_response`).
    pub attempts: Option<u32>,
}

impl Response {
    /// Reads the response headers Breakwater uses, from one serialized map.
    pub fn read(map: &HeaderMap) -> Response {
        let mut r = Response::default();
        for (name, value) in map.iter() {
            match name {
                b":status" => r.status = parse_u64(value).and_then(|s| u16::try_from(s).ok()).unwrap_or(0),
                b"grpc-status" => r.grpc_status = grpc_status(value),
                b"content-type" => r.grpc = value.starts_with(b"application/grpc"),
                b"x-envoy-upstream-service-time" => r.upstream_ms = parse_u64(value),
                b"x-envoy-attempt-count" => r.attempts = parse_u64(value).and_then(|n| u32::try_from(n).ok()),
                _ => {}
            }
        }
        r
    }

    /// The response came from the upstream (see the module docs).
    pub fn from_upstream(&self) -> bool {
        self.upstream_ms.is_some()
    }
}

/// A `grpc-status` value: a number 0–16; anything else (any byte) reads as absent.
pub fn grpc_status(value: &[u8]) -> Option<u32> {
    parse_u64(value).filter(|n| *n <= 16).map(|n| n as u32)
}

/// Why a finished call does not count for (or against) the upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ignored {
    /// No response: the client went away first (`DC`), or the stream ended without one.
    ClientClosed,
    /// Another filter (or Envoy) answered without asking the upstream.
    LocalReply,
    /// Envoy's own circuit breaker (`UO`).
    EnvoyOverflow,
    /// A rate limit (`RL`).
    RateLimited,
    /// ext_authz refused it (`UAEX`).
    ExtAuthz,
    /// A transport error `failure_on` says not to count (`reset: false`, …).
    NotCounted,
    /// Admitted in an earlier breaker generation: it says nothing of the upstream since.
    Stale,
}

impl Ignored {
    pub const ALL: [Ignored; 7] = [
        Ignored::ClientClosed,
        Ignored::LocalReply,
        Ignored::EnvoyOverflow,
        Ignored::RateLimited,
        Ignored::ExtAuthz,
        Ignored::NotCounted,
        Ignored::Stale,
    ];

    /// The `reason` label of `breakwater_ignored_total`.
    pub fn label(self) -> &'static str {
        match self {
            Ignored::ClientClosed => "client_closed",
            Ignored::LocalReply => "local_reply",
            Ignored::EnvoyOverflow => "envoy_overflow",
            Ignored::RateLimited => "rate_limited",
            Ignored::ExtAuthz => "ext_authz",
            Ignored::NotCounted => "not_counted",
            Ignored::Stale => "stale",
        }
    }

    pub fn index(self) -> usize {
        Ignored::ALL.iter().position(|i| *i == self).unwrap_or(0)
    }
}

/// How one finished call is classified for the breaker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Success,
    Failure,
    Ignored(Ignored),
}

/// Classifies a finished call. `flags` reads `response.flags` and `via_upstream` reads
/// whether `response.code_details` is `via_upstream`; each is called only when needed.
pub fn classify(
    on: &FailureOn,
    r: &Response,
    flags: impl FnOnce() -> u64,
    via_upstream: impl FnOnce() -> bool,
) -> Verdict {
    use flags::*;
    let judged = |r: &Response| {
        let failing_status = on.status.iter().any(|&(lo, hi)| (lo..=hi).contains(&r.status));
        let failing_grpc = r.grpc_status.is_some_and(|g| on.grpc_status.contains(&g));
        if failing_status || failing_grpc {
            Verdict::Failure
        } else {
            Verdict::Success
        }
    };
    if r.from_upstream() {
        return judged(r);
    }
    let counted = |yes: bool| if yes { Verdict::Failure } else { Verdict::Ignored(Ignored::NotCounted) };
    let f = flags();
    if f & (UPSTREAM_CONNECTION_FAILURE | NO_HEALTHY_UPSTREAM) != 0 {
        return counted(on.connect_failure);
    }
    if f & UPSTREAM_REQUEST_TIMEOUT != 0 {
        return counted(on.timeout);
    }
    if f & (UPSTREAM_REMOTE_RESET | UPSTREAM_CONNECTION_TERMINATION | UPSTREAM_PROTOCOL_ERROR) != 0 {
        return counted(on.reset);
    }
    if f & UPSTREAM_OVERFLOW != 0 {
        return Verdict::Ignored(Ignored::EnvoyOverflow);
    }
    if f & RATE_LIMITED != 0 {
        return Verdict::Ignored(Ignored::RateLimited);
    }
    if f & UNAUTHORIZED_EXTERNAL_SERVICE != 0 {
        return Verdict::Ignored(Ignored::ExtAuthz);
    }
    if f & DOWNSTREAM_CONNECTION_TERMINATION != 0 || r.status == 0 {
        return Verdict::Ignored(Ignored::ClientClosed);
    }
    // A response without the router's header and without an error flag: an upstream response
    // on a route that suppresses Envoy's headers, or another filter's local reply.
    if via_upstream() {
        judged(r)
    } else {
        Verdict::Ignored(Ignored::LocalReply)
    }
}

/// Whether a finished call was slow: its upstream took at least `slow_ns` (the breaker's
/// `slow_call.duration`) to answer its headers. An ignored call is never slow, nor one without
/// upstream headers; time in a bulkhead queue or a long body never makes a call slow.
pub fn is_slow(slow_ns: Option<u64>, r: &Response, verdict: Option<Verdict>) -> bool {
    let slow = match (slow_ns, r.upstream_ms) {
        (Some(limit), Some(ms)) => ms.saturating_mul(1_000_000) >= limit,
        _ => false,
    };
    slow && !matches!(verdict, Some(Verdict::Ignored(_)))
}

#[cfg(test)]
mod tests;
