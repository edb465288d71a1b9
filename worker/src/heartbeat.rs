//! The worker announces itself in Redis every few seconds: which models it serves, each
//! model's breaker with its recent calls and failures, and the PostgreSQL breaker. The API
//! reads these to list workers and to refuse jobs for a model that is failing everywhere.

use std::time::{Duration, Instant};

use chrono::Utc;
use secrecy::ExposeSecret;
use spool_shared::Settings;
use spool_shared::breaker::{BreakerState, SharedBreaker};
use spool_shared::heartbeat::{Heartbeat, MISSED_BEATS_BEFORE_GONE, ModelBeat};
use tokio_util::sync::CancellationToken;

use crate::runtime::ModelHandle;

/// 0 closed, 1 half-open, 2 open: alert on a value of 2 that lasts.
fn level(state: BreakerState) -> f64 {
    match state {
        BreakerState::Closed => 0.0,
        BreakerState::HalfOpen => 1.0,
        BreakerState::Open => 2.0,
    }
}

/// A breaker window's count (a few dozen calls) as the heartbeat carries it.
fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Key of a worker's heartbeat (`<redis_prefix>:worker:<id>`).
pub fn key(prefix: &str, worker_id: &str) -> String {
    format!("{prefix}:worker:{worker_id}")
}

/// Writes the heartbeat until shutdown, then removes it. Redis being down only means
/// the API cannot see this worker for a while: it logs and keeps trying.
pub async fn run(
    settings: Settings,
    worker_id: String,
    device: String,
    models: Vec<ModelHandle>,
    database_breaker: SharedBreaker,
    shutdown: CancellationToken,
) {
    let interval = Duration::from_millis(settings.worker.heartbeat_interval_ms.max(100));
    let ttl_ms = (interval * MISSED_BEATS_BEFORE_GONE).as_millis() as u64;
    let key = key(&settings.redis_prefix, &worker_id);
    let started_at = Utc::now();
    let client = match redis::Client::open(settings.redis_url.expose_secret()) {
        Ok(client) => client,
        Err(error) => {
            tracing::error!(%error, "invalid redis_url; no heartbeats");
            return;
        }
    };
    let mut connection = None;
    loop {
        let beats = models
            .iter()
            .map(|m| {
                let (breaker, (calls, failures)) = m.breaker.with(|b| (b.state(Instant::now()), b.recent()));
                metrics::gauge!("spool_worker_breaker_state", "breaker" => m.spec.name.clone()).set(level(breaker));
                let (calls, failures) = (count(calls), count(failures));
                (m.spec.name.clone(), ModelBeat { breaker, calls, failures })
            })
            .collect();
        let database = database_breaker.state();
        metrics::gauge!("spool_worker_breaker_state", "breaker" => "postgres").set(level(database));
        let beat = Heartbeat {
            worker_id: worker_id.clone(),
            device: device.clone(),
            models: beats,
            database: Some(database),
            started_at,
            seen_at: Utc::now(),
        };
        let beat = serde_json::to_string(&beat).expect("a heartbeat always serializes. This is a bug.");
        if connection.is_none() {
            connection = tokio::time::timeout(Duration::from_secs(1), client.get_multiplexed_async_connection())
                .await
                .ok()
                .and_then(Result::ok);
        }
        if let Some(conn) = connection.as_mut() {
            let mut command = redis::cmd("SET");
            command.arg(&key).arg(beat).arg("PX").arg(ttl_ms);
            let written = tokio::time::timeout(Duration::from_secs(1), command.query_async::<()>(conn)).await;
            let failure = match written {
                Ok(Ok(())) => None,
                Ok(Err(error)) => Some(error.to_string()),
                Err(_) => Some("timeout".to_owned()),
            };
            if let Some(error) = failure {
                tracing::warn!(%error, "heartbeat not written");
                connection = None;
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(interval) => {}
        }
    }
    if let Some(conn) = connection.as_mut() {
        let _ = redis::cmd("DEL").arg(&key).query_async::<()>(conn).await;
    }
}
