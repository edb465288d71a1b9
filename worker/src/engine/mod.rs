//! Model engines: turn a batch of JSON inputs into one forward and back into JSON outputs.
//!
//! Each model has two halves. Its [`Codec`] does the CPU work around the forward: decoding
//! (and tokenizing) the inputs before it, and writing the outputs as JSON after it. Callers
//! run the codec on their own threads, so that a batch's codec work overlaps the forward of
//! the batch ahead of it: on a GPU, tokenizing a batch costs about as much as its forward.
//! The [`Engine`] holds the model and lives on its model thread (see `runtime`, blocking
//! libtorch calls); it only turns features into tensors, runs the forward, and copies the
//! rows back.
//!
//! Inputs were validated by the API against the model's schema; a codec still checks what
//! it decodes, and a bad item fails alone without failing its batch.
//!
//! Outputs are JSON text ([`Output`]), encoded once from the rows' `f32`s and written to
//! the database as they are: no `serde_json::Value` per number, and each number in its
//! shortest `f32` form (about half the bytes of the `f64` digits).

mod digits;
mod minilm;

use std::sync::Arc;

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
    /// A codec handed its engine another model's kind of features. This is a bug.
    #[error("the forward got features it does not take (a bug)")]
    WrongFeatures,
    /// The engine or its codec panicked mid-batch (caught): the batch may be retried.
    #[error("the engine panicked: {0}")]
    Panicked(String),
}

/// What a forward takes: one item per input that decoded, in order.
#[derive(Debug, Clone)]
pub enum Features {
    /// `width` numbers per input (digits-cnn's pixels).
    Rows { values: Vec<f32>, width: usize },
    /// The token ids of each input, unpadded (minilm-embed).
    Tokens(Vec<Vec<u32>>),
}

impl Features {
    /// How many inputs the forward runs on.
    pub fn len(&self) -> usize {
        match self {
            Features::Rows { values, width } => values.len() / (*width).max(1),
            Features::Tokens(rows) => rows.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A batch ready for its forward.
#[derive(Debug)]
pub struct Prepared {
    pub rejected: Rejected,
    pub features: Features,
}

impl Prepared {
    pub fn new(rejected: Vec<Option<JobError>>, features: Features) -> Self {
        Self { rejected: Rejected(rejected), features }
    }
}

/// One slot per input of a batch: the error of an input that did not decode, `None` for
/// one that went into the features.
#[derive(Debug)]
pub struct Rejected(Vec<Option<JobError>>);

impl Rejected {
    /// One result per input, in order: the rejected inputs' errors, and `outputs` (one per
    /// item of the features) for the others.
    pub fn merge(self, outputs: Vec<ItemResult>) -> Vec<ItemResult> {
        let mut outputs = outputs.into_iter();
        self.0
            .into_iter()
            .map(|slot| match slot {
                Some(error) => Err(error),
                None => outputs
                    .next()
                    .unwrap_or_else(|| Err(JobError::retryable("inference_error", "model returned too few rows"))),
            })
            .collect()
    }
}

/// A model's CPU half, shared by every thread that runs its batches.
pub trait Codec: Send + Sync {
    /// Decodes (and tokenizes) a batch's inputs; a bad input is rejected alone.
    fn prepare(&self, inputs: &[Value]) -> Result<Prepared, EngineError>;

    /// One output per item of `features`, from the forward's rows (flattened).
    fn outputs(&self, features: &Features, rows: &[f32]) -> Vec<ItemResult>;

    /// An input the model accepts, used to warm it up at start.
    fn sample_input(&self) -> Value;
}

/// A loaded model, on its model thread.
pub trait Engine: Send {
    /// The model's CPU half, for the threads that prepare and finish its batches.
    fn codec(&self) -> Arc<dyn Codec>;

    /// One forward over `features`: the output rows, flattened.
    fn forward(&mut self, features: &Features) -> Result<Vec<f32>, EngineError>;
}

/// Prepare, forward and finish one batch on this thread (the warm-up, and tests).
pub fn infer(engine: &mut dyn Engine, inputs: &[Value]) -> Result<Vec<ItemResult>, EngineError> {
    let codec = engine.codec();
    let Prepared { rejected, features } = codec.prepare(inputs)?;
    let rows = if features.is_empty() { Vec::new() } else { engine.forward(&features)? };
    Ok(rejected.merge(codec.outputs(&features, &rows)))
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

/// Decodes every input; returns the decoded values in order, and one slot per input with
/// the error of each input that did not decode.
fn decode_all<T, F>(inputs: &[Value], decode: F) -> (Vec<T>, Vec<Option<JobError>>)
where
    F: Fn(&Value) -> Result<T, JobError>,
{
    let mut decoded = Vec::with_capacity(inputs.len());
    let mut rejected = Vec::with_capacity(inputs.len());
    for input in inputs {
        match decode(input) {
            Ok(value) => {
                decoded.push(value);
                rejected.push(None);
            }
            Err(error) => rejected.push(Some(error)),
        }
    }
    (decoded, rejected)
}

/// Encodes one item's output. It cannot fail for the engines' plain structs of numbers;
/// if it ever did, that item alone fails, retryably.
pub fn encode(output: &impl Serialize) -> ItemResult {
    serde_json::value::to_raw_value(output)
        .map_err(|e| JobError::retryable("inference_error", format!("cannot encode the output: {e}")))
}

fn invalid_input(message: impl Into<String>) -> JobError {
    JobError::fatal("invalid_input", message)
}

/// An engine for the runtime's and consumer's tests: each input is a number, and its
/// output is that number back; a negative number panics in the forward, as tch does where
/// a call fails. `forward_time` is how long each forward sleeps.
#[cfg(test)]
pub(crate) mod echo {
    use std::time::Duration;

    use serde_json::json;

    use super::*;

    pub struct EchoEngine {
        pub forward_time: Duration,
    }

    struct EchoCodec;

    impl Codec for EchoCodec {
        fn prepare(&self, inputs: &[Value]) -> Result<Prepared, EngineError> {
            let (values, rejected) = decode_all(inputs, |input| {
                input.as_f64().map(|x| x as f32).ok_or_else(|| invalid_input("not a number"))
            });
            Ok(Prepared::new(rejected, Features::Rows { values, width: 1 }))
        }

        fn outputs(&self, _features: &Features, rows: &[f32]) -> Vec<ItemResult> {
            rows.iter().map(encode).collect()
        }

        fn sample_input(&self) -> Value {
            json!(0)
        }
    }

    impl Engine for EchoEngine {
        fn codec(&self) -> Arc<dyn Codec> {
            Arc::new(EchoCodec)
        }

        fn forward(&mut self, features: &Features) -> Result<Vec<f32>, EngineError> {
            let Features::Rows { values, .. } = features else { return Err(EngineError::WrongFeatures) };
            assert!(values.iter().all(|&x| x >= 0.0), "simulated tch panic");
            std::thread::sleep(self.forward_time);
            Ok(values.clone())
        }
    }
}
