//! Reads YAML the way kubectl (and Helm, and Envoy's own YAML loader) do: YAML 1.1 scalars.
//!
//! serde_yaml reads YAML 1.2, where a bare `on`, `off`, `yes`, `no`, `y` or `n` is a string and
//! `0755` is 755. kubectl turns a manifest into JSON with go-yaml's YAML 1.1 rules, where those
//! words are booleans and `0755` is octal: `retry: { on: [5xx] }` reaches the plugin as
//! `{"true": ["5xx"]}`. Nor does serde_yaml tell a quoted `"on"` from a bare one, or where in the
//! file a value stands. So this module builds the JSON value itself from yaml-rust2's parser
//! events, which carry each scalar's style and position: plain scalars resolve by YAML 1.1 (as
//! go-yaml v2 does), quoted ones stay strings. It records where every value stands (by the
//! plugin's path syntax, `a.b[0].c`) and every plain scalar that YAML 1.1 and YAML 1.2 read
//! differently, so `validate` can warn about files that other tools would read otherwise.

use serde_json::{Map, Number, Value};
use std::collections::HashMap;
use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

/// A line and column in a file, both from 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Pos {
    pub line: usize,
    pub column: usize,
}

impl Pos {
    fn of(m: Marker) -> Self {
        // yaml-rust2 counts lines from 1 and columns from 0.
        Pos { line: m.line(), column: m.col() + 1 }
    }
}

/// A plain scalar that YAML 1.1 and YAML 1.2 read differently.
#[derive(Clone, Debug)]
pub struct Ambiguity {
    pub path: String,
    pub pos: Pos,
    pub text: String,
    pub yaml11: Value,
    pub yaml12: Value,
    pub is_key: bool,
}

/// One YAML document as JSON, with positions.
#[derive(Debug, Default)]
pub struct Doc {
    pub value: Value,
    /// Where each value stands, by path ("" is the document itself). A mapping value is placed
    /// at its key.
    pub positions: HashMap<String, Pos>,
    /// The style and position of each string scalar, for block scalars that hold JSON.
    pub scalars: HashMap<String, (TScalarStyle, Pos)>,
    pub ambiguities: Vec<Ambiguity>,
}

impl Doc {
    /// The position of `path`, or of its nearest ancestor that has one.
    pub fn position(&self, path: &str) -> Option<Pos> {
        let mut p = path;
        loop {
            if let Some(pos) = self.positions.get(p) {
                return Some(*pos);
            }
            if p.is_empty() {
                return None;
            }
            p = parent(p);
        }
    }
}

/// `a.b[0].c` → `a.b[0]` → `a.b` → `a` → "".
pub fn parent(path: &str) -> &str {
    match path.rfind(['.', '[']) {
        Some(i) => path.get(..i).unwrap_or(""),
        None => "",
    }
}

/// The path of `key` under `path`, rendered as the plugin renders it in its errors.
pub fn join(path: &str, key: &str) -> String {
    breakwater::config::join(path, key)
}

/// A path below another: `at` + `rest` (both already rendered).
pub fn concat(at: &str, rest: &str) -> String {
    match (at.is_empty(), rest.is_empty() || rest.starts_with('[')) {
        (true, _) => rest.to_string(),
        (false, true) => format!("{at}{rest}"),
        (false, false) => format!("{at}.{rest}"),
    }
}

#[derive(Debug)]
pub struct YamlError {
    pub pos: Option<Pos>,
    pub message: String,
}

/// Parses every document of a YAML stream.
pub fn parse(text: &str) -> Result<Vec<Doc>, YamlError> {
    let mut builder = Builder::default();
    let mut parser = Parser::new_from_str(text);
    parser
        .load(&mut builder, true)
        .map_err(|e| YamlError { pos: Some(Pos::of(*e.marker())), message: e.info().to_string() })?;
    match builder.error {
        Some(e) => Err(e),
        None => Ok(builder.docs),
    }
}

enum Frame {
    Seq { items: Vec<Value>, path: String, anchor: usize },
    Map { map: Map<String, Value>, path: String, anchor: usize, key: Option<String>, merges: Vec<Value> },
}

#[derive(Default)]
struct Builder {
    docs: Vec<Doc>,
    doc: Doc,
    stack: Vec<Frame>,
    anchors: HashMap<usize, Value>,
    error: Option<YamlError>,
}

impl Builder {
    fn fail(&mut self, pos: Pos, message: String) {
        if self.error.is_none() {
            self.error = Some(YamlError { pos: Some(pos), message });
        }
    }

    /// The path the next node will have, or None when it is a mapping key.
    fn next_path(&self) -> Option<String> {
        match self.stack.last() {
            None => Some(String::new()),
            Some(Frame::Seq { items, path, .. }) => Some(format!("{path}[{}]", items.len())),
            Some(Frame::Map { key: None, .. }) => None,
            Some(Frame::Map { key: Some(k), path, .. }) => Some(join(path, k)),
        }
    }

    /// Places a finished node: as the document, a sequence item, a mapping key or value.
    fn place(&mut self, value: Value, anchor: usize, pos: Pos) {
        if anchor > 0 {
            self.anchors.insert(anchor, value.clone());
        }
        let mut failure = None;
        match self.stack.last_mut() {
            None => self.doc.value = value,
            Some(Frame::Seq { items, .. }) => items.push(value),
            Some(Frame::Map { map, key, merges, path, .. }) => match key.take() {
                Some(k) if k == "<<" => merges.push(value),
                Some(k) => {
                    if map.insert(k.clone(), value).is_some() {
                        failure = Some((
                            join(path, &k),
                            format!("the key {k:?} appears twice (kubectl refuses duplicate keys)"),
                        ));
                    }
                }
                None => match key_string(value) {
                    Some(k) => {
                        self.doc.positions.insert(join(path, &k), pos);
                        *key = Some(k);
                    }
                    None => failure = Some((path.clone(), "a mapping key must be a scalar".to_string())),
                },
            },
        }
        if let Some((path, message)) = failure {
            let at = self.doc.position(&path).unwrap_or(pos);
            self.fail(at, format!("{path}: {message}"));
        }
    }

    fn scalar(&mut self, text: String, style: TScalarStyle, anchor: usize, tag: Option<String>, pos: Pos) {
        let path = self.next_path();
        let is_key = path.is_none();
        let value = match (style, tag.as_deref()) {
            (_, Some("str")) => Value::String(text.clone()),
            (TScalarStyle::Plain, _) => {
                let v11 = resolve_yaml11(&text);
                let v12 = resolve_yaml12(&text);
                if v11 != v12 {
                    let at = match &path {
                        Some(p) => p.clone(),
                        None => self.key_path(&text),
                    };
                    self.doc.ambiguities.push(Ambiguity {
                        path: at,
                        pos,
                        text: text.clone(),
                        yaml11: v11.clone(),
                        yaml12: v12,
                        is_key,
                    });
                }
                v11
            }
            _ => Value::String(text.clone()),
        };
        if let Some(p) = path {
            if value.is_string() {
                self.doc.scalars.insert(p.clone(), (style, pos));
            }
            self.doc.positions.entry(p).or_insert(pos);
        }
        if style == TScalarStyle::Plain && tag.is_none() && is_special_float(&text) {
            self.fail(pos, format!("{text}: YAML 1.1 reads this as a float that JSON cannot hold"));
        }
        self.place(value, anchor, pos);
    }

    /// The path a mapping key would give its value, for an ambiguous key.
    fn key_path(&self, text: &str) -> String {
        match self.stack.last() {
            Some(Frame::Map { path, .. }) => join(path, &key_string(resolve_yaml11(text)).unwrap_or_default()),
            _ => String::new(),
        }
    }
}

/// A mapping key as text: sigs.k8s.io/yaml (kubectl) writes a non-string key as its JSON text,
/// so a bare `on:` becomes the key "true".
fn key_string(key: Value) -> Option<String> {
    match key {
        Value::String(s) => Some(s),
        Value::Bool(_) | Value::Number(_) | Value::Null => Some(key.to_string()),
        _ => None,
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        if self.error.is_some() {
            return;
        }
        let pos = Pos::of(mark);
        match ev {
            Event::DocumentStart => {
                self.doc = Doc::default();
                self.doc.positions.insert(String::new(), pos);
            }
            Event::DocumentEnd => self.docs.push(std::mem::take(&mut self.doc)),
            Event::Scalar(text, style, anchor, tag) => {
                let tag = tag.map(|t| t.suffix);
                self.scalar(text, style, anchor, tag, pos);
            }
            Event::SequenceStart(anchor, _) => {
                if let Some(p) = self.next_path() {
                    self.doc.positions.entry(p.clone()).or_insert(pos);
                    self.stack.push(Frame::Seq { items: Vec::new(), path: p, anchor });
                } else {
                    self.fail(pos, "a mapping key must be a scalar".to_string());
                }
            }
            Event::MappingStart(anchor, _) => {
                if let Some(p) = self.next_path() {
                    self.doc.positions.entry(p.clone()).or_insert(pos);
                    self.stack.push(Frame::Map { map: Map::new(), path: p, anchor, key: None, merges: Vec::new() });
                } else {
                    self.fail(pos, "a mapping key must be a scalar".to_string());
                }
            }
            Event::SequenceEnd => {
                if let Some(Frame::Seq { items, anchor, .. }) = self.stack.pop() {
                    self.place(Value::Array(items), anchor, pos);
                }
            }
            Event::MappingEnd => {
                if let Some(Frame::Map { mut map, anchor, merges, path, .. }) = self.stack.pop() {
                    // YAML 1.1 merge keys (`<<: *base`): keys written in the mapping win.
                    for m in merges.iter().flat_map(|m| match m {
                        Value::Array(list) => list.iter().collect(),
                        other => vec![other],
                    }) {
                        match m {
                            Value::Object(base) => {
                                for (k, v) in base {
                                    map.entry(k.clone()).or_insert_with(|| v.clone());
                                }
                            }
                            _ => self.fail(pos, format!("{}: a merge key (<<) takes a mapping", join(&path, "<<"))),
                        }
                    }
                    self.place(Value::Object(map), anchor, pos);
                }
            }
            Event::Alias(id) => match self.anchors.get(&id).cloned() {
                Some(v) => {
                    if let Some(p) = self.next_path() {
                        self.doc.positions.entry(p).or_insert(pos);
                    }
                    self.place(v, 0, pos);
                }
                None => self.fail(pos, "an alias to an unknown anchor".to_string()),
            },
            Event::StreamStart | Event::StreamEnd | Event::Nothing => {}
        }
    }
}

/// A plain scalar as go-yaml v2 (kubectl, Helm) resolves it: YAML 1.1.
pub fn resolve_yaml11(s: &str) -> Value {
    match s {
        "" | "~" | "null" | "Null" | "NULL" => return Value::Null,
        "y" | "Y" | "yes" | "Yes" | "YES" | "on" | "On" | "ON" | "true" | "True" | "TRUE" => return Value::Bool(true),
        "n" | "N" | "no" | "No" | "NO" | "off" | "Off" | "OFF" | "false" | "False" | "FALSE" => {
            return Value::Bool(false)
        }
        _ => {}
    }
    if !s.starts_with(|c: char| c.is_ascii_digit() || "+-.".contains(c)) {
        return Value::String(s.to_string());
    }
    let plain = s.replace('_', "");
    let (negative, digits) = match plain.as_bytes().first() {
        Some(b'-') => (true, plain.get(1..).unwrap_or("")),
        Some(b'+') => (false, plain.get(1..).unwrap_or("")),
        _ => (false, plain.as_str()),
    };
    let radix = if let Some(d) = digits.strip_prefix("0b") {
        Some((d, 2))
    } else if let Some(d) = digits.strip_prefix("0x") {
        Some((d, 16))
    } else if let Some(d) = digits.strip_prefix("0o") {
        Some((d, 8))
    } else if digits.len() > 1 && digits.starts_with('0') && digits.bytes().all(|b| b.is_ascii_digit()) {
        Some((digits.get(1..).unwrap_or(""), 8))
    } else if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
        Some((digits, 10))
    } else {
        None
    };
    if let Some((d, radix)) = radix {
        if let Ok(n) = u64::from_str_radix(d, radix) {
            return if negative { int(-(n as i128)) } else { int(n as i128) };
        }
        if radix != 10 {
            return Value::String(s.to_string());
        }
    }
    float(&plain, s)
}

/// A plain scalar by the YAML 1.2 core schema (serde_yaml, yq v4, most editors).
pub fn resolve_yaml12(s: &str) -> Value {
    match s {
        "" | "~" | "null" | "Null" | "NULL" => return Value::Null,
        "true" | "True" | "TRUE" => return Value::Bool(true),
        "false" | "False" | "FALSE" => return Value::Bool(false),
        _ => {}
    }
    let (negative, digits) = match s.as_bytes().first() {
        Some(b'-') => (true, s.get(1..).unwrap_or("")),
        Some(b'+') => (false, s.get(1..).unwrap_or("")),
        _ => (false, s),
    };
    let radix = if let Some(d) = s.strip_prefix("0x") {
        Some((d, 16))
    } else if let Some(d) = s.strip_prefix("0o") {
        Some((d, 8))
    } else if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
        Some((digits, 10))
    } else {
        None
    };
    if let Some((d, radix)) = radix {
        if d.bytes().all(|b| b.is_ascii_hexdigit()) {
            if let Ok(n) = u64::from_str_radix(d, radix) {
                return if negative { int(-(n as i128)) } else { int(n as i128) };
            }
        }
    }
    float(s, s)
}

fn int(n: i128) -> Value {
    if let Ok(u) = u64::try_from(n) {
        Value::Number(u.into())
    } else if let Ok(i) = i64::try_from(n) {
        Value::Number(i.into())
    } else {
        Value::Number(Number::from_f64(n as f64).unwrap_or_else(|| 0.into()))
    }
}

fn is_special_float(s: &str) -> bool {
    matches!(s.trim_start_matches(['+', '-']), ".inf" | ".Inf" | ".INF" | ".nan" | ".NaN" | ".NAN")
}

/// A YAML float (`1.5`, `-2e3`, `.5`), else the original text as a string.
fn float(number: &str, original: &str) -> Value {
    let body = number.trim_start_matches(['+', '-']);
    let (mantissa, exponent) = match body.find(['e', 'E']) {
        Some(i) => (body.get(..i).unwrap_or(""), Some(body.get(i + 1..).unwrap_or(""))),
        None => (body, None),
    };
    let (whole, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let mantissa_ok = whole.bytes().all(|b| b.is_ascii_digit())
        && frac.bytes().all(|b| b.is_ascii_digit())
        && (!whole.is_empty() || !frac.is_empty())
        && (mantissa.contains('.') || exponent.is_some());
    let exponent_ok = exponent.is_none_or(|e| {
        let e = e.strip_prefix(['+', '-']).unwrap_or(e);
        !e.is_empty() && e.bytes().all(|b| b.is_ascii_digit())
    });
    if mantissa_ok && exponent_ok {
        if let Some(n) = number.parse::<f64>().ok().and_then(Number::from_f64) {
            return Value::Number(n);
        }
    }
    Value::String(original.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn plain_scalars_resolve_as_kubectl_reads_them() {
        for (text, want) in [
            ("on", json!(true)),
            ("Off", json!(false)),
            ("yes", json!(true)),
            ("n", json!(false)),
            ("~", json!(null)),
            ("0755", json!(493)),
            ("0x1F", json!(31)),
            ("0b101", json!(5)),
            ("1_000", json!(1000)),
            ("-3", json!(-3)),
            ("1.5", json!(1.5)),
            ("2e3", json!(2000.0)),
            ("10s", json!("10s")),
            ("5xx", json!("5xx")),
            ("1.2.3", json!("1.2.3")),
            ("0.2", json!(0.2)),
        ] {
            assert_eq!(resolve_yaml11(text), want, "{text}");
        }
    }

    #[test]
    fn yaml_1_2_reads_the_same_words_otherwise() {
        for (text, want) in
            [("on", json!("on")), ("yes", json!("yes")), ("0755", json!(755)), ("1_000", json!("1_000"))]
        {
            assert_eq!(resolve_yaml12(text), want, "{text}");
        }
    }

    #[test]
    fn quoted_scalars_stay_strings_and_positions_are_recorded() {
        let docs = parse("a:\n  on: [5xx]\n  'off': \"yes\"\n  n: 0755\n").unwrap();
        let d = &docs[0];
        assert_eq!(d.value, json!({"a": {"true": ["5xx"], "off": "yes", "false": 493}}));
        assert_eq!(d.positions["a.true"], Pos { line: 2, column: 3 });
        assert_eq!(d.positions["a.true[0]"], Pos { line: 2, column: 8 });
        assert_eq!(d.position("a.true[0].nothing.here"), Some(Pos { line: 2, column: 8 }));
        let words: Vec<_> = d.ambiguities.iter().map(|a| a.text.as_str()).collect();
        assert_eq!(words, ["on", "n", "0755"]);
    }

    #[test]
    fn anchors_merge_keys_and_duplicates() {
        let docs = parse("base: &b { x: 1, w: 2 }\nuse: { <<: *b, w: 3 }\n---\nz: 1\n").unwrap();
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[0].value["use"], json!({"x": 1, "w": 3}));
        let e = parse("a: 1\na: 2\n").unwrap_err();
        assert_eq!(e.pos, Some(Pos { line: 2, column: 1 }));
        assert!(e.message.contains("appears twice"), "{}", e.message);
    }
}
