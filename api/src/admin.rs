//! Operator actions on dead letters: list, requeue, purge. Every action is audit-logged
//! (who, what, how many).

use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, FromQueryResult, Statement, TransactionTrait, Value};
use serde_json::json;
use spool_shared::amqp::JobEnvelope;
use uuid::Uuid;

use crate::error::{ApiError, FieldError};
use crate::publisher::{Publisher, envelope_from_row};

/// Which dead letters an operator means.
#[derive(Debug, Clone, Default)]
pub struct DeadLetterFilter {
    pub job_id: Option<Uuid>,
    pub model: Option<String>,
    pub error_code: Option<String>,
    pub since: Option<chrono::DateTime<chrono::Utc>>,
    pub until: Option<chrono::DateTime<chrono::Utc>>,
}

impl DeadLetterFilter {
    /// SQL conditions from `$first` on, and their values.
    fn sql(&self, first: usize) -> (String, Vec<Value>) {
        let mut conditions = vec!["dead_lettered".to_owned()];
        let mut values: Vec<Value> = Vec::new();
        let mut add = |condition: &str, value: Value| {
            values.push(value);
            conditions.push(condition.replace('?', &format!("${}", first + values.len() - 1)));
        };
        if let Some(id) = self.job_id {
            add("id = ?", id.into());
        }
        if let Some(model) = &self.model {
            add("model = ?", model.clone().into());
        }
        if let Some(code) = &self.error_code {
            add("error->>'code' = ?", code.clone().into());
        }
        if let Some(since) = self.since {
            add("completed_at >= ?", since.into());
        }
        if let Some(until) = self.until {
            add("completed_at < ?", until.into());
        }
        (conditions.join(" AND "), values)
    }

    fn describe(&self) -> serde_json::Value {
        json!({"job_id": self.job_id, "model": self.model, "error_code": self.error_code, "since": self.since, "until": self.until})
    }
}

/// A dead-lettered job as operators see it.
#[derive(FromQueryResult)]
pub struct DeadLetter {
    pub job_id: Uuid,
    pub owner_id: Uuid,
    pub model: String,
    /// The input, cut to 200 characters.
    pub input_summary: String,
    pub attempts: i32,
    pub error: serde_json::Value,
    /// Every attempt's outcome and error.
    pub attempt_log: serde_json::Value,
    pub failed_at: Option<chrono::DateTime<chrono::Utc>>,
}

pub async fn list(db: &DatabaseConnection, filter: &DeadLetterFilter, limit: u64) -> Result<Vec<DeadLetter>, ApiError> {
    let (conditions, mut values) = filter.sql(1);
    values.push((limit as i64).into());
    let sql = format!(
        "SELECT id AS job_id, owner_id, model, left(input::text, 200) AS input_summary, attempts, \
                coalesce(error, 'null') AS error, attempt_log, completed_at AS failed_at \
           FROM jobs WHERE {conditions} ORDER BY completed_at DESC LIMIT ${}",
        values.len()
    );
    let statement = Statement::from_sql_and_values(DbBackend::Postgres, sql, values);
    Ok(DeadLetter::find_by_statement(statement).all(db).await?)
}

/// Which dead letters to requeue: exactly one of ids, a model, or all.
#[derive(Debug, Clone)]
pub enum RequeueSelector {
    Ids(Vec<Uuid>),
    Model(String),
    All,
}

impl RequeueSelector {
    pub fn parse(ids: Option<Vec<Uuid>>, model: Option<String>, all: bool) -> Result<Self, ApiError> {
        match (ids, model, all) {
            (Some(ids), None, false) if !ids.is_empty() && ids.len() <= 10_000 => Ok(Self::Ids(ids)),
            (None, Some(model), false) => Ok(Self::Model(model)),
            (None, None, true) => Ok(Self::All),
            _ => Err(ApiError::InvalidInput(vec![FieldError {
                pointer: "".into(),
                detail: "give exactly one of `ids` (1–10,000), `model`, or `all: true`".into(),
            }])),
        }
    }
}

/// Moves dead letters back to `queued` with a fresh attempt budget (their attempt log is
/// kept) and publishes them. Returns how many were requeued.
pub async fn requeue(
    db: &DatabaseConnection,
    publisher: &Publisher,
    actor: Uuid,
    selector: &RequeueSelector,
) -> Result<u64, ApiError> {
    let (condition, values): (&str, Vec<Value>) = match selector {
        RequeueSelector::Ids(ids) => ("id = ANY($1)", vec![ids.clone().into()]),
        RequeueSelector::Model(model) => ("model = $1", vec![model.clone().into()]),
        RequeueSelector::All => ("true", vec![]),
    };
    let txn = db.begin().await?;
    let rows = txn
        .query_all_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            format!(
                "UPDATE jobs SET status = 'queued', attempts = 0, dead_lettered = false, error = NULL, \
                        completed_at = NULL, published_at = NULL \
                  WHERE dead_lettered AND {condition} RETURNING id, model, request_id"
            ),
            values,
        ))
        .await?;
    let jobs: Vec<JobEnvelope> = rows.iter().map(envelope_from_row).collect::<Result<_, _>>()?;
    let detail = match selector {
        RequeueSelector::Ids(ids) => json!({"ids": ids}),
        RequeueSelector::Model(model) => json!({"model": model}),
        RequeueSelector::All => json!({"all": true}),
    };
    audit(&txn, actor, "dead_letters.requeue", detail, jobs.len() as u64).await?;
    txn.commit().await?;
    // Committed first: what cannot be published now, the outbox relay publishes later.
    for job in &jobs {
        if publisher.publish(job).await.is_ok() {
            publisher.mark_published(job.job_id);
        }
    }
    Ok(jobs.len() as u64)
}

/// Forgets dead letters (the jobs stay `failed`). Returns how many.
pub async fn purge(db: &DatabaseConnection, actor: Uuid, filter: &DeadLetterFilter) -> Result<u64, ApiError> {
    let (conditions, values) = filter.sql(1);
    let txn = db.begin().await?;
    let result = txn
        .execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            format!("UPDATE jobs SET dead_lettered = false WHERE {conditions}"),
            values,
        ))
        .await?;
    let purged = result.rows_affected();
    audit(&txn, actor, "dead_letters.purge", filter.describe(), purged).await?;
    txn.commit().await?;
    Ok(purged)
}

async fn audit<C: ConnectionTrait>(
    db: &C,
    actor: Uuid,
    action: &str,
    detail: serde_json::Value,
    affected: u64,
) -> Result<(), ApiError> {
    tracing::info!(%actor, action, %detail, affected, "operator action");
    db.execute_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "INSERT INTO audit_log (id, actor_id, action, detail, affected) VALUES ($1, $2, $3, $4, $5)",
        [Uuid::now_v7().into(), actor.into(), action.into(), detail.into(), (affected as i64).into()],
    ))
    .await?;
    Ok(())
}
