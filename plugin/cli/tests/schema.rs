//! `breakwater schema`: a draft 2020-12 JSON Schema that accepts every shipped example and
//! refuses the bad corpus, except the cross-field rules its $comment lists.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod common;

use common::{breakwater, root, shipped_configurations};
use serde_json::Value;

fn schema() -> Value {
    let run = breakwater(&["schema"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    serde_json::from_str(&run.stdout).unwrap()
}

fn corpus(kind: &str, name: &str) -> Value {
    let text = std::fs::read_to_string(root().join(format!("plugin/cli/tests/{kind}/{name}.json"))).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn errors(validator: &jsonschema::Validator, v: &Value) -> Vec<String> {
    validator.iter_errors(v).map(|e| format!("{}: {e}", e.instance_path)).collect()
}

#[test]
fn the_schema_is_a_valid_draft_2020_12_schema() {
    let s = schema();
    assert_eq!(s["$schema"], "https://json-schema.org/draft/2020-12/schema");
    jsonschema::draft202012::meta::validate(&s).unwrap_or_else(|e| panic!("not a valid schema: {e}"));
}

#[test]
fn every_shipped_example_validates() {
    let validator = jsonschema::draft202012::new(&schema()).unwrap();
    let mut examples = shipped_configurations();
    examples.push(("plugin/cli/tests/good/every-field.json".to_string(), corpus("good", "every-field")));
    for (name, config) in examples {
        assert_eq!(errors(&validator, &config), Vec::<String>::new(), "{name}");
    }
}

/// The bad corpus: every file is refused by the plugin's parser (tests/validate.rs checks where);
/// the schema refuses all but the ones whose rule it cannot express.
#[test]
fn the_schema_refuses_the_bad_corpus_except_the_rules_its_comment_lists() {
    let s = schema();
    let validator = jsonschema::draft202012::new(&s).unwrap();
    let comment = s["$comment"].as_str().unwrap();
    for name in [
        "unknown-key",
        "percent-over-100",
        "zero-count",
        "bad-duration",
        "zero-duration",
        "bad-policy-name",
        "retry-on-unknown",
        "yaml11-on-key",
        "header-uppercase",
        "not-an-object",
        "host-wildcard-inside",
        "max-retries-over-10",
        "mode-unknown",
        "force-unknown",
        "fallback-empty",
        "fallback-without-refusal",
        "fallback-static-204-body",
        "adaptive-and-max-concurrent",
        "timeout-without-max",
        "shed-at-zero",
    ] {
        assert!(!errors(&validator, &corpus("bad", name)).is_empty(), "the schema must refuse {name}");
    }
    // Cross-field and range rules: the schema accepts these, and its $comment names each rule.
    for (name, rule) in [
        ("missing-policy", "routes[].policy must name a key of policies"),
        ("window-mismatch", "slow_call.window must equal circuit_breaker.failure_rate.window"),
        ("window-too-short", "windows 100ms to 1h"),
        ("max-open-below-open", "max_open_for must be at least open_for"),
        ("reserved-over-max", "reserved permits together at most max_concurrent"),
        (
            "status-codes-without-condition",
            "retriable_status_codes needs retry.retry_on to list retriable-status-codes",
        ),
        ("sync-interval-too-long", "sync_interval 10ms to 10s"),
        ("whole-number-with-fraction", "JSON Schema's integer accepts 5.0, the plugin does not"),
        ("control-with-policies", "control excludes policies, routes, policy and sync_interval"),
        ("fallback-when-unmade", "fallback.when lists only refusals the policy makes"),
        ("fallback-cache-too-large", "max_entries x (max_body + 10 KiB of key and headers) at most 256 MiB"),
        ("timeout-max-below-min", "timeout.adaptive.max must be at least its min"),
    ] {
        assert_eq!(
            errors(&validator, &corpus("bad", name)),
            Vec::<String>::new(),
            "{name} is a rule the schema cannot express"
        );
        assert!(comment.contains(rule), "the $comment must list the rule {name} breaks: {rule}");
    }
}

#[test]
fn durations_match_the_plugins_parser() {
    let validator = jsonschema::draft202012::new(&schema()).unwrap();
    let with = |d: &str| serde_json::json!({ "policies": { "a": { "circuit_breaker": { "open_for": d } } } });
    for d in ["250ms", "10s", "1.5s", "5m", "1h", "0.001s", "10.250s"] {
        assert!(validator.is_valid(&with(d)), "{d} is a duration");
        assert!(breakwater::config::parse(with(d).to_string().as_bytes()).is_ok(), "the plugin reads {d}");
    }
    for d in ["0s", "0.000ms", "00m", "1.s", ".5s", "1.0001s", "10", "10 s", "1d", "-1s", "+1s", ""] {
        assert!(!validator.is_valid(&with(d)), "{d} is no duration");
        assert!(breakwater::config::parse(with(d).to_string().as_bytes()).is_err(), "the plugin refuses {d}");
    }
}

#[test]
fn an_adaptive_timeouts_margin_may_be_zero_in_the_schema_as_in_the_plugin() {
    let validator = jsonschema::draft202012::new(&schema()).unwrap();
    let with = |d: &str| serde_json::json!({ "policies": { "a": { "timeout": { "adaptive": { "margin": d, "max": "2s" } } } } });
    for d in ["0ms", "0s", "0.000ms", "50ms"] {
        assert!(validator.is_valid(&with(d)), "{d} is a margin");
        assert!(breakwater::config::parse(with(d).to_string().as_bytes()).is_ok(), "the plugin reads {d}");
    }
    for d in ["-1ms", "1.s", "10", "soon"] {
        assert!(!validator.is_valid(&with(d)), "{d} is no margin");
        assert!(breakwater::config::parse(with(d).to_string().as_bytes()).is_err(), "the plugin refuses {d}");
    }
}

#[test]
fn a_reader_that_closes_the_pipe_early_ends_the_command_quietly() {
    // As `breakwater schema | head -c 10`: the reader is gone before the schema is written.
    use std::process::{Command, Stdio};
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Command::new(env!("CARGO_BIN_EXE_breakwater"))
        .arg("schema")
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(out.status.code().is_none_or(|c| c != 101), "not a panic's exit code: {:?}", out.status);
}
