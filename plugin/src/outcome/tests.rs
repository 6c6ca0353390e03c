//! The classification table: Envoy's response flag × HTTP or gRPC × `failure_on`.

use super::flags::*;
use super::*;

fn on(reset: bool, connect_failure: bool, timeout: bool) -> FailureOn {
    FailureOn { reset, connect_failure, timeout, ..FailureOn::default() }
}

/// Envoy's own reply for a flag: 503/504 over HTTP, 200 + grpc-status over gRPC; no upstream
/// service time, since the upstream never answered.
fn local_reply(grpc: bool, flag: u64) -> Response {
    let (status, grpc_status) = match (grpc, flag) {
        (false, UPSTREAM_REQUEST_TIMEOUT) => (504, None),
        (false, RATE_LIMITED) => (429, None),
        (false, UNAUTHORIZED_EXTERNAL_SERVICE) => (403, None),
        (false, DOWNSTREAM_CONNECTION_TERMINATION) => (0, None),
        (false, _) => (503, None),
        (true, DOWNSTREAM_CONNECTION_TERMINATION) => (0, None),
        (true, UPSTREAM_REQUEST_TIMEOUT) => (200, Some(4)),
        (true, _) => (200, Some(14)),
    };
    Response { status, grpc_status, grpc, upstream_ms: None, attempts: None }
}

#[test]
fn envoys_own_replies_are_judged_by_their_flags_for_http_and_grpc_alike() {
    let not_counted = Verdict::Ignored(Ignored::NotCounted);
    // flag, verdict with every failure_on true, verdict with the matching failure_on false
    let table = [
        (UPSTREAM_REQUEST_TIMEOUT, Verdict::Failure, on(true, true, false), not_counted),
        (UPSTREAM_CONNECTION_FAILURE, Verdict::Failure, on(true, false, true), not_counted),
        (NO_HEALTHY_UPSTREAM, Verdict::Failure, on(true, false, true), not_counted),
        (UPSTREAM_REMOTE_RESET, Verdict::Failure, on(false, true, true), not_counted),
        (UPSTREAM_CONNECTION_TERMINATION, Verdict::Failure, on(false, true, true), not_counted),
        (UPSTREAM_PROTOCOL_ERROR, Verdict::Failure, on(false, true, true), not_counted),
        (
            UPSTREAM_OVERFLOW,
            Verdict::Ignored(Ignored::EnvoyOverflow),
            on(false, false, false),
            Verdict::Ignored(Ignored::EnvoyOverflow),
        ),
        (
            RATE_LIMITED,
            Verdict::Ignored(Ignored::RateLimited),
            on(false, false, false),
            Verdict::Ignored(Ignored::RateLimited),
        ),
        (
            UNAUTHORIZED_EXTERNAL_SERVICE,
            Verdict::Ignored(Ignored::ExtAuthz),
            on(false, false, false),
            Verdict::Ignored(Ignored::ExtAuthz),
        ),
        (
            DOWNSTREAM_CONNECTION_TERMINATION,
            Verdict::Ignored(Ignored::ClientClosed),
            on(false, false, false),
            Verdict::Ignored(Ignored::ClientClosed),
        ),
    ];
    for (flag, counted, off, when_off) in table {
        for grpc in [false, true] {
            let r = local_reply(grpc, flag);
            let all = FailureOn::default();
            assert_eq!(classify(&all, &r, || flag, || false), counted, "flag {flag:#x}, grpc {grpc}");
            assert_eq!(classify(&off, &r, || flag, || false), when_off, "flag {flag:#x}, grpc {grpc}, off");
        }
    }
}

#[test]
fn grpc_route_timeout_with_timeouts_not_counted_is_ignored_not_a_failure() {
    // Envoy answers a gRPC call whose route timed out with 200 + grpc-status 14 and flag UT.
    let r = Response { status: 200, grpc_status: Some(14), grpc: true, ..Response::default() };
    assert_eq!(
        classify(&on(true, true, false), &r, || UPSTREAM_REQUEST_TIMEOUT, || false),
        Verdict::Ignored(Ignored::NotCounted)
    );
}

#[test]
fn a_local_reply_of_another_filter_is_ignored_and_an_upstream_reply_without_the_header_is_judged() {
    let r = Response { status: 503, ..Response::default() };
    assert_eq!(classify(&FailureOn::default(), &r, || 0, || false), Verdict::Ignored(Ignored::LocalReply));
    assert_eq!(classify(&FailureOn::default(), &r, || 0, || true), Verdict::Failure);
    let ok = Response { status: 200, ..Response::default() };
    assert_eq!(classify(&FailureOn::default(), &ok, || 0, || false), Verdict::Ignored(Ignored::LocalReply));
}

#[test]
fn an_upstream_response_is_judged_by_its_status_without_reading_flags() {
    let up = |status, grpc_status| Response { status, grpc_status, upstream_ms: Some(3), ..Response::default() };
    let never = || -> u64 { panic!("flags must not be read for an upstream response") };
    let no = || -> bool { panic!("code details must not be read") };
    let on = FailureOn::default();
    assert_eq!(classify(&on, &up(200, None), never, no), Verdict::Success);
    assert_eq!(classify(&on, &up(404, None), || 0, || false), Verdict::Success);
    assert_eq!(classify(&on, &up(503, None), || 0, || false), Verdict::Failure);
    assert_eq!(classify(&on, &up(200, Some(14)), || 0, || false), Verdict::Failure);
    assert_eq!(classify(&on, &up(200, Some(5)), || 0, || false), Verdict::Success, "NOT_FOUND is not listed");
    // A reset after the upstream's headers: judged by the headers it sent.
    assert_eq!(classify(&on, &up(200, None), || UPSTREAM_REMOTE_RESET, || false), Verdict::Success);
}

#[test]
fn response_headers_are_read_from_bytes_and_garbage_reads_as_absent() {
    let bytes = crate::headers::serialize(&[
        (":status", b"200"),
        ("grpc-status", b"\xff"),
        ("content-type", b"application/grpc+proto"),
        ("x-envoy-upstream-service-time", b"12"),
        ("x-envoy-attempt-count", b"3"),
    ]);
    let r = Response::read(&HeaderMap::new(&bytes));
    assert_eq!(r, Response { status: 200, grpc_status: None, grpc: true, upstream_ms: Some(12), attempts: Some(3) });
    let bytes = crate::headers::serialize(&[(":status", b"99999"), ("grpc-status", b"17")]);
    let r = Response::read(&HeaderMap::new(&bytes));
    assert_eq!((r.status, r.grpc_status), (0, None));
}

#[test]
fn access_log_flag_names_read_as_the_bits() {
    use super::flags::*;
    assert_eq!(from_names("-"), 0);
    assert_eq!(from_names("URX,UC"), UPSTREAM_CONNECTION_TERMINATION);
    assert_eq!(from_names("UF,URX"), UPSTREAM_CONNECTION_FAILURE);
    assert_eq!(from_names("DC"), DOWNSTREAM_CONNECTION_TERMINATION);
    assert_eq!(from_names("UT,UO,UAEX"), UPSTREAM_REQUEST_TIMEOUT | UPSTREAM_OVERFLOW | UNAUTHORIZED_EXTERNAL_SERVICE);
}
