//! `/v1/tokens`: API tokens for scripts (managed with a session token).

use chrono::{DateTime, Utc};
use poem::web::Data;
use poem_openapi::param::Path;
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Object, OpenApi};
use spool_shared::entities::api_tokens;
use uuid::Uuid;

use super::ApiTags;
use crate::auth::BearerAuth;
use crate::body::JsonBody;
use crate::error::ApiError;
use crate::identity::tokens::{self, TokenLifetime};
use crate::state::AppState;

#[derive(Object)]
pub struct CreateTokenRequest {
    /// A name to recognise the token by, e.g. the script using it.
    pub name: String,
    /// `1h` … `365d`, or `never` where the server allows it.
    pub expires_in: String,
    /// Any of `jobs:read`, `jobs:write`, `webhooks`, `admin` (operators only).
    pub scopes: Vec<String>,
}

/// An API token's metadata (the token itself is shown only at creation).
#[derive(Object)]
pub struct ApiToken {
    pub id: Uuid,
    pub name: String,
    pub scopes: Vec<String>,
    pub created_at: DateTime<Utc>,
    /// Null: never expires.
    #[oai(nullable)]
    pub expires_at: Option<DateTime<Utc>>,
    #[oai(nullable)]
    pub last_used_at: Option<DateTime<Utc>>,
    #[oai(nullable)]
    pub revoked_at: Option<DateTime<Utc>>,
}

impl From<api_tokens::Model> for ApiToken {
    fn from(row: api_tokens::Model) -> Self {
        Self {
            id: row.id,
            name: row.name,
            scopes: row.scopes,
            created_at: row.created_at,
            expires_at: row.expires_at,
            last_used_at: row.last_used_at,
            revoked_at: row.revoked_at,
        }
    }
}

#[derive(Object)]
pub struct CreatedToken {
    #[oai(flatten)]
    pub metadata: ApiToken,
    /// The bearer token. Shown once: store it now.
    pub token: String,
}

#[derive(Object)]
pub struct TokenList {
    pub data: Vec<ApiToken>,
}

#[derive(ApiResponse)]
pub enum CreateTokenResponse {
    #[oai(status = 201)]
    Created(Json<CreatedToken>),
}

#[derive(ApiResponse)]
pub enum ListTokensResponse {
    #[oai(status = 200)]
    Ok(Json<TokenList>),
}

#[derive(ApiResponse)]
pub enum RevokeTokenResponse {
    /// Revoked: every API instance refuses it from now on.
    #[oai(status = 204)]
    Revoked,
}

pub struct TokensApi;

#[OpenApi(prefix_path = "/v1/tokens", tag = "ApiTags::Account")]
impl TokensApi {
    /// Create an API token (session token required; verified accounts only)
    #[oai(path = "/", method = "post", operation_id = "create_token")]
    async fn create(
        &self,
        state: Data<&AppState>,
        auth: BearerAuth,
        body: JsonBody<CreateTokenRequest>,
    ) -> Result<CreateTokenResponse, ApiError> {
        auth.0.require_session()?;
        let lifetime = TokenLifetime::parse(&body.0.expires_in, state.settings.auth.allow_never_expiring_tokens)?;
        let scopes = tokens::parse_scopes(&body.0.scopes)?;
        let issued = tokens::create(&state, &auth.0, body.0.name, lifetime, scopes).await?;
        Ok(CreateTokenResponse::Created(Json(CreatedToken { metadata: issued.row.into(), token: issued.token })))
    }

    /// List the caller's API tokens
    #[oai(path = "/", method = "get", operation_id = "list_tokens")]
    async fn list(&self, state: Data<&AppState>, auth: BearerAuth) -> Result<ListTokensResponse, ApiError> {
        auth.0.require_session()?;
        let rows = tokens::list(&state.db, auth.0.user_id).await?;
        Ok(ListTokensResponse::Ok(Json(TokenList { data: rows.into_iter().map(Into::into).collect() })))
    }

    /// Revoke an API token
    #[oai(path = "/:id", method = "delete", operation_id = "revoke_token")]
    async fn revoke(
        &self,
        state: Data<&AppState>,
        auth: BearerAuth,
        id: Path<String>,
    ) -> Result<RevokeTokenResponse, ApiError> {
        auth.0.require_session()?;
        let id = super::parse_id(&id.0, ApiError::TokenNotFound)?;
        tokens::revoke(&state, auth.0.user_id, id).await?;
        Ok(RevokeTokenResponse::Revoked)
    }
}
