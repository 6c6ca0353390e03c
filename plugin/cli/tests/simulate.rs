//! `breakwater simulate` and `breakwater access-log-format`, run as a user runs them, on an
//! access log Envoy 1.40 wrote for the demo (`tests/fixtures/demo-access.log`: the demo's
//! walk-through with envoy/access-log-format.yaml in its connection manager).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod common;

use common::{breakwater, root, to_json};
use serde_json::Value;

const LOG: &str = "plugin/cli/tests/fixtures/demo-access.log";
const CONFIG: &str = "envoy/demo-policies.yaml";

fn simulate_json(log: &str) -> Value {
    let run = breakwater(&["simulate", "--config", CONFIG, "--access-log", log, "--output", "json"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    serde_json::from_str(&run.stdout).unwrap()
}

fn policy<'r>(report: &'r Value, name: &str) -> &'r Value {
    report["policies"].as_array().unwrap().iter().find(|p| p["name"] == name).unwrap()
}

#[test]
fn the_shipped_access_log_format_is_what_the_cli_prints_for_the_demo() {
    let run = breakwater(&["access-log-format", "--config", CONFIG]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let shipped = std::fs::read_to_string(root().join("envoy/access-log-format.yaml")).unwrap();
    assert_eq!(
        run.stdout, shipped,
        "envoy/access-log-format.yaml: regenerate it with `breakwater access-log-format --config {CONFIG}`"
    );
    // The YAML says what the JSON output says, and logs the demo's priority header.
    let json = breakwater(&["access-log-format", "--config", CONFIG, "--output", "json"]);
    let yaml = to_json(&yaml_rust2::YamlLoader::load_from_str(&shipped).unwrap()[0]);
    assert_eq!(yaml, serde_json::from_str::<Value>(&json.stdout).unwrap());
    let format = &yaml["access_log"][0]["typed_config"]["log_format"]["json_format"];
    assert_eq!(format["request_headers"]["x-priority"], "%REQ(X-PRIORITY)%");
    assert_eq!(format["start_time"], "%START_TIME(%s.%6f)%");
    // Without a configuration: no request headers.
    let bare = breakwater(&["access-log-format", "--output", "json"]);
    let bare: Value = serde_json::from_str(&bare.stdout).unwrap();
    assert!(bare["access_log"][0]["typed_config"]["log_format"]["json_format"].get("request_headers").is_none());
}

#[test]
fn the_fixture_log_carries_every_field_the_format_writes() {
    let format = to_json(
        &yaml_rust2::YamlLoader::load_from_str(
            &std::fs::read_to_string(root().join("envoy/access-log-format.yaml")).unwrap(),
        )
        .unwrap()[0],
    );
    let fields = format["access_log"][0]["typed_config"]["log_format"]["json_format"].as_object().unwrap();
    for line in std::fs::read_to_string(root().join(LOG)).unwrap().lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        let mut keys: Vec<&String> = v.as_object().unwrap().keys().collect();
        keys.sort();
        let mut want: Vec<&String> = fields.keys().collect();
        want.sort();
        assert_eq!(keys, want, "{line}");
    }
}

#[test]
fn the_demo_log_replays_as_the_plugin_ran_it() {
    let r = simulate_json(LOG);
    assert_eq!(
        (r["lines"].as_u64(), r["requests"].as_u64(), r["unmatched"].as_u64(), r["malformed"].as_u64()),
        (Some(37), Some(35), Some(2), Some(0))
    );
    assert_eq!(r["warnings"], Value::Array(vec![]));
    // checkout: five 500s trip it; the probe 10 s later fails and re-opens it.
    let c = policy(&r, "checkout");
    let t = c["breaker"]["transitions"].as_array().unwrap();
    let kinds: Vec<&str> = t.iter().map(|t| t["to"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["open", "half_open", "open"]);
    assert_eq!(t[0]["detail"], "5 consecutive failures; open for 10s");
    assert_eq!(t[0]["reason"], "consecutive_failures");
    assert_eq!(t[2]["reason"], "probe_failed");
    assert!((t[1]["t"].as_f64().unwrap() - t[0]["t"].as_f64().unwrap() - 10.0).abs() < 1e-6);
    // It refuses what the plugin refused, and nothing else.
    assert_eq!(c["refused"]["circuit_open"], 6);
    assert_eq!(
        (c["versus_live"]["both_refused"].as_u64(), c["versus_live"]["only_simulation_refused"].as_u64()),
        (Some(6), Some(0))
    );
    assert_eq!(c["breaker"]["calls"]["slow"], 1, "the 600 ms call is slow (500ms)");
    // search: two in flight, two queued and timed out, two refused at once.
    let s = policy(&r, "search");
    assert_eq!((s["refused"]["bulkhead_full"].as_u64(), s["refused"]["queue_timeout"].as_u64()), (Some(2), Some(2)));
    assert_eq!((s["bulkhead"]["peak_in_flight"].as_u64(), s["bulkhead"]["peak_queued"].as_u64()), (Some(2), Some(2)));
    // inventory: every third answer fails and is retried; the budget allows them all.
    let i = policy(&r, "inventory");
    assert_eq!((i["retry"]["retries_in_log"].as_u64(), i["retry"]["retries_denied"].as_u64()), (Some(4), Some(0)));
}

#[test]
fn lines_out_of_order_replay_the_same_and_bad_lines_are_skipped_by_number() {
    let dir = tempfile::tempdir().unwrap();
    let mut lines: Vec<String> = std::fs::read_to_string(root().join(LOG)).unwrap().lines().map(String::from).collect();
    lines.reverse();
    lines.insert(3, "{\"start_time\": \"yesterday\", \"duration_ms\": 3}".into());
    lines.insert(10, "GET /checkout 200".into());
    let shuffled = dir.path().join("shuffled.log");
    std::fs::write(&shuffled, lines.join("\n") + "\n").unwrap();
    let mut a = simulate_json(LOG);
    let mut b = simulate_json(shuffled.to_str().unwrap());
    assert_eq!((b["malformed"].as_u64(), b["lines"].as_u64()), (Some(2), Some(39)));
    let shown: Vec<u64> =
        b["malformed_shown"].as_array().unwrap().iter().map(|m| m["line"].as_u64().unwrap()).collect();
    assert_eq!(shown, [4, 11]);
    assert!(b["malformed_shown"][1]["error"].as_str().unwrap().starts_with("not JSON"));
    for r in [&mut a, &mut b] {
        for k in ["files", "lines", "malformed", "malformed_shown"] {
            r.as_object_mut().unwrap().remove(k);
        }
    }
    assert_eq!(a, b);
}

#[test]
fn a_log_of_another_format_is_an_error_and_a_bad_configuration_names_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("plain.log");
    std::fs::write(&log, "[2026-12-01T01:50:44.315Z] \"GET /checkout HTTP/1.1\" 200 - 0 2 2 1\n").unwrap();
    let run = breakwater(&["simulate", "--config", CONFIG, "--access-log", log.to_str().unwrap()]);
    assert_eq!(run.code, 1);
    assert!(run.stderr.contains("no line of the log could be read (line 1: not JSON"), "{}", run.stderr);
    let run = breakwater(&["simulate", "--config", "plugin/cli/tests/bad/window-mismatch.json", "--access-log", LOG]);
    assert_eq!(run.code, 1);
    assert!(run.stderr.contains("policies.a.circuit_breaker.slow_call.window: must equal"), "{}", run.stderr);
    let run = breakwater(&["simulate", "--config", CONFIG, "--access-log", "no/such.log"]);
    assert_eq!(run.code, 1);
    assert!(run.stderr.starts_with("no/such.log: "), "{}", run.stderr);
    let run = breakwater(&["simulate", "--config", "envoy/envoy.yaml", "--access-log", LOG]);
    assert_eq!(run.code, 1);
    assert!(run.stderr.contains("an Envoy or Kubernetes file, not a plugin configuration"), "{}", run.stderr);
}

#[test]
fn the_svg_timeline_shows_each_breakers_states_and_the_bulkheads() {
    let dir = tempfile::tempdir().unwrap();
    let svg = dir.path().join("t.svg");
    let run = breakwater(&["simulate", "--config", CONFIG, "--access-log", LOG, "--svg", svg.to_str().unwrap()]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(text.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\"") && text.trim_end().ends_with("</svg>"));
    // checkout's band: closed, open, half-open, open again.
    let band: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("<title>") && l.contains(" from "))
        .filter_map(|l| l.split("<title>").nth(1)?.split(" from").next())
        .collect();
    assert_eq!(band, ["closed", "open", "half-open", "open"]);
    assert_eq!(text.matches("in flight (limit ").count(), 2, "checkout's and search's bulkheads");
    for policy in ["checkout", "search", "inventory"] {
        assert!(text.contains(&format!(">policy {policy} (enforce)<")), "{policy}");
    }
}

#[test]
fn every_command_has_help() {
    let top = breakwater(&["--help"]);
    assert_eq!(top.code, 0);
    let commands: Vec<&str> = top
        .stdout
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .collect();
    assert_eq!(commands, ["validate", "schema", "per-route", "status", "control", "simulate", "access-log-format"]);
    for c in commands {
        let run = breakwater(&[c, "--help"]);
        assert_eq!(run.code, 0, "{c}");
        assert!(run.stdout.contains("Usage: breakwater ") && run.stdout.lines().count() > 4, "{c}: {}", run.stdout);
    }
}
