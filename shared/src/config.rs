//! One typed configuration tree, layered: defaults → optional TOML file → environment.
//!
//! The file is `$SPOOL_CONFIG` if set, else `spool.toml` in the working directory when it
//! exists. Environment variables `SPOOL_<SECTION>__<KEY>` override single values (for
//! example `SPOOL_API__BIND=0.0.0.0:8080`); `DATABASE_URL`, `AMQP_URL`, `REDIS_URL` and `SMTP_URL`
//! keep their usual names.

use std::path::PathBuf;

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use secrecy::SecretString;
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Settings {
    /// PostgreSQL connection string (may hold a password: never logged).
    pub database_url: SecretString,
    /// RabbitMQ connection string (may hold a password: never logged).
    pub amqp_url: SecretString,
    /// Redis connection string.
    pub redis_url: SecretString,
    /// Prefix of every Redis key (caches, rate-limit buckets, login throttling). Tests use
    /// a fresh one each.
    pub redis_prefix: String,
    /// SMTP server for account mails, e.g. `smtp://127.0.0.1:1025` (plain) or
    /// `smtps://user:pass@host` (TLS). May hold a password: never logged.
    pub smtp_url: SecretString,
    /// Folder holding `manifest.toml` and the model artifacts it names.
    pub models_dir: PathBuf,
    pub database: DatabaseSettings,
    pub amqp: AmqpSettings,
    pub api: ApiSettings,
    pub auth: AuthSettings,
    pub worker: WorkerSettings,
    pub rate_limit: RateLimitSettings,
    pub webhooks: WebhookSettings,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            database_url: SecretString::from("postgres://postgres:postgres@127.0.0.1:5432/spool"),
            amqp_url: SecretString::from("amqp://guest:guest@127.0.0.1:5672/%2f"),
            redis_url: SecretString::from("redis://127.0.0.1:6379"),
            smtp_url: SecretString::from("smtp://127.0.0.1:1025"),
            redis_prefix: "spool".into(),
            models_dir: PathBuf::from("models"),
            database: DatabaseSettings::default(),
            amqp: AmqpSettings::default(),
            api: ApiSettings::default(),
            auth: AuthSettings::default(),
            worker: WorkerSettings::default(),
            rate_limit: RateLimitSettings::default(),
            webhooks: WebhookSettings::default(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct DatabaseSettings {
    /// Pool size. More connections help until PostgreSQL's own CPU is the limit;
    /// on a 2-core machine a handful is enough.
    pub max_connections: u32,
    /// How long a request waits for a free connection before failing.
    pub acquire_timeout_ms: u64,
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        Self { max_connections: 16, acquire_timeout_ms: 5_000 }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct AmqpSettings {
    /// Prefix of every exchange and queue name (`spool` gives `spool.jobs`). Tests use
    /// a fresh prefix each so they never see each other's messages.
    pub prefix: String,
    /// Optional `x-expires` on the queues, in milliseconds: unused queues are deleted by
    /// the broker. Only tests set it; production queues live forever.
    pub queue_expires_ms: Option<u32>,
    /// Delays of the retry tiers (`spool.retry.<delay>` queues), in milliseconds. Attempt
    /// n waits in tier n-1; the last tier repeats. Longer tiers ride out longer outages.
    pub retry_tiers_ms: Vec<u64>,
}

impl Default for AmqpSettings {
    fn default() -> Self {
        Self { prefix: "spool".into(), queue_expires_ms: None, retry_tiers_ms: vec![1_000, 5_000, 30_000, 120_000] }
    }
}

impl AmqpSettings {
    pub fn retry_tiers(&self) -> Vec<std::time::Duration> {
        self.retry_tiers_ms.iter().map(|ms| std::time::Duration::from_millis(*ms)).collect()
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct ApiSettings {
    /// Address the HTTP server listens on; port 0 picks a free port (tests).
    pub bind: String,
    /// Largest request body accepted, in bytes.
    pub max_body_bytes: usize,
    /// Longest `Prefer: wait=N` / `?wait=N` honoured, in seconds.
    pub max_wait_secs: u64,
    /// How often the outbox relay looks for committed jobs that were never published.
    pub outbox_interval_ms: u64,
    /// A job is only re-published by the relay once it is this old, so that the request
    /// that created it has had its chance to publish it first.
    pub outbox_grace_ms: u64,
    /// Most items one `POST /v1/batches` may carry.
    pub max_batch_items: usize,
    /// Largest `POST /v1/batches` body, in bytes (other requests: `max_body_bytes`).
    pub max_batch_bytes: usize,
}

impl Default for ApiSettings {
    fn default() -> Self {
        Self {
            bind: "127.0.0.1:8080".into(),
            max_body_bytes: 1024 * 1024,
            max_wait_secs: 60,
            outbox_interval_ms: 1_000,
            outbox_grace_ms: 5_000,
            max_batch_items: 10_000,
            max_batch_bytes: 50 * 1024 * 1024,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct AuthSettings {
    /// Public keys that verify tokens, as PASERK `k4.public.…` strings. Several may be
    /// active at once so that signing keys can rotate; the token footer's `kid` picks one.
    pub public_keys: Vec<String>,
    /// Secret key (PASERK `k4.secret.…`) that signs session and API tokens: the API does
    /// not start without it, and `spoolctl token mint` signs with it too. Its public half
    /// belongs in `public_keys`. Never logged.
    pub secret_key: Option<SecretString>,
    /// Issuer written into and required from every token.
    pub issuer: String,
    /// Lifetime of the session tokens `POST /v1/auth/login` returns.
    pub session_ttl_secs: u64,
    /// Whether users may create API tokens that never expire.
    pub allow_never_expiring_tokens: bool,
    /// Base URL put in verification and reset mails.
    pub public_base_url: String,
    /// Sender of account mails.
    pub mail_from: String,
    /// How long a token's revocation state may be served from Redis before PostgreSQL is
    /// asked again. Revocations overwrite the cache at once; this bounds staleness only
    /// when Redis was unreachable during a revocation.
    pub token_cache_secs: u64,
    /// Failed logins per account (and, ×4, per IP) within `login_window_secs` before the
    /// account (or IP) is locked out until the window expires.
    pub max_failed_logins: u32,
    pub login_window_secs: u64,
}

impl Default for AuthSettings {
    fn default() -> Self {
        Self {
            public_keys: Vec::new(),
            secret_key: None,
            issuer: "spool".into(),
            session_ttl_secs: 15 * 60,
            allow_never_expiring_tokens: false,
            public_base_url: "http://127.0.0.1:8080".into(),
            mail_from: "Spool <no-reply@spool.localhost>".into(),
            token_cache_secs: 30,
            max_failed_logins: 5,
            login_window_secs: 15 * 60,
        }
    }
}

/// Request quotas, enforced with GCRA in Redis. `per_minute` is the sustained rate;
/// `burst` how many requests may come at once.
#[derive(Debug, Clone, Copy, Deserialize)]
pub struct Quota {
    pub per_minute: u32,
    pub burst: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct RateLimitSettings {
    /// Per token of a `user`.
    pub user: Quota,
    /// Per token of an `operator`.
    pub operator: Quota,
    /// Per client IP on the unauthenticated `/v1/auth/*` endpoints.
    pub auth_per_ip: Quota,
    /// Jobs an account may submit in batches (each item counts): a batch is one request
    /// to the quotas above, but up to `api.max_batch_items` jobs of work. A batch larger
    /// than `burst` takes the whole burst.
    pub batch_jobs: Quota,
}

impl Default for RateLimitSettings {
    fn default() -> Self {
        Self {
            user: Quota { per_minute: 6_000, burst: 200 },
            operator: Quota { per_minute: 30_000, burst: 1_000 },
            auth_per_ip: Quota { per_minute: 30, burst: 10 },
            batch_jobs: Quota { per_minute: 120_000, burst: 50_000 },
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct WorkerSettings {
    /// Models this worker serves; empty means every model in the manifest.
    pub models: Vec<String>,
    /// Identifier recorded on every job the worker runs; defaults to host name + pid.
    pub id: Option<String>,
    /// `auto` (CUDA when available, else CPU), `cpu` or `cuda`.
    pub device: String,
    /// Threads libtorch may use for one forward on the CPU. One (the default) keeps
    /// libtorch's idle threads from spin-waiting on cores the API, PostgreSQL and the
    /// other models need: that spinning was the whole p99 of a digits job at 50 jobs/s
    /// on 2 cores (24.9 ms; 10.0 ms with one thread). Raise it on a machine that runs
    /// one CPU model and little else.
    pub cpu_threads: usize,
    /// Batches a model may have in flight at once (one collecting or writing while
    /// another runs its forward). Two keeps the model busy; more only adds latency.
    pub batches_in_flight: usize,
    /// Overrides the manifest's `max_batch_size` for every model (benchmarks).
    pub max_batch_size: Option<usize>,
    /// Overrides the manifest's `max_batch_delay_ms` for every model (benchmarks).
    pub max_batch_delay_ms: Option<u64>,
    /// Longest a batch may take on its model thread, the wait behind the batches ahead of
    /// it included; past it the batch's jobs fail with a retryable `timeout` (libtorch
    /// cannot be interrupted: the late result is dropped).
    pub execution_timeout_ms: u64,
    /// Attempts a job gets before a retryable failure dead-letters it (a model's
    /// `max_attempts` in the manifest overrides it).
    pub max_attempts: u32,
    /// The breaker around each model's runtime: when it opens, the worker stops taking
    /// that model's jobs (they wait in the queue for healthy workers) until a probe works.
    pub model_breaker: crate::breaker::BreakerSettings,
    /// The breaker around PostgreSQL writes: when it opens, the worker takes no new jobs
    /// and holds the ones in hand (unacked) until a probe write succeeds.
    pub database_breaker: crate::breaker::BreakerSettings,
    /// Where the worker serves Prometheus metrics (`/metrics` on any path); `None` turns
    /// the endpoint off.
    pub metrics_bind: Option<String>,
    /// How often the worker announces itself (and its breakers) in Redis; the API treats
    /// a worker silent for [`MISSED_BEATS_BEFORE_GONE`](crate::heartbeat::MISSED_BEATS_BEFORE_GONE)
    /// (5) intervals as gone.
    pub heartbeat_interval_ms: u64,
    /// Fault injection for tests and drills: inputs whose JSON contains this string fail
    /// with a retryable runtime error, as a broken model would. Never set in production.
    pub fail_marker: Option<String>,
}

impl Default for WorkerSettings {
    fn default() -> Self {
        Self {
            models: Vec::new(),
            id: None,
            device: "auto".into(),
            cpu_threads: 1,
            batches_in_flight: 2,
            max_batch_size: None,
            max_batch_delay_ms: None,
            max_attempts: 3,
            execution_timeout_ms: 60_000,
            model_breaker: crate::breaker::BreakerSettings::default(),
            // Failed writes are retried in place, so a few in a row are a real outage;
            // probe often, as PostgreSQL restarts take seconds.
            database_breaker: crate::breaker::BreakerSettings {
                failure_rate: 0.5,
                window: 10,
                min_calls: 4,
                open_for_ms: 3_000,
                probes: 1,
            },
            heartbeat_interval_ms: 2_000,
            metrics_bind: Some("127.0.0.1:9187".into()),
            fail_marker: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct WebhookSettings {
    /// Hosts (exactly as in the URL, e.g. `127.0.0.1` or `localhost`) that may be private
    /// addresses and plain http: local development and tests only. Empty in production.
    pub allowed_hosts: Vec<String>,
    /// Delay before each retry of a failed delivery (jitter ±10% is added); after the
    /// last one the delivery is `failed`. The default spans more than a day.
    pub retry_schedule_secs: Vec<u64>,
    /// Longest a receiver may take to answer.
    pub request_timeout_ms: u64,
    /// Deliveries in flight at once, overall and per destination host.
    pub concurrency: usize,
    pub per_destination: usize,
    /// How long a dispatcher holds a delivery it took; one that died mid-delivery loses
    /// it to another dispatcher after this.
    pub lease_ms: u64,
    /// How often the dispatcher looks for due deliveries (it is also woken by
    /// notifications when new ones are queued).
    pub poll_interval_ms: u64,
    /// The breaker per destination host: a dead endpoint is skipped, not waited on.
    pub destination_breaker: crate::breaker::BreakerSettings,
    /// Prometheus metrics of the dispatcher; `None` turns the endpoint off.
    pub metrics_bind: Option<String>,
    /// Keys that seal webhook signing secrets in PostgreSQL, as PASERK `k4.local.…`
    /// strings (`spoolctl keys generate` makes one). The first seals; all open. To rotate,
    /// put the new key first: the API seals every stored secret anew with it at start,
    /// after which the old key can go. The API and the dispatcher need the same list.
    /// Never logged.
    pub sealing_keys: Vec<SecretString>,
}

impl Default for WebhookSettings {
    fn default() -> Self {
        Self {
            allowed_hosts: Vec::new(),
            retry_schedule_secs: vec![5, 300, 1_800, 7_200, 18_000, 36_000, 50_400, 86_400],
            request_timeout_ms: 15_000,
            concurrency: 64,
            per_destination: 8,
            lease_ms: 60_000,
            poll_interval_ms: 1_000,
            destination_breaker: crate::breaker::BreakerSettings {
                failure_rate: 0.5,
                window: 10,
                min_calls: 5,
                open_for_ms: 30_000,
                probes: 1,
            },
            metrics_bind: Some("127.0.0.1:9188".into()),
            sealing_keys: Vec::new(),
        }
    }
}

impl Settings {
    /// Loads the layered configuration.
    pub fn load() -> Result<Self, Box<figment::Error>> {
        let file = std::env::var_os("SPOOL_CONFIG").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("spool.toml"));
        Figment::new()
            .merge(Toml::file(file))
            .merge(Env::prefixed("SPOOL_").split("__"))
            .merge(Env::raw().only(&["DATABASE_URL", "AMQP_URL", "REDIS_URL", "SMTP_URL"]).lowercase(true))
            .extract()
            .map_err(Box::new)
    }
}
