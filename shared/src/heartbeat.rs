//! The worker heartbeat: what each worker writes to Redis every
//! `worker.heartbeat_interval_ms` (as JSON, at `<redis_prefix>:worker:<id>`), and what
//! the API reads to list workers and to judge each model's health. The API's admin and
//! model endpoints pass these fields on, so the JSON form is part of its contract.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::breaker::BreakerState;

/// A heartbeat expires after this many intervals without a new one: the worker is then
/// gone from the API's view.
pub const MISSED_BEATS_BEFORE_GONE: u32 = 5;

/// One worker, as of its latest beat.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub worker_id: String,
    /// `cpu` or `cuda(0)`.
    pub device: String,
    /// Each model it serves, by name.
    pub models: BTreeMap<String, ModelBeat>,
    /// The worker's PostgreSQL breaker (missing from the beats of older workers).
    #[serde(default)]
    pub database: Option<BreakerState>,
    pub started_at: DateTime<Utc>,
    pub seen_at: DateTime<Utc>,
}

/// One model on one worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelBeat {
    /// The worker's breaker around the model's runtime.
    pub breaker: BreakerState,
    /// Calls and failures in that breaker's current window.
    #[serde(default)]
    pub calls: u32,
    #[serde(default)]
    pub failures: u32,
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn the_json_form_is_the_one_workers_have_always_written() {
        let at = DateTime::parse_from_rfc3339("2026-11-29T10:00:00Z").unwrap().with_timezone(&Utc);
        let beat = Heartbeat {
            worker_id: "w1".into(),
            device: "cpu".into(),
            models: [
                ("a".to_owned(), ModelBeat { breaker: BreakerState::Closed, calls: 20, failures: 1 }),
                ("b".to_owned(), ModelBeat { breaker: BreakerState::HalfOpen, calls: 0, failures: 0 }),
            ]
            .into(),
            database: Some(BreakerState::Open),
            started_at: at,
            seen_at: at,
        };
        let written = json!({
            "worker_id": "w1", "device": "cpu", "database": "open",
            "models": {
                "a": {"breaker": "closed", "calls": 20, "failures": 1},
                "b": {"breaker": "half_open", "calls": 0, "failures": 0},
            },
            "started_at": "2026-11-29T10:00:00Z", "seen_at": "2026-11-29T10:00:00Z",
        });
        assert_eq!(serde_json::to_value(&beat).unwrap(), written);
        assert_eq!(serde_json::from_value::<Heartbeat>(written).unwrap(), beat);
    }

    #[test]
    fn beats_of_older_workers_still_read() {
        let old = json!({
            "worker_id": "w0", "device": "cuda(0)", "models": {"a": {"breaker": "open"}},
            "started_at": "2026-11-24T10:00:00Z", "seen_at": "2026-11-24T10:00:02Z",
        });
        let beat: Heartbeat = serde_json::from_value(old).unwrap();
        assert_eq!(beat.database, None);
        assert_eq!(beat.models["a"], ModelBeat { breaker: BreakerState::Open, calls: 0, failures: 0 });
    }
}
