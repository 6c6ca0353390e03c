//! `breakwater simulate` against what the plugin did live: a real Envoy writes the access log
//! of `breakwater access-log-format` while a breaker trips, refuses, fails a probe, re-opens and
//! closes; the built CLI replays that log with the same configuration, and its transitions and
//! refusals must be the live ones.
//!
//! The CLI is `$BREAKWATER_CLI`, else `<repo>/target/debug/breakwater` (`cargo build -p breakwater-cli`).

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use integration::envoy::{repo_root, Envoy, Spec, CLOSED};
use integration::start_upstream;
use serde_json::{json, Value};

/// A trip made when a request ends is logged by the plugin within a millisecond of it; the
/// access log's times are whole milliseconds (duration) and the replay ends a request when its
/// logged duration says. This much apart is the same moment.
const SAME_MOMENT_MS: i64 = 20;
/// Live, an open breaker turns half-open on the next tick (`sync_interval`, 50 ms) or with the
/// next request, whichever comes first; the replay turns it exactly when the period ends.
const TICK_MS: i64 = 50 + SAME_MOMENT_MS;

fn cli() -> PathBuf {
    let p =
        std::env::var_os("BREAKWATER_CLI").map_or_else(|| repo_root().join("target/debug/breakwater"), PathBuf::from);
    assert!(
        p.is_file(),
        "the breakwater CLI is not at {}: run `cargo build -p breakwater-cli` or set BREAKWATER_CLI",
        p.display()
    );
    p
}

fn run(args: &[&str]) -> String {
    let out = Command::new(cli()).args(args).output().expect("run the breakwater CLI");
    assert!(out.status.success(), "breakwater {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("UTF-8")
}

/// Days since 1970-01-01 of a civil date (Howard Hinnant's algorithm).
fn days(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Milliseconds since the epoch of `2026-12-01 01:31:44.870` (Envoy's log, UTC) or of
/// `2026-12-01T01:31:44.870123Z` (the report's).
fn epoch_ms(stamp: &str) -> i64 {
    let n: Vec<i64> =
        stamp.split(|c: char| !c.is_ascii_digit()).filter(|s| !s.is_empty()).map(|s| s.parse().unwrap()).collect();
    let frac = stamp.rsplit('.').next().unwrap().trim_end_matches('Z');
    let ms = frac.get(..3).unwrap().parse::<i64>().unwrap();
    ((days(n[0], n[1], n[2]) * 24 + n[3]) * 60 + n[4]) * 60_000 + n[5] * 1000 + ms
}

/// The plugin's transition log lines for policy `p`: (ms since the epoch, state, why).
fn live_transitions(log: &str) -> Vec<(i64, String, String)> {
    log.lines()
        .filter_map(|l| {
            let (_, rest) = l.split_once("policy p: circuit ")?;
            let (state, why) = rest.split_once(": ")?;
            let stamp = l.strip_prefix('[')?.split(']').next()?;
            Some((epoch_ms(stamp), state.replace('-', "_"), why.to_owned()))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_simulated_trips_are_the_ones_the_plugin_made_live() {
    let dir = tempfile_dir();
    let log = dir.join("access.log");
    let format: Value =
        serde_json::from_str(&run(&["access-log-format", "--output", "json", "--path", log.to_str().unwrap()]))
            .unwrap();
    let policies =
        json!({ "p": { "circuit_breaker": { "consecutive_failures": 3, "open_for": "1s", "max_open_for": "10s" } } });
    let up = start_upstream().await;
    let spec = Spec::one_route_per_policy(up.addr(), policies.clone()).access_log(format["access_log"][0].clone());
    let config = json!({ "policies": policies, "routes": [ { "match": { "route_name": "p" }, "policy": "p" } ] });
    let envoy = Envoy::start(&spec).await;
    let mut sent = 0;

    // Closed: successes, then three failures trip it.
    envoy.send_recorded("p", "/p?status=200", 4).await;
    envoy.send_recorded("p", "/p?status=500", 3).await;
    sent += 7;
    let s = envoy.wait_tripped("p", 1).await;
    assert_eq!(s.to_open, 1, "{s:?}");
    let tripped = Instant::now();
    // Open: refused without reaching the upstream.
    for _ in 0..3 {
        assert!(envoy.get("/p?status=200").await.is_circuit_open());
        sent += 1;
    }
    // Half-open: the probe fails, and the breaker re-opens for 2s ±10%.
    tokio::time::sleep_until((tripped + Duration::from_millis(1200)).into()).await;
    let r = envoy.get("/p/probe?status=500").await;
    assert_eq!((r.status, r.from_upstream()), (500, true), "{r:?}");
    sent += 1;
    let s = envoy.wait_policy("p", |s| s.to_open == 2).await;
    assert_eq!(s.to_open, 2, "{s:?}");
    let reopened = Instant::now();
    for _ in 0..2 {
        assert!(envoy.get("/p?status=200").await.is_circuit_open());
        sent += 1;
    }
    // After the doubled period: the probe succeeds and closes it; traffic flows.
    tokio::time::sleep_until((reopened + Duration::from_millis(2400)).into()).await;
    envoy.send_recorded("p", "/p/probe?status=200", 1).await;
    envoy.send_recorded("p", "/p?status=200", 2).await;
    sent += 3;
    let live = envoy.wait_policy("p", |s| s.to_closed == 1 && s.state == CLOSED).await;
    assert_eq!((live.to_open, live.to_half_open, live.to_closed, live.rejections), (2, 2, 1, 5), "{live:?}");

    // Every request is in the access log (Envoy writes it when the stream ends, flushed often).
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::fs::read_to_string(&log).unwrap_or_default().lines().count() < sent && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(text.lines().count(), sent, "{text}");
    let config_file = dir.join("config.json");
    std::fs::write(&config_file, config.to_string()).unwrap();
    let report: Value = serde_json::from_str(&run(&[
        "simulate",
        "--config",
        config_file.to_str().unwrap(),
        "--access-log",
        log.to_str().unwrap(),
        "--output",
        "json",
    ]))
    .unwrap();
    let p = &report["policies"][0];
    let live_log = live_transitions(&envoy.log());
    let simulated: Vec<(i64, String, String)> = p["breaker"]["transitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                epoch_ms(t["at"].as_str().unwrap()),
                t["to"].as_str().unwrap().to_owned(),
                t["detail"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let mut lines = String::new();
    for ((lt, ls, lw), (st, ss, sw)) in live_log.iter().zip(&simulated) {
        lines.push_str(&format!("live {ls:<9} {lw:<45} | simulated {ss:<9} {sw:<45} | {:+} ms\n", st - lt));
    }
    eprintln!("{lines}");
    assert_eq!(live_log.len(), 5, "live: {live_log:?}");
    assert_eq!(simulated.len(), live_log.len(), "{lines}");
    for (i, ((lt, ls, lw), (st, ss, sw))) in live_log.iter().zip(&simulated).enumerate() {
        assert_eq!(ls, ss, "{lines}");
        // The same reason; a re-opened period is jittered from a different clock reading.
        assert_eq!(lw.split("; open for").next(), sw.split("; open for").next(), "{lines}");
        let tolerance = match i {
            1 => TICK_MS,
            // After the re-open: two periods of 2s ±10% each, drawn apart.
            3 => 400 + TICK_MS,
            _ => SAME_MOMENT_MS,
        };
        assert!((st - lt).abs() <= tolerance, "{ss} {} ms apart (tolerance {tolerance}):\n{lines}", st - lt);
    }
    // The replay turns half-open exactly when its own jittered period ends.
    let reopen = &p["breaker"]["transitions"][2];
    let period_ms = (reopen["open_for_s"].as_f64().unwrap() * 1000.0).round() as i64;
    assert!((1800..=2200).contains(&period_ms), "{reopen}");
    assert!((simulated[3].0 - simulated[2].0 - period_ms).abs() <= 1, "{lines}");
    assert_eq!(simulated[0].2, "3 consecutive failures; open for 1s");
    assert_eq!(p["breaker"]["opened"], 2);
    assert_eq!(p["breaker"]["final_state"], "closed");
    // The requests it refuses are exactly the ones the plugin refused.
    let v = &p["versus_live"];
    assert_eq!(
        (v["live_refused"]["circuit_open"].as_i64(), p["refused"]["circuit_open"].as_i64()),
        (Some(5), Some(5)),
        "{p}"
    );
    assert_eq!(
        (v["both_refused"].as_i64(), v["only_live_refused"].as_i64(), v["only_simulation_refused"].as_i64()),
        (Some(5), Some(0), Some(0)),
        "{p}"
    );
    assert_eq!(
        (p["breaker"]["calls"]["success"].as_i64(), p["breaker"]["calls"]["failure"].as_i64()),
        (Some(live.success), Some(live.failure))
    );
    assert_eq!((report["malformed"].as_i64(), report["requests"].as_i64()), (Some(0), Some(sent as i64)));
    let _ = std::fs::remove_dir_all(&dir);
}

fn tempfile_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("breakwater-it-simulate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
