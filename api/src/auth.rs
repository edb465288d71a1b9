//! Bearer authentication with PASETO v4.public tokens.
//!
//! Two kinds of token, told apart by the `kind` claim:
//! - **session** tokens from `POST /v1/auth/login`: short-lived, for account management;
//! - **API** tokens from `POST /v1/tokens`: long-lived, scoped, for scripts; their `jti`
//!   is a row of `api_tokens`, so they can be revoked.
//!
//! Tokens are signed with the configured Ed25519 secret key and verified against the
//! configured public keys; the footer's `kid` (a PASERK id) picks the key, so two keys
//! can be active while signing keys rotate.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use pasetors::claims::{Claims, ClaimsValidationRules};
use pasetors::footer::Footer;
use pasetors::keys::{AsymmetricKeyPair, AsymmetricPublicKey, AsymmetricSecretKey, Generate};
use pasetors::paserk::{FormatAsPaserk, Id};
use pasetors::token::UntrustedToken;
use pasetors::version4::{self, V4};
use pasetors::{Public, public};
use poem::Request;
use poem_openapi::SecurityScheme;
use poem_openapi::auth::Bearer;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::error::{ApiError, AuthFailure, Dependency};

/// What an API token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    JobsRead,
    JobsWrite,
    Webhooks,
    Admin,
}

impl Scope {
    pub const ALL: [Scope; 4] = [Self::JobsRead, Self::JobsWrite, Self::Webhooks, Self::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::JobsRead => "jobs:read",
            Self::JobsWrite => "jobs:write",
            Self::Webhooks => "webhooks",
            Self::Admin => "admin",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == raw)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    User,
    Operator,
}

impl Role {
    pub fn parse(raw: &str) -> Self {
        if raw == "operator" { Self::Operator } else { Self::User }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::User => "user",
            Self::Operator => "operator",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    Session,
    Api,
}

impl TokenKind {
    fn as_str(self) -> &'static str {
        match self {
            Self::Session => "session",
            Self::Api => "api",
        }
    }
}

/// The authenticated caller of a request.
#[derive(Debug, Clone)]
pub struct Principal {
    pub user_id: Uuid,
    pub role: Role,
    pub kind: TokenKind,
    /// The token's `jti`.
    pub token_id: Uuid,
    pub scopes: Vec<Scope>,
    pub email_verified: bool,
}

impl Principal {
    /// Job, model and other script-facing endpoints: an API token with `scope`.
    pub fn require_api(&self, scope: Scope) -> Result<(), ApiError> {
        if self.kind != TokenKind::Api {
            return Err(ApiError::Unauthorized(AuthFailure::WrongPurpose));
        }
        if scope == Scope::Admin && self.role != Role::Operator {
            return Err(ApiError::NotOperator);
        }
        if !self.scopes.contains(&scope) {
            return Err(ApiError::MissingScope(scope));
        }
        Ok(())
    }

    /// Operator endpoints: an operator's session, or an operator's API token with `admin`.
    pub fn require_operator(&self) -> Result<(), ApiError> {
        match self.kind {
            TokenKind::Session if self.role == Role::Operator => Ok(()),
            TokenKind::Api => self.require_api(Scope::Admin),
            TokenKind::Session => Err(ApiError::NotOperator),
        }
    }

    /// Account management (creating and revoking tokens): a session token.
    pub fn require_session(&self) -> Result<(), ApiError> {
        if self.kind == TokenKind::Session { Ok(()) } else { Err(ApiError::Unauthorized(AuthFailure::WrongPurpose)) }
    }
}

/// What the authentication middleware concluded about a request's bearer token.
#[derive(Debug, Clone)]
pub enum AuthOutcome {
    Authenticated(Principal),
    Refused(AuthFailure),
    /// PostgreSQL could not be asked whether the token is revoked: never fail open.
    Unavailable,
}

/// `Authorization: Bearer <PASETO v4.public token>`.
#[derive(SecurityScheme)]
#[oai(ty = "bearer", bearer_format = "PASETO v4.public", checker = "check_bearer")]
pub struct BearerAuth(pub Principal);

async fn check_bearer(req: &Request, _bearer: Bearer) -> poem::Result<Principal> {
    // The middleware (`identity::middleware`) verified the token already.
    match req.extensions().get::<AuthOutcome>() {
        Some(AuthOutcome::Authenticated(principal)) => Ok(principal.clone()),
        Some(AuthOutcome::Refused(failure)) => Err(ApiError::Unauthorized(*failure).into()),
        Some(AuthOutcome::Unavailable) => Err(ApiError::Unavailable(Dependency::TokenStore).into()),
        None => Err(ApiError::Unauthorized(AuthFailure::MissingToken).into()),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("not a PASERK k4.public key")]
    InvalidPublicKey,
    #[error("not a PASERK k4.secret key")]
    InvalidSecretKey,
    #[error("token could not be created: {0}")]
    Sign(pasetors::errors::Error),
}

/// Claims of a token whose signature, issuer and expiry checked out.
#[derive(Debug, Clone)]
pub struct VerifiedToken {
    pub user_id: Uuid,
    pub kind: TokenKind,
    pub token_id: Uuid,
    pub scopes: Vec<Scope>,
    /// Sessions: when the login happened (ms since the epoch).
    pub auth_time_ms: i64,
}

/// Verifies tokens against the configured public keys.
#[derive(Clone)]
pub struct TokenVerifier {
    keys: HashMap<String, AsymmetricPublicKey<V4>>,
    issuer: String,
    /// Tokens already verified, by SHA-256 of the token: a script sends the same token on
    /// every request, and the Ed25519 check was a tenth of the API's CPU under load.
    /// The expiry is checked again on every hit; revocation is the caller's (`authn`).
    verified: Arc<Mutex<HashMap<[u8; 32], CachedToken>>>,
}

#[derive(Clone)]
struct CachedToken {
    token: VerifiedToken,
    expires_at: Option<DateTime<Utc>>,
}

/// Distinct tokens remembered at once; when full, the cache starts over.
const VERIFIED_CACHE_CAPACITY: usize = 10_000;

/// The footer is JSON naming the signing key. Parsed here because pasetors' `Footer`
/// compiles a regex on every call (another tenth of the API's CPU under load).
#[derive(Deserialize)]
struct KeyFooter {
    kid: String,
}

/// Longer footers are refused before parsing; ours is ~60 bytes.
const MAX_FOOTER_BYTES: usize = 512;

impl TokenVerifier {
    /// `public_keys` are PASERK `k4.public.…` strings.
    pub fn new(public_keys: &[String], issuer: &str) -> Result<Self, KeyError> {
        let mut keys = HashMap::new();
        for paserk in public_keys {
            let key = AsymmetricPublicKey::<V4>::try_from(paserk.as_str()).map_err(|_| KeyError::InvalidPublicKey)?;
            keys.insert(key_id(&key), key);
        }
        Ok(Self { keys, issuer: issuer.to_owned(), verified: Arc::default() })
    }

    pub fn verify(&self, token: &str) -> Result<VerifiedToken, AuthFailure> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let cached = self.verified.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).get(&digest).cloned();
        if let Some(cached) = cached {
            return match cached.expires_at {
                Some(expires_at) if expires_at <= Utc::now() => Err(AuthFailure::ExpiredToken),
                _ => Ok(cached.token),
            };
        }
        let (token, expires_at) = self.verify_uncached(token)?;
        let mut verified = self.verified.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if verified.len() >= VERIFIED_CACHE_CAPACITY {
            verified.clear();
        }
        verified.insert(digest, CachedToken { token: token.clone(), expires_at });
        Ok(token)
    }

    fn verify_uncached(&self, token: &str) -> Result<(VerifiedToken, Option<DateTime<Utc>>), AuthFailure> {
        use AuthFailure::{ExpiredToken, InvalidToken, UnsupportedToken};
        if !token.starts_with("v4.public.") {
            let paseto_like = ["v1.", "v2.", "v3.", "v4."].iter().any(|p| token.starts_with(p));
            return Err(if paseto_like { UnsupportedToken } else { InvalidToken });
        }
        let untrusted = UntrustedToken::<Public, V4>::try_from(token).map_err(|_| InvalidToken)?;
        let footer = untrusted.untrusted_footer();
        if footer.len() > MAX_FOOTER_BYTES {
            return Err(InvalidToken);
        }
        let footer: KeyFooter = serde_json::from_slice(footer).map_err(|_| InvalidToken)?;
        let key = self.keys.get(&footer.kid).ok_or(InvalidToken)?;
        let payload = verify_signature(key, &untrusted, None, None)?;
        let claims = Claims::from_string(&payload).map_err(|_| InvalidToken)?;
        let mut rules = ClaimsValidationRules::new();
        rules.validate_issuer_with(&self.issuer);
        rules.allow_non_expiring(); // API tokens may never expire; sessions always carry exp
        rules.validate_claims(&claims).map_err(|error| match error {
            pasetors::errors::Error::ClaimValidation(pasetors::errors::ClaimValidationError::Exp) => ExpiredToken,
            _ => InvalidToken,
        })?;
        let text = |name: &str| claims.get_claim(name).and_then(|v| v.as_str());
        let uuid = |name: &str| text(name).and_then(|s| Uuid::parse_str(s).ok()).ok_or(InvalidToken);
        let kind = match text("kind") {
            Some("session") if claims.contains_claim("exp") => TokenKind::Session,
            Some("api") => TokenKind::Api,
            _ => return Err(InvalidToken),
        };
        let scopes = claims
            .get_claim("scopes")
            .and_then(|v| v.as_array())
            .map(|scopes| scopes.iter().filter_map(|s| s.as_str().and_then(Scope::parse)).collect())
            .unwrap_or_default();
        let auth_time_ms = claims.get_claim("auth_time_ms").and_then(|v| v.as_i64()).unwrap_or(0);
        // pasetors checked `exp` is valid RFC 3339 when present.
        let expires_at = match text("exp") {
            Some(exp) => Some(DateTime::parse_from_rfc3339(exp).map_err(|_| InvalidToken)?.to_utc()),
            None => None,
        };
        let verified = VerifiedToken { user_id: uuid("sub")?, kind, token_id: uuid("jti")?, scopes, auth_time_ms };
        Ok((verified, expires_at))
    }
}

/// The cryptographic step of verification (the part the PASETO test vectors cover): the
/// Ed25519 signature over header, payload, footer and implicit assertion. Returns the
/// payload, not yet trusted for its claims.
pub fn verify_signature(
    key: &AsymmetricPublicKey<V4>,
    token: &UntrustedToken<Public, V4>,
    footer: Option<&[u8]>,
    implicit_assertion: Option<&[u8]>,
) -> Result<String, AuthFailure> {
    version4::PublicToken::verify(key, token, footer, implicit_assertion)
        .map(|trusted| trusted.payload().to_owned())
        .map_err(|_| AuthFailure::InvalidToken)
}

/// The PASERK id (`k4.pid.…`) of a public key, used as the footer's `kid`.
pub fn key_id(key: &AsymmetricPublicKey<V4>) -> String {
    let mut id = String::new();
    Id::from(key).fmt(&mut id).expect("writing to a String cannot fail. This is a bug.");
    id
}

/// A freshly generated key pair, as PASERK strings (secret, public).
pub fn generate_key_pair() -> Result<(String, String), KeyError> {
    let pair = AsymmetricKeyPair::<V4>::generate().map_err(KeyError::Sign)?;
    let mut secret = String::new();
    let mut public = String::new();
    pair.secret.fmt(&mut secret).map_err(|_| KeyError::InvalidSecretKey)?;
    pair.public.fmt(&mut public).map_err(|_| KeyError::InvalidPublicKey)?;
    Ok((secret, public))
}

/// Signs tokens with the current secret key.
#[derive(Clone)]
pub struct TokenSigner {
    secret: AsymmetricSecretKey<V4>,
    kid: Id,
    issuer: String,
}

/// One token to sign.
pub struct TokenGrant<'a> {
    pub user_id: Uuid,
    pub kind: TokenKind,
    pub token_id: Uuid,
    pub scopes: &'a [Scope],
    /// `None`: never expires (API tokens only).
    pub ttl: Option<Duration>,
}

impl TokenSigner {
    /// `secret_key` is a PASERK `k4.secret.…` string.
    pub fn new(secret_key: &str, issuer: &str) -> Result<Self, KeyError> {
        let secret = AsymmetricSecretKey::<V4>::try_from(secret_key).map_err(|_| KeyError::InvalidSecretKey)?;
        let public = AsymmetricPublicKey::<V4>::try_from(&secret).map_err(KeyError::Sign)?;
        Ok(Self { secret, kid: Id::from(&public), issuer: issuer.to_owned() })
    }

    pub fn sign(&self, grant: &TokenGrant<'_>) -> Result<String, KeyError> {
        let mut claims = match grant.ttl {
            Some(ttl) => Claims::new_expires_in(&ttl).map_err(KeyError::Sign)?,
            None => {
                let mut claims = Claims::new().map_err(KeyError::Sign)?;
                claims.non_expiring();
                claims
            }
        };
        claims.issuer(&self.issuer).map_err(KeyError::Sign)?;
        claims.subject(&grant.user_id.to_string()).map_err(KeyError::Sign)?;
        claims.token_identifier(&grant.token_id.to_string()).map_err(KeyError::Sign)?;
        claims.add_additional("kind", grant.kind.as_str()).map_err(KeyError::Sign)?;
        if grant.kind == TokenKind::Api {
            let scopes: Vec<&str> = grant.scopes.iter().map(|s| s.as_str()).collect();
            claims.add_additional("scopes", scopes).map_err(KeyError::Sign)?;
        } else {
            claims.add_additional("auth_time_ms", Utc::now().timestamp_millis()).map_err(KeyError::Sign)?;
        }
        let mut footer = Footer::new();
        footer.key_id(&self.kid);
        public::sign(&self.secret, &claims, Some(&footer), None).map_err(KeyError::Sign)
    }
}

/// When a token with this TTL, created now, expires.
pub fn expiry(ttl: Option<Duration>) -> Option<DateTime<Utc>> {
    ttl.and_then(|ttl| chrono::Duration::from_std(ttl).ok()).map(|ttl| Utc::now() + ttl)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api_grant(ttl: Option<Duration>) -> TokenGrant<'static> {
        TokenGrant {
            user_id: Uuid::nil(),
            kind: TokenKind::Api,
            token_id: Uuid::nil(),
            scopes: &[Scope::JobsRead],
            ttl,
        }
    }

    fn pair() -> (TokenSigner, String) {
        let (secret, public) = generate_key_pair().expect("keys");
        (TokenSigner::new(&secret, "spool").expect("signer"), public)
    }

    #[test]
    fn a_signed_token_verifies_and_carries_its_claims() {
        let (signer, public) = pair();
        let token = signer.sign(&api_grant(Some(Duration::from_secs(60)))).expect("token");
        let verifier = TokenVerifier::new(&[public], "spool").expect("verifier");
        let verified = verifier.verify(&token).expect("valid token");
        assert_eq!(verified.user_id, Uuid::nil());
        assert_eq!(verified.kind, TokenKind::Api);
        assert_eq!(verified.scopes, vec![Scope::JobsRead]);
    }

    #[test]
    fn api_tokens_may_never_expire() {
        let (signer, public) = pair();
        let token = signer.sign(&api_grant(None)).expect("token");
        let verifier = TokenVerifier::new(&[public], "spool").expect("verifier");
        assert!(verifier.verify(&token).is_ok());
    }

    #[test]
    fn unknown_keys_other_issuers_and_tampering_are_refused() {
        let (signer, _) = pair();
        let (_, other_public) = pair();
        let token = signer.sign(&api_grant(Some(Duration::from_secs(60)))).expect("token");
        let verifier = TokenVerifier::new(&[other_public], "spool").expect("verifier");
        assert_eq!(verifier.verify(&token).err(), Some(AuthFailure::InvalidToken));

        let (signer, public) = pair();
        let token = signer.sign(&api_grant(Some(Duration::from_secs(60)))).expect("token");
        let verifier = TokenVerifier::new(std::slice::from_ref(&public), "someone-else").expect("verifier");
        assert_eq!(verifier.verify(&token).err(), Some(AuthFailure::InvalidToken));

        let mut bytes = token.into_bytes();
        let middle = bytes.len() / 2;
        bytes[middle] = if bytes[middle] == b'A' { b'B' } else { b'A' };
        let verifier = TokenVerifier::new(&[public], "spool").expect("verifier");
        assert_eq!(verifier.verify(&String::from_utf8(bytes).expect("ascii")).err(), Some(AuthFailure::InvalidToken));
        assert_eq!(verifier.verify("v4.local.abc").err(), Some(AuthFailure::UnsupportedToken));
        assert_eq!(verifier.verify("not a token").err(), Some(AuthFailure::InvalidToken));
    }

    #[test]
    fn a_remembered_token_still_expires_and_its_tampered_copies_are_refused() {
        let (signer, public) = pair();
        let token = signer.sign(&api_grant(Some(Duration::from_secs(1)))).expect("token");
        let verifier = TokenVerifier::new(&[public], "spool").expect("verifier");
        assert!(verifier.verify(&token).is_ok());
        let mut tampered = token.clone().into_bytes();
        let middle = tampered.len() / 2;
        tampered[middle] = if tampered[middle] == b'A' { b'B' } else { b'A' };
        let tampered = String::from_utf8(tampered).expect("ascii");
        assert_eq!(verifier.verify(&tampered).err(), Some(AuthFailure::InvalidToken));
        std::thread::sleep(Duration::from_millis(2100));
        assert_eq!(verifier.verify(&token).err(), Some(AuthFailure::ExpiredToken));
    }

    /// The official PASETO v4 vectors (paseto-standard/test-vectors, as shipped with
    /// pasetors) through `verify_signature`, which `TokenVerifier::verify` uses.
    #[test]
    fn the_official_v4_public_test_vectors_pass() {
        let vectors: serde_json::Value =
            serde_json::from_str(include_str!("../testdata/paseto-v4.json")).expect("vectors parse");
        let mut checked = 0;
        for vector in vectors["tests"].as_array().expect("tests") {
            let Some(public_hex) = vector["public-key"].as_str() else { continue };
            let name = vector["name"].as_str().unwrap_or_default();
            let key_bytes = hex::decode(public_hex).expect("hex key");
            let key = AsymmetricPublicKey::<V4>::from(&key_bytes).expect("public key");
            let token = vector["token"].as_str().expect("token");
            let footer = vector["footer"].as_str().unwrap_or_default();
            let implicit = vector["implicit-assertion"].as_str().unwrap_or_default();
            let outcome = UntrustedToken::<Public, V4>::try_from(token)
                .map_err(|_| AuthFailure::InvalidToken)
                .and_then(|untrusted| {
                    let footer = (!footer.is_empty()).then_some(footer.as_bytes());
                    verify_signature(&key, &untrusted, footer, Some(implicit.as_bytes()))
                });
            if vector["expect-fail"].as_bool() == Some(true) {
                assert!(outcome.is_err(), "{name} must fail");
            } else {
                assert_eq!(outcome.as_deref().ok(), vector["payload"].as_str(), "{name}");
            }
            checked += 1;
        }
        assert_eq!(checked, 4, "4-S-1, 4-S-2, 4-S-3 and 4-F-1");
    }

    #[test]
    fn two_keys_can_be_active_during_rotation() {
        let (old, old_public) = pair();
        let (new, new_public) = pair();
        let verifier = TokenVerifier::new(&[old_public, new_public], "spool").expect("verifier");
        for signer in [old, new] {
            let token = signer.sign(&api_grant(Some(Duration::from_secs(60)))).expect("token");
            assert!(verifier.verify(&token).is_ok());
        }
    }
}
