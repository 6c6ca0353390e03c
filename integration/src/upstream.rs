//! Controllable HTTP upstream: integration-test backend behind a real Envoy and demo backend.
//!
//! Serves HTTP/1.1 and h2c (prior knowledge) on one port. Per-request behaviour comes from
//! query parameters layered over a settable default; `/__stats`, `/__reset` and `/__default`
//! are control endpoints that are not counted in [`Stats`].

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt;
use std::net::SocketAddr;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

/// Largest `body_bytes` accepted, so a typo cannot exhaust memory.
const MAX_BODY_BYTES: usize = 64 << 20;

/// How a request is answered. Query parameters of the same names override these per request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Behaviour {
    /// Response status (`status=`).
    pub status: u16,
    /// Wait before sending headers (`delay_ms=`).
    pub delay_ms: u64,
    /// Abort the connection (HTTP/1) or stream (HTTP/2) instead of responding (`reset=1`).
    pub reset: bool,
    /// Every n-th request to a path fails with `fail_status`; 0 disables (`fail_every=`).
    pub fail_every: u64,
    /// Status used by `fail_every` (`fail_status=`).
    pub fail_status: u16,
    /// Answer as gRPC with this grpc-status (`grpc_status=`).
    pub grpc_status: Option<u32>,
    /// Body of exactly this many bytes instead of the short text (`body_bytes=`).
    pub body_bytes: Option<usize>,
}

impl Default for Behaviour {
    fn default() -> Self {
        Behaviour {
            status: 200,
            delay_ms: 0,
            reset: false,
            fail_every: 0,
            fail_status: 503,
            grpc_status: None,
            body_bytes: None,
        }
    }
}

impl Behaviour {
    /// Layers query parameters over `self`. Unknown keys are ignored so callers may add cache-busters.
    pub fn with_query(mut self, query: &str) -> Result<Behaviour, String> {
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, val) = pair.split_once('=').unwrap_or((pair, ""));
            match key {
                "status" => self.status = status_param(key, val)?,
                "delay_ms" => self.delay_ms = param(key, val)?,
                "reset" => self.reset = matches!(val, "1" | "true"),
                "fail_every" => self.fail_every = param(key, val)?,
                "fail_status" => self.fail_status = status_param(key, val)?,
                "grpc_status" => self.grpc_status = Some(param(key, val)?),
                "body_bytes" => match param(key, val)? {
                    n if n <= MAX_BODY_BYTES => self.body_bytes = Some(n),
                    _ => return Err(format!("body_bytes above {MAX_BODY_BYTES}")),
                },
                _ => {}
            }
        }
        Ok(self)
    }
}

fn param<T: FromStr>(key: &str, val: &str) -> Result<T, String> {
    val.parse().map_err(|_| format!("bad value for {key}: {val:?}"))
}

fn status_param(key: &str, val: &str) -> Result<u16, String> {
    let code: u16 = param(key, val)?;
    StatusCode::from_u16(code).map(|_| code).map_err(|_| format!("bad status for {key}: {code}"))
}

/// Counters of non-control requests since the last reset.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    pub requests: u64,
    pub in_flight: u64,
    pub max_in_flight: u64,
    pub by_path: BTreeMap<String, u64>,
    pub responses_by_status: BTreeMap<u16, u64>,
    pub resets: u64,
}

#[derive(Default)]
struct Shared {
    stats: Mutex<Stats>,
    default: Mutex<Behaviour>,
    seq: AtomicU64,
}

// A panic while holding a lock must not wedge the upstream, so poisoning is ignored.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    /// Records an arriving request; returns its in-flight guard and 1-based per-path ordinal.
    fn arrive(self: &Arc<Self>, path: &str) -> (InFlight, u64) {
        let mut s = lock(&self.stats);
        s.requests += 1;
        s.in_flight += 1;
        s.max_in_flight = s.max_in_flight.max(s.in_flight);
        let nth = s.by_path.entry(path.to_owned()).or_default();
        *nth += 1;
        (InFlight(self.clone()), *nth)
    }

    fn reset(&self) {
        let mut s = lock(&self.stats);
        // Requests still running keep their guards, so in_flight must survive the reset.
        let in_flight = s.in_flight;
        *s = Stats { in_flight, max_in_flight: in_flight, ..Stats::default() };
    }
}

/// Decrements `in_flight` however the request ends: response sent, reset, or future dropped.
struct InFlight(Arc<Shared>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut s = lock(&self.0.stats);
        s.in_flight = s.in_flight.saturating_sub(1);
    }
}

/// Response body that keeps the in-flight guard alive until hyper has finished with the body.
struct TrackedBody {
    inner: BoxBody<Bytes, Infallible>,
    _guard: Option<InFlight>,
}

impl Body for TrackedBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Service error that makes hyper close the HTTP/1 connection or reset the HTTP/2 stream.
#[derive(Debug)]
pub struct Abort;

impl fmt::Display for Abort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("breakwater-upstream: deliberate reset")
    }
}

impl std::error::Error for Abort {}

fn response(status: u16, body: BoxBody<Bytes, Infallible>, guard: Option<InFlight>) -> Response<TrackedBody> {
    let mut resp = Response::new(TrackedBody { inner: body, _guard: guard });
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    resp.headers_mut().insert("x-upstream", HeaderValue::from_static("breakwater-upstream"));
    resp
}

fn text(msg: String) -> BoxBody<Bytes, Infallible> {
    Full::new(Bytes::from(msg + "\n")).boxed()
}

/// Handles `/__*` control endpoints; `None` means the request is ordinary traffic.
fn control(shared: &Shared, method: &Method, path: &str, query: &str) -> Option<Response<TrackedBody>> {
    let (status, body) = match (method, path) {
        (&Method::GET, "/__stats") => match serde_json::to_vec(&*lock(&shared.stats)) {
            Ok(json) => {
                let mut resp = response(200, Full::new(Bytes::from(json)).boxed(), None);
                resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                return Some(resp);
            }
            Err(e) => (500, format!("upstream: stats: {e}")),
        },
        (&Method::POST, "/__reset") => {
            shared.reset();
            (200, "upstream: stats reset".to_owned())
        }
        (&Method::POST, "/__default") => match Behaviour::default().with_query(query) {
            Ok(b) => {
                *lock(&shared.default) = b;
                (200, "upstream: default set".to_owned())
            }
            Err(e) => (400, format!("upstream: {e}")),
        },
        (_, "/__stats" | "/__reset" | "/__default") => (405, "upstream: method not allowed".to_owned()),
        _ => return None,
    };
    Some(response(status, text(body), None))
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Response<TrackedBody>, Abort> {
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    if let Some(resp) = control(&shared, req.method(), &path, &query) {
        return Ok(resp);
    }
    let seq = shared.seq.fetch_add(1, Ordering::Relaxed) + 1;
    let (guard, nth) = shared.arrive(&path);
    let grpc_request = req.headers().get(CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    let default = lock(&shared.default).clone();

    let (status, body, grpc) = match default.with_query(&query) {
        Err(e) => (400, text(format!("upstream: {e}")), false),
        Ok(b) => {
            // Read the whole request like a real server would; a failed read means the peer is gone.
            if req.into_body().collect().await.is_err() {
                return Err(Abort);
            }
            if b.delay_ms > 0 {
                tokio::time::sleep(Duration::from_millis(b.delay_ms)).await;
            }
            if b.reset {
                lock(&shared.stats).resets += 1;
                return Err(Abort);
            }
            let failing = b.fail_every > 0 && nth % b.fail_every == 0;
            let status = if failing { b.fail_status } else { b.status };
            if b.grpc_status.is_some() || grpc_request {
                // gRPC failures travel in trailers; a flaky/failed HTTP status maps to UNAVAILABLE.
                let code = b.grpc_status.unwrap_or(if status == 200 { 0 } else { 14 });
                let mut t = HeaderMap::new();
                t.insert(HeaderName::from_static("grpc-status"), HeaderValue::from(code));
                if code != 0 {
                    t.insert(HeaderName::from_static("grpc-message"), HeaderValue::from_static("upstream"));
                }
                // An explicit grpc_status answers trailers-only style; an implicit OK sends one empty message.
                let data =
                    if code == 0 && b.grpc_status.is_none() { Bytes::from_static(&[0; 5]) } else { Bytes::new() };
                (200, Full::new(data).with_trailers(std::future::ready(Some(Ok(t)))).boxed(), true)
            } else {
                let body = match b.body_bytes {
                    Some(n) => Full::new(Bytes::from(vec![b'x'; n])).boxed(),
                    None => text(format!("upstream: status {status}")),
                };
                (status, body, false)
            }
        }
    };

    *lock(&shared.stats).responses_by_status.entry(status).or_default() += 1;
    let mut resp = response(status, body, Some(guard));
    resp.headers_mut().insert("x-upstream-seq", HeaderValue::from(seq));
    if grpc {
        resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    }
    Ok(resp)
}

/// A running upstream; stops accepting and closes its connections when dropped.
pub struct Upstream {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl Upstream {
    /// Binds `addr` (port 0 picks a free port) and starts serving on the current tokio runtime.
    pub async fn start(addr: SocketAddr) -> std::io::Result<Upstream> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::default());
        let task = tokio::spawn(serve(listener, shared.clone()));
        Ok(Upstream { addr, shared, task })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Snapshot of the counters.
    pub fn stats(&self) -> Stats {
        lock(&self.shared.stats).clone()
    }

    /// Clears counters (including the per-path counts `fail_every` uses); `in_flight` is kept.
    pub fn reset_stats(&self) {
        self.shared.reset();
    }

    /// Behaviour for requests whose query does not override it.
    pub fn set_default(&self, b: Behaviour) {
        *lock(&self.shared.default) = b;
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    // Connections live in the JoinSet so aborting this task also closes them.
    let mut conns = JoinSet::new();
    loop {
        while conns.try_join_next().is_some() {}
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // E.g. EMFILE: back off rather than spin.
                eprintln!("breakwater-upstream: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        conns.spawn(async move {
            let svc = service_fn(move |req| handle(shared.clone(), req));
            // Errors are peer disconnects or our deliberate aborts; nothing to report.
            let _ = auto::Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}
