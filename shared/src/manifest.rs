//! The model manifest (`models/manifest.toml`): which models exist, where their
//! artifacts are, how they batch, and the JSON schemas of their inputs and outputs.

use std::path::{Path, PathBuf};

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path} is not a valid manifest: {source}")]
    Parse { path: PathBuf, source: toml::de::Error },
    #[error("{path} is not valid JSON: {source}")]
    Schema { path: PathBuf, source: serde_json::Error },
    #[error("model name {0:?} appears twice in the manifest")]
    Duplicate(String),
}

/// Which Rust engine runs a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EngineKind {
    /// 8×8 digit classifier: `{pixels}` → `{label, probabilities}`.
    Digits,
    /// MiniLM sentence embeddings: `{text}` → `{embedding, tokens}`.
    Minilm,
}

/// One model as the manifest file spells it.
#[derive(Debug, Clone, Deserialize)]
struct ModelEntry {
    name: String,
    task: String,
    engine: EngineKind,
    artifact: PathBuf,
    tokenizer: Option<PathBuf>,
    max_batch_size: usize,
    max_batch_delay_ms: u64,
    max_tokens: Option<usize>,
    max_attempts: Option<u32>,
    input_schema: PathBuf,
    output_schema: PathBuf,
    #[serde(default)]
    description: String,
}

#[derive(Debug, Deserialize)]
struct ManifestFile {
    model: Vec<ModelEntry>,
}

/// A served model, with paths resolved and schemas loaded.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    pub name: String,
    pub task: String,
    pub engine: EngineKind,
    pub artifact: PathBuf,
    pub tokenizer: Option<PathBuf>,
    /// Largest batch one forward runs. Bigger batches raise throughput until the device
    /// is saturated, at the cost of per-job latency.
    pub max_batch_size: usize,
    /// How long a partial batch waits for more jobs before it runs anyway.
    pub max_batch_delay_ms: u64,
    pub max_tokens: Option<usize>,
    /// Overrides `worker.max_attempts` for this model.
    pub max_attempts: Option<u32>,
    pub input_schema: serde_json::Value,
    pub output_schema: serde_json::Value,
    pub description: String,
}

#[derive(Debug, Clone)]
pub struct Manifest {
    pub models: Vec<ModelSpec>,
}

impl Manifest {
    /// Reads `<dir>/manifest.toml` and the schema files it names.
    pub fn load(dir: &Path) -> Result<Self, ManifestError> {
        let path = dir.join("manifest.toml");
        let text = read(&path)?;
        let file: ManifestFile = toml::from_str(&text).map_err(|source| ManifestError::Parse { path, source })?;
        let mut models: Vec<ModelSpec> = Vec::with_capacity(file.model.len());
        for entry in file.model {
            if models.iter().any(|m| m.name == entry.name) {
                return Err(ManifestError::Duplicate(entry.name));
            }
            models.push(ModelSpec {
                input_schema: read_json(&dir.join(&entry.input_schema))?,
                output_schema: read_json(&dir.join(&entry.output_schema))?,
                artifact: dir.join(&entry.artifact),
                tokenizer: entry.tokenizer.map(|t| dir.join(t)),
                name: entry.name,
                task: entry.task,
                engine: entry.engine,
                max_batch_size: entry.max_batch_size.max(1),
                max_batch_delay_ms: entry.max_batch_delay_ms,
                max_tokens: entry.max_tokens,
                max_attempts: entry.max_attempts,
                description: entry.description,
            });
        }
        Ok(Self { models })
    }

    pub fn get(&self, name: &str) -> Option<&ModelSpec> {
        self.models.iter().find(|m| m.name == name)
    }

    pub fn names(&self) -> Vec<String> {
        self.models.iter().map(|m| m.name.clone()).collect()
    }
}

fn read(path: &Path) -> Result<String, ManifestError> {
    std::fs::read_to_string(path).map_err(|source| ManifestError::Read { path: path.to_owned(), source })
}

fn read_json(path: &Path) -> Result<serde_json::Value, ManifestError> {
    serde_json::from_str(&read(path)?).map_err(|source| ManifestError::Schema { path: path.to_owned(), source })
}
