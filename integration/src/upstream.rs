//! Controllable HTTP upstream: integration-test backend behind a real Envoy and demo backend.
//!
//! Serves HTTP/1.1 and h2c (prior knowledge) on one port. Per-request behaviour comes from
//! query parameters layered over a settable default; `/__stats`, `/__reset` and `/__default`
//! are control endpoints that are not counted in [`Stats`].
//!
//! Two query parameters label a request instead of changing its answer:
//! * `tag=<word>`: the request is also counted in [`Stats::in_flight_by_tag`] and
//!   [`Stats::max_in_flight_by_tag`] under that word;
//! * `id=<string>`: the request is logged in [`Stats::arrivals`] with when it arrived and when
//!   it finished, in microseconds on the upstream's own monotonic clock.
//!
//! [`Upstream::set_capacity`] models a server that works on at most that many requests at once
//! and queues the rest (each waits its turn, then takes its `delay_ms`): latency grows with
//! load once it passes the capacity, as a real server's does. It can change at run time.

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

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

/// Most entries kept in [`Stats::arrivals`] by default; the oldest are dropped first.
pub const MAX_ARRIVALS: usize = 100_000;

/// How a request is answered. Query parameters of the same names override these per request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Behaviour {
    /// Response status (`status=`).
    pub status: u16,
    /// Wait before sending headers (`delay_ms=`).
    pub delay_ms: u64,
    /// Abort the connection (HTTP/1) or stream (HTTP/2) instead of responding (`reset=1`).
    pub reset: bool,
    /// Abort this percentage of the requests to a path, 0–100 (`reset_pct=`). Deterministic: the
    /// n-th request to the path is reset when ⌊n·pct/100⌋ steps up, so exactly `pct` of every 100
    /// consecutive requests are reset, evenly spread (5: the 20th, 40th, …).
    pub reset_pct: u8,
    /// Every n-th request to a path fails with `fail_status`; 0 disables (`fail_every=`).
    pub fail_every: u64,
    /// Status used by `fail_every` (`fail_status=`).
    pub fail_status: u16,
    /// Answer as gRPC with this grpc-status (`grpc_status=`).
    pub grpc_status: Option<u32>,
    /// Body of exactly this many bytes instead of the short text (`body_bytes=`).
    pub body_bytes: Option<usize>,
    /// Send the headers at once and hold the body open this long, like a long-lived stream
    /// (SSE, a gRPC server stream, a websocket) (`stream_ms=`).
    pub stream_ms: u64,
    /// One more response header with raw bytes, given as `name:hex` (`raw_header=grpc-status:ff`):
    /// for what a misbehaving upstream can send.
    pub raw_header: Option<(String, Vec<u8>)>,
    /// Answer with the request's own body (`echo=1`).
    pub echo: bool,
}

impl Default for Behaviour {
    fn default() -> Self {
        Behaviour {
            status: 200,
            delay_ms: 0,
            reset: false,
            reset_pct: 0,
            fail_every: 0,
            fail_status: 503,
            grpc_status: None,
            body_bytes: None,
            stream_ms: 0,
            raw_header: None,
            echo: false,
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
                "echo" => self.echo = matches!(val, "1" | "true"),
                "reset_pct" => match param(key, val)? {
                    n @ 0..=100 => self.reset_pct = n,
                    n => return Err(format!("reset_pct above 100: {n}")),
                },
                "fail_every" => self.fail_every = param(key, val)?,
                "fail_status" => self.fail_status = status_param(key, val)?,
                "grpc_status" => self.grpc_status = Some(param(key, val)?),
                "stream_ms" => self.stream_ms = param(key, val)?,
                "raw_header" => {
                    let (name, hex) =
                        val.split_once(':').ok_or_else(|| format!("raw_header is name:hex, got {val:?}"))?;
                    let bytes = (0..hex.len())
                        .step_by(2)
                        .map(|i| hex.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
                        .collect::<Option<Vec<u8>>>()
                        .ok_or_else(|| format!("raw_header: bad hex {hex:?}"))?;
                    self.raw_header = Some((name.to_owned(), bytes));
                }
                "body_bytes" => match param(key, val)? {
                    n if n <= MAX_BODY_BYTES => self.body_bytes = Some(n),
                    _ => return Err(format!("body_bytes above {MAX_BODY_BYTES}")),
                },
                _ => {}
            }
        }
        Ok(self)
    }

    /// Whether the `nth` (1-based) request to a path is one of the `reset_pct` percent reset.
    pub fn resets_nth(&self, nth: u64) -> bool {
        let pct = u64::from(self.reset_pct);
        nth > 0 && (nth * pct) / 100 != ((nth - 1) * pct) / 100
    }
}

/// The value of `key` in a query string (the first one), as written (not percent-decoded).
fn query_value<'q>(query: &'q str, key: &str) -> Option<&'q str> {
    query.split('&').filter_map(|p| p.split_once('=')).find(|(k, _)| *k == key).map(|(_, v)| v)
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
    /// Requests in flight by their `tag=`; untagged requests are not counted here. A tag stays
    /// listed (at 0) once seen, until a reset.
    #[serde(default)]
    pub in_flight_by_tag: BTreeMap<String, u64>,
    /// The most requests in flight at once, by `tag=`.
    #[serde(default)]
    pub max_in_flight_by_tag: BTreeMap<String, u64>,
    /// Requests that carried `id=`, in the order they arrived (the newest [`MAX_ARRIVALS`], or
    /// as set by [`Upstream::set_arrival_log_capacity`]).
    #[serde(default)]
    pub arrivals: Vec<Arrival>,
}

/// One request of the arrival log. Times are microseconds since the upstream started, on a
/// monotonic clock.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Arrival {
    /// The request's `id=`.
    pub id: String,
    /// When the upstream had its headers.
    pub arrived_us: u64,
    /// When it stopped counting as in flight (response body handed over, reset, or the peer
    /// gone); 0 while it runs.
    pub finished_us: u64,
}

/// The counters, with the arrival log kept apart as a ring so it stays cheap when full.
struct Books {
    /// `arrivals` is always empty here: [`Books::snapshot`] fills it from `log`.
    stats: Stats,
    log: VecDeque<Arrival>,
    log_cap: usize,
    /// Number (since start) of the entry at `log[0]`; each guard knows its entry's number.
    log_first: u64,
}

impl Books {
    fn trim_log(&mut self, keep: usize) {
        while self.log.len() > keep {
            self.log.pop_front();
            self.log_first += 1;
        }
    }

    fn snapshot(&self) -> Stats {
        let mut s = self.stats.clone();
        s.arrivals = self.log.iter().cloned().collect();
        s
    }
}

struct Shared {
    books: Mutex<Books>,
    default: Mutex<Behaviour>,
    /// Requests worked on at once at most (0: no limit), and how many are now.
    capacity: Mutex<(usize, usize)>,
    /// Wakes the requests waiting for a place when one frees or the capacity grows.
    freed: tokio::sync::Notify,
    seq: AtomicU64,
    started: Instant,
}

// A panic while holding a lock must not wedge the upstream, so poisoning is ignored.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn new() -> Shared {
        Shared {
            books: Mutex::new(Books {
                stats: Stats::default(),
                log: VecDeque::new(),
                log_cap: MAX_ARRIVALS,
                log_first: 0,
            }),
            default: Mutex::new(Behaviour::default()),
            capacity: Mutex::new((0, 0)),
            freed: tokio::sync::Notify::new(),
            seq: AtomicU64::new(0),
            started: Instant::now(),
        }
    }

    /// Microseconds since the upstream started.
    fn now_us(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    /// Records an arriving request (with its `tag=` and `id=`, if any); returns its in-flight
    /// guard and 1-based per-path ordinal.
    fn arrive(self: &Arc<Self>, path: &str, tag: Option<&str>, id: Option<&str>) -> (InFlight, u64) {
        let now = self.now_us();
        let mut b = lock(&self.books);
        let s = &mut b.stats;
        s.requests += 1;
        s.in_flight += 1;
        s.max_in_flight = s.max_in_flight.max(s.in_flight);
        if let Some(tag) = tag {
            let n = s.in_flight_by_tag.entry(tag.to_owned()).or_default();
            *n += 1;
            let n = *n;
            let max = s.max_in_flight_by_tag.entry(tag.to_owned()).or_default();
            *max = (*max).max(n);
        }
        let nth = s.by_path.entry(path.to_owned()).or_default();
        *nth += 1;
        let nth = *nth;
        let arrival = id.map(|id| {
            let keep = b.log_cap.saturating_sub(1);
            b.trim_log(keep);
            b.log.push_back(Arrival { id: id.to_owned(), arrived_us: now, finished_us: 0 });
            b.log_first + b.log.len() as u64 - 1
        });
        (InFlight { shared: self.clone(), tag: tag.map(str::to_owned), arrival }, nth)
    }

    fn reset(&self) {
        let mut b = lock(&self.books);
        // Requests still running keep their guards, so what is in flight must survive the reset.
        let in_flight = b.stats.in_flight;
        let by_tag: BTreeMap<String, u64> =
            std::mem::take(&mut b.stats.in_flight_by_tag).into_iter().filter(|&(_, n)| n > 0).collect();
        b.stats = Stats {
            in_flight,
            max_in_flight: in_flight,
            max_in_flight_by_tag: by_tag.clone(),
            in_flight_by_tag: by_tag,
            ..Stats::default()
        };
        // Guards of requests logged before the reset hold numbers below the new first entry.
        b.log_first += b.log.len() as u64;
        b.log.clear();
    }
}

/// A place among the requests the upstream works on at once (see [`Upstream::set_capacity`]);
/// given back however the request ends.
struct Place(Arc<Shared>);

impl Place {
    async fn take(shared: &Arc<Shared>) -> Place {
        loop {
            let freed = shared.freed.notified();
            tokio::pin!(freed);
            // Registered before the check, so a place freed in between is not missed.
            freed.as_mut().enable();
            {
                let mut c = lock(&shared.capacity);
                if c.0 == 0 || c.1 < c.0 {
                    c.1 += 1;
                    return Place(shared.clone());
                }
            }
            freed.await;
        }
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut c = lock(&self.0.capacity);
        c.1 = c.1.saturating_sub(1);
        drop(c);
        self.0.freed.notify_waiters();
    }
}

/// Decrements the in-flight counts and stamps the arrival log entry however the request ends:
/// response sent, reset, or future dropped.
struct InFlight {
    shared: Arc<Shared>,
    tag: Option<String>,
    /// Number of this request's arrival log entry.
    arrival: Option<u64>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let now = self.shared.now_us().max(1);
        let mut b = lock(&self.shared.books);
        b.stats.in_flight = b.stats.in_flight.saturating_sub(1);
        if let Some(n) = self.tag.as_ref().and_then(|t| b.stats.in_flight_by_tag.get_mut(t)) {
            *n = n.saturating_sub(1);
        }
        if let Some(k) = self.arrival.and_then(|k| k.checked_sub(b.log_first)) {
            if let Some(a) = usize::try_from(k).ok().and_then(|k| b.log.get_mut(k)) {
                a.finished_us = now;
            }
        }
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

/// A body that sends one chunk at once and ends only after `hold`: the shape of a long-lived
/// stream whose headers came quickly.
struct HeldBody {
    first: Option<Bytes>,
    until: Pin<Box<tokio::time::Sleep>>,
}

impl HeldBody {
    fn new(hold: Duration) -> HeldBody {
        HeldBody { first: Some(Bytes::from_static(b"data: hello\n\n")), until: Box::pin(tokio::time::sleep(hold)) }
    }
}

impl Body for HeldBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if let Some(first) = self.first.take() {
            return Poll::Ready(Some(Ok(Frame::data(first))));
        }
        match self.until.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
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
        (&Method::GET, "/__stats") => match serde_json::to_vec(&lock(&shared.books).snapshot()) {
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
    let (guard, nth) = shared.arrive(&path, query_value(&query, "tag"), query_value(&query, "id"));
    let grpc_request = req.headers().get(CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    let default = lock(&shared.default).clone();

    let raw = default.clone().with_query(&query).ok().and_then(|b| b.raw_header);
    let (status, body, grpc) = match default.with_query(&query) {
        Err(e) => (400, text(format!("upstream: {e}")), false),
        Ok(b) => {
            // Read the whole request like a real server would; a failed read means the peer is gone.
            let Ok(received) = req.into_body().collect().await else {
                return Err(Abort);
            };
            // Held through the delay: the work a request needs of the server.
            let _place = Place::take(&shared).await;
            if b.delay_ms > 0 {
                tokio::time::sleep(Duration::from_millis(b.delay_ms)).await;
            }
            if b.reset || b.resets_nth(nth) {
                lock(&shared.books).stats.resets += 1;
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
                let body = match (b.body_bytes, b.stream_ms) {
                    _ if b.echo => Full::new(received.to_bytes()).boxed(),
                    (_, ms) if ms > 0 => HeldBody::new(Duration::from_millis(ms)).boxed(),
                    (Some(0), _) => Full::new(Bytes::new()).boxed(),
                    (Some(n), _) => Full::new(Bytes::from(vec![b'x'; n])).boxed(),
                    (None, _) => text(format!("upstream: status {status}")),
                };
                (status, body, false)
            }
        }
    };

    *lock(&shared.books).stats.responses_by_status.entry(status).or_default() += 1;
    let mut resp = response(status, body, Some(guard));
    resp.headers_mut().insert("x-upstream-seq", HeaderValue::from(seq));
    if let Some((name, value)) = raw {
        if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_bytes(&value)) {
            resp.headers_mut().insert(n, v);
        }
    }
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
        let shared = Arc::new(Shared::new());
        let task = tokio::spawn(serve(listener, shared.clone()));
        Ok(Upstream { addr, shared, task })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Snapshot of the counters and the arrival log.
    pub fn stats(&self) -> Stats {
        lock(&self.shared.books).snapshot()
    }

    /// The arrival log alone (see [`Stats::arrivals`]).
    pub fn arrivals(&self) -> Vec<Arrival> {
        lock(&self.shared.books).log.iter().cloned().collect()
    }

    /// Keeps at most `n` (at least 1) entries in the arrival log from now on, dropping the oldest.
    pub fn set_arrival_log_capacity(&self, n: usize) {
        let mut b = lock(&self.shared.books);
        b.log_cap = n.max(1);
        let keep = b.log_cap;
        b.trim_log(keep);
    }

    /// Microseconds since this upstream started: the clock of [`Arrival`].
    pub fn now_us(&self) -> u64 {
        self.shared.now_us()
    }

    /// Clears counters (including the per-path counts `fail_every` and `reset_pct` use) and the
    /// arrival log; what is in flight (in total and by tag) is kept.
    pub fn reset_stats(&self) {
        self.shared.reset();
    }

    /// Behaviour for requests whose query does not override it.
    pub fn set_default(&self, b: Behaviour) {
        *lock(&self.shared.default) = b;
    }

    /// Works on at most `n` requests at once (None: no limit); the others wait their turn. A
    /// change applies to the requests that start waiting or working from now on.
    pub fn set_capacity(&self, n: Option<usize>) {
        lock(&self.shared.capacity).0 = n.unwrap_or(0);
        self.shared.freed.notify_waiters();
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
