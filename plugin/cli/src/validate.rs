//! `breakwater validate`: finds every Breakwater configuration in a file and checks it with the
//! plugin's own parser, exactly as Envoy would hand it over.

use crate::yaml::{self, concat, join, Doc, Pos};
use serde::Serialize;
use serde_json::Value;
use yaml_rust2::scanner::TScalarStyle;

/// The Envoy HTTP Wasm filter's typed config.
const WASM_FILTER: &str = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm";
/// What Breakwater reads its configuration from.
const STRING_VALUE: &str = "type.googleapis.com/google.protobuf.StringValue";
/// Top-level keys of an Envoy bootstrap or xDS resource file.
const ENVOY_KEYS: [&str; 6] = ["static_resources", "dynamic_resources", "admin", "node", "resources", "stats_config"];

/// A message about a place in a file.
#[derive(Debug, Serialize)]
pub struct Finding {
    pub line: Option<usize>,
    pub column: Option<usize>,
    /// The plugin configuration's JSON path, as the plugin names it in its own error.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    pub message: String,
}

impl Finding {
    fn at(pos: Option<Pos>, path: Option<String>, message: String) -> Self {
        Finding { line: pos.map(|p| p.line), column: pos.map(|p| p.column), path, message }
    }
}

/// One Breakwater configuration found in a file.
#[derive(Debug, Serialize)]
pub struct Found {
    /// `plugin-configuration`, `envoy-wasm-filter` or `istio-wasmplugin`.
    pub kind: &'static str,
    /// The filter's or WasmPlugin's name, if it has one.
    pub name: String,
    /// Where the configuration stands in the file (a path through the YAML or JSON document).
    pub at: String,
    pub valid: bool,
    pub policies: usize,
    pub routes: usize,
    /// A per-route filter instance's one policy (its configuration's `policy`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// The status and control endpoint (`control`): whether it takes writes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub control_writes: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<Finding>,
}

#[derive(Debug, Serialize)]
pub struct FileReport {
    pub file: String,
    pub valid: bool,
    /// A problem with the file itself: unreadable, not YAML or JSON, or an Envoy configuration
    /// without a Breakwater filter.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<Finding>,
    pub configs: Vec<Found>,
    pub warnings: Vec<Finding>,
    /// What was left alone: other Kubernetes objects, Wasm filters that are not Breakwater's.
    pub skipped: Vec<String>,
}

pub struct Options {
    /// Take every Wasm filter and WasmPlugin for Breakwater's, whatever its name.
    pub any_wasm: bool,
}

pub fn validate_file(file: &str, text: &str, opts: &Options) -> FileReport {
    let mut report = FileReport {
        file: file.to_string(),
        valid: false,
        error: None,
        configs: Vec::new(),
        warnings: Vec::new(),
        skipped: Vec::new(),
    };
    // A JSON file is read as JSON (a plugin configuration goes to the parser byte for byte);
    // YAML is read as kubectl reads it. Positions come from the YAML reader in both cases.
    let json: Option<Value> = serde_json::from_str(text).ok();
    let docs = match (yaml::parse(text), &json) {
        (Ok(docs), None) => docs,
        (parsed, Some(v)) => {
            let mut doc = parsed.ok().and_then(|mut d| (d.len() == 1).then(|| d.remove(0))).unwrap_or_default();
            doc.value = v.clone();
            doc.ambiguities.clear();
            vec![doc]
        }
        (Err(e), None) => {
            report.error = Some(Finding::at(e.pos, None, format!("not valid YAML or JSON: {}", e.message)));
            return report;
        }
    };
    for (i, doc) in docs.iter().enumerate() {
        let raw = json.is_some().then_some(text);
        scan_doc(doc, i, docs.len(), raw, opts, &mut report);
    }
    // Other Kubernetes objects in a manifest are no error; an Envoy file without Breakwater is.
    if report.configs.is_empty() && report.error.is_none() && docs.iter().any(|d| is_envoy(&d.value)) {
        report.error =
            Some(Finding::at(None, None, "no Breakwater Wasm filter in this Envoy configuration".to_string()));
    }
    report.valid = report.error.is_none() && report.configs.iter().all(|c| c.valid);
    report
}

fn scan_doc(doc: &Doc, index: usize, count: usize, raw_json: Option<&str>, opts: &Options, report: &mut FileReport) {
    let v = &doc.value;
    let doc_name = if count > 1 { format!("document {}", index + 1) } else { String::new() };
    if v.is_null() {
        return;
    }
    let kind = v.get("kind").and_then(Value::as_str);
    let api = v.get("apiVersion").and_then(Value::as_str);
    if kind == Some("WasmPlugin") && api.is_some_and(|a| a.starts_with("extensions.istio.io/")) {
        let name = format!(
            "{}/{}",
            str_at(v, &["metadata", "namespace"]).unwrap_or("default"),
            str_at(v, &["metadata", "name"]).unwrap_or("")
        );
        let ours = ["metadata.name", "spec.pluginName", "spec.url"]
            .iter()
            .any(|p| str_at(v, &p.split('.').collect::<Vec<_>>()).is_some_and(mentions_breakwater));
        if !(ours || opts.any_wasm) {
            report.skipped.push(format!("WasmPlugin {name} (not Breakwater's; --any-wasm checks it)"));
            return;
        }
        let at = "spec.pluginConfig".to_string();
        let bytes = match v.get("spec").and_then(|s| s.get("pluginConfig")) {
            None | Some(Value::Null) => Ok(Vec::new()),
            // Istio hands pluginConfig to the plugin as JSON.
            Some(c @ Value::Object(_)) => Ok(serde_json::to_vec(c).unwrap_or_default()),
            Some(_) => Err("pluginConfig must be a mapping".to_string()),
        };
        ambiguities(doc, &at, report);
        check(report, "istio-wasmplugin", name, &at, bytes, |p| doc.position(&concat(&at, p)));
    } else if kind.is_some() && api.is_some() {
        let name = str_at(v, &["metadata", "name"]).unwrap_or("");
        report.skipped.push(format!("{} {name} (not a WasmPlugin)", kind.unwrap_or("")));
    } else if is_envoy(v) {
        let mut filters = Vec::new();
        wasm_filters(v, "", &mut filters);
        for (at, filter) in filters {
            let config = filter.get("config").unwrap_or(&Value::Null);
            let name = config.get("name").and_then(Value::as_str).unwrap_or("").to_string();
            let ours = [
                "name",
                "root_id",
                "vm_config.vm_id",
                "vm_config.code.local.filename",
                "vm_config.code.remote.http_uri.uri",
            ]
            .iter()
            .any(|p| str_at(config, &p.split('.').collect::<Vec<_>>()).is_some_and(mentions_breakwater));
            if !(ours || opts.any_wasm) {
                report.skipped.push(format!("Wasm filter {name:?} at {at} (not Breakwater's; --any-wasm checks it)"));
                continue;
            }
            let value_path = concat(&at, "config.configuration.value");
            let bytes = match config.get("configuration") {
                None | Some(Value::Null) => Ok(Vec::new()),
                Some(c) if c.get("@type").and_then(Value::as_str) != Some(STRING_VALUE) => Err(format!(
                    "{}: Breakwater reads its configuration from a {STRING_VALUE}",
                    concat(&at, "config.configuration")
                )),
                Some(c) => match c.get("value") {
                    None => Ok(Vec::new()),
                    Some(Value::String(s)) => Ok(s.clone().into_bytes()),
                    Some(_) => Err(format!("{value_path}: a StringValue holds a string (the plugin's JSON)")),
                },
            };
            let inner = c_string(config).and_then(|s| embedded_positions(doc, &value_path, s));
            check(report, "envoy-wasm-filter", name, &at, bytes, |p| match &inner {
                Some(f) => f(p),
                None => doc.position(&value_path),
            });
        }
    } else {
        let bytes = match raw_json {
            Some(raw) => raw.as_bytes().to_vec(),
            None => serde_json::to_vec(v).unwrap_or_default(),
        };
        ambiguities(doc, "", report);
        check(report, "plugin-configuration", doc_name, "", Ok(bytes), |p| doc.position(p));
    }
}

/// Runs the plugin's parser on what Envoy would hand the plugin, and records the outcome.
fn check(
    report: &mut FileReport,
    kind: &'static str,
    name: String,
    at: &str,
    bytes: Result<Vec<u8>, String>,
    locate: impl Fn(&str) -> Option<Pos>,
) {
    let mut found = Found {
        kind,
        name,
        at: at.to_string(),
        valid: false,
        policies: 0,
        routes: 0,
        policy: None,
        control_writes: None,
        error: None,
    };
    match bytes {
        Err(message) => found.error = Some(Finding::at(locate(""), None, message)),
        Ok(bytes) => {
            // As the plugin's on_configure: no configuration at all means no policies.
            // The plugin's own parser, which reads an empty configuration as `{}` itself.
            match breakwater::config::parse(&bytes) {
                Ok(c) => {
                    found.valid = true;
                    found.policies = c.policies.len();
                    found.routes = c.routes.rules().len();
                    found.policy = c.only.and_then(|i| c.policies.get(i)).map(|p| p.name.clone());
                    found.control_writes = c.control.as_ref().map(|a| a.writes);
                    if c.policies.is_empty() && c.control.is_none() {
                        report.warnings.push(Finding::at(
                            locate(""),
                            None,
                            "no policies: Breakwater passes every request untouched".to_string(),
                        ));
                    }
                }
                Err(e) => found.error = Some(Finding::at(locate(&e.path), Some(e.path.clone()), e.message)),
            }
        }
    }
    report.configs.push(found);
}

/// Warns about plain scalars under `prefix` that YAML 1.1 and 1.2 tools read differently.
fn ambiguities(doc: &Doc, prefix: &str, report: &mut FileReport) {
    let under = |p: &str| {
        prefix.is_empty() || p == prefix || p.starts_with(&format!("{prefix}.")) || p.starts_with(&format!("{prefix}["))
    };
    for a in doc.ambiguities.iter().filter(|a| under(&a.path)) {
        let (what, as11, as12) = if a.is_key {
            (
                "the key",
                format!("the key {}", Value::String(key_text(&a.yaml11))),
                format!("the key {}", Value::String(key_text(&a.yaml12))),
            )
        } else {
            ("the value", a.yaml11.to_string(), a.yaml12.to_string())
        };
        report.warnings.push(Finding::at(
            Some(a.pos),
            Some(a.path.strip_prefix(prefix).unwrap_or(&a.path).trim_start_matches('.').to_string()),
            format!(
                "{what} `{}` is read as {as11} by YAML 1.1 (kubectl, Helm: this is what the plugin gets) but as {as12} \
                 by YAML 1.2 tools (yq, serde_yaml); quote it or write what you mean",
                a.text
            ),
        ));
    }
}

/// Finds where a plugin JSON path stands in the file.
type Locate<'a> = Box<dyn Fn(&str) -> Option<Pos> + 'a>;

/// Positions inside a plugin configuration written as a `|` block in a YAML file: the JSON's
/// own lines and columns, shifted to where the block stands.
fn embedded_positions<'a>(doc: &'a Doc, value_path: &str, json: &str) -> Option<Locate<'a>> {
    let (style, start) = doc.scalars.get(value_path)?;
    if *style != TScalarStyle::Literal {
        return None;
    }
    let inner = yaml::parse(json).ok()?.into_iter().next()?;
    // yaml-rust2 places a block scalar at its first non-blank line; blank lines before it are
    // part of the value (and of the JSON's line count).
    let blank = json.chars().take_while(|c| *c == '\n').count();
    let (first_line, indent) = (start.line.saturating_sub(blank), start.column.saturating_sub(1));
    Some(Box::new(move |p: &str| {
        inner.position(p).map(|pos| Pos { line: first_line + pos.line - 1, column: indent + pos.column })
    }))
}

fn key_text(v: &Value) -> String {
    v.as_str().map_or_else(|| v.to_string(), str::to_string)
}

fn c_string(config: &Value) -> Option<&str> {
    config.get("configuration")?.get("value")?.as_str()
}

fn is_envoy(v: &Value) -> bool {
    v.as_object().is_some_and(|o| ENVOY_KEYS.iter().any(|k| o.contains_key(*k))) || has_type(v)
}

fn has_type(v: &Value) -> bool {
    match v {
        Value::Object(o) => o.contains_key("@type") || o.values().any(has_type),
        Value::Array(a) => a.iter().any(has_type),
        _ => false,
    }
}

/// Every HTTP Wasm filter config in an Envoy document: in listeners, LDS resources, and ECDS
/// TypedExtensionConfig resources alike (each is an object whose `@type` is the Wasm filter's).
fn wasm_filters<'a>(v: &'a Value, path: &str, out: &mut Vec<(String, &'a Value)>) {
    match v {
        Value::Object(o) => {
            if o.get("@type").and_then(Value::as_str) == Some(WASM_FILTER) {
                out.push((path.to_string(), v));
            }
            for (k, child) in o {
                wasm_filters(child, &join(path, k), out);
            }
        }
        Value::Array(a) => {
            for (i, child) in a.iter().enumerate() {
                wasm_filters(child, &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    path.iter().try_fold(v, |v, k| v.get(k))?.as_str()
}

fn mentions_breakwater(s: &str) -> bool {
    s.to_ascii_lowercase().contains("breakwater")
}
