//! `breakwater status` and `breakwater control`: the status and control endpoint of a running
//! Envoy (the plugin's `control` filter instance, see the README's "Status and control"), read
//! and steered over plain HTTP on loopback.

use serde_json::Value;
use std::fmt::Write as _;
use std::time::Duration;

/// Where the endpoint listens.
pub struct Endpoint {
    /// `host:port` of the control listener, e.g. `127.0.0.1:9902`.
    pub address: String,
    /// The instance's `control.path_prefix`.
    pub prefix: String,
}

impl Endpoint {
    fn url(&self, path: &str) -> String {
        let address = self.address.trim_start_matches("http://").trim_end_matches('/');
        format!("http://{address}{}{path}", self.prefix)
    }

    /// GET `<prefix>/status[/<policy>]`: the status view, as JSON.
    pub fn status(&self, policy: Option<&str>) -> Result<Value, String> {
        let path = match policy {
            Some(p) => format!("/status/{p}"),
            None => "/status".to_string(),
        };
        self.call("GET", &path)
    }

    /// POST `<prefix>/policies/<policy>/<command>`.
    pub fn command(&self, policy: &str, command: &str) -> Result<Value, String> {
        self.call("POST", &format!("/policies/{policy}/{command}"))
    }

    fn call(&self, method: &str, path: &str) -> Result<Value, String> {
        let url = self.url(path);
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(10)))
            .http_status_as_error(false)
            .build()
            .into();
        let response = match method {
            "POST" => agent.post(&url).send_empty(),
            _ => agent.get(&url).call(),
        };
        let mut response = response.map_err(|e| format!("{method} {url}: {e}"))?;
        let status = response.status().as_u16();
        let body = response.body_mut().read_to_string().map_err(|e| format!("{method} {url}: {e}"))?;
        let json: Value = serde_json::from_str(&body).map_err(|_| {
            format!("{method} {url}: HTTP {status}, not Breakwater's control endpoint: {}", short(body.trim()))
        })?;
        if status == 200 {
            Ok(json)
        } else {
            let why = json.get("error").and_then(Value::as_str).unwrap_or("no reason given");
            Err(format!("{method} {url}: HTTP {status}: {why}"))
        }
    }
}

/// The first line of `text`, cut at 120 characters: what another server answered, in brief.
fn short(text: &str) -> String {
    let first = text.lines().next().unwrap_or("");
    let cut: String = first.chars().take(120).collect();
    if cut.len() < text.len() {
        format!("{cut} …")
    } else {
        cut
    }
}

/// The status view for people: one block per policy.
pub fn to_text(status: &Value) -> String {
    let mut out = String::new();
    let Some(policies) = status.get("policies").and_then(Value::as_object) else {
        return "no policies\n".to_string();
    };
    if policies.is_empty() {
        out.push_str("no policies\n");
    }
    for (name, p) in policies {
        let mode = p["mode"].as_str().unwrap_or("?");
        let _ = writeln!(out, "{name}{}", if mode == "enforce" { String::new() } else { format!(" ({mode})") });
        if let Some(cb) = p.get("circuit_breaker") {
            let _ = writeln!(out, "  breaker   {}", breaker_line(cb));
        }
        if let Some(b) = p.get("bulkhead") {
            let mut line = format!("{} of {} permits taken", b["active"], b["limit"]);
            let mut notes = Vec::new();
            if let (Some(min), Some(max)) = (b["min"].as_u64(), b["max"].as_u64()) {
                notes.push(format!("adaptive limit, {min} to {max}"));
            }
            if b["leased"].as_u64().unwrap_or(0) > 0 {
                notes.push(format!("{} in workers' leases, in use or idle", b["leased"]));
            }
            if !notes.is_empty() {
                let _ = write!(line, " ({})", notes.join("; "));
            }
            if b["queue_max"].as_u64().unwrap_or(0) > 0 {
                let _ = write!(line, ", {} of {} queued", b["queued"], b["queue_max"]);
            }
            let _ = writeln!(out, "  bulkhead  {line}");
        }
        if let Some(r) = p.get("retry_budget") {
            let _ = writeln!(out, "  retries   {} left in the budget", r["remaining"]);
        }
        if let Some(f) = p.get("fallback").and_then(Value::as_object) {
            let kinds: Vec<String> = ["static", "cache", "cluster"]
                .iter()
                .filter_map(|kind| {
                    f.get(*kind).map(|n| format!("{kind} {} served, {} missed", n["served"], n["missed"]))
                })
                .collect();
            let _ = writeln!(out, "  fallback  {}", kinds.join("; "));
        }
    }
    out
}

fn breaker_line(cb: &Value) -> String {
    let state = cb["state"].as_str().unwrap_or("?").replace('_', "-");
    let mut line = state.clone();
    if let Some(by) = cb["forced_by"].as_str() {
        let _ = write!(line, " (by {by})");
    }
    if let Some(ms) = cb.get("open_remaining_ms").and_then(Value::as_u64) {
        let _ = write!(line, ", {:.1}s left", ms as f64 / 1000.0);
    }
    if let Some(h) = cb.get("half_open") {
        let _ = write!(
            line,
            ", {} of {} probes in flight, {} of {} successes",
            h["probes_in_flight"], h["max_probes"], h["successes"], h["successes_to_close"]
        );
    }
    let w = &cb["window"];
    let calls = w["calls"].as_u64().unwrap_or(0);
    let failures = cb["consecutive_failures"].as_u64().unwrap_or(0);
    let _ = write!(line, "; {failures} consecutive failure{}", if failures == 1 { "" } else { "s" });
    if calls > 0 {
        let _ = write!(
            line,
            "; last {}s: {calls} calls, {}% failed, {}% slow",
            w["length_ms"].as_u64().unwrap_or(0) / 1000,
            w["failure_rate_percent"],
            w["slow_call_rate_percent"]
        );
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_text_view_says_what_each_policy_has() {
        let s = json!({ "policies": {
            "checkout": { "mode": "enforce", "circuit_breaker": {
                "state": "open", "forced": null, "forced_by": null, "consecutive_failures": 0,
                "window": { "length_ms": 10000, "calls": 0, "failures": 0, "slow_calls": 0,
                            "failure_rate_percent": 0.0, "slow_call_rate_percent": 0.0 },
                "open_remaining_ms": 8200, "open_period_ms": 10000, "generation": 1 } },
            "search": { "mode": "dry_run", "bulkhead": { "limit": 4, "active": 3, "leased": 1, "queued": 1, "queue_max": 2 },
                        "retry_budget": { "remaining": 7 } },
            "orders": { "mode": "enforce", "bulkhead": { "limit": 8, "min": 4, "max": 200, "active": 2, "leased": 0, "queued": 0, "queue_max": 0 } },
            "catalog": { "mode": "enforce", "fallback": { "static": { "served": 2, "missed": 0 }, "cache": { "served": 5, "missed": 1 } } }
        }});
        let text = to_text(&s);
        assert!(text.contains("checkout\n  breaker   open, 8.2s left; 0 consecutive failures\n"), "{text}");
        assert!(text.contains("search (dry_run)\n"), "{text}");
        assert!(
            text.contains("  bulkhead  3 of 4 permits taken (1 in workers' leases, in use or idle), 1 of 2 queued\n"),
            "{text}"
        );
        assert!(text.contains("orders\n  bulkhead  2 of 8 permits taken (adaptive limit, 4 to 200)\n"), "{text}");
        assert!(text.contains("  retries   7 left in the budget\n"), "{text}");
        assert!(text.contains("catalog\n  fallback  static 2 served, 0 missed; cache 5 served, 1 missed\n"), "{text}");
    }

    #[test]
    fn a_forced_breaker_says_who_forced_it() {
        let cb = json!({ "state": "forced_open", "forced_by": "operator", "consecutive_failures": 0,
                         "window": { "length_ms": 60000, "calls": 40, "failure_rate_percent": 12.5, "slow_call_rate_percent": 0.0 } });
        assert_eq!(
            breaker_line(&cb),
            "forced-open (by operator); 0 consecutive failures; last 60s: 40 calls, 12.5% failed, 0.0% slow"
        );
    }

    #[test]
    fn urls_take_an_address_with_or_without_a_scheme() {
        let e = Endpoint { address: "http://127.0.0.1:9902/".into(), prefix: "/breakwater".into() };
        assert_eq!(e.url("/status"), "http://127.0.0.1:9902/breakwater/status");
    }
}
