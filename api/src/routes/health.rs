//! Liveness and readiness.

use std::time::Duration;

use poem::web::Data;
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Object, OpenApi};
use sea_orm::ConnectionTrait;

use super::ApiTags;
use crate::state::AppState;

const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, Object)]
pub struct Health {
    /// `ok` or `unavailable`.
    pub status: String,
}

/// Each dependency's reachability.
#[derive(Debug, Object)]
pub struct Readiness {
    pub status: String,
    pub postgres: bool,
    pub rabbitmq: bool,
    pub redis: bool,
}

#[derive(ApiResponse)]
pub enum HealthResponse {
    /// The process is alive.
    #[oai(status = 200)]
    Ok(Json<Health>),
}

#[derive(ApiResponse)]
pub enum ReadyResponse {
    /// Every dependency answers.
    #[oai(status = 200)]
    Ready(Json<Readiness>),
    /// Some dependency is down; see which.
    #[oai(status = 503)]
    NotReady(Json<Readiness>),
}

pub struct HealthApi;

#[OpenApi(tag = "ApiTags::Health")]
impl HealthApi {
    /// Liveness probe
    #[oai(path = "/healthz", method = "get", operation_id = "healthz")]
    async fn healthz(&self) -> HealthResponse {
        HealthResponse::Ok(Json(Health { status: "ok".into() }))
    }

    /// Readiness probe: PostgreSQL, RabbitMQ and Redis reachable
    #[oai(path = "/readyz", method = "get", operation_id = "readyz")]
    async fn readyz(&self, state: Data<&AppState>) -> ReadyResponse {
        let postgres = async { state.db.execute_unprepared("SELECT 1").await.is_ok() };
        let rabbitmq = state.publisher.is_connected();
        let redis = state.redis.ping();
        let (postgres, rabbitmq, redis) =
            tokio::join!(with_timeout(postgres), with_timeout(rabbitmq), with_timeout(redis));
        let ready = postgres && rabbitmq && redis;
        let body = Readiness { status: if ready { "ok" } else { "unavailable" }.into(), postgres, rabbitmq, redis };
        if ready { ReadyResponse::Ready(Json(body)) } else { ReadyResponse::NotReady(Json(body)) }
    }
}

async fn with_timeout(check: impl Future<Output = bool>) -> bool {
    tokio::time::timeout(CHECK_TIMEOUT, check).await.unwrap_or(false)
}
