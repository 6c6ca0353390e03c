//! Issue 12: the shipped Grafana dashboard and Prometheus alert rules, checked against real data.
//!
//! A real Prometheus (Debian's `prometheus`, on a loopback port picked at run time) scrapes a
//! real Envoy (2 workers, the shipped `stats_config` tag extractors) every second while four
//! policies go through what the panels and alerts are about:
//! * `cb`: a breaker that sees slow successes and failures, trips, and stays open, refusing requests;
//! * `bh`: a bulkhead (2 permits, a queue of 2) held full by slow requests, with requests that
//!   wait and get a permit, wait and time out, or find no room at all;
//! * `rb`: a retry budget on a route with Envoy's own `retry_policy`, spent on a flaky and then a
//!   dead upstream until it denies retries;
//! * `shadow`: a `dry_run` breaker and budget, which refuse nothing and count what they would have.
//!
//! Then, through Prometheus's HTTP API: every target of every dashboard panel (template variables
//! substituted, each `$policy` panel for each policy) returns exactly the series expected, with
//! the values the scenario made (compared with Envoy's own raw stats, which the scenario checks
//! first from the client's and the upstream's side); the `policy` variable lists the policies;
//! every series selector of the alert rules matches data; and each alert rule is in the expected
//! state, with the right `policy` label and value: the shipped file as it is (alerts with a `for:`
//! are pending), and a copy the test makes of it with every `for:` set to 0s (they fire).
//! Finally `promtool check metrics` lints Envoy's exposition.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use integration::envoy::{get_and_abort, repo_root, Call, Envoy, Reply, Spec, OPEN};
use integration::start_upstream;
use integration::upstream::Upstream;
use promql_parser::parser::{self, Expr};
use promql_parser::util::{walk_expr, ExprVisitor};
use serde_json::{json, Value};

/// What the test substitutes for Grafana's `$__rate_interval`: longer than the whole run, so a
/// rate is the scenario's total over this many seconds and a ratio of rates is exact.
const RATE_WINDOW_S: f64 = 300.0;
/// The shipped rules as they are, and the test's copy with every `for:` set to 0s.
const SHIPPED_GROUP: &str = "breakwater";
const FOR_0S_GROUP: &str = "breakwater-for-0s";
/// The dashboard's threshold variables: cb's `failure_rate.threshold` and `slow_call.threshold`.
const FAILURE_THRESHOLD: u64 = 50;
const SLOW_THRESHOLD: u64 = 80;
const POLICIES: [&str; 4] = ["bh", "cb", "rb", "shadow"];
/// The `reason` labels of `breakwater_ignored_total`.
const IGNORED_REASONS: [&str; 7] =
    ["client_closed", "local_reply", "envoy_overflow", "rate_limited", "ext_authz", "not_counted", "stale"];

// ---------------------------------------------------------------------------------------------
// Prometheus: the process and its HTTP API
// ---------------------------------------------------------------------------------------------

/// `name` on PATH, else in /usr/bin. Missing is a failure, never a skip.
fn tool(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("`{name}` is not on PATH nor in /usr/bin: `make prometheus-tools` installs it (Debian's prometheus package)")
        })
}

/// A Prometheus server on loopback with its own temporary folder (configuration, rules, TSDB,
/// log). Dropping it kills the process, waits for it and removes the folder, however the test
/// ends; if the test process itself is killed, the kernel kills Prometheus (PR_SET_PDEATHSIG).
struct Prometheus {
    child: Child,
    dir: PathBuf,
    addr: SocketAddr,
    http: reqwest::Client,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            eprintln!("--- Prometheus log tail:\n{}\n---", tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Prometheus {
    /// Starts Prometheus scraping `target`'s `/stats/prometheus` every second and evaluating
    /// `rule_files` (name, contents) every second; waits until it is ready.
    async fn start(target: SocketAddr, rule_files: &[(&str, String)]) -> Prometheus {
        let bin = tool("prometheus");
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let dir = std::env::temp_dir().join(format!("breakwater-it-prometheus-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create Prometheus's folder");
        for (name, text) in rule_files {
            std::fs::write(dir.join(name), text).expect("write a rule file");
        }
        let names: Vec<String> = rule_files.iter().map(|(n, _)| format!("{n:?}")).collect();
        let config = format!(
            "global: {{ scrape_interval: 1s, evaluation_interval: 1s }}\nrule_files: [{}]\n\
             scrape_configs:\n  - job_name: envoy\n    metrics_path: /stats/prometheus\n    \
             static_configs:\n      - targets: [\"{target}\"]\n",
            names.join(", ")
        );
        std::fs::write(dir.join("prometheus.yml"), config).expect("write prometheus.yml");
        // A free loopback port, picked now: Prometheus does not report a port 0 back.
        let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port();
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let log = std::fs::File::create(dir.join("prometheus.log")).expect("create prometheus.log");
        let mut cmd = Command::new(&bin);
        // Absolute paths: the process's command line names the test's temporary folder, which is
        // how `make integration` waits for everything started from it to exit.
        cmd.arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()));
        // From here on, Drop kills it whatever happens.
        let mut prom = Prometheus { child, dir, addr, http: reqwest::Client::new() };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = prom.child.try_wait() {
                panic!("Prometheus exited during start ({status})");
            }
            assert!(Instant::now() < deadline, "Prometheus was not ready within 30s");
            let ready = prom.http.get(format!("http://{addr}/-/ready")).send().await;
            if ready.is_ok_and(|r| r.status().is_success()) {
                return prom;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `GET /api/v1/<path>`: the answer's `data`; panics on an error answer.
    async fn api(&self, path: &str, params: &[(&str, &str)]) -> Value {
        let resp = self
            .http
            .get(format!("http://{}/api/v1/{path}", self.addr))
            .query(params)
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .unwrap_or_else(|e| panic!("Prometheus API {path}: {e}"));
        let v: Value = resp.json().await.unwrap_or_else(|e| panic!("Prometheus API {path}: {e}"));
        assert_eq!(v["status"], "success", "Prometheus API {path} {params:?}: {v}");
        v["data"].clone()
    }

    /// An instant query, now: its series as label set → value (see [`series_key`]).
    async fn query(&self, expr: &str) -> BTreeMap<String, f64> {
        self.query_at(expr, None).await
    }

    /// An instant query at `time` (Unix seconds), or now.
    async fn query_at(&self, expr: &str, time: Option<f64>) -> BTreeMap<String, f64> {
        let time = time.map(|t| format!("{t:.3}"));
        let mut params = vec![("query", expr)];
        params.extend(time.as_deref().map(|t| ("time", t)));
        let data = self.api("query", &params).await;
        assert_eq!(data["resultType"], "vector", "{expr}: {data}");
        let mut out = BTreeMap::new();
        for s in data["result"].as_array().expect("result array") {
            let value: f64 = s["value"][1].as_str().and_then(|v| v.parse().ok()).unwrap_or(f64::NAN);
            out.insert(series_key(&s["metric"]), value);
        }
        out
    }
}

/// A series' labels as `name=value,…` in label order, without `job` and `instance` (there is
/// one target); `__name__` is kept where a query keeps it.
fn series_key(metric: &Value) -> String {
    let labels = metric.as_object().expect("labels object");
    labels
        .iter()
        .filter(|(k, _)| !matches!(k.as_str(), "job" | "instance"))
        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
        .collect::<Vec<_>>()
        .join(",")
}

// ---------------------------------------------------------------------------------------------
// Envoy's exposition
// ---------------------------------------------------------------------------------------------

/// The samples of the families whose names start with one of `prefixes`, as Prometheus keys them
/// (`__name__=…,label=…`) → value.
fn exposition_samples(text: &str, prefixes: &[&str]) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#') && prefixes.iter().any(|p| l.starts_with(p))) {
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("sample line: {line}"));
        let (name, labels) = series.split_once('{').unwrap_or((series, "}"));
        let labels = labels.strip_suffix('}').unwrap_or_else(|| panic!("labels of {line}"));
        let mut pairs = vec![("__name__".to_owned(), name.to_owned())];
        for pair in labels.split(',').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or_else(|| panic!("label {pair} in {line}"));
            pairs.push((k.to_owned(), v.trim_matches('"').to_owned()));
        }
        pairs.sort();
        let key = pairs.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",");
        let value = match value {
            "+Inf" => f64::INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("value of {line}")),
        };
        out.insert(key, value);
    }
    out
}

/// `promtool check metrics` on `text`: the problems it reports, as (family, problem).
fn promtool_lint(text: &str) -> Vec<(String, String)> {
    use std::io::Write;
    let mut child = Command::new(tool("promtool"))
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    child.stdin.take().expect("stdin").write_all(text.as_bytes()).expect("write to promtool");
    let out = child.wait_with_output().expect("promtool output");
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    // Exit 0: clean; 3: lint problems (listed one a line); anything else: it could not read the text.
    match out.status.code() {
        Some(0 | 3) => {}
        _ => panic!("promtool check metrics failed ({}): {report}", out.status),
    }
    report
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let (family, problem) = l.split_once(' ').unwrap_or((l, ""));
            (family.to_owned(), problem.to_owned())
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The dashboard and the rules
// ---------------------------------------------------------------------------------------------

/// Every panel target of the dashboard: (panel title, refId, expr), nested panels included.
fn dashboard_targets(dash: &Value) -> Vec<(String, String, String)> {
    fn walk(panels: &Value, out: &mut Vec<(String, String, String)>) {
        for p in panels.as_array().into_iter().flatten() {
            let title = p["title"].as_str().unwrap_or("").to_owned();
            for t in p["targets"].as_array().into_iter().flatten() {
                let r = t["refId"].as_str().expect("refId").to_owned();
                out.push((title.clone(), r, t["expr"].as_str().expect("expr").to_owned()));
            }
            walk(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dash["panels"], &mut out);
    out
}

/// `expr` with the template variables substituted: `$__rate_interval` by [`RATE_WINDOW_S`], the
/// threshold variables by cb's thresholds, and `$policy` (if given). Any other variable fails.
fn substitute(expr: &str, policy: Option<&str>) -> String {
    let mut vars = vec![
        ("__rate_interval", format!("{RATE_WINDOW_S}s")),
        ("failure_threshold", FAILURE_THRESHOLD.to_string()),
        ("slow_threshold", SLOW_THRESHOLD.to_string()),
    ];
    if let Some(p) = policy {
        vars.push(("policy", p.to_owned()));
    }
    let mut out = expr.to_owned();
    for (name, value) in &vars {
        out = out.replace(&format!("${{{name}}}"), value).replace(&format!("${name}"), value);
    }
    assert!(!out.contains('$'), "a template variable the test does not know: {out}");
    out
}

/// The series selectors of a PromQL expression, as PromQL.
fn selectors(expr: &str) -> Vec<String> {
    struct Found(Vec<String>);
    impl ExprVisitor for Found {
        type Error = String;
        fn pre_visit(&mut self, e: &Expr) -> Result<bool, String> {
            match e {
                Expr::VectorSelector(vs) => self.0.push(vs.to_string()),
                Expr::MatrixSelector(ms) => self.0.push(ms.vs.to_string()),
                _ => {}
            }
            Ok(true)
        }
    }
    let parsed = parser::parse(expr).unwrap_or_else(|e| panic!("{expr}: {e}"));
    let mut found = Found(Vec::new());
    walk_expr(&mut found, &parsed).expect("walk the expression");
    found.0
}

/// The shipped rules with every `for:` set to 0s and the group renamed, changed line by line so
/// every expression stays the shipped text; returns the copy and how many `for:` it changed.
fn rules_for_0s(shipped: &str) -> (String, usize) {
    let mut changed = 0;
    let mut renamed = 0;
    let lines: Vec<String> = shipped
        .lines()
        .map(|l| {
            let body = l.trim_start();
            let indent = &l[..l.len() - body.len()];
            if body.starts_with("for: ") {
                changed += 1;
                format!("{indent}for: 0s")
            } else if body == format!("- name: {SHIPPED_GROUP}") {
                renamed += 1;
                format!("{indent}- name: {FOR_0S_GROUP}")
            } else {
                l.to_owned()
            }
        })
        .collect();
    assert_eq!(renamed, 1, "the shipped rules have one group named {SHIPPED_GROUP}");
    (lines.join("\n") + "\n", changed)
}

// ---------------------------------------------------------------------------------------------
// Expectations
// ---------------------------------------------------------------------------------------------

/// What a series' value must be.
#[derive(Clone, Copy, Debug)]
enum Want {
    /// Exactly (a gauge, a ratio of rates over the same samples, a constant).
    Eq(f64),
    /// A rate over [`RATE_WINDOW_S`] of a counter that moved by this much during the run:
    /// Prometheus extrapolates to the window's end, never below the first sample (0 here), so
    /// rate × window lies between the count and a little above it.
    Rate(f64),
    /// `increase()` over the window of a counter that moved by this much (as [`Want::Rate`]).
    Increase(f64),
    /// Within [lo, hi].
    In(f64, f64),
}

impl Want {
    fn holds(self, v: f64) -> bool {
        let moved = |got: f64, n: f64| if n == 0.0 { got == 0.0 } else { got >= n * (1.0 - 1e-9) && got <= n * 1.15 };
        match self {
            Want::Eq(x) => (v - x).abs() <= 1e-9 * x.abs().max(1.0),
            Want::Rate(n) => moved(v * RATE_WINDOW_S, n),
            Want::Increase(n) => moved(v, n),
            Want::In(lo, hi) => (lo..=hi).contains(&v),
        }
    }
}

/// What Envoy itself says at the end: its raw counters and gauges (`/stats`, names before any
/// tag extraction), and the mean of the queue-wait histogram in its exposition.
struct Raw {
    stats: BTreeMap<String, i64>,
    queue_wait_mean: f64,
}

impl Raw {
    /// `wasmcustom.breakwater_<name>` (e.g. `requests_total.policy.cb.outcome.failure`) as f64.
    fn get(&self, name: &str) -> f64 {
        let full = format!("wasmcustom.breakwater_{name}");
        *self.stats.get(&full).unwrap_or_else(|| panic!("Envoy has no stat {full}")) as f64
    }
}

/// The series a dashboard target must return for `policy` (`None` for the panels without
/// `$policy`), keyed as [`series_key`] keys them; an empty list: none at all. `None` for a target
/// the test does not know: a new panel must be given its expectation here.
fn expected_series(title: &str, r: &str, policy: Option<&str>, raw: &Raw) -> Option<Vec<(String, Want)>> {
    let p = policy.unwrap_or("");
    let one = |w: Want| vec![(String::new(), w)];
    let only = |policies: &[&str], w: Want| if policies.contains(&p) { one(w) } else { vec![] };
    let breaker = ["cb", "shadow"].contains(&p);
    let outcome = |o: &str| raw.get(&format!("requests_total.policy.{p}.outcome.{o}"));
    let by = |label: &str, pairs: Vec<(&str, Want)>| -> Vec<(String, Want)> {
        pairs.into_iter().map(|(v, w)| (format!("{label}={v}"), w)).collect()
    };
    let w = match (title, r) {
        ("Breaker state", "A") => only(&["cb", "shadow"], Want::Eq(2.0)),
        ("Failure and slow-call rates", "A") if breaker => {
            one(Want::Eq(100.0 * outcome("failure") / (outcome("success") + outcome("failure"))))
        }
        ("Failure and slow-call rates", "B") if p == "cb" => {
            one(Want::Eq(100.0 * raw.get("slow_calls_total.policy.cb") / (outcome("success") + outcome("failure"))))
        }
        ("Failure and slow-call rates", "C") => only(&["cb", "shadow"], Want::Eq(FAILURE_THRESHOLD as f64)),
        ("Failure and slow-call rates", "D") => only(&["cb"], Want::Eq(SLOW_THRESHOLD as f64)),
        ("Failure and slow-call rates", "A" | "B") => vec![],
        ("Calls by outcome", "A") if breaker => by(
            "outcome",
            vec![("success", Want::Rate(outcome("success"))), ("failure", Want::Rate(outcome("failure")))],
        ),
        ("Calls by outcome", "B") if breaker => by(
            "reason",
            IGNORED_REASONS
                .iter()
                .map(|r| (*r, Want::Rate(raw.get(&format!("ignored_total.policy.{p}.reason.{r}")))))
                .collect(),
        ),
        ("Calls by outcome", "A" | "B") => vec![],
        ("Rejections by reason", "A") => match p {
            "cb" => by("reason", vec![("circuit_open", Want::Rate(4.0))]),
            "bh" => by("reason", vec![("bulkhead_full", Want::Rate(3.0)), ("queue_timeout", Want::Rate(2.0))]),
            _ => vec![],
        },
        ("Rejections by reason", "B") => match p {
            "shadow" => by("reason", vec![("circuit_open", Want::Rate(8.0))]),
            _ => vec![],
        },
        ("Breaker transitions", "A") if breaker => {
            by("to_state", vec![("open", Want::Increase(1.0)), ("half_open", Want::Eq(0.0)), ("closed", Want::Eq(0.0))])
        }
        ("Breaker transitions", "A") => vec![],
        // At the end: two slow requests hold both permits, nobody waits.
        ("Bulkhead: in flight and queued against the limit", "A") => only(&["bh"], Want::Eq(2.0)),
        ("Bulkhead: in flight and queued against the limit", "B") => only(&["bh"], Want::Eq(0.0)),
        ("Bulkhead: in flight and queued against the limit", "C") => only(&["bh"], Want::Eq(2.0)),
        // 4 of 300ms (2 after waiting), 2 holding at the end.
        ("Bulkhead admissions", "A") => only(&["bh"], Want::Rate(6.0)),
        ("Bulkhead admissions", "B") => only(&["bh"], Want::Rate(raw.get("bulkhead_waited_total.policy.bh"))),
        // The waits: two of about 300ms (then a permit), two of the 3s queue timeout, and maybe
        // a few of a moment (a recall of leased permits). Envoy's buckets end at 250, 500, 1000,
        // 2500, 5000: the median lies below 1000, p90 and p99 in the 2500–5000 bucket; the mean
        // is the histogram's sum over its count, as Envoy shows them.
        ("Queue wait percentiles", "A") => only(&["bh"], Want::In(250.0, 1000.0)),
        ("Queue wait percentiles", "B" | "C") => only(&["bh"], Want::In(2500.0, 5000.0)),
        ("Queue wait percentiles", "D") => only(&["bh"], Want::Eq(raw.queue_wait_mean)),
        ("Retries against the budget", "A") | ("Rescued requests", "B") => match p {
            "rb" | "shadow" => one(Want::Rate(raw.get(&format!("retries_total.policy.{p}")))),
            _ => vec![],
        },
        ("Retries against the budget", "B") => match p {
            "rb" => one(Want::Rate(raw.get("retry_denied_total.policy.rb.reason.budget_exhausted"))),
            _ => vec![],
        },
        ("Retries against the budget", "C") => match p {
            "shadow" => one(Want::Rate(5.0)),
            _ => vec![],
        },
        ("Retries against the budget", "D") => match p {
            "rb" => one(Want::Eq(0.0)),
            "shadow" => one(Want::Eq(raw.get("retry_budget_remaining.policy.shadow"))),
            _ => vec![],
        },
        ("Rescued requests", "A") => match p {
            "rb" => one(Want::Rate(5.0)),
            "shadow" => one(Want::Rate(0.0)),
            _ => vec![],
        },
        // bh's 3 refusals for want of room got its static answer; no other policy has a fallback.
        ("Fallbacks served and missed", "A") => match p {
            "bh" => by("kind=static,result", vec![("served", Want::Rate(3.0)), ("missed", Want::Rate(0.0))]),
            _ => vec![],
        },
        // No VM trapped: Envoy's reload counters are there, at 0, with the plugin's name as a
        // label (the shipped wasm_plugin extractor); the untagged names are then absent.
        ("Wasm VM reloads", "A" | "B") => vec![("wasm_plugin=breakwater".to_owned(), Want::Eq(0.0))],
        ("Wasm VM reloads", "C" | "D") => vec![],
        // One VM per worker and two on the main thread (Envoy 1.40 shows workers + 2 for 1, 2
        // and 3 workers; the canary VM of each configuration is created and gone).
        ("Wasm VMs", "A") => one(Want::Eq(4.0)),
        _ => return None,
    };
    Some(w)
}

/// The alerts the scenario must set off: (alert, policy label) → value.
fn expected_alerts() -> BTreeMap<(String, String), f64> {
    [
        ("BreakwaterCircuitOpen", "cb", 1.0),
        // A dry-run breaker opens too (and refuses nothing): the alert says so.
        ("BreakwaterCircuitOpen", "shadow", 1.0),
        ("BreakwaterBulkheadSaturated", "bh", 1.0),
        // 2 queue timeouts of the 6 admitted + 3 full + 2 timed out.
        ("BreakwaterQueueTimeouts", "bh", 2.0 / 11.0),
        // On one Envoy.
        ("BreakwaterRetryBudgetExhausted", "rb", 1.0),
    ]
    .into_iter()
    .map(|(a, p, v)| ((a.to_owned(), p.to_owned()), v))
    .collect()
}

// ---------------------------------------------------------------------------------------------
// The scenario
// ---------------------------------------------------------------------------------------------

fn received(up: &Upstream, path: &str) -> u64 {
    up.stats().by_path.get(path).copied().unwrap_or(0)
}

/// Requests that hold a connection open in the background (without the client's 15s limit),
/// closed when this is dropped.
struct Holders(Vec<tokio::task::JoinHandle<()>>);

impl Drop for Holders {
    fn drop(&mut self) {
        for h in &self.0 {
            h.abort();
        }
    }
}

fn spawn_get(envoy: &Envoy, path: &str) -> tokio::task::JoinHandle<Reply> {
    let (addr, call) = (envoy.listener(), Call::get(path));
    tokio::spawn(async move { call.send(addr).await.expect("no give-up set") })
}

/// cb: 2 slow and 2 fast successes, 3 failures (the breaker opens), 4 requests refused.
async fn trip_the_breaker(envoy: &Envoy) {
    for path in ["/cb?delay_ms=400", "/cb?delay_ms=400", "/cb", "/cb"] {
        for r in envoy.send_recorded("cb", path, 1).await {
            assert_eq!((r.status, r.from_upstream()), (200, true), "{r:?}");
        }
    }
    for r in envoy.send_recorded("cb", "/cb?status=500", 3).await {
        assert_eq!((r.status, r.from_upstream()), (500, true), "{r:?}");
    }
    let s = envoy.wait_tripped("cb", 1).await;
    assert_eq!((s.success, s.failure, s.slow, s.to_open, s.state), (4, 3, 2, 1, OPEN), "{s:?}");
    for r in envoy.get_concurrently(vec!["/cb".to_owned(); 4]).await {
        assert!(r.is_circuit_open(), "{r:?}");
    }
    let s = envoy.wait_policy("cb", |s| s.rejections == 4).await;
    assert_eq!(s.rejections, 4, "{s:?}");
}

/// rb: a flaky upstream (every second answer fails) rescued 5 times, then a dead one until the
/// budget (60 retries over 60s) is spent and denies.
async fn exhaust_the_budget(envoy: &Envoy, up: &Upstream) {
    for _ in 0..6 {
        let r = envoy.get("/rb?fail_every=2").await;
        assert_eq!(r.status, 200, "rescued or never failed: {r:?}");
    }
    assert_eq!(received(up, "/rb"), 11, "5 failed and were retried");
    let calls = (0..40).map(|_| Call::get("/rb?status=503")).collect();
    for r in envoy.send_all(8, calls).await {
        assert_eq!(r.expect("no give-up").status, 503);
    }
    // Two more, one at a time: the last look at the budget (which sets its gauge) is after it ran out.
    for _ in 0..2 {
        assert_eq!(envoy.get("/rb?status=503").await.status, 503);
    }
    let retries = received(up, "/rb") - 11 - 42;
    assert!((55..=60).contains(&retries), "the budget allows 60 retries, 5 went to the rescues: {retries}");
}

/// shadow (dry run): 10 failing requests, each retried once whatever the budget (5 retries) says;
/// the breaker opens after the second and the other 8 would have been refused.
async fn run_the_dry_run(envoy: &Envoy, up: &Upstream) {
    for r in envoy.send_recorded("shadow", "/shadow?status=503", 2).await {
        assert_eq!((r.status, r.from_upstream()), (503, true), "{r:?}");
    }
    let s = envoy.wait_tripped("shadow", 1).await;
    assert_eq!((s.to_open, s.state), (1, OPEN), "{s:?}");
    for _ in 0..8 {
        let r = envoy.get("/shadow?status=503").await;
        assert_eq!((r.status, r.from_upstream()), (503, true), "a dry run refuses nothing: {r:?}");
    }
    let s = envoy.wait_policy("shadow", |s| s.dry_run_rejections == 8).await;
    assert_eq!(s.dry_run_rejections, 8, "{s:?}");
    assert_eq!(received(up, "/shadow"), 20, "every request retried once");
}

/// bh, first: 4 requests of 300ms at once against 2 permits: 2 (at least) wait and get one. A
/// request may also wait a moment while the other worker is asked for an idle leased permit.
async fn wait_for_permits(envoy: &Envoy) {
    for r in envoy.get_concurrently(vec!["/bh?delay_ms=300".to_owned(); 4]).await {
        assert_eq!((r.status, r.from_upstream()), (200, true), "{r:?}");
    }
    let s = envoy.wait_bulkhead_idle("bh").await;
    assert!(s.admitted == 4 && (2..=4).contains(&s.waited), "{s:?}");
}

/// bh, last: 2 slow requests hold both permits to the end of the test; 2 more wait out the
/// queue timeout, 3 find no room (at once, or after asking the other worker for an idle leased
/// permit in vain: a short wait that the queue-wait histogram counts too) and get bh's static
/// fallback. While 2 wait, the dashboard's bulkhead panel shows them.
async fn saturate_the_bulkhead(envoy: &Envoy, up: &Upstream, prom: &Prometheus, panel: &[(String, String)]) -> Holders {
    let hold = |addr| tokio::spawn(get_and_abort(addr, "/bh?delay_ms=50000", Duration::from_secs(50)));
    let holders = Holders(vec![hold(envoy.listener()), hold(envoy.listener())]);
    let deadline = Instant::now() + Duration::from_secs(5);
    while up.stats().in_flight < 2 {
        assert!(Instant::now() < deadline, "the two holders never reached the upstream");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let waiting = [spawn_get(envoy, "/bh"), spawn_get(envoy, "/bh")];
    let s = envoy.wait_bulkhead("bh", |s| s.queued == 2).await;
    assert_eq!((s.active, s.queued), (2, 2), "{s:?}");
    // Refused for want of room, and answered by the static fallback instead (issue 13's panel).
    for r in envoy.get_concurrently(vec!["/bh".to_owned(); 3]).await {
        assert_eq!(
            (r.status, r.header("x-breakwater"), r.body.as_str()),
            (200, Some("fallback-static"), "degraded"),
            "{r:?}"
        );
    }
    // The queue timeout is 3s and Prometheus scrapes every second: it sees the 2 waiting. The
    // panel's queries are evaluated at one instant, so they read one scrape (while the 3 were
    // refused, the queue also held them for a moment).
    let queries: BTreeMap<&str, String> = panel.iter().map(|(r, e)| (r.as_str(), substitute(e, Some("bh")))).collect();
    let want: BTreeMap<&str, Option<f64>> = [("A", Some(2.0)), ("B", Some(2.0)), ("C", Some(2.0))].into();
    let deadline = Instant::now() + Duration::from_millis(2500);
    let mut seen = BTreeMap::new();
    loop {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs_f64();
        for (r, q) in &queries {
            seen.insert(*r, prom.query_at(q, Some(now)).await.get("").copied());
        }
        if seen == want || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("bulkhead panel while 2 wait (A in flight, B queued, C limit): {seen:?}");
    assert_eq!(seen, want, "the bulkhead panel while two requests wait: {queries:?}");
    for w in waiting {
        let r = w.await.expect("waiting request");
        assert!(r.is_queue_timeout(), "{r:?}");
    }
    let s = envoy.wait_bulkhead("bh", |s| s.queue_timeout == 2 && s.queued == 0).await;
    assert_eq!((s.active, s.queued, s.admitted, s.full, s.queue_timeout), (2, 0, 6, 3, 2), "{s:?}");
    holders
}

#[tokio::test(flavor = "multi_thread")]
async fn the_dashboard_and_the_alerts_show_a_real_envoy_under_a_real_scenario() {
    let started = Instant::now();
    let root = repo_root();
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("envoy/grafana/breakwater.json")).expect("dashboard"))
            .expect("dashboard JSON");
    let shipped_rules = std::fs::read_to_string(root.join("envoy/prometheus/breakwater-alerts.yaml")).expect("rules");
    let (rules_0s, for_lines) = rules_for_0s(&shipped_rules);

    let up = start_upstream().await;
    let policies = json!({
        "cb": { "circuit_breaker": {
            "consecutive_failures": 3,
            "failure_rate": { "threshold": FAILURE_THRESHOLD, "minimum_requests": 100 },
            "slow_call": { "duration": "300ms", "threshold": SLOW_THRESHOLD },
            "open_for": "5m" } },
        "bh": { "bulkhead": { "max_concurrent": 2, "queue": { "max_size": 2, "timeout": "3s" } },
                "fallback": { "when": ["bulkhead_full"], "static": { "body": "degraded" } } },
        "rb": { "retry": { "max_retries": 2, "budget": { "ratio": 0, "min_per_second": 1, "ttl": "60s" } } },
        "shadow": { "mode": "dry_run",
            "circuit_breaker": { "consecutive_failures": 2, "open_for": "5m" },
            "retry": { "retry_on": ["5xx"], "max_retries": 1, "budget": { "ratio": 0, "min_per_second": 1, "ttl": "5s" } } }
    });
    let rules: Vec<Value> = POLICIES.iter().map(|p| json!({ "match": { "route_name": p }, "policy": p })).collect();
    let spec = Spec::new(up.addr())
        .plugin(json!({ "policies": policies, "routes": rules }))
        .route("cb", "/cb", "backend")
        // The holders stay in flight to the end of the test.
        .route_with_timeout("bh", "/bh", "backend", Duration::from_secs(60))
        .route_with_retry_policy("rb", "/rb", "5xx", 2)
        .route("shadow", "/shadow", "backend")
        .attempt_count_in_response();
    let envoy = Envoy::start(&spec).await;
    println!("Envoy up after {:?}", started.elapsed());

    let prom = Prometheus::start(
        envoy.admin(),
        &[("breakwater-alerts.yaml", shipped_rules.clone()), ("breakwater-alerts-for-0s.yaml", rules_0s)],
    )
    .await;
    // Prometheus must have seen the counters at 0 before the traffic, for rate() to count it all.
    let deadline = Instant::now() + Duration::from_secs(15);
    while prom.query(r#"breakwater_requests_total{policy="cb",outcome="success"} == 0"#).await.is_empty() {
        assert!(Instant::now() < deadline, "Prometheus never scraped Breakwater's counters");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("Envoy and Prometheus up after {:?}", started.elapsed());

    trip_the_breaker(&envoy).await;
    exhaust_the_budget(&envoy, &up).await;
    run_the_dry_run(&envoy, &up).await;
    wait_for_permits(&envoy).await;
    let bulkhead_panel: Vec<(String, String)> = dashboard_targets(&dashboard)
        .into_iter()
        .filter(|(t, _, _)| t == "Bulkhead: in flight and queued against the limit")
        .map(|(_, r, e)| (r, e))
        .collect();
    let _holders = saturate_the_bulkhead(&envoy, &up, &prom, &bulkhead_panel).await;
    println!("scenario done after {:?}", started.elapsed());

    // Envoy has every count (counters reach it on the workers' ticks, histograms on its stats
    // flush), and Prometheus has scraped exactly what Envoy shows.
    let breakwater_stats = || async {
        let mut stats = envoy.stats().await;
        stats.retain(|name, _| name.starts_with("wasmcustom.breakwater_"));
        stats
    };
    let stats = envoy.settled(breakwater_stats).await;
    let waits = stats["wasmcustom.breakwater_bulkhead_waited_total.policy.bh"] + 2;
    let histogram = "breakwater_bulkhead_queue_wait_milliseconds";
    let deadline = Instant::now() + Duration::from_secs(15);
    let (exposition, queue_wait_mean) = loop {
        let text = envoy.prometheus().await;
        let count: f64 = exposition_samples(&text, &[&format!("{histogram}_count")]).values().sum();
        let sum: f64 = exposition_samples(&text, &[&format!("{histogram}_sum")]).values().sum();
        // The count alone can be reached by short waits for a recall (refused bulkhead-full)
        // before the flush that brings the two 3s queue timeouts: wait for those too.
        if count >= waits as f64 && sum >= 6000.0 {
            break (text, sum / count);
        }
        assert!(Instant::now() < deadline, "Envoy's queue-wait histogram never counted the {waits} waits: {count}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let raw = Raw { stats, queue_wait_mean };
    let shown = exposition_samples(&exposition, &["breakwater_", "envoy_wasm_"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let scraped = prom.query(r#"{__name__=~"breakwater_.+|envoy_wasm_.+"}"#).await;
        if scraped == shown {
            break;
        }
        assert!(Instant::now() < deadline, "Prometheus's samples never matched Envoy's:\n{shown:#?}\n{scraped:#?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(raw.get("retry_denied_total.policy.rb.reason.budget_exhausted") >= 10.0, "the budget denied");
    assert_eq!(raw.get("retry_rescued_total.policy.rb"), 5.0);
    assert_eq!(raw.get("dry_run_retry_denied_total.policy.shadow.reason.budget_exhausted"), 5.0);
    assert_eq!(raw.get("retries_total.policy.shadow"), 10.0);

    // The Policy variable: label_values({__name__=~"breakwater_.+"}, policy).
    let variable = dashboard["templating"]["list"]
        .as_array()
        .and_then(|l| l.iter().find(|v| v["name"] == "policy"))
        .and_then(|v| v["query"]["query"].as_str())
        .expect("the policy variable");
    let selector = variable.strip_prefix("label_values(").and_then(|r| r.strip_suffix(", policy)")).expect(variable);
    let listed = prom.api("label/policy/values", &[("match[]", selector)]).await;
    assert_eq!(listed, json!(POLICIES), "the Policy variable lists the policies");

    // Every panel target, for each policy where it has $policy.
    let mut failures = Vec::new();
    let targets = dashboard_targets(&dashboard);
    assert!(targets.len() >= 25, "the dashboard's targets: {}", targets.len());
    for (title, r, expr) in &targets {
        let policies: Vec<Option<&str>> =
            if expr.contains("$policy") { POLICIES.iter().map(|p| Some(*p)).collect() } else { vec![None] };
        for policy in policies {
            let query = substitute(expr, policy);
            let got = prom.query(&query).await;
            let Some(want) = expected_series(title, r, policy, &raw) else {
                failures.push(format!("{title} {r}: no expectation in the test for {query}"));
                continue;
            };
            let keys: BTreeSet<&String> = got.keys().collect();
            let wanted: BTreeSet<&String> = want.iter().map(|(k, _)| k).collect();
            let ok = keys == wanted && want.iter().all(|(k, w)| got.get(k).is_some_and(|v| w.holds(*v)));
            println!("{} {title} {r} [{}]: {got:?}", if ok { "ok  " } else { "FAIL" }, policy.unwrap_or("-"));
            if !ok {
                failures.push(format!("{title} {r} [{policy:?}]: {query}\n  got  {got:?}\n  want {want:?}"));
            }
        }
    }
    assert!(failures.is_empty(), "dashboard targets:\n{}", failures.join("\n"));

    // Every series selector of the alert rules matches data, except the names Envoy gives its
    // Wasm stats without the wasm_plugin extractor: with the shipped one they must not exist.
    let rules = prom.api("rules", &[]).await;
    let groups = rules["groups"].as_array().expect("rule groups");
    let group = |name: &str| -> Vec<Value> {
        let g = groups.iter().find(|g| g["name"] == name).unwrap_or_else(|| panic!("no rule group {name}: {rules}"));
        g["rules"].as_array().expect("rules").clone()
    };
    let (shipped, for_0s) = (group(SHIPPED_GROUP), group(FOR_0S_GROUP));
    assert_eq!(groups.len(), 2, "{rules}");
    assert_eq!(shipped.len(), 8, "the shipped alert rules");
    for rule in &shipped {
        for sel in selectors(rule["query"].as_str().expect("query")) {
            let n = prom.query(&sel).await.len();
            let untagged = sel.starts_with("envoy_wasm_breakwater_");
            println!("{}: {sel} matches {n} series", rule["name"]);
            assert!(if untagged { n == 0 } else { n > 0 }, "{}: {sel} matches {n} series", rule["name"]);
        }
    }
    // The copy: the same rules and expressions, every `for` 0s.
    let with_for = shipped.iter().filter(|r| r["duration"].as_f64() != Some(0.0)).count();
    assert_eq!((for_lines, with_for), (5, 5), "the shipped rules' `for:` lines, and the rules with a duration");
    for (s, c) in shipped.iter().zip(&for_0s) {
        assert_eq!((&s["name"], &s["query"], &c["duration"]), (&c["name"], &c["query"], &json!(0)), "{c}");
    }

    // The alerts: firing in the for-0s copy, pending in the shipped rules where they have a
    // `for`; every other rule inactive; every rule evaluated without error.
    let want = expected_alerts();
    let active = |rules: &[Value]| -> BTreeMap<(String, String), (String, f64)> {
        let mut out = BTreeMap::new();
        for rule in rules {
            for a in rule["alerts"].as_array().into_iter().flatten() {
                let policy = a["labels"]["policy"].as_str().unwrap_or("<none>").to_owned();
                let value = a["value"].as_str().and_then(|v| v.parse().ok()).unwrap_or(f64::NAN);
                let key = (rule["name"].as_str().unwrap_or("").to_owned(), policy);
                out.insert(key, (a["state"].as_str().unwrap_or("").to_owned(), value));
            }
        }
        out
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let (shipped, for_0s) = loop {
        let rules = prom.api("rules", &[]).await;
        let groups = rules["groups"].as_array().expect("rule groups").clone();
        let group = |name: &str| {
            groups.iter().find(|g| g["name"] == name).and_then(|g| g["rules"].as_array()).cloned().unwrap_or_default()
        };
        let (shipped, for_0s) = (group(SHIPPED_GROUP), group(FOR_0S_GROUP));
        let firing: BTreeSet<_> =
            active(&for_0s).into_iter().filter(|(_, (s, _))| s == "firing").map(|(k, _)| k).collect();
        if firing == want.keys().cloned().collect() || Instant::now() > deadline {
            break (shipped, for_0s);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    for rule in shipped.iter().chain(&for_0s) {
        println!(
            "{}: {} (health {}) {:?}",
            rule["name"],
            rule["state"],
            rule["health"],
            active(std::slice::from_ref(rule))
        );
        let error = rule["lastError"].as_str().unwrap_or("");
        assert_eq!((rule["health"].as_str(), error), (Some("ok"), ""), "{rule}");
    }
    let (got_0s, got_shipped) = (active(&for_0s), active(&shipped));
    let fired: BTreeMap<_, _> = got_0s.iter().map(|(k, (s, v))| (k.clone(), (s.as_str(), *v))).collect();
    let pending: BTreeMap<_, _> = got_shipped.iter().map(|(k, (s, _))| (k.clone(), s.as_str())).collect();
    for ((alert, policy), value) in &want {
        let (state, got) = fired.get(&(alert.clone(), policy.clone())).copied().unwrap_or(("absent", f64::NAN));
        assert_eq!(state, "firing", "{alert} for {policy}: {fired:?}");
        assert!(Want::Eq(*value).holds(got), "{alert} for {policy}: value {got}, want {value}");
    }
    assert_eq!(fired.len(), want.len(), "only the expected alerts fire: {fired:?}");
    let want_pending: BTreeMap<_, _> = want.keys().map(|k| (k.clone(), "pending")).collect();
    assert_eq!(pending, want_pending, "the shipped rules: the same alerts, pending for their `for`");

    // promtool check metrics on the exposition, every Breakwater family in it. Envoy writes no
    // `# HELP` for any family, so promtool reports "no help text" for every one, Breakwater's
    // included: that is Envoy's exporter, not a name. Envoy's own families have more problems
    // (counters without `_total`, `_ms` in names, …: printed below). Of Breakwater's, only the
    // queue-wait histogram's unit may be reported besides: see the filter.
    assert!(!exposition.contains("# HELP"), "Envoy writes HELP lines now: the lint filter below needs a look");
    let problems = promtool_lint(&exposition);
    let families: BTreeSet<&str> =
        exposition.lines().filter_map(|l| l.strip_prefix("# TYPE ").and_then(|t| t.split(' ').next())).collect();
    let (ours, envoys): (Vec<_>, Vec<_>) = problems.iter().partition(|(f, _)| f.starts_with("breakwater_"));
    let mut envoy_kinds: BTreeMap<&str, usize> = BTreeMap::new();
    for (_, p) in &envoys {
        *envoy_kinds.entry(p.as_str()).or_default() += 1;
    }
    println!("promtool check metrics: {} families, {} problems", families.len(), problems.len());
    println!("  Envoy's own families: {envoy_kinds:?}");
    let common = ["no help text", "counter metrics should have \"_total\" suffix"];
    println!(
        "  of which the rarer: {:?}",
        envoys.iter().filter(|(_, p)| !common.contains(&p.as_str())).collect::<Vec<_>>()
    );
    println!("  Breakwater's: {ours:?}");
    let unexpected: Vec<_> = ours
        .iter()
        .filter(|(f, p)| {
            p != "no help text"
                // Envoy histograms record whole numbers: in seconds a queue wait would read 0.
                && !(f == "breakwater_bulkhead_queue_wait_milliseconds"
                    && p == "use base unit \"seconds\" instead of \"milliseconds\"")
        })
        .collect();
    assert!(unexpected.is_empty(), "promtool check metrics on Breakwater's families: {unexpected:?}");
    let breakwater_families = families.iter().filter(|f| f.starts_with("breakwater_")).count();
    assert_eq!(breakwater_families, 19, "every Breakwater family appeared: {families:?}");

    // Nothing left behind: the process is gone, its folder too, and nothing runs from it.
    let (pid, dir) = (prom.pid(), prom.dir.clone());
    drop(prom);
    assert!(!Path::new(&format!("/proc/{pid}")).exists(), "Prometheus {pid} still runs");
    assert!(!dir.exists(), "{} is left", dir.display());
    let needle = dir.to_string_lossy().into_owned();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline);
        assert!(!cmdline.contains(&needle), "a process still runs from {needle}: {cmdline}");
    }
    let elapsed = started.elapsed();
    println!("the test took {elapsed:?}");
    assert!(elapsed < Duration::from_secs(60), "the test should stay under a minute: {elapsed:?}");
}
