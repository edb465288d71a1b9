//! Batch figures: how fast `POST /v1/batches` accepts jobs (10,000 items per request),
//! against single `POST /v1/jobs` requests in the same run as the baseline; and the
//! end-to-end time for 10,000 digits-cnn jobs on CPU, submit to the last job done; and
//! how long canceling a batch of 10,000 queued jobs takes.
//! Real PostgreSQL, RabbitMQ and worker. Run with `scripts/bench/batches`.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use spool_tests::{AppOptions, TestApp, model_file, test_settings};

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn ndjson(samples: &[Value], count: usize) -> String {
    (0..count)
        .map(|i| {
            json!({"input": {"pixels": samples[i % samples.len()]["pixels"]}, "custom_id": i.to_string()}).to_string()
                + "\n"
        })
        .collect()
}

async fn submit_batch(app: &TestApp, body: String) -> (Value, Duration) {
    let started = Instant::now();
    let response = app
        .client
        .post(app.url("/v1/batches?model=digits-cnn"))
        .bearer_auth(&app.token)
        .header("content-type", "application/x-ndjson")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202, "{}", response.text().await.unwrap());
    let batch: Value = response.json().await.unwrap();
    (batch, started.elapsed())
}

#[tokio::main]
async fn main() {
    let items = env_or("BENCH_ITEMS", 10_000);
    let mut settings = test_settings().await;
    settings.rate_limit.user = spool_shared::config::Quota { per_minute: 10_000_000, burst: 1_000_000 };
    settings.rate_limit.batch_jobs = settings.rate_limit.user;
    let mut app = TestApp::start(settings, AppOptions { worker_models: vec![], ..Default::default() }).await;
    let heldout = model_file("digits-cnn/heldout.json");
    let samples = heldout["samples"].as_array().unwrap().clone();

    // 1. Ingest, no worker running (the queue only grows): three batches of `items`.
    let mut rates = Vec::new();
    for _ in 0..3 {
        let (_, took) = submit_batch(&app, ndjson(&samples, items)).await;
        rates.push(items as f64 / took.as_secs_f64());
    }
    rates.sort_by(f64::total_cmp);
    println!(
        "POST /v1/batches, {items} items each: median {:.0} jobs/s accepted (runs: {})",
        rates[1],
        rates.iter().map(|r| format!("{r:.0}")).collect::<Vec<_>>().join(", ")
    );
    // Baseline in the same run: the same jobs one request each, sequential.
    let singles = 1_000;
    let started = Instant::now();
    for i in 0..singles {
        let status = app
            .client
            .post(app.url("/v1/jobs"))
            .bearer_auth(&app.token)
            .json(&json!({"model": "digits-cnn", "input": {"pixels": samples[i % samples.len()]["pixels"]}}))
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status, 202);
    }
    let single_rate = singles as f64 / started.elapsed().as_secs_f64();
    println!(
        "baseline, POST /v1/jobs one at a time ({singles} requests): {single_rate:.0} jobs/s; batches are {:.1}x",
        rates[1] / single_rate
    );

    // 2. End to end: drain what is queued, then one batch of `items` with a worker running.
    app.start_worker(&["digits-cnn"]).await;
    let drain_started = Instant::now();
    loop {
        let queued: Value = app.get_json("/v1/jobs?status=queued&limit=1").await;
        if queued["data"].as_array().unwrap().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let backlog = 3 * items + singles;
    println!(
        "backlog drained: {backlog} digits-cnn jobs in {:.1} s ({:.0} jobs/s)",
        drain_started.elapsed().as_secs_f64(),
        backlog as f64 / drain_started.elapsed().as_secs_f64()
    );
    let started = Instant::now();
    let (batch, _) = submit_batch(&app, ndjson(&samples, items)).await;
    let id = batch["id"].as_str().unwrap().to_owned();
    loop {
        let batch: Value = app.get_json(&format!("/v1/batches/{id}")).await;
        if !batch["completed_at"].is_null() {
            assert_eq!(batch["counts"]["succeeded"], items);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took = started.elapsed().as_secs_f64();
    println!(
        "end to end, one batch of {items} digits-cnn jobs on CPU: {took:.2} s from submit to the last job done ({:.0} jobs/s)",
        items as f64 / took
    );
    app.stop_worker().await;

    // 3. Canceling a whole batch of queued jobs (worker stopped, so none starts): one
    // statement, and the batch's progress counted once for it, not once per job.
    let (batch, _) = submit_batch(&app, ndjson(&samples, items)).await;
    let started = Instant::now();
    let canceled = app.post_json(&format!("/v1/batches/{}/cancel", batch["id"].as_str().unwrap())).await;
    assert_eq!(canceled["canceled"], items);
    println!("POST /v1/batches/{{id}}/cancel, {items} queued jobs: {:.0} ms", started.elapsed().as_secs_f64() * 1e3);
}
