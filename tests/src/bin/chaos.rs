//! The chaos drill: jobs in flight while the worker is SIGKILLed (several times),
//! RabbitMQ is restarted, PostgreSQL is restarted and the API is SIGKILLed mid-submit.
//! Then every job that got a 202 must reach a terminal state, none lost, none completed
//! twice. Real release binaries as separate processes, on their own database, queue
//! prefix and ports. Run with `scripts/chaos`; prints figures, exits 1 if a check fails.
#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sea_orm::{ConnectionTrait, Database, DbBackend, Statement};
use serde_json::json;
use spool_api::auth::{self, Role, Scope, TokenGrant, TokenKind, TokenSigner};
use spool_api::identity::accounts::{self, Email};
use spool_api::identity::passwords::NewPassword;
use spool_api::identity::tokens::{self, TokenLifetime};
use tokio::process::{Child, Command};
use tokio::sync::{Mutex, Semaphore};
use uuid::Uuid;

const API: &str = "http://127.0.0.1:18080";
const SERVER: &str = "postgres://postgres:postgres@127.0.0.1:5432";

struct Services {
    bin: std::path::PathBuf,
    env: Vec<(String, String)>,
    logs: std::path::PathBuf,
}

impl Services {
    fn spawn(&self, name: &str, extra: &[(&str, &str)]) -> Child {
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(self.logs.join(format!("{name}.log"))).unwrap();
        Command::new(self.bin.join(name))
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .envs(extra.iter().copied())
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .unwrap()
    }
}

fn shell(line: &str) -> bool {
    std::process::Command::new("sh")
        .arg("-c")
        .arg(line)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

async fn wait_ready(client: &reqwest::Client) {
    for _ in 0..300 {
        if client.get(format!("{API}/readyz")).send().await.is_ok_and(|r| r.status().is_success()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the API did not become ready");
}

#[tokio::main]
async fn main() {
    let jobs: usize = std::env::var("CHAOS_JOBS").ok().and_then(|v| v.parse().ok()).unwrap_or(2_000);
    let bin = std::path::PathBuf::from(std::env::var("SPOOL_BIN").expect("SPOOL_BIN: folder of the release binaries"));
    let logs = std::env::temp_dir().join(format!("spool-chaos-{}", std::process::id()));
    std::fs::create_dir_all(&logs).unwrap();
    let admin = Database::connect(format!("{SERVER}/postgres")).await.unwrap();
    admin.execute_unprepared("DROP DATABASE IF EXISTS spool_chaos WITH (FORCE)").await.unwrap();
    admin.execute_unprepared("CREATE DATABASE spool_chaos").await.unwrap();
    let (secret, public) = auth::generate_key_pair().unwrap();
    let env: Vec<(String, String)> = [
        ("DATABASE_URL", format!("{SERVER}/spool_chaos")),
        ("SPOOL_AMQP__PREFIX", format!("chaos{}", std::process::id())),
        ("SPOOL_REDIS_PREFIX", format!("chaos{}", std::process::id())),
        ("SPOOL_API__BIND", "127.0.0.1:18080".into()),
        ("SPOOL_API__OUTBOX_GRACE_MS", "1000".into()),
        ("SPOOL_API__OUTBOX_INTERVAL_MS", "500".into()),
        ("SPOOL_AMQP__QUEUE_EXPIRES_MS", "300000".into()),
        ("SPOOL_WORKER__METRICS_BIND", "127.0.0.1:19187".into()),
        ("SPOOL_WORKER__MODELS", "[\"digits-cnn\"]".into()),
        ("SPOOL_RATE_LIMIT__USER__PER_MINUTE", "1000000".into()),
        ("SPOOL_RATE_LIMIT__USER__BURST", "100000".into()),
        ("SPOOL_AUTH__PUBLIC_KEYS", format!("[\"{public}\"]")),
        ("SPOOL_AUTH__SECRET_KEY", secret.clone()),
        ("SPOOL_MODELS_DIR", std::env::var("SPOOL_MODELS_DIR").unwrap_or_else(|_| "models".into())),
        ("SPOOL_CONFIG", "/nonexistent".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let services = Arc::new(Services { bin, env, logs: logs.clone() });
    let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();

    let api = Arc::new(Mutex::new(services.spawn("spool-api", &[])));
    wait_ready(&client).await;
    let worker = Arc::new(Mutex::new(services.spawn("spool-worker", &[("SPOOL_WORKER__ID", "chaos-worker-1")])));

    // A user and an API token, straight in the database (as `spoolctl token mint` does).
    let db = Database::connect(format!("{SERVER}/spool_chaos")).await.unwrap();
    let email = Email::parse("chaos@example.com").unwrap();
    let user = accounts::create_verified_user(
        &db,
        &email,
        NewPassword::parse("chaos-monkey-drill-1".into()).unwrap(),
        Role::User,
    )
    .await
    .unwrap();
    let signer = TokenSigner::new(&secret, "spool").unwrap();
    let scopes = [Scope::JobsRead, Scope::JobsWrite];
    let issued =
        tokens::issue(&db, &signer, user.id, "chaos".into(), TokenLifetime::parse("1d", false).unwrap(), &scopes)
            .await
            .unwrap();
    let grant =
        TokenGrant { user_id: user.id, kind: TokenKind::Api, token_id: issued.row.id, scopes: &scopes, ttl: None };
    let token = signer.sign(&grant).unwrap();

    // Submitters: ~50 jobs/s, 32 at a time, each retried with its Idempotency-Key until a 202.
    let started = Instant::now();
    let accepted = Arc::new(Mutex::new(Vec::<Uuid>::new()));
    let client_retries = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let slots = Arc::new(Semaphore::new(32));
    let mut submitters = tokio::task::JoinSet::new();
    let pace = Duration::from_millis(20);
    let submit_all = {
        let (client, token, accepted, retries) =
            (client.clone(), token.clone(), accepted.clone(), client_retries.clone());
        tokio::spawn(async move {
            for i in 0..jobs {
                let permit = slots.clone().acquire_owned().await.unwrap();
                let (client, token, accepted, retries) =
                    (client.clone(), token.clone(), accepted.clone(), retries.clone());
                submitters.spawn(async move {
                    let body = json!({"model": "digits-cnn", "input": {"pixels": (0..64).map(|p| (p + i) % 17).collect::<Vec<_>>()}});
                    let key = format!("chaos-{i}");
                    let mut backoff = Duration::from_millis(100);
                    for _ in 0..200 {
                        let sent = client.post(format!("{API}/v1/jobs")).bearer_auth(&token).header("Idempotency-Key", &key).json(&body).send().await;
                        if let Ok(response) = sent
                            && (response.status() == 202 || response.status() == 200)
                            && let Ok(job) = response.json::<serde_json::Value>().await
                        {
                            accepted.lock().await.push(job["id"].as_str().unwrap().parse().unwrap());
                            drop(permit);
                            return;
                        }
                        retries.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                    }
                    panic!("job {i} never accepted");
                });
                tokio::time::sleep(pace).await;
            }
            while let Some(result) = submitters.join_next().await {
                result.unwrap();
            }
        })
    };

    // Faults, one after another, while the submitters run.
    let mut faults: Vec<(f64, String)> = Vec::new();
    let at = |started: Instant| started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(3)).await;
    for n in 2..=4 {
        worker.lock().await.start_kill().unwrap();
        worker.lock().await.wait().await.unwrap();
        faults.push((at(started), "SIGKILL worker".into()));
        tokio::time::sleep(Duration::from_millis(1500)).await;
        *worker.lock().await = services.spawn("spool-worker", &[("SPOOL_WORKER__ID", &format!("chaos-worker-{n}"))]);
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    faults.push((at(started), "RabbitMQ stop_app".into()));
    assert!(shell("rabbitmqctl stop_app"), "rabbitmqctl stop_app");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let broker_up = shell("rabbitmqctl start_app && rabbitmqctl await_startup");
    faults.push((at(started), format!("RabbitMQ start_app ({})", if broker_up { "up" } else { "FAILED" })));
    tokio::time::sleep(Duration::from_secs(5)).await;
    let pg = "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql | head -1) main restart";
    faults.push((at(started), "PostgreSQL restart".into()));
    let pg_up = shell(pg);
    faults.push((at(started), format!("PostgreSQL back ({})", if pg_up { "up" } else { "FAILED" })));
    tokio::time::sleep(Duration::from_secs(4)).await;
    api.lock().await.start_kill().unwrap();
    api.lock().await.wait().await.unwrap();
    faults.push((at(started), "SIGKILL API".into()));
    tokio::time::sleep(Duration::from_secs(1)).await;
    *api.lock().await = services.spawn("spool-api", &[]);
    wait_ready(&client).await;
    faults.push((at(started), "API back".into()));

    submit_all.await.unwrap();
    let last_fault = Instant::now();
    let accepted = accepted.lock().await.clone();

    // Every accepted job reaches a terminal state (bounded wait).
    let db = Database::connect(format!("{SERVER}/spool_chaos")).await.unwrap();
    let count = |sql: String| {
        let db = db.clone();
        async move {
            db.query_one_raw(Statement::from_string(DbBackend::Postgres, sql))
                .await
                .unwrap()
                .unwrap()
                .try_get::<i64>("", "n")
                .unwrap()
        }
    };
    let ids = accepted.iter().map(|id| format!("'{id}'")).collect::<Vec<_>>().join(",");
    let mut terminal = 0;
    for _ in 0..240 {
        terminal = count(format!(
            "SELECT count(*) AS n FROM jobs WHERE id IN ({ids}) AND status IN ('succeeded', 'failed', 'canceled')"
        ))
        .await;
        if terminal as usize == accepted.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let drained_in = last_fault.elapsed().as_secs_f64();
    let found = count(format!("SELECT count(*) AS n FROM jobs WHERE id IN ({ids})")).await;
    let in_db = count("SELECT count(*) AS n FROM jobs".into()).await;
    let duplicate_keys =
        count("SELECT count(*) AS n FROM (SELECT idempotency_key FROM jobs GROUP BY 1 HAVING count(*) > 1) d".into())
            .await;
    let completed_twice = count(
        "SELECT count(*) AS n FROM jobs WHERE (SELECT count(*) FROM jsonb_array_elements(attempt_log) e \
          WHERE e->>'outcome' = 'succeeded') > 1"
            .into(),
    )
    .await;
    let succeeded = count("SELECT count(*) AS n FROM jobs WHERE status = 'succeeded'".into()).await;
    let failed = count("SELECT count(*) AS n FROM jobs WHERE status = 'failed'".into()).await;
    let usage_succeeded = count("SELECT COALESCE(sum(succeeded), 0)::bigint AS n FROM usage".into()).await;
    let max_attempts = count("SELECT COALESCE(max(attempts), 0)::bigint AS n FROM jobs".into()).await;
    let retried = count("SELECT count(*) AS n FROM jobs WHERE attempts > 1".into()).await;
    let unique: HashSet<&Uuid> = accepted.iter().collect();

    println!("chaos drill: {jobs} jobs submitted at ~50/s, 32 in flight, faults:");
    for (t, fault) in &faults {
        println!("  t={t:6.1} s  {fault}");
    }
    println!(
        "client retries (refused connections, 5xx, timeouts): {}",
        client_retries.load(std::sync::atomic::Ordering::Relaxed)
    );
    println!("202s received: {} ({} distinct jobs); jobs in the database: {in_db}", accepted.len(), unique.len());
    println!(
        "terminal: {terminal} of {} (succeeded {succeeded}, failed {failed}); drained {drained_in:.1} s after the last fault",
        accepted.len()
    );
    println!("lost (202 but no row, or never terminal): {}", accepted.len() as i64 - terminal.min(found));
    println!(
        "idempotency keys with two jobs: {duplicate_keys}; jobs completed twice: {completed_twice}; usage counter {usage_succeeded} vs succeeded {succeeded}"
    );
    println!(
        "jobs that needed more than one attempt: {retried}; max attempts: {max_attempts}; total run {:.1} s",
        started.elapsed().as_secs_f64()
    );
    println!("service logs: {}", logs.display());

    let ok = found as usize == accepted.len()
        && terminal as usize == accepted.len()
        && unique.len() == jobs
        && in_db as usize == jobs
        && duplicate_keys == 0
        && completed_twice == 0
        && usage_succeeded == succeeded
        && broker_up
        && pg_up;
    drop(api);
    drop(worker);
    println!("{}", if ok { "PASS: nothing lost, nothing done twice" } else { "FAIL" });
    std::process::exit(if ok { 0 } else { 1 });
}
