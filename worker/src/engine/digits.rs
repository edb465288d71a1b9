//! `digits-cnn`: 8×8 handwritten digits (scikit-learn's set) → label and probabilities.

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use spool_shared::job::JobError;
use spool_shared::manifest::ModelSpec;
use tch::{Device, Kind, Tensor};

use super::{Engine, EngineError, ItemResult, decode_all, encode, invalid_input, load_module, merge};

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

impl Engine for DigitsEngine {
    fn infer(&mut self, inputs: &[Value]) -> Result<Vec<ItemResult>, EngineError> {
        let (decoded, results) = decode_all(inputs, decode);
        if decoded.is_empty() {
            return Ok(merge(results, std::iter::empty(), std::iter::empty()));
        }
        let flat: Vec<f32> = decoded.iter().flat_map(|(_, pixels)| pixels.iter().copied()).collect();
        // The fallible `f_` calls: a failed device copy fails the batch (retryable) instead
        // of panicking on the model thread.
        let batch =
            Tensor::f_from_slice(&flat)?.f_view([decoded.len() as i64, PIXELS as i64])?.f_to_device(self.device)?;
        let probabilities = tch::no_grad(|| self.module.forward_ts(&[batch]))?
            .f_to_kind(Kind::Float)?
            .f_to_device(Device::Cpu)?
            .f_contiguous()?;
        let values = Vec::<f32>::try_from(probabilities.f_view([-1])?)?;
        let outputs = values.chunks(CLASSES).map(|row| {
            let label =
                row.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(label, _)| label).unwrap_or_default();
            encode(&DigitsOutput { label, probabilities: row })
        });
        Ok(merge(results, decoded.iter().map(|(i, _)| *i), outputs))
    }

    fn sample_input(&self) -> Value {
        json!({ "pixels": vec![0u8; PIXELS] })
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
