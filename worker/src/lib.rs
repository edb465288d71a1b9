//! `spool-worker`: loads the models it serves once, then consumes their queues, runs
//! jobs in dynamic batches on a dedicated model thread, writes results to PostgreSQL
//! and acks only after the commit.

pub mod batcher;
pub mod consumer;
pub mod dead_letters;
pub mod device;
pub mod dispatcher;
pub mod engine;
pub mod heartbeat;
pub mod outage;
pub mod runtime;
pub mod store;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use spool_shared::amqp::{self, Topology};
use spool_shared::breaker::SharedBreaker;
use spool_shared::manifest::Manifest;
use spool_shared::retry::RetryPolicy;
use spool_shared::shutdown::wait_for_signal;
use spool_shared::{Settings, db};
use tokio_util::sync::CancellationToken;

use crate::consumer::{BatchPolicy, WorkerContext};
use crate::runtime::ModelHandle;

pub struct Application {
    settings: Settings,
    device: String,
    context: Arc<WorkerContext>,
    connection: lapin::Connection,
    models: Vec<ModelHandle>,
}

impl Application {
    /// Loads and warms up every model, connects to PostgreSQL and RabbitMQ and declares
    /// the topology. Fails fast: a worker that cannot serve should not start.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let manifest = Manifest::load(&settings.models_dir).context("loading the model manifest")?;
        let wanted = if settings.worker.models.is_empty() { manifest.names() } else { settings.worker.models.clone() };
        let device = device::select(&settings.worker.device)?;
        // Process-wide; each model thread picks it up at its first forward.
        tch::set_num_threads(settings.worker.cpu_threads.clamp(1, 256) as i32);
        let batches_in_flight = settings.worker.batches_in_flight.max(1);
        let mut models = Vec::with_capacity(wanted.len());
        for name in &wanted {
            let spec = manifest.get(name).with_context(|| format!("model {name:?} is not in the manifest"))?;
            let handle = ModelHandle::start(spec.clone(), device, settings.worker.model_breaker, batches_in_flight)
                .await
                .with_context(|| format!("starting model {name}"))?;
            models.push(handle);
        }
        let db = db::connect(&settings).await.context("connecting to PostgreSQL")?;
        let worker_id = settings.worker.id.clone().unwrap_or_else(default_worker_id);
        let topology = Topology::new(&settings);
        let connection = connect(&settings, &worker_id, &topology, &wanted).await.context("connecting to RabbitMQ")?;
        let context = Arc::new(WorkerContext {
            db,
            topology,
            worker_id,
            batches_in_flight,
            fail_marker: settings.worker.fail_marker.clone(),
            execution_timeout: Duration::from_millis(settings.worker.execution_timeout_ms.max(1)),
            database_breaker: SharedBreaker::new(settings.worker.database_breaker),
        });
        register_metrics(&wanted);
        if context.fail_marker.is_some() {
            tracing::warn!("worker.fail_marker is set: inputs containing it will fail on purpose");
        }
        Ok(Self { settings, device: format!("{device:?}").to_lowercase(), context, connection, models })
    }

    pub fn worker_id(&self) -> &str {
        &self.context.worker_id
    }

    /// Runs until SIGTERM or Ctrl-C, then shuts down gracefully.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        let shutdown = CancellationToken::new();
        let trigger = shutdown.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("shutdown requested; finishing in-flight batches");
            trigger.cancel();
        });
        self.run(shutdown).await
    }

    /// Consumes every model's queue until `shutdown` is cancelled; then each consumer
    /// finishes the batches it already received, acks them, and the connection closes.
    ///
    /// lapin does not reconnect by itself: when the broker goes away the consumers end,
    /// and the worker reconnects with backoff (the models stay loaded). Unacked messages
    /// of the lost connection are redelivered by the broker.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let names: Vec<String> = self.models.iter().map(|m| m.spec.name.clone()).collect();
        let heartbeat = tokio::spawn(heartbeat::run(
            self.settings.clone(),
            self.context.worker_id.clone(),
            self.device.clone(),
            self.models.clone(),
            self.context.database_breaker.clone(),
            shutdown.clone(),
        ));
        let mut connection = Some(self.connection);
        let mut backoff = Duration::from_millis(250);
        loop {
            let current = match connection.take() {
                Some(current) => current,
                None => match connect(&self.settings, &self.context.worker_id, &self.context.topology, &names).await {
                    Ok(current) => {
                        tracing::info!("reconnected to RabbitMQ");
                        backoff = Duration::from_millis(250);
                        current
                    }
                    Err(error) => {
                        tracing::warn!(%error, retry_in = ?backoff, "cannot reach RabbitMQ");
                        tokio::select! {
                            _ = shutdown.cancelled() => break,
                            _ = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(2)); // notice a restarted broker soon
                        continue;
                    }
                },
            };
            let results = Self::consume_all(&self.settings, &self.context, &self.models, &current, &shutdown).await;
            let _ = current.close(200, "worker stopping".into()).await;
            if shutdown.is_cancelled() {
                break;
            }
            for error in results.into_iter().filter_map(Result::err) {
                tracing::warn!(%error, "a consumer lost its channel");
            }
            tracing::warn!("lost the RabbitMQ connection; reconnecting");
        }
        let _ = heartbeat.await;
        tracing::info!("worker stopped");
        Ok(())
    }

    async fn consume_all(
        settings: &Settings,
        context: &Arc<WorkerContext>,
        models: &[ModelHandle],
        connection: &lapin::Connection,
        shutdown: &CancellationToken,
    ) -> Vec<lapin::Result<()>> {
        let mut consumers = Vec::with_capacity(models.len());
        for model in models {
            let policy = BatchPolicy {
                max_size: settings.worker.max_batch_size.unwrap_or(model.spec.max_batch_size).max(1),
                max_delay: Duration::from_millis(
                    settings.worker.max_batch_delay_ms.unwrap_or(model.spec.max_batch_delay_ms),
                ),
                // The tiers the topology declared: every delay the policy picks has its exchange.
                retry: RetryPolicy::new(
                    context.topology.retry_tiers().to_vec(),
                    model.spec.max_attempts.unwrap_or(settings.worker.max_attempts),
                ),
            };
            consumers.push(Box::pin(consumer::consume(
                Arc::clone(context),
                connection,
                model.clone(),
                policy,
                shutdown.clone(),
            ))
                as std::pin::Pin<Box<dyn std::future::Future<Output = lapin::Result<()>> + Send + '_>>);
        }
        consumers.push(Box::pin(dead_letters::drain(
            context.db.clone(),
            context.topology.clone(),
            context.worker_id.clone(),
            connection,
            shutdown.clone(),
        )));
        futures::future::join_all(consumers).await
    }
}

/// Connects to the broker and declares the topology the worker consumes.
async fn connect(
    settings: &Settings,
    worker_id: &str,
    topology: &Topology,
    models: &[String],
) -> lapin::Result<lapin::Connection> {
    let connection = amqp::connect(settings, &format!("spool-worker {worker_id}")).await?;
    let channel = connection.create_channel().await?;
    topology.declare(&channel, models).await?;
    let _ = channel.close(200, "declared".into()).await;
    Ok(connection)
}

fn default_worker_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "worker".into());
    format!("{host}-{}", std::process::id())
}

/// Creates the counters operators alert on at zero, so each series exists (and a rule on
/// `increase(…)` sees its first rise) before anything has gone wrong.
fn register_metrics(models: &[String]) {
    metrics::counter!("spool_worker_database_errors_total").increment(0);
    for model in models {
        for outcome in ["succeeded", "failed", "dead_lettered", "retrying"] {
            metrics::counter!("spool_worker_jobs_total", "model" => model.clone(), "outcome" => outcome).increment(0);
        }
    }
}
