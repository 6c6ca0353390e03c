//! The circuit breaker on the request path: admit on the request headers, record the outcome
//! when the stream ends, sync on the tick. The state machine itself is
//! `breakwater_policies::breaker`; this is how it meets shared data and the worker's [`View`].
//!
//! A healthy request on a quiet breaker makes no host call here: the worker's view admits it,
//! and its success joins the worker's batch, handed over on the tick. Everything else (a
//! failure, a probe, a breaker that is failing, suspect, open past its period or half-open)
//! goes through the shared state with a CAS, so it is exact across workers.

use crate::host::Host;
use crate::local::View;
use crate::outcome::{Ignored, Verdict};
use crate::reply::{reject, Refusal};
use crate::vm::Vm;
use crate::{config, store, Compiled, Policy};
use alloc::format;
use alloc::rc::Rc;
use alloc::string::String;
use breakwater_policies::breaker::Step;
use breakwater_policies::{Admission, Batch, Forced, Outcome, Recorded, Transition, TripReason};

/// A call the breaker admitted: its outcome is reported with its generation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Call {
    pub generation: u32,
    pub probe: bool,
}

/// The breaker's decision on a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admit {
    /// Go on; report the outcome (None: go on uncounted, as a dry-run would-be rejection or
    /// while forced closed).
    Pass(Option<Call>),
    /// Refused with `circuit-open`; the reply is sent.
    Rejected,
}

/// Admission on the request headers.
pub fn admit(c: &Rc<Compiled>, p: &Policy, host: &impl Host, vm: &Vm) -> Admit {
    let Some(b) = &p.cfg.breaker else { return Admit::Pass(None) };
    let view = p.local(|l| {
        l.active = true;
        l.view
    });
    vm.list(c, p);
    let admission = match view {
        View::Quiet { generation } => Admission::Allow { generation },
        View::ForcedClosed => return Admit::Pass(None),
        View::ForcedOpen => Admission::Reject { retry_after_ns: b.machine.open_for_ns },
        View::Open { until } => match vm.clock(host) {
            now if now < until => Admission::Reject { retry_after_ns: until - now },
            now => exactly(p, host, now),
        },
        View::Unknown | View::Failing | View::Suspect | View::HalfOpen => exactly(p, host, vm.clock(host)),
    };
    match admission {
        Admission::Allow { generation } => Admit::Pass(Some(Call { generation, probe: false })),
        Admission::Probe { generation } => Admit::Pass(Some(Call { generation, probe: true })),
        Admission::Reject { retry_after_ns } => match p.cfg.mode {
            config::Mode::Enforce => {
                p.local(|l| l.counts.reject(Refusal::CircuitOpen));
                reject(host, p, Refusal::CircuitOpen, retry_after_ns);
                Admit::Rejected
            }
            // Would have been rejected: count it, let it pass, and keep its outcome out of the
            // breaker so that dry_run walks through exactly the states enforce would.
            config::Mode::DryRun => {
                p.local(|l| l.counts.dry_run_reject(Refusal::CircuitOpen));
                Admit::Pass(None)
            }
        },
    }
}

/// Admission against the shared state (a CAS when it takes a probe slot or confirms a trip).
fn exactly(p: &Policy, host: &impl Host, now: u64) -> Admission {
    let Some(b) = &p.cfg.breaker else { return Admission::Allow { generation: 0 } };
    match store::update(host, &p.breaker_key, |s| s.admit(&b.machine, now)) {
        Some((step, view)) => {
            p.local(|l| l.view = view);
            transitioned(p, host, step.transition);
            step.value
        }
        // Shared data failing us entirely: fail open, the breaker must never become the outage.
        // The call is counted under no generation that could exist, so it changes nothing.
        None => Admission::Allow { generation: u32::MAX },
    }
}

/// Accounting when the stream ends: `verdict` of a call the breaker admitted (None: it never
/// reached the upstream, so only a probe slot it held goes back), `slow` if it was.
pub fn record(
    c: &Rc<Compiled>,
    p: &Policy,
    host: &impl Host,
    vm: &Vm,
    call: Call,
    verdict: Option<Verdict>,
    slow: bool,
) {
    let Some(b) = &p.cfg.breaker else { return };
    let Some(verdict) = verdict else {
        if call.probe {
            release_probe(p, host, call);
        }
        return;
    };
    p.local(|l| {
        match verdict {
            Verdict::Success => l.counts.success += 1,
            Verdict::Failure => l.counts.failure += 1,
            Verdict::Ignored(why) => l.counts.ignore(why, 1),
        }
        l.counts.slow += u32::from(slow);
    });
    vm.list(c, p);
    let failure = match verdict {
        Verdict::Ignored(_) => {
            if call.probe {
                release_probe(p, host, call);
            }
            return;
        }
        Verdict::Success => false,
        Verdict::Failure => true,
    };
    // A closed-state success on a quiet breaker joins the worker's batch, handed over on the
    // tick: the common case writes no shared data. While the breaker is failing or suspect it
    // goes at once, to end a run of failures or to weigh in on a rate, for every worker.
    if !failure && !call.probe {
        let batched = p.local(|l| {
            let quiet = matches!(l.view, View::Quiet { generation } if generation == call.generation)
                || l.view == View::Unknown;
            if quiet {
                batch(l, call.generation, slow, vm.coarse_now());
            }
            quiet
        });
        if batched {
            return;
        }
    }
    let now = vm.clock(host);
    let outcome = Outcome { failure, slow };
    let jitter = splitmix64(now);
    let pending = p.local(|l| core::mem::take(&mut l.batch));
    let step = store::update(host, &p.breaker_key, |s| {
        // This worker's earlier successes come first, so a failure after them counts from zero.
        let before = s.record_successes(&b.machine, now, pending);
        let stale_batch = before.value == Recorded::Stale;
        before.and(s.record(&b.machine, now, call.generation, outcome, jitter)).map(|r| (r, stale_batch))
    });
    if let Some((step, view)) = step {
        let (recorded, stale_batch) = step.value;
        p.local(|l| {
            l.view = view;
            let stale = u32::from(recorded == Recorded::Stale) + if stale_batch { pending.successes } else { 0 };
            l.counts.ignore(Ignored::Stale, stale);
        });
        transitioned(p, host, step.transition);
    }
}

/// Adds a success of `generation` to the worker's batch; a batch of an older generation is
/// dropped as stale first (the breaker would drop it anyway).
fn batch(l: &mut crate::local::Local, generation: u32, slow: bool, at: u64) {
    if l.batch.generation != generation {
        l.counts.ignore(Ignored::Stale, l.batch.successes);
        l.batch = Batch { generation, ..Batch::default() };
    }
    l.batch.successes = l.batch.successes.saturating_add(1);
    l.batch.slow = l.batch.slow.saturating_add(u32::from(slow));
    l.batch.last_at = l.batch.last_at.max(at);
}

fn release_probe(p: &Policy, host: &impl Host, call: Call) {
    let step = store::update(host, &p.breaker_key, |s| {
        let changed = s.release_probe(call.generation);
        Step { value: (), changed, transition: None }
    });
    if let Some((_, view)) = step {
        p.local(|l| l.view = view);
    }
}

/// The tick: hands the batch over and refreshes the view (if the policy was active since the
/// last tick, or is suspect, or open), or drops the view (if it was idle), so no view outlives
/// a sync interval. An open breaker whose period is over turns half-open here, traffic or not.
/// Returns whether the next tick must visit the policy again.
pub fn sync(p: &Policy, host: &impl Host, now: u64) -> bool {
    let Some(b) = &p.cfg.breaker else { return false };
    // A batch counts as activity: its calls may have been admitted before the last tick.
    let (active, watch) = p.local(|l| {
        let active = core::mem::take(&mut l.active) || l.batch.successes > 0;
        (active, matches!(l.view, View::Suspect | View::Open { .. }))
    });
    if !active && !watch {
        p.local(|l| l.view = View::Unknown);
        return false;
    }
    if let (false, View::Open { until }) = (active, p.local(|l| l.view)) {
        if now < until {
            return true; // nothing to hand over; look again next tick
        }
    }
    let pending = p.local(|l| core::mem::take(&mut l.batch));
    let step = store::update(host, &p.breaker_key, |s| {
        let recorded = s.record_successes(&b.machine, now, pending);
        let stale = recorded.value == Recorded::Stale;
        recorded.and(s.confirm(&b.machine, now)).and(s.expire(now)).map(|()| stale)
    });
    if let Some((step, view)) = step {
        p.local(|l| {
            l.view = view;
            if step.value {
                l.counts.ignore(Ignored::Stale, pending.successes);
            }
        });
        transitioned(p, host, step.transition);
    }
    true
}

/// Sets (or releases) a forced state, for all workers.
pub fn force(p: &Policy, host: &impl Host, forced: Option<Forced>) -> bool {
    let step = store::update(host, &p.breaker_key, |s| s.force(forced));
    match step {
        Some((step, view)) => {
            p.local(|l| l.view = view);
            transitioned(p, host, step.transition);
            true
        }
        None => false,
    }
}

/// Stats and the log line of a transition, made by whichever worker made it.
pub fn transitioned(p: &Policy, host: &impl Host, t: Option<Transition>) {
    let Some(t) = t else { return };
    let m = &p.metrics;
    let (index, state, why) = match t {
        Transition::Opened { reason, period_ns } => {
            let why = match reason {
                TripReason::ConsecutiveFailures(n) => format!("{n} consecutive failures"),
                TripReason::FailureRate { percent, requests } => {
                    format!("failure rate {percent}% of {requests} requests")
                }
                TripReason::SlowCalls { percent, requests } => format!("slow calls {percent}% of {requests} requests"),
                TripReason::ProbeFailed => "a half-open probe failed".into(),
                TripReason::ProbeSlow => "a half-open probe was slow".into(),
            };
            (Some(0), "open", format!("{why}; open for {}", fmt_duration(period_ns)))
        }
        Transition::HalfOpened => (Some(1), "half_open", String::from("open period over; probing")),
        Transition::Closed => (Some(2), "closed", String::from("probes succeeded")),
        Transition::Forced(Some(Forced::Open)) => (None, "forced_open", String::from("forced open by an operator")),
        Transition::Forced(Some(Forced::Closed)) => {
            (None, "forced_closed", String::from("forced closed (disabled) by an operator"))
        }
        Transition::Forced(None) => (None, "closed", String::from("released to automatic by an operator")),
    };
    if let Some(id) = index.and_then(|i| m.transitions.get(i).copied()) {
        crate::metrics::add(host, id, 1);
    }
    m.set_state(host, state);
    log::info!("policy {}: circuit {}: {}", p.name(), state.replace('_', "-"), why);
}

/// "250ms", "10s", "1.5s": readable in a log line.
fn fmt_duration(ns: u64) -> String {
    let ms = ns / 1_000_000;
    match ms {
        0..=999 => format!("{ms}ms"),
        _ if ms.is_multiple_of(1000) => format!("{}s", ms / 1000),
        _ => format!("{}.{}s", ms / 1000, format!("{:03}", ms % 1000).trim_end_matches('0')),
    }
}

/// A cheap mix of the clock for jitter; no need for cryptographic randomness here.
fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}
