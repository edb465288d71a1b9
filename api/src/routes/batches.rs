//! `/v1/batches`: many jobs under one handle, as JSON or NDJSON.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use poem::Body;
use poem::middleware::ReqId;
use poem::web::Data;
use poem_openapi::param::{Header, Path, Query};
use poem_openapi::payload::{Binary, Json};
use poem_openapi::{ApiRequest, ApiResponse, Object, OpenApi};
use uuid::Uuid;

use super::{ApiTags, parse_id};
use crate::auth::{BearerAuth, Scope};
use crate::batches::{self, BatchItem, BatchRequest, Submission};
use crate::body::JsonBody;
use crate::error::ApiError;
use crate::jobs::{IdempotencyKey, WebhookRequest};
use crate::state::AppState;

/// Unknown fields are refused, as on NDJSON lines: a misspelt `custom_id` is an error,
/// not an item without one.
#[derive(Object)]
#[oai(deny_unknown_fields)]
pub struct BatchItemRequest {
    /// The model's input, matching its input schema.
    pub input: serde_json::Value,
    /// Your own id for the item (≤ 255 characters), echoed in the results.
    #[oai(nullable)]
    pub custom_id: Option<String>,
}

#[derive(Object)]
pub struct CreateBatchRequest {
    pub model: String,
    pub items: Vec<BatchItemRequest>,
    /// Per-job webhook for every job of the batch; it also receives `batch.completed`.
    #[oai(nullable, validator(max_length = 2048))]
    pub webhook: Option<String>,
    /// Which job events go to `webhook`: `started`, `completed` (default `["completed"]`).
    #[oai(nullable, validator(max_items = 2))]
    pub webhook_events: Option<Vec<String>>,
}

#[derive(ApiRequest)]
pub enum CreateBatchBody {
    /// `{model, items: [{input, custom_id?}], webhook?, webhook_events?}`
    Json(JsonBody<CreateBatchRequest>),
    /// One `{input, custom_id?}` per line; the model goes in the `model` query parameter.
    #[oai(content_type = "application/x-ndjson")]
    Ndjson(Binary<Vec<u8>>),
}

#[derive(Object)]
pub struct Batch {
    pub id: Uuid,
    pub model: String,
    pub total: i32,
    /// Jobs per status: `queued`, `running`, `succeeded`, `failed`, `canceled`.
    pub counts: BTreeMap<String, i64>,
    /// Finished jobs over all, 0–1.
    pub progress: f64,
    pub created_at: DateTime<Utc>,
    /// When the last job finished.
    #[oai(nullable)]
    pub completed_at: Option<DateTime<Utc>>,
}

impl From<batches::Batch> for Batch {
    fn from(b: batches::Batch) -> Self {
        Self {
            progress: b.progress(),
            id: b.id,
            model: b.model,
            total: b.total,
            counts: b.counts,
            created_at: b.created_at,
            completed_at: b.completed_at,
        }
    }
}

#[derive(Object)]
pub struct BatchPage {
    pub data: Vec<Batch>,
    /// Pass as `cursor` for the next page; null on the last page.
    #[oai(nullable)]
    pub next_cursor: Option<String>,
}

#[derive(Object)]
pub struct CanceledCount {
    /// Jobs canceled (those not yet started).
    pub canceled: u64,
}

#[derive(ApiResponse)]
pub enum CreateBatchResponse {
    /// Accepted: every job is committed and will run.
    #[oai(status = 202)]
    Accepted(Json<Batch>, #[oai(header = "Location")] String),
    /// A replay of an earlier request with the same `Idempotency-Key` and body.
    #[oai(status = 200)]
    Replayed(Json<Batch>, #[oai(header = "Idempotent-Replayed")] String),
}

#[derive(ApiResponse)]
pub enum BatchResponse {
    #[oai(status = 200)]
    Ok(Json<Batch>),
}

#[derive(ApiResponse)]
pub enum BatchListResponse {
    #[oai(status = 200)]
    Ok(Json<BatchPage>),
}

#[derive(ApiResponse)]
pub enum ResultsResponse {
    /// NDJSON, one line per job in submission order: `{custom_id, job_id, status, output | error}`.
    #[oai(status = 200, content_type = "application/x-ndjson")]
    Ok(Binary<Body>),
}

#[derive(ApiResponse)]
pub enum CancelBatchResponse {
    #[oai(status = 200)]
    Ok(Json<CanceledCount>),
}

pub struct BatchesApi;

#[OpenApi(prefix_path = "/v1/batches", tag = "ApiTags::Jobs")]
impl BatchesApi {
    /// Submit a batch of jobs (JSON or NDJSON), all or nothing
    #[oai(path = "/", method = "post", operation_id = "create_batch")]
    #[allow(clippy::too_many_arguments)] // each is one documented header or query parameter
    async fn create(
        &self,
        state: Data<&AppState>,
        auth: BearerAuth,
        /// 1–255 visible ASCII characters; a retry with the same key and body is answered
        /// with the original.
        #[oai(name = "Idempotency-Key")]
        idempotency_key: Header<Option<String>>,
        /// The model, for an NDJSON body.
        model: Query<Option<String>>,
        /// For an NDJSON body: a per-job webhook for every job (a JSON body has it as a field).
        #[oai(validator(max_length = 2048))]
        webhook: Query<Option<String>>,
        /// For an NDJSON body: which job events go to `webhook` (repeat the parameter;
        /// default `completed`).
        #[oai(validator(max_items = 2))]
        webhook_events: Query<Vec<String>>,
        request_id: Data<&ReqId>,
        body: CreateBatchBody,
    ) -> Result<CreateBatchResponse, ApiError> {
        auth.0.require_api(Scope::JobsWrite)?;
        let (model, items, webhook, webhook_events) = match body {
            CreateBatchBody::Json(JsonBody(request)) => {
                if webhook.0.is_some() || !webhook_events.0.is_empty() {
                    return Err(ApiError::InvalidRequest("a JSON batch carries its webhook in the body".into()));
                }
                let items =
                    request.items.into_iter().map(|i| BatchItem { input: i.input, custom_id: i.custom_id, line: None });
                (request.model, items.collect(), request.webhook, request.webhook_events)
            }
            CreateBatchBody::Ndjson(Binary(bytes)) => {
                let model = model.0.ok_or_else(|| ApiError::InvalidRequest("an NDJSON batch needs ?model=".into()))?;
                let events = Some(webhook_events.0).filter(|events| !events.is_empty());
                (model, batches::parse_ndjson(&bytes)?, webhook.0, events)
            }
        };
        let request = BatchRequest {
            model,
            items,
            webhook: webhook.map(|url| WebhookRequest { url, events: webhook_events }),
            key: idempotency_key.0.map(IdempotencyKey::try_from).transpose()?,
            request_id: Some(request_id.0.to_string()),
        };
        match batches::accept(&state, auth.0.user_id, request).await? {
            Submission::Created(batch) => {
                let location = format!("/v1/batches/{}", batch.id);
                Ok(CreateBatchResponse::Accepted(Json(batch.into()), location))
            }
            Submission::Replayed(batch) => Ok(CreateBatchResponse::Replayed(Json(batch.into()), "true".into())),
        }
    }

    /// Your batches, newest first
    #[oai(path = "/", method = "get", operation_id = "list_batches")]
    async fn list(
        &self,
        state: Data<&AppState>,
        auth: BearerAuth,
        /// 1–100 (default 20).
        #[oai(validator(minimum(value = "1"), maximum(value = "100")))]
        limit: Query<Option<u64>>,
        cursor: Query<Option<String>>,
    ) -> Result<BatchListResponse, ApiError> {
        auth.0.require_api(Scope::JobsRead)?;
        let after = super::parse_cursor(cursor.0.as_deref())?;
        let page = batches::list(&state.db, auth.0.user_id, limit.0.unwrap_or(20), after).await?;
        Ok(BatchListResponse::Ok(Json(BatchPage {
            data: page.batches.into_iter().map(Into::into).collect(),
            next_cursor: page.next_cursor.map(|id| id.to_string()),
        })))
    }

    /// A batch's progress: counts per status
    #[oai(path = "/:id", method = "get", operation_id = "get_batch")]
    async fn get(&self, state: Data<&AppState>, auth: BearerAuth, id: Path<String>) -> Result<BatchResponse, ApiError> {
        auth.0.require_api(Scope::JobsRead)?;
        let batch = batches::get(&state.db, auth.0.user_id, parse_id(&id.0, ApiError::BatchNotFound)?).await?;
        Ok(BatchResponse::Ok(Json(batch.into())))
    }

    /// A batch's results as NDJSON, in submission order (streamed)
    #[oai(path = "/:id/results", method = "get", operation_id = "get_batch_results")]
    async fn results(
        &self,
        state: Data<&AppState>,
        auth: BearerAuth,
        id: Path<String>,
    ) -> Result<ResultsResponse, ApiError> {
        auth.0.require_api(Scope::JobsRead)?;
        let batch = batches::get(&state.db, auth.0.user_id, parse_id(&id.0, ApiError::BatchNotFound)?).await?;
        let lines = batches::results(state.db.clone(), batch.id);
        Ok(ResultsResponse::Ok(Binary(Body::from_bytes_stream(lines))))
    }

    /// Cancel the batch's jobs that have not started
    #[oai(path = "/:id/cancel", method = "post", operation_id = "cancel_batch")]
    async fn cancel(
        &self,
        state: Data<&AppState>,
        auth: BearerAuth,
        id: Path<String>,
    ) -> Result<CancelBatchResponse, ApiError> {
        auth.0.require_api(Scope::JobsWrite)?;
        let canceled = batches::cancel(&state.db, auth.0.user_id, parse_id(&id.0, ApiError::BatchNotFound)?).await?;
        Ok(CancelBatchResponse::Ok(Json(CanceledCount { canceled })))
    }
}
