//! Identity and access: accounts and their usage, email verification, logins and
//! sessions, API tokens and their revocation. Token signing and scopes are in
//! `crate::auth`; request rate limits in `crate::ratelimit`.

pub mod accounts;
pub mod authn;
pub mod mailer;
pub mod middleware;
pub mod passwords;
pub mod tokens;

use base64::Engine;
use sha2::{Digest, Sha256};

/// A random single-use secret for mails (verification, reset): 32 bytes, URL-safe.
/// Only its hash is stored.
pub fn new_secret() -> (String, Vec<u8>) {
    let mut bytes = [0u8; 32];
    rand::fill(&mut bytes);
    let secret = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let hash = hash_secret(&secret);
    (secret, hash)
}

pub fn hash_secret(secret: &str) -> Vec<u8> {
    Sha256::digest(secret.as_bytes()).to_vec()
}
