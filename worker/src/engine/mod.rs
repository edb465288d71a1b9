//! Model engines: turn a batch of JSON inputs into one forward and back into JSON outputs.
//!
//! An engine is blocking (libtorch) and lives on its model thread (see `runtime`).
//! Inputs were validated by the API against the model's schema; an engine still checks
//! what it decodes, and a bad item fails alone without failing its batch.
//!
//! Outputs leave an engine as JSON text ([`Output`]), encoded once from the tensors'
//! `f32`s and written to the database as they are: no `serde_json::Value` per number, and
//! each number in its shortest `f32` form (about half the bytes of the `f64` digits).

mod digits;
mod minilm;

use serde::Serialize;
use serde_json::Value;
use serde_json::value::RawValue;
use spool_shared::job::JobError;
use spool_shared::manifest::{EngineKind, ModelSpec};
use tch::Device;

pub use digits::DigitsEngine;
pub use minilm::MiniLmEngine;

/// One item's output: JSON text, written to `jobs.output` as it is.
pub type Output = Box<RawValue>;

/// The outcome of one item of a batch.
pub type ItemResult = Result<Output, JobError>;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("cannot load model artifact {path}: {source}")]
    Load { path: String, source: tch::TchError },
    #[error("cannot load tokenizer {path}: {message}")]
    Tokenizer { path: String, message: String },
    #[error("model {0} has no tokenizer in the manifest")]
    MissingTokenizer(String),
    /// The forward itself failed (out of memory, CUDA error, …): the whole batch may be retried.
    #[error("forward failed: {0}")]
    Forward(#[from] tch::TchError),
    #[error("tokenization failed: {0}")]
    Tokenize(String),
    /// The engine panicked mid-batch (the model thread caught it): the batch may be retried.
    #[error("the engine panicked: {0}")]
    Panicked(String),
}

pub trait Engine: Send {
    /// Runs one forward over the batch and returns one result per input, in order.
    fn infer(&mut self, inputs: &[Value]) -> Result<Vec<ItemResult>, EngineError>;

    /// An input the model accepts, used to warm it up at start.
    fn sample_input(&self) -> Value;
}

/// Loads the engine the manifest names for `spec`.
pub fn load(spec: &ModelSpec, device: Device) -> Result<Box<dyn Engine>, EngineError> {
    Ok(match spec.engine {
        EngineKind::Digits => Box::new(DigitsEngine::load(spec, device)?),
        EngineKind::Minilm => Box::new(MiniLmEngine::load(spec, device)?),
    })
}

fn load_module(spec: &ModelSpec, device: Device) -> Result<tch::CModule, EngineError> {
    let mut module = tch::CModule::load_on_device(&spec.artifact, device)
        .map_err(|source| EngineError::Load { path: spec.artifact.display().to_string(), source })?;
    module.set_eval();
    Ok(module)
}

/// Decodes every input; returns the decoded values with their positions, and the
/// per-position results pre-filled with errors for the inputs that did not decode.
fn decode_all<T, F>(inputs: &[Value], decode: F) -> (Vec<(usize, T)>, Vec<Option<ItemResult>>)
where
    F: Fn(&Value) -> Result<T, JobError>,
{
    let mut decoded = Vec::with_capacity(inputs.len());
    let mut results: Vec<Option<ItemResult>> = Vec::with_capacity(inputs.len());
    for (index, input) in inputs.iter().enumerate() {
        match decode(input) {
            Ok(value) => {
                decoded.push((index, value));
                results.push(None);
            }
            Err(error) => results.push(Some(Err(error))),
        }
    }
    (decoded, results)
}

/// Encodes one item's output. It cannot fail for the engines' plain structs of numbers;
/// if it ever did, that item alone fails, retryably.
pub fn encode(output: &impl Serialize) -> ItemResult {
    serde_json::value::to_raw_value(output)
        .map_err(|e| JobError::retryable("inference_error", format!("cannot encode the output: {e}")))
}

/// Fills the remaining slots with the model's outputs, in order.
fn merge(
    mut results: Vec<Option<ItemResult>>,
    decoded_positions: impl Iterator<Item = usize>,
    outputs: impl Iterator<Item = ItemResult>,
) -> Vec<ItemResult> {
    for (index, output) in decoded_positions.zip(outputs) {
        results[index] = Some(output);
    }
    results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err(JobError::retryable("inference_error", "model returned too few rows"))))
        .collect()
}

fn invalid_input(message: impl Into<String>) -> JobError {
    JobError::fatal("invalid_input", message)
}
