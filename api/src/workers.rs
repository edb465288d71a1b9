//! What the API knows about workers: their heartbeats in Redis (written by each worker
//! every `worker.heartbeat_interval_ms`, expiring after five missed beats).
//!
//! Submissions for a model are refused (`503 model_unavailable`) only when live workers
//! serve it and every one of them has that model's breaker open. A model with **no live
//! worker is still accepted**: jobs wait durably in their queue and run when a worker
//! starts (a deploy or a crash-restart should not fail clients); clients that need a
//! fast answer use `Prefer: wait=N`. When Redis is unreachable nothing is refused.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Deserialize;
use tokio::sync::Mutex;

use crate::error::ApiError;
use crate::redis_handle::RedisHandle;

const CACHE_FOR: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Deserialize)]
pub struct WorkerBeat {
    pub worker_id: String,
    pub device: String,
    pub models: BTreeMap<String, ModelBeat>,
    pub started_at: chrono::DateTime<chrono::Utc>,
    pub seen_at: chrono::DateTime<chrono::Utc>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ModelBeat {
    /// `closed`, `open` or `half_open`.
    pub breaker: String,
}

/// When the workers were read, and what was read.
type Snapshot = (Instant, Vec<WorkerBeat>);

#[derive(Clone)]
pub struct WorkerRegistry {
    redis: RedisHandle,
    cache: Arc<Mutex<Option<Snapshot>>>,
}

impl WorkerRegistry {
    pub fn new(redis: RedisHandle) -> Self {
        Self { redis, cache: Arc::new(Mutex::new(None)) }
    }

    /// Live workers (cached for a second); `None` when Redis cannot be asked.
    pub async fn live(&self) -> Option<Vec<WorkerBeat>> {
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

    async fn read(&self) -> Option<Vec<WorkerBeat>> {
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
        let mut workers: Vec<WorkerBeat> =
            values.into_iter().flatten().filter_map(|v| serde_json::from_str(&v).ok()).collect();
        workers.sort_by(|a, b| a.worker_id.cmp(&b.worker_id));
        Some(workers)
    }

    /// Refuses a submission when every live worker serving `model` has its breaker open.
    pub async fn check_model(&self, model: &str) -> Result<(), ApiError> {
        let Some(workers) = self.live().await else { return Ok(()) };
        let states: Vec<&str> =
            workers.iter().filter_map(|w| w.models.get(model)).map(|m| m.breaker.as_str()).collect();
        if !states.is_empty() && states.iter().all(|s| *s == "open") {
            metrics::counter!("spool_api_rejected_unavailable_total", "model" => model.to_owned()).increment(1);
            return Err(ApiError::ModelUnavailable(model.to_owned()));
        }
        Ok(())
    }
}
