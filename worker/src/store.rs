//! The worker's database writes: claim a batch of jobs, then record all their results in
//! one statement. Both transitions are conditional, so a redelivered message can never
//! complete a job twice.

use std::time::Duration;

use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, DbErr, Statement};
use serde::Serialize;
use serde_json::Value;
use serde_json::value::RawValue;
use spool_shared::job::{JOB_DONE_CHANNEL, JobError};
use uuid::Uuid;

use crate::engine::Output;

/// A job this worker now owns for one attempt.
#[derive(Debug)]
pub struct ClaimedJob {
    pub id: Uuid,
    pub input: Value,
    /// The attempt number this claim started; results are written only for it.
    pub attempt: i32,
}

/// How one attempt ended.
#[derive(Debug, Clone)]
pub enum Outcome {
    Succeeded(Output),
    /// Final: not retryable.
    Failed(JobError),
    /// Final: retryable but out of attempts.
    DeadLettered(JobError),
    /// Back to `queued`; its message waits `delay` in the retry tier of that delay.
    Retrying {
        error: JobError,
        delay: Duration,
    },
}

/// The result of one claimed job.
pub struct Completion {
    pub id: Uuid,
    pub attempt: i32,
    pub outcome: Outcome,
    /// From the job's message: logged with the outcome, passed on to retries.
    pub trace_id: Option<String>,
}

/// One row of [`complete`]'s statement, as its `jsonb_to_recordset` reads it.
#[derive(Serialize)]
struct ResultRow<'a> {
    id: Uuid,
    attempt: i32,
    status: &'static str,
    outcome: &'static str,
    output: Option<&'a RawValue>,
    error: Option<&'a JobError>,
    dead_lettered: bool,
}

impl Completion {
    fn row(&self) -> ResultRow<'_> {
        let (status, outcome, output, error, dead_lettered) = match &self.outcome {
            Outcome::Succeeded(output) => ("succeeded", "succeeded", Some(output.as_ref()), None, false),
            Outcome::Failed(error) => ("failed", "failed", None, Some(error), false),
            Outcome::DeadLettered(error) => ("failed", "dead_lettered", None, Some(error), true),
            Outcome::Retrying { error, .. } => ("queued", "retry", None, Some(error), false),
        };
        ResultRow { id: self.id, attempt: self.attempt, status, outcome, output, error, dead_lettered }
    }
}

/// The JSON that [`complete`] sends for `completions`: each output goes in as its engine
/// wrote it, copied rather than encoded again.
pub fn results_json(completions: &[Completion]) -> String {
    let rows: Vec<ResultRow> = completions.iter().map(Completion::row).collect();
    serde_json::to_string(&rows).expect("rows of plain fields and JSON text always encode. This is a bug.")
}

/// What one batch asks to claim.
#[derive(Debug)]
pub struct ClaimRequest {
    /// Every job the batch holds a message for.
    pub ids: Vec<Uuid>,
    /// Jobs whose message was redelivered (its previous worker died before acking): a
    /// `running` one is taken over, whatever its attempt.
    pub redelivered: Vec<Uuid>,
    /// Retry messages with the attempt each follows: a job still `running` at that
    /// attempt never had the attempt's result written (the write may yet come, late),
    /// so it is taken over; the late write then matches no row.
    pub retries: Vec<(Uuid, i32)>,
    /// Marks the rows this batch claims, so that running the same claim again (its
    /// commit went through but the reply was lost) returns them instead of nothing.
    pub token: Uuid,
}

impl ClaimRequest {
    /// A claim of `ids` with a fresh token and nothing to take over.
    pub fn new(ids: Vec<Uuid>) -> Self {
        Self { ids, redelivered: Vec::new(), retries: Vec::new(), token: Uuid::now_v7() }
    }
}

/// Moves `queued` jobs to `running`. A job already `running` is taken over only when its
/// message was redelivered or is the retry of its current attempt (see [`ClaimRequest`]);
/// one this same claim already took is returned again, unchanged. Canceled and finished
/// jobs are not returned: their messages only need an ack. Queued jobs past their
/// time-to-start deadline are failed with `deadline_exceeded` instead, unrun (a retry
/// has started already: the deadline no longer applies to it).
pub async fn claim(db: &DatabaseConnection, request: &ClaimRequest, worker_id: &str) -> Result<Vec<ClaimedJob>, DbErr> {
    let (retry_ids, retry_attempts): (Vec<Uuid>, Vec<i32>) = request.retries.iter().copied().unzip();
    // The final SELECT reads the rows as they were before this statement, so a row the
    // `claimed` UPDATE takes now is not also returned by the second branch.
    let statement = Statement::from_sql_and_values(
        DbBackend::Postgres,
        r#"WITH expired AS (
               UPDATE jobs
                  SET status = 'failed', completed_at = now(),
                      error = jsonb_build_object('code', 'deadline_exceeded', 'retryable', false,
                          'message', 'the job did not start before its deadline')
                WHERE id = ANY($1) AND status = 'queued' AND start_deadline < now() AND attempts = 0
            RETURNING id, pg_notify($4, id::text)),
           claimed AS (
               UPDATE jobs
                  SET status = 'running',
                      attempts = attempts + 1,
                      started_at = now(),
                      worker_id = $3,
                      claim_token = $5,
                      queue_ms = EXTRACT(EPOCH FROM (now() - created_at)) * 1000,
                      -- A takeover ends the attempt it replaces: logged, as every attempt is.
                      attempt_log = CASE WHEN status = 'running'
                          THEN attempt_log || jsonb_build_array(jsonb_build_object(
                              'attempt', attempts, 'worker_id', worker_id, 'started_at', started_at,
                              'finished_at', now(), 'outcome', 'taken_over', 'error', NULL))
                          ELSE attempt_log END
                WHERE id = ANY($1) AND id NOT IN (SELECT id FROM expired)
                  AND (status = 'queued'
                       OR (status = 'running' AND claim_token IS DISTINCT FROM $5
                           AND (id = ANY($2)
                                OR (id, attempts) IN (SELECT * FROM unnest($6::uuid[], $7::integer[])))))
            RETURNING id, input, attempts)
           SELECT id, input, attempts FROM claimed
           UNION ALL
           SELECT id, input, attempts FROM jobs WHERE id = ANY($1) AND status = 'running' AND claim_token = $5"#,
        [
            request.ids.clone().into(),
            request.redelivered.clone().into(),
            worker_id.into(),
            JOB_DONE_CHANNEL.into(),
            request.token.into(),
            retry_ids.into(),
            retry_attempts.into(),
        ],
    );
    db.query_all_raw(statement)
        .await?
        .into_iter()
        .map(|row| {
            Ok(ClaimedJob {
                id: row.try_get("", "id")?,
                input: row.try_get("", "input")?,
                attempt: row.try_get("", "attempts")?,
            })
        })
        .collect()
}

/// Writes every result of one batch in a single statement: final states, retries (back
/// to `queued`), the attempt history, the owners' usage counters, and a notice on
/// [`JOB_DONE_CHANNEL`] for each finished job (delivered at commit). Rows whose job was
/// canceled, or whose attempt was taken over by another worker, are left alone.
/// `inference_ms` is the batch's forward time, each job's `inference_ms`; `None` (no
/// forward finished) writes NULL there and adds nothing to usage.
/// Returns how many jobs were written.
pub async fn complete(
    db: &DatabaseConnection,
    completions: &[Completion],
    inference_ms: Option<f64>,
) -> Result<u64, DbErr> {
    let statement = Statement::from_sql_and_values(
        DbBackend::Postgres,
        r#"WITH done AS (
               UPDATE jobs
                  SET status = u.status,
                      output = u.output,
                      error = u.error,
                      dead_lettered = u.dead_lettered,
                      completed_at = CASE WHEN u.status = 'queued' THEN NULL ELSE now() END,
                      -- Its message came, and a retry's was confirmed before this commit: the
                      -- outbox relay must not publish it again (the API's own mark may have
                      -- been skipped while this row was locked).
                      published_at = coalesce(jobs.published_at, now()),
                      inference_ms = $2,
                      batch_size = $3,
                      attempt_log = jobs.attempt_log || jsonb_build_array(jsonb_build_object(
                          'attempt', jobs.attempts, 'worker_id', jobs.worker_id,
                          'started_at', jobs.started_at, 'finished_at', now(),
                          'outcome', u.outcome, 'error', u.error))
                 FROM jsonb_to_recordset($1::jsonb)
                      AS u(id uuid, attempt integer, status text, outcome text, output jsonb,
                           error jsonb, dead_lettered boolean)
                WHERE jobs.id = u.id AND jobs.status = 'running' AND jobs.attempts = u.attempt
            RETURNING jobs.id, jobs.owner_id, jobs.model, jobs.status),
           counted AS (
               INSERT INTO usage (user_id, model, succeeded, failed, inference_ms_total)
               SELECT owner_id, model,
                      count(*) FILTER (WHERE status = 'succeeded'),
                      count(*) FILTER (WHERE status = 'failed'),
                      COALESCE($2, 0) / $3 * count(*) -- each job's share of its batch's forward
                 FROM done WHERE status <> 'queued' GROUP BY owner_id, model
                ORDER BY owner_id, model -- one lock order for every batch: no deadlocks
               ON CONFLICT (user_id, model, shard) DO UPDATE
                  SET succeeded = usage.succeeded + EXCLUDED.succeeded,
                      failed = usage.failed + EXCLUDED.failed,
                      inference_ms_total = usage.inference_ms_total + EXCLUDED.inference_ms_total,
                      last_used_at = now())
           SELECT id, CASE WHEN status <> 'queued' THEN pg_notify($4, id::text) END FROM done"#,
        [
            results_json(completions).into(),
            inference_ms.into(),
            (completions.len() as i32).into(),
            JOB_DONE_CHANNEL.into(),
        ],
    );
    Ok(db.query_all_raw(statement).await?.len() as u64)
}
