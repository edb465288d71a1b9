//! `GET /v1/models`: what can be run, and the JSON contract of each model.

use poem::web::Data;
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Object, OpenApi};

use super::ApiTags;
use crate::auth::BearerAuth;
use crate::error::ApiError;
use crate::state::AppState;

/// A model jobs can run on.
#[derive(Debug, Object)]
pub struct Model {
    pub name: String,
    /// e.g. `embedding`, `image-classification`.
    pub task: String,
    pub description: String,
    /// JSON Schema of `input` in `POST /v1/jobs`.
    pub input_schema: serde_json::Value,
    /// JSON Schema of a succeeded job's `output`.
    pub output_schema: serde_json::Value,
    /// Most jobs one forward pass runs together.
    pub max_batch_size: u64,
}

#[derive(Debug, Object)]
pub struct ModelList {
    pub data: Vec<Model>,
}

#[derive(ApiResponse)]
pub enum ListModelsResponse {
    #[oai(status = 200)]
    Ok(Json<ModelList>),
}

pub struct ModelsApi;

#[OpenApi(prefix_path = "/v1", tag = "ApiTags::Models")]
impl ModelsApi {
    /// List models
    #[oai(path = "/models", method = "get", operation_id = "list_models")]
    async fn list(&self, state: Data<&AppState>, _auth: BearerAuth) -> Result<ListModelsResponse, ApiError> {
        // Any valid token of any kind may look at the catalog.
        let data = state
            .catalog
            .specs()
            .map(|spec| Model {
                name: spec.name.clone(),
                task: spec.task.clone(),
                description: spec.description.clone(),
                input_schema: spec.input_schema.clone(),
                output_schema: spec.output_schema.clone(),
                max_batch_size: spec.max_batch_size as u64,
            })
            .collect();
        Ok(ListModelsResponse::Ok(Json(ModelList { data })))
    }
}
