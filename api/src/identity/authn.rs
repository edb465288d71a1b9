//! Turns a bearer token into a `Principal`: signature and expiry (`auth::TokenVerifier`),
//! then revocation, which is checked on every request.
//!
//! Revocation state is cached in Redis for `auth.token_cache_secs`; a revocation
//! overwrites the cache at once, so every API instance sees it on its next request.
//! When Redis is unreachable, PostgreSQL is asked: revocation never fails open.

use std::time::Duration;

use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, Statement};
use uuid::Uuid;

use crate::auth::{AuthOutcome, Principal, Role, TokenKind, TokenVerifier};
use crate::error::AuthFailure;
use crate::redis_handle::RedisHandle;

#[derive(Clone)]
pub struct Authenticator {
    verifier: TokenVerifier,
    db: DatabaseConnection,
    redis: RedisHandle,
    cache_ttl: Duration,
}

/// What the database says about the token's owner.
struct Standing {
    role: Role,
    verified: bool,
    revoked: bool,
}

impl Authenticator {
    pub fn new(verifier: TokenVerifier, db: DatabaseConnection, redis: RedisHandle, cache_ttl: Duration) -> Self {
        Self { verifier, db, redis, cache_ttl }
    }

    pub async fn authenticate(&self, token: &str) -> AuthOutcome {
        let verified = match self.verifier.verify(token) {
            Ok(verified) => verified,
            Err(failure) => return AuthOutcome::Refused(failure),
        };
        let standing = match verified.kind {
            TokenKind::Api => self.api_token_standing(verified.token_id, verified.user_id).await,
            TokenKind::Session => self.session_standing(verified.user_id, verified.auth_time_ms).await,
        };
        match standing {
            Ok(standing) if standing.revoked => AuthOutcome::Refused(AuthFailure::RevokedToken),
            Ok(standing) => AuthOutcome::Authenticated(Principal {
                user_id: verified.user_id,
                role: standing.role,
                kind: verified.kind,
                token_id: verified.token_id,
                scopes: verified.scopes,
                email_verified: standing.verified,
            }),
            Err(error) => {
                tracing::error!(error.cause_chain = ?error, "cannot check token revocation");
                AuthOutcome::Unavailable
            }
        }
    }

    fn api_token_key(&self, token_id: Uuid) -> String {
        self.redis.key(&format!("token:{token_id}"))
    }

    fn user_key(&self, user_id: Uuid) -> String {
        self.redis.key(&format!("user:{user_id}"))
    }

    async fn cached(&self, key: &str) -> Option<String> {
        self.redis.query::<Option<String>>(redis::cmd("GET").arg(key)).await.ok().flatten()
    }

    async fn cache(&self, key: &str, value: &str) {
        let ttl = self.cache_ttl.as_secs().max(1);
        if let Err(error) = self.redis.query::<()>(redis::cmd("SET").arg(key).arg(value).arg("EX").arg(ttl)).await {
            tracing::debug!(%error, "token cache write skipped");
        }
    }

    /// Cache value: `revoked`, or `ok|<role>|<verified 0/1>`.
    async fn api_token_standing(&self, token_id: Uuid, user_id: Uuid) -> Result<Standing, sea_orm::DbErr> {
        let key = self.api_token_key(token_id);
        if let Some(value) = self.cached(&key).await {
            if value == "revoked" {
                return Ok(Standing { role: Role::User, verified: false, revoked: true });
            }
            let mut parts = value.split('|').skip(1);
            let role = Role::parse(parts.next().unwrap_or_default());
            let verified = parts.next() == Some("1");
            return Ok(Standing { role, verified, revoked: false });
        }
        // Cache miss (or Redis down): ask PostgreSQL, and note the use while at it.
        let row = self
            .db
            .query_one_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                r#"UPDATE api_tokens t SET last_used_at = now()
                     FROM users u
                    WHERE t.id = $1 AND t.user_id = $2 AND u.id = t.user_id
                RETURNING (t.revoked_at IS NOT NULL OR (t.expires_at IS NOT NULL AND t.expires_at < now())) AS revoked,
                          u.role, u.email_verified_at IS NOT NULL AS verified"#,
                [token_id.into(), user_id.into()],
            ))
            .await?;
        let Some(row) = row else {
            // Unknown token (deleted account, or a token minted for a row that never existed).
            self.cache(&key, "revoked").await;
            return Ok(Standing { role: Role::User, verified: false, revoked: true });
        };
        let standing = Standing {
            revoked: row.try_get("", "revoked")?,
            role: Role::parse(&row.try_get::<String>("", "role")?),
            verified: row.try_get("", "verified")?,
        };
        let value = if standing.revoked {
            "revoked".to_owned()
        } else {
            format!("ok|{}|{}", standing.role.as_str(), u8::from(standing.verified))
        };
        self.cache(&key, &value).await;
        Ok(standing)
    }

    /// Cache value: `<role>|<sessions valid after, ms>|<verified 0/1>`.
    async fn session_standing(&self, user_id: Uuid, auth_time_ms: i64) -> Result<Standing, sea_orm::DbErr> {
        let key = self.user_key(user_id);
        let cached = self.cached(&key).await.and_then(|value| {
            let mut parts = value.split('|');
            let role = Role::parse(parts.next()?);
            let valid_after: i64 = parts.next()?.parse().ok()?;
            let verified = parts.next()? == "1";
            Some((role, valid_after, verified))
        });
        let (role, valid_after, verified) = match cached {
            Some(found) => found,
            None => {
                let row = self
                    .db
                    .query_one_raw(Statement::from_sql_and_values(
                        DbBackend::Postgres,
                        r#"SELECT role, (EXTRACT(EPOCH FROM sessions_valid_after) * 1000)::bigint AS valid_after,
                                  email_verified_at IS NOT NULL AS verified
                             FROM users WHERE id = $1"#,
                        [user_id.into()],
                    ))
                    .await?;
                let Some(row) = row else {
                    return Ok(Standing { role: Role::User, verified: false, revoked: true });
                };
                let found = (
                    Role::parse(&row.try_get::<String>("", "role")?),
                    row.try_get::<i64>("", "valid_after")?,
                    row.try_get::<bool>("", "verified")?,
                );
                self.cache(&key, &format!("{}|{}|{}", found.0.as_str(), found.1, u8::from(found.2))).await;
                found
            }
        };
        Ok(Standing { role, verified, revoked: auth_time_ms < valid_after })
    }

    /// Makes a revocation visible to every instance at once.
    pub async fn revoked(&self, token_id: Uuid) {
        self.cache(&self.api_token_key(token_id), "revoked").await;
    }

    /// Drops what is cached about a user (after verification or a password reset).
    pub async fn forget_user(&self, user_id: Uuid) {
        if let Err(error) = self.redis.query::<()>(redis::cmd("DEL").arg(self.user_key(user_id))).await {
            tracing::warn!(%error, "cannot drop cached user state; it expires on its own");
        }
    }

    /// Drops what is cached about every API token of a user (after verification).
    pub async fn forget_tokens(&self, token_ids: &[Uuid]) {
        for token_id in token_ids {
            let _ = self.redis.query::<()>(redis::cmd("DEL").arg(self.api_token_key(*token_id))).await;
        }
    }
}
