//! The circuit breaker: one small state machine, every transition named.
//!
//! ```text
//!            trip condition                 open period over
//!   Closed ─────────────────▶ Open ─────────────────────────▶ HalfOpen
//!     ▲                        ▲                                 │
//!     │  successes_to_close    │ a probe fails: period doubles   │
//!     └────────────────────────┴─────────────────────────────────┘
//! ```
//! * **Closed**: every call is allowed and its outcome recorded. It trips on `consecutive_failures`,
//!   on the failure rate or on the slow-call rate over the sliding window.
//! * **Open**: calls are rejected until the open period ends.
//! * **HalfOpen**: up to `max_probes` calls at a time are let through as probes;
//!   `successes_to_close` successful probes close it, one failed probe re-opens it with the period
//!   doubled (with ±10% jitter) up to `max_open_for`. A probe slot held longer than
//!   `probe_timeout` is taken back, so a lost probe can never wedge the breaker.
//!
//! Every phase change starts a new **generation** (as in sony/gobreaker). A call carries the
//! generation it was admitted in, and its outcome counts only if the breaker is still in that
//! generation: a call let through while closed that completes after the breaker opened (and
//! maybe closed again) says nothing about the upstream since, and is dropped as stale.
//!
//! An operator can **force** the breaker open (every call rejected) or closed (every call
//! allowed, nothing recorded), as resilience4j's FORCED_OPEN and DISABLED; releasing the force
//! starts a fresh closed breaker.

use crate::codec::{Reader, Writer};
use crate::window::{Totals, Window, BUCKETS};
use crate::SECOND;

const VERSION: u8 = 3;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateRule {
    pub threshold: u8,
    pub minimum_requests: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlowRule {
    pub duration_ns: u64,
    pub threshold: u8,
    pub minimum_requests: u32,
}

/// A validated breaker configuration, all times in nanoseconds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BreakerConfig {
    /// 0 disables the consecutive-failure trip.
    pub consecutive_failures: u32,
    pub failure_rate: Option<RateRule>,
    pub slow_call: Option<SlowRule>,
    pub window_ns: u64,
    pub open_for_ns: u64,
    pub max_open_for_ns: u64,
    pub max_probes: u32,
    pub successes_to_close: u32,
    pub probe_timeout_ns: u64,
    /// A window-based trip (failure or slow-call rate) waits this long and is then checked
    /// again, so that successes other workers still hold in their batches are counted; while
    /// it waits the breaker is "suspect". 0 trips at once.
    pub confirm_ns: u64,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            consecutive_failures: 5,
            failure_rate: None,
            slow_call: None,
            window_ns: 10 * SECOND,
            open_for_ns: 30 * SECOND,
            max_open_for_ns: 300 * SECOND,
            max_probes: 1,
            successes_to_close: 1,
            probe_timeout_ns: 30 * SECOND,
            confirm_ns: 0,
        }
    }
}

impl BreakerConfig {
    pub fn bucket_ns(&self) -> u64 {
        (self.window_ns / BUCKETS as u64).max(1)
    }
    fn uses_window(&self) -> bool {
        self.failure_rate.is_some() || self.slow_call.is_some()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Closed,
    Open { until: u64 },
    HalfOpen { probes: u32, successes: u32, last_probe_at: u64 },
}

/// A state set by hand, overriding the automatic one until released.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Forced {
    /// Every call is rejected (resilience4j FORCED_OPEN, Polly Isolate).
    Open,
    /// Every call is allowed and nothing is recorded (resilience4j DISABLED).
    Closed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TripReason {
    ConsecutiveFailures(u32),
    FailureRate {
        percent: u32,
        requests: u32,
    },
    SlowCalls {
        percent: u32,
        requests: u32,
    },
    ProbeFailed,
    /// A half-open probe took at least `slow_call.duration`: a breaker that judges slowness
    /// does not close on a slow probe (resilience4j counts it against closing too).
    ProbeSlow,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    Opened {
        reason: TripReason,
        period_ns: u64,
    },
    HalfOpened,
    Closed,
    /// Set by hand ([`BreakerState::force`]); None: released to automatic (a fresh closed breaker).
    Forced(Option<Forced>),
    /// Reset by hand ([`BreakerState::reset`]): a fresh closed breaker, not forced.
    Reset,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Closed: go ahead; report the outcome with this generation.
    Allow {
        generation: u32,
    },
    /// Half-open: go ahead as a probe; its outcome (or [`BreakerState::release_probe`]) must follow.
    Probe {
        generation: u32,
    },
    Reject {
        retry_after_ns: u64,
    },
}

/// What one finished call tells the breaker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Outcome {
    pub failure: bool,
    pub slow: bool,
}

/// Whether an outcome was counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recorded {
    Counted,
    /// Admitted in an earlier generation (or while forced): dropped.
    Stale,
}

/// Successes a worker collected since it last wrote the breaker, all of one generation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Batch {
    pub generation: u32,
    pub successes: u32,
    /// Of which slow.
    pub slow: u32,
    /// When the latest of them ended: where it breaks a run of failures.
    pub last_at: u64,
}

/// The result of a step: whether the state must be written back, and the transition made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Step<T> {
    pub value: T,
    pub changed: bool,
    pub transition: Option<Transition>,
}

/// How many failure times of the current run are kept, so that successes reported late (in a
/// worker's batch) break the run exactly where they happened. Runs longer than this are
/// counted, but a late success can only end them if it came after one of the kept failures.
pub const TRACKED_FAILURES: usize = 32;

impl<T> Step<T> {
    /// Two steps made in a row, as one: the second's value, changed if either changed, the
    /// first transition made.
    pub fn and<U>(self, next: Step<U>) -> Step<U> {
        step(next.value, self.changed || next.changed, self.transition.or(next.transition))
    }

    /// The same step with its value mapped.
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Step<U> {
        step(f(self.value), self.changed, self.transition)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BreakerState {
    pub phase: Phase,
    /// Bumped on every phase change (and force): outcomes of calls admitted before are stale.
    pub generation: u32,
    pub forced: Option<Forced>,
    pub consecutive_failures: u32,
    /// End times of the current run's latest failures, oldest first (at most TRACKED_FAILURES).
    run: alloc::vec::Vec<u64>,
    /// When the window first met a trip condition that awaits confirmation.
    pub suspect_since: Option<u64>,
    /// The open period of the latest trip; doubles on every re-trip from half-open.
    pub open_period_ns: u64,
    /// The bucket length the window was recorded with; a config change of window resets it.
    bucket_ns: u64,
    pub window: Window,
}

impl Default for BreakerState {
    fn default() -> Self {
        BreakerState {
            phase: Phase::Closed,
            generation: 0,
            forced: None,
            consecutive_failures: 0,
            run: alloc::vec::Vec::new(),
            suspect_since: None,
            open_period_ns: 0,
            bucket_ns: 0,
            window: Window::default(),
        }
    }
}

impl BreakerState {
    /// Decides whether a call may go ahead now.
    pub fn admit(&mut self, cfg: &BreakerConfig, now: u64) -> Step<Admission> {
        match self.forced {
            Some(Forced::Open) => return step(Admission::Reject { retry_after_ns: cfg.open_for_ns }, false, None),
            Some(Forced::Closed) => return step(Admission::Allow { generation: self.generation }, false, None),
            None => {}
        }
        match self.phase {
            Phase::Closed => {
                let confirmed = self.confirm(cfg, now);
                match self.phase {
                    Phase::Open { until } => step(
                        Admission::Reject { retry_after_ns: until.saturating_sub(now) },
                        true,
                        confirmed.transition,
                    ),
                    _ => step(Admission::Allow { generation: self.generation }, confirmed.changed, None),
                }
            }
            Phase::Open { until } if now < until => {
                step(Admission::Reject { retry_after_ns: until - now }, false, None)
            }
            Phase::Open { .. } => {
                self.enter(Phase::HalfOpen { probes: 1, successes: 0, last_probe_at: now });
                step(Admission::Probe { generation: self.generation }, true, Some(Transition::HalfOpened))
            }
            Phase::HalfOpen { probes, successes, last_probe_at } => {
                // Probes unheard of for probe_timeout are presumed lost (their VM died): reclaim.
                let probes = if now.saturating_sub(last_probe_at) >= cfg.probe_timeout_ns { 0 } else { probes };
                if probes < cfg.max_probes {
                    self.phase = Phase::HalfOpen { probes: probes + 1, successes, last_probe_at: now };
                    step(Admission::Probe { generation: self.generation }, true, None)
                } else {
                    step(Admission::Reject { retry_after_ns: SECOND }, false, None)
                }
            }
        }
    }

    /// Records the outcome of a call admitted in `generation`. `jitter` is any random number.
    pub fn record(
        &mut self,
        cfg: &BreakerConfig,
        now: u64,
        generation: u32,
        outcome: Outcome,
        jitter: u64,
    ) -> Step<Recorded> {
        if generation != self.generation || self.forced.is_some() {
            return step(Recorded::Stale, false, None);
        }
        match self.phase {
            Phase::Closed => self.record_closed(cfg, now, outcome).and(step(Recorded::Counted, false, None)),
            Phase::HalfOpen { probes, successes, last_probe_at } => {
                let slow_probe = outcome.slow && cfg.slow_call.is_some();
                if outcome.failure || slow_probe {
                    let period = self.next_period(cfg, jitter);
                    self.open(now, period);
                    let reason = if outcome.failure { TripReason::ProbeFailed } else { TripReason::ProbeSlow };
                    let t = Transition::Opened { reason, period_ns: period };
                    return step(Recorded::Counted, true, Some(t));
                }
                let successes = successes.saturating_add(1);
                if successes >= cfg.successes_to_close {
                    self.close();
                    return step(Recorded::Counted, true, Some(Transition::Closed));
                }
                self.phase = Phase::HalfOpen { probes: probes.saturating_sub(1), successes, last_probe_at };
                step(Recorded::Counted, true, None)
            }
            // Open admits nothing, so no call can be of its generation.
            Phase::Open { .. } => step(Recorded::Stale, false, None),
        }
    }

    /// Records a worker's batch of successes admitted while closed. The batch's `last_at` breaks
    /// the run of failures at that point in time, so failures recorded since (by other workers)
    /// still count. A batch of another generation is stale.
    pub fn record_successes(&mut self, cfg: &BreakerConfig, now: u64, batch: Batch) -> Step<Recorded> {
        if batch.successes == 0 {
            return step(Recorded::Counted, false, None);
        }
        if batch.generation != self.generation || self.phase != Phase::Closed || self.forced.is_some() {
            return step(Recorded::Stale, false, None);
        }
        let before = self.consecutive_failures;
        self.break_run_at(batch.last_at);
        if !cfg.uses_window() {
            return step(Recorded::Counted, before != self.consecutive_failures, None);
        }
        let calls = Totals { total: batch.successes, failures: 0, slow: batch.slow.min(batch.successes) };
        self.record_window(cfg, now, calls).and(step(Recorded::Counted, true, None))
    }

    /// A success at `at` ends the run of failures before it; those after it stay.
    fn break_run_at(&mut self, at: u64) {
        let later = self.run.iter().filter(|&&t| t > at).count();
        let all_kept_are_later = later == self.run.len();
        if all_kept_are_later && self.consecutive_failures as usize > self.run.len() {
            return; // the success fell among failures too old to be kept: the run stands
        }
        self.run.drain(..self.run.len() - later);
        self.consecutive_failures = later as u32;
    }

    /// A probe of `generation` ended without an outcome that counts (client abort, ignored
    /// error): free its slot. False if there was none to free.
    pub fn release_probe(&mut self, generation: u32) -> bool {
        match self.phase {
            Phase::HalfOpen { probes, successes, last_probe_at } if probes > 0 && generation == self.generation => {
                self.phase = Phase::HalfOpen { probes: probes - 1, successes, last_probe_at };
                true
            }
            _ => false,
        }
    }

    /// The open period is over: half-open, with no probe yet (resilience4j's automatic
    /// transition), so that the state, and the gauges that show it, say so on time even on a
    /// route without traffic. The next call is the first probe.
    pub fn expire(&mut self, now: u64) -> Step<()> {
        match self.phase {
            Phase::Open { until } if now >= until && self.forced.is_none() => {
                self.enter(Phase::HalfOpen { probes: 0, successes: 0, last_probe_at: now });
                step((), true, Some(Transition::HalfOpened))
            }
            _ => step((), false, None),
        }
    }

    /// Sets (`Some`) or releases (`None`) a forced state. Releasing starts a fresh closed breaker.
    pub fn force(&mut self, forced: Option<Forced>) -> Step<()> {
        if self.forced == forced {
            return step((), false, None);
        }
        self.forced = forced;
        if forced.is_none() {
            self.close();
        } else {
            self.generation = self.generation.wrapping_add(1);
        }
        step((), true, Some(Transition::Forced(forced)))
    }

    /// Back to a fresh closed breaker, not forced, its counts and open period cleared
    /// (resilience4j's `reset`). Calls admitted before are stale.
    pub fn reset(&mut self) -> Step<()> {
        self.forced = None;
        self.close();
        step((), true, Some(Transition::Reset))
    }

    fn record_closed(&mut self, cfg: &BreakerConfig, now: u64, outcome: Outcome) -> Step<()> {
        let before = self.consecutive_failures;
        if outcome.failure {
            self.consecutive_failures = self.consecutive_failures.saturating_add(1);
            if self.run.len() == TRACKED_FAILURES {
                self.run.remove(0);
            }
            self.run.push(now);
        } else {
            self.break_run_at(now);
        }
        if cfg.consecutive_failures > 0 && self.consecutive_failures >= cfg.consecutive_failures {
            let reason = TripReason::ConsecutiveFailures(self.consecutive_failures);
            return self.trip(cfg, now, reason);
        }
        if !cfg.uses_window() {
            return step((), before != self.consecutive_failures, None);
        }
        let calls = Totals { total: 1, failures: u32::from(outcome.failure), slow: u32::from(outcome.slow) };
        self.record_window(cfg, now, calls)
    }

    fn record_window(&mut self, cfg: &BreakerConfig, now: u64, calls: Totals) -> Step<()> {
        let bucket_ns = cfg.bucket_ns();
        if self.bucket_ns != bucket_ns {
            self.window.clear();
            self.bucket_ns = bucket_ns;
        }
        self.window.add(now, bucket_ns, calls);
        self.check_window(cfg, now);
        let confirmed = self.confirm(cfg, now);
        step((), true, confirmed.transition)
    }

    /// Marks the breaker suspect when the window meets a trip condition, and clears it when not.
    fn check_window(&mut self, cfg: &BreakerConfig, now: u64) {
        let over = window_trip(cfg, self.window.totals(now, cfg.bucket_ns())).is_some();
        self.suspect_since = match (over, self.suspect_since) {
            (false, _) => None,
            (true, None) => Some(now),
            (true, since) => since,
        };
    }

    /// Trips a suspect breaker whose window still meets a trip condition once `confirm_ns` has
    /// passed, or clears it if the condition went away meanwhile.
    pub fn confirm(&mut self, cfg: &BreakerConfig, now: u64) -> Step<()> {
        let Some(since) = self.suspect_since else { return step((), false, None) };
        if self.phase != Phase::Closed || self.forced.is_some() || now < since.saturating_add(cfg.confirm_ns) {
            return step((), false, None);
        }
        match window_trip(cfg, self.window.totals(now, cfg.bucket_ns())) {
            Some(reason) => self.trip(cfg, now, reason),
            None => {
                self.suspect_since = None;
                step((), true, None)
            }
        }
    }

    fn trip(&mut self, cfg: &BreakerConfig, now: u64, reason: TripReason) -> Step<()> {
        let period = cfg.open_for_ns;
        self.open(now, period);
        step((), true, Some(Transition::Opened { reason, period_ns: period }))
    }

    /// Every phase change starts a new generation.
    fn enter(&mut self, phase: Phase) {
        self.phase = phase;
        self.generation = self.generation.wrapping_add(1);
    }

    fn open(&mut self, now: u64, period: u64) {
        self.enter(Phase::Open { until: now.saturating_add(period) });
        self.open_period_ns = period;
        self.consecutive_failures = 0;
        self.run.clear();
        self.suspect_since = None;
        self.window.clear();
    }

    fn close(&mut self) {
        self.enter(Phase::Closed);
        self.open_period_ns = 0;
        self.consecutive_failures = 0;
        self.run.clear();
        self.suspect_since = None;
        self.window.clear();
    }

    /// Doubles the last period, ±10% jitter so re-opened breakers on many proxies don't probe in step.
    fn next_period(&self, cfg: &BreakerConfig, jitter: u64) -> u64 {
        let doubled = self.open_period_ns.max(cfg.open_for_ns).saturating_mul(2);
        let spread = doubled / 10;
        let jittered = if spread == 0 { doubled } else { (doubled - spread).saturating_add(jitter % (2 * spread + 1)) };
        jittered.clamp(cfg.open_for_ns, cfg.max_open_for_ns.max(cfg.open_for_ns))
    }

    pub fn encode(&self) -> alloc::vec::Vec<u8> {
        let mut w = Writer::with_capacity(56);
        w.u8(VERSION);
        w.u32(self.generation);
        w.u8(match self.forced {
            None => 0,
            Some(Forced::Open) => 1,
            Some(Forced::Closed) => 2,
        });
        match self.phase {
            Phase::Closed => w.u8(0),
            Phase::Open { until } => {
                w.u8(1);
                w.u64(until);
            }
            Phase::HalfOpen { probes, successes, last_probe_at } => {
                w.u8(2);
                w.u32(probes);
                w.u32(successes);
                w.u64(last_probe_at);
            }
        }
        w.u32(self.consecutive_failures);
        w.u8(self.run.len() as u8);
        for t in &self.run {
            w.u64(*t);
        }
        match self.suspect_since {
            None => w.u8(0),
            Some(t) => {
                w.u8(1);
                w.u64(t);
            }
        }
        w.u64(self.open_period_ns);
        w.u64(self.bucket_ns);
        self.window.encode(&mut w);
        w.buf
    }

    /// None for bytes of another version or cut short: the caller starts from a fresh state.
    pub fn decode(bytes: &[u8]) -> Option<BreakerState> {
        let mut r = Reader::new(bytes);
        if r.u8()? != VERSION {
            return None;
        }
        let generation = r.u32()?;
        let forced = match r.u8()? {
            0 => None,
            1 => Some(Forced::Open),
            2 => Some(Forced::Closed),
            _ => return None,
        };
        let phase = match r.u8()? {
            0 => Phase::Closed,
            1 => Phase::Open { until: r.u64()? },
            2 => Phase::HalfOpen { probes: r.u32()?, successes: r.u32()?, last_probe_at: r.u64()? },
            _ => return None,
        };
        let consecutive_failures = r.u32()?;
        let run_len = usize::from(r.u8()?);
        if run_len > TRACKED_FAILURES {
            return None;
        }
        let mut run = alloc::vec::Vec::with_capacity(run_len);
        for _ in 0..run_len {
            run.push(r.u64()?);
        }
        let suspect_since = match r.u8()? {
            0 => None,
            1 => Some(r.u64()?),
            _ => return None,
        };
        let state = BreakerState {
            phase,
            generation,
            forced,
            consecutive_failures,
            run,
            suspect_since,
            open_period_ns: r.u64()?,
            bucket_ns: r.u64()?,
            window: Window::decode(&mut r)?,
        };
        r.is_empty().then_some(state)
    }
}

fn step<T>(value: T, changed: bool, transition: Option<Transition>) -> Step<T> {
    Step { value, changed, transition }
}

fn window_trip(cfg: &BreakerConfig, t: Totals) -> Option<TripReason> {
    let percent = |part: u32| (u64::from(part) * 100 / u64::from(t.total.max(1))) as u32;
    if let Some(rule) = cfg.failure_rate {
        if t.total >= rule.minimum_requests && Totals::at_least(t.failures, t.total, rule.threshold) {
            return Some(TripReason::FailureRate { percent: percent(t.failures), requests: t.total });
        }
    }
    if let Some(rule) = cfg.slow_call {
        if t.total >= rule.minimum_requests && Totals::at_least(t.slow, t.total, rule.threshold) {
            return Some(TripReason::SlowCalls { percent: percent(t.slow), requests: t.total });
        }
    }
    None
}

#[cfg(test)]
mod tests;
