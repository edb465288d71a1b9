//! The dead-letter sink: every worker also consumes `spool.dead`, so that a job whose
//! message was dead-lettered *by the broker* (it hit `x-delivery-limit`, e.g. because it
//! kept killing its worker) is recorded as `failed` + `dead_lettered` instead of staying
//! `running` forever. Dead letters a worker published itself ([`headers::REASON`]) are left
//! to that worker, which records the job's real error right after the publish confirm;
//! recording them here too would race it. PostgreSQL is the record operators work from
//! (`/v1/admin/dead-letters`), so the queue is drained once a message is recorded.

use futures::StreamExt;
use lapin::Connection;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, Statement};
use serde_json::json;
use spool_shared::amqp::{JobEnvelope, Topology, headers};
use spool_shared::job::{JOB_DONE_CHANNEL, JobError};
use tokio_util::sync::CancellationToken;

use crate::outage::until_db_answers;

/// Consumes the dead-letter queue until shutdown or until the connection drops.
pub async fn drain(
    db: DatabaseConnection,
    topology: Topology,
    worker_id: String,
    connection: &Connection,
    shutdown: CancellationToken,
) -> lapin::Result<()> {
    let channel = connection.create_channel().await?;
    channel.basic_qos(16, BasicQosOptions::default()).await?;
    let mut deliveries = channel
        .basic_consume(
            topology.dead_queue().as_str().into(),
            format!("{worker_id}/dead-letters").as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    loop {
        let delivery = tokio::select! {
            _ = shutdown.cancelled() => break,
            next = deliveries.next() => match next {
                Some(Ok(delivery)) => delivery,
                Some(Err(error)) => return Err(error),
                None => break,
            },
        };
        record(&db, &delivery, &shutdown).await;
    }
    let _ = channel.close(200, "worker stopping".into()).await;
    Ok(())
}

/// Records the job of one dead letter, then acks it. While PostgreSQL fails, retries with
/// backoff; on shutdown the message stays unacked, and closing the channel returns it.
async fn record(db: &DatabaseConnection, delivery: &Delivery, shutdown: &CancellationToken) {
    let Ok(envelope) = JobEnvelope::from_bytes(&delivery.data) else {
        tracing::warn!("unreadable dead letter dropped");
        let _ = delivery.ack(BasicAckOptions::default()).await;
        return;
    };
    if header(delivery, headers::REASON).is_some() {
        let _ = delivery.ack(BasicAckOptions::default()).await;
        return;
    }
    let reason = delivery.properties.headers().as_ref().and_then(death_reason).unwrap_or_else(|| "unknown".into());
    let error = JobError::fatal(
        "delivery_limit",
        format!("the broker dead-lettered the job's message ({reason}): it failed to complete on every delivery"),
    );
    let statement = Statement::from_sql_and_values(
        DbBackend::Postgres,
        r#"WITH failed AS (
               UPDATE jobs
                  SET status = 'failed', dead_lettered = true, error = $2, completed_at = now(),
                      attempt_log = attempt_log || jsonb_build_array(jsonb_build_object(
                          'attempt', attempts, 'worker_id', worker_id, 'started_at', started_at,
                          'finished_at', now(), 'outcome', 'dead_lettered', 'error', $2::jsonb))
                WHERE id = $1 AND status IN ('queued', 'running')
            RETURNING id)
           SELECT pg_notify($3, id::text) FROM failed"#,
        [envelope.job_id.into(), json!(error).into(), JOB_DONE_CHANNEL.into()],
    );
    // Ack only once recorded. A message neither acked nor nacked would sit on this
    // channel until the connection closes, its job unrecorded.
    let write = || db.query_all_raw(statement.clone());
    let Some(rows) = until_db_answers(None, shutdown, "record a dead letter", write).await else {
        return; // shutting down: the message goes back to the queue
    };
    if !rows.is_empty() {
        tracing::warn!(job_id = %envelope.job_id, %reason, "job dead-lettered by the broker");
        metrics::counter!("spool_worker_jobs_total", "model" => envelope.model.clone(), "outcome" => "dead_lettered")
            .increment(1);
    }
    let _ = delivery.ack(BasicAckOptions::default()).await;
}

/// A string header such as [`headers::REASON`].
fn header(delivery: &Delivery, name: &str) -> Option<String> {
    delivery.properties.headers().as_ref()?.inner().get(name).and_then(text)
}

/// Why the broker dead-lettered the message the last time: the newest entry of `x-death`
/// comes first. `x-first-death-reason` is only the fallback: for a message that went
/// through a retry tier it reads `expired`, however it died in the end.
fn death_reason(headers: &FieldTable) -> Option<String> {
    let latest = match headers.inner().get("x-death") {
        Some(AMQPValue::FieldArray(deaths)) => match deaths.as_slice().first() {
            Some(AMQPValue::FieldTable(death)) => death.inner().get("reason").and_then(text),
            _ => None,
        },
        _ => None,
    };
    latest.or_else(|| headers.inner().get("x-first-death-reason").and_then(text))
}

fn text(value: &AMQPValue) -> Option<String> {
    match value {
        AMQPValue::LongString(value) => Some(value.to_string()),
        AMQPValue::ShortString(value) => Some(value.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(entries: &[(&str, AMQPValue)]) -> FieldTable {
        let mut table = FieldTable::default();
        for (key, value) in entries {
            table.insert((*key).into(), value.clone());
        }
        table
    }

    #[test]
    fn the_reason_is_the_latest_death_not_the_first() {
        let death = |queue: &str, reason: &str| {
            AMQPValue::FieldTable(table(&[
                ("queue", AMQPValue::LongString(queue.into())),
                ("reason", AMQPValue::LongString(reason.into())),
            ]))
        };
        // A retry that expired out of its tier, then hit the job queue's delivery limit.
        let headers = table(&[
            ("x-first-death-reason", AMQPValue::LongString("expired".into())),
            (
                "x-death",
                AMQPValue::FieldArray(vec![death("t.jobs.m", "delivery_limit"), death("t.retry.1s", "expired")].into()),
            ),
        ]);
        assert_eq!(death_reason(&headers).as_deref(), Some("delivery_limit"));
        let without_x_death = table(&[("x-first-death-reason", AMQPValue::LongString("rejected".into()))]);
        assert_eq!(death_reason(&without_x_death).as_deref(), Some("rejected"));
        assert_eq!(death_reason(&FieldTable::default()), None);
    }
}
