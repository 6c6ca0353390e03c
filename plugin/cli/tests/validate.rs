//! `breakwater validate`, run as a user runs it, on the shipped files and on broken ones.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod common;

use common::{breakwater, breakwater_in, root, validate_json};
use serde_json::{json, Value};

/// The first configuration's error: (plugin JSON path, line, column).
fn first_error(report: &Value) -> (String, u64, u64) {
    let e = &report["files"][0]["configs"][0]["error"];
    (e["path"].as_str().unwrap_or("").to_string(), e["line"].as_u64().unwrap_or(0), e["column"].as_u64().unwrap_or(0))
}

fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> String {
    let p = dir.path().join(name);
    std::fs::write(&p, text).unwrap();
    p.to_str().unwrap().to_string()
}

#[test]
fn the_shipped_envoy_and_istio_files_are_valid() {
    let run = breakwater(&[
        "validate",
        "envoy/envoy.yaml",
        "envoy/istio/gateway.yaml",
        "envoy/istio/client-sidecars.yaml",
        "envoy/istio/server-sidecar.yaml",
        "envoy/istio/telemetry-stats-tags.yaml",
    ]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert!(lines.contains(&"envoy/envoy.yaml: ok: Wasm filter \"breakwater\" at static_resources.listeners[0].filter_chains[0].filters[0].typed_config.http_filters[0].typed_config (per-route instance of policy checkout)"), "{}", run.stdout);
    assert!(lines.contains(&"envoy/envoy.yaml: ok: Wasm filter \"breakwater\" at static_resources.listeners[0].filter_chains[0].filters[0].typed_config.http_filters[3].typed_config (1 policy, 1 route)"), "{}", run.stdout);
    for ok in [
        "envoy/istio/gateway.yaml: ok: WasmPlugin istio-system/breakwater-gateway (spec.pluginConfig) (2 policies, 2 routes)",
        "envoy/istio/client-sidecars.yaml: ok: WasmPlugin shop/breakwater-callers (spec.pluginConfig) (2 policies, 2 routes)",
        "envoy/istio/server-sidecar.yaml: ok: WasmPlugin shop/breakwater-checkout (spec.pluginConfig) (2 policies, 2 routes)",
    ] {
        assert!(lines.contains(&ok), "{}", run.stdout);
    }
    assert!(!run.stdout.contains("warning"), "the shipped files read the same in YAML 1.1 and 1.2: {}", run.stdout);

    let (report, code) = validate_json(&["envoy/envoy.yaml", "envoy/istio/server-sidecar.yaml"]);
    assert_eq!(code, 0);
    assert_eq!(report["valid"], true);
    assert_eq!(report["configurations"], 6, "5 filters in envoy.yaml (the control endpoint's too), 1 WasmPlugin");
    assert_eq!(report["files"][0]["configs"][4]["control_writes"], true);
    assert_eq!(report["files"][0]["configs"][0]["kind"], "envoy-wasm-filter");
    assert_eq!(report["files"][0]["configs"][0]["policy"], "checkout");
    assert_eq!(report["files"][1]["configs"][0]["kind"], "istio-wasmplugin");
}

#[test]
fn an_error_in_envoy_yaml_points_at_the_line_inside_the_json_block() {
    let text = std::fs::read_to_string(root().join("envoy/envoy.yaml")).unwrap();
    let bad = text.replacen("\"consecutive_failures\": 3", "\"consecutive_failures\": 0", 1);
    assert_ne!(bad, text);
    let line = bad.lines().position(|l| l.contains("\"consecutive_failures\": 0")).unwrap() as u64 + 1;
    let column = bad.lines().nth(line as usize - 1).unwrap().find("\"consecutive_failures\"").unwrap() as u64 + 1;
    let dir = tempfile::tempdir().unwrap();
    let file = write(&dir, "envoy.yaml", &bad);
    let run = breakwater(&["validate", &file]);
    assert_eq!(run.code, 1);
    let error = run.stdout.lines().find(|l| l.contains("error:")).unwrap();
    assert_eq!(
        error,
        format!("{file}:{line}:{column}: error: policies.catalog.circuit_breaker.consecutive_failures: expected a whole number from 1 to 1000000, got 0")
    );
    assert!(run.stdout.contains("in Wasm filter \"breakwater\" at static_resources.listeners[0]"), "{}", run.stdout);
}

#[test]
fn istio_yaml_is_read_as_kubectl_reads_it() {
    let text = std::fs::read_to_string(root().join("plugin/cli/tests/fixtures/wasmplugin.yaml")).unwrap();
    let dir = tempfile::tempdir().unwrap();

    // A bare `on` key reaches the plugin as "true", which it refuses; the warning says why.
    let text = text.replacen("          retriable_status_codes: [409]\n", "", 1);
    let bad = text.replacen("retry_on: [5xx", "on: [5xx", 1);
    let file = write(&dir, "on.yaml", &bad);
    let on_line = bad.lines().position(|l| l.contains("on: [5xx")).unwrap() as u64 + 1;
    let (report, code) = validate_json(&[&file]);
    assert_eq!(code, 1);
    let (path, line, column) = first_error(&report);
    assert_eq!((path.as_str(), line, column), ("policies.checkout.retry.true", on_line, 11));
    let message = report["files"][0]["configs"][0]["error"]["message"].as_str().unwrap();
    assert!(message.contains("YAML 1.1"), "{message}");
    let warning = &report["files"][0]["warnings"][0];
    assert_eq!(warning["line"], on_line);
    assert!(warning["message"].as_str().unwrap().contains("the key `on` is read as the key \"true\""), "{warning}");

    // `yes` is a boolean to kubectl: valid, with a warning that YAML 1.2 tools read a string.
    let yes = text.replacen("open_for: 30s\n", "open_for: 30s\n          failure_on: { reset: yes }\n", 1);
    let file = write(&dir, "yes.yaml", &yes);
    let run = breakwater(&["validate", &file]);
    assert_eq!(run.code, 0, "{}", run.stdout);
    assert!(
        run.stdout.contains(
            "warning: policies.checkout.circuit_breaker.failure_on.reset: the value `yes` is read as true by YAML 1.1"
        ),
        "{}",
        run.stdout
    );

    // Quoted, "on" stays a string key in YAML 1.1 too: refused with the right name.
    let quoted = text.replacen("retry_on: [5xx", "\"on\": [5xx", 1);
    let file = write(&dir, "quoted.yaml", &quoted);
    let (report, code) = validate_json(&[&file]);
    assert_eq!(code, 1);
    let e = &report["files"][0]["configs"][0]["error"];
    assert_eq!(e["path"], "policies.checkout.retry.on");
    assert!(e["message"].as_str().unwrap().starts_with("unknown key: Breakwater's key is retry_on"), "{e}");
    assert!(report["files"][0]["warnings"].as_array().unwrap().is_empty());
}

#[test]
fn every_bad_configuration_is_refused_at_its_path() {
    for (file, path, line, column) in [
        ("unknown-key", "policies.a.circuit_breaker.consecutive_failure", 1, 45),
        ("percent-over-100", "policies.a.circuit_breaker.failure_rate.threshold", 1, 63),
        ("zero-count", "policies.a.bulkhead.max_concurrent", 1, 38),
        ("bad-duration", "policies.a.circuit_breaker.open_for", 1, 45),
        ("zero-duration", "policies.a.circuit_breaker.open_for", 1, 45),
        ("bad-policy-name", "policies[\"check out\"]", 1, 17),
        ("retry-on-unknown", "policies.a.retry.retry_on[1]", 1, 55),
        ("yaml11-on-key", "policies.a.retry.true", 1, 35),
        ("header-uppercase", "policies.a.reject.headers.X-Foo", 1, 49),
        ("not-an-object", "", 1, 1),
        ("host-wildcard-inside", "routes[0].match.host", 1, 53),
        ("max-retries-over-10", "policies.a.retry.max_retries", 1, 35),
        ("mode-unknown", "policies.a.mode", 1, 24),
        ("missing-policy", "routes[0].policy", 1, 55),
        ("window-mismatch", "policies.a.circuit_breaker.slow_call.window", 1, 149),
        ("window-too-short", "policies.a.circuit_breaker.failure_rate.window", 1, 80),
        ("max-open-below-open", "policies.a.circuit_breaker.max_open_for", 1, 63),
        ("reserved-over-max", "policies.a.bulkhead.priority.classes", 1, 109),
        ("status-codes-without-condition", "policies.a.retry.retriable_status_codes", 1, 56),
        ("sync-interval-too-long", "sync_interval", 1, 3),
        ("whole-number-with-fraction", "policies.a.circuit_breaker.consecutive_failures", 1, 45),
        ("control-with-policies", "control", 1, 3),
        ("force-unknown", "policies.a.circuit_breaker.force", 1, 45),
        ("fallback-empty", "policies.a.fallback", 1, 44),
        ("fallback-when-unmade", "policies.a.fallback.when[0]", 1, 66),
        ("fallback-cache-too-large", "policies.a.fallback.cache", 1, 57),
        ("fallback-without-refusal", "policies.a.fallback", 1, 50),
        ("fallback-static-204-body", "policies.a.fallback.static.body", 1, 83),
        ("adaptive-and-max-concurrent", "policies.a.bulkhead.adaptive", 1, 60),
        ("timeout-without-max", "policies.a.timeout.adaptive.max", 1, 37),
        ("shed-at-zero", "policies.a.bulkhead.priority.classes.bulk.shed_at", 1, 132),
        ("timeout-max-below-min", "policies.a.timeout.adaptive.max", 1, 64),
    ] {
        let f = format!("plugin/cli/tests/bad/{file}.json");
        let (report, code) = validate_json(&[&f]);
        assert_eq!(code, 1, "{f} must be refused: {report}");
        assert_eq!(first_error(&report), (path.to_string(), line, column), "{f}: {report}");
    }
    let corpus = std::fs::read_dir(root().join("plugin/cli/tests/bad")).unwrap().count();
    assert_eq!(corpus, 32, "every file of the bad corpus is listed here");
}

#[test]
fn envoy_lds_ecds_and_json_bootstraps_are_searched_for_breakwater_filters() {
    let dir = tempfile::tempdir().unwrap();
    let wasm = |name: &str, config: &str| {
        format!(
            r#"{{ "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm", "config": {{ "name": "{name}", "root_id": "{name}",
               "vm_config": {{ "runtime": "envoy.wasm.runtime.v8", "code": {{ "local": {{ "filename": "/{name}.wasm" }} }} }},
               "configuration": {{ "@type": "type.googleapis.com/google.protobuf.StringValue", "value": {config} }} }} }}"#
        )
    };
    // ECDS: a TypedExtensionConfig resource, in YAML.
    let ecds = format!(
        "resources:\n- \"@type\": type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig\n  name: breakwater\n  typed_config: {}\n",
        wasm("breakwater", r#""{\"policies\": {\"a\": {\"bulkhead\": {\"max_concurrent\": 0}}}}""#)
    );
    let ecds = write(&dir, "ecds.yaml", &ecds);
    let (report, code) = validate_json(&[&ecds]);
    assert_eq!(code, 1);
    assert_eq!(report["files"][0]["configs"][0]["at"], "resources[0].typed_config");
    assert_eq!(first_error(&report).0, "policies.a.bulkhead.max_concurrent");

    // LDS, as JSON: two Wasm filters, one of them someone else's.
    let lds = json!({ "resources": [ { "@type": "type.googleapis.com/envoy.config.listener.v3.Listener", "name": "l",
        "filter_chains": [ { "filters": [ { "name": "envoy.filters.network.http_connection_manager", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "http_filters": [
                { "name": "other", "typed_config": serde_json::from_str::<Value>(&wasm("ratelimit", "\"not json\"")).unwrap() },
                { "name": "bw", "typed_config": serde_json::from_str::<Value>(&wasm("breakwater", r#""{\"policies\": {\"a\": {}}}""#)).unwrap() }
            ] } } ] } ] } ] });
    let lds = write(&dir, "lds.json", &serde_json::to_string_pretty(&lds).unwrap());
    let run = breakwater(&["validate", &lds]);
    assert_eq!(run.code, 0, "{}", run.stdout);
    assert!(run.stdout.contains("ok: Wasm filter \"breakwater\" at resources[0].filter_chains[0].filters[0].typed_config.http_filters[1].typed_config (1 policy, 0 routes)"), "{}", run.stdout);
    assert!(run.stdout.contains("skipped Wasm filter \"ratelimit\""), "{}", run.stdout);
    // --any-wasm checks the other filter too, and its configuration is no Breakwater one.
    let run = breakwater(&["validate", "--any-wasm", &lds]);
    assert_eq!(run.code, 1, "{}", run.stdout);
    assert!(run.stdout.contains("error: configuration is not valid JSON"), "{}", run.stdout);

    // An Envoy file without Breakwater is an error; so is a configuration that is not a StringValue.
    let none = write(&dir, "plain.yaml", "static_resources:\n  listeners: []\n");
    assert_eq!(breakwater(&["validate", &none]).code, 1);
    let bytes = write(
        &dir,
        "bytes.yaml",
        &wasm("breakwater", "\"{}\"").replace("google.protobuf.StringValue", "google.protobuf.BytesValue"),
    );
    let run = breakwater(&["validate", &bytes]);
    assert_eq!(run.code, 1);
    assert!(
        run.stdout
            .contains("Breakwater reads its configuration from a type.googleapis.com/google.protobuf.StringValue"),
        "{}",
        run.stdout
    );
}

#[test]
fn files_that_are_not_configurations_fail_and_the_exit_code_covers_all_files() {
    let dir = tempfile::tempdir().unwrap();
    let broken = write(&dir, "broken.yaml", "policies:\n  a: [\n");
    let run = breakwater(&["validate", &broken]);
    assert_eq!(run.code, 1);
    assert!(run.stdout.starts_with(&format!("{broken}:3:1: error: not valid YAML or JSON")), "{}", run.stdout);
    let run = breakwater(&["validate", "no/such/file.yaml"]);
    assert_eq!(run.code, 1);
    assert!(run.stdout.contains("no/such/file.yaml: error: cannot read"), "{}", run.stdout);
    let dup = write(&dir, "dup.yaml", "policies:\n  a: {}\n  a: {}\n");
    let run = breakwater(&["validate", &dup]);
    assert_eq!(run.code, 1);
    assert!(
        run.stdout
            .starts_with(&format!("{dup}:3:3: error: not valid YAML or JSON: policies.a: the key \"a\" appears twice")),
        "{}",
        run.stdout
    );
    // One bad file among good ones fails the run; the good ones are still reported.
    let run = breakwater(&["validate", "envoy/envoy.yaml", "plugin/cli/tests/bad/zero-count.json"]);
    assert_eq!(run.code, 1);
    assert!(run.stdout.contains("envoy/envoy.yaml: ok"), "{}", run.stdout);
    // Nothing to check at all is a failure too.
    let run = breakwater(&["validate", "envoy/istio/telemetry-stats-tags.yaml"]);
    assert_eq!(run.code, 1);
    assert!(
        run.stdout.contains("error: no Breakwater configuration in envoy/istio/telemetry-stats-tags.yaml"),
        "{}",
        run.stdout
    );
}

#[test]
fn plugin_configurations_in_yaml_json_and_on_stdin() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = write(&dir, "p.yaml", "policies:\n  a:\n    circuit_breaker: { open_for: 0755 }\n");
    let (report, code) = validate_json(&[&yaml]);
    assert_eq!(code, 1);
    assert_eq!(first_error(&report), ("policies.a.circuit_breaker.open_for".to_string(), 3, 24));
    assert!(
        report["files"][0]["configs"][0]["error"]["message"].as_str().unwrap().ends_with("got 493"),
        "YAML 1.1 octal: {report}"
    );
    let run =
        breakwater_in(&root(), &["validate", "-"], Some("{\"policies\": {\"a\": {\"retry\": {\"max_retries\": 2}}}}"));
    assert_eq!(run.code, 0, "{}", run.stdout);
    assert_eq!(run.stdout, "-: ok: plugin configuration (1 policy, 0 routes)\n");
    // An empty configuration is no policy at all, as in the plugin: valid, with a warning.
    let run = breakwater_in(&root(), &["validate", "-"], Some("{}"));
    assert_eq!(run.code, 0);
    assert!(run.stdout.contains("warning: no policies: Breakwater passes every request untouched"), "{}", run.stdout);
    let (report, code) = validate_json(&["plugin/cli/tests/good/every-field.json"]);
    assert_eq!((code, report["files"][0]["configs"][0]["policies"].clone()), (0, json!(2)));
}

#[test]
fn every_command_has_help() {
    for args in [&["--help"][..], &["validate", "--help"], &["schema", "--help"], &["help", "validate"]] {
        let run = breakwater(args);
        assert_eq!(run.code, 0, "{args:?}: {}", run.stderr);
        assert!(run.stdout.contains("Usage: breakwater"), "{args:?}: {}", run.stdout);
    }
    let run = breakwater(&["validate", "--help"]);
    assert!(run.stdout.contains("--output <OUTPUT>") && run.stdout.contains("YAML 1.1"), "{}", run.stdout);
    let run = breakwater(&["validate"]);
    assert_eq!(run.code, 2, "a file is required");
}
