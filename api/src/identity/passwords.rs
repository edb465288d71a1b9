//! Password policy and argon2id hashing.
//!
//! Hashing is deliberately slow (OWASP's argon2id parameters: 19 MiB, 2 passes, 1 lane),
//! so it runs on the blocking pool, never on an async worker thread.

use std::sync::LazyLock;

use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use argon2::{Algorithm, Argon2, Params, Version};
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::Semaphore;

use crate::error::{ApiError, FieldError};

pub const MIN_LENGTH: usize = 12;
pub const MAX_LENGTH: usize = 256;

/// Passwords too common to allow even when long enough.
const COMMON_PASSWORDS: &[&str] = &[
    "123456789012",
    "1234567890123",
    "12345678901234",
    "password1234",
    "password12345",
    "passwordpassword",
    "qwertyuiopas",
    "qwerty123456",
    "qwertyuiop123",
    "iloveyou1234",
    "letmein12345",
    "welcome12345",
    "administrator",
    "adminadmin123",
    "abc123abc123",
    "111111111111",
    "000000000000",
    "aaaaaaaaaaaa",
    "changeme1234",
    "trustno11234",
    "football1234",
    "baseball1234",
    "superman1234",
    "sunshine1234",
    "princess1234",
    "correcthorsebatterystaple",
    "p@ssw0rd1234",
    "passw0rd1234",
    "monkey123456",
    "dragon123456",
];

/// A password that meets the policy. Its `Debug` never shows it.
pub struct NewPassword(SecretString);

impl NewPassword {
    pub fn parse(raw: String) -> Result<Self, ApiError> {
        let invalid = |detail: String| ApiError::InvalidInput(vec![FieldError { pointer: "/password".into(), detail }]);
        let length = raw.chars().count();
        if length < MIN_LENGTH {
            return Err(invalid(format!("must be at least {MIN_LENGTH} characters")));
        }
        if length > MAX_LENGTH {
            return Err(invalid(format!("must be at most {MAX_LENGTH} characters")));
        }
        if COMMON_PASSWORDS.contains(&raw.to_lowercase().as_str()) {
            return Err(invalid("is too common; choose another".into()));
        }
        Ok(Self(SecretString::from(raw)))
    }
}

/// Hashes running at once: one per core. Each takes 19 MiB and a core for tens of
/// milliseconds, and three endpoints anyone can call hash; beyond this, requests wait
/// their turn here (holding no memory) instead of piling up on the blocking pool.
static HASHING: LazyLock<Semaphore> =
    LazyLock::new(|| Semaphore::new(std::thread::available_parallelism().map_or(2, |n| n.get())));

/// Runs one argon2 computation on the blocking pool, when a hashing slot is free.
async fn run_hashing<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> Result<T, ApiError> {
    let slot = HASHING.acquire().await.map_err(|e| ApiError::Unexpected(e.into()))?;
    let result = tokio::task::spawn_blocking(work).await.map_err(|e| ApiError::Unexpected(e.into()));
    drop(slot);
    result
}

fn argon2() -> Argon2<'static> {
    let params = Params::new(19 * 1024, 2, 1, None).expect("OWASP parameters are valid. This is a bug.");
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

/// Hashes on the blocking pool; returns a PHC string.
pub async fn hash(password: NewPassword) -> Result<String, ApiError> {
    run_hashing(move || {
        // A random salt is generated for each hash.
        argon2()
            .hash_password(password.0.expose_secret().as_bytes())
            .map(|hash| hash.to_string())
            .map_err(|e| ApiError::Unexpected(anyhow::anyhow!("argon2: {e}")))
    })
    .await?
}

/// Checks a password against a stored hash on the blocking pool. With no stored hash
/// (unknown account) it still spends the same time, so timing does not reveal accounts.
pub async fn verify(password: SecretString, stored: Option<String>) -> bool {
    run_hashing(move || {
        const DUMMY: &str =
            "$argon2id$v=19$m=19456,t=2,p=1$c3Bvb2xzcG9vbHNwb29s$3LzGzWd0fDHsG7KHmQ3m0mHTrR+1dV0Ex5uSgXB3cN8";
        let stored = stored.as_deref().unwrap_or(DUMMY);
        let Ok(parsed) = PasswordHash::new(stored) else { return false };
        let matches = argon2().verify_password(password.expose_secret().as_bytes(), &parsed).is_ok();
        matches && stored != DUMMY
    })
    .await
    .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_wants_twelve_characters_and_nothing_common() {
        assert!(NewPassword::parse("short".into()).is_err());
        assert!(NewPassword::parse("Password1234".into()).is_err());
        assert!(NewPassword::parse("x".repeat(257)).is_err());
        assert!(NewPassword::parse("tulip-granite-oboe".into()).is_ok());
    }

    #[tokio::test]
    async fn a_hash_verifies_only_its_password() {
        let hash = hash(NewPassword::parse("tulip-granite-oboe".into()).expect("valid")).await.expect("hash");
        assert!(hash.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"));
        assert!(verify(SecretString::from("tulip-granite-oboe"), Some(hash.clone())).await);
        assert!(!verify(SecretString::from("tulip-granite-obo"), Some(hash)).await);
        assert!(!verify(SecretString::from("anything-at-all"), None).await);
    }
}
