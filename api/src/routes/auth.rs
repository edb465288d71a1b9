//! `/v1/auth/*`: registration, email verification, login, password reset.
//! Rate-limited per client IP; no bearer token needed.

use chrono::{DateTime, Utc};
use poem::web::{Data, RemoteAddr};
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Object, OpenApi};
use secrecy::SecretString;
use uuid::Uuid;

use super::ApiTags;
use crate::body::JsonBody;
use crate::error::ApiError;
use crate::identity::accounts::{self, Email};
use crate::identity::passwords::NewPassword;
use crate::state::AppState;

#[derive(Object)]
pub struct RegisterRequest {
    pub email: String,
    /// At least 12 characters, not a common password.
    #[oai(write_only)]
    pub password: String,
}

/// An account as its owner sees it.
#[derive(Object)]
pub struct Account {
    pub id: Uuid,
    pub email: String,
    /// `user` or `operator`.
    pub role: String,
    pub email_verified: bool,
    pub created_at: DateTime<Utc>,
}

impl From<spool_shared::entities::users::Model> for Account {
    fn from(user: spool_shared::entities::users::Model) -> Self {
        Self {
            id: user.id,
            email: user.email,
            role: user.role,
            email_verified: user.email_verified_at.is_some(),
            created_at: user.created_at,
        }
    }
}

#[derive(Object)]
pub struct TokenBody {
    /// The single-use token from the mail.
    pub token: String,
}

#[derive(Object)]
pub struct EmailBody {
    pub email: String,
}

#[derive(Object)]
pub struct LoginRequest {
    pub email: String,
    #[oai(write_only)]
    pub password: String,
}

#[derive(Object)]
pub struct SessionToken {
    /// A PASETO v4.public session token for account endpoints (`/v1/me`, `/v1/tokens`).
    pub token: String,
    /// Always `session`.
    pub token_type: String,
    pub expires_at: DateTime<Utc>,
}

#[derive(Object)]
pub struct ResetRequest {
    pub token: String,
    #[oai(write_only)]
    pub new_password: String,
}

#[derive(ApiResponse)]
pub enum AcceptedResponse {
    /// Accepted. (Said whether or not the address has an account.)
    #[oai(status = 202)]
    Accepted,
}

#[derive(ApiResponse)]
pub enum DoneResponse {
    #[oai(status = 204)]
    Done,
}

#[derive(ApiResponse)]
pub enum LoginResponse {
    #[oai(status = 200)]
    Ok(Json<SessionToken>),
}

pub struct AuthApi;

#[OpenApi(prefix_path = "/v1/auth", tag = "ApiTags::Account")]
impl AuthApi {
    /// Create an account
    ///
    /// Sends a verification mail. The answer is the same `202` when the address already
    /// has an account: its owner is told by mail instead, and the account is unchanged.
    /// Unverified accounts can sign in but cannot create API tokens (and so cannot submit
    /// jobs).
    #[oai(path = "/register", method = "post", operation_id = "register")]
    async fn register(
        &self,
        state: Data<&AppState>,
        body: JsonBody<RegisterRequest>,
    ) -> Result<AcceptedResponse, ApiError> {
        let email = Email::parse(&body.0.email)?;
        let password = NewPassword::parse(body.0.password)?;
        accounts::register(&state, email, password).await?;
        Ok(AcceptedResponse::Accepted)
    }

    /// Verify an email address with the token from the mail
    #[oai(path = "/verify-email", method = "post", operation_id = "verify_email")]
    async fn verify_email(&self, state: Data<&AppState>, body: JsonBody<TokenBody>) -> Result<DoneResponse, ApiError> {
        accounts::verify_email(&state, &body.0.token).await?;
        Ok(DoneResponse::Done)
    }

    /// Send the verification mail again
    #[oai(path = "/verify-email/resend", method = "post", operation_id = "resend_verification")]
    async fn resend(&self, state: Data<&AppState>, body: JsonBody<EmailBody>) -> Result<AcceptedResponse, ApiError> {
        let email = Email::parse(&body.0.email)?;
        accounts::resend_verification(&state, &email).await?;
        Ok(AcceptedResponse::Accepted)
    }

    /// Sign in: returns a session token (it lives `auth.session_ttl_secs`, 15 minutes by default)
    ///
    /// Throttled: repeated failures lock the account (and the client IP) out for a while
    /// (`429 login_locked` with `Retry-After`).
    #[oai(path = "/login", method = "post", operation_id = "login")]
    async fn login(
        &self,
        state: Data<&AppState>,
        remote: &RemoteAddr,
        body: JsonBody<LoginRequest>,
    ) -> Result<LoginResponse, ApiError> {
        let email = Email::parse(&body.0.email)?;
        let client = crate::identity::middleware::client_of(remote);
        let session = accounts::login(&state, &email, SecretString::from(body.0.password), &client).await?;
        Ok(LoginResponse::Ok(Json(SessionToken {
            token: session.token,
            token_type: "session".into(),
            expires_at: session.expires_at,
        })))
    }

    /// Ask for a password reset mail (202 whether or not the account exists)
    #[oai(path = "/password/forgot", method = "post", operation_id = "forgot_password")]
    async fn forgot(&self, state: Data<&AppState>, body: JsonBody<EmailBody>) -> Result<AcceptedResponse, ApiError> {
        // A malformed address is refused, as everywhere: saying so reveals no account,
        // and a typo would otherwise wait for a mail that never comes.
        let email = Email::parse(&body.0.email)?;
        accounts::forgot_password(&state, &email).await?;
        Ok(AcceptedResponse::Accepted)
    }

    /// Set a new password with the token from the mail; signs out every session
    #[oai(path = "/password/reset", method = "post", operation_id = "reset_password")]
    async fn reset(&self, state: Data<&AppState>, body: JsonBody<ResetRequest>) -> Result<DoneResponse, ApiError> {
        let password = NewPassword::parse(body.0.new_password)?;
        accounts::reset_password(&state, &body.0.token, password).await?;
        Ok(DoneResponse::Done)
    }
}
