//! What the API knows about workers: their heartbeats in Redis (written by each worker
//! every `worker.heartbeat_interval_ms`, expiring after
//! [`MISSED_BEATS_BEFORE_GONE`](spool_shared::heartbeat::MISSED_BEATS_BEFORE_GONE) missed beats).
//!
//! The API's view of each model is a breaker fed by the heartbeats: submissions are
//! refused (`503 model_unavailable`, `Retry-After`) when live workers serve the model and
//! either every one of them has that model's breaker open, or their recent calls taken
//! together fail at the breaker's rate (several workers each below `min_calls` can still
//! add up to a clear failure). A model with **no live worker is still accepted**: jobs wait durably in their queue and run when a worker
//! starts (a deploy or a crash-restart should not fail clients); clients that need a
//! fast answer use `Prefer: wait=N`. When Redis is unreachable nothing is refused.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Mutex;

use spool_shared::breaker::{BreakerSettings, BreakerState};
use spool_shared::heartbeat::{Heartbeat, ModelBeat};

use crate::error::ApiError;
use crate::redis_handle::RedisHandle;

const CACHE_FOR: Duration = Duration::from_secs(1);

/// Whether the API takes jobs for a model, from what its live workers report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelHealth {
    /// No live worker serves it: jobs are accepted and wait in the queue.
    NoWorker,
    Accepting,
    /// Every worker's breaker is open.
    BreakersOpen,
    /// The workers' recent calls, taken together, fail at the breaker's rate.
    Failing,
}

impl ModelHealth {
    pub fn assess(model: &str, workers: &[Heartbeat], breaker: &BreakerSettings) -> Self {
        let beats: Vec<&ModelBeat> = workers.iter().filter_map(|w| w.models.get(model)).collect();
        if beats.is_empty() {
            return Self::NoWorker;
        }
        if beats.iter().all(|m| m.breaker == BreakerState::Open) {
            return Self::BreakersOpen;
        }
        let calls: u32 = beats.iter().map(|m| m.calls).sum();
        let failures: u32 = beats.iter().map(|m| m.failures).sum();
        if calls as usize >= breaker.min_calls.max(1) && f64::from(failures) / f64::from(calls) >= breaker.failure_rate
        {
            return Self::Failing;
        }
        Self::Accepting
    }

    pub fn accepting(self) -> bool {
        matches!(self, Self::NoWorker | Self::Accepting)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::NoWorker => "no_worker",
            Self::Accepting => "accepting",
            Self::BreakersOpen => "breakers_open",
            Self::Failing => "failing",
        }
    }
}

/// When the workers were read, and what was read.
type Snapshot = (Instant, Vec<Heartbeat>);

#[derive(Clone)]
pub struct WorkerRegistry {
    redis: RedisHandle,
    cache: Arc<Mutex<Option<Snapshot>>>,
    breaker: BreakerSettings,
}

impl WorkerRegistry {
    /// `breaker`: the workers' model breaker settings, whose rate and minimum the API
    /// applies to the workers' combined recent calls.
    pub fn new(redis: RedisHandle, breaker: BreakerSettings) -> Self {
        Self { redis, cache: Arc::new(Mutex::new(None)), breaker }
    }

    pub fn health(&self, model: &str, workers: &[Heartbeat]) -> ModelHealth {
        ModelHealth::assess(model, workers, &self.breaker)
    }

    /// Live workers (cached for a second); `None` when Redis cannot be asked.
    pub async fn live(&self) -> Option<Vec<Heartbeat>> {
        let mut cache = self.cache.lock().await;
        if let Some((at, workers)) = cache.as_ref()
            && at.elapsed() < CACHE_FOR
        {
            return Some(workers.clone());
        }
        let workers = self.read().await?;
        *cache = Some((Instant::now(), workers.clone()));
        Some(workers)
    }

    async fn read(&self) -> Option<Vec<Heartbeat>> {
        let pattern = self.redis.key("worker:*");
        let mut keys = Vec::new();
        let mut cursor = "0".to_owned();
        loop {
            let mut scan = redis::cmd("SCAN");
            scan.arg(&cursor).arg("MATCH").arg(&pattern).arg("COUNT").arg(500);
            let (next, mut found): (String, Vec<String>) = self.redis.query(&scan).await.ok()?;
            keys.append(&mut found);
            if next == "0" {
                break;
            }
            cursor = next;
        }
        if keys.is_empty() {
            return Some(Vec::new());
        }
        let mut get = redis::cmd("MGET");
        get.arg(&keys);
        let values: Vec<Option<String>> = self.redis.query(&get).await.ok()?;
        let mut workers: Vec<Heartbeat> =
            values.into_iter().flatten().filter_map(|v| serde_json::from_str(&v).ok()).collect();
        workers.sort_by(|a, b| a.worker_id.cmp(&b.worker_id));
        Some(workers)
    }

    /// Refuses a submission for a model that is failing on its workers (see the module
    /// docs). Nothing is refused when Redis cannot be asked.
    pub async fn check_model(&self, model: &str) -> Result<(), ApiError> {
        let Some(workers) = self.live().await else { return Ok(()) };
        let health = self.health(model, &workers);
        if !health.accepting() {
            metrics::counter!("spool_api_rejected_unavailable_total", "model" => model.to_owned(), "reason" => health.as_str())
                .increment(1);
            return Err(ApiError::ModelUnavailable(model.to_owned()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use BreakerState::{Closed, HalfOpen, Open};

    fn worker(model: &str, breaker: BreakerState, calls: u32, failures: u32) -> Heartbeat {
        Heartbeat {
            worker_id: format!("w-{}-{calls}", breaker.as_str()),
            device: "cpu".into(),
            database: None,
            models: [(model.to_owned(), ModelBeat { breaker, calls, failures })].into(),
            started_at: chrono::Utc::now(),
            seen_at: chrono::Utc::now(),
        }
    }

    fn assess(workers: &[Heartbeat]) -> ModelHealth {
        let settings = BreakerSettings { failure_rate: 0.5, min_calls: 10, ..Default::default() };
        ModelHealth::assess("m", workers, &settings)
    }

    #[test]
    fn a_model_without_live_workers_still_queues() {
        assert_eq!(assess(&[]), ModelHealth::NoWorker);
        assert_eq!(assess(&[worker("other", Open, 0, 0)]), ModelHealth::NoWorker);
        assert!(ModelHealth::NoWorker.accepting());
    }

    #[test]
    fn all_breakers_open_refuses_one_closed_accepts() {
        assert_eq!(assess(&[worker("m", Open, 0, 0), worker("m", Open, 0, 0)]), ModelHealth::BreakersOpen);
        assert_eq!(assess(&[worker("m", Open, 0, 0), worker("m", Closed, 4, 0)]), ModelHealth::Accepting);
    }

    #[test]
    fn combined_recent_failures_refuse_once_there_are_enough_calls() {
        // Each worker alone is below min_calls; together they fail at 60%.
        let failing = [worker("m", Closed, 5, 3), worker("m", HalfOpen, 5, 3)];
        assert_eq!(assess(&failing), ModelHealth::Failing);
        assert!(!ModelHealth::Failing.accepting());
        assert_eq!(assess(&[worker("m", Closed, 5, 5)]), ModelHealth::Accepting, "too few calls");
        assert_eq!(assess(&[worker("m", Closed, 10, 4), worker("m", Closed, 10, 5)]), ModelHealth::Accepting);
    }
}
