//! The account's per-job webhook secret rotates like a subscription's: the previous one
//! keeps signing, alongside the new one, for 24 hours.

sql_migration!(
    "ALTER TABLE users ADD COLUMN previous_webhook_secret text,
                      ADD COLUMN previous_webhook_secret_expires_at timestamptz"
);
