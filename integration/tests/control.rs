//! The status and control endpoint in Envoy 1.40: a Breakwater filter instance with `control`, on
//! a loopback listener of its own, sharing the data plane's VM (2 workers).

use hyper::Method;
use integration::envoy::{Attach, Envoy, Spec, CLOSED, FORCED_CLOSED, FORCED_OPEN, OPEN};
use integration::start_upstream;
use serde_json::{json, Value};

fn policies() -> Value {
    json!({
        "checkout": { "circuit_breaker": { "consecutive_failures": 3, "open_for": "10s" } },
        "search": { "bulkhead": { "max_concurrent": 4, "queue": { "max_size": 2 } },
                    "retry": { "max_retries": 1, "budget": { "ratio": 0.2, "min_per_second": 5 } } },
        "held": { "circuit_breaker": { "force": "open" } }
    })
}

fn spec(up: std::net::SocketAddr, control: Value) -> Spec {
    Spec::one_route_per_policy(up, policies()).attach(Attach::PerRoute).control(control)
}

#[tokio::test(flavor = "multi_thread")]
async fn status_shows_each_policy_from_shared_state() {
    let up = start_upstream().await;
    let envoy = Envoy::start(&spec(up.addr(), json!({ "control": {} }))).await;
    for _ in 0..3 {
        assert_eq!(envoy.get("/checkout?status=500").await.status, 500);
    }
    envoy.wait_tripped("checkout", 1).await;
    let (code, body) = envoy.control(Method::GET, "/breakwater/status").await;
    assert_eq!(code, 200, "{body}");
    let p = &body["policies"];
    let cb = &p["checkout"]["circuit_breaker"];
    assert_eq!(cb["state"], "open", "{body}");
    let remaining = cb["open_remaining_ms"].as_u64().unwrap();
    assert!(remaining > 5_000 && remaining <= 10_000, "open for 10s, just tripped: {remaining}");
    assert_eq!(p["search"]["bulkhead"]["limit"], 4);
    assert_eq!(p["search"]["bulkhead"]["queued"], 0);
    assert!(p["search"]["retry_budget"]["remaining"].as_u64().unwrap() >= 5, "{body}");
    assert_eq!(p["held"]["circuit_breaker"]["state"], "forced_open");
    assert_eq!(p["held"]["circuit_breaker"]["forced_by"], "configuration");
    let (code, one) = envoy.control(Method::GET, "/breakwater/status/search").await;
    assert_eq!((code, one["policies"].as_object().map(|o| o.len())), (200, Some(1)), "{one}");
}

#[tokio::test(flavor = "multi_thread")]
async fn force_open_reaches_every_worker_survives_a_reload_and_release_undoes_it() {
    let up = start_upstream().await;
    let spec = spec(up.addr(), json!({ "control": { "writes": true } })).reloadable();
    let envoy = Envoy::start(&spec).await;
    let conns = envoy.conn_per_worker(2).await;
    for c in &conns {
        assert_eq!(c.get("/checkout").await.status, 200);
    }
    let (code, body) = envoy.control(Method::POST, "/breakwater/policies/checkout/force_open").await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        (body["changed"][0]["before"].as_str(), body["changed"][0]["after"].as_str()),
        (Some("closed"), Some("forced_open"))
    );
    for c in &conns {
        let r = c.get("/checkout").await;
        assert!(r.is_circuit_open(), "every worker refuses at once: {r:?}");
    }
    let s = envoy.wait_policy("checkout", |s| s.state == FORCED_OPEN).await;
    assert_eq!(s.state, FORCED_OPEN, "the state gauge says forced_open: {s:?}");
    let line = envoy.wait_log_line("control: force_open on policy checkout by 127.0.0.1:").await;
    assert!(line.is_some(), "the write is logged with who asked");

    // A new configuration for the data plane (a control plane's push): still forced.
    envoy.reload(&spec).await;
    assert!(envoy.get("/checkout").await.is_circuit_open(), "forced open after the reload");
    let (_, body) = envoy.control(Method::GET, "/breakwater/status/checkout").await;
    assert_eq!(body["policies"]["checkout"]["circuit_breaker"]["forced_by"], "operator", "{body}");

    let (code, body) = envoy.control(Method::POST, "/breakwater/policies/checkout/release").await;
    assert_eq!(code, 200, "{body}");
    for c in envoy.conn_per_worker(2).await {
        let r = c.get("/checkout").await;
        assert_eq!((r.status, r.from_upstream()), (200, true), "released: {r:?}");
    }
    let s = envoy.wait_policy("checkout", |s| s.state == CLOSED).await;
    assert_eq!(s.state, CLOSED);
}

#[tokio::test(flavor = "multi_thread")]
async fn force_closed_holds_through_failures_and_reset_clears_a_trip() {
    let up = start_upstream().await;
    let envoy = Envoy::start(&spec(up.addr(), json!({ "control": { "writes": true } }))).await;
    assert_eq!(envoy.control(Method::POST, "/breakwater/policies/checkout/force_closed").await.0, 200);
    for _ in 0..6 {
        let r = envoy.get("/checkout?status=500").await;
        assert_eq!((r.status, r.from_upstream()), (500, true), "forced closed: every call goes through");
    }
    let s = envoy.wait_policy("checkout", |s| s.state == FORCED_CLOSED).await;
    assert_eq!((s.state, s.to_open), (FORCED_CLOSED, 0));

    assert_eq!(envoy.control(Method::POST, "/breakwater/policies/checkout/release").await.0, 200);
    for _ in 0..3 {
        envoy.get("/checkout?status=500").await;
    }
    envoy.wait_tripped("checkout", 1).await;
    assert!(envoy.get("/checkout").await.is_circuit_open());
    let (code, body) = envoy.control(Method::POST, "/breakwater/policies/checkout/reset").await;
    assert_eq!((code, body["changed"][0]["before"].as_str()), (200, Some("open")), "{body}");
    let r = envoy.get("/checkout").await;
    assert_eq!((r.status, r.from_upstream()), (200, true), "reset: closed again, {r:?}");
    let s = envoy.wait_policy("checkout", |s| s.state == CLOSED).await;
    assert_eq!(s.state, CLOSED);
    assert_ne!(s.state, OPEN);
}

#[tokio::test(flavor = "multi_thread")]
async fn writes_need_their_switch_and_the_data_plane_never_answers_control_paths() {
    let up = start_upstream().await;
    // The control path also exists as a data-plane route, to show that it is passed through.
    let spec = spec(up.addr(), json!({ "control": {} })).route("other", "/breakwater", "backend");
    let envoy = Envoy::start(&spec).await;
    let (code, body) = envoy.control(Method::POST, "/breakwater/policies/checkout/force_open").await;
    assert_eq!(code, 403, "{body}");
    assert!(envoy.get("/checkout").await.from_upstream(), "nothing changed");

    for path in ["/breakwater/status", "/breakwater/policies/checkout/force_open"] {
        let r = envoy.request(Method::POST, path, &[]).await;
        assert_eq!((r.status, r.from_upstream()), (200, true), "{path} on the data plane: {r:?}");
        let r = envoy.get(path).await;
        assert_eq!((r.status, r.from_upstream()), (200, true), "{path} on the data plane: {r:?}");
    }
    assert_eq!(up.stats().by_path.get("/breakwater/status"), Some(&2), "the upstream got them");
    assert!(envoy.get("/checkout").await.from_upstream(), "still closed");

    // The control listener's other paths reach its router: 404 from Envoy.
    let addr = envoy.listener_named("control").await;
    let (code, _) = integration::envoy::control_request(addr, Method::GET, "/checkout").await;
    assert_eq!(code, 404);
    let (code, body) = envoy.control(Method::GET, "/breakwater/nothing").await;
    assert_eq!(code, 404);
    assert!(body["error"].as_str().unwrap().contains("GET /breakwater/status"), "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_control_configuration_with_policies_is_refused_whole() {
    let up = start_upstream().await;
    let bad = spec(up.addr(), json!({ "control": {}, "policies": {} }));
    let err = Envoy::try_start(&bad).await.err().expect("Envoy refuses it");
    assert!(
        err.log.contains("control: the control endpoint is a filter instance of its own"),
        "one line naming the path:\n{}",
        err.log
    );
}

/// The README's control walk-through (the ```sh block that talks to localhost:9902), run as
/// written against the demo's Envoy (its ports swapped for the ones picked here), prints the
/// ```text block after it; `…` there stands for anything.
#[tokio::test(flavor = "multi_thread")]
async fn the_readme_control_walkthrough_prints_what_the_readme_shows() {
    let up = start_upstream().await;
    let envoy = Envoy::start_demo(up.addr()).await;
    let control = envoy.listener_named("breakwater-control").await;
    let readme = std::fs::read_to_string(integration::envoy::repo_root().join("README.md")).unwrap();
    let blocks: Vec<(&str, &str)> =
        readme.split("```").skip(1).step_by(2).map(|b| b.split_once('\n').unwrap()).collect();
    let i = blocks.iter().position(|(lang, body)| *lang == "sh" && body.contains("localhost:9902")).expect("the block");
    let (_, script) = blocks[i];
    let (lang, expected) = blocks[i + 1];
    assert_eq!(lang, "text", "the block is followed by what it prints");
    let script = script
        .replace("localhost:9902", &control.to_string())
        .replace("localhost:10000", &envoy.listener().to_string());
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("target/debug")).unwrap();
    std::os::unix::fs::symlink(integration::cli_bin(), dir.path().join("target/debug/breakwater")).unwrap();
    let out = std::process::Command::new("bash")
        .args(["-euo", "pipefail", "-c", &script])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success(), "{script}\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        glob_match(expected.trim_end(), stdout.trim_end()),
        "README shows:\n{expected}\nthe commands printed:\n{stdout}"
    );
    let last = stdout.trim_end().lines().last().unwrap();
    let json: Value = serde_json::from_str(last).unwrap();
    assert_eq!(json["policies"]["checkout"]["circuit_breaker"]["state"], "closed");
}

/// `pattern` with `…` standing for any text (none included).
fn glob_match(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('…').collect();
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if parts.len() == 1 {
        return pattern == text;
    }
    if !text.starts_with(first) || !text.ends_with(last) || text.len() < first.len() + last.len() {
        return false;
    }
    let mut rest = &text[first.len()..text.len() - last.len()];
    for part in &parts[1..parts.len() - 1] {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    true
}

#[test]
fn glob_match_reads_the_ellipsis_as_anything() {
    assert!(glob_match("a…c", "abbbc"));
    assert!(glob_match("a…c", "ac"));
    assert!(!glob_match("a…c", "ab"));
    assert!(!glob_match("ab", "abc"));
    assert!(glob_match("{\"t\":…,\"p\":…}", "{\"t\":1,\"p\":{}}"));
}
