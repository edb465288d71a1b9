//! Batch rules: validate many items all-or-nothing, commit the batch and its jobs in one
//! transaction with multi-row inserts, publish with pipelined confirms; report progress,
//! stream results in submission order, cancel what has not started.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use futures::Stream;
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, QueryResult, Statement, TransactionTrait};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use spool_shared::amqp::JobEnvelope;
use spool_shared::job::JOB_DONE_CHANNEL;
use uuid::Uuid;

use crate::catalog::{MAX_FIELD_ERRORS, ModelCatalog, NUL_DETAIL};
use crate::error::{ApiError, FieldError};
use crate::jobs::{IdempotencyKey, JobWebhook, WebhookRequest};
use crate::publisher::Publisher;
use crate::state::AppState;
use crate::webhooks;

/// Rows per multi-row insert, and per page of streamed results.
const CHUNK: usize = 1_000;

/// One item as the client sent it.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchItem {
    pub input: Value,
    pub custom_id: Option<String>,
    /// Its line in an NDJSON body (1-based), which errors name; blank lines make it
    /// differ from the item's index.
    #[serde(skip)]
    pub line: Option<usize>,
}

/// Reads an NDJSON body: one `{input, custom_id?}` per line (blank lines skipped).
/// Errors name the line (1-based) and point at `/items/<index>`.
pub fn parse_ndjson(body: &[u8]) -> Result<Vec<BatchItem>, ApiError> {
    let text = std::str::from_utf8(body).map_err(|_| ApiError::InvalidRequest("the body is not UTF-8".into()))?;
    let mut items = Vec::new();
    let mut errors = Vec::new();
    for (number, line) in text.lines().enumerate().map(|(i, l)| (i + 1, l.trim())) {
        if line.is_empty() {
            continue;
        }
        match serde_json::from_str::<BatchItem>(line) {
            Ok(item) => items.push(BatchItem { line: Some(number), ..item }),
            Err(error) if errors.len() < MAX_FIELD_ERRORS => errors.push(FieldError {
                pointer: format!("/items/{}", items.len() + errors.len()),
                detail: format!("line {number}: {error}"),
            }),
            Err(_) => {}
        }
    }
    if errors.is_empty() { Ok(items) } else { Err(ApiError::InvalidInput(errors)) }
}

/// Checks the model, the item count, each input against the model's schema and each
/// `custom_id` (unique within the batch); one bad item refuses the whole batch, naming the first few (by line for
/// NDJSON; the pointers are `/items/<index>/…` either way).
pub fn validate(catalog: &ModelCatalog, model: &str, items: &[BatchItem], max_items: usize) -> Result<(), ApiError> {
    if !catalog.names().iter().any(|m| m == model) {
        return Err(ApiError::ModelNotFound(model.to_owned()));
    }
    if items.is_empty() || items.len() > max_items {
        return Err(ApiError::InvalidInput(vec![FieldError {
            pointer: "/items".into(),
            detail: format!("a batch holds 1 to {max_items} items; this one has {}", items.len()),
        }]));
    }
    let mut errors = Vec::new();
    // custom_id → the first item that used it: results are matched back by it.
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (index, item) in items.iter().enumerate() {
        if errors.len() >= MAX_FIELD_ERRORS {
            break;
        }
        let at = |pointer: String, detail: String| FieldError {
            pointer: format!("/items/{index}{pointer}"),
            detail: match item.line {
                Some(line) => format!("line {line}: {detail}"),
                None => detail,
            },
        };
        if let Some(id) = &item.custom_id {
            if id.chars().count() > 255 {
                errors.push(at("/custom_id".into(), "longer than 255 characters".into()));
            }
            if id.contains('\0') {
                errors.push(at("/custom_id".into(), NUL_DETAIL.into()));
            }
            match seen.get(id.as_str()) {
                Some(first) => {
                    errors.push(at("/custom_id".into(), format!("{id:?} is also the custom_id of item {first}")))
                }
                None => {
                    seen.insert(id, index);
                }
            }
        }
        let found = catalog.input_errors(model, &item.input)?;
        errors.extend(found.into_iter().map(|e| at(e.pointer, e.detail)));
    }
    errors.truncate(MAX_FIELD_ERRORS);
    if errors.is_empty() { Ok(()) } else { Err(ApiError::InvalidInput(errors)) }
}

/// A batch as clients see it.
pub struct Batch {
    pub id: Uuid,
    pub model: String,
    pub total: i32,
    /// Jobs per status (every status present, zeros included).
    pub counts: BTreeMap<String, i64>,
    pub created_at: DateTime<Utc>,
    pub completed_at: Option<DateTime<Utc>>,
}

impl Batch {
    /// Finished jobs (succeeded, failed, canceled) over all.
    pub fn progress(&self) -> f64 {
        let done: i64 =
            ["succeeded", "failed", "canceled"].iter().map(|s| self.counts.get(*s).copied().unwrap_or(0)).sum();
        if self.total == 0 { 1.0 } else { done as f64 / f64::from(self.total) }
    }

    fn from_row(row: &QueryResult) -> Result<Self, sea_orm::DbErr> {
        let found: Option<Value> = row.try_get("", "counts")?;
        let mut counts: BTreeMap<String, i64> =
            ["queued", "running", "succeeded", "failed", "canceled"].into_iter().map(|s| (s.to_owned(), 0)).collect();
        if let Some(Value::Object(found)) = found {
            for (status, n) in found {
                counts.insert(status, n.as_i64().unwrap_or(0));
            }
        }
        Ok(Self {
            id: row.try_get("", "id")?,
            model: row.try_get("", "model")?,
            total: row.try_get("", "total")?,
            counts,
            created_at: row.try_get("", "created_at")?,
            completed_at: row.try_get("", "completed_at")?,
        })
    }
}

const BATCH_SELECT: &str = "SELECT b.id, b.model, b.total, b.created_at, b.completed_at, \
    (SELECT jsonb_object_agg(status, n) FROM (SELECT status, count(*) AS n FROM jobs WHERE batch_id = b.id \
      GROUP BY status) c) AS counts FROM batches b";

pub enum Submission {
    Created(Batch),
    /// The same Idempotency-Key and body were seen before: this is that batch.
    Replayed(Batch),
}

/// What a batch may carry besides its items.
#[derive(Debug, Default)]
pub struct BatchOptions {
    /// Per-job webhook for every job of the batch; it also receives `batch.completed`.
    pub webhook: Option<JobWebhook>,
    /// The submitting request's `x-request-id`: every job's trace id.
    pub request_id: Option<String>,
}

/// A batch as the client asked for it, before any check.
pub struct BatchRequest {
    pub model: String,
    pub items: Vec<BatchItem>,
    /// Per-job webhook for every job of the batch; it also receives `batch.completed`.
    pub webhook: Option<WebhookRequest>,
    pub key: Option<IdempotencyKey>,
    pub request_id: Option<String>,
}

/// Checks every item against the model's schema (all or nothing), the webhook target, the
/// model's health and the account's batch-job quota, then submits the batch.
pub async fn accept(state: &AppState, owner_id: Uuid, request: BatchRequest) -> Result<Submission, ApiError> {
    let BatchRequest { model, items, webhook, key, request_id } = request;
    validate(&state.catalog, &model, &items, state.settings.api.max_batch_items)?;
    let webhook = webhooks::job_target(state, owner_id, webhook).await?;
    state.workers.check_model(&model).await?;
    state.limiter.admit_batch_jobs(owner_id, items.len(), state.settings.rate_limit.batch_jobs).await?;
    let options = BatchOptions { webhook, request_id };
    submit(&state.db, &state.publisher, owner_id, &model, items, key, options).await
}

/// Commits the batch and all its jobs in one transaction, then publishes them.
pub async fn submit(
    db: &DatabaseConnection,
    publisher: &Publisher,
    owner_id: Uuid,
    model: &str,
    items: Vec<BatchItem>,
    key: Option<IdempotencyKey>,
    options: BatchOptions,
) -> Result<Submission, ApiError> {
    let BatchOptions { webhook, request_id } = options;
    let request_hash = key.as_ref().map(|_| {
        let mut hasher = Sha256::new();
        hasher.update(model.as_bytes());
        for item in &items {
            hasher.update(json!([item.custom_id, item.input]).to_string().as_bytes());
        }
        // Added only when present, so a key first used without a webhook still replays.
        if let Some(webhook) = &webhook {
            hasher.update(webhook.canonical().to_string().as_bytes());
        }
        hasher.finalize().to_vec()
    });
    let batch_id = Uuid::now_v7();
    let total = items.len() as i32;
    let txn = db.begin().await?;
    let created = txn
        .query_one_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "INSERT INTO batches (id, owner_id, model, total, unfinished, idempotency_key, request_hash, \
                                  webhook_url, webhook_events) \
             VALUES ($1, $2, $3, $4, $4, $5, $6, $7, $8) \
             ON CONFLICT (owner_id, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING RETURNING id",
            [
                batch_id.into(),
                owner_id.into(),
                model.into(),
                total.into(),
                key.as_ref().map(|k| k.as_str().to_owned()).into(),
                request_hash.clone().into(),
                webhook.as_ref().map(|w| w.url.clone()).into(),
                webhook.as_ref().map(|w| w.events.clone()).into(),
            ],
        ))
        .await?;
    if created.is_none() {
        txn.rollback().await?;
        let Some(key) = key else { return Err(ApiError::Unexpected(anyhow::anyhow!("batch id collision"))) };
        let row = db
            .query_one_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                "SELECT id, request_hash FROM batches WHERE owner_id = $1 AND idempotency_key = $2",
                [owner_id.into(), key.as_str().into()],
            ))
            .await?
            .ok_or_else(|| ApiError::Unexpected(anyhow::anyhow!("idempotency conflict on a missing batch")))?;
        if row.try_get::<Option<Vec<u8>>>("", "request_hash")? != request_hash {
            return Err(ApiError::IdempotencyConflict);
        }
        return Ok(Submission::Replayed(get(db, owner_id, row.try_get("", "id")?).await?));
    }

    let mut job_ids = Vec::with_capacity(items.len());
    for (chunk_index, chunk) in items.chunks(CHUNK).enumerate() {
        let rows: Vec<Value> = chunk
            .iter()
            .enumerate()
            .map(|(i, item)| {
                let id = Uuid::now_v7();
                job_ids.push(id);
                json!({"id": id, "idx": chunk_index * CHUNK + i, "input": item.input, "custom_id": item.custom_id})
            })
            .collect();
        txn.execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "INSERT INTO jobs (id, owner_id, model, status, input, batch_id, batch_index, custom_id, \
                               webhook_url, webhook_events, request_id) \
             SELECT u.id, $2, $3, 'queued', u.input, $4, u.idx, u.custom_id, $5, $6, $7 \
               FROM jsonb_to_recordset($1::jsonb) AS u(id uuid, idx integer, input jsonb, custom_id text)",
            [
                Value::Array(rows).into(),
                owner_id.into(),
                model.into(),
                batch_id.into(),
                webhook.as_ref().map(|w| w.url.clone()).into(),
                webhook.as_ref().map(|w| w.events.clone()).into(),
                request_id.clone().into(),
            ],
        ))
        .await?;
    }
    txn.execute_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "INSERT INTO usage (user_id, model, submitted) VALUES ($1, $2, $3) ON CONFLICT (user_id, model, shard) \
         DO UPDATE SET submitted = usage.submitted + EXCLUDED.submitted, last_used_at = now()",
        [owner_id.into(), model.into(), i64::from(total).into()],
    ))
    .await?;
    txn.commit().await?;

    // Committed: whatever is not confirmed now, the outbox relay publishes later.
    let messages: Vec<JobEnvelope> =
        job_ids.iter().map(|&id| JobEnvelope::new(id, model, request_id.as_deref())).collect();
    match publisher.publish_many(&messages).await {
        Ok(confirmed) => confirmed.into_iter().for_each(|id| publisher.mark_published(id)),
        Err(error) => tracing::warn!(%batch_id, %error, "batch publish failed; the outbox relay will retry"),
    }
    metrics::counter!("spool_jobs_submitted_total", "model" => model.to_owned()).increment(u64::from(total as u32));
    Ok(Submission::Created(get(db, owner_id, batch_id).await?))
}

/// The caller's batch, or `BatchNotFound` (also when it is someone else's).
pub async fn get(db: &DatabaseConnection, owner_id: Uuid, id: Uuid) -> Result<Batch, ApiError> {
    let row = db
        .query_one_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            format!("{BATCH_SELECT} WHERE b.id = $1 AND b.owner_id = $2"),
            [id.into(), owner_id.into()],
        ))
        .await?
        .ok_or(ApiError::BatchNotFound)?;
    Ok(Batch::from_row(&row)?)
}

pub struct Page {
    pub batches: Vec<Batch>,
    /// Where the next page starts; `None` on the last page.
    pub next_cursor: Option<Uuid>,
}

/// A page of the caller's batches, newest first; `after` is the previous page's last id.
pub async fn list(db: &DatabaseConnection, owner_id: Uuid, limit: u64, after: Option<Uuid>) -> Result<Page, ApiError> {
    let rows = db
        .query_all_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            format!(
                "{BATCH_SELECT} WHERE b.owner_id = $1 AND ($2::uuid IS NULL OR b.id < $2) ORDER BY b.id DESC LIMIT $3"
            ),
            [owner_id.into(), after.into(), (limit as i64 + 1).into()],
        ))
        .await?;
    let mut batches: Vec<Batch> = rows.iter().map(Batch::from_row).collect::<Result<_, _>>()?;
    let next_cursor = if batches.len() as u64 > limit {
        batches.truncate(limit as usize);
        batches.last().map(|batch| batch.id)
    } else {
        None
    };
    Ok(Page { batches, next_cursor })
}

/// Cancels the batch's jobs that have not started; returns how many.
pub async fn cancel(db: &DatabaseConnection, owner_id: Uuid, id: Uuid) -> Result<u64, ApiError> {
    get(db, owner_id, id).await?;
    let rows = db
        .query_all_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "WITH canceled AS (
                 UPDATE jobs SET status = 'canceled', completed_at = now()
                  WHERE batch_id = $1 AND status = 'queued' RETURNING id)
             SELECT pg_notify($2, id::text) FROM canceled",
            [id.into(), JOB_DONE_CHANNEL.into()],
        ))
        .await?;
    Ok(rows.len() as u64)
}

/// The batch's results as NDJSON lines in submission order, read a page at a time so a
/// large batch is never held in memory: `{custom_id, job_id, status, output | error}`.
pub fn results(db: DatabaseConnection, batch_id: Uuid) -> impl Stream<Item = Result<Vec<u8>, std::io::Error>> {
    futures::stream::unfold(Some(-1i32), move |after| {
        let db = db.clone();
        async move {
            let after = after?;
            let page = db
                .query_all_raw(Statement::from_sql_and_values(
                    DbBackend::Postgres,
                    "SELECT batch_index, custom_id, id, status, output, error FROM jobs \
                      WHERE batch_id = $1 AND batch_index > $2 ORDER BY batch_index LIMIT $3",
                    [batch_id.into(), after.into(), (CHUNK as i64).into()],
                ))
                .await;
            let rows = match page {
                Ok(rows) => rows,
                Err(error) => return Some((Err(std::io::Error::other(error)), None)),
            };
            if rows.is_empty() {
                return None;
            }
            let mut chunk = Vec::with_capacity(rows.len() * 96);
            let mut last = after;
            for row in &rows {
                let line = result_line(row).map_err(std::io::Error::other);
                match line {
                    Ok((index, line)) => {
                        last = index;
                        chunk.extend_from_slice(line.to_string().as_bytes());
                        chunk.push(b'\n');
                    }
                    Err(error) => return Some((Err(error), None)),
                }
            }
            let next = (rows.len() == CHUNK).then_some(last);
            Some((Ok(chunk), next))
        }
    })
}

fn result_line(row: &QueryResult) -> Result<(i32, Value), sea_orm::DbErr> {
    let index: i32 = row.try_get("", "batch_index")?;
    let status: String = row.try_get("", "status")?;
    let mut line = json!({
        "custom_id": row.try_get::<Option<String>>("", "custom_id")?,
        "job_id": row.try_get::<Uuid>("", "id")?,
        "status": status,
    });
    if let Some(output) = row.try_get::<Option<Value>>("", "output")? {
        line["output"] = output;
    }
    if let Some(error) = row.try_get::<Option<Value>>("", "error")? {
        line["error"] = error;
    }
    Ok((index, line))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ndjson_errors_name_the_line() {
        let body =
            b"{\"input\": {\"a\": 1}}\n\n{\"input\": oops}\n{\"input\": {}, \"custom_id\": \"x\"}\n{\"inptu\": {}}\n";
        let Err(ApiError::InvalidInput(errors)) = parse_ndjson(body) else { panic!("must fail") };
        assert_eq!(errors.len(), 2);
        assert!(errors[0].detail.starts_with("line 3:"), "{}", errors[0].detail);
        assert!(errors[1].detail.starts_with("line 5:"), "{}", errors[1].detail);
        let items = parse_ndjson(b"{\"input\": 1, \"custom_id\": \"a\"}\n{\"input\": 2}").unwrap();
        assert_eq!(items.len(), 2);
        assert_eq!(items[0].custom_id.as_deref(), Some("a"));
        // Blank lines do not shift the numbers errors give.
        let items = parse_ndjson(b"{\"input\": 1}\n\n\r\n{\"input\": 2}\r\n").unwrap();
        assert_eq!(items.iter().map(|i| i.line).collect::<Vec<_>>(), [Some(1), Some(4)]);
    }
}
