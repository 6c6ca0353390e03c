//! Per-route filter instances from a route-rule configuration: the recipe that the `breakwater`
//! CLI, the tests and the docs share, so nobody hand-copies filter blocks.
//!
//! Envoy's Wasm filter has no per-route configuration, but any HTTP filter declared with
//! `disabled: true` can be switched on per route with `typed_per_filter_config`. So each policy
//! becomes one Breakwater filter instance, `breakwater-<policy>`, whose configuration names its
//! one policy (`"policy"`): on the request path it needs no route lookup at all. Every instance
//! has the same `vm_id`, root id and code, so all of them share one VM per worker, its shared
//! data and its state. Only rules that match on `route_name` alone can be expressed this way.
//!
//! Native only (the CLI and tests); the `.wasm` does not carry it.

use crate::config::{self, ConfigError};
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use serde_json::{json, Map, Value};

/// The prefix of every instance's filter name.
pub const FILTER_PREFIX: &str = "breakwater-";

/// One filter instance: its name in `http_filters` and its plugin configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct Instance {
    pub filter_name: String,
    pub policy: String,
    pub configuration: Value,
}

/// The instances, and which Envoy route enables which instance.
#[derive(Clone, Debug, PartialEq)]
pub struct PerRoute {
    pub instances: Vec<Instance>,
    /// (Envoy route name, filter name), in rule order.
    pub routes: Vec<(String, String)>,
}

/// Splits a route-rule configuration (validated first, with the plugin's own parser) into one
/// instance per policy that some rule uses.
pub fn split(configuration: &Value) -> Result<PerRoute, ConfigError> {
    let text = configuration.to_string();
    config::parse(text.as_bytes())?;
    let policies = configuration.get("policies").and_then(Value::as_object).cloned().unwrap_or_default();
    let rules = configuration.get("routes").and_then(Value::as_array).cloned().unwrap_or_default();
    let mut routes = Vec::new();
    let mut used: Vec<String> = Vec::new();
    for (i, rule) in rules.iter().enumerate() {
        let path = format!("routes[{i}].match");
        let m = rule.get("match").and_then(Value::as_object).cloned().unwrap_or_default();
        let name = match (m.get("route_name").and_then(Value::as_str), m.len()) {
            (Some(n), 1) => n.to_string(),
            _ => {
                return Err(ConfigError {
                    path,
                    message: "a per-route instance can only stand for a rule that matches on route_name alone"
                        .to_string(),
                })
            }
        };
        let policy = rule.get("policy").and_then(Value::as_str).unwrap_or_default().to_string();
        if routes.iter().any(|(r, _): &(String, String)| *r == name) {
            // The first matching rule wins, as in the plugin: a later rule for the route is dead.
            continue;
        }
        routes.push((name, format!("{FILTER_PREFIX}{policy}")));
        if !used.contains(&policy) {
            used.push(policy);
        }
    }
    let mut instances = Vec::new();
    for policy in used {
        let body = policies.get(&policy).cloned().unwrap_or_else(|| json!({}));
        let mut one = Map::new();
        one.insert(policy.clone(), body);
        let mut c = Map::new();
        c.insert("policies".into(), Value::Object(one));
        c.insert("policy".into(), Value::String(policy.clone()));
        if let Some(s) = configuration.get("sync_interval") {
            c.insert("sync_interval".into(), s.clone());
        }
        let configuration = Value::Object(c);
        config::parse(configuration.to_string().as_bytes())?;
        instances.push(Instance { filter_name: format!("{FILTER_PREFIX}{policy}"), policy, configuration });
    }
    Ok(PerRoute { instances, routes })
}

/// The Envoy `http_filters` entry of an instance: the Wasm filter, disabled unless a route
/// enables it. `wasm` is the filter's `config` without `configuration` (name, root_id,
/// vm_config, failure_policy), shared by all instances.
pub fn http_filter(instance: &Instance, wasm: &Value) -> Value {
    let mut config = wasm.clone();
    if let Some(c) = config.as_object_mut() {
        c.insert(
            "configuration".into(),
            json!({
                "@type": "type.googleapis.com/google.protobuf.StringValue",
                "value": instance.configuration.to_string()
            }),
        );
    }
    json!({
        "name": instance.filter_name,
        "disabled": true,
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
            "config": config
        }
    })
}

/// The `typed_per_filter_config` entry that enables an instance on a route. (`config: {}` is
/// needed: Envoy refuses an empty FilterConfig.)
pub fn enable(filter_name: &str) -> (String, Value) {
    (
        filter_name.to_string(),
        json!({ "@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig", "config": {} }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_policy_a_rule_uses_becomes_one_instance_enabled_on_its_routes() {
        let c = json!({
            "policies": { "checkout": { "circuit_breaker": {} }, "search": { "bulkhead": { "max_concurrent": 2 } }, "unused": {} },
            "routes": [
                { "match": { "route_name": "checkout" }, "policy": "checkout" },
                { "match": { "route_name": "cart" }, "policy": "checkout" },
                { "match": { "route_name": "search" }, "policy": "search" },
                { "match": { "route_name": "search" }, "policy": "checkout" }
            ],
            "sync_interval": "100ms"
        });
        let p = split(&c).unwrap();
        let names: Vec<&str> = p.instances.iter().map(|i| i.filter_name.as_str()).collect();
        assert_eq!(names, ["breakwater-checkout", "breakwater-search"]);
        assert_eq!(
            p.routes,
            [
                ("checkout".to_string(), "breakwater-checkout".to_string()),
                ("cart".to_string(), "breakwater-checkout".to_string()),
                ("search".to_string(), "breakwater-search".to_string()),
            ]
        );
        let parsed = config::parse(p.instances[1].configuration.to_string().as_bytes()).unwrap();
        assert_eq!((parsed.only, parsed.policies.len(), parsed.sync_interval_ns), (Some(0), 1, 100_000_000));
    }

    #[test]
    fn a_rule_on_anything_but_the_route_name_cannot_be_split() {
        let c = json!({ "policies": { "p": {} }, "routes": [{ "match": { "path_prefix": "/api" }, "policy": "p" }] });
        assert_eq!(split(&c).unwrap_err().path, "routes[0].match");
        let bad = json!({ "policies": { "p": { "mode": "sometimes" } } });
        assert_eq!(split(&bad).unwrap_err().path, "policies.p.mode");
    }
}
