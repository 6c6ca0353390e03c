//! The plugin configuration: parsed and compiled once, in `on_configure`.
//!
//! Parsing walks `serde_json::Value` by hand so that every error names the JSON path of the
//! offending field and what was expected, e.g.
//! `policies.checkout.circuit_breaker.open_for: expected a duration such as "250ms", "10s" or "5m", got "30 seconds"`.
//! Unknown keys are errors: a typo must not silently disable a policy.

use crate::routes::{HostPattern, Route, RouteTable};
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use breakwater_policies::breaker::{RateRule, SlowRule};
use breakwater_policies::{BreakerConfig, BudgetConfig, BulkheadConfig, ClassLimit, MS, SECOND};
use core::fmt;
use serde_json::{Map, Value};

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

/// What a fast-failed request gets.
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
    pub failure_on: FailureOn,
    /// From slow_call.duration; None when slow calls are not tracked (no clock read needed).
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
    pub fn class_of(&self, value: Option<&str>) -> u8 {
        value
            .and_then(|v| self.classes.iter().position(|c| c == v))
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
    /// `x-envoy-retry-on`; empty: leave the route's own retry conditions alone.
    pub on: String,
    /// `x-envoy-retry-grpc-on`; empty: none added.
    pub grpc_on: String,
    /// `x-envoy-retriable-status-codes`; empty: none added.
    pub status_codes: String,
    pub max_retries: u32,
    /// `x-envoy-upstream-rq-per-try-timeout-ms`.
    pub per_try_timeout_ms: Option<u64>,
    /// None: retries are not budgeted (Envoy's own behaviour).
    pub budget: Option<BudgetConfig>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub name: String,
    pub mode: Mode,
    pub breaker: Option<Breaker>,
    pub bulkhead: Option<Bulkhead>,
    pub retry: Option<Retry>,
    pub reject: Reject,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub policies: Vec<Policy>,
    pub routes: RouteTable,
    /// How often each worker hands its batched successes to the shared breakers.
    pub sync_interval_ns: u64,
}

pub const DEFAULT_SYNC_INTERVAL_NS: u64 = 50 * MS;

/// Parses and validates the whole configuration; nothing is applied unless all of it is valid.
pub fn parse(bytes: &[u8]) -> Result<Config> {
    let root: Value = serde_json::from_slice(bytes)
        .map_err(|e| ConfigError { path: String::new(), message: format!("configuration is not valid JSON: {e}") })?;
    let mut root = Obj::new(&root, "")?;
    let mut policies = Vec::new();
    if let Some(v) = root.opt("policies") {
        let path = root.path("policies");
        let map = v.as_object().ok_or_else(|| expected(&path, "an object of policies by name", v))?;
        for (name, body) in map {
            let path = join(&path, name);
            check_name(&path, name)?;
            policies.push(policy(name, body, &path)?);
        }
    }
    let mut routes = Vec::new();
    if let Some(v) = root.opt("routes") {
        let path = root.path("routes");
        let list = v.as_array().ok_or_else(|| expected(&path, "a list of routes", v))?;
        for (i, r) in list.iter().enumerate() {
            routes.push(route(r, &format!("{path}[{i}]"), &policies)?);
        }
    }
    let mut sync_interval_ns = DEFAULT_SYNC_INTERVAL_NS;
    if let Some(v) = root.opt("sync_interval") {
        let p = root.path("sync_interval");
        sync_interval_ns = duration(v, &p)?;
        if !(MS..=10 * SECOND).contains(&sync_interval_ns) {
            return err(&p, "must be from 1ms to 10s");
        }
    }
    root.finish()?;
    // Window-based trips wait two sync intervals, so every worker's batched successes are in.
    for b in policies.iter_mut().filter_map(|p| p.breaker.as_mut()) {
        b.machine.confirm_ns = 2 * sync_interval_ns;
    }
    // Workers renew their permits every sync: one silent for many syncs (and 10s) is dead.
    for b in policies.iter_mut().filter_map(|p| p.bulkhead.as_mut()) {
        b.machine.stale_after_ns = (10 * SECOND).max(20 * sync_interval_ns);
    }
    Ok(Config { policies, routes: RouteTable::new(routes), sync_interval_ns })
}

fn policy(name: &str, v: &Value, path: &str) -> Result<Policy> {
    let mut o = Obj::new(v, path)?;
    let mode = match o.opt("mode") {
        None => Mode::Enforce,
        Some(v) => match v.as_str() {
            Some("enforce") => Mode::Enforce,
            Some("dry_run") => Mode::DryRun,
            _ => return Err(expected(&o.path("mode"), "\"enforce\" or \"dry_run\"", v)),
        },
    };
    let breaker = match o.opt("circuit_breaker") {
        Some(v) => Some(breaker(v, &o.path("circuit_breaker"))?),
        None => None,
    };
    let bulkhead = match o.opt("bulkhead") {
        Some(v) => Some(bulkhead(v, &o.path("bulkhead"))?),
        None => None,
    };
    let retry = match o.opt("retry") {
        Some(v) => Some(retry(v, &o.path("retry"))?),
        None => None,
    };
    let reject = match o.opt("reject") {
        Some(v) => reject(v, &o.path("reject"))?,
        None => Reject::default(),
    };
    o.finish()?;
    Ok(Policy { name: name.to_string(), mode, breaker, bulkhead, retry, reject })
}

fn breaker(v: &Value, path: &str) -> Result<Breaker> {
    let mut o = Obj::new(v, path)?;
    let mut m = BreakerConfig { consecutive_failures: 0, ..BreakerConfig::default() };
    let consecutive = o.opt("consecutive_failures");
    if let Some(v) = consecutive {
        m.consecutive_failures = positive_u32(v, &o.path("consecutive_failures"))?;
    }
    let mut window: Option<(u64, String)> = None;
    if let Some(v) = o.opt("failure_rate") {
        let path = o.path("failure_rate");
        let mut r = Obj::new(v, &path)?;
        let threshold = percent(r.req("threshold")?, &r.path("threshold"))?;
        let minimum_requests = match r.opt("minimum_requests") {
            Some(v) => positive_u32(v, &r.path("minimum_requests"))?,
            None => 20,
        };
        if let Some(v) = r.opt("window") {
            window = Some((duration(v, &r.path("window"))?, r.path("window")));
        }
        r.finish()?;
        m.failure_rate = Some(RateRule { threshold, minimum_requests });
    }
    let mut slow_ns = None;
    if let Some(v) = o.opt("slow_call") {
        let path = o.path("slow_call");
        let mut s = Obj::new(v, &path)?;
        let duration_ns = duration(s.req("duration")?, &s.path("duration"))?;
        let threshold = percent(s.req("threshold")?, &s.path("threshold"))?;
        let minimum_requests = match s.opt("minimum_requests") {
            Some(v) => positive_u32(v, &s.path("minimum_requests"))?,
            None => m.failure_rate.map_or(20, |r| r.minimum_requests),
        };
        if let Some(v) = s.opt("window") {
            let w = duration(v, &s.path("window"))?;
            if let Some((other, other_path)) = &window {
                if *other != w {
                    return err(
                        &s.path("window"),
                        format!("must equal {other_path}: a breaker has one sliding window"),
                    );
                }
            }
            window = Some((w, s.path("window")));
        }
        s.finish()?;
        slow_ns = Some(duration_ns);
        m.slow_call = Some(SlowRule { duration_ns, threshold, minimum_requests });
    }
    if let Some((w, wpath)) = &window {
        if *w < 10 * MS {
            return err(wpath, "must be at least 10ms");
        }
        m.window_ns = *w;
    }
    if consecutive.is_none() && m.failure_rate.is_none() && m.slow_call.is_none() {
        m.consecutive_failures = 5;
    }
    if let Some(v) = o.opt("open_for") {
        m.open_for_ns = duration(v, &o.path("open_for"))?;
    }
    m.max_open_for_ns = match o.opt("max_open_for") {
        Some(v) => duration(v, &o.path("max_open_for"))?,
        None => (10 * m.open_for_ns).max(300 * SECOND),
    };
    if m.max_open_for_ns < m.open_for_ns {
        return err(&o.path("max_open_for"), "must be at least open_for");
    }
    if let Some(v) = o.opt("half_open") {
        let mut h = Obj::new(v, &o.path("half_open"))?;
        if let Some(v) = h.opt("max_probes") {
            m.max_probes = positive_u32(v, &h.path("max_probes"))?;
        }
        if let Some(v) = h.opt("successes_to_close") {
            m.successes_to_close = positive_u32(v, &h.path("successes_to_close"))?;
        }
        if let Some(v) = h.opt("probe_timeout") {
            m.probe_timeout_ns = duration(v, &h.path("probe_timeout"))?;
        }
        h.finish()?;
    }
    let failure_on = match o.opt("failure_on") {
        Some(v) => failure_on(v, &o.path("failure_on"))?,
        None => FailureOn::default(),
    };
    o.finish()?;
    Ok(Breaker { machine: m, failure_on, slow_ns })
}

/// Most priority classes a bulkhead may have (they are counted per class in shared data).
pub const MAX_CLASSES: usize = 16;
/// Largest wait queue: the queue lives in one shared-data value that every admission copies.
pub const MAX_QUEUE: u32 = 10_000;

fn bulkhead(v: &Value, path: &str) -> Result<Bulkhead> {
    let mut o = Obj::new(v, path)?;
    let max_concurrent = positive_u32(o.req("max_concurrent")?, &o.path("max_concurrent"))?;
    let mut m = BulkheadConfig { max_concurrent, ..BulkheadConfig::default() };
    if let Some(v) = o.opt("queue") {
        let mut q = Obj::new(v, &o.path("queue"))?;
        let p = q.path("max_size");
        m.queue_max = positive_u32(q.req("max_size")?, &p)?;
        if m.queue_max > MAX_QUEUE {
            return err(&p, format!("must be at most {MAX_QUEUE}"));
        }
        if let Some(v) = q.opt("timeout") {
            m.queue_timeout_ns = duration(v, &q.path("timeout"))?;
        }
        q.finish()?;
    }
    let mut priority = None;
    if let Some(v) = o.opt("priority") {
        let ppath = o.path("priority");
        let mut p = Obj::new(v, &ppath)?;
        let v = p.req("header")?;
        let header = match v.as_str() {
            Some(h) if !h.is_empty() && !h.starts_with(':') && h.bytes().all(|b| b.is_ascii_graphic()) => {
                h.to_ascii_lowercase()
            }
            _ => return Err(expected(&p.path("header"), "an HTTP header name", v)),
        };
        let v = p.req("default")?;
        let default = match v.as_str() {
            Some(d) if !d.is_empty() => d.to_string(),
            _ => return Err(expected(&p.path("default"), "a class name", v)),
        };
        let cpath = p.path("classes");
        let map = p.req("classes")?;
        let map = map.as_object().ok_or_else(|| expected(&cpath, "an object of classes by name", map))?;
        let mut names = Vec::new();
        let mut limits = Vec::new();
        for (name, body) in map {
            let path = join(&cpath, name);
            let mut c = Obj::new(body, &path)?;
            let mut limit = ClassLimit::default();
            if let Some(v) = c.opt("reserved") {
                limit.reserved = positive_u32(v, &c.path("reserved"))?;
            }
            if let Some(v) = c.opt("max") {
                limit.max = Some(positive_u32(v, &c.path("max"))?);
            }
            if limit.max.is_some_and(|max| max < limit.reserved) {
                return err(&c.path("max"), "must be at least reserved");
            }
            if limit.max.is_some_and(|max| max > m.max_concurrent) {
                return err(&c.path("max"), "must be at most max_concurrent");
            }
            c.finish()?;
            names.push(name.clone());
            limits.push(limit);
        }
        // The default class may be listed with limits, or be a plain class of its own.
        let default = match names.iter().position(|n| *n == default) {
            Some(i) => i,
            None => {
                names.push(default);
                limits.push(ClassLimit::default());
                names.len() - 1
            }
        };
        if names.len() > MAX_CLASSES {
            return err(&cpath, format!("at most {} classes, the default included", MAX_CLASSES));
        }
        let reserved: u64 = limits.iter().map(|l| u64::from(l.reserved)).sum();
        if reserved > u64::from(m.max_concurrent) {
            return err(
                &cpath,
                format!("reserved capacity ({reserved}) exceeds max_concurrent ({})", m.max_concurrent),
            );
        }
        p.finish()?;
        m.classes = limits;
        priority = Some(Priority { header, classes: names, default: default as u8 });
    }
    o.finish()?;
    Ok(Bulkhead { machine: m, priority })
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
/// Envoy refuses more; a higher count would also make every request reserve a large budget share.
pub const MAX_RETRIES: u32 = 10;

fn retry(v: &Value, path: &str) -> Result<Retry> {
    let mut o = Obj::new(v, path)?;
    let mut http = Vec::new();
    let mut grpc = Vec::new();
    if let Some(v) = o.opt("retry_on") {
        let p = o.path("retry_on");
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
    if let Some(v) = o.opt("retriable_status_codes") {
        let p = o.path("retriable_status_codes");
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
    let max_retries = match o.opt("max_retries") {
        Some(v) => match v.as_u64() {
            Some(n) if n <= u64::from(MAX_RETRIES) => n as u32,
            _ => return Err(expected(&o.path("max_retries"), &format!("a whole number from 0 to {MAX_RETRIES}"), v)),
        },
        None => 1, // Envoy's own default num_retries
    };
    let per_try_timeout_ms = match o.opt("per_try_timeout") {
        Some(v) => {
            let p = o.path("per_try_timeout");
            let ns = duration(v, &p)?;
            if ns < MS {
                return err(&p, "must be at least 1ms");
            }
            Some(ns / MS)
        }
        None => None,
    };
    let budget = match o.opt("budget") {
        Some(v) => Some(budget(v, &o.path("budget"))?),
        None => None,
    };
    o.finish()?;
    Ok(Retry {
        on: http.join(","),
        grpc_on: grpc.join(","),
        status_codes: status_codes.join(","),
        max_retries,
        per_try_timeout_ms,
        budget,
    })
}

fn budget(v: &Value, path: &str) -> Result<BudgetConfig> {
    let mut o = Obj::new(v, path)?;
    let mut b = BudgetConfig::default();
    if let Some(v) = o.opt("ratio") {
        b.ratio_milli = match v.as_f64() {
            Some(r) if (0.0..=1.0).contains(&r) => (r * 1000.0 + 0.5) as u32,
            _ => return Err(expected(&o.path("ratio"), "a ratio from 0 to 1 such as 0.2", v)),
        };
    }
    if let Some(v) = o.opt("min_per_second") {
        b.min_per_second = match v.as_u64() {
            Some(n) if n <= 1_000_000 => n as u32,
            _ => return Err(expected(&o.path("min_per_second"), "a whole number from 0 to 1000000", v)),
        };
    }
    if let Some(v) = o.opt("ttl") {
        let p = o.path("ttl");
        b.ttl_ns = duration(v, &p)?;
        if !(SECOND..=60 * SECOND).contains(&b.ttl_ns) {
            return err(&p, "must be from 1s to 60s");
        }
    }
    o.finish()?;
    Ok(b)
}

fn failure_on(v: &Value, path: &str) -> Result<FailureOn> {
    let mut o = Obj::new(v, path)?;
    let mut f = FailureOn::default();
    if let Some(v) = o.opt("status") {
        let p = o.path("status");
        let list = v.as_array().ok_or_else(|| expected(&p, "a list such as [\"5xx\", 429]", v))?;
        f.status =
            list.iter().enumerate().map(|(i, s)| status_range(s, &format!("{p}[{i}]"))).collect::<Result<_>>()?;
    }
    if let Some(v) = o.opt("grpc_status") {
        let p = o.path("grpc_status");
        let list = v.as_array().ok_or_else(|| expected(&p, "a list such as [UNAVAILABLE]", v))?;
        f.grpc_status =
            list.iter().enumerate().map(|(i, s)| grpc_code(s, &format!("{p}[{i}]"))).collect::<Result<_>>()?;
    }
    for (key, slot) in
        [("reset", &mut f.reset), ("connect_failure", &mut f.connect_failure), ("timeout", &mut f.timeout)]
    {
        if let Some(v) = o.opt(key) {
            *slot = v.as_bool().ok_or_else(|| expected(&o.path(key), "true or false", v))?;
        }
    }
    o.finish()?;
    Ok(f)
}

fn reject(v: &Value, path: &str) -> Result<Reject> {
    let mut o = Obj::new(v, path)?;
    let mut r = Reject::default();
    if let Some(v) = o.opt("status") {
        let p = o.path("status");
        r.status = match v.as_u64() {
            Some(s @ 200..=599) => s as u32,
            _ => return Err(expected(&p, "an HTTP status from 200 to 599", v)),
        };
    }
    if let Some(v) = o.opt("body") {
        r.body = Some(v.as_str().ok_or_else(|| expected(&o.path("body"), "a string", v))?.to_string());
    }
    if let Some(v) = o.opt("headers") {
        let p = o.path("headers");
        let map = v.as_object().ok_or_else(|| expected(&p, "an object of header names to strings", v))?;
        for (name, value) in map {
            let hp = join(&p, name);
            if name.is_empty()
                || name.starts_with(':')
                || name.bytes().any(|b| !b.is_ascii_graphic() || b.is_ascii_uppercase())
            {
                return err(&hp, "expected a lower-case HTTP header name");
            }
            let value = match value.as_str() {
                // Control characters (CR, LF, …) would break the response or be refused by Envoy.
                Some(v) if !v.chars().any(char::is_control) => v,
                _ => return Err(expected(&hp, "a string without control characters", value)),
            };
            r.headers.push((name.clone(), value.to_string()));
        }
    }
    o.finish()?;
    Ok(r)
}

fn route(v: &Value, path: &str, policies: &[Policy]) -> Result<Route> {
    let mut o = Obj::new(v, path)?;
    let policy_path = o.path("policy");
    let name = o.req("policy")?;
    let name = name.as_str().ok_or_else(|| expected(&policy_path, "a policy name", name))?;
    let policy = policies.iter().position(|p| p.name == name).ok_or_else(|| ConfigError {
        path: policy_path.clone(),
        message: format!("no policy named \"{name}\" in policies"),
    })?;
    let mpath = o.path("match");
    let m = o.req("match")?;
    let mut mo = Obj::new(m, &mpath)?;
    let mut r = Route { policy, ..Route::default() };
    let string = |v: &Value, p: &str| -> Result<String> {
        match v.as_str() {
            Some(s) if !s.is_empty() => Ok(s.to_string()),
            _ => Err(expected(p, "a non-empty string", v)),
        }
    };
    if let Some(v) = mo.opt("route_name") {
        r.route_name = Some(string(v, &mo.path("route_name"))?);
    }
    if let Some(v) = mo.opt("path_prefix") {
        let p = mo.path("path_prefix");
        let s = string(v, &p)?;
        if !s.starts_with('/') {
            return err(&p, format!("expected a path starting with \"/\", got \"{s}\""));
        }
        r.path_prefix = Some(s);
    }
    if let Some(v) = mo.opt("methods") {
        let p = mo.path("methods");
        let list = v.as_array().ok_or_else(|| expected(&p, "a list of HTTP methods", v))?;
        for (i, m) in list.iter().enumerate() {
            let mp = format!("{p}[{i}]");
            let s = string(m, &mp)?;
            if !s.bytes().all(|b| b.is_ascii_uppercase()) {
                return err(&mp, format!("expected an upper-case HTTP method such as GET, got \"{s}\""));
            }
            r.methods.push(s);
        }
        if r.methods.is_empty() {
            return err(&p, "expected at least one method (omit the key to match any)");
        }
    }
    if let Some(v) = mo.opt("host") {
        let p = mo.path("host");
        r.host =
            Some(HostPattern::parse(&string(v, &p)?).map_err(|m| ConfigError { path: p, message: m.to_string() })?);
    }
    if let Some(v) = mo.opt("headers") {
        let p = mo.path("headers");
        let map = v.as_object().ok_or_else(|| expected(&p, "an object of header names to exact values", v))?;
        for (name, value) in map {
            let hp = join(&p, name);
            let value = value.as_str().ok_or_else(|| expected(&hp, "a string", value))?;
            r.headers.push((name.to_ascii_lowercase(), value.to_string()));
        }
    }
    if let Some(v) = mo.opt("cluster") {
        r.cluster = Some(string(v, &mo.path("cluster"))?);
    }
    mo.finish()?;
    o.finish()?;
    Ok(r)
}

/// Policy names become stat name segments and shared-data keys: keep them to a safe alphabet.
fn check_name(path: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        err(path, "a policy name must be 1-64 characters of letters, digits, '_' or '-'")
    }
}

fn positive_u32(v: &Value, path: &str) -> Result<u32> {
    match v.as_u64() {
        Some(n) if n > 0 && n <= u64::from(u32::MAX) => Ok(n as u32),
        _ => Err(expected(path, "a whole number greater than 0", v)),
    }
}

fn percent(v: &Value, path: &str) -> Result<u8> {
    match v.as_u64() {
        Some(n @ 1..=100) => Ok(n as u8),
        _ => Err(expected(path, "a percent from 1 to 100", v)),
    }
}

/// "250ms", "10s", "1.5s", "5m", "1h" → nanoseconds; zero is refused.
pub fn parse_duration(s: &str) -> Option<u64> {
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
    if whole.is_empty() || frac.len() > 3 || (number.contains('.') && frac.is_empty()) {
        return None;
    }
    let whole: u64 = whole.parse().ok()?;
    let frac_value: u64 = if frac.is_empty() { 0 } else { frac.parse().ok()? };
    let frac_ns = unit_ns / 10u64.pow(frac.len() as u32) * frac_value;
    let ns = whole.checked_mul(unit_ns)?.checked_add(frac_ns)?;
    (ns > 0).then_some(ns)
}

fn duration(v: &Value, path: &str) -> Result<u64> {
    v.as_str()
        .and_then(parse_duration)
        .ok_or_else(|| expected(path, "a duration greater than zero such as \"250ms\", \"10s\" or \"5m\"", v))
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

fn expected(path: &str, what: &str, got: &Value) -> ConfigError {
    let got = match got {
        Value::Null => "null".to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        // Quoted and escaped, so the refusal stays one log line whatever the input holds.
        Value::String(s) => format!("{s:?}"),
        Value::Array(_) => "a list".to_string(),
        Value::Object(_) => "an object".to_string(),
    };
    ConfigError { path: path.to_string(), message: format!("expected {what}, got {got}") }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// A JSON object being read field by field; `finish` rejects whatever was not read.
struct Obj<'a> {
    path: String,
    map: &'a Map<String, Value>,
    read: Vec<&'a str>,
}

impl<'a> Obj<'a> {
    fn new(v: &'a Value, path: &str) -> Result<Self> {
        let what = if path.is_empty() { "the configuration to be a JSON object" } else { "an object" };
        let map = v.as_object().ok_or_else(|| expected(path, what, v))?;
        Ok(Obj { path: path.to_string(), map, read: Vec::new() })
    }
    fn path(&self, key: &str) -> String {
        join(&self.path, key)
    }
    fn opt(&mut self, key: &'a str) -> Option<&'a Value> {
        self.read.push(key);
        self.map.get(key)
    }
    fn req(&mut self, key: &'a str) -> Result<&'a Value> {
        match self.opt(key) {
            Some(v) => Ok(v),
            None => err(&self.path(key), "is required"),
        }
    }
    fn finish(self) -> Result<()> {
        let Some(k) = self.map.keys().find(|k| !self.read.contains(&k.as_str())) else { return Ok(()) };
        let expected = self.read.join(", ");
        let why = match k.as_str() {
            // kubectl and Helm read YAML 1.1, where a bare `on` key is the boolean true.
            "on" => format!("unknown key: Breakwater's key is retry_on (expected one of: {expected})"),
            "true" | "false" => format!(
                "unknown key: a YAML 1.1 reader (kubectl, Helm) turned a bare on/off/yes/no/y/n into {k}; \
                 quote the key or use retry_on (expected one of: {expected})"
            ),
            _ => format!("unknown key (expected one of: {expected})"),
        };
        err(&self.path(k), why)
    }
}

#[cfg(test)]
mod tests;
