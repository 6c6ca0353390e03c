//! The configuration fuzzer: tens of thousands of mutated configurations per run, seeded, each
//! parsed under a stopwatch.
//!
//! The corpus is every valid configuration this repository ships or tests: the plugin
//! configuration in `envoy/envoy.yaml`, the `pluginConfig` of the Istio manifests, the README's
//! YAML examples, every JSON object written as a raw string in the plugin's unit tests, and a
//! few written here to reach every key. Each case
//! takes one and changes it one to three times (keys removed, renamed, duplicated or added;
//! values swapped for other types, extreme numbers, long, unicode or control-character strings,
//! large arrays or objects, nesting deep or past serde_json's limit, subtrees copied across),
//! then in some cases its bytes (flipped, cut, inserted, repeated; invalid UTF-8, a BOM); one
//! case in two thousand gets a megabyte string or key. Each is checked:
//! * `parse` never panics, and no single parse takes a second;
//! * a refusal is one line (no control character at all), at most [`MAX_MESSAGE`] bytes, and
//!   names a JSON path that is in the input (or, for a missing key, whose parent is);
//! * an accepted configuration compiles ([`Compiled::new`]) and creates its shared state on a
//!   fake host.

use super::*;
use crate::fake::FakeHost;
use crate::Compiled;
use alloc::boxed::Box;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

/// Mutated configurations per run.
const CASES: u32 = 20_000;
const SEED: u64 = 0xb4ea_4a7e_2c0f_f1e5;
/// Longest refusal message, in bytes: the longest list of expected values (retry_on's) with a
/// value shown cut (64 characters of 4 bytes) stays below it.
const MAX_MESSAGE: usize = 768;
const SLOW: Duration = Duration::from_secs(1);
const MAX_INPUT: usize = 4 << 20;
/// About how large a multiplied list or object may grow.
const BIG: usize = 100_000;

/// splitmix64: a small seeded generator, the same sequence on every platform.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// 0..n (n > 0).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    /// True with probability 1/n.
    fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// JSON as written: members in order, duplicates allowed, numbers as their text.
#[derive(Clone, Debug)]
enum J {
    Null,
    Bool(bool),
    Num(String),
    Str(String),
    Arr(Vec<J>),
    Obj(Vec<(String, J)>),
}

impl J {
    fn write(&self, out: &mut String) {
        match self {
            J::Null => out.push_str("null"),
            J::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            J::Num(n) => out.push_str(n),
            J::Str(s) => write_str(s, out),
            J::Arr(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    item.write(out);
                }
                out.push(']');
            }
            J::Obj(members) => {
                out.push('{');
                for (i, (k, v)) in members.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    write_str(k, out);
                    out.push(':');
                    v.write(out);
                }
                out.push('}');
            }
        }
    }

    /// Every node, as the path of child indices that leads to it.
    fn paths(&self, here: &mut Vec<usize>, out: &mut Vec<Vec<usize>>) {
        out.push(here.clone());
        let n = match self {
            J::Arr(items) => items.len(),
            J::Obj(members) => members.len(),
            _ => 0,
        };
        // Large lists are sampled: their elements are alike.
        for i in 0..n.min(24) {
            here.push(i);
            self.child(i).paths(here, out);
            here.pop();
        }
    }

    fn child(&self, i: usize) -> &J {
        match self {
            J::Arr(items) => &items[i],
            J::Obj(members) => &members[i].1,
            _ => unreachable!(),
        }
    }

    fn get(&self, path: &[usize]) -> &J {
        match path.split_first() {
            None => self,
            Some((i, rest)) => self.child(*i).get(rest),
        }
    }

    /// About how many bytes it writes as JSON.
    fn size(&self) -> usize {
        match self {
            J::Null | J::Bool(_) => 5,
            J::Num(n) => n.len(),
            J::Str(s) => s.len() + 2,
            J::Arr(items) => 2 + items.iter().map(|i| i.size() + 1).sum::<usize>(),
            J::Obj(members) => 2 + members.iter().map(|(k, v)| k.len() + 4 + v.size()).sum::<usize>(),
        }
    }

    fn at(&mut self, path: &[usize]) -> &mut J {
        match path.split_first() {
            None => self,
            Some((i, rest)) => match self {
                J::Arr(items) => items[*i].at(rest),
                J::Obj(members) => members[*i].1.at(rest),
                _ => unreachable!(),
            },
        }
    }
}

/// Reads JSON into a [`J`], keeping duplicate keys (serde_json's `Value` keeps the last one).
/// Below 20 levels, which no error path reaches (the parser refuses more than 16), values are
/// skipped: unwinding an error from deep down costs serde_json a scan per level.
fn read(bytes: &[u8]) -> Option<J> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let j = JSeed(0).deserialize(&mut de).ok()?;
    de.end().ok().map(|()| j)
}

#[derive(Clone, Copy)]
struct JSeed(usize);

impl<'de> DeserializeSeed<'de> for JSeed {
    type Value = J;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> core::result::Result<J, D::Error> {
        if self.0 > 20 {
            <serde::de::IgnoredAny as serde::Deserialize>::deserialize(d)?;
            return Ok(J::Null);
        }
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for JSeed {
    type Value = J;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("JSON")
    }
    fn visit_bool<E>(self, v: bool) -> core::result::Result<J, E> {
        Ok(J::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> core::result::Result<J, E> {
        Ok(J::Num(v.to_string()))
    }
    fn visit_u64<E>(self, v: u64) -> core::result::Result<J, E> {
        Ok(J::Num(v.to_string()))
    }
    fn visit_f64<E>(self, v: f64) -> core::result::Result<J, E> {
        Ok(J::Num(v.to_string()))
    }
    fn visit_str<E>(self, v: &str) -> core::result::Result<J, E> {
        Ok(J::Str(v.to_string()))
    }
    fn visit_unit<E>(self) -> core::result::Result<J, E> {
        Ok(J::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> core::result::Result<J, A::Error> {
        let mut items = Vec::new();
        while let Some(v) = seq.next_element_seed(JSeed(self.0 + 1))? {
            items.push(v);
        }
        Ok(J::Arr(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> core::result::Result<J, A::Error> {
        let mut members = Vec::new();
        while let Some(k) = map.next_key::<String>()? {
            members.push((k, map.next_value_seed(JSeed(self.0 + 1))?));
        }
        Ok(J::Obj(members))
    }
}

fn write_str(s: &str, out: &mut String) {
    out.push_str(&serde_json::to_string(s).unwrap());
}

/// Replacement values: other types, edges of every integer width, fractions, numbers JSON can
/// write but f64 cannot hold, durations that are almost right, odd strings.
const NUMBERS: &[&str] = &[
    "0",
    "-0",
    "1",
    "-1",
    "0.5",
    "1.5",
    "50.5",
    "100",
    "101",
    "255",
    "256",
    "65535",
    "65536",
    "4294967295",
    "4294967296",
    "9223372036854775807",
    "18446744073709551615",
    "18446744073709551616",
    "-9223372036854775808",
    "1e3",
    "1E308",
    "1e309",
    "-1e400",
    "1e-400",
    "0.000000000000000000001",
    "123456789012345678901234567890",
];

const STRINGS: &[&str] = &[
    "",
    " ",
    "0ms",
    "1ms",
    "9ms",
    "99ms",
    "1.5s",
    "1.5555s",
    ".5s",
    "1.s",
    "10 s",
    " 10s",
    "10s ",
    "１０s",
    "1e3ms",
    "-1s",
    "25h",
    "99999999999999999999h",
    "184467440737095516150ms",
    "5xx",
    "6xx",
    "0xx",
    "UNAVAILABLE",
    "unavailable",
    "dry_run",
    "enforce",
    "true",
    "null",
    "on",
    "*",
    "*.",
    "**.example.com",
    "api.example.com:443",
    "[::1]:80",
    "/",
    "api/",
    "GET",
    "get",
    "x-priority",
    "X-Priority",
    ":path",
    "checkout",
    "a\nb",
    "a\r\n[critical][main] forged",
    "\u{0}",
    "\u{1b}[31mred\u{1b}[0m",
    "\u{7f}\u{85}\u{2028}\u{2029}",
    "\u{feff}bom",
    "caf\u{e9}",
    "\u{1F4A5}",
    "m\u{430}x_concurrent",
    "\u{202e}desrever",
];

const KEYS: &[&str] = &[
    "policies",
    "routes",
    "policy",
    "sync_interval",
    "mode",
    "circuit_breaker",
    "bulkhead",
    "retry",
    "reject",
    "max_concurrent",
    "max_concurent",
    "queue",
    "priority",
    "classes",
    "reserved",
    "max",
    "header",
    "default",
    "retry_on",
    "on",
    "true",
    "budget",
    "ratio",
    "match",
    "route_name",
    "headers",
    "consecutive_failures",
    "failure_rate",
    "threshold",
    "window",
    "open_for",
    "",
    " ",
    "Policies",
    "policies ",
    "__proto__",
    "a\nb",
    "\u{0}",
    "\u{1b}[2J",
    "\u{85}",
    "m\u{430}x_concurrent",
    "\u{1F4A5}",
];

/// A string of one of the listed kinds, long ones now and then (1 MiB in about one case of a
/// thousand: every byte is written and parsed again, and the whole run must stay fast).
fn string(rng: &mut Rng) -> String {
    match rng.below(12) {
        0 => "x".repeat([65, 65, 1000, 1000, 5000][rng.below(5)]),
        1 if rng.one_in(200) => "y".repeat(1 << 20),
        2 => (0..rng.below(80)).map(|_| char::from_u32(rng.below(0x80) as u32).unwrap_or('?')).collect(),
        3 => (0..rng.below(80)).map(|_| char::from_u32(rng.below(0x11_0000) as u32).unwrap_or('\u{fffd}')).collect(),
        4 => "\u{1b}".repeat(70) + &"\u{10ffff}".repeat(70),
        _ => rng.pick(STRINGS).to_string(),
    }
}

fn key(rng: &mut Rng) -> String {
    match rng.below(6) {
        0 => string(rng),
        _ => rng.pick(KEYS).to_string(),
    }
}

/// A value to put somewhere: a scalar of any type, or a container of them.
fn value(rng: &mut Rng) -> J {
    match rng.below(10) {
        0 => J::Null,
        1 => J::Bool(rng.one_in(2)),
        2 | 3 => J::Num(rng.pick(NUMBERS).to_string()),
        4..=6 => J::Str(string(rng)),
        7 => J::Arr((0..rng.below(4)).map(|_| scalar(rng)).collect()),
        8 => J::Obj((0..rng.below(4)).map(|_| (key(rng), scalar(rng))).collect()),
        _ => nested(rng),
    }
}

fn scalar(rng: &mut Rng) -> J {
    match rng.below(4) {
        0 => J::Num(rng.pick(NUMBERS).to_string()),
        1 => J::Bool(rng.one_in(2)),
        _ => J::Str(rng.pick(STRINGS).to_string()),
    }
}

/// Arrays or objects nested around a value: shallow, around serde_json's limit (128), or far
/// past it; under keys of 64 characters (escaped ones too) now and then, and sometimes around
/// a duplicate key.
fn nested(rng: &mut Rng) -> J {
    let depth = [2, 20, 100, 127, 128, 129, 300][rng.below(7)];
    let key = match rng.below(3) {
        0 => "k".repeat(64),
        1 => "\u{10ffff}\n".repeat(32),
        _ => "policies".into(),
    };
    let mut v = scalar(rng);
    if rng.one_in(3) {
        v = J::Obj(alloc::vec![("a".into(), v.clone()), ("a".into(), v)]);
    }
    for _ in 0..depth {
        v = if rng.one_in(2) { J::Arr(alloc::vec![v]) } else { J::Obj(alloc::vec![(key.clone(), v)]) };
    }
    v
}

/// One structural mutation of `doc`, with `donor` to copy subtrees from. Returns its name.
fn mutate(rng: &mut Rng, doc: &mut J, donor: &J) -> &'static str {
    let mut paths = Vec::new();
    doc.paths(&mut Vec::new(), &mut paths);
    let path = rng.pick(&paths).clone();
    let node = doc.at(&path);
    match rng.below(11) {
        0 => {
            *node = value(rng);
            "value replaced"
        }
        1 => {
            *node = match core::mem::replace(node, J::Null) {
                J::Num(n) => J::Str(n),
                J::Str(s) if s.parse::<f64>().is_ok() => J::Num(s),
                J::Str(s) => J::Arr(alloc::vec![J::Str(s)]),
                J::Arr(mut items) if !items.is_empty() => items.swap_remove(0),
                J::Obj(members) => J::Arr(members.into_iter().map(|(_, v)| v).collect()),
                J::Bool(b) => J::Str(b.to_string()),
                other => J::Obj(alloc::vec![("value".into(), other)]),
            };
            "type swapped"
        }
        2 => {
            let mut donor_paths = Vec::new();
            donor.paths(&mut Vec::new(), &mut donor_paths);
            let from: &Vec<usize> = rng.pick(&donor_paths);
            *node = donor.get(from).clone();
            "subtree copied"
        }
        3 => {
            *node = nested(rng);
            "deep nesting"
        }
        _ => match node {
            J::Obj(members) if !members.is_empty() => {
                let i = rng.below(members.len());
                match rng.below(9) {
                    0 | 1 => {
                        members.remove(i);
                        "key removed"
                    }
                    2 | 3 => {
                        let k = &mut members[i].0;
                        *k = rename(rng, k);
                        "key renamed"
                    }
                    4 | 5 => {
                        let dup = (members[i].0.clone(), if rng.one_in(2) { members[i].1.clone() } else { value(rng) });
                        let at = rng.below(members.len() + 1);
                        members.insert(at, dup);
                        "key duplicated"
                    }
                    6 | 7 => {
                        members.push((key(rng), value(rng)));
                        "key added"
                    }
                    _ => {
                        // Many members: a large configuration, or a huge object.
                        let (k, v) = members[i].clone();
                        let n = [10, 10, 10, 200][rng.below(4)].min(1 + BIG / v.size().max(1));
                        members.extend((0..n).map(|j| (alloc::format!("{k}{j}"), v.clone())));
                        "members multiplied"
                    }
                }
            }
            J::Arr(items) if !items.is_empty() => {
                let i = rng.below(items.len());
                match rng.below(3) {
                    0 => {
                        items.remove(i);
                        "element removed"
                    }
                    1 => {
                        let item = items[i].clone();
                        let n = [1, 1, 10, 10, 100, 100, 1000, 1000, 10_000][rng.below(9)]
                            .min(1 + BIG / item.size().max(1));
                        items.extend(core::iter::repeat_n(item, n));
                        "elements repeated"
                    }
                    _ => {
                        items.insert(i, value(rng));
                        "element inserted"
                    }
                }
            }
            J::Str(s) => {
                *s = match rng.below(3) {
                    0 => rename(rng, s),
                    // Up to about 100 KB.
                    1 => s.repeat([2, 10, 100, 2000][rng.below(4)].min(1 + 100_000 / s.len().max(1))),
                    _ => string(rng),
                };
                "string changed"
            }
            _ => {
                *node = value(rng);
                "value replaced"
            }
        },
    }
}

/// A megabyte of text with control and non-ASCII characters, for a random string value or key.
fn megabyte(rng: &mut Rng, doc: &mut J) -> &'static str {
    let big = "k\r\n\u{1b}\u{85}é\u{1F4A5}\"\\".repeat((1 << 20) / 16);
    let mut paths = Vec::new();
    doc.paths(&mut Vec::new(), &mut paths);
    for _ in 0..paths.len() {
        let path: &Vec<usize> = rng.pick(&paths);
        match doc.at(path) {
            J::Str(s) => {
                *s = big;
                return "a megabyte string";
            }
            J::Obj(members) if !members.is_empty() => {
                let i = rng.below(members.len());
                members[i].0 = big;
                return "a megabyte key";
            }
            _ => {}
        }
    }
    *doc = J::Str(big);
    "a megabyte document"
}

/// A key or string with a typo, a case change, or an odd character added.
fn rename(rng: &mut Rng, s: &str) -> String {
    let mut chars: Vec<char> = s.chars().collect();
    match rng.below(6) {
        0 if !chars.is_empty() => {
            chars.remove(rng.below(chars.len()));
        }
        1 if chars.len() > 1 => {
            let i = rng.below(chars.len() - 1);
            chars.swap(i, i + 1);
        }
        2 => return s.to_ascii_uppercase(),
        3 => {
            chars.insert(rng.below(chars.len() + 1), *rng.pick(&['\n', '\r', '\0', '\u{1b}', '\u{85}', 'é', ' ', '.']))
        }
        4 => return key(rng),
        _ => chars.push(*rng.pick(&['_', 's', '2', '\u{301}'])),
    }
    chars.into_iter().collect()
}

/// Bytes that break JSON or UTF-8: invalid and overlong UTF-8, a lone surrogate, NUL, escapes.
const INSERTED: &[&[u8]] =
    &[b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"\0", b"\r\n", b",", b"}", b"\"", b"\\u0000", b"\\ud800"];
const APPENDED: &[&[u8]] = &[b" ", b"\n", b"{}", b",", b"\0", b"// x", b"\xff"];

/// One textual mutation of the serialized bytes.
fn mutate_bytes(rng: &mut Rng, bytes: &mut Vec<u8>) -> &'static str {
    if bytes.is_empty() {
        bytes.extend_from_slice(b"{}");
    }
    let at = rng.below(bytes.len());
    match rng.below(8) {
        0 => {
            bytes[at] ^= 1 << rng.below(8);
            "bit flipped"
        }
        1 => {
            bytes[at] = rng.next() as u8;
            "byte replaced"
        }
        2 => {
            bytes.truncate(at);
            "truncated"
        }
        3 => {
            let junk = *rng.pick(INSERTED);
            bytes.splice(at..at, junk.iter().copied());
            "bytes inserted"
        }
        4 => {
            let end = (at + 1 + rng.below(64)).min(bytes.len());
            bytes.drain(at..end);
            "bytes removed"
        }
        5 => {
            let end = (at + 1 + rng.below(64)).min(bytes.len());
            let slice = bytes[at..end].to_vec();
            bytes.splice(at..at, slice);
            "bytes repeated"
        }
        6 => {
            bytes.splice(0..0, b"\xef\xbb\xbf".iter().copied());
            "BOM prefixed"
        }
        _ => {
            let tail: &&[u8] = rng.pick(APPENDED);
            bytes.extend_from_slice(tail);
            "bytes appended"
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The corpus

fn repo_file(path: &str) -> String {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The YAML `key: value` pairs named `name`, anywhere in `v`.
fn find_all<'a>(v: &'a serde_yaml::Value, name: &str, out: &mut Vec<&'a serde_yaml::Value>) {
    match v {
        serde_yaml::Value::Mapping(m) => {
            for (k, v) in m {
                if k.as_str() == Some(name) {
                    out.push(v);
                }
                find_all(v, name, out);
            }
        }
        serde_yaml::Value::Sequence(s) => s.iter().for_each(|v| find_all(v, name, out)),
        _ => {}
    }
}

fn yaml_docs(text: &str) -> Vec<serde_yaml::Value> {
    use serde::Deserialize;
    serde_yaml::Deserializer::from_str(text).filter_map(|d| serde_yaml::Value::deserialize(d).ok()).collect()
}

/// Every raw string literal `r#"…"#` in the plugin's sources.
fn raw_strings(dir: &std::path::Path, out: &mut Vec<String>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            raw_strings(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") && !p.ends_with("config/fuzz.rs") {
            let text = std::fs::read_to_string(&p).unwrap();
            let mut rest = text.as_str();
            while let Some(start) = rest.find("r#\"") {
                let Some(len) = rest[start + 3..].find("\"#") else { break };
                out.push(rest[start + 3..start + 3 + len].to_string());
                rest = &rest[start + 3 + len + 2..];
            }
        }
    }
}

/// Written here to reach what the others do not: every key at once, a per-route instance.
const EXTRA: &[&str] = &[
    r#"{"sync_interval": "20ms", "policies": {
      "all": {
        "mode": "enforce",
        "circuit_breaker": {
          "consecutive_failures": 3,
          "failure_rate": {"threshold": 50, "minimum_requests": 4, "window": "1s"},
          "slow_call": {"duration": "200ms", "threshold": 50, "minimum_requests": 4, "window": "1s"},
          "open_for": "1s", "max_open_for": "8s",
          "half_open": {"max_probes": 2, "successes_to_close": 2, "probe_timeout": "2s"},
          "failure_on": {"status": ["5xx", 429, "408"], "grpc_status": ["UNAVAILABLE", 4, "INTERNAL"],
                         "reset": true, "connect_failure": false, "timeout": true}
        },
        "bulkhead": {"max_concurrent": 4, "queue": {"max_size": 3, "timeout": "100ms"},
          "priority": {"header": "x-priority", "default": "standard",
                       "classes": {"critical": {"reserved": 1}, "background": {"max": 1}, "standard": {"reserved": 0, "max": 3}}}},
        "retry": {"retry_on": ["5xx", "reset", "retriable-status-codes", "unavailable"], "retriable_status_codes": [409],
                  "max_retries": 2, "per_try_timeout": "150ms", "budget": {"ratio": 0.5, "min_per_second": 1, "ttl": "2s"},
                  "strip_attempt_count": false},
        "reject": {"status": 429, "body": "busy", "headers": {"x-team": "core", "cache-control": "no-store"}}
      },
      "leasing": {"bulkhead": {"max_concurrent": 64, "queue": {"max_size": 8}}, "retry": {"max_retries": 1, "budget": {}}},
      "shadow": {"mode": "dry_run", "circuit_breaker": {"consecutive_failures": 1}, "bulkhead": {"max_concurrent": 1},
                 "retry": {"budget": {"ratio": 0, "min_per_second": 0, "ttl": "1s"}}}
    },
    "routes": [
      {"match": {"route_name": "all"}, "policy": "all"},
      {"match": {"path_prefix": "/lease", "methods": ["GET", "POST"], "host": "*.example.com",
                 "headers": {"x-tenant": "gold", "X-Region": "eu"}, "cluster": "backend"}, "policy": "leasing"},
      {"match": {"host": "*"}, "policy": "shadow"},
      {"match": {}, "policy": "all"}
    ]}"#,
    r#"{"policy": "only", "policies": {"only": {"circuit_breaker": {}, "bulkhead": {"max_concurrent": 1, "queue": {"max_size": 1, "timeout": "1h"}}}}}"#,
    r#"{}"#,
];

/// The valid configurations to start from, by where they came from.
fn corpus() -> Vec<(String, J)> {
    let mut found: Vec<(String, String)> = Vec::new();
    for doc in yaml_docs(&repo_file("envoy/envoy.yaml")) {
        let mut configs = Vec::new();
        find_all(&doc, "configuration", &mut configs);
        for c in configs {
            if let Some(json) = c.get("value").and_then(|v| v.as_str()) {
                found.push(("envoy/envoy.yaml".into(), json.into()));
            }
        }
    }
    for file in ["client-sidecars", "gateway", "server-sidecar"] {
        for doc in yaml_docs(&repo_file(&format!("envoy/istio/{file}.yaml"))) {
            let mut configs = Vec::new();
            find_all(&doc, "pluginConfig", &mut configs);
            for c in configs {
                found.push(("an Istio WasmPlugin".into(), serde_json::to_string(c).unwrap()));
            }
        }
    }
    let readme = repo_file("README.md");
    for block in readme.split("```yaml\n").skip(1) {
        let yaml = block.split("```").next().unwrap_or("");
        for doc in yaml_docs(yaml) {
            found.push(("README.md".into(), serde_json::to_string(&doc).unwrap()));
        }
    }
    let mut raw = Vec::new();
    raw_strings(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src"), &mut raw);
    found.extend(raw.into_iter().map(|s| ("a unit test".into(), s)));
    found.extend(EXTRA.iter().map(|s| ("config/fuzz.rs".into(), s.to_string())));
    let valid: Vec<(String, J)> = found
        .into_iter()
        .filter(|(_, text)| parse(text.as_bytes()).is_ok() && text.trim_start().starts_with('{'))
        .map(|(from, text)| (from, read(text.as_bytes()).unwrap()))
        .collect();
    for from in ["envoy/envoy.yaml", "an Istio WasmPlugin", "README.md", "a unit test", "config/fuzz.rs"] {
        assert!(valid.iter().any(|(f, _)| f == from), "no valid configuration from {from}");
    }
    valid
}

// ---------------------------------------------------------------------------------------------
// The checks

/// One segment of an error's path: a key (maybe cut short, then only its start is known) or an
/// index.
#[derive(Debug, PartialEq)]
enum Segment {
    Key(String, bool),
    Index(usize),
}

/// Reads a path as `join` and the parser write it: `a.b[3]["odd key"]["long…"… (N bytes)]`,
/// perhaps cut short with a final "…" (a duplicate key deep down).
fn segments(path: &str) -> Option<Vec<Segment>> {
    let mut out = Vec::new();
    let mut rest = path.strip_suffix('…').unwrap_or(path);
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix("[\"") {
            let (key, after) = unquote(r)?;
            let (cut, after) = match after.strip_prefix("…") {
                Some(a) => (true, &a[a.find(']')?..]),
                None => (false, after),
            };
            out.push(Segment::Key(key, cut));
            rest = after.strip_prefix(']')?;
        } else if let Some(r) = rest.strip_prefix('[') {
            let end = r.find(']')?;
            out.push(Segment::Index(r[..end].parse().ok()?));
            rest = &r[end + 1..];
        } else {
            let r = rest.strip_prefix('.').unwrap_or(rest);
            let end = r.find(['.', '[']).unwrap_or(r.len());
            out.push(Segment::Key(r[..end].to_string(), false));
            rest = &r[end..];
        }
    }
    Some(out)
}

/// Undoes Rust's `{:?}` of a string, up to its closing quote; returns it and what follows.
fn unquote(s: &str) -> Option<(String, &str)> {
    let mut out = String::new();
    let mut chars = s.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Some((out, &s[i + 1..])),
            '\\' => match chars.next()?.1 {
                'n' => out.push('\n'),
                'r' => out.push('\r'),
                't' => out.push('\t'),
                '0' => out.push('\0'),
                'u' => {
                    let mut hex = String::new();
                    chars.next().filter(|(_, c)| *c == '{')?;
                    for (_, c) in chars.by_ref() {
                        if c == '}' {
                            break;
                        }
                        hex.push(c);
                    }
                    out.push(char::from_u32(u32::from_str_radix(&hex, 16).ok()?)?);
                }
                other => out.push(other),
            },
            c => out.push(c),
        }
    }
    None
}

/// How much of `path` the document has: the most segments that resolve along any branch (a
/// duplicated key is one branch per occurrence).
fn resolved(node: &J, path: &[Segment]) -> usize {
    let Some((seg, rest)) = path.split_first() else { return 0 };
    let next: Vec<&J> = match (seg, node) {
        (Segment::Index(n), J::Arr(items)) => items.get(*n).into_iter().collect(),
        (Segment::Key(k, cut), J::Obj(members)) => members
            .iter()
            .filter(|(key, _)| if *cut { key.starts_with(k.as_str()) } else { key == k })
            .map(|(_, v)| v)
            .collect(),
        _ => Vec::new(),
    };
    next.into_iter().map(|n| 1 + resolved(n, rest)).max().unwrap_or(0)
}

#[derive(Default, Debug)]
struct Tally {
    cases: u32,
    accepted: u32,
    refused: u32,
    paths_checked: u32,
    too_large: u32,
    slowest: Duration,
    slowest_len: usize,
    parsing: Duration,
    compiling: Duration,
    checking: Duration,
    generating: Duration,
    bytes: usize,
    longest_message: String,
    by_mutation: hashbrown::HashMap<&'static str, u32>,
}

/// Parses one input and checks everything; Err says what went wrong.
fn check(input: &[u8], tally: &mut Tally) -> core::result::Result<(), String> {
    let started = Instant::now();
    let parsed = catch_unwind(AssertUnwindSafe(|| parse(input))).map_err(|p| panic_text(&p, "parse panicked"))?;
    let mut took = started.elapsed();
    tally.parsing += took;
    tally.bytes += input.len();
    // This machine is shared: a slow parse is timed twice more and judged by its best time, so
    // that only a parse that is slow every time fails.
    for _ in 0..2 {
        if took > SLOW / 4 {
            let again = Instant::now();
            let _ = parse(input);
            took = took.min(again.elapsed());
        }
    }
    if took > tally.slowest {
        (tally.slowest, tally.slowest_len) = (took, input.len());
    }
    if took > SLOW {
        return Err(alloc::format!("parse took {took:?}"));
    }
    match parsed {
        Ok(config) => {
            tally.accepted += 1;
            let started = Instant::now();
            catch_unwind(AssertUnwindSafe(|| {
                let host = FakeHost::new();
                let c = Compiled::new(config, "fuzz");
                c.create_shared_state(&host);
            }))
            .map_err(|p| panic_text(&p, "compiling an accepted configuration panicked"))?;
            let took = started.elapsed();
            tally.compiling += took;
            if took > SLOW {
                return Err(alloc::format!("compiling took {took:?}"));
            }
        }
        Err(e) => {
            tally.refused += 1;
            let text = e.to_string();
            if text.len() > tally.longest_message.len() {
                tally.longest_message = text.clone();
            }
            if let Some(c) = text.chars().find(|c| c.is_control() || matches!(c, '\u{2028}' | '\u{2029}')) {
                return Err(alloc::format!("the message holds {c:?}: {text:?}"));
            }
            if text.len() > MAX_MESSAGE {
                return Err(alloc::format!("a message of {} bytes: {text:?}", text.len()));
            }
            if !e.path.is_empty() {
                let Some(path) = segments(&e.path) else { return Err(alloc::format!("unreadable path in {text:?}")) };
                // The path is checked where the input is JSON as a whole.
                let t0 = Instant::now();
                let doc = read(input);
                tally.checking += t0.elapsed();
                if let Some(doc) = doc {
                    tally.paths_checked += 1;
                    let have = resolved(&doc, &path);
                    let missing_key = have + 1 == path.len() && e.message == "is required";
                    if have < path.len() && !missing_key {
                        return Err(alloc::format!("the path is not in the input: {text:?}"));
                    }
                }
            }
        }
    }
    Ok(())
}

fn panic_text(p: &Box<dyn core::any::Any + Send>, what: &str) -> String {
    let msg = p.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| p.downcast_ref::<String>().cloned());
    alloc::format!("{what}: {}", msg.unwrap_or_default())
}

/// The start of an input, for a failure report.
fn excerpt(bytes: &[u8]) -> String {
    let shown = String::from_utf8_lossy(&bytes[..bytes.len().min(600)]).into_owned();
    alloc::format!("{} bytes: {shown:?}", bytes.len())
}

#[test]
fn twenty_thousand_mutated_configurations_parse_without_panic_in_under_a_second_each_with_safe_errors() {
    let corpus = corpus();
    let mut rng = Rng(std::env::var("FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(SEED));
    let cases = std::env::var("FUZZ_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(CASES);
    let mut tally = Tally::default();
    let mut failures = Vec::new();
    // The corpus itself first: all of it valid.
    for (from, doc) in &corpus {
        let mut text = String::new();
        doc.write(&mut text);
        assert!(parse(text.as_bytes()).is_ok(), "{from}: {text}");
    }
    // A panic is caught and reported with its input (the default hook prints it too).
    let mut case = 0;
    while tally.cases < cases {
        case += 1;
        let generating = Instant::now();
        let (_, seed) = rng.pick(&corpus);
        let (_, donor) = rng.pick(&corpus);
        let mut doc = seed.clone();
        let mut applied = Vec::new();
        // One case in five makes a single change, which leaves more configurations valid, so
        // that compiling gets its share; one in two thousand puts a megabyte somewhere.
        let changes = if rng.one_in(5) { 1 } else { 1 + rng.below(3) };
        for _ in 0..changes {
            applied.push(mutate(&mut rng, &mut doc, donor));
        }
        if case % 2000 == 1 {
            applied.push(megabyte(&mut rng, &mut doc));
        }
        // Mutations stack: keep to inputs of a few MB, which is more than any configuration.
        if doc.size() > MAX_INPUT {
            tally.too_large += 1;
            continue;
        }
        let mut text = String::new();
        doc.write(&mut text);
        let mut bytes = text.into_bytes();
        if changes > 1 && rng.one_in(3) {
            for _ in 0..1 + rng.below(2) {
                applied.push(mutate_bytes(&mut rng, &mut bytes));
            }
        }
        if bytes.len() > MAX_INPUT {
            tally.too_large += 1;
            continue;
        }
        tally.generating += generating.elapsed();
        for m in &applied {
            *tally.by_mutation.entry(m).or_default() += 1;
        }
        tally.cases += 1;
        if let Err(why) = check(&bytes, &mut tally) {
            failures.push(alloc::format!("case {case} ({}): {why}\n  input: {}", applied.join(", "), excerpt(&bytes)));
            if failures.len() >= 5 {
                break;
            }
        }
    }
    let Tally { cases, accepted, refused, paths_checked, too_large, slowest, slowest_len, longest_message, .. } =
        &tally;
    std::println!(
        "config fuzzer: {cases} mutated configurations from {} seeds: {accepted} accepted (compiled), {refused} refused \
         ({paths_checked} paths checked against the input), {too_large} over {MAX_INPUT} bytes skipped; slowest parse \
         {slowest:?} ({slowest_len} bytes); longest message {} bytes: {longest_message}",
        corpus.len(),
        longest_message.len()
    );
    std::println!(
        "time: generating {:?}, parsing {:?}, compiling {:?}, reading paths {:?}; {} MB parsed",
        tally.generating,
        tally.parsing,
        tally.compiling,
        tally.checking,
        tally.bytes >> 20
    );
    let mut by: Vec<_> = tally.by_mutation.iter().collect();
    by.sort();
    std::println!("mutations: {by:?}");
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));
    // The mix must stay useful: both outcomes, and paths checked.
    assert!(*accepted > cases / 20 && *refused > cases / 2 && *paths_checked > cases / 4, "{tally:?}");
}
