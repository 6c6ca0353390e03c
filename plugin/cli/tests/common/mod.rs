//! Runs the built `breakwater` binary from the repository root, as a user would.
#![allow(dead_code)]

use serde_json::Value;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

pub fn breakwater_in(dir: &Path, args: &[&str], stdin: Option<&str>) -> Run {
    let mut child = Command::new(env!("CARGO_BIN_EXE_breakwater"))
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
    drop(input);
    let out = child.wait_with_output().unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    }
}

pub fn breakwater(args: &[&str]) -> Run {
    breakwater_in(&root(), args, None)
}

/// `breakwater validate --output json FILES…`: the report and the exit code.
pub fn validate_json(files: &[&str]) -> (Value, i32) {
    let mut args = vec!["validate", "--output", "json"];
    args.extend_from_slice(files);
    let run = breakwater(&args);
    let report = serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("{e}: {}{}", run.stdout, run.stderr));
    (report, run.code)
}

/// A YAML document (yaml-rust2) as JSON.
pub fn to_json(y: &yaml_rust2::Yaml) -> Value {
    use yaml_rust2::Yaml;
    match y {
        Yaml::Hash(h) => Value::Object(h.iter().map(|(k, v)| (k.as_str().unwrap().to_string(), to_json(v))).collect()),
        Yaml::Array(a) => Value::Array(a.iter().map(to_json).collect()),
        Yaml::String(s) => Value::String(s.clone()),
        Yaml::Integer(i) => Value::from(*i),
        Yaml::Real(r) => Value::from(r.parse::<f64>().unwrap()),
        Yaml::Boolean(b) => Value::Bool(*b),
        _ => Value::Null,
    }
}

/// The plugin configurations inside the shipped Envoy and Istio examples, as JSON.
pub fn shipped_configurations() -> Vec<(String, Value)> {
    use yaml_rust2::YamlLoader;
    fn find<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
        match v {
            Value::Object(o) => o.get(key).or_else(|| o.values().find_map(|v| find(v, key))),
            Value::Array(a) => a.iter().find_map(|v| find(v, key)),
            _ => None,
        }
    }
    let read =
        |p: &str| to_json(&YamlLoader::load_from_str(&std::fs::read_to_string(root().join(p)).unwrap()).unwrap()[0]);
    let envoy = read("envoy/envoy.yaml");
    let filters = find(&envoy, "http_filters").unwrap().as_array().unwrap();
    let mut out: Vec<(String, Value)> = filters
        .iter()
        .filter_map(|f| f["typed_config"]["config"]["configuration"]["value"].as_str())
        .map(|value| ("envoy/envoy.yaml".to_string(), serde_json::from_str(value).unwrap()))
        .collect();
    for recipe in ["envoy/istio/gateway.yaml", "envoy/istio/client-sidecars.yaml", "envoy/istio/server-sidecar.yaml"] {
        let docs = YamlLoader::load_from_str(&std::fs::read_to_string(root().join(recipe)).unwrap()).unwrap();
        let plugin = docs.iter().map(to_json).find(|d| d["kind"] == "WasmPlugin").unwrap();
        out.push((recipe.to_string(), plugin["spec"]["pluginConfig"].clone()));
    }
    out
}
