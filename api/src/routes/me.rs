//! `/v1/me`: the caller's account and usage.

use chrono::{DateTime, Utc};
use poem::web::Data;
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Object, OpenApi};

use super::ApiTags;
use super::auth::Account;
use crate::auth::BearerAuth;
use crate::error::ApiError;
use crate::identity::accounts;
use crate::state::AppState;
use spool_shared::entities::usage;

/// Usage of one model.
#[derive(Object)]
pub struct ModelUsage {
    pub model: String,
    pub submitted: i64,
    pub succeeded: i64,
    pub failed: i64,
    /// Forward time of the caller's finished jobs, in ms: each job counts its share of
    /// the batch it ran in (the batch's time over its size).
    pub inference_ms_total: f64,
    /// Mean forward time per finished job (its share of its batch), in ms.
    #[oai(nullable)]
    pub inference_ms_avg: Option<f64>,
    pub last_used_at: DateTime<Utc>,
}

#[derive(Object)]
pub struct Usage {
    pub submitted: i64,
    pub succeeded: i64,
    pub failed: i64,
    pub inference_ms_total: f64,
    #[oai(nullable)]
    pub inference_ms_avg: Option<f64>,
    #[oai(nullable)]
    pub last_used_at: Option<DateTime<Utc>>,
    pub models: Vec<ModelUsage>,
}

#[derive(ApiResponse)]
pub enum MeResponse {
    #[oai(status = 200)]
    Ok(Json<Account>),
}

#[derive(ApiResponse)]
pub enum UsageResponse {
    #[oai(status = 200)]
    Ok(Json<Usage>),
}

fn average(total: f64, finished: i64) -> Option<f64> {
    (finished > 0).then(|| total / finished as f64)
}

impl From<Vec<usage::Totals>> for Usage {
    /// Per model as stored, and the account's totals over them.
    fn from(rows: Vec<usage::Totals>) -> Self {
        let models: Vec<ModelUsage> = rows
            .into_iter()
            .map(|row| ModelUsage {
                inference_ms_avg: average(row.inference_ms_total, row.succeeded + row.failed),
                model: row.model,
                submitted: row.submitted,
                succeeded: row.succeeded,
                failed: row.failed,
                inference_ms_total: row.inference_ms_total,
                last_used_at: row.last_used_at,
            })
            .collect();
        let sum = |f: fn(&ModelUsage) -> i64| models.iter().map(f).sum::<i64>();
        // A fold from +0.0: `sum()` of no floats is -0.0, which JSON shows as `-0.0`.
        let inference_ms_total = models.iter().fold(0.0, |total, m| total + m.inference_ms_total);
        let (succeeded, failed) = (sum(|m| m.succeeded), sum(|m| m.failed));
        Self {
            submitted: sum(|m| m.submitted),
            succeeded,
            failed,
            inference_ms_total,
            inference_ms_avg: average(inference_ms_total, succeeded + failed),
            last_used_at: models.iter().map(|m| m.last_used_at).max(),
            models,
        }
    }
}

pub struct MeApi;

#[OpenApi(prefix_path = "/v1/me", tag = "ApiTags::Account")]
impl MeApi {
    /// The caller's account (session or API token)
    #[oai(path = "/", method = "get", operation_id = "me")]
    async fn me(&self, state: Data<&AppState>, auth: BearerAuth) -> Result<MeResponse, ApiError> {
        Ok(MeResponse::Ok(Json(accounts::find(&state.db, auth.0.user_id).await?.into())))
    }

    /// The caller's usage, per model and in total
    #[oai(path = "/usage", method = "get", operation_id = "usage")]
    async fn usage(&self, state: Data<&AppState>, auth: BearerAuth) -> Result<UsageResponse, ApiError> {
        Ok(UsageResponse::Ok(Json(accounts::usage(&state.db, auth.0.user_id).await?.into())))
    }
}
