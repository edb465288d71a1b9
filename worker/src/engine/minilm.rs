//! `minilm-embed`: all-MiniLM-L6-v2 sentence embeddings (384-d, mean-pooled, L2-normalized;
//! pooling and normalization happen inside the TorchScript artifact).

use serde::Deserialize;
use serde_json::{Value, json};
use spool_shared::job::JobError;
use spool_shared::manifest::ModelSpec;
use tch::{Device, Kind, Tensor};
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

use super::{Engine, EngineError, ItemResult, decode_all, invalid_input, load_module, merge};

const DIMENSIONS: usize = 384;
/// sentence-transformers truncates this model at 256 tokens; the positions stop at 512.
const DEFAULT_MAX_TOKENS: usize = 256;
const MAX_TEXT_CHARS: usize = 8192;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EmbedInput {
    text: String,
}

pub struct MiniLmEngine {
    module: tch::CModule,
    tokenizer: Tokenizer,
    device: Device,
}

impl MiniLmEngine {
    pub fn load(spec: &ModelSpec, device: Device) -> Result<Self, EngineError> {
        let path = spec.tokenizer.as_ref().ok_or_else(|| EngineError::MissingTokenizer(spec.name.clone()))?;
        let tokenizer_error = |message: String| EngineError::Tokenizer { path: path.display().to_string(), message };
        let mut tokenizer = Tokenizer::from_file(path).map_err(|e| tokenizer_error(e.to_string()))?;
        // The shipped tokenizer.json pads every batch to a fixed 128 tokens; pad to the
        // longest text instead, and truncate where sentence-transformers does.
        tokenizer.with_padding(Some(PaddingParams { strategy: PaddingStrategy::BatchLongest, ..Default::default() }));
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: spec.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS).min(512),
                ..Default::default()
            }))
            .map_err(|e| tokenizer_error(e.to_string()))?;
        Ok(Self { module: load_module(spec, device)?, tokenizer, device })
    }
}

fn decode(input: &Value) -> Result<String, JobError> {
    let parsed = EmbedInput::deserialize(input).map_err(|e| invalid_input(format!("input: {e}")))?;
    let chars = parsed.text.chars().count();
    if chars == 0 || chars > MAX_TEXT_CHARS {
        return Err(invalid_input(format!("text: must be 1–{MAX_TEXT_CHARS} characters, got {chars}")));
    }
    Ok(parsed.text)
}

impl Engine for MiniLmEngine {
    fn infer(&mut self, inputs: &[Value]) -> Result<Vec<ItemResult>, EngineError> {
        let (decoded, results) = decode_all(inputs, decode);
        if decoded.is_empty() {
            return Ok(merge(results, std::iter::empty(), std::iter::empty()));
        }
        let texts: Vec<&str> = decoded.iter().map(|(_, text)| text.as_str()).collect();
        let encodings = self.tokenizer.encode_batch(texts, true).map_err(|e| EngineError::Tokenize(e.to_string()))?;
        let rows = encodings.len() as i64;
        let width = encodings.first().map_or(0, |e| e.get_ids().len()) as i64;
        let mut ids = Vec::with_capacity((rows * width) as usize);
        let mut mask = Vec::with_capacity((rows * width) as usize);
        let mut token_counts = Vec::with_capacity(encodings.len());
        for encoding in &encodings {
            ids.extend(encoding.get_ids().iter().map(|&id| i64::from(id)));
            mask.extend(encoding.get_attention_mask().iter().map(|&m| i64::from(m)));
            token_counts.push(encoding.get_attention_mask().iter().filter(|&&m| m == 1).count());
        }
        let ids = Tensor::from_slice(&ids).view([rows, width]).to_device(self.device);
        let mask = Tensor::from_slice(&mask).view([rows, width]).to_device(self.device);
        let embeddings = tch::no_grad(|| self.module.forward_ts(&[ids, mask]))?
            .to_kind(Kind::Float)
            .to_device(Device::Cpu)
            .contiguous();
        let values = Vec::<f32>::try_from(embeddings.view([-1]))?;
        let outputs = values
            .chunks(DIMENSIONS)
            .zip(token_counts)
            .map(|(embedding, tokens)| json!({ "embedding": embedding, "tokens": tokens }));
        Ok(merge(results, decoded.iter().map(|(i, _)| *i), outputs))
    }

    fn sample_input(&self) -> Value {
        json!({ "text": "Spool warms up this model once at start." })
    }
}
