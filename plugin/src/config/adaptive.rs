//! The adaptive parts of a policy's configuration: `timeout.adaptive`, `bulkhead.adaptive`, and
//! a priority class's shedding (`shed_at`). Same rules as the rest of the
//! parser: every error names its JSON path and what was expected.

use super::{bounded, duration_in, expected, join, ConfigError, Obj, Result, HOUR, MS, SECOND};
use alloc::string::String;
use breakwater_policies::{AdaptiveConfig, ClassLimit, TimeoutRule};
use serde_json::Value;

/// What a numeric field holds, and its range.
#[derive(Clone, Copy)]
enum Kind {
    /// A duration, ns.
    Duration(u64, u64),
    Count(u32, u32),
    /// A number in thousandths (`1.5` → 1500, rounded), and what to say when it is not one.
    Milli(u32, u32, &'static str),
}

/// Reads the fields `spec` names, in order (absent: None). One loop for every field keeps the
/// Wasm small: each field read inline cost ~250 bytes.
fn read<const N: usize>(o: &Obj, spec: &[(&str, Kind); N]) -> Result<[Option<u64>; N]> {
    let mut out = [None; N];
    fields(o, spec, &mut out)?;
    Ok(out)
}

#[inline(never)]
fn fields(o: &Obj, spec: &[(&str, Kind)], out: &mut [Option<u64>]) -> Result<()> {
    for (slot, (key, kind)) in out.iter_mut().zip(spec) {
        // Both sections that have a `max` require it.
        if *key == "max" {
            o.req(key)?;
        }
        *slot = field(o, key, *kind)?;
    }
    Ok(())
}

#[inline(never)]
fn field(o: &Obj, key: &str, kind: Kind) -> Result<Option<u64>> {
    let Some((v, p)) = o.get(key) else { return Ok(None) };
    Ok(Some(match kind {
        Kind::Duration(min, max) => duration_in(v, &p, min, max)?,
        Kind::Count(min, max) => bounded(v, &p, min, max)?.into(),
        Kind::Milli(min, max, what) => match v.as_f64().map(|x| x * 1000.0) {
            Some(x) if x >= f64::from(min) - 1e-6 && x <= f64::from(max) + 1e-6 => (x + 0.5) as u64,
            _ => return Err(expected(&p, what, v)),
        },
    }))
}

/// `timeout: { adaptive: { … } }`.
#[inline(never)]
pub(super) fn timeout(v: &Value, path: &str) -> Result<TimeoutRule> {
    let o = Obj::new(v, path, &["adaptive"])?;
    let (v, path) = o.req("adaptive")?;
    let a = Obj::new(v, &path, &["percentile", "multiplier", "margin", "min", "max", "minimum_requests", "window"])?;
    // Envoy takes the header over the route's own timeout, longer or shorter: only `max` keeps
    // the adaptive timeout within the route's, so it must be said (`read` requires it).
    let [percentile, multiplier, margin, min, max, minimum, window] = read(
        &a,
        &[
            ("percentile", Kind::Milli(100, 100_000, "a percentile from 0.1 to 100 such as 99 or 99.9")),
            ("multiplier", Kind::Milli(1000, 10_000, "a multiplier from 1 to 10 such as 1.5")),
            ("margin", Kind::Duration(0, HOUR)),
            ("min", Kind::Duration(MS, HOUR)),
            ("max", Kind::Duration(MS, HOUR)),
            ("minimum_requests", Kind::Count(1, 1_000_000)),
            ("window", Kind::Duration(SECOND, HOUR)),
        ],
    )?;
    let d = TimeoutRule::default();
    let r = TimeoutRule {
        // Tenths of a percent: p99.9 is 999.
        percentile_tenths: percentile.map_or(d.percentile_tenths, |m| m.div_ceil(100) as u32),
        multiplier_milli: multiplier.map_or(d.multiplier_milli, |m| m as u32),
        margin_ms: margin.map_or(d.margin_ms, |ns| ns / MS),
        min_ms: min.map_or(d.min_ms, |ns| ns / MS),
        max_ms: max.map_or(d.max_ms, |ns| ns / MS),
        minimum_requests: minimum.map_or(d.minimum_requests, |n| n as u32),
        window_ns: window.unwrap_or(d.window_ns),
    };
    if r.max_ms < r.min_ms {
        return Err(refuse(join(&path, "max"), "must be at least min (100ms unless set)"));
    }
    Ok(r)
}

/// A bulkhead's `adaptive: { min, max, tolerance }`, if it has one (then without
/// `max_concurrent`). The limit starts at `min` (so the baseline latency is measured
/// uncongested) and is judged once a second.
pub(super) fn limit(bulkhead: &Obj) -> Result<Option<AdaptiveConfig>> {
    let Some((v, path)) = bulkhead.get("adaptive") else { return Ok(None) };
    if bulkhead.get("max_concurrent").is_some() {
        return Err(refuse(path, "replaces max_concurrent: set one of them"));
    }
    let o = Obj::new(v, &path, &["min", "max", "tolerance"])?;
    let [max, min, tolerance] = read(
        &o,
        &[
            ("max", Kind::Count(1, 1_000_000)),
            ("min", Kind::Count(1, 1_000_000)),
            ("tolerance", Kind::Milli(1000, 10_000, "a latency ratio from 1 to 10 such as 1.5")),
        ],
    )?;
    let d = AdaptiveConfig::default();
    let (min, max) = (min.map_or(d.min, |n| n as u32), max.unwrap_or(1) as u32);
    if min > max {
        return Err(refuse(join(&path, "min"), "must be at most max"));
    }
    let tolerance_milli = tolerance.map_or(d.tolerance_milli, |m| m as u32);
    Ok(Some(AdaptiveConfig { min, max, initial: min, tolerance_milli, ..d }))
}

/// A refusal (not generic, unlike `err`: one copy of the code).
fn refuse(path: String, message: &str) -> ConfigError {
    ConfigError { path, message: message.into() }
}

/// A priority class's `shed_at`, into `limit`.
pub(super) fn shed(o: &Obj, limit: &mut ClassLimit) -> Result<()> {
    let what = "a fraction of the limit above 0, at most 1, such as 0.8";
    limit.shed_at_milli = field(o, "shed_at", Kind::Milli(1, 1000, what))?.map(|m| m as u32);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::parse;
    use alloc::string::ToString;
    use breakwater_policies::SECOND;

    #[test]
    fn the_documented_examples_parse_to_what_they_say() {
        let c = parse(
            br#"{"policies": {"api": {
              "timeout": {"adaptive": {"percentile": 95, "multiplier": 1.5, "margin": "50ms", "min": "100ms", "max": "5s", "minimum_requests": 50}},
              "bulkhead": {"adaptive": {"min": 5, "max": 200, "tolerance": 2},
                           "priority": {"header": "x-priority", "default": "standard", "classes": {
                             "critical": {"reserved": 2}, "standard": {"shed_at": 0.9}, "background": {"shed_at": 0.5}}}}}}}"#,
        )
        .unwrap();
        let p = &c.policies[0];
        let t = p.timeout.unwrap();
        assert_eq!((t.percentile_tenths, t.multiplier_milli, t.margin_ms), (950, 1500, 50));
        assert_eq!((t.min_ms, t.max_ms, t.minimum_requests, t.window_ns), (100, 5000, 50, 30 * SECOND));
        let b = p.bulkhead.as_ref().unwrap();
        let a = b.machine.adaptive.unwrap();
        assert_eq!(
            (a.min, a.max, a.initial, a.tolerance_milli, a.window_ns),
            (5, 200, 5, 2000, SECOND),
            "starts at min"
        );
        assert_eq!(b.machine.max_concurrent, 200, "the adaptive max bounds the classes");
        let pr = b.priority.as_ref().unwrap();
        let class = |name: &str| b.machine.classes[pr.classes.iter().position(|c| c == name).unwrap()];
        assert_eq!((class("standard").shed_at_milli, class("background").shed_at_milli), (Some(900), Some(500)));
        assert_eq!(class("critical").shed_at_milli, None);
        let t = parse(br#"{"policies": {"a": {"timeout": {"adaptive": {"percentile": 99.9, "max": "2s"}}}}}"#).unwrap();
        assert_eq!(t.policies[0].timeout.unwrap().percentile_tenths, 999);
        // Tenths of a percent; a finer percentile is read as the next tenth up (as documented).
        for (given, tenths) in [("95", 950), ("99.9", 999), ("99.91", 1000), ("99.95", 1000), ("0.1", 1), ("0.15", 2)] {
            let t = parse(
                format!(
                    r#"{{"policies": {{"a": {{"timeout": {{"adaptive": {{"percentile": {given}, "max": "2s"}}}}}}}}}}"#
                )
                .as_bytes(),
            );
            assert_eq!(t.unwrap().policies[0].timeout.unwrap().percentile_tenths, tenths, "{given}");
        }
        // A margin of zero is the default, and may be said.
        for zero in ["0ms", "0s", "0.4ms"] {
            let t = parse(
                format!(
                    r#"{{"policies": {{"a": {{"timeout": {{"adaptive": {{"margin": "{zero}", "max": "2s"}}}}}}}}}}"#
                )
                .as_bytes(),
            );
            assert_eq!(t.unwrap().policies[0].timeout.unwrap().margin_ms, 0, "{zero}");
        }
    }

    #[test]
    fn bad_adaptive_configurations_are_refused_with_their_path() {
        let cases: &[(&str, &str)] = &[
            (r#"{"policies": {"p": {"timeout": {"fixed": "1s"}}}}"#, "policies.p.timeout.fixed: unknown key (expected one of: adaptive)"),
            (r#"{"policies": {"p": {"timeout": {}}}}"#, "policies.p.timeout.adaptive: is required"),
            (r#"{"policies": {"p": {"timeout": {"adaptive": {"min": "1s"}}}}}"#, "policies.p.timeout.adaptive.max: is required"),
            (r#"{"policies": {"p": {"timeout": {"adaptive": {"max": "1s", "percentile": 0}}}}}"#,
             "policies.p.timeout.adaptive.percentile: expected a percentile from 0.1 to 100 such as 99 or 99.9, got 0"),
            (r#"{"policies": {"p": {"timeout": {"adaptive": {"max": "1s", "percentile": "p95"}}}}}"#,
             "policies.p.timeout.adaptive.percentile: expected a percentile"),
            (r#"{"policies": {"p": {"timeout": {"adaptive": {"max": "1s", "multiplier": 0.5}}}}}"#,
             "policies.p.timeout.adaptive.multiplier: expected a multiplier from 1 to 10 such as 1.5, got 0.5"),
            (r#"{"policies": {"p": {"timeout": {"adaptive": {"max": "50ms"}}}}}"#,
             "policies.p.timeout.adaptive.max: must be at least min (100ms unless set)"),
            (r#"{"policies": {"p": {"timeout": {"adaptive": {"max": "1s", "window": "500ms"}}}}}"#,
             "policies.p.timeout.adaptive.window: must be from 1s to 1h, got \"500ms\""),
            (r#"{"policies": {"p": {"timeout": {"adaptive": {"max": "1s", "margin": "-5ms"}}}}}"#,
             "policies.p.timeout.adaptive.margin: expected a duration such as \"0ms\", \"250ms\" or \"10s\", got \"-5ms\""),
            (r#"{"policies": {"p": {"timeout": {"adaptive": {"max": "0ms"}}}}}"#,
             "policies.p.timeout.adaptive.max: expected a duration greater than zero"),
            (r#"{"policies": {"p": {"timeout": {"adaptive": {"max": "2h"}}}}}"#, "policies.p.timeout.adaptive.max: must be from 1ms to 1h"),
            (r#"{"policies": {"p": {"timeout": {"adaptive": {"max": "1s", "minimum_requests": 0}}}}}"#,
             "policies.p.timeout.adaptive.minimum_requests: expected a whole number from 1 to 1000000, got 0"),
            (r#"{"policies": {"p": {"bulkhead": {"max_concurrent": 5, "adaptive": {"max": 5}}}}}"#,
             "policies.p.bulkhead.adaptive: replaces max_concurrent: set one of them"),
            (r#"{"policies": {"p": {"bulkhead": {"adaptive": {"min": 2}}}}}"#, "policies.p.bulkhead.adaptive.max: is required"),
            (r#"{"policies": {"p": {"bulkhead": {"adaptive": {"min": 20, "max": 10}}}}}"#,
             "policies.p.bulkhead.adaptive.min: must be at most max"),
            (r#"{"policies": {"p": {"bulkhead": {"adaptive": {"min": 0, "max": 10}}}}}"#,
             "policies.p.bulkhead.adaptive.min: expected a whole number from 1 to 1000000, got 0"),
            (r#"{"policies": {"p": {"bulkhead": {"adaptive": {"max": 10, "tolerance": 0.9}}}}}"#,
             "policies.p.bulkhead.adaptive.tolerance: expected a latency ratio from 1 to 10 such as 1.5, got 0.9"),
            (r#"{"policies": {"p": {"bulkhead": {"adaptive": {"max": 10, "initial": 3}}}}}"#,
             "policies.p.bulkhead.adaptive.initial: unknown key (expected one of: min, max, tolerance)"),
            (r#"{"policies": {"p": {"bulkhead": {"adaptive": {"min": 3, "max": 50}, "priority": {"header": "x-p", "default": "s", "classes": {"c": {"reserved": 4}}}}}}}"#,
             "policies.p.bulkhead.priority.classes.c.reserved: expected a whole number from 0 to 3, got 4"),
            (r#"{"policies": {"p": {"bulkhead": {"adaptive": {"min": 3, "max": 50}, "priority": {"header": "x-p", "default": "s", "classes": {"c": {"reserved": 2}, "d": {"reserved": 2}}}}}}}"#,
             "policies.p.bulkhead.priority.classes: reserved capacity (4) exceeds adaptive.min (3)"),
            (r#"{"policies": {"p": {"bulkhead": {"max_concurrent": 5, "priority": {"header": "x-p", "default": "s", "classes": {"c": {"shed_at": 1.5}}}}}}}"#,
             "policies.p.bulkhead.priority.classes.c.shed_at: expected a fraction of the limit above 0, at most 1, such as 0.8, got 1.5"),
            (r#"{"policies": {"p": {"bulkhead": {"max_concurrent": 5, "priority": {"header": "x-p", "default": "s", "classes": {"c": {"shed_at": "80%"}}}}}}}"#,
             "policies.p.bulkhead.priority.classes.c.shed_at: expected a fraction of the limit"),
            (r#"{"policies": {"p": {"bulkhead": {"max_concurrent": 5, "priority": {"header": "x-p", "default": "s", "classes": {"c": {"shed_wait": "1s"}}}}}}}"#,
             "policies.p.bulkhead.priority.classes.c.shed_wait: unknown key: did you mean shed_at?"),
        ];
        for (config, message) in cases {
            let got = parse(config.as_bytes()).unwrap_err().to_string();
            assert!(got.starts_with(message), "config {config}\n  expected: {message}\n  got:      {got}");
        }
    }
}
