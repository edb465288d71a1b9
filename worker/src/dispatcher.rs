//! The webhook dispatcher (`spool-dispatcher`): sends the deliveries that job status
//! changes queued in `webhook_deliveries` (see the webhooks migration), signed per
//! Standard Webhooks, retrying on a schedule that spans more than a day.
//!
//! Each delivery is leased (`locked_until`) while in flight, so a dispatcher killed
//! mid-delivery loses it to another (or to itself after a restart) once the lease ends;
//! `webhook-id` stays the same, so receivers can drop the rare duplicate. Concurrency is
//! bounded overall and per destination host, and a breaker per host skips a dead
//! endpoint instead of tying up slots waiting on it. The SSRF guard runs again here, on
//! the addresses the host resolves to now, and redirects are never followed.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use rand::Rng;
use reqwest::StatusCode;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, DbErr, Statement};
use spool_shared::breaker::{BreakerSettings, BreakerState, SharedBreaker};
use spool_shared::config::WebhookSettings;
use spool_shared::sealing::{SecretOwner, SecretSealer};
use spool_shared::ssrf::{TargetPolicy, is_forbidden};
use spool_shared::webhooks::{DELIVERIES_CHANNEL, signature};
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// How one attempt ended, from the receiver's answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Delivered,
    /// Try again later: after `after` when the receiver said so (429/503 `Retry-After`),
    /// else on the schedule.
    Retry {
        after: Option<Duration>,
    },
    /// 410 Gone: the receiver wants nothing more; its subscription is disabled.
    Gone,
}

/// 2xx delivers; 410 disables; 429/503 honour `Retry-After`; anything else (3xx, other
/// 4xx, 5xx) is a failure to retry on the schedule.
pub fn classify(status: StatusCode, retry_after: Option<&str>) -> Verdict {
    match status.as_u16() {
        200..=299 => Verdict::Delivered,
        410 => Verdict::Gone,
        429 | 503 => Verdict::Retry { after: retry_after.and_then(parse_retry_after) },
        _ => Verdict::Retry { after: None },
    }
}

/// `Retry-After` in seconds (the HTTP-date form is rare for webhooks and falls back to the
/// schedule), capped at a day.
fn parse_retry_after(value: &str) -> Option<Duration> {
    let seconds: u64 = value.trim().parse().ok()?;
    Some(Duration::from_secs(seconds.clamp(1, 86_400)))
}

/// When attempt `attempts + 1` should run, or `None` when the schedule is used up.
/// Jitter of ±10% keeps retries of many deliveries from arriving together.
pub fn next_delay(schedule: &[u64], attempts: i32, retry_after: Option<Duration>) -> Option<Duration> {
    let base = *schedule.get(usize::try_from(attempts - 1).ok()?)?;
    let jittered = Duration::from_secs(base).mul_f64(rand::rng().random_range(0.9..=1.1));
    Some(retry_after.unwrap_or(jittered))
}

/// A delivery this dispatcher leased.
struct Due {
    /// When this dispatcher's lease on the delivery began.
    leased_at: Instant,
    id: Uuid,
    url: String,
    body: String,
    attempts: i32,
    subscription_id: Option<Uuid>,
    secrets: Vec<String>,
}

/// A DNS resolver that drops forbidden addresses, so a host name that resolves (or was
/// rebound) to a private address cannot be reached; allowlisted hosts resolve as usual.
struct GuardedResolver {
    policy: TargetPolicy,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let host = name.as_str().to_owned();
        let allowed = self.policy.allows_host(&host);
        Box::pin(async move {
            let found: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let usable: Vec<SocketAddr> = found.into_iter().filter(|a| allowed || !is_forbidden(a.ip())).collect();
            if usable.is_empty() {
                return Err(format!("{host} resolves only to forbidden addresses").into());
            }
            Ok(Box::new(usable.into_iter()) as Addrs)
        })
    }
}

pub struct Dispatcher {
    db: DatabaseConnection,
    http: reqwest::Client,
    settings: WebhookSettings,
    policy: TargetPolicy,
    sealer: SecretSealer,
    overall: Arc<Semaphore>,
    destinations: Destinations,
}

/// Hosts kept track of before idle ones are forgotten: with one entry per host ever
/// seen, receivers on ever new subdomains would grow the table without end.
const DESTINATIONS_REMEMBERED: usize = 1024;

/// Per destination host: its delivery slots and its breaker.
struct Destinations {
    slots_per_host: usize,
    breaker: BreakerSettings,
    hosts: Mutex<HashMap<String, (Arc<Semaphore>, SharedBreaker)>>,
}

impl Destinations {
    fn new(slots_per_host: usize, breaker: BreakerSettings) -> Self {
        Self { slots_per_host: slots_per_host.max(1), breaker, hosts: Mutex::new(HashMap::new()) }
    }

    fn get(&self, host: &str) -> (Arc<Semaphore>, SharedBreaker) {
        let mut hosts = self.hosts.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if hosts.len() >= DESTINATIONS_REMEMBERED && !hosts.contains_key(host) {
            // Idle (nothing in flight) and closed: nothing worth keeping but a window of
            // recent outcomes. An open breaker is kept, or its host would be retried at once.
            hosts.retain(|_, (slots, breaker)| {
                slots.available_permits() < self.slots_per_host || breaker.state() != BreakerState::Closed
            });
        }
        hosts
            .entry(host.to_owned())
            .or_insert_with(|| (Arc::new(Semaphore::new(self.slots_per_host)), SharedBreaker::new(self.breaker)))
            .clone()
    }
}

impl Dispatcher {
    pub fn new(db: DatabaseConnection, settings: WebhookSettings) -> anyhow::Result<Arc<Self>> {
        let policy = TargetPolicy::new(&settings.allowed_hosts);
        let sealer = SecretSealer::new(&settings.sealing_keys).context("webhooks.sealing_keys")?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_millis(settings.request_timeout_ms))
            .connect_timeout(Duration::from_millis(settings.request_timeout_ms.min(5_000)))
            .redirect(reqwest::redirect::Policy::none())
            .dns_resolver(Arc::new(GuardedResolver { policy: policy.clone() }))
            .user_agent(concat!("Spool-Webhooks/", env!("CARGO_PKG_VERSION")))
            .build()?;
        let overall = Arc::new(Semaphore::new(settings.concurrency.max(1)));
        // At zero from the start, so alerts on their increase see the first one.
        for outcome in ["delivered", "gone", "failed"] {
            metrics::counter!("spool_webhook_attempts_total", "outcome" => outcome).increment(0);
        }
        let destinations = Destinations::new(settings.per_destination, settings.destination_breaker);
        Ok(Arc::new(Self { db, http, settings, policy, sealer, overall, destinations }))
    }

    /// Delivers until shutdown, then lets the deliveries in flight finish.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let wake = Arc::new(Notify::new());
        let listener = tokio::spawn(listen(self.db.clone(), Arc::clone(&wake), shutdown.clone()));
        let poll = Duration::from_millis(self.settings.poll_interval_ms.max(10));
        let mut in_flight = JoinSet::new();
        tracing::info!(concurrency = self.settings.concurrency, "dispatching webhooks");
        loop {
            while in_flight.try_join_next().is_some() {}
            let free = self.overall.available_permits();
            let mut claimed = 0;
            if free > 0 {
                match self.lease(free.min(256)).await {
                    Ok(due) => {
                        claimed = due.len();
                        for delivery in due {
                            let Ok(permit) = Arc::clone(&self.overall).acquire_owned().await else { break };
                            let dispatcher = Arc::clone(&self);
                            in_flight.spawn(async move {
                                dispatcher.deliver(delivery).await;
                                drop(permit);
                            });
                        }
                    }
                    Err(error) => tracing::error!(error.cause_chain = ?error, "cannot lease deliveries"),
                }
            }
            if claimed > 0 && claimed == free {
                continue; // more may be due
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = wake.notified() => {}
                _ = tokio::time::sleep(poll) => {}
                Some(_) = in_flight.join_next(), if free == 0 => {}
            }
        }
        listener.abort();
        while in_flight.join_next().await.is_some() {}
    }

    /// Leases up to `limit` due deliveries, counting the attempt.
    async fn lease(&self, limit: usize) -> Result<Vec<Due>, DbErr> {
        let leased_at = Instant::now();
        let rows = self
            .db
            .query_all_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                r#"UPDATE webhook_deliveries d
                      SET locked_until = now() + make_interval(secs => $2::double precision),
                          attempts = d.attempts + 1
                    WHERE d.id IN (SELECT id FROM webhook_deliveries
                                    WHERE status = 'pending' AND next_attempt_at <= now()
                                      AND (locked_until IS NULL OR locked_until < now())
                                    ORDER BY next_attempt_at LIMIT $1
                                      FOR UPDATE SKIP LOCKED)
                RETURNING d.id, d.url, d.payload::text AS body, d.attempts, d.subscription_id, d.owner_id,
                          CASE WHEN d.subscription_id IS NULL
                               THEN (SELECT array_remove(ARRAY[u.webhook_secret] ||
                                                CASE WHEN u.previous_webhook_secret_expires_at > now()
                                                     THEN ARRAY[u.previous_webhook_secret]
                                                     ELSE ARRAY[]::text[] END, NULL)
                                       FROM users u WHERE u.id = d.owner_id)
                               ELSE (SELECT ARRAY[s.secret] || CASE WHEN s.previous_secret_expires_at > now()
                                                                    THEN ARRAY[s.previous_secret]
                                                                    ELSE ARRAY[]::text[] END
                                       FROM webhook_subscriptions s WHERE s.id = d.subscription_id)
                          END AS secrets"#,
                [(limit as i64).into(), (self.settings.lease_ms as f64 / 1000.0).into()],
            ))
            .await?;
        rows.into_iter()
            .map(|row| {
                let id = row.try_get("", "id")?;
                let subscription_id: Option<Uuid> = row.try_get("", "subscription_id")?;
                let owner = match subscription_id {
                    Some(subscription) => SecretOwner::Subscription(subscription),
                    None => SecretOwner::Account(row.try_get("", "owner_id")?),
                };
                let sealed = row.try_get::<Option<Vec<String>>>("", "secrets")?.unwrap_or_default();
                Ok(Due {
                    leased_at,
                    id,
                    url: row.try_get("", "url")?,
                    body: row.try_get("", "body")?,
                    attempts: row.try_get("", "attempts")?,
                    subscription_id,
                    secrets: self.open_secrets(id, &sealed, owner),
                })
            })
            .collect()
    }

    /// The secrets that open; one that does not is logged and left out. With none left the
    /// delivery is not sent: it retries, logged as `no signing secret`, and ends failed.
    fn open_secrets(&self, delivery_id: Uuid, sealed: &[String], owner: SecretOwner) -> Vec<String> {
        sealed
            .iter()
            .filter_map(|stored| match self.sealer.open(stored, owner) {
                Ok(secret) => Some(secret),
                Err(error) => {
                    tracing::error!(%delivery_id, ?owner, %error, "cannot open a webhook secret");
                    None
                }
            })
            .collect()
    }

    /// How long a leased delivery may wait for its host's turn: its lease, less room for
    /// the request and for recording the result.
    fn slot_wait_limit(&self) -> Duration {
        Duration::from_millis(self.settings.lease_ms.saturating_sub(2 * self.settings.request_timeout_ms))
    }

    async fn deliver(&self, due: Due) {
        let host = match self.policy.parse(&due.url) {
            Ok(url) => url.host_str().unwrap_or_default().to_owned(),
            Err(error) => return self.finish(&due, Attempt::refused(error.to_string())).await,
        };
        let (slots, breaker) = self.destinations.get(&host);
        if let Some(wait) = breaker.with(|b| b.retry_after(Instant::now())) {
            return self.defer(&due, wait).await;
        }
        // Waiting for the host's turn past the lease would let the next lease send this
        // delivery a second time: a delivery that has waited too long lets its lease go.
        let turn_by = due.leased_at + self.slot_wait_limit();
        let _slot = match tokio::time::timeout_at(turn_by.into(), slots.acquire()).await {
            Ok(Ok(slot)) => slot,
            Ok(Err(_)) => return,
            Err(_) => return self.defer(&due, Duration::from_secs(1)).await,
        };
        if !breaker.with(|b| b.try_acquire(Instant::now())) {
            return self.defer(&due, Duration::from_secs(1)).await; // half-open: another request probes
        }
        let Some(signed) = signature_of(&due) else {
            return self.finish(&due, Attempt::refused("no signing secret".into())).await;
        };
        let started = Instant::now();
        let response = self
            .http
            .post(&due.url)
            .header("content-type", "application/json")
            .header("webhook-id", message_id(due.id))
            .header("webhook-timestamp", signed.0.to_string())
            .header("webhook-signature", signed.1)
            .body(due.body.clone())
            .send()
            .await;
        let latency = started.elapsed();
        let attempt = match response {
            Ok(response) => {
                let retry_after = response.headers().get("retry-after").and_then(|v| v.to_str().ok());
                let verdict = classify(response.status(), retry_after);
                // A host that answers at all is up; only 5xx and no answer count against it.
                breaker.with(|b| b.record(!response.status().is_server_error(), Instant::now()));
                Attempt { verdict, status_code: Some(response.status().as_u16()), error: None, latency }
            }
            Err(error) => {
                breaker.with(|b| b.record(false, Instant::now()));
                let error = if error.is_timeout() { "timeout".to_owned() } else { describe(&error) };
                Attempt { verdict: Verdict::Retry { after: None }, status_code: None, error: Some(error), latency }
            }
        };
        let outcome = match attempt.verdict {
            Verdict::Delivered => "delivered",
            Verdict::Gone => "gone",
            Verdict::Retry { .. } => "failed",
        };
        metrics::counter!("spool_webhook_attempts_total", "outcome" => outcome).increment(1);
        metrics::histogram!("spool_webhook_latency_seconds").record(latency.as_secs_f64());
        self.finish(&due, attempt).await;
    }

    /// Records the attempt: delivered, retried later, or failed for good.
    async fn finish(&self, due: &Due, attempt: Attempt) {
        let (status, next) = match &attempt.verdict {
            Verdict::Delivered => (DeliveryStatus::Succeeded, None),
            Verdict::Gone => (DeliveryStatus::Failed, None),
            Verdict::Retry { after } => match next_delay(&self.settings.retry_schedule_secs, due.attempts, *after) {
                Some(delay) => (DeliveryStatus::Pending, Some(delay)),
                None => (DeliveryStatus::Failed, None),
            },
        };
        let disable = attempt.verdict == Verdict::Gone;
        let statement = Statement::from_sql_and_values(
            DbBackend::Postgres,
            r#"WITH recorded AS (
                   UPDATE webhook_deliveries
                      SET status = $3, locked_until = NULL,
                          next_attempt_at = now() + make_interval(secs => COALESCE($4, 0)),
                          last_status_code = $5, last_error = $6, last_latency_ms = $7,
                          delivered_at = CASE WHEN $3 = 'succeeded' THEN now() END,
                          attempt_log = attempt_log || jsonb_build_array(jsonb_build_object(
                              'attempt', attempts, 'at', now(), 'status_code', $5, 'latency_ms', $7, 'error', $6))
                    WHERE id = $1 AND attempts = $2 AND status = 'pending'
                RETURNING subscription_id),
               disabled AS (
                   UPDATE webhook_subscriptions
                      SET disabled_at = now(), disabled_reason = 'the endpoint answered 410 Gone'
                    WHERE $8 AND id = (SELECT subscription_id FROM recorded) AND disabled_at IS NULL
                RETURNING id)
               UPDATE webhook_deliveries SET status = 'failed', last_error = 'subscription disabled (410 Gone)'
                WHERE subscription_id = (SELECT id FROM disabled) AND status = 'pending' AND id <> $1"#,
            [
                due.id.into(),
                due.attempts.into(),
                status.as_str().into(),
                next.map(|d| d.as_secs_f64()).into(),
                attempt.status_code.map(i32::from).into(),
                attempt.error.clone().into(),
                (attempt.latency.as_millis() as i32).into(),
                disable.into(),
            ],
        );
        if let Err(error) = self.db.execute_raw(statement).await {
            // The lease runs out and the delivery is attempted again: at least once.
            tracing::error!(error.cause_chain = ?error, delivery_id = %due.id, "cannot record a webhook attempt");
        }
        match status {
            DeliveryStatus::Succeeded => tracing::debug!(delivery_id = %due.id, "webhook delivered"),
            DeliveryStatus::Failed => {
                tracing::warn!(delivery_id = %due.id, attempts = due.attempts, ?attempt.status_code, "webhook delivery failed for good")
            }
            DeliveryStatus::Pending => {
                tracing::info!(delivery_id = %due.id, attempts = due.attempts, ?attempt.status_code, error = ?attempt.error, "webhook delivery will be retried")
            }
        }
        if disable && let Some(subscription) = due.subscription_id {
            tracing::warn!(%subscription, "webhook subscription disabled: its endpoint answered 410 Gone");
        }
    }

    /// Puts a delivery back untried, due again after `wait`, and gives back the attempt
    /// its lease counted: its destination's breaker is open, it waited too long for a
    /// slot to its host, or the half-open breaker's probe slots are all taken.
    async fn defer(&self, due: &Due, wait: Duration) {
        let statement = Statement::from_sql_and_values(
            DbBackend::Postgres,
            "UPDATE webhook_deliveries SET locked_until = NULL, attempts = attempts - 1, \
                    next_attempt_at = now() + make_interval(secs => $3) \
              WHERE id = $1 AND attempts = $2 AND status = 'pending'",
            [due.id.into(), due.attempts.into(), wait.as_secs_f64().into()],
        );
        if let Err(error) = self.db.execute_raw(statement).await {
            tracing::error!(error.cause_chain = ?error, delivery_id = %due.id, "cannot defer a webhook delivery");
        }
    }
}

/// A delivery's `status` after an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DeliveryStatus {
    Succeeded,
    /// Due again later, on the schedule or when the receiver asked.
    Pending,
    /// For good: the schedule is used up, or the receiver answered 410 Gone.
    Failed,
}

impl DeliveryStatus {
    fn as_str(self) -> &'static str {
        match self {
            Self::Succeeded => "succeeded",
            Self::Pending => "pending",
            Self::Failed => "failed",
        }
    }
}

struct Attempt {
    verdict: Verdict,
    status_code: Option<u16>,
    error: Option<String>,
    latency: Duration,
}

impl Attempt {
    /// Not sent at all (a target the guard refuses, no secret): retried on the schedule
    /// in case configuration or DNS changes, then failed.
    fn refused(error: String) -> Self {
        Self { verdict: Verdict::Retry { after: None }, status_code: None, error: Some(error), latency: Duration::ZERO }
    }
}

/// `msg_<uuid>`: the same for every attempt of one delivery.
pub fn message_id(delivery_id: Uuid) -> String {
    format!("msg_{}", delivery_id.simple())
}

/// (timestamp, `webhook-signature`) for the delivery, or `None` without a usable secret.
fn signature_of(due: &Due) -> Option<(i64, String)> {
    let timestamp = chrono::Utc::now().timestamp();
    let secrets: Vec<&str> = due.secrets.iter().map(String::as_str).collect();
    if secrets.is_empty() {
        return None;
    }
    signature(&secrets, &message_id(due.id), timestamp, due.body.as_bytes()).ok().map(|s| (timestamp, s))
}

/// The error and its causes (reqwest's own message is often just "error sending request").
fn describe(error: &reqwest::Error) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Wakes the dispatcher when deliveries are queued (and after a gap in listening).
async fn listen(db: DatabaseConnection, wake: Arc<Notify>, shutdown: CancellationToken) {
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = spool_shared::db::listen_forever(&db, DELIVERIES_CHANNEL, || wake.notify_one(), |_| wake.notify_one()) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_classified_as_the_spec_says() {
        assert_eq!(classify(StatusCode::OK, None), Verdict::Delivered);
        assert_eq!(classify(StatusCode::NO_CONTENT, None), Verdict::Delivered);
        assert_eq!(classify(StatusCode::GONE, None), Verdict::Gone);
        assert_eq!(classify(StatusCode::FOUND, None), Verdict::Retry { after: None }, "redirects are failures");
        assert_eq!(classify(StatusCode::BAD_REQUEST, None), Verdict::Retry { after: None });
        assert_eq!(classify(StatusCode::INTERNAL_SERVER_ERROR, None), Verdict::Retry { after: None });
        assert_eq!(
            classify(StatusCode::TOO_MANY_REQUESTS, Some("120")),
            Verdict::Retry { after: Some(Duration::from_secs(120)) }
        );
        assert_eq!(
            classify(StatusCode::SERVICE_UNAVAILABLE, Some("999999")),
            Verdict::Retry { after: Some(Duration::from_secs(86_400)) },
            "capped at a day"
        );
        assert_eq!(classify(StatusCode::TOO_MANY_REQUESTS, Some("soon")), Verdict::Retry { after: None });
    }

    #[test]
    fn idle_destinations_are_forgotten_once_the_table_is_full_and_busy_or_open_ones_kept() {
        let destinations = Destinations::new(2, BreakerSettings { min_calls: 1, ..Default::default() });
        let (busy_slots, _) = destinations.get("busy.example");
        let _in_flight = busy_slots.try_acquire().unwrap();
        let (_, failing) = destinations.get("down.example");
        failing.with(|b| b.record(false, Instant::now()));
        assert_eq!(failing.state(), BreakerState::Open);
        for i in 0..DESTINATIONS_REMEMBERED - 2 {
            destinations.get(&format!("idle-{i}.example"));
        }
        let table = |d: &Destinations| d.hosts.lock().unwrap().len();
        assert_eq!(table(&destinations), DESTINATIONS_REMEMBERED);
        destinations.get("new.example");
        assert_eq!(table(&destinations), 3, "busy, open and the new host");
        let (slots, _) = destinations.get("busy.example");
        assert_eq!(slots.available_permits(), 1, "the same entry, its delivery still counted");
    }

    #[test]
    fn the_schedule_runs_out_and_jitter_stays_within_ten_percent() {
        let schedule = [5, 300];
        for _ in 0..100 {
            let first = next_delay(&schedule, 1, None).unwrap().as_secs_f64();
            assert!((4.5..=5.5).contains(&first), "{first}");
        }
        assert!(next_delay(&schedule, 2, None).is_some());
        assert_eq!(next_delay(&schedule, 3, None), None, "after the last retry: failed");
        let told = next_delay(&schedule, 1, Some(Duration::from_secs(60))).unwrap();
        assert_eq!(told, Duration::from_secs(60), "Retry-After wins");
    }
}
