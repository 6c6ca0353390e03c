//! Envoy 1.40's own stats for a Wasm VM that fails, as the alerts and README use them: a real
//! Envoy runs a throw-away module that traps on every request, under FAIL_RELOAD and FAIL_CLOSED,
//! with and without README's `wasm_plugin` tag extractor; a real Prometheus (Debian's, on
//! loopback) scrapes both Envoys with the shipped alert rules, and the VM alert fires for each.
//!
//! Envoy: `$ENVOY_BIN`, else the project's `.venv/bin/envoy` (`make venv`), else `envoy` on PATH.
//! Prometheus: `prometheus` on PATH (Debian's prometheus package, which `make ops` installs).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod common;

use common::root;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A proxy-wasm module (ABI 0.2.1) whose request-headers callback traps.
const TRAP: &str = r#"(module
  (memory (export "memory") 2)
  (global $heap (mut i32) (i32.const 1024))
  (func (export "_initialize"))
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param $n i32) (result i32)
    (local $p i32)
    (local.set $p (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (i32.and (i32.add (local.get $n) (i32.const 15)) (i32.const -16))))
    (local.get $p))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_configure") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32) unreachable)
  (func (export "proxy_on_log") (param i32))
  (func (export "proxy_on_done") (param i32) (result i32) (i32.const 1))
  (func (export "proxy_on_delete") (param i32)))"#;

fn envoy_bin() -> String {
    std::env::var("ENVOY_BIN").unwrap_or_else(|_| {
        let venv = root().join(".venv/bin/envoy");
        if venv.exists() {
            venv.to_str().unwrap().to_string()
        } else {
            "envoy".to_string()
        }
    })
}

/// README's stats_config snippet (the wasm_plugin tag extractor).
fn readme_extractor() -> String {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let start = readme.find("\n## Operate\n").unwrap();
    readme[start..]
        .split("```yaml\n")
        .skip(1)
        .map(|b| b.split("```").next().unwrap())
        .find(|b| b.contains("tag_name: wasm_plugin"))
        .unwrap()
        .to_string()
}

fn listener(name: &str, plugin: &str, policy: &str, wasm: &Path) -> String {
    format!(
        r#"
  - name: {name}
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: 0 }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: {name}
          route_config:
            virtual_hosts:
            - {{ name: all, domains: ["*"], routes: [ {{ match: {{ prefix: / }}, direct_response: {{ status: 200 }} }} ] }}
          http_filters:
          - name: {plugin}
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
              config:
                name: {plugin}
                root_id: {plugin}
                failure_policy: {policy}
                vm_config:
                  vm_id: {name}
                  runtime: envoy.wasm.runtime.v8
                  code: {{ local: {{ filename: {} }} }}
          - name: envoy.filters.http.router
            typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}"#,
        wasm.display()
    )
}

struct Envoy {
    child: Child,
    admin: String,
    listeners: BTreeMap<String, String>,
    _dir: tempfile::TempDir,
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn http_get(addr: &str, path: &str) -> (u16, String) {
    http(addr, path, "1.1")
}

/// HTTP/1.0 where the server would otherwise chunk its answer (Prometheus's API).
fn http(addr: &str, path: &str, version: &str) -> (u16, String) {
    try_http(addr, path, version).unwrap_or_else(|e| panic!("{addr}{path}: {e}"))
}

fn try_http(addr: &str, path: &str, version: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/{version}\r\nHost: test\r\nConnection: close\r\n\r\n")?;
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let status = out.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    Ok((status, out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default()))
}

impl Envoy {
    fn start(extractor: Option<&str>, listeners: &[(&str, &str, &str)]) -> Envoy {
        let dir = tempfile::tempdir().unwrap();
        let wasm = dir.path().join("trap.wasm");
        std::fs::write(&wasm, wat::parse_str(TRAP).unwrap()).unwrap();
        let ls: String = listeners.iter().map(|(n, p, f)| listener(n, p, f, &wasm)).collect();
        let config = format!(
            "admin:\n  address: {{ socket_address: {{ address: 127.0.0.1, port_value: 0 }} }}\n{}static_resources:\n  listeners:{ls}\n",
            extractor.unwrap_or("")
        );
        std::fs::write(dir.path().join("envoy.yaml"), config).unwrap();
        let admin_path = dir.path().join("admin.txt");
        let child = Command::new(envoy_bin())
            .args([
                "-c",
                "envoy.yaml",
                "--concurrency",
                "2",
                "-l",
                "critical",
                "--base-id-path",
                "base-id",
                "--use-dynamic-base-id",
                // Hot restart's shared memory would outlive the test in /dev/shm.
                "--disable-hot-restart",
            ])
            .arg("--admin-address-path")
            .arg(&admin_path)
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {} (set ENVOY_BIN, or `make venv`): {e}", envoy_bin()));
        let mut envoy = Envoy { child, admin: String::new(), listeners: BTreeMap::new(), _dir: dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        while envoy.listeners.len() < listeners.len() {
            assert!(Instant::now() < deadline, "Envoy did not start");
            assert!(envoy.child.try_wait().unwrap().is_none(), "Envoy exited");
            std::thread::sleep(Duration::from_millis(100));
            envoy.admin = std::fs::read_to_string(&admin_path).unwrap_or_default().trim().to_string();
            if envoy.admin.is_empty() {
                continue;
            }
            envoy.listeners = http_get(&envoy.admin, "/listeners")
                .1
                .lines()
                .filter_map(|l| l.split_once("::").map(|(n, a)| (n.to_string(), a.to_string())))
                .filter(|(_, a)| !a.ends_with(":0"))
                .collect();
        }
        envoy
    }

    fn get(&self, listener: &str) -> u16 {
        http_get(&self.listeners[listener], "/").0
    }

    /// `/stats/prometheus` samples whose name starts `envoy_wasm_`: "name{labels}" → value.
    fn wasm_stats(&self) -> BTreeMap<String, f64> {
        http_get(&self.admin, "/stats/prometheus")
            .1
            .lines()
            .filter(|l| l.starts_with("envoy_wasm_"))
            .filter_map(|l| l.rsplit_once(' ').map(|(k, v)| (k.to_string(), v.parse().unwrap())))
            .collect()
    }
}

struct Prometheus {
    child: Child,
    addr: String,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    /// Scrapes the Envoys' admin every second and evaluates the shipped alert rules every second.
    fn start(targets: &[&str]) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(
            root().join("envoy/prometheus/breakwater-alerts.yaml"),
            dir.path().join("breakwater-alerts.yaml"),
        )
        .unwrap();
        let targets: Vec<String> = targets.iter().map(|t| format!("{t:?}")).collect();
        let config = format!(
            "global: {{ scrape_interval: 1s, evaluation_interval: 1s }}\nrule_files: [breakwater-alerts.yaml]\n\
             scrape_configs:\n  - job_name: envoy\n    metrics_path: /stats/prometheus\n    static_configs:\n      - targets: [{}]\n",
            targets.join(", ")
        );
        std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
        // A free loopback port, picked now (Prometheus does not report a port 0 back).
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let addr = format!("127.0.0.1:{port}");
        let child = Command::new("prometheus")
            .arg("--config.file=prometheus.yml")
            .arg("--storage.tsdb.path=data")
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=error")
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus (Debian's prometheus package; make ops installs it)");
        Prometheus { child, addr, _dir: dir }
    }

    fn api(&self, path: &str) -> serde_json::Value {
        match try_http(&self.addr, path, "1.0") {
            Ok((200, body)) => serde_json::from_str(&body).unwrap_or(serde_json::Value::Null),
            // Not listening yet, or not ready.
            _ => serde_json::Value::Null,
        }
    }

    /// Waits, at most 30 s, until `check` holds for the API's answer at `path`.
    fn wait_for(&mut self, path: &str, what: &str, check: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            assert!(self.child.try_wait().unwrap().is_none(), "Prometheus exited");
            let v = self.api(path);
            if check(&v) {
                return v;
            }
            assert!(Instant::now() < deadline, "{what}: {v}");
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

/// Requests until the stat is positive (a reload waits out Envoy's backoff), at most 20.
fn until_positive(envoy: &Envoy, listener: &str, stat: &str) -> BTreeMap<String, f64> {
    for _ in 0..20 {
        assert_eq!(envoy.get(listener), 503, "a trapped VM answers 503");
        let stats = envoy.wasm_stats();
        if stats.get(stat).copied().unwrap_or(0.0) > 0.0 {
            return stats;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    panic!("{stat} stayed 0: {:?}", envoy.wasm_stats());
}

#[test]
fn a_trapped_vm_shows_in_envoys_wasm_stats_only_under_fail_reload_and_the_alert_fires() {
    let extractor = readme_extractor();
    let tagged = Envoy::start(
        Some(&extractor),
        &[("reload", "shop.breakwater", "FAIL_RELOAD"), ("closed", "breakwater", "FAIL_CLOSED")],
    );
    // Without the extractor the plugin's name is part of the metric's name.
    let plain = Envoy::start(None, &[("reload", "breakwater", "FAIL_RELOAD")]);
    // Prometheus must have seen the counters at 0 before the traps, for increase() to see them move.
    let mut prometheus = Prometheus::start(&[&tagged.admin, &plain.admin]);
    prometheus.wait_for("/api/v1/targets", "both Envoys scraped", |v| {
        let t = v["data"]["activeTargets"].as_array().cloned().unwrap_or_default();
        t.len() == 2 && t.iter().all(|t| t["health"] == "up")
    });

    let stats = until_positive(&tagged, "reload", "envoy_wasm_vm_reload_success{wasm_plugin=\"shop.breakwater\"}");
    for _ in 0..3 {
        assert_eq!(tagged.get("closed"), 503, "FAIL_CLOSED answers 503 once the VM trapped");
    }
    let stats_after = tagged.wasm_stats();
    for name in ["vm_reload", "vm_reload_backoff", "vm_reload_success", "vm_reload_failure"] {
        assert_eq!(
            stats_after[&format!("envoy_wasm_{name}{{wasm_plugin=\"breakwater\"}}")],
            0.0,
            "FAIL_CLOSED counts nothing: {name}"
        );
    }
    assert!(stats.contains_key("envoy_wasm_vm_reload_failure{wasm_plugin=\"shop.breakwater\"}"));
    assert!(stats.contains_key("envoy_wasm_vm_reload_backoff{wasm_plugin=\"shop.breakwater\"}"));
    assert!(stats["envoy_wasm_envoy_wasm_runtime_v8_active{}"] > 0.0);
    assert!(
        stats["envoy_wasm_envoy_wasm_runtime_v8_created{}"] > stats["envoy_wasm_envoy_wasm_runtime_v8_active{}"],
        "a reload creates a VM"
    );

    let plain_stats = until_positive(&plain, "reload", "envoy_wasm_breakwater_vm_reload_success{}");
    assert!(plain_stats.contains_key("envoy_wasm_breakwater_vm_reload_failure{}"));
    assert!(!plain_stats.keys().any(|k| k.starts_with("envoy_wasm_vm_reload")), "{plain_stats:?}");

    // The shipped rule fires for both Envoys, and only that rule.
    let alerts = prometheus.wait_for("/api/v1/alerts", "BreakwaterWasmVmReloaded firing for both Envoys", |v| {
        let a = v["data"]["alerts"].as_array().cloned().unwrap_or_default();
        a.iter().filter(|a| a["labels"]["alertname"] == "BreakwaterWasmVmReloaded" && a["state"] == "firing").count()
            == 2
    });
    let mut fired: Vec<(String, String, String)> = alerts["data"]["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            let l = &a["labels"];
            let s = |k: &str| l[k].as_str().unwrap_or("").to_string();
            (s("alertname"), s("instance"), s("wasm_plugin"))
        })
        .collect();
    fired.sort();
    let mut want = vec![
        ("BreakwaterWasmVmReloaded".to_string(), tagged.admin.clone(), "shop.breakwater".to_string()),
        ("BreakwaterWasmVmReloaded".to_string(), plain.admin.clone(), String::new()),
    ];
    want.sort();
    assert_eq!(fired, want);
    drop(prometheus);

    // Every Envoy metric README's table names is one Envoy 1.40 shows.
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    for line in readme.lines().filter(|l| l.starts_with("| `envoy_wasm_")) {
        let name = line.split('`').nth(1).unwrap();
        let shown = plain_stats.keys().chain(stats_after.keys()).any(|k| k.split('{').next() == Some(name));
        assert!(shown, "README names {name}, which Envoy did not show");
    }
}
