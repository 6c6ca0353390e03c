//! The status and control endpoint: what each policy's breaker, bulkhead and retry budget are
//! doing, and an operator's hand on the breakers (force open, force closed, release, reset),
//! as resilience4j (`FORCED_OPEN`, `DISABLED`, `reset`) and Polly (`Isolate`) offer.
//!
//! It is a Breakwater filter instance of its own, configured with `control` and nothing else, on
//! an operator-only listener: it shares the VM (the same `vm_id`) with the data-plane instances,
//! and so sees every policy they configure ([`Vm::configs`]). The data-plane instances have no
//! `control` and never answer these paths: a data-plane request to them passes through. As
//! a second guard, the endpoint answers only connections to a loopback address.
//!
//! * `GET <prefix>/status`: every policy, as JSON ([`status`]).
//! * `GET <prefix>/status/<policy>`: one policy.
//! * `POST <prefix>/policies/<policy>/<command>`, `command` one of `force_open`,
//!   `force_closed`, `release`, `reset`: only with `control.writes: true`; every write is logged
//!   (warn) with what changed and who asked.
//!
//! Forced states live in the breaker's shared state: every worker follows at once (the change
//! is broadcast), and they survive configuration reloads. A breaker forced by its
//! configuration (`circuit_breaker.force`) cannot be steered here: change the configuration.

use crate::breaker::{self, Command};
use crate::config::{self, Control};
use crate::host::Host;
use crate::vm::Vm;
use crate::{store, Compiled, Policy};
use alloc::format;
use alloc::rc::Rc;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use breakwater_policies::{BreakerState, BudgetState, BulkheadState, Forced, Phase, MS};

/// The endpoint's answer: a status code and a JSON body.
#[derive(Debug, PartialEq, Eq)]
pub struct Reply {
    pub status: u32,
    pub body: String,
}

fn reply(status: u32, body: String) -> Option<Reply> {
    Some(Reply { status, body })
}

fn error(status: u32, message: impl AsRef<str>) -> Option<Reply> {
    let mut o = Json::object();
    o.str("error", message.as_ref());
    reply(status, o.end())
}

/// A JSON object written by hand. serde_json's `Value` and serializer cost the `.wasm` about
/// 39 KB (measured: 381 → 420 KB), past the 400 KB limit, for a few flat objects of names and
/// integers.
struct Json(String);

impl Json {
    fn object() -> Json {
        Json(String::from("{"))
    }
    fn key(&mut self, k: &str) {
        if self.0.len() > 1 {
            self.0.push(',');
        }
        escape(&mut self.0, k);
        self.0.push(':');
    }
    /// A value that is JSON already (a number, `null`, an object written by [`Json`]).
    fn raw(&mut self, k: &str, v: &str) {
        self.key(k);
        self.0.push_str(v);
    }
    fn num(&mut self, k: &str, v: impl Into<u64>) {
        self.raw(k, &v.into().to_string());
    }
    fn str(&mut self, k: &str, v: &str) {
        self.key(k);
        escape(&mut self.0, v);
    }
    fn opt_str(&mut self, k: &str, v: Option<&str>) {
        match v {
            Some(v) => self.str(k, v),
            None => self.raw(k, "null"),
        }
    }
    fn end(mut self) -> String {
        self.0.push('}');
        self.0
    }
}

/// A JSON string: quotes, backslashes and control characters escaped.
fn escape(out: &mut String, s: &str) {
    out.push('"');
    for ch in s.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

/// `part` of `total` in percent with one decimal, as a JSON number.
fn percent(part: u32, total: u32) -> String {
    let permille = if total == 0 { 0 } else { u64::from(part) * 1000 / u64::from(total) };
    format!("{}.{}", permille / 10, permille % 10)
}

/// Answers a request to the endpoint; None when its path is not under `path_prefix` (it passes
/// through, to whatever the listener's routes do with it).
pub fn handle(a: &Control, host: &impl Host, vm: &Vm) -> Option<Reply> {
    let raw_path = host.request_header(":path").unwrap_or_default();
    // The query string plays no part.
    let path = raw_path.split(|b| *b == b'?').next().unwrap_or_default();
    let rest = path.strip_prefix(a.path_prefix.as_bytes())?;
    if !(rest.is_empty() || rest.starts_with(b"/")) {
        return None; // "/breakwaterish" is not ours
    }
    let local = host.property(&["destination", "address"]).unwrap_or_default();
    if !is_loopback(&local) {
        return error(403, "the control endpoint answers only on a loopback address");
    }
    let rest = core::str::from_utf8(rest).unwrap_or("?");
    let segments: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
    let method = host.request_header(":method").unwrap_or_default();
    let get = method == b"GET";
    match segments.as_slice() {
        ["status"] if get => reply(200, status(host, vm, None).0),
        ["status", name] if get => match status(host, vm, Some(name)) {
            (body, n) if n > 0 => reply(200, body),
            _ => error(404, format!("no policy named {}", config::show_str(name))),
        },
        ["policies", name, command] if method == b"POST" => {
            if !a.writes {
                return error(403, "writes are off: set `control.writes: true` in this instance's configuration");
            }
            let peer = host.property(&["source", "address"]).unwrap_or_default();
            write(host, vm, name, command, &String::from_utf8_lossy(&peer))
        }
        ["status"] | ["status", _] | ["policies", _, _] => error(405, "GET for status, POST for commands"),
        _ => error(
            404,
            format!(
                "not a Breakwater control path: GET {0}/status, GET {0}/status/<policy>, POST {0}/policies/<policy>/(force_open|force_closed|release|reset)",
                a.path_prefix
            ),
        ),
    }
}

/// `127.0.0.0/8` or `[::1]`, with or without a port.
fn is_loopback(address: &[u8]) -> bool {
    address.starts_with(b"127.") || address.starts_with(b"[::1]") || address == b"::1"
}

/// Every policy the VM's configurations know, once each, in the order they were first
/// configured, with the newest configuration's version of each.
fn policies(vm: &Vm) -> Vec<(Rc<Compiled>, usize)> {
    let mut out: Vec<(Rc<Compiled>, usize)> = Vec::new();
    for c in vm.configs().into_iter().rev() {
        for p in &c.policies {
            let known = out.iter_mut().find(|(o, i)| o.policy(*i).is_some_and(|q| q.breaker_key == p.breaker_key));
            match known {
                Some(slot) => *slot = (c.clone(), p.index),
                None => out.push((c.clone(), p.index)),
            }
        }
    }
    out
}

/// The status view, `{"time_ms":…,"worker":…,"policies":{<name>:{…}}}`, read from shared data,
/// the same from every worker; and how many policies it holds. Window counts lag by the
/// successes workers have not handed over yet (one window bucket, one second at most).
pub fn status(host: &impl Host, vm: &Vm, only: Option<&str>) -> (String, usize) {
    let now = host.now_ns();
    let mut names: Vec<String> = Vec::new();
    let mut all = Json::object();
    for (c, i) in policies(vm) {
        let Some(p) = c.policy(i) else { continue };
        if only.is_some_and(|n| n != p.name()) {
            continue;
        }
        // The same name in two namespaces (two Istio WasmPlugins): the second as namespace/name.
        let key = if names.iter().any(|n| n == p.name()) {
            format!("{}/{}", c.namespace, p.name())
        } else {
            p.name().to_string()
        };
        all.raw(&key, &policy_status(host, p, &c.namespace, now));
        names.push(key);
    }
    let mut o = Json::object();
    o.num("time_ms", now / MS);
    o.num("worker", vm.worker.get());
    o.raw("policies", &all.end());
    (o.end(), names.len())
}

fn policy_status(host: &impl Host, p: &Policy, namespace: &str, now: u64) -> String {
    let mut v = Json::object();
    v.str("namespace", namespace);
    v.str(
        "mode",
        match p.cfg.mode {
            config::Mode::Enforce => "enforce",
            config::Mode::DryRun => "dry_run",
        },
    );
    if let Some(b) = &p.cfg.breaker {
        let (s, _) = store::load::<BreakerState>(host, &p.breaker_key);
        v.raw("circuit_breaker", &breaker_status(b, &s, now));
    }
    if let Some(b) = &p.cfg.bulkhead {
        let (s, _) = store::load::<BulkheadState>(host, &p.bulkhead_key);
        let mut o = Json::object();
        // The limit admission uses: an adaptive one's live value, with its bounds.
        o.num("limit", s.limit(&b.machine));
        if let Some(a) = &b.machine.adaptive {
            o.num("min", a.min);
            o.num("max", a.max);
        }
        o.num("active", s.active());
        // Of `active`, the permits in workers' leases: in use or idle (which, only the workers
        // know).
        o.num("leased", s.leased());
        o.num("queued", s.queued());
        o.num("queue_max", b.machine.queue_max);
        v.raw("bulkhead", &o.end());
    }
    if let Some(budget) = p.cfg.retry.as_ref().and_then(|r| r.budget) {
        let (s, _) = store::load::<BudgetState>(host, &p.budget_key);
        let mut o = Json::object();
        o.num("remaining", s.available(&budget, now));
        v.raw("retry_budget", &o.end());
    }
    if p.cfg.fallback.is_some() {
        // Envoy's counters, as the workers last flushed them (a quarter second behind at most).
        let ids = p.metrics(host).fallback;
        let mut o = Json::object();
        for (kind, pair) in crate::fallback::KINDS.iter().zip(ids.chunks(2)) {
            if let [Some(served), Some(missed)] = *pair {
                let mut k = Json::object();
                k.num("served", host.metric_get(served).unwrap_or(0));
                k.num("missed", host.metric_get(missed).unwrap_or(0));
                o.raw(kind, &k.end());
            }
        }
        v.raw("fallback", &o.end());
    }
    v.end()
}

fn breaker_status(b: &config::Breaker, s: &BreakerState, now: u64) -> String {
    let m = &b.machine;
    let totals = s.window.totals(now, m.bucket_ns());
    let forced_by = match (b.force, s.forced) {
        (Some(_), _) => Some("configuration"),
        (None, Some(_)) => Some("operator"),
        (None, None) => None,
    };
    let forced = b.force.or(s.forced).map(|f| match f {
        Forced::Open => "open",
        Forced::Closed => "closed",
    });
    let mut v = Json::object();
    v.str("state", crate::metrics::state_name(s, b.force));
    v.opt_str("forced", forced);
    v.opt_str("forced_by", forced_by);
    v.num("consecutive_failures", s.consecutive_failures);
    let mut w = Json::object();
    w.num("length_ms", m.window_ns / MS);
    w.num("calls", totals.total);
    w.num("failures", totals.failures);
    w.num("slow_calls", totals.slow);
    w.raw("failure_rate_percent", &percent(totals.failures, totals.total));
    w.raw("slow_call_rate_percent", &percent(totals.slow, totals.total));
    v.raw("window", &w.end());
    match s.phase {
        Phase::Open { until } => {
            v.num("open_until_ms", until / MS);
            v.num("open_remaining_ms", until.saturating_sub(now) / MS);
            v.num("open_period_ms", s.open_period_ns / MS);
        }
        Phase::HalfOpen { probes, successes, .. } => {
            let mut h = Json::object();
            h.num("probes_in_flight", probes);
            h.num("successes", successes);
            h.num("max_probes", m.max_probes);
            h.num("successes_to_close", m.successes_to_close);
            v.raw("half_open", &h.end());
        }
        Phase::Closed => {}
    }
    v.num("generation", s.generation);
    v.end()
}

/// An operator's command on every breaker named `name` (one per shared-data namespace).
fn write(host: &impl Host, vm: &Vm, name: &str, command: &str, peer: &str) -> Option<Reply> {
    let cmd = match command {
        "force_open" => Command::Force(Some(Forced::Open)),
        "force_closed" => Command::Force(Some(Forced::Closed)),
        "release" => Command::Force(None),
        "reset" => Command::Reset,
        _ => {
            return error(
                404,
                format!("no command {}: force_open, force_closed, release or reset", config::show_str(command)),
            )
        }
    };
    let targets: Vec<(Rc<Compiled>, usize)> =
        policies(vm).into_iter().filter(|(c, i)| c.policy(*i).is_some_and(|p| p.name() == name)).collect();
    if targets.is_empty() {
        return error(404, format!("no policy named {}", config::show_str(name)));
    }
    // All or nothing: check every target before changing any.
    for (c, i) in &targets {
        let Some(p) = c.policy(*i) else { continue };
        match &p.cfg.breaker {
            None => return error(409, format!("policy {} has no circuit_breaker", p.name())),
            Some(b) if b.force.is_some() => {
                return error(
                    409,
                    format!(
                        "policy {} is forced by its configuration (circuit_breaker.force): change the configuration",
                        p.name()
                    ),
                )
            }
            Some(_) => {}
        }
    }
    let mut changed = String::from("[");
    for (c, i) in &targets {
        let Some(p) = c.policy(*i) else { continue };
        let Some((before, after)) = breaker::command(c, p, host, vm, cmd) else {
            return error(503, "shared data failed: nothing changed for this policy; try again");
        };
        log::warn!("control: {command} on policy {} by {peer}: circuit {before} -> {after}", p.name());
        if changed.len() > 1 {
            changed.push(',');
        }
        let mut o = Json::object();
        o.str("namespace", &c.namespace);
        o.str("before", before);
        o.str("after", after);
        changed.push_str(&o.end());
    }
    changed.push(']');
    let mut o = Json::object();
    o.str("policy", name);
    o.str("command", command);
    o.raw("changed", &changed);
    reply(200, o.end())
}

#[cfg(test)]
mod tests;
