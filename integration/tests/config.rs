//! Bad plugin configurations are refused by Envoy itself (`--mode validate` and a real start),
//! with one log line naming the JSON path and what was expected.

use integration::envoy::{Envoy, Spec};
use serde_json::{json, Value};

const ANY_BACKEND: &str = "127.0.0.1:9";

fn spec(plugin: Value) -> Spec {
    Spec::new(ANY_BACKEND.parse().unwrap()).plugin(plugin).route("p", "/p", "backend")
}

/// A valid configuration with `breaker` as policy p's circuit_breaker.
fn with_breaker(breaker: Value) -> Value {
    json!({
        "policies": { "p": { "circuit_breaker": breaker } },
        "routes": [{ "match": { "route_name": "p" }, "policy": "p" }]
    })
}

/// Validates `spec`, expects a refusal, and returns the one `invalid configuration:` line.
fn refused(spec: &Spec) -> String {
    let (ok, output) = Envoy::validate(&spec.yaml());
    assert!(!ok, "Envoy accepted a bad configuration:\n{output}");
    let lines: Vec<&str> = output.lines().filter(|l| l.contains("invalid configuration:")).collect();
    assert_eq!(lines.len(), 1, "expected exactly one `invalid configuration:` line in:\n{output}");
    lines[0].to_owned()
}

/// The line names `path` and says `expectation` about it.
fn assert_names(line: &str, path: &str, expectation: &str) {
    let want = format!("invalid configuration: {path}: {expectation}");
    assert!(line.contains(&want), "expected `{want}` in:\n{line}");
}

#[test]
fn good_config_validates() {
    let spec = spec(with_breaker(json!({
        "consecutive_failures": 5,
        "failure_rate": { "threshold": 50, "minimum_requests": 10, "window": "10s" },
        "slow_call": { "duration": "200ms", "threshold": 50 },
        "open_for": "1s",
        "max_open_for": "10s",
        "half_open": { "max_probes": 2, "successes_to_close": 2, "probe_timeout": "5s" },
        "failure_on": { "status": ["5xx", 429], "grpc_status": ["UNAVAILABLE"], "connect_failure": false }
    })));
    let (ok, output) = Envoy::validate(&spec.yaml());
    assert!(ok, "a good configuration should validate:\n{output}");
    assert!(!output.contains("invalid configuration"), "{output}");
}

#[test]
fn unknown_key_is_refused() {
    let line = refused(&spec(with_breaker(json!({ "consecutive_failure": 5 }))));
    assert_names(&line, "policies.p.circuit_breaker.consecutive_failure", "unknown key");
    assert!(line.contains("consecutive_failures"), "the message lists the known keys: {line}");
}

#[test]
fn wrong_type_is_refused() {
    let line = refused(&spec(with_breaker(json!({ "failure_rate": { "threshold": "fifty" } }))));
    assert_names(
        &line,
        "policies.p.circuit_breaker.failure_rate.threshold",
        r#"expected a percent: a whole number from 1 to 100, got "fifty""#,
    );
}

#[test]
fn zero_consecutive_failures_is_refused() {
    let line = refused(&spec(with_breaker(json!({ "consecutive_failures": 0 }))));
    assert_names(
        &line,
        "policies.p.circuit_breaker.consecutive_failures",
        "expected a whole number from 1 to 1000000, got 0",
    );
}

#[test]
fn percent_over_100_is_refused() {
    let line = refused(&spec(with_breaker(json!({ "failure_rate": { "threshold": 150 } }))));
    assert_names(
        &line,
        "policies.p.circuit_breaker.failure_rate.threshold",
        "expected a percent: a whole number from 1 to 100, got 150",
    );
}

#[test]
fn route_naming_a_missing_policy_is_refused() {
    let mut config = with_breaker(json!({ "consecutive_failures": 5 }));
    config["routes"][0]["policy"] = json!("nope");
    let line = refused(&spec(config));
    assert_names(&line, "routes[0].policy", r#"no policy named "nope" in policies"#);
}

#[test]
fn malformed_duration_is_refused() {
    let line = refused(&spec(with_breaker(json!({ "open_for": "30 seconds" }))));
    assert_names(
        &line,
        "policies.p.circuit_breaker.open_for",
        r#"expected a duration greater than zero such as "250ms", "10s" or "5m", got "30 seconds""#,
    );
}

#[test]
fn not_json_is_refused() {
    let spec = Spec::new(ANY_BACKEND.parse().unwrap()).plugin_raw("policies: { p: [").route("p", "/p", "backend");
    let line = refused(&spec);
    assert!(line.contains("invalid configuration: configuration is not valid JSON"), "{line}");
}

#[tokio::test(flavor = "multi_thread")]
async fn envoy_refuses_to_start_with_a_bad_config() {
    let spec = spec(with_breaker(json!({ "consecutive_failures": 0 })));
    let err = match Envoy::try_start(&spec).await {
        Ok(_) => panic!("Envoy started with a bad plugin configuration"),
        Err(e) => e,
    };
    let status = err.status.expect("Envoy should have exited by itself");
    assert!(!status.success(), "exit status {status:?}");
    assert!(
        err.log.contains("invalid configuration: policies.p.circuit_breaker.consecutive_failures: expected a whole number from 1 to 1000000, got 0"),
        "{err}"
    );
}

#[test]
fn a_duplicate_key_is_refused_by_envoy_with_its_path() {
    let raw = r#"{"policies": {"p": {"circuit_breaker": {"consecutive_failures": 3}}, "p": {}}, "routes": [{"match": {"route_name": "p"}, "policy": "p"}]}"#;
    let spec = Spec::new(ANY_BACKEND.parse().unwrap()).plugin_raw(raw).route("p", "/p", "backend");
    let line = refused(&spec);
    assert_names(&line, "policies.p", "duplicate key");
}
