//! The model thread: libtorch calls block, so each model lives on a dedicated OS thread
//! fed by a channel of forwards, each with a tracing span and a one-shot reply. The cheap
//! `ModelHandle` is what async code holds: it prepares a batch (decode, tokenize) and
//! finishes it (outputs as JSON) with the model's codec on a blocking thread, so that this
//! work overlaps the forwards of the other batches in flight.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;
use spool_shared::breaker::{BreakerSettings, SharedBreaker};
use spool_shared::manifest::ModelSpec;
use tch::Device;
use tokio::sync::oneshot;

use crate::engine::{self, Codec, Engine, EngineError, Features, ItemResult, Prepared};

/// What one batch produced, with how long its forward took.
pub struct BatchOutput {
    pub results: Vec<ItemResult>,
    /// The forward's own time on the model thread (tensors, forward, copy back); `None`
    /// when no input got as far as a forward.
    pub inference_time: Option<Duration>,
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("the model thread of {0} has stopped")]
    Stopped(String),
}

/// A forward for the model thread; the features come back with the rows, for the outputs.
struct Command {
    features: Features,
    span: tracing::Span,
    reply: oneshot::Sender<Forwarded>,
}

struct Forwarded {
    features: Features,
    rows: Result<Vec<f32>, EngineError>,
    time: Duration,
}

#[derive(Clone)]
pub struct ModelHandle {
    pub spec: Arc<ModelSpec>,
    /// Guards the model's runtime; shared by its consumer and the heartbeat.
    pub breaker: SharedBreaker,
    codec: Arc<dyn Codec>,
    commands: mpsc::SyncSender<Command>,
}

impl ModelHandle {
    /// Starts the model's thread, loads the model there and runs one warm-up forward.
    /// Returns once the model is ready (or failed to load). `batches_in_flight`: how many
    /// batches its consumer runs at once (each waits for its forward before sending more).
    pub async fn start(
        spec: ModelSpec,
        device: Device,
        breaker: BreakerSettings,
        batches_in_flight: usize,
    ) -> Result<Self, RuntimeError> {
        let load_spec = spec.clone();
        Self::start_with(spec, device, breaker, batches_in_flight, move || engine::load(&load_spec, device)).await
    }

    /// [`Self::start`] with the engine made by `load` on the model's thread.
    pub(crate) async fn start_with(
        spec: ModelSpec,
        device: Device,
        breaker: BreakerSettings,
        batches_in_flight: usize,
        load: impl FnOnce() -> Result<Box<dyn Engine>, EngineError> + Send + 'static,
    ) -> Result<Self, RuntimeError> {
        let spec = Arc::new(spec);
        // Room for one command per batch in flight, so a batch never waits to send its
        // own. A full channel means forwards that timed out still hold the thread (their
        // commands stay queued): then senders wait, the back-pressure we want.
        let (commands, receiver) = mpsc::sync_channel::<Command>(batches_in_flight.max(1));
        let (ready_tx, ready_rx) = oneshot::channel();
        let thread_spec = Arc::clone(&spec);
        std::thread::Builder::new()
            .name(format!("model-{}", spec.name))
            .spawn(move || model_thread(&thread_spec, device, load, receiver, ready_tx))
            .map_err(|_| RuntimeError::Stopped(spec.name.clone()))?;
        let codec = ready_rx.await.map_err(|_| RuntimeError::Stopped(spec.name.clone()))??;
        Ok(Self { spec, breaker: SharedBreaker::new(breaker), codec, commands })
    }

    /// Runs one batch: prepares it here (a blocking thread), forwards it on the model
    /// thread, and makes its outputs here again.
    pub async fn infer(&self, inputs: Vec<Value>) -> Result<BatchOutput, RuntimeError> {
        let codec = Arc::clone(&self.codec);
        let Prepared { rejected, features } = blocking(move || codec.prepare(&inputs)).await??;
        let (features, rows, inference_time) = if features.is_empty() {
            (features, Vec::new(), None)
        } else {
            let forwarded = self.forward(features).await?;
            (forwarded.features, forwarded.rows?, Some(forwarded.time))
        };
        let codec = Arc::clone(&self.codec);
        let results = blocking(move || rejected.merge(codec.outputs(&features, &rows))).await?;
        Ok(BatchOutput { results, inference_time })
    }

    async fn forward(&self, features: Features) -> Result<Forwarded, RuntimeError> {
        let (reply, response) = oneshot::channel();
        let command = Command { features, span: tracing::Span::current(), reply };
        let commands = self.commands.clone();
        // SyncSender::send blocks while the queue is full: keep it off the async threads.
        tokio::task::spawn_blocking(move || commands.send(command))
            .await
            .ok()
            .and_then(Result::ok)
            .ok_or_else(|| RuntimeError::Stopped(self.spec.name.clone()))?;
        response.await.map_err(|_| RuntimeError::Stopped(self.spec.name.clone()))
    }
}

/// Runs a codec step on a blocking thread; a panic there fails the batch as the engine's.
async fn blocking<T: Send + 'static>(step: impl FnOnce() -> T + Send + 'static) -> Result<T, EngineError> {
    tokio::task::spawn_blocking(move || std::panic::catch_unwind(AssertUnwindSafe(step)))
        .await
        .map_err(|error| EngineError::Panicked(error.to_string()))?
        .map_err(|panic| EngineError::Panicked(panic_message(panic.as_ref())))
}

fn model_thread(
    spec: &ModelSpec,
    device: Device,
    load: impl FnOnce() -> Result<Box<dyn Engine>, EngineError>,
    commands: mpsc::Receiver<Command>,
    ready: oneshot::Sender<Result<Arc<dyn Codec>, EngineError>>,
) {
    let started = Instant::now();
    let mut engine = match load() {
        Ok(engine) => engine,
        Err(error) => {
            let _ = ready.send(Err(error));
            return;
        }
    };
    if let Err(error) = warm_up(engine.as_mut()) {
        let _ = ready.send(Err(error));
        return;
    }
    tracing::info!(model = %spec.name, ?device, load_ms = started.elapsed().as_millis() as u64, "model loaded and warmed up");
    let _ = ready.send(Ok(engine.codec()));
    // Ends when every handle is dropped.
    while let Ok(command) = commands.recv() {
        let _entered = command.span.enter();
        let started = Instant::now();
        // A panic in the engine (tch panics where its non-`f_` functions fail; a bug)
        // would end this thread, and every later batch would fail `Stopped` while the
        // worker kept taking jobs. Caught, it fails this batch with a retryable error
        // that the model's breaker counts: an engine broken for good opens the breaker,
        // and the jobs wait in the queue for healthy workers.
        let rows = std::panic::catch_unwind(AssertUnwindSafe(|| engine.forward(&command.features)))
            .unwrap_or_else(|panic| Err(EngineError::Panicked(panic_message(panic.as_ref()))));
        let forwarded = Forwarded { features: command.features, rows, time: started.elapsed() };
        let _ = command.reply.send(forwarded);
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    match (panic.downcast_ref::<&str>(), panic.downcast_ref::<String>()) {
        (Some(message), _) => (*message).to_owned(),
        (_, Some(message)) => message.clone(),
        _ => "a panic without a message".to_owned(),
    }
}

fn warm_up(engine: &mut dyn Engine) -> Result<(), EngineError> {
    // A few passes at different sizes let libtorch settle its allocations and kernels.
    let sample = engine.codec().sample_input();
    for size in [1, 4] {
        for result in engine::infer(engine, &vec![sample.clone(); size])? {
            if let Err(error) = result {
                tracing::warn!(code = %error.code, message = %error.message, "warm-up input rejected");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::engine::echo::EchoEngine;

    #[tokio::test]
    async fn a_panicking_batch_fails_alone_and_the_model_keeps_serving() {
        let models = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models");
        let manifest = spool_shared::manifest::Manifest::load(&models).expect("the manifest loads");
        let spec = manifest.models.into_iter().next().expect("a model");
        let handle = ModelHandle::start_with(spec, Device::Cpu, BreakerSettings::default(), 2, || {
            Ok(Box::new(EchoEngine { forward_time: Duration::ZERO }))
        })
        .await
        .expect("the model starts");
        // A negative number makes the echo engine's forward panic.
        let failed = handle.infer(vec![json!(-1)]).await;
        assert!(matches!(failed, Err(RuntimeError::Engine(EngineError::Panicked(_)))), "{:?}", failed.err());
        let served =
            handle.infer(vec![json!(1), json!("not a number"), json!(2)]).await.expect("the model thread is alive");
        let outputs: Vec<Result<String, String>> =
            served.results.iter().map(|r| r.as_ref().map(|o| o.get().to_owned()).map_err(|e| e.code.clone())).collect();
        assert_eq!(outputs, [Ok("1.0".to_owned()), Err("invalid_input".to_owned()), Ok("2.0".to_owned())]);
    }
}
