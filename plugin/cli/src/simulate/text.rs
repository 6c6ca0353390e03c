//! The simulation's report for people.

use super::{PolicyReport, Refused, Report, When};
use std::fmt::Write;

/// Transitions listed per policy; `--output json` lists them all.
const SHOWN_TRANSITIONS: usize = 30;

fn stamp(w: &When) -> String {
    format!("{:>+10.3}s  {}", w.t, w.at)
}

/// "3 (circuit_open 2, bulkhead_full 1)", leaving out the zeros.
fn by_reason(r: &Refused) -> String {
    let parts: Vec<String> = [
        ("circuit_open", r.circuit_open),
        ("bulkhead_full", r.bulkhead_full),
        ("queue_timeout", r.queue_timeout),
        ("shed", r.shed),
    ]
    .iter()
    .filter(|(_, n)| *n > 0)
    .map(|(k, n)| format!("{k} {n}"))
    .collect();
    if parts.is_empty() {
        "0".into()
    } else {
        format!("{} ({})", r.total(), parts.join(", "))
    }
}

fn plural(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

pub fn render(r: &Report) -> String {
    let mut o = String::new();
    let files = r.files.join(", ");
    let _ = match (&r.from, &r.to) {
        (Some(from), Some(to)) => {
            writeln!(o, "{} in {files}, from {} to {} ({:.3}s)", plural(r.lines, "line", "lines"), from.at, to.at, to.t)
        }
        _ => writeln!(o, "{} in {files}", plural(r.lines, "line", "lines")),
    };
    let _ =
        writeln!(o, "{} under a policy, {} under none, {} malformed (skipped)", r.requests, r.unmatched, r.malformed);
    for m in &r.malformed_shown {
        let _ = writeln!(o, "  {}:{}: {}", m.file, m.line, m.error);
    }
    if r.malformed > r.malformed_shown.len() as u64 {
        let _ = writeln!(o, "  … and {} more", r.malformed - r.malformed_shown.len() as u64);
    }
    for w in &r.warnings {
        let _ = writeln!(o, "warning: {w}");
    }
    for p in &r.policies {
        o.push('\n');
        policy(&mut o, p);
    }
    o
}

fn policy(o: &mut String, p: &PolicyReport) {
    let dry = p.mode == "dry_run";
    let _ = writeln!(o, "policy {} ({}): {}", p.name, p.mode, plural(p.requests, "request", "requests"));
    let verb = if dry { "would refuse (dry_run: refused none)" } else { "refused" };
    let _ = writeln!(o, "  {verb}: {}", by_reason(&p.refused));
    if let Some(b) = &p.breaker {
        let _ = writeln!(
            o,
            "  breaker: opened {}, half-opened {}, closed {}; open {:.3}s in all; {} at the end",
            plural(b.opened, "time", "times"),
            b.half_opened,
            b.closed,
            b.open_s,
            b.final_state.replace('_', "-")
        );
        for t in b.transitions.iter().take(SHOWN_TRANSITIONS) {
            let _ = writeln!(o, "    {}  {:<9}  {}", stamp(&t.when), t.to.replace('_', "-"), t.detail);
        }
        if b.transitions.len() > SHOWN_TRANSITIONS {
            let _ = writeln!(
                o,
                "    … and {} more (--output json lists them all)",
                b.transitions.len() - SHOWN_TRANSITIONS
            );
        }
        let c = &b.calls;
        let mut line = format!("  calls: {} success, {} failure, {} slow", c.success, c.failure, c.slow);
        let ignored: u64 = c.ignored.values().sum();
        if ignored > 0 {
            let why: Vec<String> = c.ignored.iter().map(|(k, n)| format!("{k} {n}")).collect();
            let _ = write!(line, ", {ignored} ignored ({})", why.join(", "));
        }
        if c.unknown > 0 {
            let _ = write!(line, ", {} refused live and admitted here (outcome unknown)", c.unknown);
        }
        let _ = writeln!(o, "{line}");
    }
    if let Some(b) = &p.bulkhead {
        let at = b.peak_at.as_ref().map_or(String::new(), |w| format!(" at {:+.3}s", w.t));
        // An adaptive limit moves: the peak is against the limit of its moment.
        let of = match &b.adaptive {
            Some(a) => format!(
                "{} (adaptive limit, {} to {}: it reached {}, and ended at {})",
                a.limit_at_peak, a.min, a.max, a.highest, a.last
            ),
            None => b.max_concurrent.to_string(),
        };
        let _ = writeln!(
            o,
            "  bulkhead: peak {} in flight of {of}{at}, peak {} queued of {}; admitted {} ({} after waiting), {} left the queue",
            b.peak_in_flight, b.peak_queued, b.queue_size, b.admitted, b.waited, b.left_queue
        );
    }
    if let Some(r) = &p.retry {
        let budget = if r.budgeted { "with its budget" } else { "unbudgeted" };
        let _ = writeln!(
            o,
            "  retries (max {} per request, {budget}): {} in the log; would allow {}, deny {}; {} requests denied any retry, {} capped; {} rescued live by a retry it would deny",
            r.max_retries, r.retries_in_log, r.retries_allowed, r.retries_denied, r.requests_denied, r.requests_capped, r.rescued_by_denied
        );
    }
    let v = &p.versus_live;
    let _ = writeln!(
        o,
        "  versus live: the plugin refused {}; both refused {}; only live {}; only here {} ({} of them failed live)",
        by_reason(&v.live_refused),
        v.both_refused,
        v.only_live_refused,
        v.only_simulation_refused,
        v.only_simulation_refused_failed
    );
}
