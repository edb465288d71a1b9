//! `GET /v1/models`: what can be run, and the JSON contract of each model.

use poem::web::Data;
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Object, OpenApi};

use super::ApiTags;
use crate::auth::BearerAuth;
use crate::error::ApiError;
use crate::jobs;
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
    /// Jobs waiting to run (queued, including those waiting for a retry).
    pub queue_depth: u64,
    /// Live workers serving it; null when Redis cannot be asked.
    #[oai(nullable)]
    pub workers_online: Option<u32>,
    /// `accepting`, `no_worker` (jobs still queue), `breakers_open` or `failing` (both:
    /// submissions get `503 model_unavailable`); null when Redis cannot be asked.
    #[oai(nullable)]
    pub health: Option<String>,
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
        let depths = jobs::queued_per_model(&state.db).await?;
        let workers = state.workers.live().await;
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
                queue_depth: depths.get(&spec.name).copied().unwrap_or(0),
                workers_online: workers
                    .as_ref()
                    .map(|w| w.iter().filter(|beat| beat.models.contains_key(&spec.name)).count() as u32),
                health: workers.as_ref().map(|w| state.workers.health(&spec.name, w).as_str().to_owned()),
            })
            .collect();
        Ok(ListModelsResponse::Ok(Json(ModelList { data })))
    }
}
