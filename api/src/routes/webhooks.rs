//! `/v1/webhooks`: account subscriptions to job events, their delivery logs and secrets.
//! Receiving and verifying them: README "Receiving webhooks".

use chrono::{DateTime, Utc};
use poem::web::Data;
use poem_openapi::param::{Path, Query};
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Object, OpenApi};
use spool_shared::ssrf::TargetPolicy;
use spool_shared::webhooks::SUBSCRIPTION_EVENTS;
use uuid::Uuid;

use super::{ApiTags, parse_id};
use crate::auth::{BearerAuth, Scope};
use crate::body::JsonBody;
use crate::error::ApiError;
use crate::state::AppState;
use crate::webhooks;

#[derive(Object)]
pub struct CreateWebhookRequest {
    /// Where to POST events: `https`, on a public address.
    #[oai(validator(max_length = 2048))]
    pub url: String,
    /// Any of `job.started`, `job.succeeded`, `job.failed`, `job.canceled`,
    /// `job.dead_lettered`, `batch.completed`.
    #[oai(validator(max_items = 6))]
    pub events: Vec<String>,
    #[oai(default, validator(max_length = 500))]
    pub description: String,
}

/// Fields left out stay as they are.
#[derive(Object)]
pub struct UpdateWebhookRequest {
    /// Where to POST events: `https`, on a public address.
    #[oai(nullable, validator(max_length = 2048))]
    pub url: Option<String>,
    #[oai(nullable, validator(max_items = 6))]
    pub events: Option<Vec<String>>,
    #[oai(nullable, validator(max_length = 500))]
    pub description: Option<String>,
    /// `true` re-enables a subscription (after a `410 Gone`, say): events from now on are
    /// delivered; those it missed are not. `false` pauses it.
    #[oai(nullable)]
    pub enabled: Option<bool>,
}

#[derive(Object)]
pub struct Webhook {
    pub id: Uuid,
    pub url: String,
    pub events: Vec<String>,
    pub description: String,
    /// Set when the endpoint answered `410 Gone` (or the owner paused it): nothing more
    /// is sent until `PATCH` with `"enabled": true`.
    #[oai(nullable)]
    pub disabled_at: Option<DateTime<Utc>>,
    #[oai(nullable)]
    pub disabled_reason: Option<String>,
    pub created_at: DateTime<Utc>,
}

impl From<webhooks::Subscription> for Webhook {
    fn from(s: webhooks::Subscription) -> Self {
        Self {
            id: s.id,
            url: s.url,
            events: s.events,
            description: s.description,
            disabled_at: s.disabled_at,
            disabled_reason: s.disabled_reason,
            created_at: s.created_at,
        }
    }
}

#[derive(Object)]
pub struct CreatedWebhook {
    #[oai(flatten)]
    pub webhook: Webhook,
    /// The signing secret (`whsec_…`), shown only now: verify each delivery's
    /// `webhook-signature` with it.
    pub secret: String,
}

#[derive(Object)]
pub struct WebhookList {
    pub data: Vec<Webhook>,
}

#[derive(Object)]
pub struct Secret {
    /// `whsec_…`. After a rotation the previous secret also signs for 24 hours.
    pub secret: String,
}

#[derive(Object)]
pub struct QueuedDelivery {
    pub delivery_id: Uuid,
}

#[derive(Object)]
pub struct Delivery {
    /// Also the `webhook-id` header, as `msg_<id without dashes>`.
    pub id: Uuid,
    #[oai(nullable)]
    pub subscription_id: Option<Uuid>,
    #[oai(nullable)]
    pub job_id: Option<Uuid>,
    pub event_type: String,
    /// `pending` (waiting for its next attempt), `succeeded` or `failed` (given up).
    pub status: String,
    pub attempts: i32,
    #[oai(nullable)]
    pub last_status_code: Option<i32>,
    #[oai(nullable)]
    pub last_error: Option<String>,
    #[oai(nullable)]
    pub last_latency_ms: Option<i32>,
    #[oai(nullable)]
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// Every attempt: `{attempt, at, status_code, latency_ms, error}`.
    pub attempt_log: serde_json::Value,
    pub created_at: DateTime<Utc>,
    #[oai(nullable)]
    pub delivered_at: Option<DateTime<Utc>>,
}

impl From<webhooks::Delivery> for Delivery {
    fn from(d: webhooks::Delivery) -> Self {
        Self {
            id: d.id,
            subscription_id: d.subscription_id,
            job_id: d.job_id,
            event_type: d.event_type,
            status: d.status,
            attempts: d.attempts,
            last_status_code: d.last_status_code,
            last_error: d.last_error,
            last_latency_ms: d.last_latency_ms,
            next_attempt_at: d.next_attempt_at,
            attempt_log: d.attempt_log,
            created_at: d.created_at,
            delivered_at: d.delivered_at,
        }
    }
}

#[derive(Object)]
pub struct DeliveryList {
    pub data: Vec<Delivery>,
}

#[derive(ApiResponse)]
pub enum CreateWebhookResponse {
    #[oai(status = 201)]
    Created(Json<CreatedWebhook>),
}

#[derive(ApiResponse)]
pub enum WebhookResponse {
    #[oai(status = 200)]
    Ok(Json<Webhook>),
}

#[derive(ApiResponse)]
pub enum WebhookListResponse {
    #[oai(status = 200)]
    Ok(Json<WebhookList>),
}

#[derive(ApiResponse)]
pub enum DeletedResponse {
    #[oai(status = 204)]
    Deleted,
}

#[derive(ApiResponse)]
pub enum SecretResponse {
    #[oai(status = 200)]
    Ok(Json<Secret>),
}

#[derive(ApiResponse)]
pub enum QueuedResponse {
    #[oai(status = 202)]
    Queued(Json<QueuedDelivery>),
}

#[derive(ApiResponse)]
pub enum DeliveryListResponse {
    #[oai(status = 200)]
    Ok(Json<DeliveryList>),
}

pub struct WebhooksApi;

#[OpenApi(prefix_path = "/v1/webhooks", tag = "ApiTags::Webhooks")]
impl WebhooksApi {
    /// Subscribe to job events; returns the signing secret once
    #[oai(path = "/", method = "post", operation_id = "create_webhook")]
    async fn create(
        &self,
        state: Data<&AppState>,
        auth: BearerAuth,
        body: JsonBody<CreateWebhookRequest>,
    ) -> Result<CreateWebhookResponse, ApiError> {
        auth.0.require_api(Scope::Webhooks)?;
        let policy = TargetPolicy::new(&state.settings.webhooks.allowed_hosts);
        let events = webhooks::check_events(&body.0.events, SUBSCRIPTION_EVENTS, "/events")?;
        let url = webhooks::check_url(&policy, &body.0.url, "/url").await?;
        let (webhook, secret) =
            webhooks::create(&state.db, &state.sealer, auth.0.user_id, url, events, body.0.description).await?;
        Ok(CreateWebhookResponse::Created(Json(CreatedWebhook { webhook: webhook.into(), secret })))
    }

    /// List the caller's webhook subscriptions
    #[oai(path = "/", method = "get", operation_id = "list_webhooks")]
    async fn list(&self, state: Data<&AppState>, auth: BearerAuth) -> Result<WebhookListResponse, ApiError> {
        auth.0.require_api(Scope::Webhooks)?;
        let rows = webhooks::list(&state.db, auth.0.user_id).await?;
        Ok(WebhookListResponse::Ok(Json(WebhookList { data: rows.into_iter().map(Into::into).collect() })))
    }

    /// One webhook subscription
    #[oai(path = "/:id", method = "get", operation_id = "get_webhook")]
    async fn get(
        &self,
        state: Data<&AppState>,
        auth: BearerAuth,
        id: Path<String>,
    ) -> Result<WebhookResponse, ApiError> {
        auth.0.require_api(Scope::Webhooks)?;
        let webhook = webhooks::get(&state.db, auth.0.user_id, parse_id(&id.0, ApiError::WebhookNotFound)?).await?;
        Ok(WebhookResponse::Ok(Json(webhook.into())))
    }

    /// Change a subscription's URL, events or description, or re-enable it; its id,
    /// secret and delivery log stay
    #[oai(path = "/:id", method = "patch", operation_id = "update_webhook")]
    async fn update(
        &self,
        state: Data<&AppState>,
        auth: BearerAuth,
        id: Path<String>,
        body: JsonBody<UpdateWebhookRequest>,
    ) -> Result<WebhookResponse, ApiError> {
        auth.0.require_api(Scope::Webhooks)?;
        let id = parse_id(&id.0, ApiError::WebhookNotFound)?;
        let body = body.0;
        let events = match body.events {
            Some(events) => Some(webhooks::check_events(&events, SUBSCRIPTION_EVENTS, "/events")?),
            None => None,
        };
        let url = match body.url {
            Some(url) => {
                let policy = TargetPolicy::new(&state.settings.webhooks.allowed_hosts);
                Some(webhooks::check_url(&policy, &url, "/url").await?)
            }
            None => None,
        };
        let changes = webhooks::Changes { url, events, description: body.description, enabled: body.enabled };
        let webhook = webhooks::update(&state.db, auth.0.user_id, id, changes).await?;
        Ok(WebhookResponse::Ok(Json(webhook.into())))
    }

    /// Delete a webhook subscription and its delivery log
    #[oai(path = "/:id", method = "delete", operation_id = "delete_webhook")]
    async fn delete(
        &self,
        state: Data<&AppState>,
        auth: BearerAuth,
        id: Path<String>,
    ) -> Result<DeletedResponse, ApiError> {
        auth.0.require_api(Scope::Webhooks)?;
        webhooks::delete(&state.db, auth.0.user_id, parse_id(&id.0, ApiError::WebhookNotFound)?).await?;
        Ok(DeletedResponse::Deleted)
    }

    /// Send a `webhook.test` event to the subscription
    #[oai(path = "/:id/test", method = "post", operation_id = "test_webhook")]
    async fn test(
        &self,
        state: Data<&AppState>,
        auth: BearerAuth,
        id: Path<String>,
    ) -> Result<QueuedResponse, ApiError> {
        auth.0.require_api(Scope::Webhooks)?;
        let delivery_id =
            webhooks::send_test(&state.db, auth.0.user_id, parse_id(&id.0, ApiError::WebhookNotFound)?).await?;
        Ok(QueuedResponse::Queued(Json(QueuedDelivery { delivery_id })))
    }

    /// Rotate the signing secret (the old one keeps signing for 24 hours)
    #[oai(path = "/:id/rotate-secret", method = "post", operation_id = "rotate_webhook_secret")]
    async fn rotate(
        &self,
        state: Data<&AppState>,
        auth: BearerAuth,
        id: Path<String>,
    ) -> Result<SecretResponse, ApiError> {
        auth.0.require_api(Scope::Webhooks)?;
        let secret = webhooks::rotate_secret(
            &state.db,
            &state.sealer,
            auth.0.user_id,
            parse_id(&id.0, ApiError::WebhookNotFound)?,
        )
        .await?;
        Ok(SecretResponse::Ok(Json(Secret { secret })))
    }

    /// The subscription's deliveries, newest first: status, attempts, response codes, latency
    #[oai(path = "/:id/deliveries", method = "get", operation_id = "list_webhook_deliveries")]
    async fn deliveries(
        &self,
        state: Data<&AppState>,
        auth: BearerAuth,
        id: Path<String>,
        /// 1–500 (default 100).
        #[oai(validator(minimum(value = "1"), maximum(value = "500")))]
        limit: Query<Option<u64>>,
    ) -> Result<DeliveryListResponse, ApiError> {
        auth.0.require_api(Scope::Webhooks)?;
        let limit = limit.0.unwrap_or(100);
        let rows =
            webhooks::deliveries(&state.db, auth.0.user_id, parse_id(&id.0, ApiError::WebhookNotFound)?, limit).await?;
        Ok(DeliveryListResponse::Ok(Json(DeliveryList { data: rows.into_iter().map(Into::into).collect() })))
    }

    /// Send a delivery again now, with the same `webhook-id`
    ///
    /// A subscription's delivery takes the `webhooks` scope; one to a job's own webhook,
    /// `jobs:write`.
    #[oai(path = "/deliveries/:id/retry", method = "post", operation_id = "retry_webhook_delivery")]
    async fn retry(
        &self,
        state: Data<&AppState>,
        auth: BearerAuth,
        id: Path<String>,
    ) -> Result<QueuedResponse, ApiError> {
        let delivery_id = super::parse_id(&id.0, ApiError::DeliveryNotFound)?;
        webhooks::redeliver(&state.db, &auth.0, delivery_id).await?;
        Ok(QueuedResponse::Queued(Json(QueuedDelivery { delivery_id })))
    }

    /// The account's secret for per-job webhooks (`webhook` on `POST /v1/jobs`)
    #[oai(path = "/job-secret", method = "get", operation_id = "get_job_webhook_secret")]
    async fn job_secret(&self, state: Data<&AppState>, auth: BearerAuth) -> Result<SecretResponse, ApiError> {
        auth.0.require_api(Scope::JobsWrite)?;
        let secret = webhooks::job_secret(&state.db, &state.sealer, auth.0.user_id).await?;
        Ok(SecretResponse::Ok(Json(Secret { secret })))
    }

    /// Rotate the secret for per-job webhooks (the old one keeps signing for 24 hours)
    #[oai(path = "/job-secret/rotate", method = "post", operation_id = "rotate_job_webhook_secret")]
    async fn rotate_job_secret(&self, state: Data<&AppState>, auth: BearerAuth) -> Result<SecretResponse, ApiError> {
        auth.0.require_api(Scope::JobsWrite)?;
        let secret = webhooks::rotate_job_secret(&state.db, &state.sealer, auth.0.user_id).await?;
        Ok(SecretResponse::Ok(Json(Secret { secret })))
    }
}
