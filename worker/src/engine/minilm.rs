//! `minilm-embed`: all-MiniLM-L6-v2 sentence embeddings (384-d, mean-pooled, L2-normalized;
//! pooling and normalization happen inside the TorchScript artifact).

use std::sync::Arc;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use spool_shared::job::JobError;
use spool_shared::manifest::ModelSpec;
use tch::{Device, Kind, Tensor};
use tokenizers::{Tokenizer, TruncationParams};

use super::{
    Codec, Engine, EngineError, Features, ItemResult, Prepared, decode_all, encode, invalid_input, load_module,
};

const DIMENSIONS: usize = 384;
/// sentence-transformers truncates this model at 256 tokens; the positions stop at 512.
const DEFAULT_MAX_TOKENS: usize = 256;
const MAX_TEXT_CHARS: usize = 8192;
/// On the CPU a forward costs in proportion to its padded tokens, and from about this many
/// tokens its matrix products run at full speed: a batch is split into groups of similar
/// length, each padded to its own longest, once a group has this many.
const CPU_GROUP_MIN_TOKENS: usize = 256;
/// A group stops growing when padding would make it this much bigger than its tokens.
const CPU_GROUP_MAX_PADDING: f64 = 0.25;
/// Texts per parallel encoding task: one text's 384 numbers take a few microseconds.
const ENCODE_CHUNK: usize = 8;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EmbedInput {
    text: String,
}

#[derive(Serialize)]
struct EmbedOutput<'a> {
    embedding: &'a [f32],
    tokens: usize,
}

pub struct MiniLmEngine {
    module: tch::CModule,
    device: Device,
    codec: Arc<MiniLmCodec>,
}

/// Tokenizes texts where sentence-transformers does, and writes the embeddings as JSON.
struct MiniLmCodec {
    tokenizer: Tokenizer,
}

impl MiniLmEngine {
    pub fn load(spec: &ModelSpec, device: Device) -> Result<Self, EngineError> {
        let path = spec.tokenizer.as_ref().ok_or_else(|| EngineError::MissingTokenizer(spec.name.clone()))?;
        let tokenizer_error = |message: String| EngineError::Tokenizer { path: path.display().to_string(), message };
        let mut tokenizer = Tokenizer::from_file(path).map_err(|e| tokenizer_error(e.to_string()))?;
        // The shipped tokenizer.json pads every batch to a fixed 128 tokens; `forward` pads
        // each group of texts itself, and texts are truncated where sentence-transformers does.
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: spec.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS).min(512),
                ..Default::default()
            }))
            .map_err(|e| tokenizer_error(e.to_string()))?;
        Ok(Self { module: load_module(spec, device)?, device, codec: Arc::new(MiniLmCodec { tokenizer }) })
    }

    /// One forward over `rows` of token ids, padded to the longest: one embedding per row,
    /// flattened.
    fn forward_padded(&self, rows: &[&[u32]]) -> Result<Vec<f32>, EngineError> {
        let width = rows.iter().map(|row| row.len()).max().unwrap_or(0);
        let mut ids = vec![0i64; rows.len() * width]; // [PAD] is 0
        let mut mask = vec![0i64; rows.len() * width];
        for (row, tokens) in rows.iter().enumerate() {
            for (column, &id) in tokens.iter().enumerate() {
                ids[row * width + column] = i64::from(id);
                mask[row * width + column] = 1;
            }
        }
        let shape = [rows.len() as i64, width as i64];
        // The fallible `f_` calls: a failed device copy fails the batch (retryable) instead
        // of panicking on the model thread.
        let ids = Tensor::f_from_slice(&ids)?.f_view(shape)?.f_to_device(self.device)?;
        let mask = Tensor::f_from_slice(&mask)?.f_view(shape)?.f_to_device(self.device)?;
        let embeddings = tch::no_grad(|| self.module.forward_ts(&[ids, mask]))?
            .f_to_kind(Kind::Float)?
            .f_to_device(Device::Cpu)?
            .f_contiguous()?;
        Ok(Vec::<f32>::try_from(embeddings.f_view([-1])?)?)
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

impl Codec for MiniLmCodec {
    fn prepare(&self, inputs: &[Value]) -> Result<Prepared, EngineError> {
        let (texts, rejected) = decode_all(inputs, decode);
        let tokens = if texts.is_empty() {
            Vec::new()
        } else {
            let encodings =
                self.tokenizer.encode_batch(texts, true).map_err(|e| EngineError::Tokenize(e.to_string()))?;
            encodings.into_iter().map(|encoding| encoding.get_ids().to_vec()).collect()
        };
        Ok(Prepared::new(rejected, Features::Tokens(tokens)))
    }

    fn outputs(&self, features: &Features, rows: &[f32]) -> Vec<ItemResult> {
        let Features::Tokens(tokens) = features else {
            return Vec::new(); // no outputs: every item fails as "too few rows"
        };
        // 384 numbers a text, a few microseconds: written in parallel, as a batch's share
        // of the CPU work between two forwards.
        rows.par_chunks(DIMENSIONS)
            .zip(tokens.par_iter())
            .with_min_len(ENCODE_CHUNK)
            .map(|(embedding, ids)| encode(&EmbedOutput { embedding, tokens: ids.len() }))
            .collect()
    }

    fn sample_input(&self) -> Value {
        json!({ "text": "Spool warms up this model once at start." })
    }
}

impl Engine for MiniLmEngine {
    fn codec(&self) -> Arc<dyn Codec> {
        self.codec.clone()
    }

    fn forward(&mut self, features: &Features) -> Result<Vec<f32>, EngineError> {
        let Features::Tokens(tokens) = features else { return Err(EngineError::WrongFeatures) };
        let token_counts: Vec<usize> = tokens.iter().map(Vec::len).collect();
        // On the CPU every padding token costs as much as a real one. On CUDA the batch
        // stays one forward: more launches against less padding is unmeasured there.
        let groups = if self.device == Device::Cpu {
            length_groups(&token_counts, CPU_GROUP_MIN_TOKENS, CPU_GROUP_MAX_PADDING)
        } else {
            vec![(0..token_counts.len()).collect()]
        };
        let mut values = vec![0f32; tokens.len() * DIMENSIONS];
        for group in groups {
            let rows: Vec<&[u32]> = group.iter().map(|&i| tokens[i].as_slice()).collect();
            let group_values = self.forward_padded(&rows)?;
            for (embedding, &i) in group_values.chunks(DIMENSIONS).zip(&group) {
                values[i * DIMENSIONS..(i + 1) * DIMENSIONS].copy_from_slice(embedding);
            }
        }
        Ok(values)
    }
}

/// Positions of the texts, shortest first, in groups to run as separate forwards: a group
/// is closed once it holds `min_tokens` tokens and the next text would pad it to more than
/// `1 + max_padding` times its tokens.
fn length_groups(token_counts: &[usize], min_tokens: usize, max_padding: f64) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..token_counts.len()).collect();
    order.sort_by_key(|&i| token_counts[i]);
    let mut groups: Vec<Vec<usize>> = Vec::new();
    let mut group: Vec<usize> = Vec::new();
    let mut tokens = 0;
    for i in order {
        let length = token_counts[i];
        let padded = length * (group.len() + 1);
        if tokens >= min_tokens && padded as f64 > (1.0 + max_padding) * (tokens + length) as f64 {
            groups.push(std::mem::take(&mut group));
            tokens = 0;
        }
        group.push(i);
        tokens += length;
    }
    if !group.is_empty() {
        groups.push(group);
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn texts_of_similar_length_share_a_forward() {
        // Small batches stay whole: splitting them would cost more than the padding.
        assert_eq!(length_groups(&[30, 5, 12], 256, 0.25), vec![vec![1, 2, 0]]);
        // 20 texts of 20 tokens and 10 of 120: two groups, each padded to its own longest.
        let mut lengths = vec![20; 20];
        lengths.extend([120; 10]);
        let groups = length_groups(&lengths, 256, 0.25);
        assert_eq!(groups.len(), 2);
        assert!(groups[0].iter().all(|&i| lengths[i] == 20) && groups[0].len() == 20);
        assert!(groups[1].iter().all(|&i| lengths[i] == 120) && groups[1].len() == 10);
        // Every position appears exactly once.
        let mut all: Vec<usize> = groups.concat();
        all.sort();
        assert_eq!(all, (0..30).collect::<Vec<_>>());
        assert!(length_groups(&[], 256, 0.25).is_empty());
    }

    /// The real artifact (made by scripts/setup): a batch of texts of very different
    /// lengths, run in length groups, gives each text the embedding it gets alone.
    #[test]
    fn a_mixed_batch_embeds_each_text_as_it_would_alone() {
        let models = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models");
        let manifest = spool_shared::manifest::Manifest::load(&models).unwrap();
        let spec = manifest.models.into_iter().find(|m| m.name == "minilm-embed").unwrap();
        let mut engine = MiniLmEngine::load(&spec, Device::Cpu).unwrap();
        let mut infer = |inputs: &[Value]| crate::engine::infer(&mut engine, inputs).unwrap();
        let reference: Value =
            serde_json::from_str(&std::fs::read_to_string(models.join("minilm-embed/reference.json")).unwrap())
                .unwrap();
        let mut inputs: Vec<Value> =
            reference["sentences"].as_array().unwrap().iter().map(|s| json!({"text": s["text"]})).collect();
        for words in 1..40 {
            inputs.push(json!({"text": vec!["word"; words * 3].join(" ")}));
        }
        let parse = |result: &ItemResult| -> Value { serde_json::from_str(result.as_ref().unwrap().get()).unwrap() };
        let embedding = |result: &ItemResult| -> Vec<f64> {
            parse(result)["embedding"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
        };
        let together = infer(&inputs);
        let token_counts: Vec<usize> = together.iter().map(|r| parse(r)["tokens"].as_u64().unwrap() as usize).collect();
        assert!(length_groups(&token_counts, CPU_GROUP_MIN_TOKENS, CPU_GROUP_MAX_PADDING).len() > 2);
        for (input, result) in inputs.iter().zip(&together) {
            let alone = infer(std::slice::from_ref(input));
            let (a, b) = (embedding(&alone[0]), embedding(result));
            let dot: f64 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            assert!(dot > 0.99999, "{input}: cosine {dot} between alone and in the batch");
            assert_eq!(parse(&alone[0])["tokens"], parse(result)["tokens"]);
        }
    }
}
