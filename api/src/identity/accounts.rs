//! Accounts: registration, email verification, login with throttling, password reset,
//! profile and usage.

use std::sync::LazyLock;
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

/// Creates an unverified account and mails its verification token. The answer is the
/// same when the address already has an account (which is left as it is): its owner gets
/// a mail instead, so registering tells nobody who has an account. The password is hashed
/// either way, so the time taken does not tell either.
pub async fn register(state: &AppState, email: Email, password: NewPassword) -> Result<(), ApiError> {
    let hash = passwords::hash(password).await?;
    let created = users::Entity::find()
        .from_raw_sql(Statement::from_sql_and_values(
            DbBackend::Postgres,
            r#"INSERT INTO users (id, email, password_hash) VALUES ($1, $2, $3)
               ON CONFLICT (email) DO NOTHING RETURNING *"#,
            [Uuid::now_v7().into(), email.as_str().into(), hash.into()],
        ))
        .one(&state.db)
        .await?;
    match created {
        Some(user) => send_account_mail(state, user, AccountMail::Verification),
        None => match find_by_email(&state.db, &email).await? {
            // Registered, never verified: the new mail is what its owner was after.
            Some(user) if user.email_verified_at.is_none() => send_account_mail(state, user, AccountMail::Verification),
            Some(user) => send_account_mail(state, user, AccountMail::AlreadyRegistered),
            None => {} // deleted in between: nothing to tell
        },
    }
    Ok(())
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

/// The mails about an account.
#[derive(Clone, Copy)]
enum AccountMail {
    Verification,
    PasswordReset,
    /// Someone registered an address that has a verified account (no token).
    AlreadyRegistered,
}

/// Issues the mail's token and sends it, in the background: an answer that waited for
/// the SMTP server only when the address has an account would tell who has one. A failed
/// mail fails no request: it is logged, and the user can ask for another.
fn send_account_mail(state: &AppState, user: users::Model, mail: AccountMail) {
    let state = state.clone();
    tokio::spawn(async move {
        let mailer = &state.mailer;
        let result = async {
            let sent = match mail {
                AccountMail::Verification => {
                    let token = issue_email_token(&state.db, user.id, "verify_email", VERIFY_EMAIL_TTL).await?;
                    mailer.send_verification(&user.email, &token).await
                }
                AccountMail::PasswordReset => {
                    let token = issue_email_token(&state.db, user.id, "reset_password", RESET_PASSWORD_TTL).await?;
                    mailer.send_password_reset(&user.email, &token).await
                }
                AccountMail::AlreadyRegistered => mailer.send_already_registered(&user.email).await,
            };
            sent.map_err(|e| ApiError::Unexpected(e.into()))
        }
        .await;
        if let Err(error) = result {
            tracing::error!(user_id = %user.id, error.cause_chain = ?error, "cannot send an account mail");
        }
    });
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
    state.authenticator.refresh_user(user_id).await;
    Ok(())
}

/// Always succeeds, whether or not the address has an unverified account.
pub async fn resend_verification(state: &AppState, email: &Email) -> Result<(), ApiError> {
    let user = find_by_email(&state.db, email).await?;
    if let Some(user) = user.filter(|u| u.email_verified_at.is_none()) {
        send_account_mail(state, user, AccountMail::Verification);
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

/// Counts one attempt against the account and the client IP, and returns how long the
/// lockout lasts when either is past its limit (0: go ahead). Counting comes before the
/// password check, in one script: checking first and counting after a failure let every
/// attempt sent at once through.
static COUNT_LOGIN_ATTEMPT: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"local locked = 0
        for i, key in ipairs(KEYS) do
          local n = redis.call('INCR', key)
          if n == 1 then redis.call('EXPIRE', key, ARGV[1]) end
          if n > tonumber(ARGV[i + 1]) then locked = math.max(locked, redis.call('TTL', key), 1) end
        end
        return locked"#,
    )
});

/// After a success, which was counted as an attempt: the account starts afresh, and the
/// IP (an office behind one address) keeps only its failures.
static FORGIVE_LOGIN: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"redis.call('DEL', KEYS[1])
        if redis.call('EXISTS', KEYS[2]) == 1 then redis.call('DECR', KEYS[2]) end"#,
    )
});

/// An IP address may fail logins this many times more often than one account may: many
/// people can share one address (an office, a carrier's NAT).
const IP_FAILURES_PER_ACCOUNT_FAILURE: i64 = 4;

/// Checks the password; throttled per account and per IP with lockouts that expire.
pub async fn login(state: &AppState, email: &Email, password: SecretString, ip: &str) -> Result<Session, ApiError> {
    let auth = &state.settings.auth;
    let window = auth.login_window_secs.max(1);
    let account_key = state.redis.key(&format!("login-failures:account:{}", email.as_str()));
    let ip_key = state.redis.key(&format!("login-failures:ip:{ip}"));
    let limits = [
        window as i64,
        i64::from(auth.max_failed_logins),
        i64::from(auth.max_failed_logins) * IP_FAILURES_PER_ACCOUNT_FAILURE,
    ];
    match state.redis.invoke::<i64>(&COUNT_LOGIN_ATTEMPT, &[&account_key, &ip_key], &limits).await {
        Ok(0) => {}
        Ok(locked_for) => return Err(ApiError::LoginLocked { retry_after_secs: locked_for as u64 }),
        Err(error) => tracing::warn!(%error, "login throttling unavailable; failing open"),
    }

    let user = find_by_email(&state.db, email).await?;
    let matches = passwords::verify(password, user.as_ref().map(|u| u.password_hash.clone())).await;
    let Some(user) = user.filter(|_| matches) else {
        return Err(ApiError::BadCredentials);
    };
    if let Err(error) = state.redis.invoke::<()>(&FORGIVE_LOGIN, &[&account_key, &ip_key], &[0i64; 0]).await {
        tracing::warn!(%error, "cannot reset the login failure counts");
    }

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

/// Always succeeds, whether or not the address has an account, and as fast (the mail
/// goes in the background): no enumeration.
pub async fn forgot_password(state: &AppState, email: &Email) -> Result<(), ApiError> {
    if let Some(user) = find_by_email(&state.db, email).await? {
        send_account_mail(state, user, AccountMail::PasswordReset);
    }
    Ok(())
}

/// Sets a new password and signs out every session.
pub async fn reset_password(state: &AppState, token: &str, password: NewPassword) -> Result<(), ApiError> {
    let txn = state.db.begin().await?;
    // The token first: a made-up one must not cost a hash.
    let user_id = consume_email_token(&txn, token, "reset_password").await?;
    let hash = passwords::hash(password).await?;
    txn.execute_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "UPDATE users SET password_hash = $2, sessions_valid_after = now() WHERE id = $1",
        [user_id.into(), hash.into()],
    ))
    .await?;
    txn.commit().await?;
    state.authenticator.refresh_user(user_id).await;
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
