//! What to do with a failed attempt: retry after a backoff, dead-letter, or fail.
//!
//! Backoff uses tiered delay queues (`spool.retry.<delay>`): attempt n goes to tier n-1
//! (the last tier repeats), and one retry in four skips ahead a tier, so jobs that failed
//! together do not all come back together (jitter by tier choice).

use std::time::Duration;

use crate::job::JobError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    tiers: Vec<Duration>,
    max_attempts: u32,
}

/// The fate of a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryDecision {
    /// Run again after `delay`, one of the policy's tiers.
    Retry { delay: Duration },
    /// Retryable, but out of attempts: fail and dead-letter.
    DeadLetter,
    /// Not retryable (the model rejects the input): fail now.
    Fail,
}

impl RetryPolicy {
    /// `tiers`: the delays of the retry tiers the topology declares (each one a
    /// `spool.retry.<delay>` exchange), shortest first.
    pub fn new(tiers: Vec<Duration>, max_attempts: u32) -> Self {
        Self { tiers, max_attempts: max_attempts.max(1) }
    }

    /// `attempt` is the 1-based number of the attempt that just failed; `jitter` is a
    /// uniform random number in [0, 1).
    pub fn decide(&self, error: &JobError, attempt: u32, jitter: f64) -> RetryDecision {
        if !error.retryable {
            return RetryDecision::Fail;
        }
        if attempt >= self.max_attempts || self.tiers.is_empty() {
            return RetryDecision::DeadLetter;
        }
        let last = self.tiers.len() - 1;
        let base = (attempt.saturating_sub(1) as usize).min(last);
        let tier = if jitter < 0.25 { (base + 1).min(last) } else { base };
        RetryDecision::Retry { delay: self.tiers[tier] }
    }
}

/// The name part of a tier: `1s`, `30s`, `2m`, or `250ms`.
pub fn tier_name(delay: Duration) -> String {
    let ms = delay.as_millis();
    if ms.is_multiple_of(60_000) {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        let tiers = [1, 5, 30, 120].map(Duration::from_secs).to_vec();
        RetryPolicy::new(tiers, 4)
    }

    fn after(seconds: u64) -> RetryDecision {
        RetryDecision::Retry { delay: Duration::from_secs(seconds) }
    }

    #[test]
    fn retryable_failures_climb_the_tiers_until_attempts_run_out() {
        let error = JobError::retryable("inference_error", "boom");
        assert_eq!(policy().decide(&error, 1, 0.9), after(1));
        assert_eq!(policy().decide(&error, 2, 0.9), after(5));
        assert_eq!(policy().decide(&error, 3, 0.9), after(30));
        assert_eq!(policy().decide(&error, 4, 0.9), RetryDecision::DeadLetter);
    }

    #[test]
    fn jitter_sometimes_skips_ahead_a_tier_but_never_past_the_last() {
        let error = JobError::retryable("inference_error", "boom");
        assert_eq!(policy().decide(&error, 1, 0.1), after(5));
        let long = RetryPolicy::new(vec![Duration::from_secs(1)], 10);
        assert_eq!(long.decide(&error, 5, 0.1), after(1));
    }

    #[test]
    fn fatal_failures_are_not_retried() {
        let error = JobError::fatal("invalid_input", "bad pixels");
        assert_eq!(policy().decide(&error, 1, 0.5), RetryDecision::Fail);
    }

    #[test]
    fn tiers_are_named_by_their_delay() {
        assert_eq!(tier_name(Duration::from_secs(1)), "1s");
        assert_eq!(tier_name(Duration::from_secs(120)), "2m");
        assert_eq!(tier_name(Duration::from_millis(250)), "250ms");
    }
}
