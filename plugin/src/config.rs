//! The plugin configuration: parsed and compiled once, in `on_configure`.
//!
//! Parsing walks the JSON by hand so that every error names the JSON path of the offending
//! field and what was expected, e.g.
//! `policies.checkout.circuit_breaker.open_for: expected a duration such as "250ms", "10s" or "5m", got "30 seconds"`.
//! A bad configuration is refused whole:
//! * unknown keys (a typo must not silently disable a policy; the nearest known key is
//!   suggested), checked before anything else in an object;
//! * duplicate keys (JSON readers keep the last one silently);
//! * values that cannot mean what they say: out-of-range numbers, fractions where a whole
//!   number is meant, durations that overflow time arithmetic, a host with a port (never
//!   matches), a reject status a gRPC client would read as an error of the server's own…
//!
//! Error messages are safe to log: values and odd keys are quoted with control characters
//! escaped and cut after 64 characters, so no input can forge a log line or flood the log.

pub use self::fallback::Fallback;
use crate::routes::{HostPattern, Route, RouteTable};
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use breakwater_policies::breaker::{RateRule, SlowRule};
use breakwater_policies::{BreakerConfig, BudgetConfig, BulkheadConfig, ClassLimit, Forced, MS, SECOND};
use core::cell::RefCell;
use core::fmt;
use hashbrown::HashMap;
use serde::de::{DeserializeSeed, Deserializer, Error as _, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub path: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

type Result<T> = core::result::Result<T, ConfigError>;

fn err<T>(path: &str, message: impl Into<String>) -> Result<T> {
    Err(ConfigError { path: path.to_string(), message: message.into() })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Enforce,
    DryRun,
}

/// Which finished calls count as failures.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FailureOn {
    /// Status classes and codes, as inclusive ranges: "5xx" is 500..=599.
    pub status: Vec<(u16, u16)>,
    pub grpc_status: Vec<u32>,
    pub reset: bool,
    pub connect_failure: bool,
    pub timeout: bool,
}

impl Default for FailureOn {
    fn default() -> Self {
        FailureOn {
            status: alloc::vec![(500, 599)],
            grpc_status: alloc::vec![4, 13, 14], // DEADLINE_EXCEEDED, INTERNAL, UNAVAILABLE
            reset: true,
            connect_failure: true,
            timeout: true,
        }
    }
}

/// What a refused request gets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reject {
    pub status: u32,
    /// None: a short text naming the reason.
    pub body: Option<String>,
    pub headers: Vec<(String, String)>,
}

impl Default for Reject {
    fn default() -> Self {
        Reject { status: 503, body: None, headers: Vec::new() }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Breaker {
    pub machine: BreakerConfig,
    /// `force`: the breaker is held open or closed by this configuration (GitOps), whatever
    /// the calls say and whatever an operator sets at the control endpoint.
    pub force: Option<Forced>,
    pub failure_on: FailureOn,
    /// From slow_call.duration; None when slow calls are not tracked.
    pub slow_ns: Option<u64>,
}

/// Priority classes: which request header names a request's class.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Priority {
    /// Lower-case header name.
    pub header: String,
    /// Class names, by the index the bulkhead counts them under.
    pub classes: Vec<String>,
    /// The class of a request without the header, or with a value naming no class.
    pub default: u8,
}

impl Priority {
    /// The class a header value names (any bytes: a value naming no class gets the default).
    pub fn class_of(&self, value: Option<&[u8]>) -> u8 {
        value
            .and_then(|v| self.classes.iter().position(|c| c.as_bytes() == v))
            .and_then(|i| u8::try_from(i).ok())
            .unwrap_or(self.default)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bulkhead {
    pub machine: BulkheadConfig,
    /// None: every request is of class 0, and no header is read.
    pub priority: Option<Priority>,
}

/// Retries, as instructions to Envoy's router on each request, and their budget.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Retry {
    /// The headers set on every request (`x-envoy-retry-on`, `x-envoy-retry-grpc-on`,
    /// `x-envoy-retriable-status-codes`, `x-envoy-upstream-rq-per-try-timeout-ms`); empty:
    /// the route's own retry policy decides, and Breakwater only budgets it.
    pub router_headers: Vec<(&'static str, String)>,
    pub max_retries: u32,
    /// None: retries are not budgeted (Envoy's own behaviour).
    pub budget: Option<BudgetConfig>,
    /// Remove `x-envoy-attempt-count` from the client's response once read (the route's
    /// `include_attempt_count_in_response` was turned on for Breakwater's sake).
    pub strip_attempt_count: bool,
}

impl Retry {
    /// Breakwater tells the router how to retry every request (`retry_on` is set).
    pub fn drives_router(&self) -> bool {
        !self.router_headers.is_empty()
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub name: String,
    pub mode: Mode,
    pub breaker: Option<Breaker>,
    pub bulkhead: Option<Bulkhead>,
    pub retry: Option<Retry>,
    pub reject: Reject,
    /// What a refused request gets instead of `reject` ([`crate::fallback`]).
    pub fallback: Option<Fallback>,
    /// `timeout.adaptive`: the upstream timeout set on each request (see [`crate::timeout`]).
    pub timeout: Option<breakwater_policies::TimeoutRule>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub policies: Vec<Policy>,
    pub routes: RouteTable,
    /// How often each worker ticks while something is timed to the tick (see `tick::COARSE_NS`
    /// for a calm worker).
    pub sync_interval_ns: u64,
    /// `policy`: this filter instance is enabled per route and applies this policy (an index
    /// into `policies`) to every request it sees, with no route lookup.
    pub only: Option<usize>,
    /// `control`: this filter instance is Breakwater's status and control endpoint, and nothing
    /// else (see [`crate::control`]).
    pub control: Option<Control>,
}

/// The status and control endpoint's settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Control {
    /// Requests whose path starts with this are the endpoint's; others pass through.
    pub path_prefix: String,
    /// Whether POSTs may force, release and reset breakers. Off unless set.
    pub writes: bool,
}

pub const DEFAULT_SYNC_INTERVAL_NS: u64 = 50 * MS;
/// The shortest `sync_interval`: a tick costs little when nothing changed, but every worker
/// wakes up for it.
pub const MIN_SYNC_INTERVAL_NS: u64 = 10 * MS;
/// Most priority classes a bulkhead may have (they are counted per class in shared data).
pub const MAX_CLASSES: usize = 16;
/// Largest wait queue: the queue lives in one shared-data value that every admission copies.
pub const MAX_QUEUE: u32 = 10_000;
/// Envoy refuses more; a higher count would also make every request reserve a large budget share.
pub const MAX_RETRIES: u32 = 10;
/// Largest reject body (it is also a gRPC client's `grpc-message` header).
pub const MAX_BODY: usize = 4096;
const MAX_HEADER_VALUE: usize = 1024;
const MAX_REJECT_HEADERS: usize = 16;
const MAX_COUNT: u64 = 1_000_000;
const HOUR: u64 = 3600 * SECOND;
const DAY: u64 = 24 * HOUR;

/// Parses and validates the whole configuration; nothing is applied unless all of it is valid.
pub fn parse(bytes: &[u8]) -> Result<Config> {
    // No configuration at all (Istio without pluginConfig): no policies, nothing to do.
    let bytes: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) { b"{}" } else { bytes };
    let root = strict_json(bytes)?;
    let root = Obj::new(&root, "", &["policies", "routes", "policy", "sync_interval", "control"])?;
    if let Some((v, path)) = root.get("control") {
        if let Some(other) =
            ["policies", "routes", "policy", "sync_interval"].into_iter().find(|k| root.get(k).is_some())
        {
            return err(
                &path,
                format!("the control endpoint is a filter instance of its own, on an operator-only listener: move `{other}` to the data-plane filter"),
            );
        }
        let control = Some(control(v, &path)?);
        return Ok(Config {
            policies: Vec::new(),
            routes: RouteTable::new(Vec::new()),
            sync_interval_ns: DEFAULT_SYNC_INTERVAL_NS,
            only: None,
            control,
        });
    }
    let mut policies = Vec::new();
    let mut by_name: HashMap<&str, usize> = HashMap::new();
    if let Some((v, path)) = root.get("policies") {
        let map = v.as_object().ok_or_else(|| expected(&path, "an object of policies by name", v))?;
        for (name, body) in map {
            let path = join(&path, name);
            check_name(&path, name)?;
            by_name.insert(name.as_str(), policies.len());
            policies.push(policy(name, body, &path)?);
        }
    }
    let only = match root.get("policy") {
        None => None,
        Some((v, path)) => {
            let name = v.as_str().ok_or_else(|| expected(&path, "the name of this filter instance's policy", v))?;
            let Some(&i) = by_name.get(name) else {
                return err(&path, format!("no policy named {} in policies", show_str(name)));
            };
            if root.get("routes").is_some() {
                return err(
                    &path,
                    "a filter instance with `policy` applies it to every request it sees: remove `routes`",
                );
            }
            if let Some(other) = policies.iter().find(|p| p.name != name) {
                return err(
                    &join("policies", &other.name),
                    format!("a filter instance with `policy` carries only that policy ({})", show_str(name)),
                );
            }
            Some(i)
        }
    };
    let mut routes = Vec::new();
    if let Some((v, path)) = root.get("routes") {
        let list = v.as_array().ok_or_else(|| expected(&path, "a list of routes", v))?;
        routes.reserve(list.len());
        for (i, r) in list.iter().enumerate() {
            routes.push(route(r, &format!("{path}[{i}]"), &by_name)?);
        }
    }
    let mut sync_interval_ns = DEFAULT_SYNC_INTERVAL_NS;
    if let Some((v, p)) = root.get("sync_interval") {
        sync_interval_ns = duration_in(v, &p, MIN_SYNC_INTERVAL_NS, 10 * SECOND)?;
    }
    // Window-based trips wait two sync intervals, so every worker's batched successes are in.
    for b in policies.iter_mut().filter_map(|p| p.breaker.as_mut()) {
        b.machine.confirm_ns = 2 * sync_interval_ns;
    }
    for b in policies.iter_mut().filter_map(|p| p.bulkhead.as_mut()) {
        // Workers renew their permits every sync: one silent for many syncs (and 10s) is dead.
        b.machine.stale_after_ns = (10 * SECOND).max(20 * sync_interval_ns);
        // A recall is answered within one cross-worker hop; the tick checks every interval.
        b.machine.recall_timeout_ns = 2 * sync_interval_ns;
    }
    fallback::check_total(&policies)?;
    Ok(Config { policies, routes: RouteTable::new(routes), sync_interval_ns, only, control: None })
}

fn control(v: &Value, path: &str) -> Result<Control> {
    let o = Obj::new(v, path, &["path_prefix", "writes"])?;
    let mut a = Control { path_prefix: String::from("/breakwater"), writes: false };
    if let Some((v, p)) = o.get("path_prefix") {
        match v.as_str() {
            Some(s)
                if s.len() >= 2
                    && s.len() <= 128
                    && s.starts_with('/')
                    && !s.ends_with('/')
                    && s.bytes().all(|b| b.is_ascii_graphic() && b != b'?' && b != b'#') =>
            {
                a.path_prefix = s.to_string();
            }
            _ => {
                return Err(expected(
                    &p,
                    "a path such as \"/breakwater\" (a leading '/', no trailing '/', no query)",
                    v,
                ))
            }
        }
    }
    if let Some((v, p)) = o.get("writes") {
        a.writes = v.as_bool().ok_or_else(|| expected(&p, "true or false", v))?;
    }
    Ok(a)
}

fn policy(name: &str, v: &Value, path: &str) -> Result<Policy> {
    let o = Obj::new(v, path, &["mode", "circuit_breaker", "bulkhead", "retry", "reject", "fallback", "timeout"])?;
    // First: a refusal here has nothing parsed yet to drop (less code).
    let timeout = o.get("timeout").map(|(v, p)| adaptive::timeout(v, &p)).transpose()?;
    let mode = match o.get("mode") {
        None => Mode::Enforce,
        Some((v, p)) => match v.as_str() {
            Some("enforce") => Mode::Enforce,
            Some("dry_run") => Mode::DryRun,
            _ => return Err(expected(&p, "\"enforce\" or \"dry_run\"", v)),
        },
    };
    let mut p = Policy {
        name: name.to_string(),
        mode,
        breaker: o.get("circuit_breaker").map(|(v, p)| breaker(v, &p)).transpose()?,
        bulkhead: o.get("bulkhead").map(|(v, p)| bulkhead(v, &p)).transpose()?,
        retry: o.get("retry").map(|(v, p)| retry(v, &p)).transpose()?,
        reject: o.get("reject").map(|(v, p)| reject(v, &p, false)).transpose()?.unwrap_or_default(),
        fallback: None,
        timeout,
    };
    if let Some((v, path)) = o.get("fallback") {
        let bulkhead = p.bulkhead.as_ref();
        let queue = bulkhead.is_some_and(|b| b.machine.queue_max > 0);
        let shed = bulkhead.is_some_and(|b| b.machine.classes.iter().any(|c| c.shed_at_milli.is_some()));
        if p.breaker.is_none() && bulkhead.is_none() {
            return err(
                &path,
                "a fallback needs a circuit_breaker or a bulkhead: without one this policy refuses nothing",
            );
        }
        let makes = [p.breaker.is_some(), bulkhead.is_some(), queue, shed];
        p.fallback = Some(fallback::fallback(v, &path, makes)?);
    }
    Ok(p)
}

fn breaker(v: &Value, path: &str) -> Result<Breaker> {
    let o = Obj::new(
        v,
        path,
        &[
            "consecutive_failures",
            "failure_rate",
            "slow_call",
            "open_for",
            "max_open_for",
            "half_open",
            "failure_on",
            "force",
        ],
    )?;
    let force = match o.get("force") {
        None => None,
        Some((v, p)) => match v.as_str() {
            Some("open") => Some(Forced::Open),
            Some("closed") => Some(Forced::Closed),
            _ => return Err(expected(&p, "\"open\" or \"closed\"", v)),
        },
    };
    let mut m = BreakerConfig { consecutive_failures: 0, ..BreakerConfig::default() };
    let consecutive = o.get("consecutive_failures");
    if let Some((v, p)) = &consecutive {
        m.consecutive_failures = count(v, p, 1)?;
    }
    let mut window: Option<(u64, String)> = None;
    if let Some((v, path)) = o.get("failure_rate") {
        let r = Obj::new(v, &path, &["threshold", "minimum_requests", "window"])?;
        let (t, tp) = r.req("threshold")?;
        let threshold = percent(t, &tp)?;
        let minimum_requests = match r.get("minimum_requests") {
            Some((v, p)) => count(v, &p, 1)?,
            None => 20,
        };
        if let Some((v, p)) = r.get("window") {
            window = Some((duration_in(v, &p, 100 * MS, HOUR)?, p));
        }
        m.failure_rate = Some(RateRule { threshold, minimum_requests });
    }
    let mut slow_ns = None;
    if let Some((v, path)) = o.get("slow_call") {
        let s = Obj::new(v, &path, &["duration", "threshold", "minimum_requests", "window"])?;
        let (d, dp) = s.req("duration")?;
        let duration_ns = duration_in(d, &dp, MS, HOUR)?;
        let (t, tp) = s.req("threshold")?;
        let threshold = percent(t, &tp)?;
        let minimum_requests = match s.get("minimum_requests") {
            Some((v, p)) => count(v, &p, 1)?,
            None => m.failure_rate.map_or(20, |r| r.minimum_requests),
        };
        if let Some((v, p)) = s.get("window") {
            let w = duration_in(v, &p, 100 * MS, HOUR)?;
            if let Some((other, other_path)) = &window {
                if *other != w {
                    return err(&p, format!("must equal {other_path}: a breaker has one sliding window"));
                }
            }
            window = Some((w, p));
        }
        slow_ns = Some(duration_ns);
        m.slow_call = Some(SlowRule { duration_ns, threshold, minimum_requests });
    }
    if let Some((w, _)) = window {
        m.window_ns = w;
    }
    if consecutive.is_none() && m.failure_rate.is_none() && m.slow_call.is_none() {
        m.consecutive_failures = 5;
    }
    if let Some((v, p)) = o.get("open_for") {
        m.open_for_ns = duration_in(v, &p, MS, DAY)?;
    }
    m.max_open_for_ns = match o.get("max_open_for") {
        Some((v, p)) => {
            let max = duration_in(v, &p, MS, DAY)?;
            if max < m.open_for_ns {
                return err(&p, "must be at least open_for");
            }
            max
        }
        None => (10 * m.open_for_ns).clamp(300 * SECOND, DAY).max(m.open_for_ns),
    };
    if let Some((v, path)) = o.get("half_open") {
        let h = Obj::new(v, &path, &["max_probes", "successes_to_close", "probe_timeout"])?;
        if let Some((v, p)) = h.get("max_probes") {
            m.max_probes = bounded(v, &p, 1, 1000)?;
        }
        if let Some((v, p)) = h.get("successes_to_close") {
            m.successes_to_close = bounded(v, &p, 1, 1000)?;
        }
        if let Some((v, p)) = h.get("probe_timeout") {
            m.probe_timeout_ns = duration_in(v, &p, MS, HOUR)?;
        }
    }
    let failure_on = o.get("failure_on").map(|(v, p)| failure_on(v, &p)).transpose()?.unwrap_or_default();
    Ok(Breaker { machine: m, failure_on, slow_ns, force })
}

fn bulkhead(v: &Value, path: &str) -> Result<Bulkhead> {
    let o = Obj::new(v, path, &["max_concurrent", "adaptive", "queue", "priority"])?;
    // An adaptive limit, or max_concurrent (refused as missing when neither is set).
    let adaptive = adaptive::limit(&o)?;
    let mut m = BulkheadConfig { adaptive, ..BulkheadConfig::default() };
    m.max_concurrent = match adaptive {
        Some(a) => a.max,
        None => {
            let (v, p) = o.req("max_concurrent")?;
            count(v, &p, 1)?
        }
    };
    if let Some((v, path)) = o.get("queue") {
        let q = Obj::new(v, &path, &["max_size", "timeout"])?;
        let (v, p) = q.req("max_size")?;
        m.queue_max = bounded(v, &p, 1, MAX_QUEUE)?;
        if let Some((v, p)) = q.get("timeout") {
            m.queue_timeout_ns = duration_in(v, &p, MS, HOUR)?;
        }
    }
    let priority = o.get("priority").map(|(v, p)| priority(v, &p, &mut m)).transpose()?;
    Ok(Bulkhead { machine: m, priority })
}

fn priority(v: &Value, path: &str, m: &mut BulkheadConfig) -> Result<Priority> {
    let p = Obj::new(v, path, &["header", "default", "classes"])?;
    let (v, hp) = p.req("header")?;
    let header = match v.as_str() {
        Some(h) if is_header_name(&h.to_ascii_lowercase()) => h.to_ascii_lowercase(),
        _ => return Err(expected(&hp, "an HTTP header name", v)),
    };
    let (v, dp) = p.req("default")?;
    let default = v.as_str().ok_or_else(|| expected(&dp, "a class name", v))?;
    check_class_name(&dp, default)?;
    let (map, cpath) = p.req("classes")?;
    let map = map.as_object().ok_or_else(|| expected(&cpath, "an object of classes by name", map))?;
    // Reservations must leave every class a permit at the lowest limit.
    let (floor, bound) = match &m.adaptive {
        Some(a) => (a.min, "adaptive.min"),
        None => (m.max_concurrent, "max_concurrent"),
    };
    let mut names = Vec::new();
    let mut limits = Vec::new();
    for (name, body) in map {
        let path = join(&cpath, name);
        check_class_name(&path, name)?;
        let c = Obj::new(body, &path, &["reserved", "max", "shed_at"])?;
        let mut limit = ClassLimit::default();
        if let Some((v, p)) = c.get("reserved") {
            limit.reserved = bounded(v, &p, 0, floor)?;
        }
        adaptive::shed(&c, &mut limit)?;
        if let Some((v, p)) = c.get("max") {
            let max = bounded(v, &p, 1, m.max_concurrent)?;
            if max < limit.reserved {
                return err(&p, "must be at least reserved");
            }
            limit.max = Some(max);
        }
        names.push(name.clone());
        limits.push(limit);
    }
    // The default class may be listed with limits, or be a plain class of its own.
    let default = match names.iter().position(|n| n == default) {
        Some(i) => i,
        None => {
            names.push(default.to_string());
            limits.push(ClassLimit::default());
            names.len() - 1
        }
    };
    if names.len() > MAX_CLASSES {
        return err(&cpath, format!("at most {MAX_CLASSES} classes, the default included"));
    }
    let reserved: u64 = limits.iter().map(|l| u64::from(l.reserved)).sum();
    if reserved > u64::from(floor) {
        return err(&cpath, format!("reserved capacity ({reserved}) exceeds {bound} ({floor})"));
    }
    // Every class must be able to run at least one request.
    for (name, l) in names.iter().zip(&limits) {
        let others = reserved - u64::from(l.reserved);
        if u64::from(floor) <= others {
            let what = if names.get(default) == Some(name) { "the default class" } else { "class" };
            return err(
                &cpath,
                format!("leaves {what} {} no capacity: the other classes reserve all {floor} permits", show_str(name),),
            );
        }
    }
    m.classes = limits;
    Ok(Priority { header, classes: names, default: default as u8 })
}

/// Envoy's `x-envoy-retry-on` conditions.
const RETRY_ON: [&str; 11] = [
    "5xx",
    "gateway-error",
    "reset",
    "reset-before-request",
    "connect-failure",
    "envoy-ratelimited",
    "retriable-4xx",
    "refused-stream",
    "retriable-status-codes",
    "retriable-headers",
    "http3-post-connect-failure",
];
/// Envoy's `x-envoy-retry-grpc-on` conditions.
const RETRY_GRPC_ON: [&str; 5] = ["cancelled", "deadline-exceeded", "internal", "resource-exhausted", "unavailable"];

fn retry(v: &Value, path: &str) -> Result<Retry> {
    let o = Obj::new(
        v,
        path,
        &["retry_on", "retriable_status_codes", "max_retries", "per_try_timeout", "budget", "strip_attempt_count"],
    )?;
    let mut http = Vec::new();
    let mut grpc = Vec::new();
    if let Some((v, p)) = o.get("retry_on") {
        let list =
            v.as_array().ok_or_else(|| expected(&p, "a list of Envoy retry conditions such as [5xx, reset]", v))?;
        for (i, c) in list.iter().enumerate() {
            match c.as_str() {
                Some(c) if RETRY_ON.contains(&c) => http.push(c),
                Some(c) if RETRY_GRPC_ON.contains(&c) => grpc.push(c),
                _ => {
                    let what =
                        format!("an Envoy retry condition ({} or {})", RETRY_ON.join(", "), RETRY_GRPC_ON.join(", "));
                    return Err(expected(&format!("{p}[{i}]"), &what, c));
                }
            }
        }
    }
    let mut status_codes = Vec::new();
    if let Some((v, p)) = o.get("retriable_status_codes") {
        let list = v.as_array().ok_or_else(|| expected(&p, "a list of status codes such as [409]", v))?;
        for (i, c) in list.iter().enumerate() {
            match c.as_u64() {
                Some(n @ 100..=599) => status_codes.push(n.to_string()),
                _ => return Err(expected(&format!("{p}[{i}]"), "a status code from 100 to 599", c)),
            }
        }
        if !status_codes.is_empty() && !http.contains(&"retriable-status-codes") {
            return err(&p, "has no effect unless retry_on lists retriable-status-codes");
        }
    }
    let max_retries = match o.get("max_retries") {
        Some((v, p)) => bounded(v, &p, 0, MAX_RETRIES)?,
        None => 1, // Envoy's own default num_retries
    };
    let per_try_timeout_ms = o.get("per_try_timeout").map(|(v, p)| duration_in(v, &p, MS, HOUR)).transpose()?;
    let budget = o.get("budget").map(|(v, p)| budget(v, &p)).transpose()?;
    let strip_attempt_count = match o.get("strip_attempt_count") {
        Some((v, p)) => v.as_bool().ok_or_else(|| expected(&p, "true or false", v))?,
        None => true,
    };
    let mut router_headers = Vec::new();
    for (name, value) in [
        ("x-envoy-retry-on", http.join(",")),
        ("x-envoy-retry-grpc-on", grpc.join(",")),
        ("x-envoy-retriable-status-codes", status_codes.join(",")),
        (
            "x-envoy-upstream-rq-per-try-timeout-ms",
            per_try_timeout_ms.map(|ns| (ns / MS).to_string()).unwrap_or_default(),
        ),
    ] {
        if !value.is_empty() {
            router_headers.push((name, value));
        }
    }
    Ok(Retry { router_headers, max_retries, budget, strip_attempt_count })
}

fn budget(v: &Value, path: &str) -> Result<BudgetConfig> {
    let o = Obj::new(v, path, &["ratio", "min_per_second", "ttl"])?;
    let mut b = BudgetConfig::default();
    if let Some((v, p)) = o.get("ratio") {
        b.ratio_milli = match v.as_f64() {
            Some(r) if (0.0..=1.0).contains(&r) => (r * 1000.0 + 0.5) as u32,
            _ => return Err(expected(&p, "a ratio from 0 to 1 such as 0.2", v)),
        };
    }
    if let Some((v, p)) = o.get("min_per_second") {
        b.min_per_second = bounded(v, &p, 0, 1_000_000)?;
    }
    if let Some((v, p)) = o.get("ttl") {
        b.ttl_ns = duration_in(v, &p, SECOND, 60 * SECOND)?;
    }
    Ok(b)
}

fn failure_on(v: &Value, path: &str) -> Result<FailureOn> {
    let o = Obj::new(v, path, &["status", "grpc_status", "reset", "connect_failure", "timeout"])?;
    let mut f = FailureOn::default();
    if let Some((v, p)) = o.get("status") {
        let list = v.as_array().ok_or_else(|| expected(&p, "a list such as [\"5xx\", 429]", v))?;
        f.status =
            list.iter().enumerate().map(|(i, s)| status_range(s, &format!("{p}[{i}]"))).collect::<Result<_>>()?;
    }
    if let Some((v, p)) = o.get("grpc_status") {
        let list = v.as_array().ok_or_else(|| expected(&p, "a list such as [UNAVAILABLE]", v))?;
        f.grpc_status =
            list.iter().enumerate().map(|(i, s)| grpc_code(s, &format!("{p}[{i}]"))).collect::<Result<_>>()?;
    }
    for (key, slot) in
        [("reset", &mut f.reset), ("connect_failure", &mut f.connect_failure), ("timeout", &mut f.timeout)]
    {
        if let Some((v, p)) = o.get(key) {
            *slot = v.as_bool().ok_or_else(|| expected(&p, "true or false", v))?;
        }
    }
    Ok(f)
}

/// Headers a `reject` or `fallback.static` answer may not set: Envoy sets or drops them, and a
/// wrong one lies about the body (HTTP/2 resets the stream).
const FRAMING_HEADERS: [&str; 3] = ["content-length", "transfer-encoding", "connection"];

/// `reject`, or (`fallback`) a fallback's `static` answer, which may have any status from 200
/// and a body of up to 64 KiB (never a gRPC client's grpc-message: gRPC requests do not get it).
fn reject(v: &Value, path: &str, fallback: bool) -> Result<Reject> {
    let o = Obj::new(v, path, &["status", "body", "headers"])?;
    let mut r = Reject::default();
    if let Some((v, p)) = o.get("status") {
        // A 2xx or 3xx "refusal" would read as success; for gRPC, Envoy maps 200 to UNKNOWN.
        r.status = bounded(v, &p, if fallback { 200 } else { 400 }, 599).map_err(|e| match fallback {
            true => e,
            false => expected(&p, "an HTTP error status from 400 to 599 (503 is what clients retry later)", v),
        })?;
    } else if fallback {
        r.status = 200;
    }
    if let Some((v, p)) = o.get("body") {
        let body = v.as_str().ok_or_else(|| expected(&p, "a string", v))?;
        let max = if fallback { 16 * MAX_BODY } else { MAX_BODY };
        if body.len() > max {
            let why = if fallback { "" } else { " (it is also gRPC's grpc-message header)" };
            return err(&p, format!("must be at most {max} bytes{why}, got {}", body.len()));
        }
        if !body.is_empty() && (r.status == 204 || r.status == 304) {
            let why = "Envoy would send it with a content-length, and HTTP/2 clients reset such a stream";
            return err(&p, format!("must be empty: a {} answer has no body ({why})", r.status));
        }
        r.body = Some(body.to_string());
    }
    if let Some((v, p)) = o.get("headers") {
        let map = v.as_object().ok_or_else(|| expected(&p, "an object of header names to strings", v))?;
        if map.len() > MAX_REJECT_HEADERS {
            return err(&p, format!("at most {MAX_REJECT_HEADERS} headers"));
        }
        for (name, value) in map {
            let hp = join(&p, name);
            if !is_header_name(name) || name.bytes().any(|b| b.is_ascii_uppercase()) {
                return err(&hp, "expected a lower-case HTTP header name");
            }
            if name == "x-breakwater" || name == "retry-after" {
                return err(&hp, "is set by Breakwater itself");
            }
            if FRAMING_HEADERS.contains(&name.as_str()) {
                return err(&hp, "is set by Envoy: it describes the connection or the body's length, and a wrong one lies about the body");
            }
            let value = match value.as_str() {
                // Control characters (CR, LF, …) would break the response or be refused by Envoy.
                Some(v) if !v.chars().any(char::is_control) && v.len() <= MAX_HEADER_VALUE => v,
                _ => {
                    let what = format!("a string of at most {MAX_HEADER_VALUE} bytes without control characters");
                    return Err(expected(&hp, &what, value));
                }
            };
            r.headers.push((name.clone(), value.to_string()));
        }
    }
    Ok(r)
}

fn route(v: &Value, path: &str, policies: &HashMap<&str, usize>) -> Result<Route> {
    let o = Obj::new(v, path, &["match", "policy"])?;
    let (name, policy_path) = o.req("policy")?;
    let name = name.as_str().ok_or_else(|| expected(&policy_path, "a policy name", name))?;
    let policy = *policies.get(name).ok_or_else(|| ConfigError {
        path: policy_path.clone(),
        message: format!("no policy named {} in policies", show_str(name)),
    })?;
    let (m, mpath) = o.req("match")?;
    let mo = Obj::new(m, &mpath, &["route_name", "path_prefix", "methods", "host", "headers", "cluster"])?;
    let mut r = Route { policy, ..Route::default() };
    let string = |v: &Value, p: &str| -> Result<String> {
        match v.as_str() {
            Some(s) if !s.is_empty() => Ok(s.to_string()),
            _ => Err(expected(p, "a non-empty string", v)),
        }
    };
    if let Some((v, p)) = mo.get("route_name") {
        r.route_name = Some(string(v, &p)?);
    }
    if let Some((v, p)) = mo.get("path_prefix") {
        let s = string(v, &p)?;
        if !s.starts_with('/') {
            return err(&p, format!("expected a path starting with \"/\", got {}", show_str(&s)));
        }
        r.path_prefix = Some(s);
    }
    if let Some((v, p)) = mo.get("methods") {
        let list = v.as_array().ok_or_else(|| expected(&p, "a list of HTTP methods", v))?;
        for (i, m) in list.iter().enumerate() {
            let mp = format!("{p}[{i}]");
            let s = string(m, &mp)?;
            if !s.bytes().all(|b| b.is_ascii_uppercase()) {
                return err(&mp, format!("expected an upper-case HTTP method such as GET, got {}", show_str(&s)));
            }
            r.methods.push(s);
        }
        if r.methods.is_empty() {
            return err(&p, "expected at least one method (omit the key to match any)");
        }
    }
    if let Some((v, p)) = mo.get("host") {
        let s = string(v, &p)?;
        if let Some((_, port)) = s.rsplit_once(':') {
            if port.bytes().all(|b| b.is_ascii_digit()) {
                return err(
                    &p,
                    format!("expected a host without a port (the port is ignored when matching), got {}", show_str(&s)),
                );
            }
        }
        r.host = Some(HostPattern::parse(&s).map_err(|m| ConfigError { path: p, message: m.to_string() })?);
    }
    if let Some((v, p)) = mo.get("headers") {
        let map = v.as_object().ok_or_else(|| expected(&p, "an object of header names to exact values", v))?;
        for (name, value) in map {
            let hp = join(&p, name);
            if !is_header_name(&name.to_ascii_lowercase()) {
                return err(&hp, "expected an HTTP header name");
            }
            let value = value.as_str().ok_or_else(|| expected(&hp, "a string", value))?;
            r.headers.push((name.to_ascii_lowercase(), value.to_string()));
        }
    }
    if let Some((v, p)) = mo.get("cluster") {
        r.cluster = Some(string(v, &p)?);
    }
    Ok(r)
}

/// YAML 1.1 (kubectl, Helm) reads a bare `on`, `yes`, `off`… as a boolean: as a name it
/// arrives as "true" or "false", which is refused so that the mistake shows.
fn yaml_boolean(name: &str) -> bool {
    matches!(name, "true" | "false" | "null")
}

/// Policy names become stat name segments and shared-data keys: keep them to a safe alphabet.
fn check_name(path: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if !ok {
        return err(path, "a policy name must be 1-64 characters of letters, digits, '_' or '-'");
    }
    if yaml_boolean(name) {
        return err(path, "a YAML 1.1 reader (kubectl, Helm) makes this name from a bare on/off/yes/no: quote it or rename the policy");
    }
    Ok(())
}

fn check_class_name(path: &str, name: &str) -> Result<()> {
    if name.is_empty() || name.len() > 64 || !name.bytes().all(|b| b.is_ascii_graphic()) {
        return err(path, "a class name must be 1-64 visible ASCII characters (it is matched against a header value)");
    }
    if yaml_boolean(name) {
        return err(path, "a YAML 1.1 reader (kubectl, Helm) makes this name from a bare on/off/yes/no: quote it");
    }
    Ok(())
}

/// An HTTP header name as Envoy accepts it (RFC 9110 token characters, no pseudo-headers).
fn is_header_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 256
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// A whole number from `min` to [`MAX_COUNT`].
fn count(v: &Value, path: &str, min: u32) -> Result<u32> {
    bounded(v, path, min, MAX_COUNT as u32)
}

fn bounded(v: &Value, path: &str, min: u32, max: u32) -> Result<u32> {
    match v.as_u64() {
        Some(n) if n >= u64::from(min) && n <= u64::from(max) => Ok(n as u32),
        _ => Err(expected(path, &format!("a whole number from {min} to {max}"), v)),
    }
}

fn percent(v: &Value, path: &str) -> Result<u8> {
    match v.as_u64() {
        Some(n @ 1..=100) => Ok(n as u8),
        _ => Err(expected(path, "a percent: a whole number from 1 to 100", v)),
    }
}

/// "250ms", "10s", "1.5s", "5m", "1h" → nanoseconds; zero is refused, and a duration too long
/// for 64 bits saturates (so that the caller's bounds refuse it with a plain message).
pub fn parse_duration(s: &str) -> Option<u64> {
    parse_duration_or_zero(s).filter(|ns| *ns > 0)
}

/// [`parse_duration`], with zero (`"0ms"`, `"0s"`) allowed.
fn parse_duration_or_zero(s: &str) -> Option<u64> {
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let (number, unit) = s.split_at(split);
    let unit_ns = match unit {
        "ms" => MS,
        "s" => SECOND,
        "m" => 60 * SECOND,
        "h" => 3600 * SECOND,
        _ => return None,
    };
    let (whole, frac) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() || whole.len() > 30 || frac.len() > 3 || (number.contains('.') && frac.is_empty()) {
        return None;
    }
    let whole: u128 = whole.parse().ok()?;
    let frac_value: u64 = if frac.is_empty() { 0 } else { frac.parse().ok()? };
    let frac_ns = unit_ns / 10u64.pow(frac.len() as u32) * frac_value;
    let ns = whole.saturating_mul(u128::from(unit_ns)).saturating_add(u128::from(frac_ns));
    Some(u64::try_from(ns).unwrap_or(u64::MAX))
}

fn fmt_bound(ns: u64) -> String {
    match ns {
        n if n >= HOUR && n % HOUR == 0 => format!("{}h", n / HOUR),
        n if n >= SECOND && n % SECOND == 0 => format!("{}s", n / SECOND),
        n => format!("{}ms", n / MS),
    }
}

/// A duration from `min` to `max`.
fn duration_in(v: &Value, path: &str, min: u64, max: u64) -> Result<u64> {
    // Zero only where `min` allows it (an adaptive timeout's `margin`).
    let ns = v.as_str().and_then(if min == 0 { parse_duration_or_zero } else { parse_duration }).ok_or_else(|| {
        let what = if min == 0 {
            "a duration such as \"0ms\", \"250ms\" or \"10s\""
        } else {
            "a duration greater than zero such as \"250ms\", \"10s\" or \"5m\""
        };
        expected(path, what, v)
    })?;
    if !(min..=max).contains(&ns) {
        return err(path, format!("must be from {} to {}, got {}", fmt_bound(min), fmt_bound(max), show(v)));
    }
    Ok(ns)
}

fn status_range(v: &Value, path: &str) -> Result<(u16, u16)> {
    if let Some(n) = v.as_u64() {
        if (100..=599).contains(&n) {
            return Ok((n as u16, n as u16));
        }
    }
    if let Some(s) = v.as_str() {
        if let [d @ b'1'..=b'5', b'x', b'x'] = s.as_bytes() {
            let base = u16::from(d - b'0') * 100;
            return Ok((base, base + 99));
        }
        if let Ok(n @ 100..=599) = s.parse::<u16>() {
            return Ok((n, n));
        }
    }
    Err(expected(path, "a status code (100-599) or class such as \"5xx\"", v))
}

const GRPC_CODES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

fn grpc_code(v: &Value, path: &str) -> Result<u32> {
    if let Some(n) = v.as_u64().filter(|n| *n < 17) {
        return Ok(n as u32);
    }
    if let Some(i) = v.as_str().and_then(|s| GRPC_CODES.iter().position(|c| *c == s)) {
        return Ok(i as u32);
    }
    Err(expected(path, "a gRPC status name such as UNAVAILABLE, or its number 0-16", v))
}

/// Longest value or key shown in a message, in characters.
const SHOWN: usize = 64;

/// A string quoted with every control character escaped, cut after 64 characters (fewer
/// where escapes make them long: at most twice that once escaped): safe in one log line
/// whatever it holds.
pub fn show_str(s: &str) -> String {
    let mut room = 2 * SHOWN;
    let cut: String = s
        .chars()
        .take(SHOWN)
        .take_while(|c| {
            let escaped = c.escape_debug().count();
            let fits = escaped <= room;
            room = room.saturating_sub(escaped);
            fits
        })
        .collect();
    if cut.len() == s.len() {
        format!("{cut:?}")
    } else {
        format!("{cut:?}… ({} bytes)", s.len())
    }
}

fn show(v: &Value) -> String {
    match v {
        Value::Null => "null".to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => show_str(s),
        Value::Array(_) => "a list".to_string(),
        Value::Object(_) => "an object".to_string(),
    }
}

fn expected(path: &str, what: &str, got: &Value) -> ConfigError {
    // kubectl and Helm read a bare on/off/yes/no (YAML 1.1) as a boolean.
    let hint = match got {
        Value::Bool(_) if !what.contains("true or false") => {
            " (YAML 1.1 reads a bare on, off, yes or no as a boolean: quote it)"
        }
        _ => "",
    };
    ConfigError { path: path.to_string(), message: format!("expected {what}, got {}{hint}", show(got)) }
}

/// `path.key`, or `path["key"]` (quoted, escaped, cut) for a key that is not a plain name: how
/// every error names a field (the CLI locates fields by the same rule).
pub fn join(path: &str, key: &str) -> String {
    let plain = !key.is_empty()
        && key.len() <= SHOWN
        && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    match (path.is_empty(), plain) {
        (true, true) => key.to_string(),
        (false, true) => format!("{path}.{key}"),
        (_, false) => format!("{path}[{}]", show_str(key)),
    }
}

/// Levenshtein distance, for "did you mean".
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row.first().copied().unwrap_or(0);
        if let Some(first) = row.first_mut() {
            *first = i + 1;
        }
        for (j, cb) in b.iter().enumerate() {
            let above = row.get(j + 1).copied().unwrap_or(0);
            let left = row.get(j).copied().unwrap_or(0);
            let value = (prev + usize::from(ca != *cb)).min(above + 1).min(left + 1);
            prev = above;
            if let Some(slot) = row.get_mut(j + 1) {
                *slot = value;
            }
        }
    }
    row.last().copied().unwrap_or(0)
}

/// A JSON object with a known set of keys; any other key is refused when it is made, before
/// any of its fields is read (so a typo is reported as such, not as a missing field).
struct Obj<'a> {
    path: String,
    map: &'a Map<String, Value>,
}

impl<'a> Obj<'a> {
    fn new(v: &'a Value, path: &str, keys: &[&str]) -> Result<Self> {
        let what = if path.is_empty() { "the configuration to be a JSON object" } else { "an object" };
        let map = v.as_object().ok_or_else(|| expected(path, what, v))?;
        if let Some(k) = map.keys().find(|k| !keys.contains(&k.as_str())) {
            let known = keys.join(", ");
            // A key more than two characters longer or shorter than a known one is no typo of it:
            // no need for the distance, which costs O(key length) per known key.
            let chars = k.chars().count();
            let nearest = keys
                .iter()
                .copied()
                .filter(|c| chars.abs_diff(c.len()) <= 2 && distance(k, c) <= 2)
                .min_by_key(|c| distance(k, c));
            let why = match (k.as_str(), nearest) {
                // kubectl and Helm read YAML 1.1, where a bare `on` key is the boolean true.
                ("on", _) => format!("unknown key: Breakwater's key is retry_on (expected one of: {known})"),
                ("true" | "false", _) => format!(
                    "unknown key: a YAML 1.1 reader (kubectl, Helm) turned a bare on/off/yes/no/y/n into {k}; \
                     quote the key or use retry_on (expected one of: {known})"
                ),
                (_, Some(near)) => format!("unknown key: did you mean {near}? (expected one of: {known})"),
                _ => format!("unknown key (expected one of: {known})"),
            };
            return err(&join(path, k), why);
        }
        Ok(Obj { path: path.to_string(), map })
    }
    /// The value of `key` and its path, if present.
    fn get(&self, key: &str) -> Option<(&'a Value, String)> {
        self.map.get(key).map(|v| (v, join(&self.path, key)))
    }
    fn req(&self, key: &str) -> Result<(&'a Value, String)> {
        self.get(key).ok_or_else(|| ConfigError { path: join(&self.path, key), message: "is required".into() })
    }
}

/// Parses JSON, refusing duplicate keys (serde_json keeps the last one silently) with the path
/// of the duplicate, and nesting deeper than [`MAX_DEPTH`].
fn strict_json(bytes: &[u8]) -> Result<Value> {
    let duplicate = RefCell::new(None);
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let parsed = Seed { path: String::new(), depth: 0, duplicate: &duplicate }.deserialize(&mut de).and_then(|v| {
        de.end()?;
        Ok(v)
    });
    match (parsed, duplicate.into_inner()) {
        (_, Some(e)) => Err(e),
        (Ok(v), None) => Ok(v),
        // serde_json's messages name a position, never the input itself.
        (Err(e), None) => err("", format!("configuration is not valid JSON: {e}")),
    }
}

/// Longest path a duplicate key is reported with: nesting is the input's to choose, so below
/// this the path stops growing and ends in "…".
const MAX_PATH: usize = 256;

/// The path one level below `path` (`next`), or `path` ended in "…" once it is long enough.
fn deeper(path: &str, next: impl FnOnce() -> String) -> String {
    match path.len() {
        n if n <= MAX_PATH => next(),
        _ if path.ends_with('…') => path.to_string(),
        _ => format!("{path}…"),
    }
}

/// Deepest nesting of arrays and objects: a configuration needs 7 levels. An error deep down
/// costs a scan of the input so far at every level serde_json unwinds through, so its own
/// limit (128) let a large configuration take seconds to refuse.
const MAX_DEPTH: usize = 16;

struct Seed<'a> {
    path: String,
    /// Arrays and objects around this value.
    depth: usize,
    /// The refusal, when it is ours (a duplicate key, nesting too deep), not serde_json's.
    duplicate: &'a RefCell<Option<ConfigError>>,
}

impl Seed<'_> {
    /// Refuses a container nested deeper than [`MAX_DEPTH`].
    fn too_deep<E: serde::de::Error>(&self) -> core::result::Result<(), E> {
        if self.depth < MAX_DEPTH {
            return Ok(());
        }
        let message = format!("nested deeper than {MAX_DEPTH} levels: no configuration needs that");
        if let Ok(mut d) = self.duplicate.try_borrow_mut() {
            *d = Some(ConfigError { path: self.path.clone(), message });
        }
        Err(E::custom("nested too deep"))
    }
}

impl<'de> DeserializeSeed<'de> for Seed<'_> {
    type Value = Value;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> core::result::Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Seed<'_> {
    type Value = Value;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> core::result::Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> core::result::Result<Value, E> {
        Ok(Value::Number(v.into()))
    }
    fn visit_u64<E>(self, v: u64) -> core::result::Result<Value, E> {
        Ok(Value::Number(v.into()))
    }
    fn visit_f64<E>(self, v: f64) -> core::result::Result<Value, E> {
        Ok(Number::from_f64(v).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E>(self, v: &str) -> core::result::Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }
    fn visit_string<E>(self, v: String) -> core::result::Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> core::result::Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> core::result::Result<Value, A::Error> {
        self.too_deep()?;
        let mut out = Vec::new();
        loop {
            let path = deeper(&self.path, || format!("{}[{}]", self.path, out.len()));
            match seq.next_element_seed(Seed { path, depth: self.depth + 1, duplicate: self.duplicate })? {
                Some(v) => out.push(v),
                None => return Ok(Value::Array(out)),
            }
        }
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> core::result::Result<Value, A::Error> {
        self.too_deep()?;
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let path = deeper(&self.path, || join(&self.path, &key));
            if out.contains_key(&key) {
                let message = "duplicate key: JSON readers keep only the last one, so it is refused".into();
                if let Ok(mut d) = self.duplicate.try_borrow_mut() {
                    *d = Some(ConfigError { path, message });
                }
                return Err(A::Error::custom("duplicate key"));
            }
            let value = map.next_value_seed(Seed { path, depth: self.depth + 1, duplicate: self.duplicate })?;
            out.insert(key, value);
        }
        Ok(Value::Object(out))
    }
}

mod adaptive;
pub mod fallback;
#[cfg(test)]
mod fuzz;
#[cfg(test)]
mod tests;
