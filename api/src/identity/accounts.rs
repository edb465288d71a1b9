//! Accounts: registration, email verification, login with throttling, password reset,
//! profile and usage.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sea_orm::{
    ConnectionTrait, DatabaseConnection, DbBackend, EntityTrait, FromQueryResult, Statement, TransactionTrait,
};
use secrecy::SecretString;
use spool_shared::entities::{usage, users};
use uuid::Uuid;

use super::passwords::{self, NewPassword};
use super::{hash_secret, new_secret};
use crate::auth::{Role, TokenGrant, TokenKind};
use crate::error::{ApiError, FieldError};
use crate::state::AppState;

const VERIFY_EMAIL_TTL: &str = "24 hours";
const RESET_PASSWORD_TTL: &str = "1 hour";

/// A syntactically valid, lower-cased email address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Email(String);

impl Email {
    pub fn parse(raw: &str) -> Result<Self, ApiError> {
        let normalized = raw.trim().to_lowercase();
        if normalized.len() > 254 || normalized.parse::<lettre::Address>().is_err() {
            return Err(ApiError::InvalidInput(vec![FieldError {
                pointer: "/email".into(),
                detail: "is not a valid email address".into(),
            }]));
        }
        Ok(Self(normalized))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

pub async fn register(state: &AppState, email: Email, password: NewPassword) -> Result<users::Model, ApiError> {
    let hash = passwords::hash(password).await?;
    let user = users::Entity::find()
        .from_raw_sql(Statement::from_sql_and_values(
            DbBackend::Postgres,
            r#"INSERT INTO users (id, email, password_hash) VALUES ($1, $2, $3)
               ON CONFLICT (email) DO NOTHING RETURNING *"#,
            [Uuid::now_v7().into(), email.as_str().into(), hash.into()],
        ))
        .one(&state.db)
        .await?
        .ok_or(ApiError::EmailTaken)?;
    send_verification(state, &user).await;
    Ok(user)
}

/// Creates an account that is already verified (operators, development users).
pub async fn create_verified_user(
    db: &DatabaseConnection,
    email: &Email,
    password: NewPassword,
    role: Role,
) -> Result<users::Model, ApiError> {
    let hash = passwords::hash(password).await?;
    users::Entity::find()
        .from_raw_sql(Statement::from_sql_and_values(
            DbBackend::Postgres,
            r#"INSERT INTO users (id, email, password_hash, role, email_verified_at)
               VALUES ($1, $2, $3, $4, now())
               ON CONFLICT (email) DO UPDATE SET role = EXCLUDED.role,
                   email_verified_at = coalesce(users.email_verified_at, now())
               RETURNING *"#,
            [Uuid::now_v7().into(), email.as_str().into(), hash.into(), role.as_str().into()],
        ))
        .one(db)
        .await?
        .ok_or_else(|| ApiError::Unexpected(anyhow::anyhow!("upsert returned no row")))
}

async fn issue_email_token(
    db: &DatabaseConnection,
    user_id: Uuid,
    purpose: &str,
    ttl: &str,
) -> Result<String, ApiError> {
    let (secret, hash) = new_secret();
    db.execute_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "INSERT INTO email_tokens (id, user_id, purpose, token_hash, expires_at) \
         VALUES ($1, $2, $3, $4, now() + $5::interval)",
        [Uuid::now_v7().into(), user_id.into(), purpose.into(), hash.into(), ttl.into()],
    ))
    .await?;
    Ok(secret)
}

/// Mails a verification token. A mail failure does not fail the request: the user can
/// ask for another mail.
async fn send_verification(state: &AppState, user: &users::Model) {
    let result = async {
        let token = issue_email_token(&state.db, user.id, "verify_email", VERIFY_EMAIL_TTL).await?;
        state.mailer.send_verification(&user.email, &token).await.map_err(|e| ApiError::Unexpected(e.into()))
    }
    .await;
    if let Err(error) = result {
        tracing::error!(user_id = %user.id, error.cause_chain = ?error, "cannot send the verification mail");
    }
}

/// Consumes a single-use token of `purpose`; returns its user.
async fn consume_email_token<C: ConnectionTrait>(db: &C, token: &str, purpose: &str) -> Result<Uuid, ApiError> {
    let row = db
        .query_one_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            r#"UPDATE email_tokens SET used_at = now()
                WHERE token_hash = $1 AND purpose = $2 AND used_at IS NULL AND expires_at > now()
            RETURNING user_id"#,
            [hash_secret(token).into(), purpose.into()],
        ))
        .await?
        .ok_or(ApiError::InvalidEmailToken)?;
    Ok(row.try_get("", "user_id")?)
}

pub async fn verify_email(state: &AppState, token: &str) -> Result<(), ApiError> {
    let txn = state.db.begin().await?;
    let user_id = consume_email_token(&txn, token, "verify_email").await?;
    txn.execute_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "UPDATE users SET email_verified_at = coalesce(email_verified_at, now()) WHERE id = $1",
        [user_id.into()],
    ))
    .await?;
    txn.commit().await?;
    state.authenticator.forget_user(user_id).await;
    Ok(())
}

/// Always succeeds, whether or not the address has an unverified account.
pub async fn resend_verification(state: &AppState, email: &Email) -> Result<(), ApiError> {
    let user = find_by_email(&state.db, email).await?;
    if let Some(user) = user.filter(|u| u.email_verified_at.is_none()) {
        send_verification(state, &user).await;
    }
    Ok(())
}

pub async fn find_by_email(db: &DatabaseConnection, email: &Email) -> Result<Option<users::Model>, ApiError> {
    use sea_orm::{ColumnTrait, QueryFilter};
    Ok(users::Entity::find().filter(users::Column::Email.eq(email.as_str())).one(db).await?)
}

/// A session token.
pub struct Session {
    pub token: String,
    pub expires_at: DateTime<Utc>,
}

/// Checks the password; throttled per account and per IP with lockouts that expire.
pub async fn login(state: &AppState, email: &Email, password: SecretString, ip: &str) -> Result<Session, ApiError> {
    let auth = &state.settings.auth;
    let window = auth.login_window_secs.max(1);
    let account_key = state.redis.key(&format!("login-failures:account:{}", email.as_str()));
    let ip_key = state.redis.key(&format!("login-failures:ip:{ip}"));
    for (key, max) in [(&account_key, auth.max_failed_logins), (&ip_key, auth.max_failed_logins * 4)] {
        if let Some(failures) = counter(state, key).await
            && failures >= i64::from(max)
        {
            let ttl = state.redis.query::<i64>(redis::cmd("TTL").arg(key)).await.unwrap_or(window as i64);
            return Err(ApiError::LoginLocked { retry_after_secs: ttl.max(1) as u64 });
        }
    }

    let user = find_by_email(&state.db, email).await?;
    let matches = passwords::verify(password, user.as_ref().map(|u| u.password_hash.clone())).await;
    let Some(user) = user.filter(|_| matches) else {
        for key in [&account_key, &ip_key] {
            let mut pipe = redis::cmd("EVAL");
            pipe.arg("local n = redis.call('INCR', KEYS[1]) if n == 1 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end return n")
                .arg(1)
                .arg(key)
                .arg(window);
            if let Err(error) = state.redis.query::<i64>(&pipe).await {
                tracing::warn!(%error, "login throttling unavailable; failing open");
            }
        }
        return Err(ApiError::BadCredentials);
    };
    let _ = state.redis.query::<()>(redis::cmd("DEL").arg(&account_key)).await;

    let ttl = Duration::from_secs(auth.session_ttl_secs);
    let grant = TokenGrant {
        user_id: user.id,
        kind: TokenKind::Session,
        token_id: Uuid::now_v7(),
        scopes: &[],
        ttl: Some(ttl),
    };
    let token = state.signer.sign(&grant).map_err(|e| ApiError::Unexpected(e.into()))?;
    let expires_at = crate::auth::expiry(Some(ttl)).unwrap_or_else(Utc::now);
    Ok(Session { token, expires_at })
}

async fn counter(state: &AppState, key: &str) -> Option<i64> {
    state.redis.query::<Option<i64>>(redis::cmd("GET").arg(key)).await.ok().flatten()
}

/// Always succeeds, whether or not the address has an account (no enumeration).
pub async fn forgot_password(state: &AppState, email: &Email) -> Result<(), ApiError> {
    if let Some(user) = find_by_email(&state.db, email).await? {
        let result = async {
            let token = issue_email_token(&state.db, user.id, "reset_password", RESET_PASSWORD_TTL).await?;
            state.mailer.send_password_reset(&user.email, &token).await.map_err(|e| ApiError::Unexpected(e.into()))
        }
        .await;
        if let Err(error) = result {
            tracing::error!(user_id = %user.id, error.cause_chain = ?error, "cannot send the reset mail");
        }
    }
    Ok(())
}

/// Sets a new password and signs out every session.
pub async fn reset_password(state: &AppState, token: &str, password: NewPassword) -> Result<(), ApiError> {
    let hash = passwords::hash(password).await?;
    let txn = state.db.begin().await?;
    let user_id = consume_email_token(&txn, token, "reset_password").await?;
    txn.execute_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "UPDATE users SET password_hash = $2, sessions_valid_after = now() WHERE id = $1",
        [user_id.into(), hash.into()],
    ))
    .await?;
    txn.commit().await?;
    state.authenticator.forget_user(user_id).await;
    Ok(())
}

pub async fn find(db: &DatabaseConnection, user_id: Uuid) -> Result<users::Model, ApiError> {
    users::Entity::find_by_id(user_id)
        .one(db)
        .await?
        .ok_or(ApiError::Unauthorized(crate::error::AuthFailure::RevokedToken))
}

pub async fn usage(db: &DatabaseConnection, user_id: Uuid) -> Result<Vec<usage::Totals>, ApiError> {
    Ok(usage::Totals::find_by_statement(Statement::from_sql_and_values(
        DbBackend::Postgres,
        r#"SELECT model, sum(submitted)::bigint AS submitted, sum(succeeded)::bigint AS succeeded,
                  sum(failed)::bigint AS failed, sum(inference_ms_total) AS inference_ms_total,
                  max(last_used_at) AS last_used_at
             FROM usage WHERE user_id = $1 GROUP BY model ORDER BY model"#,
        [user_id.into()],
    ))
    .all(db)
    .await?)
}
