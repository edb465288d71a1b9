//! `/v1/admin/*`: operators inspect, requeue and purge dead letters.

use chrono::{DateTime, Utc};
use poem::web::Data;
use poem_openapi::param::{Path, Query};
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Object, OpenApi};
use spool_shared::breaker::BreakerState;
use uuid::Uuid;

use super::ApiTags;
use crate::admin::{self, DeadLetterFilter, RequeueSelector};
use crate::auth::BearerAuth;
use crate::body::JsonBody;
use crate::error::{ApiError, Dependency};
use crate::state::AppState;

/// A job that failed after its last retryable attempt.
#[derive(Object)]
pub struct DeadLetter {
    pub job_id: Uuid,
    pub owner_id: Uuid,
    pub model: String,
    /// The input, cut to 200 characters.
    pub input_summary: String,
    pub attempts: i32,
    /// The last error: `{code, message, retryable}`.
    pub error: serde_json::Value,
    /// Every attempt: `{attempt, worker_id, started_at, finished_at, outcome, error}`;
    /// `outcome` is `succeeded`, `failed`, `retry`, `dead_lettered` or `taken_over`.
    pub attempt_log: serde_json::Value,
    #[oai(nullable)]
    pub failed_at: Option<DateTime<Utc>>,
}

impl From<admin::DeadLetter> for DeadLetter {
    fn from(d: admin::DeadLetter) -> Self {
        Self {
            job_id: d.job_id,
            owner_id: d.owner_id,
            model: d.model,
            input_summary: d.input_summary,
            attempts: d.attempts,
            error: d.error,
            attempt_log: d.attempt_log,
            failed_at: d.failed_at,
        }
    }
}

#[derive(Object)]
pub struct DeadLetterList {
    pub data: Vec<DeadLetter>,
}

/// Exactly one of `ids`, `model`, or `all: true`.
#[derive(Object)]
pub struct RequeueRequest {
    #[oai(nullable)]
    pub ids: Option<Vec<Uuid>>,
    #[oai(nullable)]
    pub model: Option<String>,
    #[oai(default)]
    pub all: bool,
}

#[derive(Object)]
pub struct Affected {
    /// How many jobs the action changed.
    pub count: u64,
}

/// A live worker, from its heartbeat.
#[derive(Object)]
pub struct Worker {
    pub worker_id: String,
    /// `cpu` or `cuda(0)`.
    pub device: String,
    /// Breaker state (`closed`, `open`, `half_open`) of each model it serves.
    pub breakers: std::collections::BTreeMap<String, String>,
    /// Its PostgreSQL breaker: while open it takes no jobs and holds the ones in hand.
    #[oai(nullable)]
    pub database_breaker: Option<String>,
    pub started_at: DateTime<Utc>,
    pub seen_at: DateTime<Utc>,
}

#[derive(Object)]
pub struct WorkerList {
    pub data: Vec<Worker>,
}

/// One model's breakers across the live workers.
#[derive(Object)]
pub struct ModelBreakers {
    pub model: String,
    pub workers: u32,
    pub closed: u32,
    pub open: u32,
    pub half_open: u32,
    /// Recent calls and failures across the workers' breaker windows.
    pub recent_calls: u32,
    pub recent_failures: u32,
    /// `no_worker` (jobs still queue), `accepting`, `breakers_open` or `failing`.
    pub health: String,
    /// Whether `POST /v1/jobs` accepts jobs for it.
    pub accepting: bool,
}

#[derive(Object)]
pub struct BreakerList {
    pub data: Vec<ModelBreakers>,
}

#[derive(ApiResponse)]
pub enum WorkersResponse {
    #[oai(status = 200)]
    Ok(Json<WorkerList>),
}

#[derive(ApiResponse)]
pub enum BreakersResponse {
    #[oai(status = 200)]
    Ok(Json<BreakerList>),
}

#[derive(ApiResponse)]
pub enum ListDeadLettersResponse {
    #[oai(status = 200)]
    Ok(Json<DeadLetterList>),
}

#[derive(ApiResponse)]
pub enum GetDeadLetterResponse {
    #[oai(status = 200)]
    Ok(Json<DeadLetter>),
}

#[derive(ApiResponse)]
pub enum AffectedResponse {
    #[oai(status = 200)]
    Ok(Json<Affected>),
}

pub struct AdminApi;

#[OpenApi(prefix_path = "/v1/admin", tag = "ApiTags::Operators")]
impl AdminApi {
    /// List dead letters (operators)
    #[oai(path = "/dead-letters", method = "get", operation_id = "list_dead_letters")]
    #[allow(clippy::too_many_arguments)] // one extractor per query parameter
    async fn list(
        &self,
        state: Data<&AppState>,
        auth: BearerAuth,
        model: Query<Option<String>>,
        /// The last error's code, e.g. `inference_error`.
        error_code: Query<Option<String>>,
        /// Failed at or after.
        since: Query<Option<DateTime<Utc>>>,
        /// Failed before.
        until: Query<Option<DateTime<Utc>>>,
        /// 1–1000 (default 100).
        #[oai(validator(minimum(value = "1"), maximum(value = "1000")))]
        limit: Query<Option<u64>>,
    ) -> Result<ListDeadLettersResponse, ApiError> {
        auth.0.require_operator()?;
        let limit = limit.0.unwrap_or(100);
        let filter =
            DeadLetterFilter { job_id: None, model: model.0, error_code: error_code.0, since: since.0, until: until.0 };
        let rows = admin::list(&state.db, &filter, limit).await?;
        let data = rows.into_iter().map(DeadLetter::from).collect();
        Ok(ListDeadLettersResponse::Ok(Json(DeadLetterList { data })))
    }

    /// One dead letter with its whole attempt log (operators)
    #[oai(path = "/dead-letters/:job_id", method = "get", operation_id = "get_dead_letter")]
    async fn get(
        &self,
        state: Data<&AppState>,
        auth: BearerAuth,
        job_id: Path<String>,
    ) -> Result<GetDeadLetterResponse, ApiError> {
        auth.0.require_operator()?;
        let job_id = super::parse_id(&job_id.0, ApiError::JobNotFound)?;
        let filter = DeadLetterFilter { job_id: Some(job_id), ..Default::default() };
        let letter = admin::list(&state.db, &filter, 1).await?.into_iter().next().ok_or(ApiError::JobNotFound)?;
        Ok(GetDeadLetterResponse::Ok(Json(letter.into())))
    }

    /// Live workers and their breakers (operators)
    #[oai(path = "/workers", method = "get", operation_id = "list_workers")]
    async fn workers(&self, state: Data<&AppState>, auth: BearerAuth) -> Result<WorkersResponse, ApiError> {
        auth.0.require_operator()?;
        let workers = state.workers.live().await.ok_or_else(|| ApiError::Unavailable(Dependency::Redis))?;
        let data = workers
            .into_iter()
            .map(|w| Worker {
                worker_id: w.worker_id,
                device: w.device,
                breakers: w.models.into_iter().map(|(name, m)| (name, m.breaker.as_str().to_owned())).collect(),
                database_breaker: w.database.map(|state| state.as_str().to_owned()),
                started_at: w.started_at,
                seen_at: w.seen_at,
            })
            .collect();
        Ok(WorkersResponse::Ok(Json(WorkerList { data })))
    }

    /// Breaker states per model across live workers (operators)
    #[oai(path = "/breakers", method = "get", operation_id = "list_breakers")]
    async fn breakers(&self, state: Data<&AppState>, auth: BearerAuth) -> Result<BreakersResponse, ApiError> {
        auth.0.require_operator()?;
        let workers = state.workers.live().await.ok_or_else(|| ApiError::Unavailable(Dependency::Redis))?;
        let data = state
            .catalog
            .names()
            .into_iter()
            .map(|model| {
                let beats: Vec<_> = workers.iter().filter_map(|w| w.models.get(&model)).collect();
                let count = |state: BreakerState| beats.iter().filter(|m| m.breaker == state).count() as u32;
                let health = state.workers.health(&model, &workers);
                ModelBreakers {
                    workers: beats.len() as u32,
                    closed: count(BreakerState::Closed),
                    half_open: count(BreakerState::HalfOpen),
                    open: count(BreakerState::Open),
                    recent_calls: beats.iter().map(|m| m.calls).sum(),
                    recent_failures: beats.iter().map(|m| m.failures).sum(),
                    health: health.as_str().into(),
                    accepting: health.accepting(),
                    model,
                }
            })
            .collect();
        Ok(BreakersResponse::Ok(Json(BreakerList { data })))
    }

    /// Requeue dead letters with a fresh attempt budget (operators)
    #[oai(path = "/dead-letters/requeue", method = "post", operation_id = "requeue_dead_letters")]
    async fn requeue(
        &self,
        state: Data<&AppState>,
        auth: BearerAuth,
        body: JsonBody<RequeueRequest>,
    ) -> Result<AffectedResponse, ApiError> {
        auth.0.require_operator()?;
        let selector = RequeueSelector::parse(body.0.ids, body.0.model, body.0.all)?;
        let count = admin::requeue(&state.db, &state.publisher, auth.0.user_id, &selector).await?;
        Ok(AffectedResponse::Ok(Json(Affected { count })))
    }

    /// Purge dead letters matching a filter; the jobs stay failed (operators)
    #[oai(path = "/dead-letters", method = "delete", operation_id = "purge_dead_letters")]
    async fn purge(
        &self,
        state: Data<&AppState>,
        auth: BearerAuth,
        model: Query<Option<String>>,
        error_code: Query<Option<String>>,
        since: Query<Option<DateTime<Utc>>>,
        until: Query<Option<DateTime<Utc>>>,
    ) -> Result<AffectedResponse, ApiError> {
        auth.0.require_operator()?;
        let filter =
            DeadLetterFilter { job_id: None, model: model.0, error_code: error_code.0, since: since.0, until: until.0 };
        let count = admin::purge(&state.db, auth.0.user_id, &filter).await?;
        Ok(AffectedResponse::Ok(Json(Affected { count })))
    }
}
