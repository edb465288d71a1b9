//! The model thread: libtorch calls block, so each model lives on a dedicated OS thread
//! fed by a channel of commands, each with a tracing span and a one-shot reply.
//! The cheap `ModelHandle` is what async code holds.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;
use spool_shared::breaker::{BreakerSettings, SharedBreaker};
use spool_shared::manifest::ModelSpec;
use tch::Device;
use tokio::sync::oneshot;

use crate::engine::{self, Engine, EngineError, ItemResult};

/// What one forward produced, with how long it took.
pub struct BatchOutput {
    pub results: Vec<ItemResult>,
    pub inference_time: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("the model thread of {0} has stopped")]
    Stopped(String),
}

struct Command {
    inputs: Vec<Value>,
    span: tracing::Span,
    reply: oneshot::Sender<Result<BatchOutput, EngineError>>,
}

#[derive(Clone)]
pub struct ModelHandle {
    pub spec: Arc<ModelSpec>,
    /// Guards the model's runtime; shared by its consumer and the heartbeat.
    pub breaker: SharedBreaker,
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
        ready_rx.await.map_err(|_| RuntimeError::Stopped(spec.name.clone()))??;
        Ok(Self { spec, breaker: SharedBreaker::new(breaker), commands })
    }

    /// Runs one forward over `inputs` on the model thread.
    pub async fn infer(&self, inputs: Vec<Value>) -> Result<BatchOutput, RuntimeError> {
        let (reply, response) = oneshot::channel();
        let command = Command { inputs, span: tracing::Span::current(), reply };
        let commands = self.commands.clone();
        // SyncSender::send blocks while the queue is full: keep it off the async threads.
        tokio::task::spawn_blocking(move || commands.send(command))
            .await
            .ok()
            .and_then(Result::ok)
            .ok_or_else(|| RuntimeError::Stopped(self.spec.name.clone()))?;
        Ok(response.await.map_err(|_| RuntimeError::Stopped(self.spec.name.clone()))??)
    }
}

fn model_thread(
    spec: &ModelSpec,
    device: Device,
    load: impl FnOnce() -> Result<Box<dyn Engine>, EngineError>,
    commands: mpsc::Receiver<Command>,
    ready: oneshot::Sender<Result<(), EngineError>>,
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
    let _ = ready.send(Ok(()));
    // Ends when every handle is dropped.
    while let Ok(command) = commands.recv() {
        let _entered = command.span.enter();
        let started = Instant::now();
        // A panic in the engine (tch panics where its non-`f_` functions fail; a bug)
        // would end this thread, and every later batch would fail `Stopped` while the
        // worker kept taking jobs. Caught, it fails this batch with a retryable error
        // that the model's breaker counts: an engine broken for good opens the breaker,
        // and the jobs wait in the queue for healthy workers.
        let output = std::panic::catch_unwind(AssertUnwindSafe(|| engine.infer(&command.inputs)))
            .unwrap_or_else(|panic| Err(EngineError::Panicked(panic_message(panic.as_ref()))))
            .map(|results| BatchOutput { results, inference_time: started.elapsed() });
        let _ = command.reply.send(output);
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
    for size in [1, 4] {
        let inputs = vec![engine.sample_input(); size];
        for result in engine.infer(&inputs)? {
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
    use crate::engine::{ItemResult, encode};

    /// Echoes its inputs; panics on `"panic"`, as tch does where a call fails.
    struct Echo;

    impl Engine for Echo {
        fn infer(&mut self, inputs: &[Value]) -> Result<Vec<ItemResult>, EngineError> {
            assert!(!inputs.contains(&json!("panic")), "simulated tch panic");
            Ok(inputs.iter().map(encode).collect())
        }

        fn sample_input(&self) -> Value {
            json!("warm")
        }
    }

    #[tokio::test]
    async fn a_panicking_batch_fails_alone_and_the_model_keeps_serving() {
        let models = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models");
        let manifest = spool_shared::manifest::Manifest::load(&models).expect("the manifest loads");
        let spec = manifest.models.into_iter().next().expect("a model");
        let handle = ModelHandle::start_with(spec, Device::Cpu, BreakerSettings::default(), 2, || Ok(Box::new(Echo)))
            .await
            .expect("the model starts");
        let failed = handle.infer(vec![json!("panic")]).await;
        assert!(matches!(failed, Err(RuntimeError::Engine(EngineError::Panicked(_)))), "{:?}", failed.err());
        let served = handle.infer(vec![json!(1), json!(2)]).await.expect("the model thread is alive");
        let outputs: Vec<Option<String>> =
            served.results.iter().map(|r| r.as_ref().ok().map(|o| o.get().to_owned())).collect();
        assert_eq!(outputs, [Some("1".to_owned()), Some("2".to_owned())]);
    }
}
