//! Every error the API returns, mapped to HTTP in one place.
//!
//! Bodies are RFC 9457 problems (`application/problem+json`) with a stable snake_case
//! `code`. Errors raised by poem itself (unparseable bodies, missing bearer tokens,
//! unknown routes, oversized bodies) go through [`problem_from_poem`] so they look alike.

use poem::Response;
use poem::http::StatusCode;
use poem_openapi::registry::{MetaMediaType, MetaResponse, MetaResponses, Registry};
use poem_openapi::types::{ToJSON, Type};
use poem_openapi::{ApiResponse, Object};

use crate::auth::Scope;

pub const PROBLEM_CONTENT_TYPE: &str = "application/problem+json";

/// `Retry-After` of a 503. Neither an outage nor an open breaker says when it ends; a few
/// seconds lets clients see a recovery soon without hammering the API meanwhile.
const RETRY_UNAVAILABLE_AFTER_SECS: u64 = 5;

/// An RFC 9457 problem document.
#[derive(Debug, Clone, Object)]
pub struct Problem {
    /// A URI identifying the problem type.
    #[oai(rename = "type")]
    pub kind: String,
    /// Short summary of the problem type.
    pub title: String,
    /// HTTP status code.
    pub status: u16,
    /// What went wrong in this occurrence.
    pub detail: String,
    /// Stable machine-readable code; match on this, not on `title` or `detail`.
    pub code: String,
    /// For validation problems: where in the request each error is (JSON pointers).
    #[oai(skip_serializing_if_is_none)]
    pub errors: Option<Vec<FieldError>>,
}

/// One invalid field of a request.
#[derive(Debug, Clone, Object)]
pub struct FieldError {
    /// JSON pointer into the request body, e.g. `/input/pixels/3`.
    pub pointer: String,
    pub detail: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("invalid input: {}", describe(.0))]
    InvalidInput(Vec<FieldError>),
    #[error("{0}")]
    InvalidRequest(String),
    /// A body that is not JSON or does not fit the operation's type. `errors` points at
    /// the field when one could be found; `detail` is the parser's own message.
    #[error("{}", if errors.is_empty() { detail.clone() } else { format!("invalid body: {}", describe(errors)) })]
    InvalidBody { detail: String, errors: Vec<FieldError> },
    /// A query or path parameter out of its range (one that does not parse at all is
    /// refused by poem-openapi with the same code).
    #[error("{0}")]
    InvalidParameter(String),
    #[error("model {0:?} does not exist")]
    ModelNotFound(String),
    #[error("job not found")]
    JobNotFound,
    #[error("the Idempotency-Key was already used with a different request body")]
    IdempotencyConflict,
    #[error("the job is already {0} and can no longer be canceled")]
    NotCancelable(&'static str),
    #[error("{0}")]
    Unauthorized(AuthFailure),
    #[error("the token lacks the {} scope", .0.as_str())]
    MissingScope(Scope),
    /// Operators' endpoints and the `admin` scope, asked for by another account.
    #[error("only operators may do this; this account is not one")]
    NotOperator,
    #[error("verify your email address first")]
    EmailNotVerified,
    #[error("too many requests; retry in {retry_after_secs} s")]
    RateLimited { retry_after_secs: u64 },
    #[error("too many failed logins; retry in {retry_after_secs} s")]
    LoginLocked { retry_after_secs: u64 },
    #[error("email or password is wrong")]
    BadCredentials,
    #[error("the token is invalid, expired or already used")]
    InvalidEmailToken,
    #[error("token not found")]
    TokenNotFound,
    #[error("batch not found")]
    BatchNotFound,
    #[error("webhook subscription not found")]
    WebhookNotFound,
    #[error("webhook delivery not found")]
    DeliveryNotFound,
    /// A paused subscription, or one disabled by its receiver's `410 Gone`.
    #[error("the webhook subscription is disabled; enable it first")]
    WebhookDisabled,
    /// An account-wide cap on things that live long (tokens, subscriptions).
    #[error("an account may have at most {max} {what}; revoke or delete one it no longer needs")]
    LimitReached { what: &'static str, max: i64 },
    #[error("a dependency is unavailable: {}", .0.as_str())]
    Unavailable(Dependency),
    #[error("model {0:?} is failing on every worker (circuit breaker open); retry later")]
    ModelUnavailable(String),
    #[error(transparent)]
    Unexpected(#[from] anyhow::Error),
}

/// What could not be reached when a request gets a `503 service_unavailable`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dependency {
    Database,
    /// Live workers and their breakers are read from Redis.
    Redis,
    /// Token revocation is looked up in Redis, then PostgreSQL: neither answered.
    TokenStore,
}

impl Dependency {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Database => "database",
            Self::Redis => "redis",
            Self::TokenStore => "token store",
        }
    }
}

/// Why a bearer token was refused; each has its own problem code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthFailure {
    #[error("an Authorization: Bearer token is required")]
    MissingToken,
    #[error("the token is malformed, tampered with or signed by an unknown key")]
    InvalidToken,
    #[error("the token has expired")]
    ExpiredToken,
    #[error("the token has been revoked")]
    RevokedToken,
    #[error(
        "this endpoint needs another kind of token (an API token for jobs, a session token for account management)"
    )]
    WrongPurpose,
    #[error("only v4.public PASETO tokens are accepted")]
    UnsupportedToken,
}

impl AuthFailure {
    fn code(self) -> &'static str {
        match self {
            Self::MissingToken => "missing_token",
            Self::InvalidToken => "invalid_token",
            Self::ExpiredToken => "token_expired",
            Self::RevokedToken => "token_revoked",
            Self::WrongPurpose => "wrong_token_purpose",
            Self::UnsupportedToken => "unsupported_token",
        }
    }
}

fn describe(errors: &[FieldError]) -> String {
    errors.iter().map(|e| format!("{} {}", e.pointer, e.detail)).collect::<Vec<_>>().join("; ")
}

impl From<sea_orm::DbErr> for ApiError {
    fn from(error: sea_orm::DbErr) -> Self {
        // PostgreSQL refuses NUL characters in text and jsonb. Job inputs are checked for
        // them up front (a 422 naming the field); this covers every other text a client
        // sends (names, descriptions), so it is the client's error, not a 500.
        if matches!(sqlstate(&error).as_deref(), Some("22P05" | "22021")) {
            return Self::InvalidRequest("text may not contain NUL (\\u0000) characters".into());
        }
        if is_outage(&error) {
            tracing::warn!(error.cause_chain = ?error, "database unavailable");
            return Self::Unavailable(Dependency::Database);
        }
        Self::Unexpected(anyhow::Error::new(error).context("database"))
    }
}

/// A stored secret that does not open is the server's fault (a missing key, a moved
/// row), never the client's.
impl From<spool_shared::sealing::SealError> for ApiError {
    fn from(error: spool_shared::sealing::SealError) -> Self {
        Self::Unexpected(anyhow::Error::new(error).context("webhook secret"))
    }
}

/// Whether the database is unreachable or restarting (a 503 to retry), rather than the
/// request having failed.
pub(crate) fn is_outage(error: &sea_orm::DbErr) -> bool {
    use sea_orm::sqlx::Error as Sqlx;
    use sea_orm::{DbErr, RuntimeErr};
    match error {
        DbErr::ConnectionAcquire(_) | DbErr::Conn(_) => true,
        DbErr::Query(RuntimeErr::SqlxError(e)) | DbErr::Exec(RuntimeErr::SqlxError(e)) => match e.as_ref() {
            Sqlx::Io(_) | Sqlx::PoolTimedOut | Sqlx::PoolClosed | Sqlx::WorkerCrashed => true,
            // 08: connection exceptions; 57P01–57P03: admin shutdown, crash shutdown, cannot connect now.
            Sqlx::Database(db) => db.code().is_some_and(|c| c.starts_with("08") || c.starts_with("57P")),
            _ => false,
        },
        _ => false,
    }
}

/// The SQLSTATE of a database error, when PostgreSQL answered one.
fn sqlstate(error: &sea_orm::DbErr) -> Option<String> {
    use sea_orm::{DbErr, RuntimeErr};
    match error {
        DbErr::Query(RuntimeErr::SqlxError(e)) | DbErr::Exec(RuntimeErr::SqlxError(e)) => {
            e.as_database_error().and_then(|d| d.code()).map(|c| c.into_owned())
        }
        _ => None,
    }
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::InvalidInput(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::InvalidRequest(_) | Self::InvalidBody { .. } | Self::InvalidParameter(_) => StatusCode::BAD_REQUEST,
            Self::ModelNotFound(_) | Self::JobNotFound => StatusCode::NOT_FOUND,
            Self::IdempotencyConflict | Self::NotCancelable(_) | Self::WebhookDisabled | Self::LimitReached { .. } => {
                StatusCode::CONFLICT
            }
            Self::Unauthorized(_) | Self::BadCredentials => StatusCode::UNAUTHORIZED,
            Self::MissingScope(_) | Self::NotOperator | Self::EmailNotVerified => StatusCode::FORBIDDEN,
            Self::RateLimited { .. } | Self::LoginLocked { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::InvalidEmailToken => StatusCode::BAD_REQUEST,
            Self::TokenNotFound | Self::WebhookNotFound | Self::DeliveryNotFound | Self::BatchNotFound => {
                StatusCode::NOT_FOUND
            }
            Self::Unavailable(_) | Self::ModelUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Unexpected(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            Self::InvalidInput(_) => "invalid_input",
            Self::InvalidRequest(_) => "invalid_request",
            Self::InvalidBody { .. } => "invalid_body",
            Self::InvalidParameter(_) => "invalid_parameter",
            Self::ModelNotFound(_) => "model_not_found",
            Self::JobNotFound => "job_not_found",
            Self::IdempotencyConflict => "idempotency_key_reused",
            Self::NotCancelable(_) => "job_not_cancelable",
            Self::Unauthorized(failure) => failure.code(),
            Self::MissingScope(_) | Self::NotOperator => "insufficient_scope",
            Self::EmailNotVerified => "email_not_verified",
            Self::RateLimited { .. } => "rate_limited",
            Self::LoginLocked { .. } => "login_locked",
            Self::BadCredentials => "invalid_credentials",
            Self::InvalidEmailToken => "invalid_email_token",
            Self::TokenNotFound => "token_not_found",
            Self::WebhookNotFound => "webhook_not_found",
            Self::BatchNotFound => "batch_not_found",
            Self::DeliveryNotFound => "delivery_not_found",
            Self::WebhookDisabled => "webhook_disabled",
            Self::LimitReached { .. } => "limit_reached",
            Self::Unavailable(_) => "service_unavailable",
            Self::ModelUnavailable(_) => "model_unavailable",
            Self::Unexpected(_) => "internal_error",
        }
    }

    fn problem(&self) -> Problem {
        let status = self.status();
        let detail = match self {
            // Never leak internals to clients; the cause is logged instead.
            Self::Unexpected(_) => "an unexpected error occurred; it has been logged".to_owned(),
            other => other.to_string(),
        };
        let errors = match self {
            Self::InvalidInput(errors) => Some(errors.clone()),
            Self::InvalidBody { errors, .. } if !errors.is_empty() => Some(errors.clone()),
            _ => None,
        };
        problem(status, self.code(), detail, errors)
    }
}

fn problem(status: StatusCode, code: &str, detail: String, errors: Option<Vec<FieldError>>) -> Problem {
    Problem {
        kind: format!("https://spool.dev/problems/{}", code.replace('_', "-")),
        title: status.canonical_reason().unwrap_or("Error").to_owned(),
        status: status.as_u16(),
        detail,
        code: code.to_owned(),
        errors,
    }
}

fn problem_response(problem: &Problem) -> Response {
    let body = problem.to_json_string();
    Response::builder()
        .status(StatusCode::from_u16(problem.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .content_type(PROBLEM_CONTENT_TYPE)
        .body(body)
}

impl poem::error::ResponseError for ApiError {
    fn status(&self) -> StatusCode {
        ApiError::status(self)
    }

    fn as_response(&self) -> Response {
        if let Self::Unexpected(error) = self {
            tracing::error!(error.cause_chain = ?error, "request failed");
        }
        let mut response = problem_response(&self.problem());
        if matches!(self, Self::Unauthorized(_)) {
            response
                .headers_mut()
                .insert(poem::http::header::WWW_AUTHENTICATE, poem::http::HeaderValue::from_static("Bearer"));
        }
        let retry_after = match self {
            Self::Unavailable(_) | Self::ModelUnavailable(_) => Some(RETRY_UNAVAILABLE_AFTER_SECS),
            Self::RateLimited { retry_after_secs } | Self::LoginLocked { retry_after_secs } => Some(*retry_after_secs),
            _ => None,
        };
        if let Some(secs) = retry_after {
            response.headers_mut().insert(poem::http::header::RETRY_AFTER, poem::http::HeaderValue::from(secs.max(1)));
        }
        response
    }
}

/// Documents the problem responses an operation may return.
impl ApiResponse for ApiError {
    fn meta() -> MetaResponses {
        let statuses = [
            (400, "The request is malformed"),
            (401, "Missing, invalid or expired token"),
            (403, "The token lacks a required scope"),
            (404, "The resource does not exist or is not yours"),
            (409, "Conflict with the resource's current state"),
            (413, "The body is too large"),
            (415, "The Content-Type is not one the operation takes"),
            (422, "The input does not match the model's schema"),
            (429, "Too many requests; see Retry-After"),
            (503, "A dependency is unavailable; retry later"),
        ];
        MetaResponses {
            responses: statuses
                .into_iter()
                .map(|(status, description)| MetaResponse {
                    description,
                    status: Some(status),
                    status_range: None,
                    content: vec![MetaMediaType { content_type: PROBLEM_CONTENT_TYPE, schema: Problem::schema_ref() }],
                    headers: vec![],
                })
                .collect(),
        }
    }

    fn register(registry: &mut Registry) {
        Problem::register(registry);
    }
}

/// Turns any error that reaches the top of the router into a problem response.
pub async fn problem_from_poem(error: poem::Error) -> Response {
    if error.is::<ApiError>() {
        return error.into_response();
    }
    // A body without a declared length fails as it is read, as an I/O error poem calls 400.
    if let Some(poem::error::ReadBodyError::Io(io)) = error.downcast_ref::<poem::error::ReadBodyError>()
        && let Some(too_large) = BodyTooLarge::within(io)
    {
        return problem_response(&problem(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            too_large.to_string(),
            None,
        ));
    }
    let status = error.status();
    let code = if error.is::<poem_openapi::error::AuthorizationError>() {
        return ApiError::Unauthorized(AuthFailure::MissingToken).as_response_owned();
    } else if error.is::<poem_openapi::error::ParseRequestPayloadError>() || error.is::<poem::error::ParseJsonError>() {
        "invalid_body"
    } else if error.is::<poem_openapi::error::ParseParamError>()
        || error.is::<poem_openapi::error::ParsePathError>()
        || error.is::<poem::error::ParsePathError>()
    {
        "invalid_parameter"
    } else if error.is::<poem_openapi::error::ContentTypeError>() {
        "unsupported_media_type"
    } else {
        match status {
            StatusCode::NOT_FOUND => "not_found",
            StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
            StatusCode::PAYLOAD_TOO_LARGE => "body_too_large",
            StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
            s if s.is_client_error() => "bad_request",
            _ => "internal_error",
        }
    };
    let detail = if status.is_server_error() {
        tracing::error!(%error, "request failed");
        "an unexpected error occurred; it has been logged".to_owned()
    } else {
        error.to_string()
    };
    problem_response(&problem(status, code, detail, None))
}

/// A request body over its endpoint's limit: refused from its `Content-Length`, or,
/// without one, once that many bytes have been read.
#[derive(Debug, thiserror::Error)]
#[error("the body is over this endpoint's limit of {max} bytes")]
pub struct BodyTooLarge {
    pub max: usize,
}

impl BodyTooLarge {
    /// The limit error inside a read error (poem wraps the body's own error again).
    fn within(error: &std::io::Error) -> Option<&Self> {
        let inner = error.get_ref()?;
        inner.downcast_ref::<Self>().or_else(|| Self::within(inner.downcast_ref::<std::io::Error>()?))
    }
}

impl poem::error::ResponseError for BodyTooLarge {
    fn status(&self) -> StatusCode {
        StatusCode::PAYLOAD_TOO_LARGE
    }
}

impl ApiError {
    fn as_response_owned(&self) -> Response {
        poem::error::ResponseError::as_response(self)
    }
}
