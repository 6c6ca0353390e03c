//! The configurations users copy from `envoy/` must be valid Breakwater configurations.
//! (The real-Envoy suite in `integration/` also runs envoy.yaml itself.)
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use serde::Deserialize;
use serde_yaml::Value as Yaml;
use std::path::PathBuf;

fn example(path: &str) -> String {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join(path);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn yaml_docs(path: &str) -> Vec<Yaml> {
    let text = example(path);
    serde_yaml::Deserializer::from_str(&text).map(|d| Yaml::deserialize(d).unwrap()).collect()
}

fn find<'a>(v: &'a Yaml, key: &str) -> Option<&'a Yaml> {
    match v {
        Yaml::Mapping(m) => m.get(key).or_else(|| m.values().find_map(|v| find(v, key))),
        Yaml::Sequence(s) => s.iter().find_map(|v| find(v, key)),
        _ => None,
    }
}

#[test]
fn the_demo_envoy_yaml_carries_a_valid_plugin_configuration() {
    let docs = yaml_docs("envoy/envoy.yaml");
    let configuration = find(&docs[0], "configuration").expect("a wasm configuration");
    let json = configuration["value"].as_str().expect("a StringValue");
    let c = breakwater::config::parse(json.as_bytes()).unwrap_or_else(|e| panic!("envoy/envoy.yaml: {e}"));
    let names: Vec<_> = c.policies.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["catalog", "checkout", "inventory", "search"]);
    let checkout = c.policies.iter().find(|p| p.name == "checkout").unwrap();
    assert!(checkout.breaker.is_some() && checkout.bulkhead.is_some(), "checkout shows both policies");
}

/// Every plugin configuration shipped in YAML (envoy/, the Istio recipes, the README), as the
/// plugin receives it once a YAML 1.1 reader (kubectl, Helm) has read it: `make yaml-contract`
/// reads each with YAML 1.1 and 1.2 readers, checks they agree, and writes the configurations
/// (a WasmPlugin's `pluginConfig` converted as istiod converts it) to `$BREAKWATER_READINGS`.
#[test]
#[ignore = "run by `make yaml-contract`, which writes the readings first"]
fn every_shipped_configuration_parses_as_the_mesh_delivers_it() {
    let dir = std::env::var("BREAKWATER_READINGS").expect("BREAKWATER_READINGS: run `make yaml-contract`");
    let text = std::fs::read_to_string(PathBuf::from(dir).join("readings.json")).unwrap();
    let readings: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    assert!(readings.len() >= 5, "too few shipped configurations found: {readings:?}");
    for r in &readings {
        let source = r["source"].as_str().unwrap();
        let configuration = r["configuration"].as_str().unwrap();
        let outcome = breakwater::config::parse(configuration.as_bytes()).map(|_| ()).map_err(|e| e.to_string());
        match r["refused_with"].as_str() {
            None => assert_eq!(outcome, Ok(()), "{source}: {configuration}"),
            Some(known) => assert_eq!(outcome, Err(known.to_owned()), "{source}: a known refusal changed"),
        }
        println!("{source}: {}", if outcome.is_ok() { "accepted" } else { "refused, as known" });
    }
}

#[test]
fn istio_and_plain_envoy_use_the_same_stats_tag_extractors() {
    let envoy = yaml_docs("envoy/envoy.yaml");
    let envoy_tags = serde_json::to_value(&envoy[0]["stats_config"]["stats_tags"]).unwrap();
    let istio = yaml_docs("envoy/istio/telemetry-stats-tags.yaml");
    let bootstrap: serde_json::Value =
        serde_json::from_str(istio[0]["data"]["custom_bootstrap.json"].as_str().unwrap()).unwrap();
    assert_eq!(bootstrap["stats_config"]["stats_tags"], envoy_tags);
}
