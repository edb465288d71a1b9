//! Publishing jobs to RabbitMQ, and the outbox relay that makes a `202` a promise.
//!
//! A job is committed first, then published with a publisher confirm. If the broker is
//! down or the API dies in between, the row keeps `published_at IS NULL` and the relay
//! publishes it later. A job may therefore be published twice (API crash after the
//! confirm, before `published_at` was written); the worker's conditional state
//! transitions make the second copy harmless.

use std::sync::Arc;
use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{Channel, PublisherConfirm};
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, DbErr, QueryResult, Statement, TransactionTrait};
use spool_shared::Settings;
use spool_shared::amqp::{self, JobEnvelope, Topology};
use tokio::sync::{RwLock, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// How long one publish may wait for its confirm.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("not connected to RabbitMQ")]
    NotConnected,
    #[error("the broker refused the message")]
    Nacked,
    #[error("no confirm within {0:?}")]
    Timeout(Duration),
    #[error(transparent)]
    Amqp(#[from] lapin::Error),
}

/// Cheap handle to the publishing side.
#[derive(Clone)]
pub struct Publisher {
    inner: Arc<Inner>,
}

struct Inner {
    topology: Topology,
    channel: RwLock<Option<Channel>>,
    published: mpsc::Sender<Uuid>,
}

impl Publisher {
    /// Starts the connection keeper (reconnects with backoff) and the task that records
    /// confirmed publishes in batches.
    pub fn start(
        settings: &Settings,
        models: Vec<String>,
        db: DatabaseConnection,
        shutdown: CancellationToken,
    ) -> Self {
        let (published, confirmed) = mpsc::channel(65_536);
        let inner = Arc::new(Inner { topology: Topology::new(settings), channel: RwLock::new(None), published });
        tokio::spawn(keep_connected(settings.clone(), models, Arc::clone(&inner), shutdown.clone()));
        tokio::spawn(record_published(db, confirmed, shutdown));
        Self { inner }
    }

    pub async fn is_connected(&self) -> bool {
        self.inner.channel.read().await.as_ref().is_some_and(|c| c.status().connected())
    }

    /// Publishes the job's message and waits for the broker's confirm.
    pub async fn publish(&self, job: &JobEnvelope) -> Result<(), PublishError> {
        let channel = self.inner.channel.read().await.clone().ok_or(PublishError::NotConnected)?;
        let confirm = self.send(&channel, job).await?;
        confirmed(confirm, Instant::now() + CONFIRM_TIMEOUT).await
    }

    /// Publishes many jobs' messages pipelined: all are sent before the first confirm is
    /// awaited. Returns the ids the broker confirmed; the others are the outbox relay's.
    /// Sending and confirming each get one `CONFIRM_TIMEOUT` for all the messages, so a
    /// stalled broker holds the caller seconds, not seconds per message.
    pub async fn publish_many(&self, jobs: &[JobEnvelope]) -> Result<Vec<Uuid>, PublishError> {
        let channel = self.inner.channel.read().await.clone().ok_or(PublishError::NotConnected)?;
        let sending_deadline = Instant::now() + CONFIRM_TIMEOUT;
        let mut pending = Vec::with_capacity(jobs.len());
        for job in jobs {
            let sent = tokio::time::timeout_at(sending_deadline, self.send(&channel, job))
                .await
                .unwrap_or(Err(PublishError::Timeout(CONFIRM_TIMEOUT)));
            match sent {
                Ok(confirm) => pending.push((job.job_id, confirm)),
                Err(error) if pending.is_empty() => return Err(error),
                Err(error) => {
                    // What was sent may still be confirmed; the rest is the relay's.
                    tracing::warn!(%error, sent = pending.len(), of = jobs.len(), "publishing stopped early");
                    break;
                }
            }
        }
        let confirming_deadline = Instant::now() + CONFIRM_TIMEOUT;
        let mut done = Vec::with_capacity(pending.len());
        for (job_id, confirm) in pending {
            match confirmed(confirm, confirming_deadline).await {
                Ok(()) => done.push(job_id),
                Err(PublishError::Timeout(_)) => break,
                Err(_) => {}
            }
        }
        Ok(done)
    }

    async fn send(&self, channel: &Channel, job: &JobEnvelope) -> Result<PublisherConfirm, PublishError> {
        let properties = job.properties();
        Ok(channel
            .basic_publish(
                self.inner.topology.jobs_exchange().into(),
                job.model.as_str().into(),
                BasicPublishOptions { mandatory: true, ..Default::default() },
                &job.to_bytes(),
                properties,
            )
            .await?)
    }

    /// Notes that the job's message is safely in the broker (written in batches).
    pub fn mark_published(&self, job_id: Uuid) {
        // If the buffer is full the relay will publish the job again: harmless.
        let _ = self.inner.published.try_send(job_id);
    }
}

/// Waits until `deadline` for a publish's confirm. A returned message (no queue bound for
/// the model) is acked but not stored: that is a failure too.
async fn confirmed(confirm: PublisherConfirm, deadline: Instant) -> Result<(), PublishError> {
    let confirmation =
        tokio::time::timeout_at(deadline, confirm).await.map_err(|_| PublishError::Timeout(CONFIRM_TIMEOUT))??;
    if !confirmation.is_ack() || confirmation.take_message().is_some() {
        return Err(PublishError::Nacked);
    }
    Ok(())
}

async fn keep_connected(settings: Settings, models: Vec<String>, inner: Arc<Inner>, shutdown: CancellationToken) {
    let mut backoff = Duration::from_millis(250);
    loop {
        let attempt = async {
            let connection = amqp::connect(&settings, "spool-api").await?;
            let channel = connection.create_channel().await?;
            inner.topology.declare(&channel, &models).await?;
            channel.confirm_select(ConfirmSelectOptions::default()).await?;
            Ok::<_, lapin::Error>((connection, channel))
        };
        match attempt.await {
            Ok((connection, channel)) => {
                tracing::info!("connected to RabbitMQ");
                backoff = Duration::from_millis(250);
                *inner.channel.write().await = Some(channel.clone());
                // Watch the channel; lapin does not reconnect by itself.
                loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => {
                            let _ = connection.close(200, "api stopping".into()).await;
                            return;
                        }
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    }
                    if !channel.status().connected() || !connection.status().connected() {
                        break;
                    }
                }
                *inner.channel.write().await = None;
                tracing::warn!("lost the RabbitMQ connection; reconnecting");
            }
            Err(error) => {
                tracing::warn!(%error, retry_in = ?backoff, "cannot connect to RabbitMQ");
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(2)); // brokers restart in seconds: notice soon
    }
}

/// Writes `published_at` for confirmed jobs, many per statement.
async fn record_published(db: DatabaseConnection, mut confirmed: mpsc::Receiver<Uuid>, shutdown: CancellationToken) {
    let mut ids = Vec::with_capacity(1024);
    loop {
        let received = tokio::select! {
            n = confirmed.recv_many(&mut ids, 1024) => n,
            _ = shutdown.cancelled() => 0,
        };
        if received == 0 {
            return;
        }
        // Rows a worker holds (claiming or completing them) are skipped, not waited for.
        // Waiting let this statement and a worker's, each locking many rows in its own
        // order, deadlock: PostgreSQL broke the cycle after `deadlock_timeout` (1 s), a
        // stall of the batch. A skipped job is no longer `queued` once the worker commits,
        // so the relay leaves it alone; its mark is lost, which is harmless.
        let statement = Statement::from_sql_and_values(
            DbBackend::Postgres,
            "UPDATE jobs SET published_at = now()
              WHERE id IN (SELECT id FROM jobs WHERE id = ANY($1) AND published_at IS NULL
                           FOR UPDATE SKIP LOCKED)",
            [ids.clone().into()],
        );
        if let Err(error) = db.execute_raw(statement).await {
            // The relay will publish these jobs again; the worker ignores the duplicates.
            tracing::warn!(%error, count = ids.len(), "cannot record published jobs");
        }
        ids.clear();
    }
}

/// Periodically publishes committed jobs whose publish never got a confirm.
pub async fn run_outbox_relay(
    db: DatabaseConnection,
    publisher: Publisher,
    settings: Settings,
    shutdown: CancellationToken,
) {
    let interval = Duration::from_millis(settings.api.outbox_interval_ms);
    let grace_ms = settings.api.outbox_grace_ms as i64;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        if !publisher.is_connected().await {
            continue;
        }
        match relay_once(&db, &publisher, grace_ms).await {
            Ok(0) => {}
            Ok(count) => tracing::info!(count, "outbox relay published jobs"),
            Err(error) => tracing::warn!(error.cause_chain = ?error, "outbox relay failed"),
        }
    }
}

/// One relay pass. Rows are locked while being published so that several API
/// instances never relay the same job at once.
pub async fn relay_once(db: &DatabaseConnection, publisher: &Publisher, grace_ms: i64) -> anyhow::Result<usize> {
    let txn = db.begin().await?;
    let rows = txn
        .query_all_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            r#"SELECT id, model, request_id FROM jobs
                WHERE published_at IS NULL AND status = 'queued'
                  AND created_at < now() - make_interval(secs => $1::double precision / 1000)
                ORDER BY created_at
                LIMIT 2000
                FOR UPDATE SKIP LOCKED"#,
            [grace_ms.into()],
        ))
        .await?;
    let jobs = rows.iter().map(envelope_from_row).collect::<Result<Vec<_>, _>>()?;
    if jobs.is_empty() {
        return Ok(0);
    }
    // Pipelined: a batch committed while the broker was down goes out in a few passes,
    // not one confirm round trip per job.
    let published = match publisher.publish_many(&jobs).await {
        Ok(confirmed) => confirmed,
        Err(error) => {
            tracing::warn!(%error, "outbox relay could not publish");
            Vec::new()
        }
    };
    if !published.is_empty() {
        txn.execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "UPDATE jobs SET published_at = now() WHERE id = ANY($1)",
            [published.clone().into()],
        ))
        .await?;
    }
    txn.commit().await?;
    Ok(published.len())
}

/// The message for a job row read with its `id`, `model` and `request_id`.
pub fn envelope_from_row(row: &QueryResult) -> Result<JobEnvelope, DbErr> {
    let request_id: Option<String> = row.try_get("", "request_id")?;
    Ok(JobEnvelope::new(row.try_get("", "id")?, &row.try_get::<String>("", "model")?, request_id.as_deref()))
}
