//! `/v1/jobs`: submit, get (with long-poll), list, cancel.

use std::time::Duration;

use chrono::{DateTime, Utc};
use poem::middleware::ReqId;
use poem::web::Data;
use poem_openapi::param::{Header, Path, Query};
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Enum, Object, OpenApi};
use spool_shared::entities::jobs as job_rows;
use spool_shared::job::{JobError, JobStatus};
use uuid::Uuid;

use super::webhooks::{DeliveryList, DeliveryListResponse};
use super::{ApiTags, parse_id};
use crate::auth::{BearerAuth, Scope};
use crate::body::JsonBody;
use crate::error::ApiError;
use crate::jobs::{self, IdempotencyKey, JobRequest, ListQuery, Submission, WebhookRequest};
use crate::state::AppState;
use crate::webhooks;

/// A job's state, as clients see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename_all = "snake_case")]
pub enum Status {
    Queued,
    Running,
    Succeeded,
    Failed,
    Canceled,
}

impl From<Status> for JobStatus {
    fn from(status: Status) -> Self {
        match status {
            Status::Queued => Self::Queued,
            Status::Running => Self::Running,
            Status::Succeeded => Self::Succeeded,
            Status::Failed => Self::Failed,
            Status::Canceled => Self::Canceled,
        }
    }
}

impl From<JobStatus> for Status {
    fn from(status: JobStatus) -> Self {
        match status {
            JobStatus::Queued => Self::Queued,
            JobStatus::Running => Self::Running,
            JobStatus::Succeeded => Self::Succeeded,
            JobStatus::Failed => Self::Failed,
            JobStatus::Canceled => Self::Canceled,
        }
    }
}

/// Why a job failed.
#[derive(Debug, Clone, Object)]
pub struct JobFailure {
    /// Stable machine-readable code, e.g. `invalid_input`, `inference_error`.
    pub code: String,
    pub message: String,
    /// Whether running the job again could succeed.
    pub retryable: bool,
}

/// An inference job.
#[derive(Debug, Clone, Object)]
pub struct Job {
    pub id: Uuid,
    pub model: String,
    pub status: Status,
    pub input: serde_json::Value,
    /// The model's output once the job succeeded (its shape is the model's output schema).
    #[oai(nullable)]
    pub output: Option<serde_json::Value>,
    #[oai(nullable)]
    pub error: Option<JobFailure>,
    /// How many times a worker started the job.
    pub attempts: i32,
    pub created_at: DateTime<Utc>,
    #[oai(nullable)]
    pub started_at: Option<DateTime<Utc>>,
    #[oai(nullable)]
    pub completed_at: Option<DateTime<Utc>>,
    /// Milliseconds between submission and the start of the last attempt.
    #[oai(nullable)]
    pub queue_ms: Option<f64>,
    /// Milliseconds the model took for the batch this job ran in; null until it has run,
    /// or when its last attempt's forward failed or timed out.
    #[oai(nullable)]
    pub inference_ms: Option<f64>,
    /// How many jobs shared the forward pass.
    #[oai(nullable)]
    pub batch_size: Option<i32>,
    /// Failed after its last retryable attempt; an operator may requeue it.
    pub dead_lettered: bool,
    /// Not started by then: it fails with `deadline_exceeded`.
    #[oai(nullable)]
    pub start_deadline: Option<DateTime<Utc>>,
    /// The `x-request-id` of the request that submitted the job (the worker logs it with
    /// the job's outcome).
    #[oai(nullable)]
    pub request_id: Option<String>,
    /// The batch the job was submitted in, if any.
    #[oai(nullable)]
    pub batch_id: Option<Uuid>,
}

impl From<job_rows::Model> for Job {
    fn from(row: job_rows::Model) -> Self {
        let status = JobStatus::parse(&row.status).unwrap_or(JobStatus::Failed).into();
        let error = row.error.and_then(|e| serde_json::from_value::<JobError>(e).ok()).map(|e| JobFailure {
            code: e.code,
            message: e.message,
            retryable: e.retryable,
        });
        Self {
            id: row.id,
            model: row.model,
            status,
            input: row.input,
            output: row.output,
            error,
            attempts: row.attempts,
            created_at: row.created_at,
            started_at: row.started_at,
            completed_at: row.completed_at,
            queue_ms: row.queue_ms,
            inference_ms: row.inference_ms,
            batch_size: row.batch_size,
            dead_lettered: row.dead_lettered,
            start_deadline: row.start_deadline,
            request_id: row.request_id,
            batch_id: row.batch_id,
        }
    }
}

/// What to run.
#[derive(Debug, Object)]
pub struct SubmitJobRequest {
    /// A model name from `GET /v1/models`.
    pub model: String,
    /// The model's input, matching its input schema.
    pub input: serde_json::Value,
    /// Time-to-start deadline in seconds (1–604800): a job not started by then fails
    /// with `deadline_exceeded` and never runs.
    #[oai(nullable, validator(minimum(value = "1"), maximum(value = "604800")))]
    pub start_within_secs: Option<u64>,
    /// An `https` URL (public address) to POST this job's events to, signed with the
    /// account's job webhook secret (`GET /v1/webhooks/job-secret`).
    #[oai(nullable, validator(max_length = 2048))]
    pub webhook: Option<String>,
    /// Which events go to `webhook`: `started`, `completed` (succeeded, failed or
    /// canceled). Default `["completed"]`.
    #[oai(nullable, validator(max_items = 2))]
    pub webhook_events: Option<Vec<String>>,
}

#[derive(ApiResponse)]
pub enum SubmitJobResponse {
    /// Accepted: the job is committed and will run. Poll `Location`.
    #[oai(status = 202)]
    Accepted(
        Json<Job>,
        #[oai(header = "Location")] String,
        /// `wait=N`: the wait this answer kept to (N may be lower than asked).
        #[oai(header = "Preference-Applied")]
        Option<String>,
    ),
    /// The job finished within the `Prefer: wait` time, or this replays an earlier
    /// request with the same `Idempotency-Key` and body.
    #[oai(status = 200)]
    Done(
        Json<Job>,
        #[oai(header = "Preference-Applied")] Option<String>,
        #[oai(header = "Idempotent-Replayed")] Option<String>,
    ),
}

#[derive(ApiResponse)]
pub enum GetJobResponse {
    #[oai(status = 200)]
    Ok(Json<Job>),
}

/// One page of jobs, newest first.
#[derive(Debug, Object)]
pub struct JobPage {
    pub data: Vec<Job>,
    /// Pass as `cursor` to get the next page; null on the last page.
    #[oai(nullable)]
    pub next_cursor: Option<String>,
}

#[derive(ApiResponse)]
pub enum ListJobsResponse {
    #[oai(status = 200)]
    Ok(Json<JobPage>),
}

pub struct JobsApi;

#[OpenApi(prefix_path = "/v1", tag = "ApiTags::Jobs")]
impl JobsApi {
    /// Submit a job
    ///
    /// Validates the input against the model's schema, commits the job and queues it.
    /// `Idempotency-Key` makes retries safe: the same key and body return the original
    /// job; the same key with another body is a 409. `Prefer: wait=N` holds the response
    /// until the job finishes or N seconds pass (N up to the server's `api.max_wait_secs`).
    #[oai(path = "/jobs", method = "post", operation_id = "submit_job")]
    async fn submit(
        &self,
        state: Data<&AppState>,
        auth: BearerAuth,
        /// 1–255 visible ASCII characters; a retry with the same key and body is answered
        /// with the original.
        #[oai(name = "Idempotency-Key")]
        idempotency_key: Header<Option<String>>,
        /// `wait=N`: answer when the job finishes, or after N seconds with the `202`
        /// (N up to the server's `api.max_wait_secs`, 60 by default).
        #[oai(name = "Prefer")]
        prefer: Header<Option<String>>,
        request_id: Data<&ReqId>,
        body: JsonBody<SubmitJobRequest>,
    ) -> Result<SubmitJobResponse, ApiError> {
        auth.0.require_api(Scope::JobsWrite)?;
        let max_wait = state.settings.api.max_wait_secs;
        let wait = prefer.0.as_deref().and_then(parse_prefer_wait).map(|secs| secs.min(max_wait)).filter(|&s| s > 0);
        let body = body.0;
        let request = JobRequest {
            model: body.model,
            input: body.input,
            start_within: body.start_within_secs.map(Duration::from_secs),
            webhook: body.webhook.map(|url| WebhookRequest { url, events: body.webhook_events }),
            key: idempotency_key.0.map(IdempotencyKey::try_from).transpose()?,
            request_id: Some(request_id.0.to_string()),
        };
        let owner = auth.0.user_id;
        let job = match jobs::accept(&state, owner, request).await? {
            Submission::Replayed(job) => {
                return Ok(SubmitJobResponse::Done(Json(job.into()), None, Some("true".into())));
            }
            Submission::Created(job) => job,
        };
        let Some(secs) = wait else { return Ok(accepted(job, None)) };
        let job = jobs::wait_for(&state.db, &state.waiters, owner, job.id, Duration::from_secs(secs)).await?;
        let applied = Some(format!("wait={secs}"));
        Ok(if jobs::is_terminal(&job) {
            SubmitJobResponse::Done(Json(job.into()), applied, None)
        } else {
            accepted(job, applied)
        })
    }

    /// Get a job
    ///
    /// `wait=N` long-polls: the response comes as soon as the job finishes, or after N
    /// seconds (at most the server's `api.max_wait_secs`) with the job as it is.
    #[oai(path = "/jobs/:id", method = "get", operation_id = "get_job")]
    async fn get(
        &self,
        state: Data<&AppState>,
        auth: BearerAuth,
        id: Path<String>,
        /// Seconds to wait for the job to finish: 0 up to the server's `api.max_wait_secs`
        /// (60 by default); more waits that long.
        #[oai(validator(minimum(value = "0")))]
        wait: Query<Option<u64>>,
    ) -> Result<GetJobResponse, ApiError> {
        auth.0.require_api(Scope::JobsRead)?;
        let id = parse_id(&id.0, ApiError::JobNotFound)?;
        let wait = wait.0.unwrap_or(0).min(state.settings.api.max_wait_secs);
        let job = if wait == 0 {
            jobs::find(&state.db, auth.0.user_id, id).await?
        } else {
            jobs::wait_for(&state.db, &state.waiters, auth.0.user_id, id, Duration::from_secs(wait)).await?
        };
        Ok(GetJobResponse::Ok(Json(job.into())))
    }

    /// List jobs
    ///
    /// The caller's jobs, newest first, optionally filtered by status and model.
    #[oai(path = "/jobs", method = "get", operation_id = "list_jobs")]
    async fn list(
        &self,
        state: Data<&AppState>,
        auth: BearerAuth,
        status: Query<Option<Status>>,
        model: Query<Option<String>>,
        /// Page size, 1–100 (default 20).
        #[oai(validator(minimum(value = "1"), maximum(value = "100")))]
        limit: Query<Option<u64>>,
        /// `next_cursor` of the previous page.
        cursor: Query<Option<String>>,
    ) -> Result<ListJobsResponse, ApiError> {
        auth.0.require_api(Scope::JobsRead)?;
        let limit = limit.0.unwrap_or(20);
        let after = super::parse_cursor(cursor.0.as_deref())?;
        let query = ListQuery { status: status.0.map(Into::into), model: model.0, after, limit };
        let page = jobs::list(&state.db, auth.0.user_id, query).await?;
        Ok(ListJobsResponse::Ok(Json(JobPage {
            data: page.jobs.into_iter().map(Job::from).collect(),
            next_cursor: page.next_cursor.map(|id| id.to_string()),
        })))
    }

    /// Webhook deliveries about a job: to its own webhook and to the account's
    /// subscriptions, newest first, with status, attempts and response codes
    #[oai(path = "/jobs/:id/deliveries", method = "get", operation_id = "list_job_deliveries")]
    async fn deliveries(
        &self,
        state: Data<&AppState>,
        auth: BearerAuth,
        id: Path<String>,
    ) -> Result<DeliveryListResponse, ApiError> {
        auth.0.require_api(Scope::JobsRead)?;
        let rows =
            webhooks::deliveries_of_job(&state.db, auth.0.user_id, parse_id(&id.0, ApiError::JobNotFound)?).await?;
        Ok(DeliveryListResponse::Ok(Json(DeliveryList { data: rows.into_iter().map(Into::into).collect() })))
    }

    /// Cancel a job
    ///
    /// A queued job never starts; a running job finishes but its result is discarded.
    /// A finished job cannot be canceled (409).
    #[oai(path = "/jobs/:id/cancel", method = "post", operation_id = "cancel_job")]
    async fn cancel(
        &self,
        state: Data<&AppState>,
        auth: BearerAuth,
        id: Path<String>,
    ) -> Result<GetJobResponse, ApiError> {
        auth.0.require_api(Scope::JobsWrite)?;
        let id = parse_id(&id.0, ApiError::JobNotFound)?;
        let job = jobs::cancel(&state.db, auth.0.user_id, id).await?;
        Ok(GetJobResponse::Ok(Json(job.into())))
    }
}

fn accepted(job: job_rows::Model, preference_applied: Option<String>) -> SubmitJobResponse {
    let location = format!("/v1/jobs/{}", job.id);
    SubmitJobResponse::Accepted(Json(job.into()), location, preference_applied)
}

/// Reads `wait=N` out of a `Prefer` header (RFC 7240), e.g. `respond-async, wait=10`.
pub fn parse_prefer_wait(header: &str) -> Option<u64> {
    header
        .split([',', ';'])
        .filter_map(|preference| preference.trim().split_once('='))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("wait"))
        .and_then(|(_, value)| value.trim().trim_matches('"').parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefer_wait_is_found_among_other_preferences() {
        assert_eq!(parse_prefer_wait("wait=10"), Some(10));
        assert_eq!(parse_prefer_wait("respond-async, wait=5"), Some(5));
        assert_eq!(parse_prefer_wait("return=minimal; WAIT = \"3\""), Some(3));
        assert_eq!(parse_prefer_wait("respond-async"), None);
        assert_eq!(parse_prefer_wait("wait=soon"), None);
    }
}
