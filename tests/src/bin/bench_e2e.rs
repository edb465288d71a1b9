//! End to end, one job per request: jobs/s from submit to `succeeded` and latency
//! percentiles, server-side (`completed_at − created_at`) and as a polling client sees it
//! (submit → `GET ?wait` answers with the finished job), at a fixed 50 jobs/s and at
//! saturation (64 and 256 clients back to back), for digits-cnn and minilm-embed on CPU;
//! at saturation both with polling clients and with clients that submit with
//! `Prefer: wait` (one request a job).
//! Real PostgreSQL, RabbitMQ, in-process API and worker. Run with `scripts/bench/e2e`.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use sea_orm::{ConnectionTrait, DbBackend, Statement};
use serde_json::{Value, json};
use spool_tests::{AppOptions, TestApp, test_settings};
use tokio::sync::Mutex;

fn input(model: &str, i: usize) -> Value {
    match model {
        "digits-cnn" => json!({"pixels": (0..64).map(|p| (p + i) % 17).collect::<Vec<_>>()}),
        _ => json!({"text": format!("sentence number {i} about the weather and the markets")}),
    }
}

fn pct(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * q).round() as usize]
}

/// How a client learns that its job finished.
#[derive(Clone, Copy)]
enum Client {
    /// Submit (202), then `GET /v1/jobs/{id}?wait=5` until the job is done.
    Polling,
    /// Submit with `Prefer: wait=60`: the answer is the finished job (one request).
    PreferWait,
}

/// One job: submit and wait for it as `client` does; returns the client-seen latency in ms.
async fn one(app: &TestApp, client: Client, model: &str, i: usize) -> f64 {
    let started = Instant::now();
    let body = json!({"model": model, "input": input(model, i)});
    let job = match client {
        Client::Polling => {
            let response = app.post_job(&body).await;
            assert_eq!(response.status(), 202);
            let id = response.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned();
            app.wait_finished(&id, Duration::from_secs(60)).await
        }
        Client::PreferWait => {
            let request = app.client.post(app.url("/v1/jobs")).bearer_auth(&app.token).header("Prefer", "wait=60");
            let response = request.json(&body).send().await.unwrap();
            let status = response.status();
            let job = response.json::<Value>().await.unwrap();
            assert_eq!(status, 200, "{job}");
            job
        }
    };
    assert_eq!(job["status"], "succeeded", "{job}");
    started.elapsed().as_secs_f64() * 1000.0
}

/// Server-side latency of every succeeded job, in ms: total (`completed_at − created_at`),
/// waiting (until a worker claimed it: `started_at`) and running (claim to result),
/// each sorted.
async fn server_side(app: &TestApp) -> [Vec<f64>; 3] {
    let rows = app
        .db
        .query_all_raw(Statement::from_string(
            DbBackend::Postgres,
            "SELECT (EXTRACT(EPOCH FROM (completed_at - created_at)) * 1000)::float8 AS total,
                    (EXTRACT(EPOCH FROM (started_at - created_at)) * 1000)::float8 AS waiting,
                    (EXTRACT(EPOCH FROM (completed_at - started_at)) * 1000)::float8 AS running
               FROM jobs WHERE status = 'succeeded'",
        ))
        .await
        .unwrap();
    ["total", "waiting", "running"].map(|column| {
        let mut ms: Vec<f64> = rows.iter().map(|r| r.try_get::<f64>("", column).unwrap()).collect();
        ms.sort_by(f64::total_cmp);
        ms
    })
}

/// How jobs arrive: at a fixed rate, or from `clients` clients each submitting its next job
/// as soon as the last one finished.
#[derive(Clone, Copy)]
enum Load {
    Rate(u64),
    Clients(usize),
}

async fn scenario(model: &'static str, client_kind: Client, load: Load, jobs: usize) {
    let mut settings = test_settings().await;
    settings.rate_limit.user = spool_shared::config::Quota { per_minute: 10_000_000, burst: 1_000_000 };
    settings.rate_limit.batch_jobs = settings.rate_limit.user;
    let app = Arc::new(TestApp::start(settings, AppOptions { worker_models: vec![model], ..Default::default() }).await);
    one(&app, client_kind, model, 0).await; // warm
    app.db.execute_unprepared("DELETE FROM jobs").await.unwrap();
    let client = Arc::new(Mutex::new(Vec::with_capacity(jobs)));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    match load {
        Load::Rate(per_second) => {
            let mut ticker = tokio::time::interval(Duration::from_micros(1_000_000 / per_second));
            for i in 0..jobs {
                ticker.tick().await;
                let (app, client) = (Arc::clone(&app), Arc::clone(&client));
                tasks.spawn(async move { client.lock().await.push(one(&app, client_kind, model, i).await) });
            }
        }
        Load::Clients(clients) => {
            for c in 0..clients {
                let (app, client) = (Arc::clone(&app), Arc::clone(&client));
                tasks.spawn(async move {
                    for i in (c..jobs).step_by(clients) {
                        let ms = one(&app, client_kind, model, i).await;
                        client.lock().await.push(ms);
                    }
                });
            }
        }
    }
    while tasks.join_next().await.is_some() {}
    let elapsed = started.elapsed().as_secs_f64();
    let mut seen = client.lock().await.clone();
    seen.sort_by(f64::total_cmp);
    let [server, waiting, running] = server_side(&app).await;
    let label = match (load, client_kind) {
        (Load::Rate(rate), _) => format!("{rate} jobs/s"),
        (Load::Clients(clients), Client::Polling) => format!("{clients} clients, polling"),
        (Load::Clients(clients), Client::PreferWait) => format!("{clients} clients, Prefer: wait"),
    };
    println!(
        "{model:13} {label:24} {:6.0} jobs/s | server p50 {:6.1} ms p99 {:6.1} ms | client p50 {:6.1} ms p99 {:6.1} ms ({jobs} jobs)",
        jobs as f64 / elapsed,
        pct(&server, 0.5),
        pct(&server, 0.99),
        pct(&seen, 0.5),
        pct(&seen, 0.99),
    );
    println!(
        "{:38} server split: waiting p50 {:6.1} p99 {:6.1} ms | running p50 {:6.1} p99 {:6.1} ms",
        "",
        pct(&waiting, 0.5),
        pct(&waiting, 0.99),
        pct(&running, 0.5),
        pct(&running, 0.99),
    );
    // Each scenario starts its own app: stop this one so its connections are returned.
    drop(tasks);
    let Ok(app) = Arc::try_unwrap(app) else { panic!("every client task has ended, and with it its handle") };
    app.stop().await;
}

/// Client counts for the saturation runs (`BENCH_CLIENTS`, default `64,256`): 64 leaves
/// the two cores partly idle, each job's serial commits and confirms bounding it.
fn saturation_clients() -> Vec<usize> {
    let list = std::env::var("BENCH_CLIENTS").unwrap_or_else(|_| "64,256".into());
    list.split(',').filter_map(|n| n.trim().parse().ok()).filter(|&n| n > 0).collect()
}

#[tokio::main]
async fn main() {
    let jobs: usize = std::env::var("BENCH_JOBS").ok().and_then(|v| v.parse().ok()).unwrap_or(4_000);
    let saturation_only = std::env::var("BENCH_SATURATION_ONLY").is_ok_and(|v| v == "1");
    let models = std::env::var("BENCH_MODELS").unwrap_or_else(|_| "digits-cnn,minilm-embed".into());
    for model in ["digits-cnn", "minilm-embed"].into_iter().filter(|m| models.split(',').any(|x| x == *m)) {
        if !saturation_only {
            scenario(model, Client::Polling, Load::Rate(50), jobs / 2).await;
        }
        for clients in saturation_clients() {
            for client in [Client::Polling, Client::PreferWait] {
                scenario(model, client, Load::Clients(clients), jobs).await;
            }
        }
    }
}
