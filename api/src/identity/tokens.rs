//! API tokens for scripts: created with a name, scopes and an expiry the user picks,
//! shown once, listed with their last use, revoked at once everywhere.

use std::time::Duration;

use sea_orm::{DatabaseConnection, DbBackend, EntityTrait, Statement};
use spool_shared::entities::api_tokens;
use uuid::Uuid;

use crate::auth::{Principal, Role, Scope, TokenGrant, TokenKind, TokenSigner, expiry};
use crate::error::{ApiError, FieldError};
use crate::state::AppState;

const MIN_TTL: Duration = Duration::from_secs(3600);
const MAX_TTL: Duration = Duration::from_secs(365 * 86_400);

/// How long a new token lives: `1h` … `365d`, or `never` where the config allows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenLifetime(Option<Duration>);

impl TokenLifetime {
    pub fn parse(raw: &str, allow_never: bool) -> Result<Self, ApiError> {
        let invalid = |detail: &str| {
            ApiError::InvalidInput(vec![FieldError { pointer: "/expires_in".into(), detail: detail.into() }])
        };
        if raw == "never" {
            return if allow_never {
                Ok(Self(None))
            } else {
                Err(invalid("tokens that never expire are not allowed here"))
            };
        }
        let ttl = parse_duration(raw).ok_or_else(|| invalid("use a duration like 1h, 30d or 365d"))?;
        if !(MIN_TTL..=MAX_TTL).contains(&ttl) {
            return Err(invalid("must be between 1h and 365d"));
        }
        Ok(Self(Some(ttl)))
    }
}

/// `90s`, `30m`, `12h`, `7d`.
pub fn parse_duration(raw: &str) -> Option<Duration> {
    let split = raw.find(|c: char| !c.is_ascii_digit())?;
    let (number, unit) = raw.split_at(split);
    let number: u64 = number.parse().ok()?;
    let seconds = match unit {
        "s" => number,
        "m" => number.checked_mul(60)?,
        "h" => number.checked_mul(3600)?,
        "d" => number.checked_mul(86_400)?,
        _ => return None,
    };
    Some(Duration::from_secs(seconds))
}

pub fn parse_scopes(raw: &[String]) -> Result<Vec<Scope>, ApiError> {
    let mut scopes = Vec::new();
    for name in raw {
        let scope = Scope::parse(name).ok_or_else(|| {
            ApiError::InvalidInput(vec![FieldError {
                pointer: "/scopes".into(),
                detail: format!("unknown scope {name:?}; use jobs:read, jobs:write, webhooks or admin"),
            }])
        })?;
        if !scopes.contains(&scope) {
            scopes.push(scope);
        }
    }
    if scopes.is_empty() {
        return Err(ApiError::InvalidInput(vec![FieldError {
            pointer: "/scopes".into(),
            detail: "name at least one scope".into(),
        }]));
    }
    Ok(scopes)
}

/// A new token: its metadata, and the token itself (shown this once).
pub struct IssuedToken {
    pub row: api_tokens::Model,
    pub token: String,
}

/// Creates a token for the session's user, who must be verified; `admin` is for operators.
pub async fn create(
    state: &AppState,
    principal: &Principal,
    name: String,
    lifetime: TokenLifetime,
    scopes: Vec<Scope>,
) -> Result<IssuedToken, ApiError> {
    if !principal.email_verified {
        return Err(ApiError::EmailNotVerified);
    }
    if scopes.contains(&Scope::Admin) && principal.role != Role::Operator {
        return Err(ApiError::NotOperator);
    }
    issue(&state.db, &state.signer, principal.user_id, name, lifetime, &scopes).await
}

/// Most tokens an account may hold that are neither revoked nor expired.
const MAX_LIVE_TOKENS: i64 = 100;

/// Most tokens `GET /v1/tokens` lists: every live one and the newest of the others.
const LISTED: i64 = 200;

/// SQL: the token is neither revoked nor expired.
const LIVE: &str = "(revoked_at IS NULL AND (expires_at IS NULL OR expires_at > now()))";

/// Writes the row and signs the token (also used by `spoolctl`).
pub async fn issue(
    db: &DatabaseConnection,
    signer: &TokenSigner,
    user_id: Uuid,
    name: String,
    lifetime: TokenLifetime,
    scopes: &[Scope],
) -> Result<IssuedToken, ApiError> {
    let name = name.trim().to_owned();
    if name.is_empty() || name.chars().count() > 100 {
        return Err(ApiError::InvalidInput(vec![FieldError {
            pointer: "/name".into(),
            detail: "must be 1–100 characters".into(),
        }]));
    }
    let id = Uuid::now_v7();
    let scope_names: Vec<String> = scopes.iter().map(|s| s.as_str().to_owned()).collect();
    let row = api_tokens::Entity::find()
        .from_raw_sql(Statement::from_sql_and_values(
            DbBackend::Postgres,
            format!(
                "INSERT INTO api_tokens (id, user_id, name, scopes, expires_at)
                 SELECT $1, $2, $3, $4, $5
                  WHERE (SELECT count(*) FROM api_tokens WHERE user_id = $2 AND {LIVE}) < $6
                 RETURNING *"
            ),
            [
                id.into(),
                user_id.into(),
                name.into(),
                scope_names.into(),
                expiry(lifetime.0).into(),
                MAX_LIVE_TOKENS.into(),
            ],
        ))
        .one(db)
        .await?
        .ok_or(ApiError::LimitReached { what: "live API tokens", max: MAX_LIVE_TOKENS })?;
    let grant = TokenGrant { user_id, kind: TokenKind::Api, token_id: id, scopes, ttl: lifetime.0 };
    let token = signer.sign(&grant).map_err(|e| ApiError::Unexpected(e.into()))?;
    Ok(IssuedToken { row, token })
}

/// The live tokens first, then the newest revoked or expired ones; `LISTED` at most.
pub async fn list(db: &DatabaseConnection, user_id: Uuid) -> Result<Vec<api_tokens::Model>, ApiError> {
    Ok(api_tokens::Entity::find()
        .from_raw_sql(Statement::from_sql_and_values(
            DbBackend::Postgres,
            format!("SELECT * FROM api_tokens WHERE user_id = $1 ORDER BY {LIVE} DESC, created_at DESC LIMIT $2"),
            [user_id.into(), LISTED.into()],
        ))
        .all(db)
        .await?)
}

/// Revokes one of the user's tokens; every API instance refuses it from the next request.
pub async fn revoke(state: &AppState, user_id: Uuid, token_id: Uuid) -> Result<(), ApiError> {
    let row = api_tokens::Entity::find()
        .from_raw_sql(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "UPDATE api_tokens SET revoked_at = coalesce(revoked_at, now()) WHERE id = $1 AND user_id = $2 RETURNING *",
            [token_id.into(), user_id.into()],
        ))
        .one(&state.db)
        .await?
        .ok_or(ApiError::TokenNotFound)?;
    state.authenticator.cache_revocation(row.id).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifetimes_are_bounded_and_never_is_opt_in() {
        assert_eq!(TokenLifetime::parse("1h", false).ok(), Some(TokenLifetime(Some(Duration::from_secs(3600)))));
        assert!(TokenLifetime::parse("365d", false).is_ok());
        assert!(TokenLifetime::parse("59m", false).is_err());
        assert!(TokenLifetime::parse("366d", false).is_err());
        assert!(TokenLifetime::parse("8761h", false).is_err());
        assert!(TokenLifetime::parse("never", false).is_err());
        assert_eq!(TokenLifetime::parse("never", true).ok(), Some(TokenLifetime(None)));
        assert!(TokenLifetime::parse("soon", true).is_err());
    }

    #[test]
    fn scopes_must_be_known() {
        assert_eq!(parse_scopes(&["jobs:read".into(), "jobs:read".into()]).ok(), Some(vec![Scope::JobsRead]));
        assert!(parse_scopes(&["jobs:delete".into()]).is_err());
        assert!(parse_scopes(&[]).is_err());
    }
}
