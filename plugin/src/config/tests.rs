use super::*;
use alloc::string::ToString;

fn parse_str(s: &str) -> Result<Config> {
    parse(s.as_bytes())
}

fn error_of(s: &str) -> String {
    parse_str(s).unwrap_err().to_string()
}

const ISSUE_EXAMPLE: &str = r#"{
  "policies": {
    "checkout": {
      "mode": "enforce",
      "circuit_breaker": {
        "consecutive_failures": 5,
        "failure_rate": { "threshold": 50, "minimum_requests": 20, "window": "10s" },
        "slow_call": { "duration": "500ms", "threshold": 80 },
        "open_for": "30s",
        "max_open_for": "5m",
        "half_open": { "max_probes": 1, "successes_to_close": 1 },
        "failure_on": { "status": ["5xx"], "grpc_status": ["UNAVAILABLE"], "reset": true, "connect_failure": true, "timeout": true }
      },
      "reject": { "status": 503, "body": "...", "headers": { "x-example": "1" } }
    },
    "reads": { "mode": "dry_run", "circuit_breaker": {} }
  },
  "routes": [
    { "match": { "route_name": "checkout" }, "policy": "checkout" },
    { "match": { "path_prefix": "/api/", "methods": ["GET"], "host": "*.example.com", "headers": { "x-tenant": "gold" }, "cluster": "backend" }, "policy": "reads" }
  ]
}"#;

#[test]
fn the_documented_example_parses_to_what_it_says() {
    let c = parse_str(ISSUE_EXAMPLE).unwrap();
    let checkout = &c.policies[0];
    assert_eq!(checkout.name, "checkout");
    assert_eq!(checkout.mode, Mode::Enforce);
    let b = checkout.breaker.as_ref().unwrap();
    assert_eq!(b.machine.consecutive_failures, 5);
    assert_eq!(b.machine.failure_rate, Some(RateRule { threshold: 50, minimum_requests: 20 }));
    assert_eq!(b.machine.slow_call, Some(SlowRule { duration_ns: 500 * MS, threshold: 80, minimum_requests: 20 }));
    assert_eq!(b.machine.window_ns, 10 * SECOND);
    assert_eq!(b.machine.open_for_ns, 30 * SECOND);
    assert_eq!(b.machine.max_open_for_ns, 300 * SECOND);
    assert_eq!(b.failure_on.grpc_status, alloc::vec![14]);
    assert_eq!(b.slow_ns, Some(500 * MS));
    assert_eq!(checkout.reject.headers, alloc::vec![("x-example".to_string(), "1".to_string())]);
    let reads = &c.policies[1];
    assert_eq!(reads.mode, Mode::DryRun);
    // An empty breaker gets the defaults: 5 consecutive failures, 30 s open.
    assert_eq!(reads.breaker.as_ref().unwrap().machine.consecutive_failures, 5);
    assert_eq!(c.routes.rules().len(), 2);
    assert_eq!(c.routes.rules()[1].policy, 1);
}

#[test]
fn an_empty_object_or_an_empty_configuration_is_valid_with_nothing_to_do() {
    for empty in ["{}", "", "  \n\t "] {
        let c = parse_str(empty).unwrap();
        assert!(c.policies.is_empty() && c.routes.is_empty() && c.only.is_none(), "{empty:?}");
    }
}

#[test]
fn reserved_0_is_the_documented_default_and_is_accepted() {
    let c = parse_str(
        r#"{"policies": {"p": {"bulkhead": {"max_concurrent": 2, "priority": {"header": "x-p", "default": "s", "classes": {"c": {"reserved": 0}}}}}}}"#,
    );
    assert!(c.is_ok(), "{c:?}");
}

#[test]
fn a_per_route_instance_names_its_one_policy() {
    let c = parse_str(r#"{"policies": {"checkout": {"circuit_breaker": {}}}, "policy": "checkout"}"#).unwrap();
    assert_eq!(c.only, Some(0));
    assert!(c.routes.is_empty());
}

#[test]
fn errors_are_safe_to_log_one_short_line_whatever_the_input() {
    // A key holding a newline cannot forge a log line; a 1 MB value cannot flood the log.
    let forged = "{\"policies\": {\"p\": {\"mode\": \"x\\n[critical][main] forged line\"}}}";
    let e = error_of(forged);
    assert!(!e.contains('\n'), "{e}");
    let huge = alloc::format!(r#"{{"policies": {{"p": {{"mode": "{}"}}}}}}"#, "a".repeat(1 << 20));
    let e = error_of(&huge);
    assert!(e.len() < 200, "{} bytes", e.len());
    assert!(e.ends_with("… (1048576 bytes)"), "{e}");
    let key = alloc::format!("{{\"{}\": 1}}", "k\\r\\n".repeat(100_000));
    assert!(error_of(&key).len() < 300);
    let body = alloc::format!(r#"{{"policies": {{"p": {{"reject": {{"body": "{}"}}}}}}}}"#, "b".repeat(1 << 20));
    assert!(error_of(&body).contains("must be at most 4096 bytes"));
}

#[test]
fn default_failure_classification_is_5xx_grpc_unavailable_deadline_internal_and_transport_errors() {
    let f = FailureOn::default();
    assert_eq!(f.status, alloc::vec![(500, 599)]);
    assert_eq!(f.grpc_status, alloc::vec![4, 13, 14]);
    assert!(f.reset && f.connect_failure && f.timeout);
}

#[test]
fn durations() {
    assert_eq!(parse_duration("250ms"), Some(250 * MS));
    assert_eq!(parse_duration("10s"), Some(10 * SECOND));
    assert_eq!(parse_duration("1.5s"), Some(1500 * MS));
    assert_eq!(parse_duration("5m"), Some(300 * SECOND));
    assert_eq!(parse_duration("1h"), Some(3600 * SECOND));
    for bad in ["", "10", "s", "0s", "-1s", "1.s", ".5s", "1.2345s", "10 s", "10sec", "1e3ms", "0.000s"] {
        assert_eq!(parse_duration(bad), None, "{bad:?}");
    }
    assert_eq!(parse_duration("99999999999999999999h"), Some(u64::MAX), "saturates, for the bounds to refuse");
}

#[test]
fn bad_configs_are_refused_with_the_json_path_and_what_was_expected() {
    let cases: &[(&str, &str)] = &[
        ("not json", "configuration is not valid JSON"),
        ("[]", "expected the configuration to be a JSON object, got a list"),
        (r#"{"polices": {}}"#, "polices: unknown key: did you mean policies? (expected one of: policies, routes, policy, sync_interval, control)"),
        (r#"{"sync_interval": "20s"}"#, "sync_interval: must be from 10ms to 10s, got \"20s\""),
        (r#"{"sync_interval": "1ms"}"#, "sync_interval: must be from 10ms to 10s, got \"1ms\""),
        (r#"{"policies": {"p": {"circuit_breaker": {"consecutive_failure": 5}}}}"#,
         "policies.p.circuit_breaker.consecutive_failure: unknown key"),
        (r#"{"policies": {"p": {"circuit_breaker": {"consecutive_failures": 0}}}}"#,
         "policies.p.circuit_breaker.consecutive_failures: expected a whole number from 1 to 1000000, got 0"),
        (r#"{"policies": {"p": {"circuit_breaker": {"consecutive_failures": -3}}}}"#,
         "policies.p.circuit_breaker.consecutive_failures: expected a whole number from 1 to 1000000, got -3"),
        (r#"{"policies": {"p": {"circuit_breaker": {"failure_rate": {"threshold": 150}}}}}"#,
         "policies.p.circuit_breaker.failure_rate.threshold: expected a percent: a whole number from 1 to 100, got 150"),
        (r#"{"policies": {"p": {"circuit_breaker": {"failure_rate": {"threshold": "fifty"}}}}}"#,
         "policies.p.circuit_breaker.failure_rate.threshold: expected a percent: a whole number from 1 to 100, got \"fifty\""),
        (r#"{"policies": {"p": {"circuit_breaker": {"failure_rate": {}}}}}"#,
         "policies.p.circuit_breaker.failure_rate.threshold: is required"),
        (r#"{"policies": {"p": {"circuit_breaker": {"open_for": "30 seconds"}}}}"#,
         "policies.p.circuit_breaker.open_for: expected a duration greater than zero such as \"250ms\", \"10s\" or \"5m\", got \"30 seconds\""),
        (r#"{"policies": {"p": {"circuit_breaker": {"open_for": "1m", "max_open_for": "30s"}}}}"#,
         "policies.p.circuit_breaker.max_open_for: must be at least open_for"),
        (r#"{"policies": {"p": {"circuit_breaker": {"failure_rate": {"threshold": 50, "window": "10s"}, "slow_call": {"duration": "1s", "threshold": 50, "window": "20s"}}}}}"#,
         "policies.p.circuit_breaker.slow_call.window: must equal policies.p.circuit_breaker.failure_rate.window"),
        (r#"{"policies": {"p": {"mode": "observe"}}}"#, "policies.p.mode: expected \"enforce\" or \"dry_run\", got \"observe\""),
        (r#"{"policies": {"p": {"reject": {"status": 99}}}}"#, "policies.p.reject.status: expected an HTTP error status from 400 to 599"),
        (r#"{"policies": {"p": {"reject": {"headers": {"X-Bad": "1"}}}}}"#, "policies.p.reject.headers.X-Bad: expected a lower-case HTTP header name"),
        (r#"{"policies": {"p": {"reject": {"headers": {"x-a": "1\r\nx-b: 2"}}}}}"#, "policies.p.reject.headers.x-a: expected a string of at most 1024 bytes without control characters"),
        (r#"{"policies": {"p": {"circuit_breaker": {"failure_on": {"status": ["6xx"]}}}}}"#,
         "policies.p.circuit_breaker.failure_on.status[0]: expected a status code (100-599) or class such as \"5xx\", got \"6xx\""),
        (r#"{"policies": {"p": {"circuit_breaker": {"failure_on": {"grpc_status": ["UNAVAILABLE", "SLOW"]}}}}}"#,
         "policies.p.circuit_breaker.failure_on.grpc_status[1]: expected a gRPC status name"),
        (r#"{"policies": {"p": {"bulkhead": {}}}}"#, "policies.p.bulkhead.max_concurrent: is required"),
        (r#"{"policies": {"p": {"bulkhead": {"max_concurrent": 0}}}}"#,
         "policies.p.bulkhead.max_concurrent: expected a whole number from 1 to 1000000, got 0"),
        (r#"{"policies": {"p": {"bulkhead": {"max_concurrent": 5, "queue": {"timeout": "1s"}}}}}"#,
         "policies.p.bulkhead.queue.max_size: is required"),
        (r#"{"policies": {"p": {"bulkhead": {"max_concurrent": 5, "queue": {"max_size": 20000}}}}}"#,
         "policies.p.bulkhead.queue.max_size: expected a whole number from 1 to 10000, got 20000"),
        (r#"{"policies": {"p": {"bulkhead": {"max_concurrent": 5, "queue": {"max_size": 5, "timeout": "0s"}}}}}"#,
         "policies.p.bulkhead.queue.timeout: expected a duration greater than zero"),
        (r#"{"policies": {"p": {"bulkhead": {"max_concurrent": 5, "priority": {"header": "x-p", "classes": {}}}}}}"#,
         "policies.p.bulkhead.priority.default: is required"),
        (r#"{"policies": {"p": {"bulkhead": {"max_concurrent": 5, "priority": {"header": "x-p", "default": "s", "classes": {"c": {"reserved": 3}, "d": {"reserved": 3}}}}}}}"#,
         "policies.p.bulkhead.priority.classes: reserved capacity (6) exceeds max_concurrent (5)"),
        (r#"{"policies": {"p": {"bulkhead": {"max_concurrent": 5, "priority": {"header": "x-p", "default": "s", "classes": {"b": {"max": 9}}}}}}}"#,
         "policies.p.bulkhead.priority.classes.b.max: expected a whole number from 1 to 5, got 9"),
        (r#"{"policies": {"p": {"bulkhead": {"max_concurrent": 5, "priority": {"header": "x-p", "default": "s", "classes": {"b": {"limit": 1}}}}}}}"#,
         "policies.p.bulkhead.priority.classes.b.limit: unknown key (expected one of: reserved, max, shed_at)"),
        (r#"{"policies": {"p": {"retry": {"retry_on": ["5xx", "sometimes"]}}}}"#,
         "policies.p.retry.retry_on[1]: expected an Envoy retry condition (5xx, gateway-error"),
        (r#"{"policies": {"p": {"retry": {"retry_on": ["5xx"], "retriable_status_codes": [409]}}}}"#,
         "policies.p.retry.retriable_status_codes: has no effect unless retry_on lists retriable-status-codes"),
        (r#"{"policies": {"p": {"retry": {"retry_on": ["retriable-status-codes"], "retriable_status_codes": [99]}}}}"#,
         "policies.p.retry.retriable_status_codes[0]: expected a status code from 100 to 599, got 99"),
        (r#"{"policies": {"p": {"retry": {"max_retries": 11}}}}"#, "policies.p.retry.max_retries: expected a whole number from 0 to 10, got 11"),
        (r#"{"policies": {"p": {"retry": {"per_try_timeout": "0.5ms"}}}}"#, "policies.p.retry.per_try_timeout: must be from 1ms to 1h"),
        (r#"{"policies": {"p": {"retry": {"budget": {"ratio": 1.5}}}}}"#, "policies.p.retry.budget.ratio: expected a ratio from 0 to 1 such as 0.2, got 1.5"),
        (r#"{"policies": {"p": {"retry": {"budget": {"ratio": "20%"}}}}}"#, "policies.p.retry.budget.ratio: expected a ratio from 0 to 1 such as 0.2, got \"20%\""),
        (r#"{"policies": {"p": {"retry": {"budget": {"ttl": "2m"}}}}}"#, "policies.p.retry.budget.ttl: must be from 1s to 60s, got \"2m\""),
        (r#"{"policies": {"p": {"retry": {"budget": {"min_per_second": -1}}}}}"#, "policies.p.retry.budget.min_per_second: expected a whole number from 0 to 1000000, got -1"),
        (r#"{"policies": {"p": {"retry": {"budget": {"minimum": 1}}}}}"#, "policies.p.retry.budget.minimum: unknown key (expected one of: ratio, min_per_second, ttl)"),
        (r#"{"policies": {"p": {"retry": {"on": ["5xx"]}}}}"#, "policies.p.retry.on: unknown key: Breakwater's key is retry_on"),
        (r#"{"policies": {"p": {"retry": {"true": ["5xx"]}}}}"#, "policies.p.retry.true: unknown key: a YAML 1.1 reader (kubectl, Helm) turned a bare on/off/yes/no/y/n into true"),
        (r#"{"policies": {"a.b": {}}}"#, "policies[\"a.b\"]: a policy name must be 1-64 characters"),
        (r#"{"policies": {}, "routes": [{"match": {}, "policy": "ghost"}]}"#, "routes[0].policy: no policy named \"ghost\" in policies"),
        (r#"{"policies": {"p": {}}, "routes": [{"policy": "p"}]}"#, "routes[0].match: is required"),
        (r#"{"policies": {"p": {}}, "routes": [{"match": {"path_prefix": "api"}, "policy": "p"}]}"#,
         "routes[0].match.path_prefix: expected a path starting with \"/\", got \"api\""),
        (r#"{"policies": {"p": {}}, "routes": [{"match": {"methods": ["get"]}, "policy": "p"}]}"#,
         "routes[0].match.methods[0]: expected an upper-case HTTP method such as GET, got \"get\""),
        (r#"{"policies": {"p": {}}, "routes": [{"match": {"host": "api.*.com"}, "policy": "p"}]}"#,
         "routes[0].match.host: a wildcard is only allowed as the first label"),
        (r#"{"policies": {"p": {}}, "routes": [{"match": {"route_name": ""}, "policy": "p"}]}"#,
         "routes[0].match.route_name: expected a non-empty string, got \"\""),
        // Found by fuzzing and by trying the README (issue 9).
        (r#"{"policies": {"p": {}, "p": {"mode": "dry_run"}}}"#,
         "policies.p: duplicate key: JSON readers keep only the last one, so it is refused"),
        (r#"{"policies": {"p": {"bulkhead": {"max_concurrent": 1, "max_concurrent": 2}}}}"#,
         "policies.p.bulkhead.max_concurrent: duplicate key"),
        (r#"{"policies": {"p": {}}, "routes": [{"match": {"host": "api.example.com:443"}, "policy": "p"}]}"#,
         "routes[0].match.host: expected a host without a port"),
        (r#"{"policies": {"p": {"circuit_breaker": {"failure_rate": {"threshold": 50, "window": "99ms"}}}}}"#,
         "policies.p.circuit_breaker.failure_rate.window: must be from 100ms to 1h, got \"99ms\""),
        (r#"{"policies": {"p": {"bulkhead": {"max_concurent": 5}}}}"#,
         "policies.p.bulkhead.max_concurent: unknown key: did you mean max_concurrent?"),
        (r#"{"policies": {"p": {"circuit_breaker": {"failure_rate": {"threshold": 50.5}}}}}"#,
         "policies.p.circuit_breaker.failure_rate.threshold: expected a percent: a whole number from 1 to 100, got 50.5"),
        (r#"{"policies": {"p": {"bulkhead": {"max_concurrent": 4, "priority": {"header": "x-p", "default": "standard", "classes": {"critical": {"reserved": 4}}}}}}}"#,
         "policies.p.bulkhead.priority.classes: leaves the default class \"standard\" no capacity: the other classes reserve all 4 permits"),
        (r#"{"policies": {"p": {"reject": {"status": 200}}}}"#,
         "policies.p.reject.status: expected an HTTP error status from 400 to 599"),
        (r#"{"policies": {"p": {"circuit_breaker": {"open_for": "3000000000h"}}}}"#,
         "policies.p.circuit_breaker.open_for: must be from 1ms to 24h"),
        (r#"{"policies": {"p": {"circuit_breaker": {"open_for": "99999999999999999999h"}}}}"#,
         "policies.p.circuit_breaker.open_for: must be from 1ms to 24h"),
        (r#"{"policies": {"p": {"reject": {"headers": {"x-breakwater": "mine"}}}}}"#,
         "policies.p.reject.headers.x-breakwater: is set by Breakwater itself"),
        (r#"{"policies": {"p": {"reject": {"headers": {"content-length": "0"}}}}}"#,
         "policies.p.reject.headers.content-length: is set by Envoy: it describes the connection or the body's length, and a wrong one lies about the body"),
        (r#"{"policies": {"p": {"reject": {"headers": {"transfer-encoding": "chunked"}}}}}"#,
         "policies.p.reject.headers.transfer-encoding: is set by Envoy: it describes the connection or the body's length, and a wrong one lies about the body"),
        (r#"{"policies": {"p": {"reject": {"headers": {"connection": "close"}}}}}"#,
         "policies.p.reject.headers.connection: is set by Envoy: it describes the connection or the body's length, and a wrong one lies about the body"),
        (r#"{"policies": {"true": {}}}"#, "policies.true: a YAML 1.1 reader (kubectl, Helm) makes this name from a bare on/off/yes/no"),
        (r#"{"policies": {"p": {}}, "policy": "q"}"#, "policy: no policy named \"q\" in policies"),
        (r#"{"policies": {"p": {}}, "policy": "p", "routes": []}"#, "policy: a filter instance with `policy` applies it to every request it sees: remove `routes`"),
        (r#"{"policies": {"p": {}, "q": {}}, "policy": "p"}"#, "policies.q: a filter instance with `policy` carries only that policy (\"p\")"),
        ("{\"policies\": {\"bad\\nkey\": {}}}", "policies[\"bad\\nkey\"]: a policy name"),
        (r#"{"policies": {"p": {"bulkhead": {"max_concurrent": 2, "priority": {"header": "x-p", "default": true, "classes": {}}}}}}"#,
         "policies.p.bulkhead.priority.default: expected a class name, got true (YAML 1.1 reads a bare on, off, yes or no as a boolean: quote it)"),
        (r#"{"policies": {"p": {"bulkhead": {"max_concurrent": 2, "priority": {"header": "x-p", "default": "s", "classes": {"true": {}}}}}}}"#,
         "policies.p.bulkhead.priority.classes.true: a YAML 1.1 reader (kubectl, Helm) makes this name from a bare on/off/yes/no"),
    ];
    for (config, message) in cases {
        let got = error_of(config);
        assert!(got.starts_with(message), "config {config}\n  expected: {message}\n  got:      {got}");
    }
}

#[test]
fn a_bulkhead_with_priorities_compiles_its_classes_and_the_default_joins_them() {
    let c = parse_str(
        r#"{"policies": {"p": {"bulkhead": {"max_concurrent": 100, "queue": {"max_size": 50, "timeout": "2s"},
            "priority": {"header": "X-Priority", "default": "standard",
                         "classes": {"critical": {"reserved": 20}, "background": {"max": 10}}}}}}}"#,
    )
    .unwrap();
    let b = c.policies[0].bulkhead.as_ref().unwrap();
    assert_eq!((b.machine.max_concurrent, b.machine.queue_max, b.machine.queue_timeout_ns), (100, 50, 2 * SECOND));
    let p = b.priority.as_ref().unwrap();
    assert_eq!(p.header, "x-priority");
    assert_eq!(p.class_of(Some(b"critical")), p.classes.iter().position(|c| c == "critical").unwrap() as u8);
    assert_eq!(p.classes[p.class_of(None) as usize], "standard");
    assert_eq!(p.class_of(Some(b"CRITICAL")), p.default, "class names are exact");
    assert_eq!(b.machine.classes.iter().map(|l| l.reserved).sum::<u32>(), 20);
}

#[test]
fn a_retry_policy_splits_http_and_grpc_conditions_and_defaults_its_budget() {
    let c = parse_str(
        r#"{"policies": {"p": {"retry": {"retry_on": ["5xx", "reset", "connect-failure", "retriable-status-codes", "unavailable", "cancelled"],
            "retriable_status_codes": [409, 429], "max_retries": 3, "per_try_timeout": "500ms", "budget": {}}}}}"#,
    )
    .unwrap();
    let r = c.policies[0].retry.as_ref().unwrap();
    let headers: Vec<(&str, &str)> = r.router_headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
    assert_eq!(
        headers,
        [
            ("x-envoy-retry-on", "5xx,reset,connect-failure,retriable-status-codes"),
            ("x-envoy-retry-grpc-on", "unavailable,cancelled"),
            ("x-envoy-retriable-status-codes", "409,429"),
            ("x-envoy-upstream-rq-per-try-timeout-ms", "500"),
        ]
    );
    assert_eq!(r.max_retries, 3);
    let b = r.budget.unwrap();
    assert_eq!((b.ratio_milli, b.min_per_second, b.ttl_ns), (200, 10, 10 * SECOND));
    let plain = parse_str(r#"{"policies": {"p": {"retry": {}}}}"#).unwrap();
    let r = plain.policies[0].retry.as_ref().unwrap();
    assert_eq!(
        (r.drives_router(), r.max_retries, r.budget),
        (false, 1, None),
        "Envoy's default of one retry, unbudgeted"
    );
}

#[test]
fn only_failure_rate_means_no_consecutive_trip() {
    let c = parse_str(r#"{"policies": {"p": {"circuit_breaker": {"failure_rate": {"threshold": 50}}}}}"#).unwrap();
    assert_eq!(c.policies[0].breaker.as_ref().unwrap().machine.consecutive_failures, 0);
}

fn many(n: usize) -> String {
    let policies: Vec<String> = (0..n)
        .map(|i| {
            alloc::format!(
                r#""p{i}": {{"circuit_breaker": {{"consecutive_failures": 5}}, "bulkhead": {{"max_concurrent": 10}}}}"#
            )
        })
        .collect();
    let routes: Vec<String> =
        (0..n).map(|i| alloc::format!(r#"{{"match": {{"route_name": "r{i}"}}, "policy": "p{i}"}}"#)).collect();
    alloc::format!(r#"{{"policies": {{{}}}, "routes": [{}]}}"#, policies.join(","), routes.join(","))
}

#[test]
fn twenty_thousand_policies_and_rules_compile_in_linear_time() {
    // Parse and compile (keys made, every policy's stats defined) 5 000 and 20 000 of each: four times the
    // input must take about four times as long (a quadratic step would take sixteen).
    let time = |n: usize| {
        let text = many(n);
        let host = crate::fake::FakeHost::new();
        let start = std::time::Instant::now();
        let c = parse_str(&text).unwrap();
        assert_eq!((c.policies.len(), c.routes.rules().len()), (n, n));
        let compiled = crate::Compiled::new(c, "test");
        compiled.create_shared_state(&host);
        for p in &compiled.policies {
            p.metrics(&host);
        }
        start.elapsed()
    };
    time(1000); // warm up the allocator
    let (small, large) = (time(5_000), time(20_000));
    std::println!("5 000 policies and rules: {small:?}; 20 000: {large:?}");
    assert!(large < small * 10, "20 000 took {large:?}, 5 000 took {small:?}: not linear");
}

#[test]
fn a_control_instance_is_nothing_else() {
    let c = parse(br#"{ "control": { "path_prefix": "/ops/breakwater", "writes": true } }"#).unwrap();
    assert_eq!(c.control, Some(Control { path_prefix: "/ops/breakwater".into(), writes: true }));
    assert!(c.policies.is_empty() && c.routes.is_empty());
    assert_eq!(
        parse(br#"{ "control": {} }"#).unwrap().control,
        Some(Control { path_prefix: "/breakwater".into(), writes: false })
    );
    for (text, want) in [
        (r#"{ "control": {}, "routes": [] }"#, "control: the control endpoint is a filter instance of its own, on an operator-only listener: move `routes` to the data-plane filter"),
        (r#"{ "sync_interval": "1s", "control": {} }"#, "control: the control endpoint is a filter instance of its own, on an operator-only listener: move `sync_interval` to the data-plane filter"),
        (r#"{ "control": { "path_prefix": "/x/" } }"#, "control.path_prefix: expected a path such as \"/breakwater\" (a leading '/', no trailing '/', no query), got \"/x/\""),
        (r#"{ "control": { "path_prefix": "/x?y" } }"#, "control.path_prefix: expected a path such as \"/breakwater\" (a leading '/', no trailing '/', no query), got \"/x?y\""),
        (r#"{ "control": { "writes": "yes" } }"#, "control.writes: expected true or false, got \"yes\""),
        (r#"{ "control": { "write": true } }"#, "control.write: unknown key: did you mean writes? (expected one of: path_prefix, writes)"),
        (r#"{ "policies": { "p": { "circuit_breaker": { "force": "half_open" } } } }"#, "policies.p.circuit_breaker.force: expected \"open\" or \"closed\", got \"half_open\""),
    ] {
        assert_eq!(parse(text.as_bytes()).unwrap_err().to_string(), want, "{text}");
    }
}

#[test]
fn an_unknown_key_of_a_megabyte_is_refused_in_well_under_a_second() {
    // Found by the config fuzzer: "did you mean" measured the edit distance from every known key
    // to the whole key, O(key length × known key length) each: 2.5 s for 1 MiB (a debug build).
    let config = alloc::format!(r#"{{"policies": {{"p": {{"{}": 1}}}}}}"#, "y".repeat(1 << 20));
    let started = std::time::Instant::now();
    let e = error_of(&config);
    assert!(started.elapsed() < std::time::Duration::from_millis(500), "{:?}", started.elapsed());
    assert!(e.contains("unknown key (expected one of:"), "{e}");
}

#[test]
fn a_duplicate_key_deep_in_nested_objects_is_reported_in_one_short_line() {
    // Found by the config fuzzer: the duplicate's path named every level above it, so 120
    // levels of keys made a 7.9 KB log line, 77 KB with keys of escaped characters. Nesting is
    // now refused below 16 levels, and 15 still made 1 KB, 2.3 KB escaped.
    for key in ["k".repeat(64), "\u{10ffff}".repeat(64)] {
        let config =
            alloc::format!("{}{{\"a\": 1, \"a\": 2}}{}", alloc::format!("{{\"{key}\": ").repeat(15), "}".repeat(15));
        let e = error_of(&config);
        assert!(e.len() <= 512, "{} bytes: {e}", e.len());
        assert!(e.contains("…: duplicate key"), "{e}");
    }
}

#[test]
fn a_large_configuration_defines_a_policys_stats_on_first_use() {
    let host = crate::fake::FakeHost::new();
    let small = crate::Compiled::new(parse_str(&many(crate::EAGER_METRICS)).unwrap(), "small");
    small.create_shared_state(&host);
    assert!(host.has_metric("circuit_state.policy.p999.state.closed"), "up to EAGER_METRICS: at once");
    let large = crate::Compiled::new(parse_str(&many(crate::EAGER_METRICS + 1)).unwrap(), "large");
    let host = crate::fake::FakeHost::new();
    large.create_shared_state(&host);
    assert!(!host.has_metric("circuit_state.policy.p1000.state.closed"), "beyond: not yet");
    large.policies.iter().find(|p| p.name() == "p1000").unwrap().metrics(&host);
    assert!(host.has_metric("circuit_state.policy.p1000.state.closed"), "on first use");
    assert_eq!(host.metric("circuit_state.policy.p1000.state.closed"), 1);
}

#[test]
fn a_value_of_escaped_characters_is_shown_in_a_few_hundred_bytes() {
    // Found by the config fuzzer: 64 characters shown, each escaped as up to 10 (\u{10ffff}).
    let config = alloc::format!(r#"{{"policies": {{"p": {{"mode": "{}"}}}}}}"#, "\u{10ffff}".repeat(64));
    let e = error_of(&config);
    assert!(e.len() <= 256, "{} bytes: {e}", e.len());
    assert!(e.ends_with("… (256 bytes)"), "{e}");
}

#[test]
fn a_large_configuration_nested_deep_is_refused_in_well_under_a_second() {
    // Found by profiling the config fuzzer's slowest input: serde_json works out the position
    // of an error again at every level it unwinds through, each a scan of the input so far, so
    // an 8 MB configuration with a mistake 120 levels down took 2 s to refuse (a test build).
    let config = alloc::format!(
        r#"{{"policies": {{}}, "pad": "{}", "deep": {}{{"a": 1, "a": 2}}{}}}"#,
        "x".repeat(8 << 20),
        "[".repeat(120),
        "]".repeat(120)
    );
    let refuse = || {
        let started = std::time::Instant::now();
        let e = parse(config.as_bytes()).unwrap_err();
        assert!(e.message.contains("nested deeper than 16 levels"), "{e}");
        started.elapsed()
    };
    // The machine is shared: a slow run is timed twice more, and the best time counts.
    let second = std::time::Duration::from_secs(1);
    let fastest = (0..2).fold(refuse(), |best, _| if best < second { best } else { best.min(refuse()) });
    assert!(fastest < second, "{fastest:?}");
}
