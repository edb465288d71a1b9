//! The dead-letter sink: every worker also consumes `spool.dead`, so that a job whose
//! message was dead-lettered *by the broker* (it hit `x-delivery-limit`, e.g. because it
//! kept killing its worker) is recorded as `failed` + `dead_lettered` instead of staying
//! `running` forever. Dead letters a worker published itself (`x-spool-reason`) are left
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
use spool_shared::amqp::{JobEnvelope, Topology};
use spool_shared::job::{JOB_DONE_CHANNEL, JobError};
use tokio_util::sync::CancellationToken;

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
        record(&db, &delivery).await;
    }
    let _ = channel.close(200, "worker stopping".into()).await;
    Ok(())
}

async fn record(db: &DatabaseConnection, delivery: &Delivery) {
    let Ok(envelope) = JobEnvelope::from_bytes(&delivery.data) else {
        tracing::warn!("unreadable dead letter dropped");
        let _ = delivery.ack(BasicAckOptions::default()).await;
        return;
    };
    if header(delivery, "x-spool-reason").is_some() {
        let _ = delivery.ack(BasicAckOptions::default()).await;
        return;
    }
    let reason = header(delivery, "x-first-death-reason").unwrap_or_else(|| "unknown".into());
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
    // Ack only once recorded: if PostgreSQL is down the message stays for a later try.
    match db.query_all_raw(statement).await {
        Ok(rows) => {
            if !rows.is_empty() {
                tracing::warn!(job_id = %envelope.job_id, %reason, "job dead-lettered by the broker");
                metrics::counter!("spool_worker_jobs_total", "model" => envelope.model.clone(), "outcome" => "dead_lettered").increment(1);
            }
            let _ = delivery.ack(BasicAckOptions::default()).await;
        }
        Err(error) => tracing::error!(error.cause_chain = ?error, "cannot record a dead letter; it stays queued"),
    }
}

/// A string header such as `x-first-death-reason` (set by the broker, e.g. `delivery_limit`).
fn header(delivery: &Delivery, name: &str) -> Option<String> {
    match delivery.properties.headers().as_ref()?.inner().get(name)? {
        AMQPValue::LongString(value) => Some(value.to_string()),
        AMQPValue::ShortString(value) => Some(value.to_string()),
        _ => None,
    }
}
