//! Test harness: start the real API and worker in-process against the real PostgreSQL,
//! RabbitMQ and Redis, each test with its own database and its own queue prefix.
//!
//! Service addresses come from `TEST_DATABASE_URL` (a server URL without database name,
//! default `postgres://postgres:postgres@127.0.0.1:5432`), `AMQP_URL` and `REDIS_URL`.
//! Set `TEST_LOG=1` to see the services' logs.
#![allow(clippy::unwrap_used)]

pub mod receiver;

use std::path::PathBuf;
use std::time::Duration;

use sea_orm::{ConnectionTrait, Database, DatabaseConnection};
use secrecy::SecretString;
use serde_json::Value;
use spool_api::auth::{self, Role, Scope, TokenGrant, TokenKind, TokenSigner};
use spool_api::identity::accounts::{self, Email};
use spool_api::identity::passwords::NewPassword;
use spool_api::identity::tokens::{self, TokenLifetime};
use spool_shared::Settings;
use spool_shared::sealing::generate_sealing_key;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub use reqwest::StatusCode;

/// What a test wants running.
#[derive(Clone)]
pub struct AppOptions {
    /// Models the in-process worker serves; empty starts no worker.
    pub worker_models: Vec<&'static str>,
    /// Overrides the broker address the API uses (e.g. a dead port, to test the outbox).
    pub api_amqp_url: Option<String>,
    /// Runs the webhook dispatcher too.
    pub dispatcher: bool,
}

impl Default for AppOptions {
    fn default() -> Self {
        Self { worker_models: vec!["digits-cnn"], api_amqp_url: None, dispatcher: false }
    }
}

pub struct TestApp {
    pub address: String,
    pub client: reqwest::Client,
    /// An API token of `user_id` with `jobs:read` and `jobs:write`.
    pub token: String,
    pub user_id: Uuid,
    pub secret_key: String,
    pub settings: Settings,
    pub db: DatabaseConnection,
    api_shutdown: CancellationToken,
    api_task: Option<JoinHandle<()>>,
    worker: Option<(CancellationToken, JoinHandle<()>)>,
    dispatcher: Option<(CancellationToken, JoinHandle<()>)>,
}

pub fn models_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models")
}

/// Base settings for one test: a fresh database and queue prefix, free port.
pub async fn test_settings() -> Settings {
    init_logging();
    let server =
        std::env::var("TEST_DATABASE_URL").unwrap_or_else(|_| "postgres://postgres:postgres@127.0.0.1:5432".into());
    let name = format!("spool_test_{}", Uuid::now_v7().simple());
    let admin = Database::connect(format!("{server}/postgres")).await.expect("PostgreSQL is reachable");
    admin.execute_unprepared(&format!("CREATE DATABASE {name}")).await.expect("create test database");
    admin.close().await.ok();

    let mut settings = Settings { database_url: SecretString::from(format!("{server}/{name}")), ..Default::default() };
    if let Ok(url) = std::env::var("AMQP_URL") {
        settings.amqp_url = SecretString::from(url);
    }
    if let Ok(url) = std::env::var("REDIS_URL") {
        settings.redis_url = SecretString::from(url);
    }
    if let Ok(url) = std::env::var("TEST_SMTP_URL") {
        settings.smtp_url = SecretString::from(url);
    }
    settings.database.max_connections = 8;
    settings.models_dir = models_dir();
    settings.amqp.prefix = format!("t{}", &Uuid::now_v7().simple().to_string()[20..]);
    settings.redis_prefix = format!("test:{}", settings.amqp.prefix);
    // Leftover test queues vanish on their own. Quorum queues are heavy for a 2-core
    // broker (a Raft group each): tests keep few (one retry tier) and drop them soon.
    settings.amqp.queue_expires_ms = Some(90_000);
    settings.amqp.retry_tiers_ms = vec![500];
    settings.api.bind = "127.0.0.1:0".into();
    settings.api.outbox_interval_ms = 200;
    settings.api.outbox_grace_ms = 500;
    settings.webhooks.allowed_hosts = vec!["127.0.0.1".into()];
    settings.webhooks.retry_schedule_secs = vec![1, 1, 1, 1];
    settings.webhooks.poll_interval_ms = 200;
    settings.webhooks.lease_ms = 2_000;
    settings.webhooks.metrics_bind = None;
    settings.webhooks.destination_breaker.open_for_ms = 1_000;
    settings.worker.id = Some(format!("test-worker-{}", &Uuid::now_v7().simple().to_string()[24..]));
    // Request quotas no test reaches unless it sets its own: a fast machine submits and
    // polls faster than the default refill (100 a second), which tests of other things
    // must not trip over. (The per-IP quota of /v1/auth and batch-job quotas stay.)
    settings.rate_limit.user = UNREACHABLE_QUOTA;
    settings.rate_limit.operator = UNREACHABLE_QUOTA;
    let (secret, public) = auth::generate_key_pair().unwrap();
    settings.auth.public_keys = vec![public];
    settings.auth.secret_key = Some(SecretString::from(secret));
    settings.webhooks.sealing_keys = vec![SecretString::from(generate_sealing_key().unwrap())];
    settings
}

/// The password of every account the harness creates.
pub const TEST_PASSWORD: &str = "correct-horse-staple-9";

pub struct OperatorTokens {
    pub api: String,
    pub session: String,
}

/// A request quota no test reaches.
const UNREACHABLE_QUOTA: spool_shared::config::Quota =
    spool_shared::config::Quota { per_minute: 1_000_000, burst: 100_000 };

/// Quotas no test reaches, the per-IP one of `/v1/auth` too, so that every request gets
/// to its handler rather than the rate limiter.
pub fn lift_rate_limits(settings: &mut Settings) {
    settings.rate_limit.user = UNREACHABLE_QUOTA;
    settings.rate_limit.operator = UNREACHABLE_QUOTA;
    settings.rate_limit.auth_per_ip = UNREACHABLE_QUOTA;
}

fn init_logging() {
    if std::env::var("TEST_LOG").is_ok() {
        spool_shared::telemetry::init("info");
    }
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(AppOptions::default()).await
}

pub async fn spawn_app_with(options: AppOptions) -> TestApp {
    let settings = test_settings().await;
    TestApp::start(settings, options).await
}

impl TestApp {
    pub async fn start(settings: Settings, options: AppOptions) -> Self {
        let mut api_settings = settings.clone();
        if let Some(url) = &options.api_amqp_url {
            api_settings.amqp_url = SecretString::from(url.clone());
        }
        let broker_reachable = options.api_amqp_url.is_none();
        let (address, api_shutdown, api_task) = start_api(api_settings).await;
        if broker_reachable {
            wait_ready(&address).await;
        }
        let db =
            Database::connect(secrecy::ExposeSecret::expose_secret(&settings.database_url).to_owned()).await.unwrap();
        let secret_key = secrecy::ExposeSecret::expose_secret(settings.auth.secret_key.as_ref().unwrap()).to_owned();
        let mut app = Self {
            address,
            client: reqwest::Client::new(),
            token: String::new(),
            user_id: Uuid::nil(),
            secret_key,
            settings,
            db,
            api_shutdown,
            api_task: Some(api_task),
            worker: None,
            dispatcher: None,
        };
        let (user_id, token) = app.new_user_with_token(&[Scope::JobsRead, Scope::JobsWrite]).await;
        app.user_id = user_id;
        app.token = token;
        if !options.worker_models.is_empty() {
            app.start_worker(&options.worker_models).await;
        }
        if options.dispatcher {
            app.start_dispatcher().await;
        }
        app
    }

    /// Starts an in-process webhook dispatcher.
    pub async fn start_dispatcher(&mut self) {
        let db = Database::connect(secrecy::ExposeSecret::expose_secret(&self.settings.database_url).to_owned())
            .await
            .unwrap();
        let dispatcher = spool_worker::dispatcher::Dispatcher::new(db, self.settings.webhooks.clone()).unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(dispatcher.run(shutdown.clone()));
        self.dispatcher = Some((shutdown, task));
    }

    /// Kills the dispatcher at once, mid-delivery if it is delivering (its leases stay
    /// taken until they run out), as a crash would.
    pub async fn kill_dispatcher(&mut self) {
        if let Some((_, task)) = self.dispatcher.take() {
            task.abort();
            let _ = task.await;
        }
    }

    /// A new verified account of `role`, with the password [`TEST_PASSWORD`]: its id and email.
    pub async fn new_account(&self, role: Role) -> (Uuid, String) {
        let email = format!("{role:?}-{}@example.com", Uuid::now_v7().simple()).to_lowercase();
        let password = NewPassword::parse(TEST_PASSWORD.into()).unwrap();
        let user =
            accounts::create_verified_user(&self.db, &Email::parse(&email).unwrap(), password, role).await.unwrap();
        (user.id, email)
    }

    /// A new verified user and an API token of theirs with `scopes`.
    pub async fn new_user_with_token(&self, scopes: &[Scope]) -> (Uuid, String) {
        let (user_id, _) = self.new_account(Role::User).await;
        (user_id, self.api_token(user_id, scopes, Duration::from_secs(3600)).await)
    }

    /// A new operator and an API token of theirs with the `admin` scope.
    pub async fn new_operator_token(&self) -> String {
        let (operator_id, _) = self.new_account(Role::Operator).await;
        self.api_token(operator_id, &[Scope::Admin, Scope::JobsRead], Duration::from_secs(3600)).await
    }

    /// A new operator holding every scope, with an API token and a session token (account
    /// and token management take a session): requests get past authorization.
    pub async fn new_operator_with_session(&self) -> OperatorTokens {
        let (operator_id, email) = self.new_account(Role::Operator).await;
        let api = self.api_token(operator_id, &Scope::ALL, Duration::from_secs(3600)).await;
        let login = serde_json::json!({"email": email, "password": TEST_PASSWORD});
        let session: Value =
            self.client.post(self.url("/v1/auth/login")).json(&login).send().await.unwrap().json().await.unwrap();
        OperatorTokens { api, session: session["token"].as_str().unwrap().to_owned() }
    }

    /// An API token of an existing user, recorded in `api_tokens`, expiring after `ttl`
    /// (shorter than the API allows, for expiry tests).
    pub async fn api_token(&self, user_id: Uuid, scopes: &[Scope], ttl: Duration) -> String {
        let signer = self.signer();
        let lifetime = TokenLifetime::parse("1h", false).unwrap();
        let issued = tokens::issue(&self.db, &signer, user_id, "test".into(), lifetime, scopes).await.unwrap();
        let grant = TokenGrant { user_id, kind: TokenKind::Api, token_id: issued.row.id, scopes, ttl: Some(ttl) };
        signer.sign(&grant).unwrap()
    }

    pub fn signer(&self) -> TokenSigner {
        TokenSigner::new(&self.secret_key, "spool").unwrap()
    }

    /// Starts an in-process worker serving `models`.
    pub async fn start_worker(&mut self, models: &[&str]) {
        let mut settings = self.settings.clone();
        settings.worker.models = models.iter().map(|m| (*m).to_owned()).collect();
        let worker = spool_worker::Application::build(settings).await.expect("worker starts");
        let shutdown = CancellationToken::new();
        let token = shutdown.clone();
        let task = tokio::spawn(async move {
            worker.run(token).await.expect("worker runs");
        });
        self.worker = Some((shutdown, task));
    }

    /// Stops the worker gracefully (finishes its batches) and waits for it.
    pub async fn stop_worker(&mut self) {
        if let Some((shutdown, task)) = self.worker.take() {
            shutdown.cancel();
            task.await.unwrap();
        }
    }

    /// Stops the API and waits for it, then starts a new one with `settings`.
    pub async fn restart_api(&mut self, settings: Settings) {
        self.stop_api().await;
        let (address, shutdown, task) = start_api(settings).await;
        self.address = address;
        self.api_shutdown = shutdown;
        self.api_task = Some(task);
    }

    pub async fn stop_api(&mut self) {
        self.api_shutdown.cancel();
        if let Some(task) = self.api_task.take() {
            task.await.unwrap();
        }
    }

    /// Stops the dispatcher, the worker and the API, and closes the test's own pool, so
    /// a process that starts one app after another (the benchmarks) does not use up
    /// PostgreSQL's connections.
    pub async fn stop(mut self) {
        if let Some((shutdown, task)) = self.dispatcher.take() {
            shutdown.cancel();
            task.await.unwrap();
        }
        self.stop_worker().await;
        self.stop_api().await;
        let _ = self.db.close_by_ref().await;
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.address)
    }

    /// `GET path` with the test user's token; the JSON body (any status).
    pub async fn get_json(&self, path: &str) -> Value {
        self.get_json_as(path, &self.token).await
    }

    /// `GET path` with `token`; the JSON body (any status).
    pub async fn get_json_as(&self, path: &str, token: &str) -> Value {
        self.client.get(self.url(path)).bearer_auth(token).send().await.unwrap().json().await.unwrap()
    }

    /// `POST path` without a body, with the test user's token; the JSON body (any status).
    pub async fn post_json(&self, path: &str) -> Value {
        self.client.post(self.url(path)).bearer_auth(&self.token).send().await.unwrap().json().await.unwrap()
    }

    /// `method path` with `token` and an optional JSON body: the status and the JSON
    /// answer (`null` when there is none).
    pub async fn call(
        &self,
        token: &str,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut request = self.client.request(method, self.url(path)).bearer_auth(token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        (response.status(), response.json().await.unwrap_or(Value::Null))
    }

    pub async fn post_job(&self, body: &Value) -> reqwest::Response {
        self.client.post(self.url("/v1/jobs")).bearer_auth(&self.token).json(body).send().await.unwrap()
    }

    pub async fn get_job(&self, id: &str) -> reqwest::Response {
        self.client.get(self.url(&format!("/v1/jobs/{id}"))).bearer_auth(&self.token).send().await.unwrap()
    }

    /// Submits and returns the job's id, asserting a 202.
    pub async fn submit(&self, model: &str, input: Value) -> String {
        let response = self.post_job(&serde_json::json!({"model": model, "input": input})).await;
        assert_eq!(response.status(), StatusCode::ACCEPTED, "{}", response.text().await.unwrap());
        let job: Value = response.json().await.unwrap();
        job["id"].as_str().unwrap().to_owned()
    }

    /// Long-polls until the job is finished (or `timeout` passes) and returns it.
    pub async fn wait_finished(&self, id: &str, timeout: Duration) -> Value {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let response = self
                .client
                .get(self.url(&format!("/v1/jobs/{id}?wait=5")))
                .bearer_auth(&self.token)
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), StatusCode::OK);
            let job: Value = response.json().await.unwrap();
            let status = job["status"].as_str().unwrap_or_default();
            if ["succeeded", "failed", "canceled"].contains(&status) || tokio::time::Instant::now() >= deadline {
                return job;
            }
        }
    }
}

/// Waits until `/readyz` says the API reaches PostgreSQL, RabbitMQ (topology declared)
/// and Redis.
async fn wait_ready(address: &str) {
    let client = reqwest::Client::new();
    // Declaring quorum queues takes the broker a while when tests run side by side.
    for _ in 0..600 {
        if let Ok(response) = client.get(format!("{address}/readyz")).send().await
            && response.status() == StatusCode::OK
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the API at {address} was not ready within 30 s");
}

async fn start_api(settings: Settings) -> (String, CancellationToken, JoinHandle<()>) {
    let app = spool_api::Application::build(settings).await.expect("API starts");
    let address = format!("http://127.0.0.1:{}", app.port());
    let shutdown = app.shutdown_token();
    let task = tokio::spawn(async move {
        app.run().await.expect("API runs");
    });
    (address, shutdown, task)
}

/// Reads a JSON file under `models/`.
pub fn model_file(path: &str) -> Value {
    let text = std::fs::read_to_string(models_dir().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap()
}

pub fn cosine(a: &[f64], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
    dot / (norm(a) * norm(b))
}

pub fn as_f64s(value: &Value) -> Vec<f64> {
    value.as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect()
}

/// Waits for the newest mail to `to` in the test SMTP sink's Maildir (`TEST_MAILDIR`,
/// filled by aiosmtpd, started by scripts/test) and returns it, raw.
pub async fn wait_for_mail(to: &str, after: usize) -> String {
    let dir = PathBuf::from(std::env::var("TEST_MAILDIR").expect("TEST_MAILDIR is set by scripts/test")).join("new");
    for _ in 0..100 {
        let mut mails: Vec<(std::time::SystemTime, String)> = std::fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| {
                let text = std::fs::read_to_string(entry.path()).ok()?;
                let modified = entry.metadata().ok()?.modified().ok()?;
                text.lines().any(|l| l.eq_ignore_ascii_case(&format!("to: {to}"))).then_some((modified, text))
            })
            .collect();
        mails.sort_by_key(|(modified, _)| *modified);
        if mails.len() > after {
            return mails.pop().unwrap().1;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no mail to {to} within 10 s");
}

/// The single-use token in a Spool mail (43 URL-safe base64 characters on their own line).
pub fn token_in_mail(mail: &str) -> String {
    mail.lines()
        .map(str::trim)
        .find(|line| line.len() == 43 && line.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'))
        .unwrap_or_else(|| panic!("no token in mail:\n{mail}"))
        .to_owned()
}

/// What a `spoolctl` run printed, and how it exited.
pub struct CliRun {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl CliRun {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("{e}: {}\n{}", self.stdout, self.stderr))
    }
}

/// Runs the real `spoolctl` binary against `url` with `token`, with an empty user config.
pub async fn spoolctl(url: &str, token: &str, args: &[&str]) -> CliRun {
    let home = std::env::temp_dir().join(format!("spoolctl-{}", Uuid::now_v7().simple()));
    spoolctl_with(&home, &[("SPOOL_URL", url), ("SPOOL_TOKEN", token)], args, None).await
}

/// Runs the real `spoolctl` binary (built once per test run, so it is never stale) with
/// `config_home` as its XDG config folder, the given environment, and `stdin`.
pub async fn spoolctl_with(
    config_home: &std::path::Path,
    env: &[(&str, &str)],
    args: &[&str],
    stdin: Option<&str>,
) -> CliRun {
    static BUILT: tokio::sync::OnceCell<PathBuf> = tokio::sync::OnceCell::const_new();
    let binary = BUILT
        .get_or_init(|| async {
            let status = tokio::process::Command::new(env!("CARGO"))
                .args(["build", "--quiet", "-p", "spool-api", "--bin", "spoolctl"])
                .status()
                .await
                .unwrap();
            assert!(status.success(), "cannot build spoolctl");
            // tests/…/target/<profile>/deps/e2e-… → target/<profile>/spoolctl
            std::env::current_exe().unwrap().parent().unwrap().parent().unwrap().join("spoolctl")
        })
        .await;
    let mut command = tokio::process::Command::new(binary);
    command
        .args(args)
        .env_remove("SPOOL_URL")
        .env_remove("SPOOL_TOKEN")
        .envs(env.iter().copied())
        .env("XDG_CONFIG_HOME", config_home)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = command.spawn().unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(text) = stdin {
        tokio::io::AsyncWriteExt::write_all(&mut input, text.as_bytes()).await.unwrap();
    }
    drop(input);
    let output = child.wait_with_output().await.unwrap();
    CliRun {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into(),
        stderr: String::from_utf8_lossy(&output.stderr).into(),
    }
}
