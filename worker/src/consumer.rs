//! One model's consumer: pull deliveries, form batches, run them, write results, ack.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection};
use sea_orm::DatabaseConnection;
use spool_shared::amqp::{self, JobEnvelope, Topology};
use spool_shared::breaker::{CircuitBreaker, SharedBreaker};
use spool_shared::job::JobError;
use spool_shared::retry::{RetryDecision, RetryPolicy};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use crate::batcher::next_batch;
use crate::engine::ItemResult;
use crate::outage::{until_admitted, until_db_answers};
use crate::runtime::ModelHandle;
use crate::store::{self, ClaimRequest, ClaimedJob, Completion, Outcome};

/// What every batch of every model shares.
pub struct WorkerContext {
    pub db: DatabaseConnection,
    pub topology: Topology,
    pub worker_id: String,
    pub batches_in_flight: usize,
    /// Fault injection (tests, drills): inputs containing it fail as a broken model would.
    pub fail_marker: Option<String>,
    /// Longest one forward may take.
    pub execution_timeout: Duration,
    /// Guards PostgreSQL writes: while open, no new batch is taken and the batches in
    /// hand keep their messages unacked until a probe write succeeds.
    pub database_breaker: SharedBreaker,
}

/// How a model batches and retries, after configuration overrides.
#[derive(Debug, Clone)]
pub struct BatchPolicy {
    pub max_size: usize,
    pub max_delay: Duration,
    pub retry: RetryPolicy,
}

/// What one batch needs besides its deliveries.
struct BatchContext<'a> {
    worker: &'a WorkerContext,
    model: &'a ModelHandle,
    retry: &'a RetryPolicy,
    /// Confirmed publishes of retries and dead letters.
    publisher: &'a Channel,
    shutdown: &'a CancellationToken,
}

/// Why one consuming session ended.
enum Ended {
    /// Shutdown, or the broker ended the consumer.
    Done,
    /// The model's breaker opened: pause while it stays open, then consume again (probing).
    BreakerOpen,
}

/// Consumes the model's queue until `shutdown` fires. When the model's breaker opens,
/// the batches already taken wait for it, the channel is closed (the messages not in a
/// batch go back to the queue, for healthy workers) and consuming resumes once the
/// breaker lets probes through.
pub async fn consume(
    context: Arc<WorkerContext>,
    connection: &Connection,
    model: ModelHandle,
    policy: BatchPolicy,
    shutdown: CancellationToken,
) -> lapin::Result<()> {
    loop {
        match consume_session(&context, connection, &model, &policy, &shutdown).await? {
            Ended::Done => return Ok(()),
            Ended::BreakerOpen => {
                // Asked now, not when the session ended: its last batches waited for the
                // breaker (and may have probed it) before the channel could close.
                let pause = model.breaker.with(|b| b.retry_after(Instant::now())).unwrap_or_default();
                tracing::warn!(model = %model.spec.name, ?pause, "model breaker open: stopped consuming");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(pause) => {}
                }
                tracing::info!(model = %model.spec.name, "model breaker half-open: probing");
            }
        }
    }
}

/// One channel's worth of consuming: until shutdown, the broker ends it, or the breaker
/// opens. Finishes the batches already received, acks them and closes the channel.
async fn consume_session(
    context: &Arc<WorkerContext>,
    connection: &Connection,
    model: &ModelHandle,
    policy: &BatchPolicy,
    shutdown: &CancellationToken,
) -> lapin::Result<Ended> {
    let channel = connection.create_channel().await?;
    let publisher = connection.create_channel().await?;
    publisher.confirm_select(ConfirmSelectOptions::default()).await?;
    // Enough unacked messages to fill every batch in flight, no more: the rest stay in
    // the queue for other workers.
    let prefetch = (policy.max_size * context.batches_in_flight).min(u16::MAX as usize) as u16;
    channel.basic_qos(prefetch, BasicQosOptions::default()).await?;
    let queue = context.topology.job_queue(&model.spec.name);
    let tag = format!("{}/{}", context.worker_id, model.spec.name);
    let mut deliveries = channel
        .basic_consume(
            queue.as_str().into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    tracing::info!(model = %model.spec.name, queue, prefetch, max_batch = policy.max_size, "consuming");

    // On shutdown: cancel the consumer so the broker sends nothing more, finish the
    // batches already started, and close. Messages prefetched but not yet in a batch
    // are unacked, so the broker hands them to another worker.
    let cancel_channel = channel.clone();
    let cancel_tag = tag.clone();
    let cancel_on = shutdown.clone();
    let canceller = tokio::spawn(async move {
        cancel_on.cancelled().await;
        if let Err(error) = cancel_channel.basic_cancel(cancel_tag.as_str().into(), BasicCancelOptions::default()).await
        {
            tracing::warn!(%error, "basic.cancel failed");
        }
    });

    let slots = Arc::new(Semaphore::new(context.batches_in_flight));
    let mut batches = JoinSet::new();
    let mut stream_error = None;
    let mut ended = Ended::Done;
    loop {
        let permit = Arc::clone(&slots).acquire_owned().await.expect("the semaphore is never closed. This is a bug.");
        // Batches already taken wait for the breaker themselves (see `process_batch`);
        // the messages not yet in a batch go back to the queue when the channel closes.
        if model.breaker.with(|b| b.retry_after(Instant::now())).is_some() {
            ended = Ended::BreakerOpen;
            break;
        }
        // PostgreSQL down: take nothing more; the messages already here stay unacked.
        while let Some(pause) = context.database_breaker.with(|b| b.retry_after(Instant::now())) {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(pause) => {}
            }
        }
        // An idle model runs what is already here at once: waiting for company only pays
        // while another batch holds the model, as this one could not start before it ends.
        // Asked when the first message arrives: the batch spawned just before this wait
        // is usually done by then (deciding earlier cost every job at 50/s the full delay).
        let max_delay = || {
            let others_running = context.batches_in_flight - 1 - slots.available_permits();
            if others_running == 0 { Duration::ZERO } else { policy.max_delay }
        };
        let Some(items) = next_batch(&mut deliveries, policy.max_size, max_delay, shutdown).await else {
            break;
        };
        let mut batch = Vec::with_capacity(items.len());
        for item in items {
            match item {
                Ok(delivery) => batch.push(delivery),
                Err(error) => stream_error = Some(error),
            }
        }
        let context = Arc::clone(context);
        let model = model.clone();
        let retry = policy.retry.clone();
        let publisher = publisher.clone();
        let shutdown = shutdown.clone();
        batches.spawn(async move {
            let batch_context = BatchContext {
                worker: &context,
                model: &model,
                retry: &retry,
                publisher: &publisher,
                shutdown: &shutdown,
            };
            process_batch(&batch_context, batch).await;
            drop(permit);
        });
        if stream_error.is_some() {
            break;
        }
    }
    while batches.join_next().await.is_some() {}
    canceller.abort();
    close(&channel).await;
    close(&publisher).await;
    match stream_error {
        Some(error) => Err(error),
        None => Ok(ended),
    }
}

async fn close(channel: &Channel) {
    if let Err(error) = channel.close(200, "worker stopping".into()).await {
        tracing::debug!(%error, "channel already closed");
    }
}

/// Claims, runs and records one batch, then acks its messages.
async fn process_batch(batch: &BatchContext<'_>, deliveries: Vec<Delivery>) {
    let model = batch.model;
    let (held, unreadable) = prepare_claim(&model.spec.name, deliveries);
    for delivery in unreadable {
        tracing::warn!(model = %model.spec.name, "unreadable message; dead-lettering it");
        reject(delivery).await;
    }
    if held.messages.is_empty() {
        return;
    }
    let span = tracing::info_span!("batch", model = %model.spec.name, size = held.claim.ids.len(), claimed = tracing::field::Empty, inference_ms = tracing::field::Empty);
    async {
        // A step that ends the batch early (shutdown, nothing to run, a failed publish)
        // settles what it can; messages left unacked go back to the queue when the
        // channel closes.
        let Some((claimed, messages)) = claim(batch, &held.claim, held.messages).await else {
            return;
        };
        let (completions, inference_ms) = run_claimed(batch, claimed, held.trace_ids).await;
        settle(batch, messages, &completions, inference_ms).await;
    }
    .instrument(span)
    .await;
}

/// A batch's messages grouped by job, and the claim they make.
struct Held {
    /// Each job's messages (more than one when a copy of it came along: redelivered, or
    /// a retry).
    messages: HashMap<Uuid, Vec<Delivery>>,
    /// The trace id each job's message carries.
    trace_ids: HashMap<Uuid, String>,
    claim: ClaimRequest,
}

/// Groups the batch's messages by job and prepares their claim: which jobs, whose message
/// was redelivered, which retry an attempt. Messages that are not job envelopes of
/// `model` are returned apart, to be dead-lettered.
fn prepare_claim(model: &str, deliveries: Vec<Delivery>) -> (Held, Vec<Delivery>) {
    let mut held = Held {
        messages: HashMap::with_capacity(deliveries.len()),
        trace_ids: HashMap::new(),
        claim: ClaimRequest::new(Vec::new()),
    };
    let mut unreadable = Vec::new();
    for delivery in deliveries {
        match JobEnvelope::from_bytes(&delivery.data) {
            Ok(envelope) if envelope.model == model => {
                if delivery.redelivered {
                    held.claim.redelivered.push(envelope.job_id);
                }
                if let Some(attempt) = envelope.retry_of {
                    held.claim.retries.push((envelope.job_id, attempt));
                }
                if let Some(trace_id) = envelope.trace_id {
                    held.trace_ids.insert(envelope.job_id, trace_id);
                }
                held.messages.entry(envelope.job_id).or_default().push(delivery);
            }
            _ => unreadable.push(delivery),
        }
    }
    held.claim.ids = held.messages.keys().copied().collect();
    (held, unreadable)
}

/// Claims the batch's jobs once the model's breaker admits the batch, and acks the
/// messages of the jobs not claimed (canceled, finished, or another worker's). Returns
/// the claimed jobs and their messages; `None` when there is nothing to run, or on
/// shutdown (the messages are left unacked).
async fn claim(
    batch: &BatchContext<'_>,
    request: &ClaimRequest,
    messages: HashMap<Uuid, Vec<Delivery>>,
) -> Option<(Vec<ClaimedJob>, Vec<Delivery>)> {
    let (context, model) = (batch.worker, batch.model);
    // The model's breaker admits the batch before anything is claimed: a batch it
    // refused would otherwise have spent an attempt (and sent `job.started`) without
    // running, and a nack toward the delivery limit. Meanwhile its messages are held.
    if !until_admitted(&model.breaker, batch.shutdown).await {
        return None; // shutting down
    }
    let write = || store::claim(&context.db, request, &context.worker_id);
    let Some(claimed) = until_db_answers(Some(&context.database_breaker), batch.shutdown, "claim", write).await else {
        model.breaker.with(CircuitBreaker::release); // no call made: a probe slot goes back
        return None; // shutting down
    };
    tracing::Span::current().record("claimed", claimed.len());
    // Canceled, finished or foreign jobs: nothing to run, only the message to settle.
    let claimed_ids: HashSet<Uuid> = claimed.iter().map(|job| job.id).collect();
    let (owned, settled): (Vec<_>, Vec<_>) = messages.into_iter().partition(|(id, _)| claimed_ids.contains(id));
    ack_all(settled.into_iter().flat_map(|(_, d)| d)).await;
    if claimed.is_empty() {
        model.breaker.with(CircuitBreaker::release);
        return None;
    }
    Some((claimed, owned.into_iter().flat_map(|(_, d)| d).collect()))
}

/// Runs the claimed jobs in one forward, tells the model's breaker how it went, and
/// decides each job's outcome. Also returns the forward's time in ms (`None` when no
/// forward finished).
async fn run_claimed(
    batch: &BatchContext<'_>,
    claimed: Vec<ClaimedJob>,
    mut trace_ids: HashMap<Uuid, String>,
) -> (Vec<Completion>, Option<f64>) {
    let (context, model) = (batch.worker, batch.model);
    let (ids_attempts, inputs): (Vec<(Uuid, i32)>, Vec<_>) =
        claimed.into_iter().map(|job| ((job.id, job.attempt), job.input)).unzip();
    let run = run_model(model, inputs, context.fail_marker.as_deref(), context.execution_timeout).await;
    // The model is healthy when nothing failed for a runtime (retryable) reason.
    let healthy = !run.results.iter().any(|r| matches!(r, Err(error) if error.retryable));
    model.breaker.with(|b| b.record(healthy, Instant::now()));
    let inference_ms = run.forward_time.map(|time| time.as_secs_f64() * 1000.0);
    if let Some(inference_ms) = inference_ms {
        tracing::Span::current().record("inference_ms", inference_ms);
    }
    let completions = ids_attempts
        .into_iter()
        .zip(run.results)
        .map(|((id, attempt), result)| Completion {
            id,
            attempt,
            outcome: decide(batch.retry, result, attempt),
            trace_id: trace_ids.remove(&id),
        })
        .collect();
    (completions, inference_ms)
}

/// Publishes the batch's retries and dead letters, records every result, and only then
/// acks the batch's messages.
async fn settle(
    batch: &BatchContext<'_>,
    messages: Vec<Delivery>,
    completions: &[Completion],
    inference_ms: Option<f64>,
) {
    let context = batch.worker;
    // Retries and dead letters are published (and confirmed) before the commit: a crash
    // in between leaves the original message unacked, and its redelivery reruns the
    // job; the extra copy finds the job no longer claimable and is dropped.
    if let Err(error) = publish_failures(batch, completions).await {
        tracing::error!(%error, "cannot publish retries; returning jobs to the queue");
        requeue_later(messages).await;
        return;
    }
    let record = || store::complete(&context.db, completions, inference_ms);
    // On shutdown mid-outage the messages are not acked: their redelivery finds the
    // jobs still `running` and runs them again.
    if let Some(written) =
        until_db_answers(Some(&context.database_breaker), batch.shutdown, "record results", record).await
    {
        tracing::debug!(written, "batch recorded");
        record_outcomes(&batch.model.spec.name, completions);
        ack_all(messages).await;
    }
}

/// What running one batch produced.
struct ModelRun {
    /// One result per input, in order.
    results: Vec<ItemResult>,
    /// How long the forward took on the model thread, without the wait for the thread
    /// (behind other batches' forwards) before it: what `inference_ms` reports. `None`
    /// when no forward finished: every input was marked, or it failed or timed out.
    forward_time: Option<Duration>,
}

/// Runs the batch; inputs carrying the fault-injection marker fail as a broken model
/// would, and a failed forward fails every item with a retryable error.
async fn run_model(
    model: &ModelHandle,
    inputs: Vec<serde_json::Value>,
    fail_marker: Option<&str>,
    timeout: Duration,
) -> ModelRun {
    let injected = |input: &serde_json::Value| fail_marker.is_some_and(|marker| input.to_string().contains(marker));
    let marked: Vec<bool> = inputs.iter().map(injected).collect();
    let healthy: Vec<serde_json::Value> =
        inputs.into_iter().zip(&marked).filter(|(_, m)| !**m).map(|(i, _)| i).collect();
    let healthy_count = healthy.len();
    let (outputs, forward_time) = if healthy.is_empty() {
        (Vec::new(), None)
    } else {
        match tokio::time::timeout(timeout, model.infer(healthy)).await {
            Ok(Ok(output)) => (output.results, output.inference_time),
            Ok(Err(error)) => {
                tracing::error!(error.cause_chain = ?error, "batch forward failed");
                (vec![Err(JobError::retryable("inference_error", error.to_string())); healthy_count], None)
            }
            Err(_) => {
                tracing::error!(?timeout, "batch forward timed out");
                let message = format!("the forward took longer than {} ms", timeout.as_millis());
                (vec![Err(JobError::retryable("timeout", message)); healthy_count], None)
            }
        }
    };
    let mut outputs = outputs.into_iter();
    let results = marked
        .into_iter()
        .map(|is_marked| {
            if is_marked {
                Err(JobError::retryable("injected_fault", "the model failed on this input (fault injection)"))
            } else {
                outputs.next().unwrap_or_else(|| Err(JobError::retryable("inference_error", "missing result")))
            }
        })
        .collect();
    ModelRun { results, forward_time }
}

fn decide(policy: &RetryPolicy, result: ItemResult, attempt: i32) -> Outcome {
    match result {
        Ok(output) => Outcome::Succeeded(output),
        Err(error) => match policy.decide(&error, attempt.max(1) as u32, rand::random::<f64>()) {
            RetryDecision::Retry { delay } => Outcome::Retrying { error, delay },
            RetryDecision::DeadLetter => Outcome::DeadLettered(error),
            RetryDecision::Fail => Outcome::Failed(error),
        },
    }
}

#[derive(Debug, thiserror::Error)]
enum PublishFailure {
    #[error(transparent)]
    Amqp(#[from] lapin::Error),
    #[error("the broker refused the message")]
    Nacked,
}

/// Sends retrying jobs to their backoff tier and dead letters to the dead-letter queue,
/// waiting for every confirm.
async fn publish_failures(batch: &BatchContext<'_>, completions: &[Completion]) -> Result<(), PublishFailure> {
    let topology = &batch.worker.topology;
    let model = batch.model.spec.name.as_str();
    let mut confirms = Vec::new();
    for completion in completions {
        let (exchange, headers) = match &completion.outcome {
            Outcome::Retrying { delay, .. } => (topology.retry_exchange(*delay), FieldTable::default()),
            Outcome::DeadLettered(error) => {
                let mut headers = FieldTable::default();
                headers.insert(amqp::headers::REASON.into(), AMQPValue::LongString("max_attempts".into()));
                headers.insert(amqp::headers::ATTEMPTS.into(), AMQPValue::LongInt(completion.attempt));
                headers.insert(amqp::headers::ERROR_CODE.into(), AMQPValue::LongString(error.code.as_str().into()));
                headers.insert(amqp::headers::ERROR.into(), AMQPValue::LongString(error.message.as_str().into()));
                (topology.dead_exchange(), headers)
            }
            _ => continue,
        };
        let mut envelope = JobEnvelope::new(completion.id, model, completion.trace_id.as_deref());
        if matches!(completion.outcome, Outcome::Retrying { .. }) {
            // Lets the retry take the job over if this attempt's result is not written
            // by the time it comes back (see `store::ClaimRequest::retries`).
            envelope = envelope.retrying(completion.attempt);
        }
        let properties = envelope.properties().with_headers(headers);
        let confirm = batch
            .publisher
            .basic_publish(
                exchange.as_str().into(),
                model.into(),
                BasicPublishOptions::default(),
                &envelope.to_bytes(),
                properties,
            )
            .await?;
        confirms.push(confirm);
    }
    for confirm in confirms {
        let confirmation = confirm.await?;
        if !confirmation.is_ack() {
            return Err(PublishFailure::Nacked);
        }
    }
    Ok(())
}

/// Counts each outcome, and logs it with the job's trace id (the `x-request-id` that
/// submitted it): failures at `warn`, successes at `debug`.
fn record_outcomes(model: &str, completions: &[Completion]) {
    metrics::histogram!("spool_worker_batch_size", "model" => model.to_owned()).record(completions.len() as f64);
    for completion in completions {
        let (outcome, error) = match &completion.outcome {
            Outcome::Succeeded(_) => ("succeeded", None),
            Outcome::Failed(error) => ("failed", Some(error)),
            Outcome::DeadLettered(error) => ("dead_lettered", Some(error)),
            Outcome::Retrying { error, .. } => ("retrying", Some(error)),
        };
        metrics::counter!("spool_worker_jobs_total", "model" => model.to_owned(), "outcome" => outcome).increment(1);
        let (job_id, attempt, trace_id) = (completion.id, completion.attempt, completion.trace_id.as_deref());
        match error {
            Some(error) => {
                tracing::warn!(%job_id, attempt, trace_id, outcome, code = error.code.as_str(), "job attempt failed")
            }
            None => tracing::debug!(%job_id, attempt, trace_id, outcome, "job succeeded"),
        }
    }
}

async fn ack_all(deliveries: impl IntoIterator<Item = Delivery>) {
    for delivery in deliveries {
        if let Err(error) = delivery.ack(BasicAckOptions::default()).await {
            // The broker will redeliver it; the conditional writes make that harmless.
            tracing::warn!(%error, "ack failed");
        }
    }
}

/// Returns a batch's messages to their queue when its retries and dead letters could not
/// be published, after a short pause (holding the batch's slot): a broker that keeps
/// refusing them must not become a hot loop of redeliveries. Each return counts toward
/// the queue's delivery limit.
async fn requeue_later(deliveries: impl IntoIterator<Item = Delivery>) {
    tokio::time::sleep(Duration::from_millis(500)).await;
    for delivery in deliveries {
        let options = BasicNackOptions { requeue: true, ..Default::default() };
        if let Err(error) = delivery.nack(options).await {
            tracing::warn!(%error, "nack failed");
        }
    }
}

async fn reject(delivery: Delivery) {
    let options = BasicNackOptions { requeue: false, ..Default::default() };
    if let Err(error) = delivery.nack(options).await {
        tracing::warn!(%error, "nack failed");
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use spool_shared::breaker::BreakerSettings;
    use spool_shared::manifest::Manifest;

    use super::*;
    use crate::engine::echo::EchoEngine;

    async fn slow_model(forward: Duration, batches_in_flight: usize) -> ModelHandle {
        let models = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models");
        let spec = Manifest::load(&models).expect("the manifest loads").models.into_iter().next().expect("a model");
        let settings = BreakerSettings::default();
        ModelHandle::start_with(spec, tch::Device::Cpu, settings, batches_in_flight, move || {
            Ok(Box::new(EchoEngine { forward_time: forward }))
        })
        .await
        .expect("the model starts")
    }

    #[tokio::test]
    async fn inference_time_is_the_forward_alone_not_the_wait_for_the_model_thread() {
        const FORWARD: Duration = Duration::from_millis(40);
        let model = slow_model(FORWARD, 3).await;
        let started = Instant::now();
        let run = || run_model(&model, vec![json!(1)], None, Duration::from_secs(30));
        let runs = futures::future::join3(run(), run(), run()).await;
        let wall = started.elapsed();
        let forwards: Vec<Duration> =
            [runs.0, runs.1, runs.2].into_iter().map(|run| run.forward_time.expect("each forward finished")).collect();
        assert!(forwards.iter().all(|forward| *forward >= FORWARD), "{forwards:?}");
        // The three forwards ran one after another on the model thread, so their own
        // times fit in the wall time. Times that counted the wait for the thread would
        // not: the last batch alone would have taken about the whole of it.
        let total: Duration = forwards.iter().sum();
        assert!(total <= wall, "forwards {forwards:?} add up to more than the {wall:?} they all took");
    }

    #[tokio::test]
    async fn a_batch_without_a_finished_forward_has_no_inference_time() {
        let model = slow_model(Duration::ZERO, 1).await;
        let run = run_model(&model, vec![json!("fail here")], Some("fail here"), Duration::from_secs(30)).await;
        assert!(run.forward_time.is_none(), "every input failed before the forward");
        assert!(matches!(&run.results[..], [Err(error)] if error.code == "injected_fault"));
        // Inputs the codec rejects never reach the model thread either.
        let run = run_model(&model, vec![json!("not a number")], None, Duration::from_secs(30)).await;
        assert!(run.forward_time.is_none(), "no input got as far as the forward");
        assert!(matches!(&run.results[..], [Err(error)] if error.code == "invalid_input"));
    }
}
