//! The chaos drill: a client submits jobs (each with its own `Idempotency-Key`, retried
//! with backoff like a careful script) while the worker is SIGKILLed three times, the
//! RabbitMQ node and PostgreSQL are restarted and the API is SIGKILLed mid-submit. Then
//! every job that got a 202 must reach a terminal state: none lost, none created twice,
//! none completed twice, every output a valid prediction.
//!
//! The real release binaries run as child processes on their own database (`spool_chaos`,
//! recreated), AMQP and Redis prefixes and ports. Run it with `scripts/chaos`. Knobs
//! (environment): `CHAOS_JOBS` (2000), `CHAOS_CONCURRENCY` (32), `CHAOS_PACE_MS` (20),
//! `CHAOS_POISON_EVERY` (200: every 200th job carries the worker's fault-injection marker,
//! so retries and dead-lettering run under the faults too; 0 turns it off),
//! `CHAOS_RABBITMQ` (`node`: `rabbitmqctl stop` + `rabbitmq-server -detached`; `app`:
//! `stop_app`/`start_app`), `CHAOS_SUBMIT_SECS` (180), `CHAOS_DRAIN_SECS` (120),
//! `CHAOS_DIR` (logs and pid files). Exit status: 0 all checks pass, 1 a check failed,
//! 2 the drill itself could not run.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use chrono::{SecondsFormat, Utc};
use sea_orm::{ConnectionTrait, Database, DatabaseConnection, DbBackend, QueryResult, Statement};
use serde_json::{Value, json};
use spool_api::auth::{self, Role, Scope, TokenGrant, TokenKind, TokenSigner};
use spool_api::identity::accounts::{self, Email};
use spool_api::identity::passwords::NewPassword;
use spool_api::identity::tokens::{self, TokenLifetime};
use tokio::process::{Child, Command};
use tokio::sync::{Mutex, Semaphore, watch};
use uuid::Uuid;

const API_BIND: &str = "127.0.0.1:18080";
const API: &str = "http://127.0.0.1:18080";
const WORKER_METRICS: &str = "127.0.0.1:19187";
const DATABASE: &str = "spool_chaos";
const MODEL: &str = "digits-cnn";
/// Twelve 16s in a row: only poison inputs hold it (healthy pixels are 0–15).
const FAIL_MARKER: &str = "16,16,16,16,16,16,16,16,16,16,16,16";
const TERMINAL: &str = "('succeeded', 'failed', 'canceled')";
const WORKER_KILLS: usize = 3;

#[derive(Clone, Copy, PartialEq)]
enum RabbitMode {
    Node,
    App,
}

struct Config {
    jobs: usize,
    concurrency: usize,
    pace: Duration,
    poison_every: usize,
    rabbitmq: RabbitMode,
    submit_for: Duration,
    drain_for: Duration,
    server: String,
    bin: PathBuf,
    models_dir: PathBuf,
    dir: PathBuf,
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

impl Config {
    fn from_env() -> Result<Self> {
        let dir = match std::env::var("CHAOS_DIR") {
            Ok(dir) => PathBuf::from(dir),
            Err(_) => std::env::temp_dir().join(format!("spool-chaos-{}", std::process::id())),
        };
        std::fs::create_dir_all(&dir)?;
        let rabbitmq = match std::env::var("CHAOS_RABBITMQ").as_deref() {
            Ok("app") => RabbitMode::App,
            Ok("node") | Err(_) => RabbitMode::Node,
            Ok(other) => bail!("CHAOS_RABBITMQ={other}: expected node or app"),
        };
        Ok(Self {
            jobs: env_or("CHAOS_JOBS", 2_000usize).max(1),
            concurrency: env_or("CHAOS_CONCURRENCY", 32usize).max(1),
            pace: Duration::from_millis(env_or("CHAOS_PACE_MS", 20u64)),
            poison_every: env_or("CHAOS_POISON_EVERY", 200usize),
            rabbitmq,
            submit_for: Duration::from_secs(env_or("CHAOS_SUBMIT_SECS", 180u64)),
            drain_for: Duration::from_secs(env_or("CHAOS_DRAIN_SECS", 120u64)),
            server: std::env::var("TEST_DATABASE_URL")
                .unwrap_or_else(|_| "postgres://postgres:postgres@127.0.0.1:5432".into()),
            bin: PathBuf::from(std::env::var("SPOOL_BIN").context("SPOOL_BIN: the folder of the release binaries")?),
            models_dir: PathBuf::from(std::env::var("SPOOL_MODELS_DIR").unwrap_or_else(|_| "models".into())),
            dir,
        })
    }

    fn is_poison(&self, i: usize) -> bool {
        self.poison_every > 0 && i % self.poison_every == self.poison_every / 2
    }

    fn key(&self, i: usize) -> String {
        if self.is_poison(i) { format!("chaos-{i}-poison") } else { format!("chaos-{i}") }
    }

    /// 101 distinct healthy images (pixels 0–15, so never the marker), repeated: the
    /// same input must always get the same label, whatever batch it ran in.
    fn body(&self, i: usize) -> Value {
        let pixels: Vec<u64> = if self.is_poison(i) {
            vec![16; 64]
        } else {
            let mut state = (i % 101) as u64 * 2_654_435_761 + 12_345;
            (0..64)
                .map(|_| {
                    state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
                    (state >> 33) % 16
                })
                .collect()
        };
        json!({"model": MODEL, "input": {"pixels": pixels}})
    }
}

/// What the drill did, when: seconds since the start and wall-clock time.
struct Timeline {
    started: Instant,
    events: std::sync::Mutex<Vec<(f64, String, String)>>,
}

impl Timeline {
    fn at(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    fn note(&self, what: impl Into<String>) {
        let what = what.into();
        let t = self.at();
        let wall = Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true);
        println!("  [t={t:6.1} s] {what}");
        self.events.lock().unwrap().push((t, wall, what));
    }
}

// ---------------------------------------------------------------------------------
// Child processes and system services

#[derive(Clone, Copy)]
#[repr(usize)]
enum Which {
    Api,
    Worker,
}

impl Which {
    fn name(self) -> &'static str {
        match self {
            Which::Api => "spool-api",
            Which::Worker => "spool-worker",
        }
    }
}

struct Services {
    bin: PathBuf,
    dir: PathBuf,
    env: Vec<(String, String)>,
    api: Mutex<Option<Child>>,
    worker: Mutex<Option<Child>>,
    /// How many times each was started (api, worker).
    starts: [AtomicUsize; 2],
}

impl Services {
    fn log(&self, which: Which) -> PathBuf {
        self.dir.join(format!("{}.log", which.name()))
    }

    fn slot(&self, which: Which) -> &Mutex<Option<Child>> {
        match which {
            Which::Api => &self.api,
            Which::Worker => &self.worker,
        }
    }

    /// Starts the binary; returns the log's length before it, where its output begins.
    async fn start(&self, which: Which) -> Result<u64> {
        let n = self.starts[which as usize].fetch_add(1, Ordering::Relaxed) + 1;
        let path = self.log(which);
        let mut log = std::fs::OpenOptions::new().create(true).append(true).open(&path)?;
        let offset = log.metadata()?.len();
        use std::io::Write;
        writeln!(log, "===== chaos: start #{n} of {} at {} =====", which.name(), Utc::now().to_rfc3339())?;
        let mut command = Command::new(self.bin.join(which.name()));
        // Nothing from the caller's environment may point the services elsewhere.
        for (name, _) in std::env::vars() {
            if name.starts_with("SPOOL_") || ["DATABASE_URL", "AMQP_URL", "REDIS_URL", "SMTP_URL"].contains(&&*name) {
                command.env_remove(name);
            }
        }
        command.envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        if let Which::Worker = which {
            command.env("SPOOL_WORKER__ID", format!("chaos-worker-{n}"));
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", which.name()))?;
        if let Some(pid) = child.id() {
            std::fs::write(self.dir.join(format!("{}.pid", which.name())), pid.to_string())?;
        }
        *self.slot(which).lock().await = Some(child);
        Ok(offset)
    }

    fn log_len(&self, which: Which) -> u64 {
        std::fs::metadata(self.log(which)).map(|m| m.len()).unwrap_or(0)
    }

    /// Whether the log holds `needle` past `offset` (colours stripped).
    fn logged(&self, which: Which, offset: u64, needle: &str) -> bool {
        std::fs::read(self.log(which)).is_ok_and(|log| {
            strip_ansi(&String::from_utf8_lossy(&log[(offset as usize).min(log.len())..])).contains(needle)
        })
    }

    async fn kill(&self, which: Which) -> Result<()> {
        if let Some(mut child) = self.slot(which).lock().await.take() {
            child.start_kill()?; // SIGKILL
            child.wait().await?;
        }
        let _ = std::fs::remove_file(self.dir.join(format!("{}.pid", which.name())));
        Ok(())
    }

    async fn exited(&self, which: Which) -> Option<std::process::ExitStatus> {
        self.slot(which).lock().await.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }

    /// Waits until the API answers `/readyz` or the worker logs that it consumes.
    async fn wait_ready(&self, which: Which, offset: u64, client: &reqwest::Client, within: Duration) -> Result<()> {
        let until = Instant::now() + within;
        while Instant::now() < until {
            if let Some(status) = self.exited(which).await {
                bail!("{} exited ({status})", which.name());
            }
            let ready = match which {
                Which::Api => client.get(format!("{API}/readyz")).send().await.is_ok_and(|r| r.status().is_success()),
                Which::Worker => self.logged(which, offset, "consuming"),
            };
            if ready {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("{} not ready within {within:?}", which.name())
    }

    async fn restart(&self, which: Which, client: &reqwest::Client) -> Result<()> {
        let offset = self.start(which).await?;
        self.wait_ready(which, offset, client, Duration::from_secs(60)).await
    }
}

/// The text without its terminal colour codes (`ESC [ … letter`).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

async fn port_open(port: u16) -> bool {
    matches!(
        tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(("127.0.0.1", port))).await,
        Ok(Ok(_))
    )
}

async fn wait_port(port: u16, within: Duration) -> bool {
    let until = Instant::now() + within;
    while Instant::now() < until {
        if port_open(port).await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    false
}

/// Runs a shell line (with its own `timeout`s), output appended to `services.log`. Daemons
/// it starts get their own session (`setsid -w`), so they outlive this process group.
async fn shell(dir: &Path, line: &str) -> bool {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("services.log"));
    let Ok(mut log) = log else { return false };
    use std::io::Write;
    let _ = writeln!(log, "===== {} $ {line}", Utc::now().to_rfc3339());
    let (Ok(out), Ok(err)) = (log.try_clone(), log.try_clone()) else { return false };
    Command::new("setsid")
        .args(["-w", "sh", "-c", line])
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .status()
        .await
        .is_ok_and(|s| s.success())
}

const PG_CLUSTER: &str = "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql | sort -V | tail -n1) main";

/// Whatever happened: RabbitMQ and PostgreSQL answer again when the drill ends.
async fn ensure_services_up(dir: &Path) {
    if !port_open(5672).await {
        println!("RabbitMQ is down: starting it again");
        if shell(dir, "timeout 15 rabbitmqctl ping").await {
            shell(dir, "timeout 60 rabbitmqctl start_app").await;
        } else {
            shell(dir, "rabbitmq-server -detached").await;
        }
        if wait_port(5672, Duration::from_secs(90)).await {
            shell(dir, "timeout 60 rabbitmqctl await_startup").await;
        }
    }
    if !port_open(5432).await {
        println!("PostgreSQL is down: starting it again");
        shell(dir, &format!("timeout 90 {PG_CLUSTER} start")).await;
        wait_port(5432, Duration::from_secs(30)).await;
    }
}

// ---------------------------------------------------------------------------------
// The client

#[derive(Default)]
struct Stats {
    accepted: std::sync::Mutex<BTreeMap<usize, (Uuid, u16)>>,
    /// Jobs the client gave up on (deadline) or that got a final 4xx, with the reason.
    refused: std::sync::Mutex<BTreeMap<usize, String>>,
    retries: std::sync::Mutex<BTreeMap<String, usize>>,
    in_flight: AtomicUsize,
    submitted: AtomicUsize,
}

enum Answer {
    Accepted(Uuid, u16),
    Retry(String, Option<Duration>),
    Refused(String),
}

fn classify(error: &reqwest::Error) -> String {
    if error.is_connect() {
        "connection refused".into()
    } else if error.is_timeout() {
        "timeout".into()
    } else {
        "connection reset / closed".into()
    }
}

async fn submit_once(client: &reqwest::Client, token: &str, key: &str, body: &Value) -> Answer {
    let sent =
        client.post(format!("{API}/v1/jobs")).bearer_auth(token).header("Idempotency-Key", key).json(body).send();
    match sent.await {
        Err(error) => Answer::Retry(classify(&error), None),
        Ok(response) => {
            let status = response.status().as_u16();
            let retry_after = response
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
                .map(|s| Duration::from_secs(s.min(5)));
            match status {
                200..=202 => match response.json::<Value>().await {
                    Ok(job) => match job["id"].as_str().and_then(|id| id.parse().ok()) {
                        Some(id) => Answer::Accepted(id, status),
                        None => Answer::Refused(format!("HTTP {status} without a job id: {job}")),
                    },
                    Err(_) => Answer::Retry(format!("HTTP {status}, body cut off"), None),
                },
                408 | 429 | 500..=599 => Answer::Retry(format!("HTTP {status}"), retry_after),
                _ => Answer::Refused(format!("HTTP {status}: {}", response.text().await.unwrap_or_default())),
            }
        }
    }
}

/// One job: the same request with the same key until it is accepted, with exponential
/// backoff (honouring `Retry-After`), or until the deadline.
async fn submit_job(
    client: reqwest::Client,
    token: Arc<String>,
    stats: Arc<Stats>,
    i: usize,
    key: String,
    body: Value,
    deadline: Instant,
) {
    let mut backoff = Duration::from_millis(100);
    for tries in 1u64.. {
        stats.in_flight.fetch_add(1, Ordering::Relaxed);
        let answer = submit_once(&client, &token, &key, &body).await;
        stats.in_flight.fetch_sub(1, Ordering::Relaxed);
        let (reason, retry_after) = match answer {
            Answer::Accepted(id, status) => {
                stats.accepted.lock().unwrap().insert(i, (id, status));
                return;
            }
            Answer::Refused(reason) => {
                stats.refused.lock().unwrap().insert(i, reason);
                return;
            }
            Answer::Retry(reason, retry_after) => (reason, retry_after),
        };
        *stats.retries.lock().unwrap().entry(reason.clone()).or_default() += 1;
        let jitter = Duration::from_millis((i as u64 * 7_919 + tries * 104_729) % 100);
        let pause = retry_after.unwrap_or(backoff) + jitter;
        if Instant::now() + pause > deadline {
            stats.refused.lock().unwrap().insert(i, format!("gave up after {tries} tries (last: {reason})"));
            return;
        }
        tokio::time::sleep(pause).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// Submits every job: `pace` apart, `concurrency` at a time. The last fifth is held back
/// (a trickle of one per 200 ms goes on while faults run) until `release` fires, so that
/// requests are in flight when the API is killed, whatever the faults before it took.
async fn submit_all(
    config: Arc<Config>,
    client: reqwest::Client,
    token: Arc<String>,
    stats: Arc<Stats>,
    mut release: watch::Receiver<bool>,
    deadline: Instant,
) {
    let slots = Arc::new(Semaphore::new(config.concurrency));
    let reserve = config.jobs / 5;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..config.jobs {
        let remaining = config.jobs - i;
        if *release.borrow() {
            // Released: as fast as the slots allow.
        } else if remaining > reserve {
            tokio::time::sleep(config.pace).await;
        } else if remaining > reserve / 2 {
            let _ = tokio::time::timeout(Duration::from_millis(200), release.wait_for(|r| *r)).await;
        } else {
            let _ = tokio::time::timeout(deadline.saturating_duration_since(Instant::now()), release.wait_for(|r| *r))
                .await;
        }
        let permit = slots.clone().acquire_owned().await.unwrap();
        let (client, token, stats) = (client.clone(), token.clone(), stats.clone());
        let (key, body) = (config.key(i), config.body(i));
        stats.submitted.fetch_add(1, Ordering::Relaxed);
        tasks.spawn(async move {
            submit_job(client, token, stats, i, key, body, deadline).await;
            drop(permit);
        });
    }
    while tasks.join_next().await.is_some() {}
}

// ---------------------------------------------------------------------------------
// Faults

async fn kill_worker(services: &Services, client: &reqwest::Client, timeline: &Timeline) -> Result<()> {
    services.kill(Which::Worker).await?;
    timeline.note("SIGKILL spool-worker");
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    services.restart(Which::Worker, client).await?;
    timeline.note("spool-worker restarted, consuming");
    Ok(())
}

/// Restarts RabbitMQ; returns whether it came back, and how long it was away. Then waits
/// (at most 30 s) until the API and the worker have reconnected.
async fn restart_rabbitmq(config: &Config, services: &Services, timeline: &Timeline) -> (bool, f64) {
    let dir = &config.dir;
    let offsets = (services.log_len(Which::Api), services.log_len(Which::Worker));
    let began = Instant::now();
    let (stop, start) = match config.rabbitmq {
        RabbitMode::Node => ("timeout 90 rabbitmqctl stop", "rabbitmq-server -detached"),
        RabbitMode::App => ("timeout 60 rabbitmqctl stop_app", "timeout 60 rabbitmqctl start_app"),
    };
    let stopped = shell(dir, stop).await;
    timeline.note(format!("RabbitMQ: `{stop}` {}", if stopped { "done" } else { "FAILED" }));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let started = shell(dir, start).await;
    let up = started
        && wait_port(5672, Duration::from_secs(90)).await
        && shell(dir, "timeout 90 rabbitmqctl await_startup").await;
    let away = began.elapsed().as_secs_f64();
    timeline.note(format!(
        "RabbitMQ: `{start}` + await_startup {} ({away:.1} s after the stop)",
        if up { "up" } else { "FAILED" }
    ));
    if up {
        let until = Instant::now() + Duration::from_secs(30);
        let (mut api, mut worker) = (false, false);
        while Instant::now() < until && !(api && worker) {
            api = api || services.logged(Which::Api, offsets.0, "INFO connected to RabbitMQ");
            worker = worker || services.logged(Which::Worker, offsets.1, "INFO reconnected to RabbitMQ");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let yes = |b: bool| if b { "yes" } else { "NOT within 30 s" };
        timeline.note(format!("reconnected to RabbitMQ: API {}, worker {}", yes(api), yes(worker)));
    }
    (up, away)
}

async fn restart_postgres(config: &Config, timeline: &Timeline) -> bool {
    timeline.note("PostgreSQL: restart begins");
    let up = shell(&config.dir, &format!("timeout 90 {PG_CLUSTER} restart")).await
        && wait_port(5432, Duration::from_secs(30)).await;
    timeline.note(format!("PostgreSQL: restart {}", if up { "done, answering" } else { "FAILED" }));
    up
}

// ---------------------------------------------------------------------------------
// Checks

async fn query(db: &DatabaseConnection, sql: &str, values: Vec<sea_orm::Value>) -> Result<Vec<QueryResult>> {
    Ok(db.query_all_raw(Statement::from_sql_and_values(DbBackend::Postgres, sql, values)).await?)
}

async fn number(db: &DatabaseConnection, sql: &str, values: Vec<sea_orm::Value>) -> Result<i64> {
    let rows = query(db, sql, values).await?;
    Ok(rows.first().context("no row")?.try_get::<Option<i64>>("", "n")?.unwrap_or(0))
}

/// Up to 10 job rows (without the input) as JSON, for the report.
async fn show_rows(db: &DatabaseConnection, title: &str, ids: &[Uuid]) -> Result<()> {
    if ids.is_empty() {
        return Ok(());
    }
    println!("{title} ({} jobs; first 10):", ids.len());
    let rows = query(
        db,
        "SELECT (to_jsonb(j) - 'input') AS row FROM jobs j WHERE id = ANY($1) ORDER BY id LIMIT 10",
        vec![ids.to_vec().into()],
    )
    .await?;
    let shown: Vec<Uuid> = rows
        .iter()
        .filter_map(|row| {
            let row: Value = row.try_get("", "row").ok()?;
            println!("  {row}");
            row["id"].as_str()?.parse().ok()
        })
        .collect();
    for id in ids.iter().take(10).filter(|id| !shown.contains(id)) {
        println!("  {id}: no row in the database");
    }
    Ok(())
}

async fn ids_where(db: &DatabaseConnection, condition: &str, values: Vec<sea_orm::Value>) -> Result<Vec<Uuid>> {
    let sql = format!("SELECT id FROM jobs WHERE {condition} ORDER BY id");
    query(db, &sql, values).await?.iter().map(|row| Ok(row.try_get::<Uuid>("", "id")?)).collect()
}

struct Check {
    name: String,
    value: String,
    ok: bool,
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

// ---------------------------------------------------------------------------------

#[tokio::main]
async fn main() {
    let config = match Config::from_env() {
        Ok(config) => Arc::new(config),
        Err(error) => {
            eprintln!("chaos: {error:#}");
            std::process::exit(2);
        }
    };
    let result = drill(config.clone()).await;
    ensure_services_up(&config.dir).await;
    let code = match result {
        Ok(true) => 0,
        Ok(false) => 1,
        Err(error) => {
            eprintln!("chaos: the drill could not run: {error:#}");
            for name in ["spool-api", "spool-worker"] {
                eprintln!("--- last lines of {name}.log ---\n{}", tail(&config.dir.join(format!("{name}.log")), 30));
            }
            eprintln!("--- last lines of services.log ---\n{}", tail(&config.dir.join("services.log"), 20));
            2
        }
    };
    std::process::exit(code);
}

async fn drill(config: Arc<Config>) -> Result<bool> {
    let server = &config.server;
    if port_open(18080).await {
        bail!("port 18080 is taken (a previous drill still running?)");
    }
    let admin = Database::connect(format!("{server}/postgres")).await.context("PostgreSQL is reachable")?;
    admin.execute_unprepared(&format!("DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")).await?;
    admin.execute_unprepared(&format!("CREATE DATABASE {DATABASE}")).await?;
    admin.close().await.ok();
    let manifest = spool_shared::manifest::Manifest::load(&config.models_dir)?;
    let max_attempts = manifest
        .get(MODEL)
        .context("digits-cnn in the manifest")?
        .max_attempts
        .unwrap_or(spool_shared::Settings::default().worker.max_attempts) as i64;

    let (secret, public) = auth::generate_key_pair()?;
    let prefix = format!("chaos{}", std::process::id());
    let env: Vec<(String, String)> = [
        ("DATABASE_URL", format!("{server}/{DATABASE}")),
        ("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f".into()),
        ("REDIS_URL", "redis://127.0.0.1:6379".into()),
        ("SPOOL_AMQP__PREFIX", prefix.clone()),
        // The drill's queues vanish 5 minutes after it; two retry tiers are all that
        // max_attempts = 3 uses (quorum queues are heavy on a 2-core broker).
        ("SPOOL_AMQP__QUEUE_EXPIRES_MS", "300000".into()),
        ("SPOOL_AMQP__RETRY_TIERS_MS", "[1000, 5000]".into()),
        ("SPOOL_REDIS_PREFIX", format!("chaos:{prefix}")),
        ("SPOOL_API__BIND", API_BIND.into()),
        ("SPOOL_API__OUTBOX_GRACE_MS", "1000".into()),
        ("SPOOL_API__OUTBOX_INTERVAL_MS", "500".into()),
        ("SPOOL_WORKER__METRICS_BIND", WORKER_METRICS.into()),
        ("SPOOL_WORKER__MODELS", format!("[\"{MODEL}\"]")),
        ("SPOOL_WORKER__FAIL_MARKER", FAIL_MARKER.into()),
        ("SPOOL_RATE_LIMIT__USER__PER_MINUTE", "1000000".into()),
        ("SPOOL_RATE_LIMIT__USER__BURST", "100000".into()),
        ("SPOOL_AUTH__PUBLIC_KEYS", format!("[\"{public}\"]")),
        ("SPOOL_AUTH__SECRET_KEY", secret.clone()),
        ("SPOOL_WEBHOOKS__SEALING_KEYS", format!("[\"{}\"]", spool_shared::sealing::generate_sealing_key()?)),
        ("SPOOL_MODELS_DIR", config.models_dir.display().to_string()),
        ("SPOOL_CONFIG", "/nonexistent/spool.toml".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let services = Arc::new(Services {
        bin: config.bin.clone(),
        dir: config.dir.clone(),
        env,
        api: Mutex::new(None),
        worker: Mutex::new(None),
        starts: [AtomicUsize::new(0), AtomicUsize::new(0)],
    });
    let outcome = run_drill(&config, &services, &secret, max_attempts).await;
    let _ = services.kill(Which::Worker).await;
    let _ = services.kill(Which::Api).await;
    if !matches!(outcome, Ok(true)) {
        for which in [Which::Api, Which::Worker] {
            println!("--- last lines of {} ---\n{}", services.log(which).display(), tail(&services.log(which), 25));
        }
    }
    outcome
}

async fn run_drill(config: &Arc<Config>, services: &Services, secret: &str, max_attempts: i64) -> Result<bool> {
    let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build()?;
    let database_url = format!("{}/{DATABASE}", config.server);
    println!(
        "chaos drill: {} jobs of {MODEL} ({} poison), {} in flight at most, {:?} apart; logs in {}",
        config.jobs,
        (0..config.jobs).filter(|i| config.is_poison(*i)).count(),
        config.concurrency,
        config.pace,
        config.dir.display()
    );
    services.restart(Which::Api, &client).await?; // runs the migrations
    services.restart(Which::Worker, &client).await?;

    // A user and an API token, straight in the database (as `spoolctl token mint` does).
    let db = Database::connect(&database_url).await?;
    let email = Email::parse("chaos@example.com")?;
    let user =
        accounts::create_verified_user(&db, &email, NewPassword::parse("chaos-monkey-drill-1".into())?, Role::User)
            .await?;
    let signer = TokenSigner::new(secret, "spool")?;
    let scopes = [Scope::JobsRead, Scope::JobsWrite];
    let issued =
        tokens::issue(&db, &signer, user.id, "chaos".into(), TokenLifetime::parse("1d", false)?, &scopes).await?;
    let grant =
        TokenGrant { user_id: user.id, kind: TokenKind::Api, token_id: issued.row.id, scopes: &scopes, ttl: None };
    let token = Arc::new(signer.sign(&grant)?);
    db.close().await.ok();

    let timeline = Timeline { started: Instant::now(), events: std::sync::Mutex::new(Vec::new()) };
    let deadline = Instant::now() + config.submit_for;
    let stats = Arc::new(Stats::default());
    let (release, released) = watch::channel(false);
    let submitter =
        tokio::spawn(submit_all(config.clone(), client.clone(), token.clone(), stats.clone(), released, deadline));
    timeline.note("submitting");

    // The faults, one after another, while jobs are in flight.
    let mut faults: Vec<String> = Vec::new();
    tokio::time::sleep(Duration::from_secs(3)).await;
    for n in 0..WORKER_KILLS {
        if n > 0 {
            tokio::time::sleep(Duration::from_secs(3)).await;
        }
        let t = timeline.at();
        kill_worker(services, &client, &timeline).await?;
        faults.push(format!("worker SIGKILL t={t:.1} (consuming again t={:.1})", timeline.at()));
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let t = timeline.at();
    let (broker_up, broker_away) = restart_rabbitmq(config, services, &timeline).await;
    faults.push(format!(
        "RabbitMQ {} t={t:.1} (down {broker_away:.1} s)",
        if config.rabbitmq == RabbitMode::Node { "node stop/start" } else { "stop_app/start_app" }
    ));
    if !broker_up {
        bail!("RabbitMQ did not come back; see {}", config.dir.join("services.log").display());
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let t = timeline.at();
    let pg_up = restart_postgres(config, &timeline).await;
    faults.push(format!("PostgreSQL restart t={t:.1} (answering t={:.1})", timeline.at()));
    if !pg_up {
        bail!("PostgreSQL did not come back; see {}", config.dir.join("services.log").display());
    }
    tokio::time::sleep(Duration::from_secs(4)).await;
    let _ = release.send(true);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let in_flight = stats.in_flight.load(Ordering::Relaxed);
    services.kill(Which::Api).await?;
    let t = timeline.at();
    timeline.note(format!("SIGKILL spool-api ({in_flight} requests in flight)"));
    tokio::time::sleep(Duration::from_secs(1)).await;
    services.restart(Which::Api, &client).await?;
    timeline.note("spool-api restarted, ready");
    let last_fault = Instant::now();
    let last_fault_wall = Utc::now();
    let last_fault_at = timeline.at();
    faults.push(format!("API SIGKILL t={t:.1} with {in_flight} requests in flight (ready t={last_fault_at:.1})"));

    submitter.await?;
    timeline.note(format!("client done: {} accepted", stats.accepted.lock().unwrap().len()));
    let accepted: BTreeMap<usize, (Uuid, u16)> = stats.accepted.lock().unwrap().clone();
    let ids: Vec<Uuid> = accepted.values().map(|(id, _)| *id).collect();

    // Every accepted job reaches a terminal state (bounded wait).
    let db = Database::connect(&database_url).await?;
    let drain_until = Instant::now() + config.drain_for;
    let mut terminal = 0;
    while Instant::now() < drain_until {
        terminal = number(
            &db,
            &format!("SELECT count(*) AS n FROM jobs WHERE id = ANY($1) AND status IN {TERMINAL}"),
            vec![ids.clone().into()],
        )
        .await?;
        if terminal as usize == ids.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let drained = last_fault.elapsed().as_secs_f64();
    timeline.note(format!("{terminal} of {} accepted jobs terminal", ids.len()));
    let total = timeline.at();

    // --- the checks, straight from PostgreSQL ---
    let mut checks: Vec<Check> = Vec::new();
    let mut check = |name: &str, value: String, ok: bool| checks.push(Check { name: name.into(), value, ok });
    let refused = stats.refused.lock().unwrap().clone();
    check(
        "jobs the client could not get accepted",
        format!(
            "{}{}",
            refused.len(),
            refused.iter().next().map(|(i, r)| format!(" (e.g. #{i}: {r})")).unwrap_or_default()
        ),
        refused.is_empty(),
    );
    let distinct: std::collections::HashSet<Uuid> = ids.iter().copied().collect();
    check(
        "distinct job ids among the accepted",
        format!("{} of {}", distinct.len(), ids.len()),
        distinct.len() == ids.len(),
    );

    let present: std::collections::HashSet<Uuid> = ids_where(&db, "true", vec![]).await?.into_iter().collect();
    let missing: Vec<Uuid> = ids.iter().filter(|id| !present.contains(id)).copied().collect();
    let stuck = ids_where(&db, &format!("id = ANY($1) AND status NOT IN {TERMINAL}"), vec![ids.clone().into()]).await?;
    check("LOST: accepted but no row", missing.len().to_string(), missing.is_empty());
    check("LOST: accepted but not terminal in time", stuck.len().to_string(), stuck.is_empty());

    // Idempotency: one row per key, and it is the job the client was given.
    let rows = query(&db, "SELECT idempotency_key, id FROM jobs", vec![]).await?;
    let by_key: BTreeMap<String, Uuid> = rows
        .iter()
        .filter_map(|r| Some((r.try_get::<Option<String>>("", "idempotency_key").ok()??, r.try_get("", "id").ok()?)))
        .collect();
    let mismatched: Vec<Uuid> = accepted
        .iter()
        .filter(|(i, (id, _))| by_key.get(&config.key(**i)) != Some(id))
        .map(|(_, (id, _))| *id)
        .collect();
    let duplicate_keys = number(
        &db,
        "SELECT count(*) AS n FROM (SELECT idempotency_key FROM jobs GROUP BY 1 HAVING count(*) > 1) d",
        vec![],
    )
    .await?;
    let in_db = number(&db, "SELECT count(*) AS n FROM jobs", vec![]).await?;
    let without_key = number(&db, "SELECT count(*) AS n FROM jobs WHERE idempotency_key IS NULL", vec![]).await?;
    check("DUPLICATES: idempotency keys with two jobs", duplicate_keys.to_string(), duplicate_keys == 0);
    check("accepted jobs whose key maps to another row", mismatched.len().to_string(), mismatched.is_empty());
    check(
        "rows in the database vs accepted",
        format!("{in_db} vs {} ({without_key} without a key)", ids.len()),
        in_db as usize == ids.len() && without_key == 0,
    );

    // Exactly-once completion.
    let success_entries =
        "(SELECT count(*) FROM jsonb_array_elements(attempt_log) e WHERE e->>'outcome' = 'succeeded')";
    let twice = ids_where(&db, &format!("{success_entries} > 1"), vec![]).await?;
    let inconsistent = ids_where(
        &db,
        &format!("(status = 'succeeded') <> ({success_entries} = 1) OR (status = 'succeeded' AND output IS NULL)"),
        vec![],
    )
    .await?;
    check("DOUBLE COMPLETION: jobs with two successes in attempt_log", twice.len().to_string(), twice.is_empty());
    check("status vs attempt_log/output inconsistent", inconsistent.len().to_string(), inconsistent.is_empty());
    let usage = query(
        &db,
        "SELECT COALESCE(sum(submitted), 0)::bigint AS submitted, COALESCE(sum(succeeded), 0)::bigint AS succeeded, \
         COALESCE(sum(failed), 0)::bigint AS failed FROM usage",
        vec![],
    )
    .await?;
    let usage_of = |column: &str| usage.first().and_then(|r| r.try_get::<i64>("", column).ok()).unwrap_or(-1);
    let count_status = |status: &str| format!("SELECT count(*) AS n FROM jobs WHERE status = '{status}'");
    let succeeded = number(&db, &count_status("succeeded"), vec![]).await?;
    let failed = number(&db, &count_status("failed"), vec![]).await?;
    let canceled = number(&db, &count_status("canceled"), vec![]).await?;
    let queued = number(&db, &count_status("queued"), vec![]).await?;
    let running = number(&db, &count_status("running"), vec![]).await?;
    let usage_line = format!(
        "submitted {} / succeeded {} / failed {} vs rows {in_db} / {succeeded} / {failed}",
        usage_of("submitted"),
        usage_of("succeeded"),
        usage_of("failed")
    );
    check(
        "usage counters vs rows",
        usage_line,
        usage_of("submitted") == in_db && usage_of("succeeded") == succeeded && usage_of("failed") == failed,
    );

    // Outcomes: healthy jobs succeed with a valid prediction; poison jobs are dead-lettered.
    let healthy_failed =
        ids_where(&db, "status <> 'succeeded' AND idempotency_key NOT LIKE '%-poison'", vec![]).await?;
    check("healthy jobs not succeeded", healthy_failed.len().to_string(), healthy_failed.is_empty());
    let invalid = ids_where(
        &db,
        "status = 'succeeded' AND NOT COALESCE(( \
           jsonb_typeof(output->'label') = 'number' AND (output->>'label')::numeric IN (0,1,2,3,4,5,6,7,8,9) \
           AND jsonb_typeof(output->'probabilities') = 'array' AND jsonb_array_length(output->'probabilities') = 10 \
           AND abs((SELECT sum(p::text::float8) FROM jsonb_array_elements(output->'probabilities') p) - 1) < 1e-3 \
           AND (SELECT i - 1 FROM jsonb_array_elements(output->'probabilities') WITH ORDINALITY a(p, i) \
                 ORDER BY p::text::float8 DESC LIMIT 1) = (output->>'label')::int), false)",
        vec![],
    )
    .await?;
    check("succeeded jobs with an invalid prediction", invalid.len().to_string(), invalid.is_empty());
    let unstable = number(
        &db,
        "SELECT count(*) AS n FROM (SELECT input FROM jobs WHERE status = 'succeeded' GROUP BY input \
                      HAVING count(DISTINCT output->'label') > 1) d",
        vec![],
    )
    .await?;
    check("same input, different labels", unstable.to_string(), unstable == 0);
    let poison_expected = accepted.keys().filter(|i| config.is_poison(**i)).count();
    let poison_ok = number(&db, &format!(
        "SELECT count(*) AS n FROM jobs WHERE idempotency_key LIKE '%-poison' AND status = 'failed' AND dead_lettered \
         AND error->>'code' = 'injected_fault' AND attempts >= {max_attempts} \
         AND (SELECT count(*) FROM jsonb_array_elements(attempt_log) e WHERE e->>'outcome' = 'retry') = {}",
        max_attempts - 1
    ), vec![]).await?;
    check(
        "poison jobs dead-lettered after exactly max_attempts runs",
        format!("{poison_ok} of {poison_expected}"),
        poison_ok as usize == poison_expected,
    );

    // Attempts: a claim counts one; each worker kill or broker restart can orphan one.
    let attempt_limit = max_attempts + WORKER_KILLS as i64 + 1;
    let max_seen = number(&db, "SELECT COALESCE(max(attempts), 0)::bigint AS n FROM jobs", vec![]).await?;
    let over = ids_where(&db, &format!("attempts > {attempt_limit} OR attempts < 1"), vec![]).await?;
    check(
        "attempts within 1..=max_attempts + kills + broker restart",
        format!("max seen {max_seen}, limit {attempt_limit}, outside: {}", over.len()),
        over.is_empty(),
    );
    let retried = number(
        &db,
        "SELECT count(*) AS n FROM jobs WHERE attempts > 1 AND idempotency_key NOT LIKE '%-poison'",
        vec![],
    )
    .await?;
    let taken_over = number(
        &db,
        "SELECT count(*) AS n FROM jobs, jsonb_array_elements(attempt_log) e WHERE e->>'outcome' = 'taken_over'",
        vec![],
    )
    .await?;
    let unpublished = number(&db, "SELECT count(*) AS n FROM jobs WHERE published_at IS NULL", vec![]).await?;
    let last_healthy_ms = number(
        &db,
        "SELECT (EXTRACT(EPOCH FROM max(completed_at)) * 1000)::bigint AS n FROM jobs \
         WHERE idempotency_key NOT LIKE '%-poison'",
        vec![],
    )
    .await?;
    let healthy_drained = (last_healthy_ms - last_fault_wall.timestamp_millis()) as f64 / 1000.0;

    // --- report ---
    let retries = stats.retries.lock().unwrap().clone();
    let retry_total: usize = retries.values().sum();
    let replays = accepted.values().filter(|(_, s)| *s == 200).count();
    let events = timeline.events.lock().unwrap().clone();
    println!("\n## Chaos drill figures\n");
    println!("| figure | value |\n|---|---|");
    println!("| jobs submitted | {} ({} poison) |", stats.submitted.load(Ordering::Relaxed), poison_expected);
    println!(
        "| accepted | {} (202: {}; 200 `Idempotent-Replayed`, i.e. created by a try whose answer was lost: {replays}) |",
        ids.len(),
        ids.len() - replays
    );
    println!(
        "| client retries | {retry_total} ({}) |",
        retries.iter().map(|(r, n)| format!("{r}: {n}")).collect::<Vec<_>>().join(", ")
    );
    println!("| faults injected | {} |", faults.join("; "));
    println!("| jobs in the database | {in_db} |");
    println!(
        "| terminal | {} (succeeded {succeeded}, failed {failed}, canceled {canceled}; still queued {queued}, running {running}) |",
        succeeded + failed + canceled
    );
    println!("| **lost** (accepted, no row or not terminal) | **{}** |", missing.len() + stuck.len());
    println!("| **duplicates** (key with two jobs / completed twice) | **{duplicate_keys} / {}** |", twice.len());
    println!(
        "| max attempts seen | {max_seen} (healthy jobs run more than once: {retried}; attempts taken over, i.e. cut off by a kill: {taken_over}) |"
    );
    println!("| jobs whose `published_at` mark was lost (killed API; harmless once terminal) | {unpublished} |");
    println!("| total run | {total:.1} s |");
    println!(
        "| drain after the last fault (API back at t={last_fault_at:.1}) | {drained:.1} s until every accepted job was \
         terminal; last healthy job done {healthy_drained:.1} s after it |"
    );
    println!("\nTimeline (t = seconds since the first submit, UTC):");
    for (t, wall, what) in &events {
        println!("  t={t:6.1}  {wall}  {what}");
    }
    println!("\nChecks:");
    let mut all_ok = true;
    for c in &checks {
        all_ok &= c.ok;
        println!("  [{}] {}: {}", if c.ok { " ok " } else { "FAIL" }, c.name, c.value);
    }
    show_rows(&db, "accepted jobs with no row", &missing).await?;
    show_rows(&db, "accepted jobs not terminal", &stuck).await?;
    show_rows(&db, "jobs completed twice", &twice).await?;
    show_rows(&db, "jobs whose status and attempt_log disagree", &inconsistent).await?;
    show_rows(&db, "healthy jobs that did not succeed", &healthy_failed).await?;
    show_rows(&db, "succeeded jobs with an invalid prediction", &invalid).await?;
    show_rows(&db, "jobs with attempts out of bounds", &over).await?;
    show_rows(&db, "accepted jobs whose key maps to another row", &mismatched).await?;
    println!("service logs: {}", config.dir.display());
    println!("{}", if all_ok { "PASS: nothing lost, nothing done twice" } else { "FAIL" });
    Ok(all_ok)
}
