//! Turns a bearer token into a `Principal`: signature and expiry (`auth::TokenVerifier`),
//! then revocation, which is checked on every request.
//!
//! Revocation state is cached in Redis for `auth.token_cache_secs`; a revocation
//! overwrites the cache at once, so every API instance sees it on its next request.
//! When Redis is unreachable, PostgreSQL is asked: revocation never fails open.
//! The middleware reads the cached standing in the same round trip as the rate limit
//! (`RateLimiter::gate`) and asks PostgreSQL here only on a miss.

use std::sync::LazyLock;
use std::time::Duration;

use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, Statement};
use uuid::Uuid;

use crate::auth::{AuthOutcome, Principal, Role, TokenKind, TokenVerifier, VerifiedToken};
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
#[derive(Debug, PartialEq, Eq)]
struct Standing {
    role: Role,
    verified: bool,
    revoked: bool,
}

impl Standing {
    const REVOKED: Self = Self { role: Role::User, verified: false, revoked: true };
}

/// The cached standing of a revoked (or unknown) API token.
const REVOKED: &str = "revoked";

/// Sets a cached standing (ARGV: value, seconds, a session's cut-off or ''), unless a
/// revocation is cached, or a session cut-off later than this one.
static CACHE_STANDING: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"local held = redis.call('GET', KEYS[1])
        if held == 'revoked' then return end
        if held and ARGV[3] ~= '' then
          local held_after = tonumber(string.match(held, '^[^|]*|(-?%d+)|'))
          if held_after and held_after > tonumber(ARGV[3]) then return end
        end
        redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])"#,
    )
});

impl Authenticator {
    pub fn new(verifier: TokenVerifier, db: DatabaseConnection, redis: RedisHandle, cache_ttl: Duration) -> Self {
        Self { verifier, db, redis, cache_ttl }
    }

    /// Signature, issuer and expiry: no I/O.
    pub fn verify(&self, token: &str) -> Result<VerifiedToken, AuthFailure> {
        self.verifier.verify(token)
    }

    /// The Redis key caching what PostgreSQL said of this token (revoked, role, verified).
    /// The rate limiter reads it in the same round trip as the quota (`RateLimiter::gate`).
    pub fn standing_key(&self, verified: &VerifiedToken) -> String {
        match verified.kind {
            TokenKind::Api => self.api_token_key(verified.token_id),
            TokenKind::Session => self.user_key(verified.user_id),
        }
    }

    /// The outcome from a cached standing the caller read (`standing_key`); `None` when
    /// the value does not parse, so the caller asks `authenticate_from_database`.
    pub fn from_cached(&self, verified: VerifiedToken, cached: &str) -> Option<AuthOutcome> {
        let standing = match verified.kind {
            TokenKind::Api => parse_api_token_standing(cached)?,
            TokenKind::Session => parse_session_standing(cached, verified.auth_time_ms)?,
        };
        Some(outcome(verified, Ok(standing)))
    }

    /// Asks PostgreSQL, when the caller found no usable standing cached (or Redis is
    /// down), and caches the answer for the next requests.
    pub async fn authenticate_from_database(&self, verified: VerifiedToken) -> AuthOutcome {
        let standing = match verified.kind {
            TokenKind::Api => self.api_token_standing(verified.token_id, verified.user_id).await,
            TokenKind::Session => self.session_standing(verified.user_id, verified.auth_time_ms).await,
        };
        outcome(verified, standing)
    }

    fn api_token_key(&self, token_id: Uuid) -> String {
        self.redis.key(&format!("token:{token_id}"))
    }

    fn user_key(&self, user_id: Uuid) -> String {
        self.redis.key(&format!("user:{user_id}"))
    }

    /// Caches what PostgreSQL said, unless something newer is cached already: a request
    /// that read the database just before a revocation (or a password reset) must not
    /// overwrite what that revocation cached. `valid_after`: a session's cut-off, which
    /// only moves forward.
    async fn cache(&self, key: &str, value: &str, valid_after: Option<i64>) {
        let ttl = self.cache_ttl.as_secs().max(1).to_string();
        let valid_after = valid_after.map(|ms| ms.to_string()).unwrap_or_default();
        let args = [value, ttl.as_str(), valid_after.as_str()];
        if let Err(error) = self.redis.invoke::<()>(&CACHE_STANDING, &[key], &args).await {
            tracing::debug!(%error, "token cache write skipped");
        }
    }

    async fn api_token_standing(&self, token_id: Uuid, user_id: Uuid) -> Result<Standing, sea_orm::DbErr> {
        let key = self.api_token_key(token_id);
        // Note the use while at it.
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
            self.cache(&key, REVOKED, None).await;
            return Ok(Standing::REVOKED);
        };
        let standing = Standing {
            revoked: row.try_get("", "revoked")?,
            role: Role::parse(&row.try_get::<String>("", "role")?),
            verified: row.try_get("", "verified")?,
        };
        let value = if standing.revoked {
            REVOKED.to_owned()
        } else {
            format!("ok|{}|{}", standing.role.as_str(), u8::from(standing.verified))
        };
        self.cache(&key, &value, None).await;
        Ok(standing)
    }

    async fn session_standing(&self, user_id: Uuid, auth_time_ms: i64) -> Result<Standing, sea_orm::DbErr> {
        let key = self.user_key(user_id);
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
            return Ok(Standing::REVOKED);
        };
        let role = Role::parse(&row.try_get::<String>("", "role")?);
        let valid_after: i64 = row.try_get("", "valid_after")?;
        let verified: bool = row.try_get("", "verified")?;
        self.cache(&key, &format!("{}|{valid_after}|{}", role.as_str(), u8::from(verified)), Some(valid_after)).await;
        Ok(Standing { role, verified, revoked: auth_time_ms < valid_after })
    }

    /// Makes a revocation visible to every instance at once.
    pub async fn cache_revocation(&self, token_id: Uuid) {
        let ttl = self.cache_ttl.as_secs().max(1);
        let key = self.api_token_key(token_id);
        if let Err(error) = self.redis.query::<()>(redis::cmd("SET").arg(&key).arg(REVOKED).arg("EX").arg(ttl)).await {
            tracing::warn!(%error, "cannot cache a revocation; cached standings expire on their own");
        }
    }

    /// Caches a user's standing anew from PostgreSQL (after verification or a password
    /// reset): a later cut-off replaces the one cached, and an earlier one read by a
    /// request still in flight can no longer replace it.
    pub async fn refresh_user(&self, user_id: Uuid) {
        if let Err(error) = self.session_standing(user_id, 0).await {
            tracing::warn!(error.cause_chain = ?error, "cannot refresh cached user state; it expires on its own");
        }
    }
}

fn outcome(verified: VerifiedToken, standing: Result<Standing, sea_orm::DbErr>) -> AuthOutcome {
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

/// An API token's cached standing: `revoked`, or `ok|<role>|<verified 0/1>`.
fn parse_api_token_standing(value: &str) -> Option<Standing> {
    if value == REVOKED {
        return Some(Standing::REVOKED);
    }
    let mut parts = value.split('|');
    if parts.next()? != "ok" {
        return None;
    }
    let role = Role::parse(parts.next()?);
    let verified = parts.next()? == "1";
    Some(Standing { role, verified, revoked: false })
}

/// A user's cached standing, for session tokens: `<role>|<sessions valid after, ms>|<verified 0/1>`.
fn parse_session_standing(value: &str, auth_time_ms: i64) -> Option<Standing> {
    let mut parts = value.split('|');
    let role = Role::parse(parts.next()?);
    let valid_after: i64 = parts.next()?.parse().ok()?;
    let verified = parts.next()? == "1";
    Some(Standing { role, verified, revoked: auth_time_ms < valid_after })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cached_standings_parse_and_garbage_does_not() {
        assert_eq!(parse_api_token_standing("revoked"), Some(Standing::REVOKED));
        assert_eq!(
            parse_api_token_standing("ok|operator|1"),
            Some(Standing { role: Role::Operator, verified: true, revoked: false })
        );
        assert_eq!(parse_api_token_standing("user|0|1"), None, "a session's value under a token's key");
        assert_eq!(parse_api_token_standing("ok|user"), None);
        assert_eq!(
            parse_session_standing("user|1000|0", 999),
            Some(Standing { role: Role::User, verified: false, revoked: true }),
            "a session from before the cut-off"
        );
        assert_eq!(
            parse_session_standing("user|1000|1", 1000),
            Some(Standing { role: Role::User, verified: true, revoked: false })
        );
        assert_eq!(parse_session_standing("user|soon|1", 1000), None);
    }

    /// Runs `CACHE_STANDING` on `key`; what the key holds after.
    async fn cache(
        redis: &mut redis::aio::MultiplexedConnection,
        key: &str,
        value: &str,
        valid_after: &str,
    ) -> Option<String> {
        let mut script = CACHE_STANDING.prepare_invoke();
        let _: () = script.key(key).arg(value).arg(60).arg(valid_after).invoke_async(redis).await.unwrap();
        redis::cmd("GET").arg(key).query_async(redis).await.unwrap()
    }

    /// The cache write of a request that read PostgreSQL just before a revocation (or a
    /// password reset) comes after that revocation's own write: it must not undo it.
    /// Against the real Redis of `REDIS_URL`, as in every test run.
    #[tokio::test]
    async fn a_stale_cache_write_never_undoes_a_revocation_or_a_later_cut_off() {
        let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
        let mut redis = redis::Client::open(url).unwrap().get_multiplexed_async_connection().await.unwrap();
        let key = format!("test:standing:{}", Uuid::now_v7());
        // An API token: a revocation cached first, the stale `ok` second.
        assert_eq!(cache(&mut redis, &key, "ok|user|1", "").await.as_deref(), Some("ok|user|1"));
        let _: () = redis::cmd("SET").arg(&key).arg(REVOKED).query_async(&mut redis).await.unwrap();
        assert_eq!(cache(&mut redis, &key, "ok|user|1", "").await.as_deref(), Some(REVOKED));

        // A session: a later cut-off stays, an earlier one read before it does not replace it.
        let _: () = redis::cmd("DEL").arg(&key).query_async(&mut redis).await.unwrap();
        assert_eq!(cache(&mut redis, &key, "user|2000|1", "2000").await.as_deref(), Some("user|2000|1"));
        assert_eq!(cache(&mut redis, &key, "user|1000|1", "1000").await.as_deref(), Some("user|2000|1"));
        assert_eq!(cache(&mut redis, &key, "user|3000|1", "3000").await.as_deref(), Some("user|3000|1"));
        let _: () = redis::cmd("DEL").arg(&key).query_async(&mut redis).await.unwrap();
    }
}
