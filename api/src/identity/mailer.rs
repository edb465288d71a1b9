//! Account mails (verification, password reset, a second registration) over SMTP with
//! lettre.

use lettre::message::{Mailbox, header::ContentType};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use secrecy::ExposeSecret;
use spool_shared::Settings;

#[derive(Debug, thiserror::Error)]
pub enum MailError {
    #[error("invalid SMTP URL: {0}")]
    Url(String),
    #[error("invalid address: {0}")]
    Address(#[from] lettre::address::AddressError),
    #[error("cannot build the message: {0}")]
    Build(#[from] lettre::error::Error),
    #[error("SMTP delivery failed: {0}")]
    Smtp(#[from] lettre::transport::smtp::Error),
}

#[derive(Clone)]
pub struct Mailer {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
    base_url: String,
}

impl Mailer {
    pub fn new(settings: &Settings) -> Result<Self, MailError> {
        let transport = AsyncSmtpTransport::<Tokio1Executor>::from_url(settings.smtp_url.expose_secret())
            .map_err(|e| MailError::Url(e.to_string()))?
            .build();
        Ok(Self {
            transport,
            from: settings.auth.mail_from.parse()?,
            base_url: settings.auth.public_base_url.trim_end_matches('/').to_owned(),
        })
    }

    pub async fn send_verification(&self, to: &str, token: &str) -> Result<(), MailError> {
        let body = format!(
            "Welcome to Spool.\n\nConfirm your email address with this token (valid 24 hours):\n\n    {token}\n\n\
             For example:\n\n    curl -X POST {base}/v1/auth/verify-email \\\n      \
             -H 'Content-Type: application/json' \\\n      -d '{{\"token\": \"{token}\"}}'\n\n\
             If you did not create an account, ignore this mail.\n",
            base = self.base_url
        );
        self.send(to, "Confirm your Spool account", body).await
    }

    pub async fn send_password_reset(&self, to: &str, token: &str) -> Result<(), MailError> {
        let body = format!(
            "Someone asked to reset the password of your Spool account.\n\nReset token (valid 1 hour, single use):\n\n    {token}\n\n\
             For example:\n\n    curl -X POST {base}/v1/auth/password/reset \\\n      \
             -H 'Content-Type: application/json' \\\n      \
             -d '{{\"token\": \"{token}\",\n           \"new_password\": \"...\"}}'\n\n\
             Resetting signs out every session. If it was not you, ignore this mail.\n",
            base = self.base_url
        );
        self.send(to, "Reset your Spool password", body).await
    }

    pub async fn send_already_registered(&self, to: &str) -> Result<(), MailError> {
        let body = format!(
            "Someone tried to create a Spool account with this address, which already\n\
             has one. If it was you, sign in with your password, or ask for a reset:\n\n    \
             curl -X POST {base}/v1/auth/password/forgot \\\n      \
             -H 'Content-Type: application/json' \\\n      -d '{{\"email\": \"{to}\"}}'\n\n\
             If it was not you, ignore this mail: nothing was changed.\n",
            base = self.base_url
        );
        self.send(to, "You already have a Spool account", body).await
    }

    /// Lines stay under 76 characters (with the default base URL), so the mail goes as
    /// plain 7-bit text that can be copied from, not quoted-printable.
    async fn send(&self, to: &str, subject: &str, body: String) -> Result<(), MailError> {
        let message = Message::builder()
            .from(self.from.clone())
            .to(to.parse()?)
            .subject(subject)
            .header(ContentType::TEXT_PLAIN)
            .body(body)?;
        self.transport.send(message).await?;
        Ok(())
    }
}
