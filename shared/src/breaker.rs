//! A circuit breaker: closed → open → half-open → closed, in the spirit of resilience4j.
//!
//! Closed: calls pass; the outcomes of the last `window` calls are kept, and once at
//! least `min_calls` are recorded a failure rate at or above the threshold opens the
//! breaker. Open: calls are refused until `open_for` has passed. Half-open: up to
//! `probes` trial calls pass; all succeeding closes the breaker, any failing re-opens it.
//! Pure state with the clock passed in, so every transition is unit-tested.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(default)]
pub struct BreakerSettings {
    /// Failure rate (0–1) over the window that opens the breaker.
    pub failure_rate: f64,
    /// Outcomes kept (a sliding window of calls).
    pub window: usize,
    /// Calls needed in the window before the rate counts.
    pub min_calls: usize,
    /// How long the breaker stays open before probing.
    pub open_for_ms: u64,
    /// Trial calls let through while half-open.
    pub probes: usize,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        Self { failure_rate: 0.5, window: 20, min_calls: 20, open_for_ms: 30_000, probes: 3 }
    }
}

/// Written as `closed`, `open` or `half_open` (heartbeats, admin endpoints, logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half_open",
        }
    }
}

#[derive(Debug)]
pub struct CircuitBreaker {
    settings: BreakerSettings,
    state: BreakerState,
    outcomes: VecDeque<bool>,
    opened_at: Option<Instant>,
    probes_started: usize,
    probes_succeeded: usize,
}

impl CircuitBreaker {
    pub fn new(settings: BreakerSettings) -> Self {
        Self {
            settings,
            state: BreakerState::Closed,
            outcomes: VecDeque::with_capacity(settings.window),
            opened_at: None,
            probes_started: 0,
            probes_succeeded: 0,
        }
    }

    /// The state now (an open breaker whose time is up reads as half-open).
    pub fn state(&self, now: Instant) -> BreakerState {
        match (self.state, self.opened_at) {
            (BreakerState::Open, Some(at)) if now.duration_since(at) >= self.open_for() => BreakerState::HalfOpen,
            (state, _) => state,
        }
    }

    /// Calls and failures in the current window (closed state; empty otherwise): what the
    /// worker reports so the API can see a model's recent failure rate.
    pub fn recent(&self) -> (usize, usize) {
        (self.outcomes.len(), self.outcomes.iter().filter(|ok| !**ok).count())
    }

    /// How long until an open breaker probes again.
    pub fn retry_after(&self, now: Instant) -> Option<Duration> {
        match (self.state(now), self.opened_at) {
            (BreakerState::Open, Some(at)) => Some(self.open_for().saturating_sub(now.duration_since(at))),
            _ => None,
        }
    }

    /// Whether a call may go ahead now; in half-open, this takes a probe slot.
    pub fn try_acquire(&mut self, now: Instant) -> bool {
        match self.state(now) {
            BreakerState::Closed => true,
            BreakerState::Open => false,
            BreakerState::HalfOpen => {
                if self.state == BreakerState::Open {
                    self.state = BreakerState::HalfOpen;
                    self.probes_started = 0;
                    self.probes_succeeded = 0;
                }
                if self.probes_started < self.settings.probes.max(1) {
                    self.probes_started += 1;
                    true
                } else {
                    false
                }
            }
        }
    }

    /// Gives back what `try_acquire` took for a call that was not made after all: in
    /// half-open, the probe slot, for another caller to probe with.
    pub fn release(&mut self) {
        if self.state == BreakerState::HalfOpen {
            self.probes_started = self.probes_started.saturating_sub(1);
        }
    }

    /// Records the outcome of a call that `try_acquire` let through.
    pub fn record(&mut self, success: bool, now: Instant) {
        match self.state {
            BreakerState::Closed => {
                if self.outcomes.len() == self.settings.window.max(1) {
                    self.outcomes.pop_front();
                }
                self.outcomes.push_back(success);
                let failures = self.outcomes.iter().filter(|ok| !**ok).count();
                let enough = self.outcomes.len() >= self.settings.min_calls.max(1);
                if enough && failures as f64 / self.outcomes.len() as f64 >= self.settings.failure_rate {
                    self.open(now);
                }
            }
            BreakerState::HalfOpen => {
                if !success {
                    self.open(now);
                    return;
                }
                self.probes_succeeded += 1;
                if self.probes_succeeded >= self.settings.probes.max(1) {
                    self.state = BreakerState::Closed;
                    self.outcomes.clear();
                    self.opened_at = None;
                }
            }
            // A late result of a call started before the breaker opened changes nothing.
            BreakerState::Open => {}
        }
    }

    fn open(&mut self, now: Instant) {
        self.state = BreakerState::Open;
        self.opened_at = Some(now);
        self.outcomes.clear();
    }

    fn open_for(&self) -> Duration {
        Duration::from_millis(self.settings.open_for_ms)
    }
}

/// A breaker shared between tasks (a consumer records, the heartbeat reports).
#[derive(Debug, Clone)]
pub struct SharedBreaker(Arc<Mutex<CircuitBreaker>>);

impl SharedBreaker {
    pub fn new(settings: BreakerSettings) -> Self {
        Self(Arc::new(Mutex::new(CircuitBreaker::new(settings))))
    }

    /// Runs `f` on the breaker (a poisoned lock is recovered: the state stays coherent).
    pub fn with<T>(&self, f: impl FnOnce(&mut CircuitBreaker) -> T) -> T {
        let mut breaker = self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        f(&mut breaker)
    }

    pub fn state(&self) -> BreakerState {
        self.with(|b| b.state(Instant::now()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker() -> CircuitBreaker {
        CircuitBreaker::new(BreakerSettings {
            failure_rate: 0.5,
            window: 4,
            min_calls: 4,
            open_for_ms: 1_000,
            probes: 2,
        })
    }

    fn calls(breaker: &mut CircuitBreaker, outcomes: &[bool], now: Instant) {
        for &ok in outcomes {
            assert!(breaker.try_acquire(now));
            breaker.record(ok, now);
        }
    }

    #[test]
    fn states_are_written_as_their_names() {
        for state in [BreakerState::Closed, BreakerState::Open, BreakerState::HalfOpen] {
            assert_eq!(serde_json::to_value(state).unwrap(), state.as_str());
            assert_eq!(serde_json::from_value::<BreakerState>(state.as_str().into()).unwrap(), state);
        }
    }

    #[test]
    fn it_stays_closed_below_the_threshold_or_with_too_few_calls() {
        let now = Instant::now();
        let mut b = breaker();
        calls(&mut b, &[false, false, false], now); // 3 calls < min_calls 4
        assert_eq!(b.state(now), BreakerState::Closed);
        let mut b = breaker();
        calls(&mut b, &[true, true, true, false, true, true], now); // 1 of the last 4 failed
        assert_eq!(b.state(now), BreakerState::Closed);
    }

    #[test]
    fn closed_opens_at_the_failure_rate_and_refuses_calls() {
        let now = Instant::now();
        let mut b = breaker();
        calls(&mut b, &[true, false, true, false], now); // 50% of 4
        assert_eq!(b.state(now), BreakerState::Open);
        assert!(!b.try_acquire(now));
        assert_eq!(b.retry_after(now), Some(Duration::from_secs(1)));
    }

    #[test]
    fn open_turns_half_open_after_its_time_and_lets_only_the_probes_through() {
        let start = Instant::now();
        let mut b = breaker();
        calls(&mut b, &[false; 4], start);
        let later = start + Duration::from_millis(1_000);
        assert_eq!(b.state(later), BreakerState::HalfOpen);
        assert!(b.try_acquire(later));
        assert!(b.try_acquire(later));
        assert!(!b.try_acquire(later), "only two probes");
    }

    #[test]
    fn successful_probes_close_it() {
        let start = Instant::now();
        let mut b = breaker();
        calls(&mut b, &[false; 4], start);
        let later = start + Duration::from_secs(1);
        calls(&mut b, &[true, true], later);
        assert_eq!(b.state(later), BreakerState::Closed);
        calls(&mut b, &[false, false, false], later); // a fresh window: not enough calls yet
        assert_eq!(b.state(later), BreakerState::Closed);
    }

    #[test]
    fn a_failed_probe_reopens_it_for_another_period() {
        let start = Instant::now();
        let mut b = breaker();
        calls(&mut b, &[false; 4], start);
        let later = start + Duration::from_secs(1);
        calls(&mut b, &[true, false], later);
        assert_eq!(b.state(later), BreakerState::Open);
        assert_eq!(b.state(later + Duration::from_millis(999)), BreakerState::Open);
        assert_eq!(b.state(later + Duration::from_secs(1)), BreakerState::HalfOpen);
    }

    #[test]
    fn a_released_probe_slot_can_be_taken_again_and_release_changes_nothing_else() {
        let start = Instant::now();
        let mut b = breaker();
        b.release(); // closed: nothing was taken
        calls(&mut b, &[false; 4], start);
        b.release(); // open: nothing was taken
        let later = start + Duration::from_secs(1);
        assert!(b.try_acquire(later) && b.try_acquire(later));
        assert!(!b.try_acquire(later));
        b.release();
        assert!(b.try_acquire(later), "the released slot is free again");
        assert!(!b.try_acquire(later));
        // The two probes that did run decide, as before.
        b.record(true, later);
        b.record(true, later);
        assert_eq!(b.state(later), BreakerState::Closed);
    }

    #[test]
    fn late_results_while_open_are_ignored() {
        let now = Instant::now();
        let mut b = breaker();
        calls(&mut b, &[false; 4], now);
        b.record(true, now);
        assert_eq!(b.state(now), BreakerState::Open);
    }
}
