//! The models the API accepts jobs for, with their compiled input validators.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::Value;
use spool_shared::manifest::{Manifest, ModelSpec};

use crate::error::{ApiError, FieldError};

/// Most field errors reported for one request (a job or a whole batch); the rest add
/// nothing a client can use.
pub const MAX_FIELD_ERRORS: usize = 10;

#[derive(Clone)]
pub struct ModelCatalog {
    inner: Arc<HashMap<String, CatalogEntry>>,
    order: Arc<Vec<String>>,
}

struct CatalogEntry {
    spec: ModelSpec,
    validator: jsonschema::Validator,
}

/// A job request that passed validation: the model exists and the input fits its schema.
#[derive(Debug, Clone)]
pub struct ValidJobRequest {
    pub model: String,
    pub input: Value,
}

impl ModelCatalog {
    pub fn new(manifest: &Manifest) -> anyhow::Result<Self> {
        let mut inner = HashMap::new();
        for spec in &manifest.models {
            let validator = jsonschema::validator_for(&spec.input_schema)
                .map_err(|e| anyhow::anyhow!("input schema of {} is invalid: {e}", spec.name))?;
            inner.insert(spec.name.clone(), CatalogEntry { spec: spec.clone(), validator });
        }
        Ok(Self { inner: Arc::new(inner), order: Arc::new(manifest.names()) })
    }

    pub fn specs(&self) -> impl Iterator<Item = &ModelSpec> {
        self.order.iter().filter_map(|name| self.inner.get(name).map(|e| &e.spec))
    }

    pub fn names(&self) -> Vec<String> {
        self.order.to_vec()
    }

    /// Checks the model exists and the input matches its schema; errors name each field.
    pub fn validate(&self, model: &str, input: Value) -> Result<ValidJobRequest, ApiError> {
        let errors = self.input_errors(model, &input)?;
        if errors.is_empty() {
            Ok(ValidJobRequest { model: model.to_owned(), input })
        } else {
            Err(ApiError::InvalidInput(errors))
        }
    }

    /// Where the input breaks the model's schema, or holds a NUL character PostgreSQL
    /// cannot store (the first few places, under `/input`); borrows the input, so a batch
    /// is checked without copying its items.
    pub fn input_errors(&self, model: &str, input: &Value) -> Result<Vec<FieldError>, ApiError> {
        let entry = self.inner.get(model).ok_or_else(|| ApiError::ModelNotFound(model.to_owned()))?;
        let mut errors: Vec<FieldError> = entry
            .validator
            .iter_errors(input)
            .take(MAX_FIELD_ERRORS)
            .map(|error| FieldError { pointer: format!("/input{}", error.instance_path()), detail: error.to_string() })
            .collect();
        let mut nul_at = Vec::new();
        find_nul(input, "/input".into(), &mut nul_at);
        errors.extend(nul_at.into_iter().map(|pointer| FieldError { pointer, detail: NUL_DETAIL.into() }));
        errors.truncate(MAX_FIELD_ERRORS);
        Ok(errors)
    }
}

pub const NUL_DETAIL: &str = "contains a NUL (\\u0000) character, which cannot be stored";

/// Collects the JSON pointers of strings (keys included) that contain NUL.
fn find_nul(value: &Value, pointer: String, found: &mut Vec<String>) {
    match value {
        Value::String(text) if text.contains('\0') => found.push(pointer),
        Value::Array(values) => {
            for (i, value) in values.iter().enumerate() {
                find_nul(value, format!("{pointer}/{i}"), found);
            }
        }
        Value::Object(fields) => {
            for (key, value) in fields {
                let pointer = format!("{pointer}/{}", key.replace('~', "~0").replace('/', "~1"));
                if key.contains('\0') {
                    found.push(pointer.clone());
                }
                find_nul(value, pointer, found);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn nul_characters_are_found_in_values_and_keys() {
        let mut found = Vec::new();
        let input = json!({"text": "a\u{0}b", "ok": ["fine", "x\u{0}"], "a/b\u{0}": 1, "n": 3});
        find_nul(&input, "/input".into(), &mut found);
        found.sort();
        assert_eq!(found, ["/input/a~1b\u{0}", "/input/ok/1", "/input/text"]);
    }
}
