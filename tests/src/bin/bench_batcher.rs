//! The dynamic batcher: 64 concurrent clients each submitting single jobs and waiting for
//! them (`Prefer: wait`), first with the manifest's batching, then with `max_batch_size` 1
//! in the same run, for each model in `BENCH_MODELS` (default both). Prints throughput and
//! the mean batch size the jobs ran in. digits-cnn's forward is nearly free, so its ratio
//! is what batching saves in the pipeline (claims, writes, acks); minilm-embed's is bound
//! by its forward on the CPU. Real PostgreSQL, RabbitMQ and worker (CPU). Run with
//! `scripts/bench/batcher`.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use sea_orm::{ConnectionTrait, DbBackend, Statement};
use serde_json::json;
use spool_tests::{AppOptions, TestApp, test_settings};

const SENTENCES: &[&str] = &[
    "a cat sits on the mat",
    "the quarterly report shows revenue growing faster than costs",
    "how do I reset my password if I no longer have access to my email",
    "stock markets fell sharply after the central bank raised interest rates",
    "the recipe needs two cups of flour, one egg and a pinch of salt",
    "our flight was delayed by three hours because of the storm",
];

fn input(model: &str, n: usize) -> serde_json::Value {
    match model {
        "digits-cnn" => json!({"pixels": (0..64).map(|p| (p + n) % 17).collect::<Vec<_>>()}),
        _ => json!({"text": SENTENCES[n % SENTENCES.len()]}),
    }
}

async fn run(model: &'static str, max_batch_size: Option<usize>, clients: usize, seconds: u64) -> (f64, f64, usize) {
    let mut settings = test_settings().await;
    settings.worker.max_batch_size = max_batch_size;
    settings.rate_limit.user = spool_shared::config::Quota { per_minute: 10_000_000, burst: 1_000_000 };
    settings.rate_limit.batch_jobs = settings.rate_limit.user;
    let app = Arc::new(TestApp::start(settings, AppOptions { worker_models: vec![model], ..Default::default() }).await);
    let done = Arc::new(AtomicUsize::new(0));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut tasks = tokio::task::JoinSet::new();
    for client in 0..clients {
        let (app, done) = (Arc::clone(&app), Arc::clone(&done));
        tasks.spawn(async move {
            let mut n = client;
            while Instant::now() < deadline {
                let body = json!({"model": model, "input": input(model, n)});
                let response = app
                    .client
                    .post(app.url("/v1/jobs"))
                    .bearer_auth(&app.token)
                    .header("Prefer", "wait=30")
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status(), 200, "finished within the wait");
                done.fetch_add(1, Ordering::Relaxed);
                n += clients;
            }
        });
    }
    let started = Instant::now();
    while tasks.join_next().await.is_some() {}
    let elapsed = started.elapsed().as_secs_f64();
    let mean: f64 = app
        .db
        .query_one_raw(Statement::from_string(
            DbBackend::Postgres,
            "SELECT avg(batch_size)::float8 AS mean FROM jobs WHERE status = 'succeeded'",
        ))
        .await
        .unwrap()
        .unwrap()
        .try_get("", "mean")
        .unwrap();
    let jobs = done.load(Ordering::Relaxed);
    drop(tasks);
    let Ok(app) = Arc::try_unwrap(app) else { panic!("every client task has ended, and with it its handle") };
    app.stop().await;
    (jobs as f64 / elapsed, mean, jobs)
}

#[tokio::main]
async fn main() {
    let clients = 64;
    let seconds = std::env::var("BENCH_SECONDS").ok().and_then(|v| v.parse().ok()).unwrap_or(20);
    let wanted = std::env::var("BENCH_MODELS").unwrap_or_else(|_| "digits-cnn,minilm-embed".into());
    for model in ["digits-cnn", "minilm-embed"].into_iter().filter(|m| wanted.split(',').any(|w| w.trim() == *m)) {
        let (batched, batched_mean, batched_jobs) = run(model, None, clients, seconds).await;
        let (single, single_mean, single_jobs) = run(model, Some(1), clients, seconds).await;
        println!("{model}, {clients} clients submitting one job each and waiting, {seconds} s per run, CPU:");
        println!("  manifest batching:  {batched:.0} jobs/s ({batched_jobs} jobs), mean batch size {batched_mean:.1}");
        println!("  max_batch_size 1:   {single:.0} jobs/s ({single_jobs} jobs), mean batch size {single_mean:.1}");
        println!("  batching gives {:.2}x the throughput", batched / single);
    }
}
