//! Webhook rules: account subscriptions, their secrets and delivery logs, per-job webhook
//! targets. Deliveries themselves are queued by a trigger on `jobs` and sent by the
//! dispatcher (worker crate); here they are only listed and re-queued. Secrets are stored
//! sealed (`spool_shared::sealing`) and shown to their owner in clear only when made.

use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, FromQueryResult, Statement};
use spool_shared::sealing::{SecretOwner, SecretSealer};
use spool_shared::ssrf::{TargetError, TargetPolicy};
use spool_shared::webhooks::{DELIVERIES_CHANNEL, JOB_EVENTS, new_secret};
use uuid::Uuid;

use crate::auth::{Principal, Scope};
use crate::error::{ApiError, FieldError};
use crate::jobs::{JobWebhook, WebhookRequest};
use crate::state::AppState;

/// How long a rotated-out secret still signs, beside the new one, while receivers switch.
const PREVIOUS_SECRET_LIFETIME: &str = "24 hours";

/// Most subscriptions one account may have.
const MAX_SUBSCRIPTIONS: i64 = 50;

/// Checks a webhook URL for a subscription or a job: its shape, and the addresses its host
/// resolves to now (the dispatcher checks again at delivery time).
pub async fn check_url(policy: &TargetPolicy, url: &str, pointer: &str) -> Result<String, ApiError> {
    let detail = match policy.check(url).await {
        Ok(parsed) => return Ok(parsed.to_string()),
        Err(TargetError::Forbidden(host)) => format!("{host} is a private, loopback, link-local or reserved address"),
        Err(error) => error.to_string(),
    };
    Err(ApiError::InvalidInput(vec![FieldError { pointer: pointer.into(), detail }]))
}

/// Checks that `events` is a non-empty list of names from `allowed`, without repeats.
pub fn check_events(events: &[String], allowed: &[&str], pointer: &str) -> Result<Vec<String>, ApiError> {
    let invalid = |detail: String| ApiError::InvalidInput(vec![FieldError { pointer: pointer.into(), detail }]);
    if events.is_empty() {
        return Err(invalid(format!("give at least one of {}", allowed.join(", "))));
    }
    let mut unique: Vec<String> = Vec::with_capacity(events.len());
    for event in events {
        if !allowed.contains(&event.as_str()) {
            return Err(invalid(format!("unknown event {event:?}; expected one of {}", allowed.join(", "))));
        }
        if !unique.contains(event) {
            unique.push(event.clone());
        }
    }
    Ok(unique)
}

#[derive(FromQueryResult)]
pub struct Subscription {
    pub id: Uuid,
    pub url: String,
    pub events: Vec<String>,
    pub description: String,
    pub disabled_at: Option<DateTime<Utc>>,
    pub disabled_reason: Option<String>,
    pub created_at: DateTime<Utc>,
}

const SUBSCRIPTION_COLUMNS: &str = "id, url, events, description, disabled_at, disabled_reason, created_at";

/// Creates a subscription; returns it with its signing secret (shown this once).
pub async fn create(
    db: &DatabaseConnection,
    sealer: &SecretSealer,
    owner_id: Uuid,
    url: String,
    events: Vec<String>,
    description: String,
) -> Result<(Subscription, String), ApiError> {
    let id = Uuid::now_v7();
    let secret = new_secret();
    let sealed = sealer.seal(&secret, SecretOwner::Subscription(id))?;
    let subscription = Subscription::find_by_statement(Statement::from_sql_and_values(
        DbBackend::Postgres,
        format!(
            "INSERT INTO webhook_subscriptions (id, owner_id, url, events, description, secret) \
                 SELECT $1, $2, $3, $4, $5, $6 \
                  WHERE (SELECT count(*) FROM webhook_subscriptions WHERE owner_id = $2) < $7 \
                 RETURNING {SUBSCRIPTION_COLUMNS}"
        ),
        [
            id.into(),
            owner_id.into(),
            url.into(),
            events.into(),
            description.into(),
            sealed.into(),
            MAX_SUBSCRIPTIONS.into(),
        ],
    ))
    .one(db)
    .await?
    .ok_or(ApiError::LimitReached { what: "webhook subscriptions", max: MAX_SUBSCRIPTIONS })?;
    Ok((subscription, secret))
}

pub async fn list(db: &DatabaseConnection, owner_id: Uuid) -> Result<Vec<Subscription>, ApiError> {
    Ok(Subscription::find_by_statement(Statement::from_sql_and_values(
        DbBackend::Postgres,
        format!("SELECT {SUBSCRIPTION_COLUMNS} FROM webhook_subscriptions WHERE owner_id = $1 ORDER BY id"),
        [owner_id.into()],
    ))
    .all(db)
    .await?)
}

/// The caller's subscription, or `WebhookNotFound` (also when it is someone else's).
pub async fn get(db: &DatabaseConnection, owner_id: Uuid, id: Uuid) -> Result<Subscription, ApiError> {
    Subscription::find_by_statement(Statement::from_sql_and_values(
        DbBackend::Postgres,
        format!("SELECT {SUBSCRIPTION_COLUMNS} FROM webhook_subscriptions WHERE id = $1 AND owner_id = $2"),
        [id.into(), owner_id.into()],
    ))
    .one(db)
    .await?
    .ok_or(ApiError::WebhookNotFound)
}

/// What `PATCH /v1/webhooks/{id}` changes; `None` leaves a field as it is.
#[derive(Default)]
pub struct Changes {
    pub url: Option<String>,
    pub events: Option<Vec<String>>,
    pub description: Option<String>,
    /// `true` re-enables a subscription (one disabled by a `410 Gone`, say); `false`
    /// stops its deliveries until it is enabled again.
    pub enabled: Option<bool>,
}

/// Changes a subscription in place, keeping its id, secret and delivery log.
pub async fn update(
    db: &DatabaseConnection,
    owner_id: Uuid,
    id: Uuid,
    changes: Changes,
) -> Result<Subscription, ApiError> {
    Subscription::find_by_statement(Statement::from_sql_and_values(
        DbBackend::Postgres,
        format!(
            "UPDATE webhook_subscriptions
                SET url = coalesce($3, url),
                    events = coalesce($4::text[], events),
                    description = coalesce($5, description),
                    disabled_at = CASE WHEN $6 IS NULL THEN disabled_at
                                       WHEN $6 THEN NULL ELSE coalesce(disabled_at, now()) END,
                    disabled_reason = CASE WHEN $6 IS NULL THEN disabled_reason
                                           WHEN $6 THEN NULL ELSE coalesce(disabled_reason, 'disabled by its owner') END
              WHERE id = $1 AND owner_id = $2
          RETURNING {SUBSCRIPTION_COLUMNS}"
        ),
        [
            id.into(),
            owner_id.into(),
            changes.url.into(),
            changes.events.into(),
            changes.description.into(),
            changes.enabled.into(),
        ],
    ))
    .one(db)
    .await?
    .ok_or(ApiError::WebhookNotFound)
}

/// Deletes a subscription and its delivery log.
pub async fn delete(db: &DatabaseConnection, owner_id: Uuid, id: Uuid) -> Result<(), ApiError> {
    let result = db
        .execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "DELETE FROM webhook_subscriptions WHERE id = $1 AND owner_id = $2",
            [id.into(), owner_id.into()],
        ))
        .await?;
    if result.rows_affected() == 0 {
        return Err(ApiError::WebhookNotFound);
    }
    Ok(())
}

/// A new secret; the old one keeps signing (alongside) for 24 hours so receivers can
/// switch without missing a delivery.
pub async fn rotate_secret(
    db: &DatabaseConnection,
    sealer: &SecretSealer,
    owner_id: Uuid,
    id: Uuid,
) -> Result<String, ApiError> {
    let secret = new_secret();
    let sealed = sealer.seal(&secret, SecretOwner::Subscription(id))?;
    let result = db
        .execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "UPDATE webhook_subscriptions \
                SET previous_secret = secret, previous_secret_expires_at = now() + $4::interval, secret = $3 \
              WHERE id = $1 AND owner_id = $2",
            [id.into(), owner_id.into(), sealed.into(), PREVIOUS_SECRET_LIFETIME.into()],
        ))
        .await?;
    if result.rows_affected() == 0 {
        return Err(ApiError::WebhookNotFound);
    }
    Ok(secret)
}

/// Queues a `webhook.test` event to the subscription; returns the delivery's id.
pub async fn send_test(db: &DatabaseConnection, owner_id: Uuid, id: Uuid) -> Result<Uuid, ApiError> {
    let delivery_id = Uuid::now_v7();
    let row = db
        .query_one_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "WITH queued AS (
                 INSERT INTO webhook_deliveries (id, owner_id, subscription_id, url, event_type, payload)
                 SELECT $1, owner_id, id, url, 'webhook.test',
                        jsonb_build_object('type', 'webhook.test', 'timestamp', now(),
                                           'data', jsonb_build_object('subscription_id', id))
                   FROM webhook_subscriptions WHERE id = $2 AND owner_id = $3 AND disabled_at IS NULL
                 RETURNING id)
             SELECT id, pg_notify($4, '') FROM queued",
            [delivery_id.into(), id.into(), owner_id.into(), DELIVERIES_CHANNEL.into()],
        ))
        .await?;
    if row.is_none() {
        get(db, owner_id, id).await?; // 404 when there is no such subscription
        return Err(ApiError::WebhookDisabled);
    }
    Ok(delivery_id)
}

#[derive(FromQueryResult)]
pub struct Delivery {
    pub id: Uuid,
    pub subscription_id: Option<Uuid>,
    pub job_id: Option<Uuid>,
    pub event_type: String,
    pub status: String,
    pub attempts: i32,
    pub last_status_code: Option<i32>,
    pub last_error: Option<String>,
    pub last_latency_ms: Option<i32>,
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub attempt_log: serde_json::Value,
    pub created_at: DateTime<Utc>,
    pub delivered_at: Option<DateTime<Utc>>,
}

const DELIVERY_COLUMNS: &str = "id, subscription_id, job_id, event_type, status, attempts, last_status_code, \
     last_error, last_latency_ms, CASE WHEN status = 'pending' THEN next_attempt_at END AS next_attempt_at, \
     attempt_log, created_at, delivered_at";

/// A subscription's deliveries, newest first (`limit` 1–500).
pub async fn deliveries(
    db: &DatabaseConnection,
    owner_id: Uuid,
    subscription_id: Uuid,
    limit: u64,
) -> Result<Vec<Delivery>, ApiError> {
    get(db, owner_id, subscription_id).await?;
    Ok(Delivery::find_by_statement(Statement::from_sql_and_values(
        DbBackend::Postgres,
        format!(
            "SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries WHERE subscription_id = $1 AND owner_id = $2
              ORDER BY created_at DESC LIMIT $3"
        ),
        [subscription_id.into(), owner_id.into(), (limit as i64).into()],
    ))
    .all(db)
    .await?)
}

/// Every delivery about one of the caller's jobs (to its per-job webhook and to the
/// account's subscriptions), newest first; `JobNotFound` for someone else's job.
pub async fn deliveries_of_job(
    db: &DatabaseConnection,
    owner_id: Uuid,
    job_id: Uuid,
) -> Result<Vec<Delivery>, ApiError> {
    crate::jobs::find(db, owner_id, job_id).await?;
    Ok(Delivery::find_by_statement(Statement::from_sql_and_values(
        DbBackend::Postgres,
        // A job has a few events, each to at most MAX_SUBSCRIPTIONS + 1 targets.
        format!(
            "SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries WHERE job_id = $1 AND owner_id = $2
              ORDER BY created_at DESC LIMIT 500"
        ),
        [job_id.into(), owner_id.into()],
    ))
    .all(db)
    .await?)
}

/// Sends a delivery again now (whatever its status), with the same `webhook-id`. One to a
/// subscription takes the `webhooks` scope; one to a job's own webhook, `jobs:write`, the
/// scope that set the webhook.
pub async fn redeliver(db: &DatabaseConnection, caller: &Principal, delivery_id: Uuid) -> Result<(), ApiError> {
    let owner_id = caller.user_id;
    let target = db
        .query_one_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT subscription_id FROM webhook_deliveries WHERE id = $1 AND owner_id = $2",
            [delivery_id.into(), owner_id.into()],
        ))
        .await?
        .ok_or(ApiError::DeliveryNotFound)?;
    let subscription: Option<Uuid> = target.try_get("", "subscription_id")?;
    caller.require_api(if subscription.is_some() { Scope::Webhooks } else { Scope::JobsWrite })?;
    let row = db
        .query_one_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "WITH again AS (
                 UPDATE webhook_deliveries SET status = 'pending', next_attempt_at = now(), locked_until = NULL
                  WHERE id = $1 AND owner_id = $2 RETURNING id)
             SELECT id, pg_notify($3, '') FROM again",
            [delivery_id.into(), owner_id.into(), DELIVERIES_CHANNEL.into()],
        ))
        .await?;
    row.map(|_| ()).ok_or(ApiError::DeliveryNotFound)
}

/// A job's own webhook (`webhook` on a job or batch), if it asked for one: checked, with a
/// secret to sign it. `events` defaults to `["completed"]`.
pub async fn job_target(
    state: &AppState,
    owner_id: Uuid,
    requested: Option<WebhookRequest>,
) -> Result<Option<JobWebhook>, ApiError> {
    let Some(WebhookRequest { url, events }) = requested else { return Ok(None) };
    let policy = TargetPolicy::new(&state.settings.webhooks.allowed_hosts);
    let url = check_url(&policy, &url, "/webhook").await?;
    let events = check_events(&events.unwrap_or_else(|| vec!["completed".into()]), JOB_EVENTS, "/webhook_events")?;
    ensure_job_secret(&state.db, &state.sealer, owner_id).await?;
    Ok(Some(JobWebhook { url, events }))
}

/// Gives the account a secret for per-job webhooks if it has none yet (every submission
/// with a webhook comes here: one conditional write, nothing read back or opened).
pub async fn ensure_job_secret(db: &DatabaseConnection, sealer: &SecretSealer, owner_id: Uuid) -> Result<(), ApiError> {
    let sealed = sealer.seal(&new_secret(), SecretOwner::Account(owner_id))?;
    db.execute_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "UPDATE users SET webhook_secret = $2 WHERE id = $1 AND webhook_secret IS NULL",
        [owner_id.into(), sealed.into()],
    ))
    .await?;
    Ok(())
}

/// The account's secret for per-job webhooks, created on first use.
pub async fn job_secret(db: &DatabaseConnection, sealer: &SecretSealer, owner_id: Uuid) -> Result<String, ApiError> {
    ensure_job_secret(db, sealer, owner_id).await?;
    let row = db
        .query_one_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT webhook_secret FROM users WHERE id = $1",
            [owner_id.into()],
        ))
        .await?
        .ok_or_else(|| ApiError::Unexpected(anyhow::anyhow!("the caller's account is missing")))?;
    let stored: String = row.try_get("", "webhook_secret")?;
    Ok(sealer.open(&stored, SecretOwner::Account(owner_id))?)
}

/// A new secret for the account's per-job webhooks; the old one keeps signing
/// (alongside) for 24 hours, as for subscriptions.
pub async fn rotate_job_secret(
    db: &DatabaseConnection,
    sealer: &SecretSealer,
    owner_id: Uuid,
) -> Result<String, ApiError> {
    let secret = new_secret();
    let sealed = sealer.seal(&secret, SecretOwner::Account(owner_id))?;
    db.execute_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "UPDATE users SET previous_webhook_secret = webhook_secret,
                          previous_webhook_secret_expires_at = now() + $3::interval,
                          webhook_secret = $2
          WHERE id = $1",
        [owner_id.into(), sealed.into(), PREVIOUS_SECRET_LIFETIME.into()],
    ))
    .await?;
    Ok(secret)
}

/// Seals anew every secret stored in clear (from before sealing existed) or sealed with a
/// key that is no longer the first of `webhooks.sealing_keys`; run at start, so a sealing
/// key rotates by putting the new one first and restarting. Each row is updated only if it
/// still holds the value read.
pub async fn reseal_stored_secrets(db: &DatabaseConnection, sealer: &SecretSealer) -> Result<(), ApiError> {
    let suffix = sealer.current_suffix();
    let stale = db
        .query_all_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT 'secret' AS kind, id, secret AS value
               FROM webhook_subscriptions WHERE right(secret, $2) <> $1
             UNION ALL
             SELECT 'previous_secret', id, previous_secret
               FROM webhook_subscriptions WHERE right(previous_secret, $2) <> $1
             UNION ALL
             SELECT 'account', id, webhook_secret FROM users WHERE right(webhook_secret, $2) <> $1
             UNION ALL
             SELECT 'previous_account', id, previous_webhook_secret
               FROM users WHERE right(previous_webhook_secret, $2) <> $1",
            [suffix.clone().into(), (suffix.len() as i32).into()],
        ))
        .await?;
    let mut resealed = 0;
    for row in &stale {
        let (kind, id, value): (String, Uuid, String) =
            (row.try_get("", "kind")?, row.try_get("", "id")?, row.try_get("", "value")?);
        let (table, column, owner) = match kind.as_str() {
            "account" => ("users", "webhook_secret", SecretOwner::Account(id)),
            "previous_account" => ("users", "previous_webhook_secret", SecretOwner::Account(id)),
            "previous_secret" => ("webhook_subscriptions", "previous_secret", SecretOwner::Subscription(id)),
            _ => ("webhook_subscriptions", "secret", SecretOwner::Subscription(id)),
        };
        let secret = match sealer.open(&value, owner) {
            Ok(secret) => secret,
            Err(error) => {
                tracing::error!(%id, column, %error, "cannot reseal a webhook secret; it stays as it is");
                continue;
            }
        };
        db.execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            format!("UPDATE {table} SET {column} = $3 WHERE id = $1 AND {column} = $2"),
            [id.into(), value.into(), sealer.seal(&secret, owner)?.into()],
        ))
        .await?;
        resealed += 1;
    }
    if resealed > 0 {
        tracing::info!(secrets = resealed, "sealed webhook secrets stored in clear or under an older key");
    }
    Ok(())
}
