//! The models the API accepts jobs for, with their compiled input validators.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::Value;
use spool_shared::manifest::{Manifest, ModelSpec};

use crate::error::{ApiError, FieldError};

/// Most field errors reported for one request; the rest add nothing a client can use.
const MAX_FIELD_ERRORS: usize = 10;

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

    /// Where the input breaks the model's schema (the first few places, under `/input`);
    /// borrows the input, so a batch is checked without copying its items.
    pub fn input_errors(&self, model: &str, input: &Value) -> Result<Vec<FieldError>, ApiError> {
        let entry = self.inner.get(model).ok_or_else(|| ApiError::ModelNotFound(model.to_owned()))?;
        Ok(entry
            .validator
            .iter_errors(input)
            .take(MAX_FIELD_ERRORS)
            .map(|error| FieldError { pointer: format!("/input{}", error.instance_path()), detail: error.to_string() })
            .collect())
    }
}
