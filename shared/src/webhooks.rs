//! Webhook rules shared by the API (subscriptions, validation) and the dispatcher
//! (signing): Standard Webhooks signatures, secrets, event names.
//!
//! Signature: `v1,<base64 HMAC-SHA256 over "{id}.{timestamp}.{body}">`, keyed with the
//! bytes behind a `whsec_<base64>` secret. During a rotation both secrets sign and the
//! header carries both signatures, space-separated, as the spec allows.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;

/// Events an account subscription may ask for.
pub const SUBSCRIPTION_EVENTS: &[&str] =
    &["job.started", "job.succeeded", "job.failed", "job.canceled", "job.dead_lettered", "batch.completed"];

/// Events a per-job webhook may ask for: `completed` covers succeeded, failed and canceled.
pub const JOB_EVENTS: &[&str] = &["started", "completed"];

/// Key of the notifications that wake the dispatcher when deliveries are queued.
pub const DELIVERIES_CHANNEL: &str = "spool_webhooks";

/// A new signing secret: `whsec_` + base64 of 32 random bytes.
pub fn new_secret() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!("whsec_{}", STANDARD.encode(bytes))
}

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("not a whsec_ signing secret")]
pub struct BadSecret;

/// The `webhook-signature` value for one message, signed with every secret given
/// (current first, then the previous one while a rotation is in its grace period).
pub fn signature(secrets: &[&str], message_id: &str, timestamp: i64, body: &[u8]) -> Result<String, BadSecret> {
    let signatures = secrets
        .iter()
        .map(|secret| {
            let key = STANDARD.decode(secret.strip_prefix("whsec_").ok_or(BadSecret)?).map_err(|_| BadSecret)?;
            let mut mac = Hmac::<Sha256>::new_from_slice(&key).map_err(|_| BadSecret)?;
            mac.update(format!("{message_id}.{timestamp}.").as_bytes());
            mac.update(body);
            Ok(format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes())))
        })
        .collect::<Result<Vec<_>, BadSecret>>()?;
    Ok(signatures.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_like_the_standard_webhooks_reference() {
        // The example from the Standard Webhooks specification's reference libraries.
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let body = br#"{"test": 2432232314}"#;
        let signed = signature(&[secret], "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body).unwrap();
        assert_eq!(signed, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn a_rotation_signs_with_both_secrets() {
        let (new, old) = (new_secret(), new_secret());
        let both = signature(&[&new, &old], "msg_1", 1, b"{}").unwrap();
        let parts: Vec<&str> = both.split(' ').collect();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0], signature(&[&new], "msg_1", 1, b"{}").unwrap());
        assert_eq!(parts[1], signature(&[&old], "msg_1", 1, b"{}").unwrap());
    }

    #[test]
    fn secrets_are_whsec_base64_of_32_bytes() {
        let secret = new_secret();
        let bytes = STANDARD.decode(secret.strip_prefix("whsec_").unwrap()).unwrap();
        assert_eq!(bytes.len(), 32);
        assert_eq!(signature(&["nope"], "m", 1, b""), Err(BadSecret));
    }
}
