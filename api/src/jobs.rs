//! Job rules: submission with idempotency, lookup, long-polling, listing and
//! cancellation. Handlers call these; these never see HTTP types.

use std::collections::HashMap;
use std::time::Duration;

use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseConnection, DbBackend, EntityTrait, QueryFilter, QueryOrder, QuerySelect,
    Statement, TransactionTrait,
};
use sha2::{Digest, Sha256};
use spool_shared::amqp::JobEnvelope;
use spool_shared::entities::jobs;
use spool_shared::job::{JOB_DONE_CHANNEL, JobStatus};
use uuid::Uuid;

use crate::catalog::ValidJobRequest;
use crate::completions::CompletionWaiters;
use crate::error::ApiError;
use crate::job_inserter::{JobInserter, NewJob};
use crate::publisher::Publisher;
use crate::state::AppState;
use crate::webhooks;

/// A client-chosen key that makes retrying `POST /v1/jobs` safe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for IdempotencyKey {
    type Error = ApiError;

    fn try_from(value: String) -> Result<Self, Self::Error> {
        let valid = (1..=255).contains(&value.len()) && value.bytes().all(|b| b.is_ascii_graphic());
        if valid {
            Ok(Self(value))
        } else {
            Err(ApiError::InvalidRequest("Idempotency-Key must be 1–255 visible ASCII characters".into()))
        }
    }
}

/// What `submit` did.
pub enum Submission {
    /// A new job was committed (and published, or left to the outbox relay).
    Created(jobs::Model),
    /// The same Idempotency-Key and body were seen before: this is that job.
    Replayed(jobs::Model),
}

/// A per-job webhook target, already checked.
#[derive(Debug, Clone)]
pub struct JobWebhook {
    pub url: String,
    pub events: Vec<String>,
}

impl JobWebhook {
    /// The target as an idempotency hash sees it: the event order does not matter.
    pub fn canonical(&self) -> serde_json::Value {
        let mut events = self.events.clone();
        events.sort();
        events.dedup();
        serde_json::json!({ "url": self.url, "events": events })
    }
}

/// What a job may carry besides its model and input.
#[derive(Debug, Clone, Default)]
pub struct JobOptions {
    /// Time-to-start deadline: not started by then, it fails with `deadline_exceeded`.
    pub start_within: Option<Duration>,
    pub webhook: Option<JobWebhook>,
    /// The submitting request's `x-request-id`, kept as the job's trace id (not part of
    /// the idempotency hash: a client's retry is another request).
    pub request_id: Option<String>,
}

/// A job as the client asked for it, before any check.
pub struct JobRequest {
    pub model: String,
    pub input: serde_json::Value,
    pub start_within: Option<Duration>,
    pub webhook: Option<WebhookRequest>,
    pub key: Option<IdempotencyKey>,
    pub request_id: Option<String>,
}

/// A job's own webhook as the client asked for it (for a job or every job of a batch).
pub struct WebhookRequest {
    pub url: String,
    /// `None`: the default, `["completed"]`.
    pub events: Option<Vec<String>>,
}

/// Checks a job request against its model's schema, its webhook target and the model's
/// health (an open breaker on every worker is a 503 now, not a failed job later), then
/// submits it.
pub async fn accept(state: &AppState, owner_id: Uuid, request: JobRequest) -> Result<Submission, ApiError> {
    let valid = state.catalog.validate(&request.model, request.input)?;
    let webhook = webhooks::job_target(state, owner_id, request.webhook).await?;
    state.workers.check_model(&valid.model).await?;
    let options = JobOptions { start_within: request.start_within, webhook, request_id: request.request_id };
    submit(&state.db, &state.inserter, &state.publisher, owner_id, valid, request.key, options).await
}

/// Commits the job (sharing the statement with concurrent submissions), then publishes
/// it. A publish failure is not the client's problem: the job is committed and the
/// outbox relay will publish it.
pub async fn submit(
    db: &DatabaseConnection,
    inserter: &JobInserter,
    publisher: &Publisher,
    owner_id: Uuid,
    request: ValidJobRequest,
    key: Option<IdempotencyKey>,
    options: JobOptions,
) -> Result<Submission, ApiError> {
    let request_hash = key.as_ref().map(|_| request_hash(&request, &options));
    let inserted = inserter
        .insert(NewJob {
            id: Uuid::now_v7(),
            owner_id,
            model: request.model,
            input: request.input,
            idempotency_key: key.as_ref().map(|k| k.0.clone()),
            request_hash: request_hash.as_deref().map(hex::encode),
            start_within_secs: options.start_within.map(|d| d.as_secs_f64()),
            webhook_url: options.webhook.as_ref().map(|w| w.url.clone()),
            webhook_events: options.webhook.map(|w| w.events),
            request_id: options.request_id,
        })
        .await?;

    let Some(job) = inserted else {
        // The key was used before (possibly by a concurrent request that just committed).
        let key = key.expect("only a keyed insert can conflict. This is a bug.");
        let existing = jobs::Entity::find()
            .filter(jobs::Column::OwnerId.eq(owner_id))
            .filter(jobs::Column::IdempotencyKey.eq(key.0))
            .one(db)
            .await?
            .ok_or_else(|| ApiError::Unexpected(anyhow::anyhow!("idempotency conflict on a missing row")))?;
        return if existing.request_hash == request_hash {
            Ok(Submission::Replayed(existing))
        } else {
            Err(ApiError::IdempotencyConflict)
        };
    };

    match publisher.publish(&JobEnvelope::new(job.id, &job.model, job.request_id.as_deref())).await {
        Ok(()) => publisher.mark_published(job.id),
        Err(error) => tracing::warn!(job_id = %job.id, %error, "publish failed; the outbox relay will retry"),
    }
    metrics::counter!("spool_jobs_submitted_total", "model" => job.model.clone()).increment(1);
    Ok(Submission::Created(job))
}

/// SHA-256 of the request's canonical JSON (serde_json sorts object keys): a replay must
/// repeat the model, the input and the options. Options are added only when present, so
/// a key first used without them hashes as it always did.
fn request_hash(request: &ValidJobRequest, options: &JobOptions) -> Vec<u8> {
    let mut canonical = serde_json::json!({ "model": request.model, "input": request.input });
    if let Some(start_within) = options.start_within {
        canonical["start_within_secs"] = start_within.as_secs().into();
    }
    if let Some(webhook) = &options.webhook {
        canonical["webhook"] = webhook.canonical();
    }
    Sha256::digest(canonical.to_string().as_bytes()).to_vec()
}

/// The caller's job, or `JobNotFound` (also when it belongs to someone else).
pub async fn find(db: &DatabaseConnection, owner_id: Uuid, job_id: Uuid) -> Result<jobs::Model, ApiError> {
    jobs::Entity::find_by_id(job_id)
        .filter(jobs::Column::OwnerId.eq(owner_id))
        .one(db)
        .await?
        .ok_or(ApiError::JobNotFound)
}

/// Returns the job once it is finished, or as it is after `wait`.
pub async fn wait_for(
    db: &DatabaseConnection,
    waiters: &CompletionWaiters,
    owner_id: Uuid,
    job_id: Uuid,
    wait: Duration,
) -> Result<jobs::Model, ApiError> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        // Subscribe before reading, so a completion between the two is not missed.
        let mut waiter = waiters.subscribe(job_id);
        let job = find(db, owner_id, job_id).await?;
        if is_terminal(&job) || tokio::time::Instant::now() >= deadline {
            return Ok(job);
        }
        if tokio::time::timeout_at(deadline, waiter.finished()).await.is_err() {
            drop(waiter);
            return find(db, owner_id, job_id).await;
        }
    }
}

pub fn is_terminal(job: &jobs::Model) -> bool {
    JobStatus::parse(&job.status).is_some_and(JobStatus::is_terminal)
}

/// Queued jobs per model (an index covers exactly these rows).
pub async fn queued_per_model(db: &DatabaseConnection) -> Result<HashMap<String, u64>, ApiError> {
    let rows = db
        .query_all_raw(Statement::from_string(
            DbBackend::Postgres,
            "SELECT model, count(*) AS n FROM jobs WHERE status = 'queued' GROUP BY model",
        ))
        .await?;
    let depth =
        |row: &sea_orm::QueryResult| Ok((row.try_get::<String>("", "model")?, row.try_get::<i64>("", "n")? as u64));
    Ok(rows.iter().map(depth).collect::<Result<_, sea_orm::DbErr>>()?)
}

/// Filters and position of one page of `GET /v1/jobs`.
pub struct ListQuery {
    pub status: Option<JobStatus>,
    pub model: Option<String>,
    /// Only jobs older than this one (the previous page's last id).
    pub after: Option<Uuid>,
    pub limit: u64,
}

pub struct Page {
    pub jobs: Vec<jobs::Model>,
    /// Where the next page starts; `None` on the last page.
    pub next_cursor: Option<Uuid>,
}

/// The caller's jobs, newest first (UUIDv7 ids sort by creation time).
pub async fn list(db: &DatabaseConnection, owner_id: Uuid, query: ListQuery) -> Result<Page, ApiError> {
    let mut select = jobs::Entity::find()
        .filter(jobs::Column::OwnerId.eq(owner_id))
        .order_by_desc(jobs::Column::Id)
        .limit(query.limit + 1);
    if let Some(status) = query.status {
        select = select.filter(jobs::Column::Status.eq(status.as_str()));
    }
    if let Some(model) = query.model {
        select = select.filter(jobs::Column::Model.eq(model));
    }
    if let Some(after) = query.after {
        select = select.filter(jobs::Column::Id.lt(after));
    }
    let mut jobs = select.all(db).await?;
    let next_cursor = if jobs.len() as u64 > query.limit {
        jobs.truncate(query.limit as usize);
        jobs.last().map(|job| job.id)
    } else {
        None
    };
    Ok(Page { jobs, next_cursor })
}

/// Cancels a job that has not finished. A queued job will never start; a running one
/// finishes but its result is discarded (the worker's write requires `running`).
pub async fn cancel(db: &DatabaseConnection, owner_id: Uuid, job_id: Uuid) -> Result<jobs::Model, ApiError> {
    let txn = db.begin().await?;
    let canceled = jobs::Entity::find()
        .from_raw_sql(Statement::from_sql_and_values(
            DbBackend::Postgres,
            r#"UPDATE jobs SET status = 'canceled', completed_at = now()
                WHERE id = $1 AND owner_id = $2 AND status IN ('queued', 'running')
            RETURNING *"#,
            [job_id.into(), owner_id.into()],
        ))
        .one(&txn)
        .await?;
    let Some(job) = canceled else {
        txn.rollback().await?;
        let job = find(db, owner_id, job_id).await?;
        let status = JobStatus::parse(&job.status).map_or("finished", JobStatus::as_str);
        return Err(ApiError::NotCancelable(status));
    };
    txn.execute_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "SELECT pg_notify($1, $2)",
        [JOB_DONE_CHANNEL.into(), job.id.to_string().into()],
    ))
    .await?;
    txn.commit().await?;
    Ok(job)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idempotency_keys_must_be_short_visible_ascii() {
        assert!(IdempotencyKey::try_from("order-42".to_owned()).is_ok());
        assert!(IdempotencyKey::try_from(String::new()).is_err());
        assert!(IdempotencyKey::try_from("has space".to_owned()).is_err());
        assert!(IdempotencyKey::try_from("é".to_owned()).is_err());
        assert!(IdempotencyKey::try_from("x".repeat(256)).is_err());
    }

    #[test]
    fn the_request_hash_ignores_key_order() {
        let a = ValidJobRequest { model: "m".into(), input: serde_json::json!({"a": 1, "b": 2}) };
        let b = ValidJobRequest { model: "m".into(), input: serde_json::json!({"b": 2, "a": 1}) };
        let c = ValidJobRequest { model: "m".into(), input: serde_json::json!({"a": 1, "b": 3}) };
        let none = JobOptions::default();
        assert_eq!(request_hash(&a, &none), request_hash(&b, &none));
        assert_ne!(request_hash(&a, &none), request_hash(&c, &none));
    }

    #[test]
    fn the_request_hash_covers_the_options() {
        let request = ValidJobRequest { model: "m".into(), input: serde_json::json!({"a": 1}) };
        let webhook = |url: &str, events: &[&str]| JobWebhook {
            url: url.into(),
            events: events.iter().map(|e| e.to_string()).collect(),
        };
        let with = |start_within: Option<u64>, webhook: Option<JobWebhook>| {
            let start_within = start_within.map(Duration::from_secs);
            request_hash(&request, &JobOptions { start_within, webhook, request_id: None })
        };
        // A key first used before options were hashed still replays.
        assert_eq!(with(None, None), Sha256::digest(br#"{"input":{"a":1},"model":"m"}"#).to_vec());
        assert_ne!(with(None, None), with(Some(60), None));
        assert_ne!(with(Some(60), None), with(Some(61), None));
        let hook = with(None, Some(webhook("https://a.example/h", &["completed", "started"])));
        assert_ne!(with(None, None), hook);
        assert_ne!(hook, with(None, Some(webhook("https://b.example/h", &["completed", "started"]))));
        assert_ne!(hook, with(None, Some(webhook("https://a.example/h", &["completed"]))));
        assert_eq!(hook, with(None, Some(webhook("https://a.example/h", &["started", "completed"]))));
        // A client's retry comes with another request id.
        let retried = JobOptions { request_id: Some("retry-2".into()), ..JobOptions::default() };
        assert_eq!(with(None, None), request_hash(&request, &retried));
    }
}
