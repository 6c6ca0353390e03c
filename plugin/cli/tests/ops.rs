//! The operator's files agree with each other and with the metric contract: every dashboard
//! and alert query parses (promtool) and uses only the metrics of README's table, the table says
//! truly which alert and panel use each metric, and the README's commands print what it shows.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod common;

use common::{breakwater, root};
use promql_parser::label::MatchOp;
use promql_parser::parser::{self, Expr};
use promql_parser::util::{walk_expr, ExprVisitor};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

/// The metric contract of issue 12 (and issue 13's fallbacks and adaptive timeout): Breakwater's
/// own series, as /stats/prometheus shows them.
const CONTRACT: [&str; 20] = [
    "breakwater_requests_total",
    "breakwater_slow_calls_total",
    "breakwater_ignored_total",
    "breakwater_rejections_total",
    "breakwater_dry_run_rejections_total",
    "breakwater_transitions_total",
    "breakwater_circuit_state",
    "breakwater_bulkhead_active",
    "breakwater_bulkhead_queued",
    "breakwater_bulkhead_limit",
    "breakwater_bulkhead_admitted_total",
    "breakwater_bulkhead_waited_total",
    "breakwater_bulkhead_queue_wait_milliseconds",
    "breakwater_retries_total",
    "breakwater_retry_rescued_total",
    "breakwater_retry_denied_total",
    "breakwater_dry_run_retry_denied_total",
    "breakwater_retry_budget_remaining",
    "breakwater_fallback_total",
    "breakwater_timeout_milliseconds",
];

fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap()
}

/// README's "Operate" section.
fn operate() -> String {
    let readme = read("README.md");
    let start = readme.find("\n## Operate\n").expect("README has an Operate section");
    let rest = &readme[start + 1..];
    let end = rest[3..].find("\n## ").map_or(rest.len(), |i| i + 3);
    rest[..end].to_string()
}

struct Metric {
    kind: String,
    /// Alert names and `panel "Title"` entries.
    used_by: BTreeSet<String>,
}

/// The metrics table: name → type and users.
fn metrics_table() -> BTreeMap<String, Metric> {
    let section = operate();
    let mut rows = section.lines().skip_while(|l| !l.starts_with("| metric | type |")).skip(2);
    let mut table = BTreeMap::new();
    for line in rows.by_ref().take_while(|l| l.starts_with('|')) {
        let cells: Vec<&str> = line.trim_matches('|').split(" | ").map(str::trim).collect();
        assert_eq!(cells.len(), 6, "{line}");
        let name = cells[0].trim_matches('`').to_string();
        let used_by = cells[5].split("; ").filter(|u| *u != "—").map(str::to_string).collect();
        table.insert(name, Metric { kind: cells[1].to_string(), used_by });
    }
    assert!(!table.is_empty(), "the metrics table is found");
    table
}

/// Series names a query may use: the table's, a histogram's as _bucket, _sum and _count.
fn allowed_names() -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for (name, m) in metrics_table() {
        if m.kind == "histogram" {
            for suffix in ["_bucket", "_sum", "_count"] {
                names.insert(format!("{name}{suffix}"));
            }
        }
        names.insert(name);
    }
    names
}

struct Query {
    /// An alert's name, `panel "Title"`, or `variable name`.
    owner: String,
    expr: String,
}

fn panels(list: &Value, out: &mut Vec<Value>) {
    for p in list.as_array().into_iter().flatten() {
        out.push(p.clone());
        panels(&p["panels"], out);
    }
}

fn dashboard() -> Value {
    serde_json::from_str(&read("envoy/grafana/breakwater.json")).unwrap()
}

fn dashboard_queries(dash: &Value) -> Vec<Query> {
    let mut all = Vec::new();
    panels(&dash["panels"], &mut all);
    let mut queries = Vec::new();
    for p in &all {
        for t in p["targets"].as_array().into_iter().flatten() {
            queries.push(Query {
                owner: format!("panel {:?}", p["title"].as_str().unwrap()),
                expr: t["expr"].as_str().unwrap().to_string(),
            });
        }
    }
    for v in dash["templating"]["list"].as_array().unwrap() {
        if v["type"] == "query" {
            // label_values(SELECTOR, label): the selector is PromQL.
            let q = v["query"]["query"].as_str().unwrap();
            let inner = q.strip_prefix("label_values(").and_then(|r| r.rsplit_once(',')).unwrap().0;
            queries.push(Query { owner: format!("variable {}", v["name"].as_str().unwrap()), expr: inner.to_string() });
        }
    }
    queries
}

fn alert_queries() -> Vec<Query> {
    let docs = yaml_rust2::YamlLoader::load_from_str(&read("envoy/prometheus/breakwater-alerts.yaml")).unwrap();
    let mut queries = Vec::new();
    for g in docs[0]["groups"].as_vec().unwrap() {
        for r in g["rules"].as_vec().unwrap() {
            queries.push(Query {
                owner: r["alert"].as_str().unwrap().to_string(),
                expr: r["expr"].as_str().unwrap().to_string(),
            });
        }
    }
    queries
}

/// The dashboard's variables, as Grafana would fill them in.
fn substitute(expr: &str) -> Result<String, String> {
    let mut e = expr.to_string();
    for (var, value) in
        [("$__rate_interval", "5m"), ("$policy", "checkout"), ("$failure_threshold", "50"), ("$slow_threshold", "80")]
    {
        e = e.replace(var, value);
    }
    if e.contains('$') {
        return Err(format!("an unknown variable in {expr}"));
    }
    Ok(e)
}

struct Names<'a> {
    allowed: &'a BTreeSet<String>,
    found: BTreeSet<String>,
    errors: Vec<String>,
}

impl ExprVisitor for Names<'_> {
    type Error = String;
    fn pre_visit(&mut self, e: &Expr) -> Result<bool, String> {
        let vs = match e {
            Expr::VectorSelector(vs) => vs,
            Expr::MatrixSelector(ms) => &ms.vs,
            _ => return Ok(true),
        };
        if let Some(n) = &vs.name {
            self.found.insert(n.clone());
        }
        for m in vs.matchers.matchers.iter().filter(|m| m.name == "__name__") {
            match &m.op {
                MatchOp::Equal => {
                    self.found.insert(m.value.clone());
                }
                MatchOp::Re(re) => {
                    let matching: Vec<_> = self.allowed.iter().filter(|n| re.is_match(n)).cloned().collect();
                    if matching.is_empty() {
                        self.errors.push(format!("{{__name__=~{:?}}} matches no documented metric", m.value));
                    }
                    self.found.extend(matching);
                }
                _ => self.errors.push(format!("a negative __name__ matcher: {}", m.value)),
            }
        }
        Ok(true)
    }
    fn post_visit(&mut self, _: &Expr) -> Result<bool, String> {
        Ok(true)
    }
}

/// The metrics each query uses; errors for undocumented names, unknown variables, bad syntax.
fn names_used(queries: &[Query], allowed: &BTreeSet<String>) -> (BTreeMap<String, BTreeSet<String>>, Vec<String>) {
    let mut users: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut errors = Vec::new();
    for q in queries {
        let parsed = substitute(&q.expr).and_then(|e| parser::parse(&e));
        let expr = match parsed {
            Ok(expr) => expr,
            Err(e) => {
                errors.push(format!("{}: {e}", q.owner));
                continue;
            }
        };
        let mut v = Names { allowed, found: BTreeSet::new(), errors: Vec::new() };
        walk_expr(&mut v, &expr).unwrap();
        errors.extend(v.errors.into_iter().map(|e| format!("{}: {e}", q.owner)));
        for n in v.found {
            if !allowed.contains(&n) {
                errors.push(format!("{}: {n} is not in README's metrics table", q.owner));
            }
            // A histogram's series count as the histogram.
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| n.strip_suffix(s).filter(|b| allowed.contains(*b)))
                .unwrap_or(&n)
                .to_string();
            users.entry(base).or_default().insert(q.owner.clone());
        }
    }
    (users, errors)
}

/// `promtool check rules` on the queries, each wrapped as a recording rule.
fn promtool_check(queries: &[Query]) -> Result<(), String> {
    let dir = tempfile::tempdir().unwrap();
    let rules: Vec<Value> = queries
        .iter()
        .enumerate()
        .map(|(i, q)| serde_json::json!({ "record": format!("dashboard:query_{i}"), "expr": substitute(&q.expr).unwrap_or_default() }))
        .collect();
    let file = dir.path().join("queries.yaml");
    // JSON is YAML: promtool reads it as a rule file.
    std::fs::write(&file, serde_json::json!({ "groups": [{ "name": "dashboard", "rules": rules }] }).to_string())
        .unwrap();
    let out = Command::new("promtool")
        .arg("check")
        .arg("rules")
        .arg(&file)
        .output()
        .expect("promtool (make ops installs it)");
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
    }
}

#[test]
fn the_metrics_table_documents_the_contract() {
    let table = metrics_table();
    for name in CONTRACT {
        assert!(table.contains_key(name), "README's metrics table lacks {name}");
    }
    for name in table.keys().filter(|n| n.starts_with("breakwater_")) {
        assert!(CONTRACT.contains(&name.as_str()), "{name} is not in the metric contract");
    }
    for (name, m) in &table {
        let envoys = name.starts_with("envoy_");
        assert!(m.kind.ends_with("(Envoy's)") == envoys, "{name}: {}", m.kind);
        let counter = m.kind.starts_with("counter");
        assert_eq!(counter, name.ends_with("_total") || envoys && !m.kind.starts_with("gauge"), "{name}: {}", m.kind);
    }
}

#[test]
fn every_dashboard_query_parses_and_uses_only_documented_metrics() {
    let queries = dashboard_queries(&dashboard());
    assert!(queries.len() > 20, "{} queries", queries.len());
    let (_, errors) = names_used(&queries, &allowed_names());
    assert_eq!(errors, Vec::<String>::new());
    promtool_check(&queries).unwrap();
}

#[test]
fn every_alert_uses_only_documented_metrics() {
    let (_, errors) = names_used(&alert_queries(), &allowed_names());
    assert_eq!(errors, Vec::<String>::new());
}

#[test]
fn the_metrics_table_says_which_alert_and_panel_use_each_metric() {
    let mut queries = alert_queries();
    queries.extend(dashboard_queries(&dashboard()).into_iter().filter(|q| !q.owner.starts_with("variable ")));
    let (users, _) = names_used(&queries, &allowed_names());
    for (name, m) in metrics_table() {
        let actual = users.get(&name).cloned().unwrap_or_default();
        assert_eq!(m.used_by, actual, "README's \"used by\" for {name}");
    }
}

#[test]
fn the_checks_catch_a_broken_query_an_unknown_metric_and_an_unknown_variable() {
    let allowed = allowed_names();
    let good = dashboard();
    let mutate = |from: &str, to: &str| -> Vec<Query> {
        let text = serde_json::to_string(&good).unwrap();
        assert!(text.contains(from), "{from}");
        dashboard_queries(&serde_json::from_str(&text.replacen(from, to, 1)).unwrap())
    };
    let typo = mutate("breakwater_retry_rescued_total", "breakwater_retry_rescue_total");
    let (_, errors) = names_used(&typo, &allowed);
    assert_eq!(errors, ["panel \"Rescued requests\": breakwater_retry_rescue_total is not in README's metrics table"]);
    let var = mutate("{policy=\\\"$policy\\\"}", "{policy=\\\"$polcy\\\"}");
    assert_eq!(names_used(&var, &allowed).1.len(), 1);
    let broken = mutate("histogram_quantile(0.5, ", "histogram_quantile(0.5, (");
    let err = promtool_check(&broken).unwrap_err();
    assert!(err.contains("parse error") || err.contains("unclosed"), "{err}");
}

#[test]
fn the_dashboard_is_importable_and_has_the_panels_operators_need() {
    let dash = dashboard();
    let vars = dash["templating"]["list"].as_array().unwrap();
    let var = |n: &str| vars.iter().find(|v| v["name"] == n).unwrap_or_else(|| panic!("variable {n}"));
    assert_eq!(
        (var("datasource")["type"].as_str(), var("datasource")["query"].as_str()),
        (Some("datasource"), Some("prometheus"))
    );
    assert_eq!(var("policy")["type"], "query");
    assert_eq!((var("policy")["multi"].as_bool(), var("policy")["includeAll"].as_bool()), (Some(true), Some(true)));
    let mut all = Vec::new();
    panels(&dash["panels"], &mut all);
    let ids: BTreeSet<_> = all.iter().map(|p| p["id"].as_u64().unwrap()).collect();
    assert_eq!(ids.len(), all.len(), "panel ids are unique");
    for p in all.iter().filter(|p| p["type"] != "row") {
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{}", p["title"]);
        for t in p["targets"].as_array().unwrap() {
            assert_eq!(t["datasource"]["uid"], "${datasource}", "{}", p["title"]);
        }
    }
    let row = all.iter().find(|p| p["type"] == "row" && p["repeat"] == "policy").expect("a row repeated per policy");
    assert_eq!(row["title"], "Policy $policy");
    let titles: BTreeSet<_> = all.iter().map(|p| p["title"].as_str().unwrap()).collect();
    for needed in [
        "Breaker state",
        "Failure and slow-call rates",
        "Rejections by reason",
        "Bulkhead: in flight and queued against the limit",
        "Queue wait percentiles",
        "Retries against the budget",
        "Rescued requests",
        "Wasm VM reloads",
    ] {
        assert!(titles.contains(needed), "a panel {needed:?}");
    }
    let state = all.iter().find(|p| p["title"] == "Breaker state").unwrap();
    assert_eq!(state["type"], "state-timeline");
}

/// README's ```sh blocks run, in a directory laid out as the repository with the binary under
/// test at target/debug/breakwater, and print the ```text block that follows them.
#[test]
fn the_readme_commands_print_what_the_readme_shows() {
    let section = operate();
    let dir = tempfile::tempdir().unwrap();
    for d in ["envoy", "plugin"] {
        std::os::unix::fs::symlink(root().join(d), dir.path().join(d)).unwrap();
    }
    std::fs::create_dir_all(dir.path().join("target/debug")).unwrap();
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_breakwater"), dir.path().join("target/debug/breakwater")).unwrap();
    let blocks: Vec<(&str, &str)> =
        section.split("```").skip(1).step_by(2).map(|b| b.split_once('\n').unwrap()).collect();
    let mut ran = 0;
    for (i, (lang, body)) in blocks.iter().enumerate() {
        // Blocks that talk to the running demo run in integration/tests/control.rs.
        if *lang != "sh" || body.contains("localhost:9902") {
            continue;
        }
        let out = Command::new("bash")
            .arg("-euo")
            .arg("pipefail")
            .arg("-c")
            .arg(body)
            .current_dir(dir.path())
            .output()
            .unwrap();
        let stdout = String::from_utf8(out.stdout).unwrap();
        match blocks.get(i + 1) {
            Some(("text", expected)) => assert_eq!(&stdout, expected, "README: {body}"),
            _ => assert!(out.status.success(), "README: {body}: {}", String::from_utf8_lossy(&out.stderr)),
        }
        ran += 1;
    }
    assert_eq!(ran, 5);
    let written: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("breakwater.schema.json")).unwrap()).unwrap();
    let printed: Value = serde_json::from_str(&breakwater(&["schema"]).stdout).unwrap();
    assert_eq!(written, printed);
    // The build command the README gives is the one `make ops` runs.
    assert!(section.contains("`cargo build -p breakwater-cli`"));
    assert!(read("Makefile").contains("\n\tcargo build -p breakwater-cli\n"));
}

/// README's prometheus.yml snippet loads the shipped rules.
#[test]
fn the_readme_prometheus_configuration_loads_the_rules() {
    let section = operate();
    let snippet = section
        .split("```yaml\n")
        .skip(1)
        .map(|b| b.split("```").next().unwrap())
        .find(|b| b.contains("rule_files"))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("prometheus.yml"), snippet).unwrap();
    std::fs::copy(root().join("envoy/prometheus/breakwater-alerts.yaml"), dir.path().join("breakwater-alerts.yaml"))
        .unwrap();
    let out =
        Command::new("promtool").args(["check", "config", "prometheus.yml"]).current_dir(dir.path()).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{text}");
    assert!(text.contains("SUCCESS: 8 rules found"), "{text}");
}

/// The alert rules' unit tests bite: each threshold or duration moved just past its edge, or a
/// per-Envoy aggregation turned into a sum, makes `promtool test rules` fail.
#[test]
fn the_alert_tests_fail_on_a_rule_moved_past_its_edge() {
    let rules = read("envoy/prometheus/breakwater-alerts.yaml");
    let tests = read("envoy/prometheus/breakwater-alerts.test.yaml");
    let run = |rules: &str| {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("breakwater-alerts.yaml"), rules).unwrap();
        std::fs::write(dir.path().join("breakwater-alerts.test.yaml"), &tests).unwrap();
        let out = Command::new("promtool")
            .args(["test", "rules", "breakwater-alerts.test.yaml"])
            .current_dir(dir.path())
            .output()
            .unwrap();
        out.status.success()
    };
    assert!(run(&rules), "the shipped rules pass their tests");
    for (alert, from, to) in [
        ("BreakwaterCircuitOpen", "for: 5m", "for: 4m"),
        ("BreakwaterCircuitForced", "for: 1h", "for: 59m"),
        ("BreakwaterCircuitFlapping", ">= 3", ">= 2"),
        ("BreakwaterCircuitFlapping", "max by (policy) (increase", "sum by (policy) (increase"),
        ("BreakwaterBulkheadSaturated", ">= 0.9", ">= 0.89"),
        ("BreakwaterBulkheadSaturated", "for: 10m", "for: 9m"),
        ("BreakwaterQueueTimeouts", "> 0.01", "> 0.0099"),
        (
            "BreakwaterRetryBudgetExhausted",
            "breakwater_retry_budget_remaining < 1",
            "breakwater_retry_budget_remaining < 2",
        ),
        (
            "BreakwaterRetryBudgetExhausted",
            "rate(breakwater_retry_denied_total{reason=\"budget_exhausted\"}[5m]) > 0",
            "rate(breakwater_retry_denied_total{reason=\"budget_exhausted\"}[5m]) >= 0",
        ),
        ("BreakwaterWasmVmReloaded", "wasm_plugin=~\"(.+[.])?breakwater\"", "wasm_plugin=~\".+\""),
        (
            "BreakwaterWasmVmReloadFailing",
            "envoy_wasm_breakwater_vm_reload_failure[10m]",
            "envoy_wasm_breakwater_vm_reload_backoff[10m]",
        ),
    ] {
        let start = rules.find(&format!("- alert: {alert}\n")).unwrap();
        let end = rules[start + 1..].find("- alert: ").map_or(rules.len(), |i| start + 1 + i);
        let block = &rules[start..end];
        assert_eq!(block.matches(from).count(), 1, "{alert}: {from}");
        let mutated = format!("{}{}{}", &rules[..start], block.replacen(from, to, 1), &rules[end..]);
        assert!(!run(&mutated), "{alert} with {to:?} instead of {from:?} must fail its tests");
    }
}
