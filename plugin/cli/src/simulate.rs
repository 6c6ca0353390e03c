//! `breakwater simulate`: replays an Envoy access log through the policies' own state machines
//! (`breakwater_policies`, the crate the plugin runs) and says what they would have done.
//!
//! The replay drives each machine as the plugin's request path does: the policy is picked by
//! the plugin's own route rules; a request is admitted at its start time by the breaker, then
//! the bulkhead, then the retry budget; when it ends (start + duration, or later if the
//! simulated bulkhead made it wait) its permit goes back, its retries are settled, and the
//! breaker records the outcome the plugin's own `outcome::classify` finds in the logged status,
//! gRPC status, response flags and code details. Time is the log's own: nanoseconds since the
//! epoch, as the plugin's clock. What a worker's tick does on time (confirming a window trip,
//! turning an open breaker half-open, timing out a queued request) happens at the exact moment.
//!
//! One state per policy stands for the state every worker shares. The live plugin batches a
//! quiet breaker's successes per worker and hands them over once a window bucket, so its
//! window-rate trips can differ by what README's "what is exact, and what is bounded-stale"
//! says; consecutive-failure trips, probes and open periods are exact (up to the ±10% jitter of
//! a re-opened breaker's period, drawn from a different clock reading).
//!
//! Requests the live plugin refused (`x-breakwater` in the log) never reached the upstream:
//! their outcome is unknown. If the simulated policy admits one, it holds its permit for no
//! time and its outcome is not recorded (a probe gives its slot back); the report counts them.

use crate::access_log::{self, Line};
use breakwater::breaker::{describe, splitmix64};
use breakwater::config::{Config, Mode, Policy};
use breakwater::outcome::{self, flags, Ignored, Response, Verdict};
use breakwater::reply::Refusal;
use breakwater::routes::Attributes;
use breakwater_policies::breaker::Phase;
use breakwater_policies::bulkhead::Ask;
use breakwater_policies::{
    Acquire, Admission, BreakerState, BudgetState, BulkheadConfig, BulkheadState, Forced, Outcome, Recorded,
    Transition, TripReason,
};
use serde::Serialize;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};

pub mod svg;
pub mod text;

const MS: u64 = 1_000_000;
/// The one worker of the replay (its id in the bulkhead state).
const WORKER: u32 = 1;
/// Malformed lines shown by line number; the rest are only counted.
const SHOWN_MALFORMED: usize = 5;
/// Time bins of the timeline (the SVG's).
pub const BINS: usize = 240;

/// One logged request under a policy, as compact as the replay allows: what the plugin would
/// have read of it is judged once, when the line is read.
#[derive(Clone, Debug)]
pub struct Request {
    /// Index into the files read, and the 1-based line in it.
    pub file: u16,
    pub line: u64,
    pub start: u64,
    /// When its stream ended, live: start + duration.
    pub end_live: u64,
    /// How long it holds the upstream (and its bulkhead permit) once admitted.
    pub service: u64,
    pub policy: u32,
    pub class: u8,
    /// How the breaker judges its outcome (None: its policy has no breaker).
    pub verdict: Option<Verdict>,
    pub slow: bool,
    pub attempts: Option<u32>,
    pub status: u16,
    /// The live plugin refused it (`x-breakwater`): it never reached the upstream.
    pub live: Option<Refusal>,
    /// The client went away (`DC`, or no response): the stream ended at `end_live` at the latest.
    pub client_left: bool,
    /// `x-envoy-upstream-service-time`: an adaptive limit's sample.
    pub upstream_ms: Option<u64>,
}

/// A malformed line: where, and what is wrong with it.
#[derive(Clone, Debug, Serialize)]
pub struct Malformed {
    pub file: String,
    pub line: u64,
    pub error: String,
}

/// What reading the log found.
#[derive(Debug, Default)]
pub struct Reading {
    pub files: Vec<String>,
    pub requests: Vec<Request>,
    pub lines: u64,
    pub malformed: u64,
    pub malformed_shown: Vec<Malformed>,
    pub unmatched: u64,
    /// Field names (and `request_headers.<name>`) seen in at least one line.
    seen: std::collections::BTreeSet<String>,
    /// How many of [`access_log::FIELDS`] are in `seen`.
    fields_seen: usize,
}

/// The request attributes the plugin's rules look at, from a log line.
struct LineAttributes<'l>(&'l Line);

fn non_empty(s: &Option<String>) -> Option<&[u8]> {
    s.as_deref().filter(|s| !s.is_empty()).map(str::as_bytes)
}

impl Attributes for LineAttributes<'_> {
    fn route_name(&mut self) -> Option<&[u8]> {
        non_empty(&self.0.route_name)
    }
    fn path(&mut self) -> Option<&[u8]> {
        non_empty(&self.0.path)
    }
    fn method(&mut self) -> Option<&[u8]> {
        non_empty(&self.0.method)
    }
    fn host(&mut self) -> Option<&[u8]> {
        non_empty(&self.0.authority)
    }
    fn header(&mut self, name: &str) -> Option<Vec<u8>> {
        self.0.header(name).map(|v| v.as_bytes().to_vec())
    }
    fn cluster(&mut self) -> Option<&[u8]> {
        non_empty(&self.0.cluster)
    }
}

/// The policy a logged request falls under, as the plugin picks it.
pub fn policy_of(config: &Config, line: &Line) -> Option<usize> {
    match config.only {
        Some(i) => Some(i),
        None => config.routes.find(&mut LineAttributes(line)),
    }
}

/// What the plugin would have read of the response (see `breakwater::outcome::Response`).
fn response(line: &Line, counts_grpc: bool) -> Response {
    let grpc = line.content_type.as_deref().is_some_and(|c| c.starts_with("application/grpc"));
    let header = line.grpc_status.as_deref().and_then(|s| outcome::grpc_status(s.as_bytes()));
    let trailer = || line.grpc_status_trailer.as_deref().and_then(|s| outcome::grpc_status(s.as_bytes()));
    Response {
        status: line.status,
        grpc_status: header.or_else(|| if grpc && counts_grpc { trailer() } else { None }),
        grpc,
        upstream_ms: line.upstream_service_time,
        attempts: line.attempts,
    }
}

/// A log line judged for its policy.
pub fn request(line: &Line, file: u16, number: u64, policy: usize, cfg: &Policy) -> Request {
    let flags = line.response_flags.as_deref().map_or(0, flags::from_names);
    let live = line.breakwater.as_deref().and_then(|v| Refusal::ALL.into_iter().find(|r| r.header() == v));
    let (verdict, slow) = match &cfg.breaker {
        Some(b) => {
            let r = response(line, !b.failure_on.grpc_status.is_empty());
            let via_upstream = line.code_details.as_deref() == Some("via_upstream");
            let v = outcome::classify(&b.failure_on, &r, || flags, || via_upstream);
            (Some(v), outcome::is_slow(b.slow_ns, &r, Some(v)))
        }
        None => (None, false),
    };
    let class = cfg
        .bulkhead
        .as_ref()
        .and_then(|b| b.priority.as_ref())
        .map_or(0, |pr| pr.class_of(line.header(&pr.header).map(str::as_bytes)));
    let duration = line.duration_ms.saturating_mul(MS);
    // Time before its upstream attempt began (a wait in a bulkhead queue, say) held no upstream;
    // with retries that time includes the earlier attempts, which did.
    let before_upstream = match (line.attempts, line.to_upstream_us) {
        (Some(1), Some(us)) => us.saturating_mul(1000).min(duration),
        _ => 0,
    };
    Request {
        file,
        line: number,
        start: line.start_ns,
        end_live: line.start_ns.saturating_add(duration),
        service: if live.is_some() { 0 } else { duration - before_upstream },
        policy: policy as u32,
        class,
        verdict,
        slow,
        attempts: line.attempts,
        status: line.status,
        live,
        client_left: flags & flags::DOWNSTREAM_CONNECTION_TERMINATION != 0 || line.status == 0,
        upstream_ms: line.upstream_service_time,
    }
}

impl Reading {
    pub fn new() -> Self {
        Reading::default()
    }

    /// Starts a new file; returns its index.
    pub fn file(&mut self, name: &str) -> u16 {
        self.files.push(name.to_string());
        (self.files.len() - 1) as u16
    }

    /// Reads one line (1-based `number`) of file `file`.
    pub fn line(&mut self, config: &Config, file: u16, number: u64, text: &str) {
        if text.trim().is_empty() {
            return;
        }
        self.lines += 1;
        match Line::parse(text) {
            Ok(line) => {
                self.note_fields(text, &line);
                match policy_of(config, &line).and_then(|i| config.policies.get(i).map(|p| (i, p))) {
                    Some((i, p)) => self.requests.push(request(&line, file, number, i, p)),
                    None => self.unmatched += 1,
                }
            }
            Err(error) => self.bad(file, number, error),
        }
    }

    /// A line that could not be read (not UTF-8, say).
    pub fn bad(&mut self, file: u16, number: u64, error: String) {
        self.malformed += 1;
        if self.malformed_shown.len() < SHOWN_MALFORMED {
            let file = self.files.get(usize::from(file)).cloned().unwrap_or_default();
            self.malformed_shown.push(Malformed { file, line: number, error });
        }
    }

    fn note_fields(&mut self, text: &str, line: &Line) {
        // Cheap enough: the set stops growing after the first lines.
        if self.fields_seen < access_log::FIELDS.len() {
            for (name, _) in access_log::FIELDS {
                if !self.seen.contains(name) && text.contains(&format!("\"{name}\"")) {
                    self.seen.insert(name.to_string());
                    self.fields_seen += 1;
                }
            }
        }
        for k in line.request_headers.iter().flat_map(|h| h.keys()) {
            let key = format!("request_headers.{}", k.to_ascii_lowercase());
            if !self.seen.contains(&key) {
                self.seen.insert(key);
            }
        }
    }

    /// What the configuration needs that no line of the log carries.
    pub fn warnings(&self, config: &Config) -> Vec<String> {
        let mut out = Vec::new();
        if self.lines == self.malformed {
            return out;
        }
        let missing = |f: &str| !self.seen.contains(f);
        let rules = config.routes.rules();
        for (field, used) in [
            ("route_name", rules.iter().any(|r| r.route_name.is_some())),
            ("path", rules.iter().any(|r| r.path_prefix.is_some())),
            ("method", rules.iter().any(|r| !r.methods.is_empty())),
            ("authority", rules.iter().any(|r| r.host.is_some())),
            ("cluster", rules.iter().any(|r| r.cluster.is_some())),
        ] {
            if used && config.only.is_none() && missing(field) {
                out.push(format!("no line has `{field}`: the rules that match on it matched nothing"));
            }
        }
        for h in access_log::headers_read(config) {
            if missing(&format!("request_headers.{h}")) {
                out.push(format!(
                    "no line has `request_headers.{h}`: rules on that header matched nothing, and priority classes \
                     by it fell back to the default class (`breakwater access-log-format --config …` logs it)"
                ));
            }
        }
        let breakers = config.policies.iter().any(|p| p.breaker.is_some());
        for field in ["status", "response_flags", "upstream_service_time"] {
            if breakers && missing(field) {
                out.push(format!("no line has `{field}`: outcomes were judged without it"));
            }
        }
        if config.policies.iter().any(|p| p.retry.is_some()) && missing("attempts") {
            out.push("no line has `attempts`: every request counts as made without retries".into());
        }
        if missing("breakwater") {
            out.push("no line has `breakwater`: requests the live plugin refused cannot be told apart".into());
        }
        out
    }
}

// ---------------------------------------------------------------------------------------------
// The report
// ---------------------------------------------------------------------------------------------

/// A moment: RFC 3339 (UTC, microseconds), and seconds since the log's first request.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct When {
    pub at: String,
    pub t: f64,
    #[serde(skip)]
    pub ns: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct TransitionReport {
    #[serde(flatten)]
    pub when: When,
    /// `open`, `half_open` or `closed`.
    pub to: &'static str,
    /// `consecutive_failures`, `failure_rate`, `slow_calls`, `probe_failed`, `probe_slow` (opened only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'static str>,
    /// In the plugin's own log words: "5 consecutive failures; open for 30s".
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub open_for_s: Option<f64>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Calls {
    pub success: u64,
    pub failure: u64,
    /// Of the successes and failures, slow ones.
    pub slow: u64,
    /// Outcomes that did not count for the breaker, by reason (as `breakwater_ignored_total`).
    pub ignored: BTreeMap<&'static str, u64>,
    /// Admitted by the simulation though the live plugin refused them: outcome unknown.
    pub unknown: u64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct BreakerReport {
    pub opened: u64,
    pub half_opened: u64,
    pub closed: u64,
    /// Seconds spent open (not half-open), within the log's time span.
    pub open_s: f64,
    /// Its state when the log ends.
    pub final_state: &'static str,
    pub calls: Calls,
    pub transitions: Vec<TransitionReport>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct BulkheadReport {
    pub max_concurrent: u32,
    pub queue_size: u32,
    pub peak_in_flight: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_at: Option<When>,
    pub peak_queued: u32,
    pub admitted: u64,
    /// Of the admitted, after waiting in the queue.
    pub waited: u64,
    /// Left the queue because the client went away.
    pub left_queue: u64,
    /// An adaptive limit, which the replay moves as the plugin does (from the latencies the
    /// log shows); `max_concurrent` is then its `max`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adaptive: Option<AdaptiveReport>,
}

/// What an adaptive limit did in the replay.
#[derive(Clone, Debug, Default, Serialize)]
pub struct AdaptiveReport {
    pub min: u32,
    pub max: u32,
    /// The limit when the peak in flight was reached, the highest it reached, and its last.
    pub limit_at_peak: u32,
    pub highest: u32,
    pub last: u32,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct RetryReport {
    pub max_retries: u32,
    pub budgeted: bool,
    /// Requests that reserved retries (admitted by the breaker and the bulkhead).
    pub requests: u64,
    /// Retries the log shows these requests made.
    pub retries_in_log: u64,
    /// Of those, the ones the policy would have allowed, and the ones it would have denied.
    pub retries_allowed: u64,
    pub retries_denied: u64,
    /// Requests the budget would have given no retry at all, and fewer than `max_retries`.
    pub requests_denied: u64,
    pub requests_capped: u64,
    /// Requests a denied retry rescued live (a status below 500 after it): the policy would
    /// have turned them into failures.
    pub rescued_by_denied: u64,
    /// The fewest retries the budget held at a request's reservation.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lowest_remaining: Option<u32>,
}

/// Requests refused, by reason (`circuit_open`, `bulkhead_full`, `queue_timeout`, `shed`).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Refused {
    pub circuit_open: u64,
    pub bulkhead_full: u64,
    pub queue_timeout: u64,
    /// Only with priority classes that shed.
    #[serde(skip_serializing_if = "is_zero")]
    pub shed: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl Refused {
    fn add(&mut self, why: Refusal) {
        match why {
            Refusal::CircuitOpen => self.circuit_open += 1,
            Refusal::BulkheadFull => self.bulkhead_full += 1,
            Refusal::QueueTimeout => self.queue_timeout += 1,
            Refusal::Shed => self.shed += 1,
        }
    }
    pub fn total(&self) -> u64 {
        self.circuit_open + self.bulkhead_full + self.queue_timeout + self.shed
    }
}

/// How the simulated refusals compare with the live plugin's.
#[derive(Clone, Debug, Default, Serialize)]
pub struct VersusLive {
    /// Refused live (`x-breakwater`), by reason.
    pub live_refused: Refused,
    pub both_refused: u64,
    /// Refused live, admitted by the simulation (their outcome is unknown).
    pub only_live_refused: u64,
    /// Refused by the simulation only, by what they got live.
    pub only_simulation_refused: u64,
    pub only_simulation_refused_failed: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct PolicyReport {
    pub name: String,
    pub mode: &'static str,
    pub requests: u64,
    /// Requests it would have refused (dry_run: would-be refusals; none refused).
    pub refused: Refused,
    pub versus_live: VersusLive,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub breaker: Option<BreakerReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bulkhead: Option<BulkheadReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryReport>,
    /// Per time bin of [`Report::bin_s`]: requests arriving, refused by the simulation, refused
    /// live, and the most in flight under the bulkhead.
    #[serde(skip)]
    pub bins: Vec<Bin>,
}

#[derive(Clone, Copy, Debug, Default)]
pub struct Bin {
    pub arrived: u32,
    pub refused: u32,
    pub live_refused: u32,
    pub in_flight: u32,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub files: Vec<String>,
    pub lines: u64,
    pub malformed: u64,
    pub malformed_shown: Vec<Malformed>,
    /// Requests under no policy (no rule matched).
    pub unmatched: u64,
    pub requests: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<When>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to: Option<When>,
    pub warnings: Vec<String>,
    pub policies: Vec<PolicyReport>,
    #[serde(skip)]
    pub bin_ns: u64,
}

/// `ns` since the epoch as a [`When`], relative to `origin`.
pub fn when(ns: u64, origin: u64) -> When {
    let time = std::time::UNIX_EPOCH + std::time::Duration::from_nanos(ns);
    When {
        at: humantime::format_rfc3339_micros(time).to_string(),
        t: (ns.saturating_sub(origin) as f64 / 1e9 * 1e6).round() / 1e6,
        ns,
    }
}

// ---------------------------------------------------------------------------------------------
// The replay
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    /// The request's stream ends.
    End(usize),
    /// A queued request's `queue.timeout` is up.
    Timeout(usize),
    /// A queued request's client goes away.
    Leave(usize),
    /// A suspect breaker's trip is due for confirmation.
    Confirm(usize),
    /// An open breaker's period is over.
    Expire(usize),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Permit {
    None,
    Held(u8),
    Waiting(u8),
}

#[derive(Clone, Copy, Debug)]
struct Grant {
    allowed: u32,
    reserved: u32,
    epoch: u64,
}

/// A request the replay admitted (or queued), until its stream ends.
#[derive(Clone, Copy, Debug)]
struct Flight {
    /// The breaker's generation, and whether it is a probe.
    call: Option<(u32, bool)>,
    permit: Permit,
    grant: Option<Grant>,
}

struct Sim<'c> {
    cfg: &'c Policy,
    breaker: BreakerState,
    bulkhead: BulkheadState,
    /// The bulkhead's configuration for the replay: no worker ever falls silent.
    bulkhead_cfg: Option<BulkheadConfig>,
    budget: BudgetState,
    confirm_at: Option<u64>,
    expire_at: Option<u64>,
    open_since: Option<u64>,
    /// The bulkhead's last move: its time bin and the permits taken then, which hold in the
    /// bins after it until the next move.
    moved: (usize, u32),
    report: PolicyReport,
}

struct Replay<'c, 'r> {
    requests: &'r [Request],
    sims: Vec<Sim<'c>>,
    events: BinaryHeap<Reverse<(u64, u64, Event)>>,
    seq: u64,
    flights: HashMap<usize, Flight>,
    origin: u64,
    /// When the log's last stream ended: no breaker turns half-open after it.
    log_end: u64,
    bin_ns: u64,
}

impl<'c> Sim<'c> {
    fn new(cfg: &'c Policy, bins: usize) -> Self {
        let report = PolicyReport {
            name: cfg.name.clone(),
            mode: match cfg.mode {
                Mode::Enforce => "enforce",
                Mode::DryRun => "dry_run",
            },
            requests: 0,
            refused: Refused::default(),
            versus_live: VersusLive::default(),
            breaker: cfg.breaker.as_ref().map(|_| BreakerReport { final_state: "closed", ..BreakerReport::default() }),
            bulkhead: cfg.bulkhead.as_ref().map(|b| BulkheadReport {
                max_concurrent: b.machine.max_concurrent,
                queue_size: b.machine.queue_max,
                adaptive: b.machine.adaptive.map(|a| AdaptiveReport {
                    min: a.min,
                    max: a.max,
                    limit_at_peak: a.min,
                    highest: a.min,
                    last: a.min,
                }),
                ..BulkheadReport::default()
            }),
            retry: cfg.retry.as_ref().map(|r| RetryReport {
                max_retries: r.max_retries,
                budgeted: r.budget.is_some(),
                ..RetryReport::default()
            }),
            bins: vec![Bin::default(); bins],
        };
        let bulkhead_cfg =
            cfg.bulkhead.as_ref().map(|b| BulkheadConfig { stale_after_ns: u64::MAX, ..b.machine.clone() });
        Sim {
            cfg,
            breaker: BreakerState::default(),
            bulkhead: BulkheadState::default(),
            bulkhead_cfg,
            budget: BudgetState::default(),
            confirm_at: None,
            expire_at: None,
            open_since: None,
            moved: (0, 0),
            report,
        }
    }

    fn enforce(&self) -> bool {
        self.cfg.mode == Mode::Enforce
    }
}

/// Runs the replay over `requests` (sorted by start time); `progress` is told how many are done.
pub fn replay(config: &Config, reading: &Reading, progress: &mut dyn FnMut(u64)) -> Report {
    let requests = &reading.requests;
    let origin = requests.first().map_or(0, |r| r.start);
    let last = requests.iter().map(|r| r.end_live).max().unwrap_or(origin).max(origin + 1);
    let bin_ns = (last - origin).div_ceil(BINS as u64).max(1);
    let mut r = Replay {
        requests,
        sims: config.policies.iter().map(|p| Sim::new(p, BINS)).collect(),
        events: BinaryHeap::new(),
        seq: 0,
        flights: HashMap::new(),
        origin,
        log_end: last,
        bin_ns,
    };
    for (i, q) in requests.iter().enumerate() {
        r.run_until(q.start);
        r.arrive(i);
        if i % 4096 == 0 {
            progress(i as u64);
        }
    }
    r.run_until(u64::MAX);
    progress(requests.len() as u64);
    let end = last;
    let mut policies = Vec::new();
    for mut s in r.sims {
        if let Some(b) = s.report.breaker.as_mut() {
            if let Some(since) = s.open_since {
                b.open_s += end.saturating_sub(since) as f64 / 1e9;
            }
            b.open_s = (b.open_s * 1e3).round() / 1e3;
            b.final_state = match s.breaker.phase {
                Phase::Closed => "closed",
                Phase::Open { .. } => "open",
                Phase::HalfOpen { .. } => "half_open",
            };
        }
        policies.push(s.report);
    }
    Report {
        files: reading.files.clone(),
        lines: reading.lines,
        malformed: reading.malformed,
        malformed_shown: reading.malformed_shown.clone(),
        unmatched: reading.unmatched,
        requests: requests.len() as u64,
        from: requests.first().map(|q| when(q.start, origin)),
        to: requests.first().map(|_| when(last, origin)),
        warnings: reading.warnings(config),
        policies,
        bin_ns,
    }
}

impl<'c, 'r> Replay<'c, 'r> {
    fn at(&mut self, at: u64, e: Event) {
        self.seq += 1;
        self.events.push(Reverse((at, self.seq, e)));
    }

    /// Everything due up to and including `until`, in time order.
    fn run_until(&mut self, until: u64) {
        while let Some(Reverse((at, _, e))) = self.events.peek().copied() {
            if at > until {
                return;
            }
            self.events.pop();
            match e {
                Event::End(i) => self.end(i, at),
                Event::Timeout(i) => self.leave_queue(i, at, true),
                Event::Leave(i) => self.leave_queue(i, at, false),
                // An open period running past the log's end says nothing about the log.
                Event::Expire(_) if at > self.log_end => {}
                Event::Confirm(p) => self.breaker_step(p, at, |s, c, now| s.confirm(c, now)),
                Event::Expire(p) => self.breaker_step(p, at, |s, _, now| s.expire(now)),
            }
        }
    }

    fn bin(&self, now: u64) -> usize {
        (((now.saturating_sub(self.origin)) / self.bin_ns) as usize).min(BINS - 1)
    }

    /// A breaker step other than admission or recording, made on time.
    fn breaker_step(
        &mut self,
        p: usize,
        now: u64,
        f: impl FnOnce(
            &mut BreakerState,
            &breakwater_policies::BreakerConfig,
            u64,
        ) -> breakwater_policies::breaker::Step<()>,
    ) {
        let Some(b) = self.sims.get(p).and_then(|s| s.cfg.breaker.as_ref()) else { return };
        let Some(s) = self.sims.get_mut(p) else { return };
        let step = f(&mut s.breaker, &b.machine, now);
        self.transitioned(p, now, step.transition);
    }

    /// Notes a transition, and schedules what the worker's tick would do on time.
    fn transitioned(&mut self, p: usize, now: u64, t: Option<Transition>) {
        let origin = self.origin;
        let Some(s) = self.sims.get_mut(p) else { return };
        if let (Some(t), Some(b)) = (t, s.report.breaker.as_mut()) {
            let (to, detail) = describe(t);
            let (reason, open_for_s) = match t {
                Transition::Opened { reason, period_ns } => {
                    let why = match reason {
                        TripReason::ConsecutiveFailures(_) => "consecutive_failures",
                        TripReason::FailureRate { .. } => "failure_rate",
                        TripReason::SlowCalls { .. } => "slow_calls",
                        TripReason::ProbeFailed => "probe_failed",
                        TripReason::ProbeSlow => "probe_slow",
                    };
                    (Some(why), Some(period_ns as f64 / 1e9))
                }
                _ => (None, None),
            };
            match to {
                "open" => {
                    b.opened += 1;
                    s.open_since = Some(now);
                }
                "half_open" => b.half_opened += 1,
                "closed" => b.closed += 1,
                _ => {}
            }
            if to != "open" {
                if let Some(since) = s.open_since.take() {
                    b.open_s += now.saturating_sub(since) as f64 / 1e9;
                }
            }
            b.transitions.push(TransitionReport { when: when(now, origin), to, reason, detail, open_for_s });
        }
        let Some(bc) = s.cfg.breaker.as_ref() else { return };
        let mut due = Vec::new();
        if let (Some(since), Phase::Closed) = (s.breaker.suspect_since, s.breaker.phase) {
            let at = since.saturating_add(bc.machine.confirm_ns).max(now);
            if s.confirm_at != Some(at) {
                s.confirm_at = Some(at);
                due.push((at, Event::Confirm(p)));
            }
        }
        if let Phase::Open { until } = s.breaker.phase {
            if s.expire_at != Some(until) {
                s.expire_at = Some(until);
                due.push((until, Event::Expire(p)));
            }
        }
        for (at, e) in due {
            self.at(at, e);
        }
    }

    fn refuse(&mut self, i: usize, why: Refusal, now: u64) {
        let Some(q) = self.requests.get(i) else { return };
        let bin = self.bin(now);
        let Some(s) = self.sims.get_mut(q.policy as usize) else { return };
        s.report.refused.add(why);
        if let Some(b) = s.report.bins.get_mut(bin) {
            b.refused += 1;
        }
        let v = &mut s.report.versus_live;
        if q.live.is_some() {
            v.both_refused += 1;
        } else {
            v.only_simulation_refused += 1;
            if q.verdict == Some(Verdict::Failure) || (q.verdict.is_none() && q.status >= 500) {
                v.only_simulation_refused_failed += 1;
            }
        }
    }

    fn arrive(&mut self, i: usize) {
        let Some(q) = self.requests.get(i) else { return };
        let (p, now) = (q.policy as usize, q.start);
        let bin = self.bin(now);
        let Some(s) = self.sims.get_mut(p) else { return };
        s.report.requests += 1;
        if let Some(b) = s.report.bins.get_mut(bin) {
            b.arrived += 1;
            b.live_refused += u32::from(q.live.is_some());
        }
        if let Some(why) = q.live {
            s.report.versus_live.live_refused.add(why);
        }
        let enforce = s.enforce();
        // The breaker first: a request it refuses never takes a permit.
        let mut call = None;
        if let Some(b) = s.cfg.breaker.as_ref() {
            // As the plugin: a breaker the configuration forces (`circuit_breaker.force`) refuses
            // every call, or lets every call through and records none.
            let admission = match b.force {
                Some(Forced::Open) => Admission::Reject { retry_after_ns: b.machine.open_for_ns },
                Some(Forced::Closed) => Admission::Allow { generation: u32::MAX },
                None => {
                    let step = s.breaker.admit(&b.machine, now);
                    self.transitioned(p, now, step.transition);
                    step.value
                }
            };
            let forced_closed = b.force == Some(Forced::Closed);
            match admission {
                Admission::Allow { .. } if forced_closed => {}
                Admission::Allow { generation } => call = Some((generation, false)),
                Admission::Probe { generation } => call = Some((generation, true)),
                Admission::Reject { .. } => {
                    self.refuse(i, Refusal::CircuitOpen, now);
                    if enforce {
                        return;
                    }
                }
            }
        }
        let Some(s) = self.sims.get_mut(p) else { return };
        // Then the bulkhead.
        let mut permit = Permit::None;
        if let Some(bc) = s.bulkhead_cfg.as_ref() {
            let ask = Ask {
                worker: WORKER,
                class: q.class,
                ticket: i as u32,
                may_wait: enforce && bc.queue_max > 0,
                may_pause: enforce,
                lease: false,
            };
            let u = s.bulkhead.ask(bc, now, ask);
            match u.value {
                Acquire::Admitted | Acquire::Leased(_) => {
                    permit = Permit::Held(q.class);
                    if let Some(r) = s.report.bulkhead.as_mut() {
                        r.admitted += 1;
                    }
                }
                // With one worker no lease is ever held, so a recall cannot happen.
                Acquire::Queued | Acquire::Recalling { .. } => permit = Permit::Waiting(q.class),
                Acquire::Full | Acquire::Shed => {
                    let why = if u.value == Acquire::Shed { Refusal::Shed } else { Refusal::BulkheadFull };
                    self.refuse(i, why, now);
                    if enforce {
                        if let Some((generation, true)) = call {
                            self.release_probe(p, generation);
                        }
                        return;
                    }
                }
            }
            self.bulkhead_moved(p, now);
        }
        // Then the retries: a waiting request reserves them too.
        let grant = self.reserve(p, now);
        self.flights.insert(i, Flight { call, permit, grant });
        match permit {
            Permit::Waiting(_) => {
                let timeout = self.sims.get(p).and_then(|s| s.bulkhead_cfg.as_ref()).map_or(0, |b| b.queue_timeout_ns);
                let deadline = now.saturating_add(timeout);
                if q.client_left && q.end_live < deadline {
                    self.at(q.end_live, Event::Leave(i));
                } else {
                    self.at(deadline, Event::Timeout(i));
                }
            }
            _ => self.start(i, now),
        }
    }

    /// The request goes upstream at `now`: it ends after its service time, or when its client
    /// left, whichever comes first.
    fn start(&mut self, i: usize, now: u64) {
        let Some(q) = self.requests.get(i) else { return };
        if q.live.is_some() {
            if let Some(s) = self.sims.get_mut(q.policy as usize).filter(|s| s.enforce()) {
                s.report.versus_live.only_live_refused += 1;
            }
        }
        let mut end = now.saturating_add(q.service);
        if q.client_left {
            end = end.min(q.end_live.max(now));
        }
        self.at(end, Event::End(i));
    }

    fn bulkhead_moved(&mut self, p: usize, now: u64) {
        let origin = self.origin;
        let bin = self.bin(now);
        let Some(s) = self.sims.get_mut(p) else { return };
        let (active, queued) = (s.bulkhead.active(), s.bulkhead.queued());
        let (last_bin, last_active) = s.moved;
        for b in s.report.bins.iter_mut().take(bin).skip(last_bin + 1) {
            b.in_flight = b.in_flight.max(last_active);
        }
        if let Some(b) = s.report.bins.get_mut(bin) {
            b.in_flight = b.in_flight.max(active);
        }
        s.moved = (bin, active);
        let limit = s.bulkhead_cfg.as_ref().map_or(0, |c| s.bulkhead.limit(c));
        if let Some(r) = s.report.bulkhead.as_mut() {
            if let Some(a) = r.adaptive.as_mut() {
                (a.highest, a.last) = (a.highest.max(limit), limit);
            }
            if active > r.peak_in_flight {
                r.peak_in_flight = active;
                r.peak_at = Some(when(now, origin));
                if let Some(a) = r.adaptive.as_mut() {
                    a.limit_at_peak = limit;
                }
            }
            r.peak_queued = r.peak_queued.max(queued);
        }
    }

    /// Permits handed to waiters by a release: they go upstream now.
    fn granted(&mut self, p: usize, now: u64, tickets: Vec<breakwater_policies::bulkhead::Waiter>) {
        for w in tickets {
            let i = w.ticket as usize;
            if let Some(f) = self.flights.get_mut(&i) {
                f.permit = Permit::Held(w.class);
                if let Some(r) = self.sims.get_mut(p).and_then(|s| s.report.bulkhead.as_mut()) {
                    r.admitted += 1;
                    r.waited += 1;
                }
                self.start(i, now);
            }
        }
    }

    fn release_probe(&mut self, p: usize, generation: u32) {
        if let Some(s) = self.sims.get_mut(p) {
            s.breaker.release_probe(generation);
        }
    }

    /// A queued request's time is up (`timed_out`), or its client left.
    fn leave_queue(&mut self, i: usize, now: u64, timed_out: bool) {
        let Some(f) = self.flights.get(&i).copied() else { return };
        let Permit::Waiting(_) = f.permit else { return };
        let Some(q) = self.requests.get(i) else { return };
        let p = q.policy as usize;
        let Some(s) = self.sims.get_mut(p) else { return };
        let Some(bc) = s.bulkhead_cfg.as_ref() else { return };
        let u = s.bulkhead.withdraw(bc, now, WORKER, i as u32);
        if !u.value {
            return;
        }
        self.flights.remove(&i);
        if timed_out {
            self.refuse(i, Refusal::QueueTimeout, now);
        } else if let Some(r) = self.sims.get_mut(p).and_then(|s| s.report.bulkhead.as_mut()) {
            r.left_queue += 1;
        }
        self.bulkhead_moved(p, now);
        if let Some((generation, true)) = f.call {
            self.release_probe(p, generation);
        }
        self.settle(i, now, f.grant, false);
    }

    fn reserve(&mut self, p: usize, now: u64) -> Option<Grant> {
        let s = self.sims.get_mut(p)?;
        let r = s.cfg.retry.as_ref()?;
        let want = r.max_retries;
        let report = s.report.retry.as_mut()?;
        report.requests += 1;
        let Some(b) = r.budget.as_ref() else { return Some(Grant { allowed: want, reserved: 0, epoch: 0 }) };
        s.budget.deposit(b, now, 1);
        let available = s.budget.available(b, now);
        report.lowest_remaining = Some(report.lowest_remaining.map_or(available, |l| l.min(available)));
        let (reserved, epoch) = s.budget.withdraw(b, now, want);
        if reserved == 0 && want > 0 {
            report.requests_denied += 1;
        } else if reserved < want {
            report.requests_capped += 1;
        }
        let allowed = if s.cfg.mode == Mode::DryRun { want } else { reserved };
        Some(Grant { allowed, reserved, epoch })
    }

    /// The stream is over: the retries it made (as far as the policy allowed them) are counted
    /// and the unused ones refunded.
    fn settle(&mut self, i: usize, now: u64, grant: Option<Grant>, forwarded: bool) {
        let (Some(grant), Some(q)) = (grant, self.requests.get(i)) else { return };
        let Some(s) = self.sims.get_mut(q.policy as usize) else { return };
        let live = if forwarded { q.attempts.unwrap_or(1).saturating_sub(1) } else { 0 };
        let made = live.min(grant.allowed);
        if let Some(r) = s.report.retry.as_mut() {
            r.retries_in_log += u64::from(live);
            r.retries_allowed += u64::from(made);
            r.retries_denied += u64::from(live - made);
            if live > made && (1..500).contains(&q.status) {
                r.rescued_by_denied += 1;
            }
        }
        let Some(b) = s.cfg.retry.as_ref().and_then(|r| r.budget.as_ref()) else { return };
        let used = made.min(grant.reserved);
        s.budget.refund(grant.epoch, grant.reserved - used);
        s.budget.overdraw(b, now, made - used);
    }

    fn end(&mut self, i: usize, now: u64) {
        let Some(f) = self.flights.remove(&i) else { return };
        let Some(q) = self.requests.get(i) else { return };
        let p = q.policy as usize;
        if let Permit::Held(class) = f.permit {
            if let Some(s) = self.sims.get_mut(p) {
                if let Some(bc) = s.bulkhead_cfg.as_ref() {
                    let mut u = s.bulkhead.release(bc, now, WORKER, class);
                    // An adaptive limit learns from the latency the log shows, one sample at a
                    // time (the plugin's workers hand theirs over in batches).
                    if let (Some(ms), Some(_)) = (q.upstream_ms, bc.adaptive) {
                        let batch = breakwater_policies::Latencies { sum_ms: ms, count: 1 };
                        u.granted.extend(s.bulkhead.adapt(bc, now, WORKER, batch).granted);
                    }
                    self.bulkhead_moved(p, now);
                    self.granted(p, now, u.granted);
                }
            }
        }
        self.settle(i, now, f.grant, true);
        let Some((generation, probe)) = f.call else { return };
        let Some(s) = self.sims.get_mut(p) else { return };
        let (Some(b), Some(report)) = (s.cfg.breaker.as_ref(), s.report.breaker.as_mut()) else { return };
        let calls = &mut report.calls;
        let verdict = match (q.live, q.verdict) {
            (Some(_), _) | (None, None) => {
                calls.unknown += u64::from(q.live.is_some());
                if probe {
                    s.breaker.release_probe(generation);
                }
                return;
            }
            (None, Some(v)) => v,
        };
        match verdict {
            Verdict::Success => calls.success += 1,
            Verdict::Failure => calls.failure += 1,
            Verdict::Ignored(why) => *calls.ignored.entry(why.label()).or_default() += 1,
        }
        calls.slow += u64::from(q.slow);
        let failure = match verdict {
            Verdict::Ignored(_) => {
                if probe {
                    s.breaker.release_probe(generation);
                }
                return;
            }
            Verdict::Success => false,
            Verdict::Failure => true,
        };
        let outcome = Outcome { failure, slow: q.slow };
        let step = s.breaker.record(&b.machine, now, generation, outcome, splitmix64(now));
        if step.value == Recorded::Stale {
            *calls.ignored.entry(Ignored::Stale.label()).or_default() += 1;
        }
        self.transitioned(p, now, step.transition);
    }
}

#[cfg(test)]
mod tests;
