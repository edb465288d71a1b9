//! `digits-cnn`: 8×8 handwritten digits (scikit-learn's set) → label and probabilities.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use spool_shared::job::JobError;
use spool_shared::manifest::ModelSpec;
use tch::{Device, Kind, Tensor};

use super::{
    Codec, Engine, EngineError, Features, ItemResult, Prepared, decode_all, encode, invalid_input, load_module,
};

const PIXELS: usize = 64;
const CLASSES: usize = 10;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DigitsInput {
    pixels: Vec<u8>,
}

#[derive(Serialize)]
struct DigitsOutput<'a> {
    label: usize,
    probabilities: &'a [f32],
}

pub struct DigitsEngine {
    module: tch::CModule,
    device: Device,
}

impl DigitsEngine {
    pub fn load(spec: &ModelSpec, device: Device) -> Result<Self, EngineError> {
        Ok(Self { module: load_module(spec, device)?, device })
    }
}

fn decode(input: &Value) -> Result<[f32; PIXELS], JobError> {
    let parsed = DigitsInput::deserialize(input).map_err(|e| invalid_input(format!("input: {e}")))?;
    if parsed.pixels.len() != PIXELS {
        return Err(invalid_input(format!("pixels: expected {PIXELS} values, got {}", parsed.pixels.len())));
    }
    let mut pixels = [0f32; PIXELS];
    for (slot, &value) in pixels.iter_mut().zip(&parsed.pixels) {
        if value > 16 {
            return Err(invalid_input(format!("pixels: {value} is outside 0–16")));
        }
        *slot = f32::from(value);
    }
    Ok(pixels)
}

struct DigitsCodec;

impl Codec for DigitsCodec {
    fn prepare(&self, inputs: &[Value]) -> Result<Prepared, EngineError> {
        let (decoded, rejected) = decode_all(inputs, decode);
        let values = decoded.iter().flatten().copied().collect();
        Ok(Prepared::new(rejected, Features::Rows { values, width: PIXELS }))
    }

    fn outputs(&self, _features: &Features, rows: &[f32]) -> Vec<ItemResult> {
        rows.chunks(CLASSES)
            .map(|row| {
                let label = row
                    .iter()
                    .enumerate()
                    .max_by(|a, b| a.1.total_cmp(b.1))
                    .map(|(label, _)| label)
                    .unwrap_or_default();
                encode(&DigitsOutput { label, probabilities: row })
            })
            .collect()
    }

    fn sample_input(&self) -> Value {
        json!({ "pixels": vec![0u8; PIXELS] })
    }
}

impl Engine for DigitsEngine {
    fn codec(&self) -> Arc<dyn Codec> {
        Arc::new(DigitsCodec)
    }

    fn forward(&mut self, features: &Features) -> Result<Vec<f32>, EngineError> {
        let Features::Rows { values, width: PIXELS } = features else { return Err(EngineError::WrongFeatures) };
        // The fallible `f_` calls: a failed device copy fails the batch (retryable) instead
        // of panicking on the model thread.
        let batch = Tensor::f_from_slice(values)?
            .f_view([(values.len() / PIXELS) as i64, PIXELS as i64])?
            .f_to_device(self.device)?;
        let probabilities = tch::no_grad(|| self.module.forward_ts(&[batch]))?
            .f_to_kind(Kind::Float)?
            .f_to_device(Device::Cpu)?
            .f_contiguous()?;
        Ok(Vec::<f32>::try_from(probabilities.f_view([-1])?)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_rejects_wrong_length_and_range() {
        assert!(decode(&json!({"pixels": vec![0; 63]})).is_err());
        assert!(decode(&json!({"pixels": vec![17; 64]})).is_err());
        assert!(decode(&json!({"pixels": vec![0; 64], "extra": 1})).is_err());
        assert_eq!(decode(&json!({"pixels": vec![16; 64]})).map(|p| p[0]).ok(), Some(16.0));
    }
}
