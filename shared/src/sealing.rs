//! Webhook signing secrets at rest: PostgreSQL holds them sealed (PASETO `v4.local`,
//! XChaCha20 + BLAKE2b-MAC), so a copy of the database alone cannot forge webhooks. The
//! API seals a secret when it makes one; the dispatcher opens it to sign.
//!
//! Keys are PASERK `k4.local.…` strings (`webhooks.sealing_keys`): the first seals, every
//! one opens, picked by the PASERK id in the sealed value's footer, so keys can rotate.
//! Each sealed value is bound to its row (the implicit assertion names the subscription
//! or the account), so a sealed secret copied into another row does not open.

use std::collections::HashMap;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use pasetors::Local;
use pasetors::keys::{Generate, SymmetricKey};
use pasetors::paserk::{FormatAsPaserk, Id};
use pasetors::token::UntrustedToken;
use pasetors::version4::{LocalToken, V4};
use secrecy::{ExposeSecret, SecretString};
use uuid::Uuid;

/// Whose secret a sealed value holds.
#[derive(Debug, Clone, Copy)]
pub enum SecretOwner {
    /// An account subscription (its current and previous secret).
    Subscription(Uuid),
    /// An account's secret for per-job webhooks.
    Account(Uuid),
}

impl SecretOwner {
    fn assertion(self) -> String {
        match self {
            Self::Subscription(id) => format!("spool webhook secret: subscription {id}"),
            Self::Account(id) => format!("spool webhook secret: account {id}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("webhooks.sealing_keys is empty: generate a key with `spoolctl keys generate`")]
    NoKey,
    #[error("webhooks.sealing_keys[{0}] is not a PASERK k4.local key")]
    BadKey(usize),
    #[error("the sealed secret names a key that webhooks.sealing_keys does not hold")]
    UnknownKey,
    #[error("the sealed secret does not open (tampered with, or moved to another row)")]
    Tampered,
    #[error("sealing failed: {0}")]
    Crypto(pasetors::errors::Error),
}

#[derive(Clone)]
pub struct SecretSealer {
    /// PASERK id of the key that seals.
    sealing_id: String,
    keys: HashMap<String, SymmetricKey<V4>>,
}

/// Longer footers are refused before parsing; ours is the PASERK id, 50 bytes.
const MAX_FOOTER_BYTES: usize = 128;

impl SecretSealer {
    pub fn new(keys: &[SecretString]) -> Result<Self, SealError> {
        let mut by_id = HashMap::new();
        let mut sealing_id = None;
        for (index, key) in keys.iter().enumerate() {
            let key = SymmetricKey::<V4>::try_from(key.expose_secret()).map_err(|_| SealError::BadKey(index))?;
            let id = paserk_id(&key);
            sealing_id.get_or_insert_with(|| id.clone());
            by_id.insert(id, key);
        }
        Ok(Self { sealing_id: sealing_id.ok_or(SealError::NoKey)?, keys: by_id })
    }

    /// The sealed form of `secret`, to store.
    pub fn seal(&self, secret: &str, owner: SecretOwner) -> Result<String, SealError> {
        let key = &self.keys[&self.sealing_id];
        LocalToken::encrypt(
            key,
            secret.as_bytes(),
            Some(self.sealing_id.as_bytes()),
            Some(owner.assertion().as_bytes()),
        )
        .map_err(SealError::Crypto)
    }

    /// How every value sealed with the current sealing key ends (its footer, the key id);
    /// a stored value that ends otherwise is in clear or sealed with an older key.
    pub fn current_suffix(&self) -> String {
        format!(".{}", URL_SAFE_NO_PAD.encode(&self.sealing_id))
    }

    /// The secret behind a stored value. A `whsec_` value stored before sealing existed is
    /// returned as it is (the API seals those at start).
    pub fn open(&self, stored: &str, owner: SecretOwner) -> Result<String, SealError> {
        if stored.starts_with("whsec_") {
            return Ok(stored.to_owned());
        }
        let token = UntrustedToken::<Local, V4>::try_from(stored).map_err(|_| SealError::Tampered)?;
        let footer = token.untrusted_footer();
        if footer.len() > MAX_FOOTER_BYTES {
            return Err(SealError::Tampered);
        }
        let key_id = std::str::from_utf8(footer).map_err(|_| SealError::Tampered)?;
        let key = self.keys.get(key_id).ok_or(SealError::UnknownKey)?;
        let opened = LocalToken::decrypt(key, &token, Some(footer), Some(owner.assertion().as_bytes()))
            .map_err(|_| SealError::Tampered)?;
        String::from_utf8(opened.payload().as_bytes().to_vec()).map_err(|_| SealError::Tampered)
    }
}

/// A fresh sealing key, as a PASERK `k4.local.…` string.
pub fn generate_sealing_key() -> Result<String, SealError> {
    let key = SymmetricKey::<V4>::generate().map_err(SealError::Crypto)?;
    let mut paserk = String::new();
    key.fmt(&mut paserk).map_err(|_| SealError::NoKey)?;
    Ok(paserk)
}

fn paserk_id(key: &SymmetricKey<V4>) -> String {
    let mut id = String::new();
    Id::from(key).fmt(&mut id).expect("writing to a String cannot fail");
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealer(keys: &[&str]) -> SecretSealer {
        SecretSealer::new(&keys.iter().map(|k| SecretString::from(k.to_string())).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn a_sealed_secret_opens_only_for_its_owner_and_with_a_key_it_names() {
        let (old, new) = (generate_sealing_key().unwrap(), generate_sealing_key().unwrap());
        let owner = SecretOwner::Subscription(Uuid::now_v7());
        let sealed = sealer(&[&old]).seal("whsec_c2VjcmV0", owner).unwrap();
        assert!(!sealed.contains("c2VjcmV0"));

        // Rotated: the new key seals, the old one still opens what it sealed.
        let rotated = sealer(&[&new, &old]);
        assert_eq!(rotated.open(&sealed, owner).unwrap(), "whsec_c2VjcmV0");
        let resealed = rotated.seal("whsec_x", owner).unwrap();
        assert_eq!(sealer(&[&new]).open(&resealed, owner).unwrap(), "whsec_x");
        assert!(resealed.ends_with(&rotated.current_suffix()));
        assert!(!sealed.ends_with(&rotated.current_suffix()));

        assert!(matches!(sealer(&[&new]).open(&sealed, owner), Err(SealError::UnknownKey)));
        let elsewhere = SecretOwner::Subscription(Uuid::now_v7());
        assert!(matches!(rotated.open(&sealed, elsewhere), Err(SealError::Tampered)));
        let account = match owner {
            SecretOwner::Subscription(id) | SecretOwner::Account(id) => SecretOwner::Account(id),
        };
        assert!(matches!(rotated.open(&sealed, account), Err(SealError::Tampered)));
        let mut flipped = sealed.into_bytes();
        flipped[20] = if flipped[20] == b'A' { b'B' } else { b'A' };
        assert!(rotated.open(&String::from_utf8(flipped).unwrap(), owner).is_err());
    }

    #[test]
    fn a_secret_stored_before_sealing_opens_as_it_is() {
        let sealer = sealer(&[&generate_sealing_key().unwrap()]);
        let owner = SecretOwner::Account(Uuid::now_v7());
        assert_eq!(
            sealer.open("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", owner).unwrap(),
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
        );
    }

    #[test]
    fn no_key_or_a_wrong_one_is_refused_at_start() {
        assert!(matches!(SecretSealer::new(&[]), Err(SealError::NoKey)));
        let public = SecretString::from("k4.public.AAAA".to_string());
        assert!(matches!(SecretSealer::new(&[public]), Err(SealError::BadKey(0))));
    }
}
