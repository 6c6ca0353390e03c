//! The simulation's timeline as an SVG: per policy, the breaker's state as a band over time,
//! requests per time bin (those the simulation refused in red, those the live plugin refused
//! marked below), and the bulkhead's peak in flight against its limit.

use super::{PolicyReport, Report, BINS};
use std::fmt::Write;

const WIDTH: f64 = 1200.0;
const LEFT: f64 = 170.0;
const RIGHT: f64 = 20.0;
const PLOT: f64 = WIDTH - LEFT - RIGHT;
const BAND: f64 = 14.0;
const BARS: f64 = 60.0;
const LINE: f64 = 40.0;
const GAP: f64 = 26.0;

const CLOSED: &str = "#4caf50";
const OPEN: &str = "#e53935";
const HALF_OPEN: &str = "#ffb300";
const ARRIVED: &str = "#90a4ae";
const REFUSED: &str = "#e53935";
const LIVE: &str = "#6a1b9a";
const IN_FLIGHT: &str = "#1e88e5";

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

fn x_of(t: f64, span: f64) -> f64 {
    LEFT + if span > 0.0 { (t / span).clamp(0.0, 1.0) * PLOT } else { 0.0 }
}

fn label(o: &mut String, y: f64, text: &str) {
    let _ = writeln!(o, r#"<text x="{:.1}" y="{:.1}" text-anchor="end" class="l">{}</text>"#, LEFT - 8.0, y, esc(text));
}

/// The breaker's state band: one rectangle per stretch of one state.
fn band(o: &mut String, p: &PolicyReport, y: f64, span: f64) {
    let Some(b) = &p.breaker else { return };
    let mut stretches = vec![(0.0, "closed")];
    stretches.extend(b.transitions.iter().map(|t| (t.when.t, t.to)));
    for (i, (from, state)) in stretches.iter().enumerate() {
        let to = stretches.get(i + 1).map_or(span, |(t, _)| *t);
        let color = match *state {
            "open" => OPEN,
            "half_open" => HALF_OPEN,
            _ => CLOSED,
        };
        let (x0, x1) = (x_of(*from, span), x_of(to, span));
        let _ = writeln!(
            o,
            r#"<rect x="{x0:.2}" y="{y:.1}" width="{:.2}" height="{BAND}" fill="{color}"><title>{} from {from:.3}s</title></rect>"#,
            (x1 - x0).max(0.5),
            state.replace('_', "-")
        );
    }
    label(o, y + BAND - 3.0, "breaker");
}

/// Requests per bin: arrivals in grey, the simulation's refusals in red over them, the live
/// plugin's refusals as a purple tick below the axis.
fn bars(o: &mut String, p: &PolicyReport, y: f64, bin_s: f64, span: f64) {
    let max = p.bins.iter().map(|b| b.arrived).max().unwrap_or(0).max(1);
    let w = PLOT / BINS as f64;
    let base = y + BARS;
    for (i, b) in p.bins.iter().enumerate().filter(|(_, b)| b.arrived > 0) {
        let x = LEFT + i as f64 * w;
        let h = f64::from(b.arrived) / f64::from(max) * BARS;
        let r = f64::from(b.refused) / f64::from(max) * BARS;
        let t = i as f64 * bin_s;
        let _ = writeln!(
            o,
            r#"<rect x="{x:.2}" y="{:.2}" width="{w:.2}" height="{h:.2}" fill="{ARRIVED}"><title>{t:.3}s: {} requests, {} refused here, {} refused live</title></rect>"#,
            base - h,
            b.arrived,
            b.refused,
            b.live_refused
        );
        if b.refused > 0 {
            let _ = writeln!(
                o,
                r#"<rect x="{x:.2}" y="{:.2}" width="{w:.2}" height="{r:.2}" fill="{REFUSED}"/>"#,
                base - r
            );
        }
        if b.live_refused > 0 {
            let _ = writeln!(o, r#"<rect x="{x:.2}" y="{:.2}" width="{w:.2}" height="3" fill="{LIVE}"/>"#, base + 1.0);
        }
    }
    let _ = writeln!(o, r#"<line x1="{LEFT}" y1="{base}" x2="{:.1}" y2="{base}" class="axis"/>"#, LEFT + PLOT);
    label(o, y + 12.0, &format!("requests (max {max}/bin)"));
    let _ = span;
}

/// The bulkhead's peak in flight per bin, against its limit.
fn in_flight(o: &mut String, p: &PolicyReport, y: f64) {
    let Some(b) = &p.bulkhead else { return };
    let limit = f64::from(b.max_concurrent.max(1));
    let w = PLOT / BINS as f64;
    let base = y + LINE;
    let points: Vec<String> = p
        .bins
        .iter()
        .enumerate()
        .map(|(i, bin)| {
            format!(
                "{:.2},{:.2}",
                LEFT + (i as f64 + 0.5) * w,
                base - f64::from(bin.in_flight).min(limit) / limit * LINE
            )
        })
        .collect();
    let _ = writeln!(o, r#"<line x1="{LEFT}" y1="{y}" x2="{:.1}" y2="{y}" class="limit"/>"#, LEFT + PLOT);
    let _ =
        writeln!(o, r#"<polyline points="{}" fill="none" stroke="{IN_FLIGHT}" stroke-width="1.5"/>"#, points.join(" "));
    let _ = writeln!(o, r#"<line x1="{LEFT}" y1="{base}" x2="{:.1}" y2="{base}" class="axis"/>"#, LEFT + PLOT);
    let limit = match &b.adaptive {
        Some(a) => format!("adaptive limit {} to {}, reached {}; drawn at {}", a.min, a.max, a.highest, a.max),
        None => format!("limit {}", b.max_concurrent),
    };
    label(o, y + 12.0, &format!("in flight ({limit})"));
}

pub fn render(r: &Report) -> String {
    let span = r.to.as_ref().map_or(0.0, |t| t.t);
    let bin_s = r.bin_ns as f64 / 1e9;
    let per_policy = |p: &PolicyReport| {
        GAP + 18.0
            + if p.breaker.is_some() { BAND + 8.0 } else { 0.0 }
            + BARS
            + 10.0
            + if p.bulkhead.is_some() { LINE + 10.0 } else { 0.0 }
    };
    let height = 60.0 + r.policies.iter().map(per_policy).sum::<f64>() + 40.0;
    let mut o = String::new();
    let _ = writeln!(
        o,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height:.0}" viewBox="0 0 {WIDTH} {height:.0}" font-family="sans-serif" font-size="12">"#
    );
    o.push_str("<style>.l{fill:#333}.axis{stroke:#555;stroke-width:1}.limit{stroke:#999;stroke-dasharray:4 3}.t{fill:#555;font-size:11px}</style>\n");
    let _ = writeln!(o, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let title = match &r.from {
        Some(from) => format!("breakwater simulate: {} requests from {} over {span:.3}s", r.requests, from.at),
        None => "breakwater simulate: no requests".to_string(),
    };
    let _ = writeln!(o, r#"<text x="10" y="20" font-size="14" font-weight="bold">{}</text>"#, esc(&title));
    let legend = [
        (CLOSED, "closed"),
        (HALF_OPEN, "half-open"),
        (OPEN, "open"),
        (ARRIVED, "requests"),
        (REFUSED, "refused here"),
        (LIVE, "refused live"),
        (IN_FLIGHT, "in flight"),
    ];
    let mut x = 10.0;
    for (color, name) in legend {
        let _ = writeln!(
            o,
            r#"<rect x="{x}" y="32" width="10" height="10" fill="{color}"/><text x="{}" y="41" class="t">{name}</text>"#,
            x + 14.0
        );
        x += 24.0 + 7.0 * name.len() as f64;
    }
    let mut y = 60.0;
    for p in &r.policies {
        y += GAP;
        let _ =
            writeln!(o, r#"<text x="10" y="{y:.1}" font-weight="bold">policy {} ({})</text>"#, esc(&p.name), p.mode);
        y += 8.0;
        if p.breaker.is_some() {
            band(&mut o, p, y, span);
            y += BAND + 8.0;
        }
        bars(&mut o, p, y, bin_s, span);
        y += BARS + 10.0;
        if p.bulkhead.is_some() {
            in_flight(&mut o, p, y);
            y += LINE + 10.0;
        }
    }
    // The time axis: seconds since the first request.
    y += 6.0;
    let _ = writeln!(o, r#"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" class="axis"/>"#, LEFT + PLOT);
    for k in 0..=6 {
        let t = span * f64::from(k) / 6.0;
        let x = x_of(t, span);
        let _ = writeln!(
            o,
            r#"<line x1="{x:.1}" y1="{y:.1}" x2="{x:.1}" y2="{:.1}" class="axis"/><text x="{x:.1}" y="{:.1}" text-anchor="middle" class="t">+{t:.1}s</text>"#,
            y + 4.0,
            y + 17.0
        );
    }
    o.push_str("</svg>\n");
    o
}
