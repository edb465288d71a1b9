//! Webhook delivery figures: latency from a job's completion (its `completed_at`) to the
//! receiver getting the event, at a moderate submit rate; and dispatcher throughput on a
//! backlog of deliveries to one receiver, with the default per-destination bound and
//! without it (same run). Real PostgreSQL, RabbitMQ, worker and HTTP receiver on
//! loopback. Run with `scripts/bench/webhooks`. Prints figures; asserts nothing.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use sea_orm::ConnectionTrait;
use serde_json::json;
use spool_api::auth::Scope;
use spool_tests::receiver::Receiver;
use spool_tests::{AppOptions, TestApp, test_settings};

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * q).round() as usize]
}

async fn subscribe(app: &TestApp, token: &str, url: &str, events: &[&str]) -> uuid::Uuid {
    let created: serde_json::Value = app
        .client
        .post(app.url("/v1/webhooks"))
        .bearer_auth(token)
        .json(&json!({"url": url, "events": events}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    created["id"].as_str().unwrap().parse().unwrap()
}

/// Queues `count` test deliveries to `subscription` in one statement, then times the
/// dispatcher until the receiver has them all.
async fn drain_backlog(app: &TestApp, subscription: uuid::Uuid, receiver: &Receiver, count: usize) -> f64 {
    let before = receiver.received().len();
    let started = Instant::now();
    app.db
        .execute_unprepared(&format!(
            "INSERT INTO webhook_deliveries (id, owner_id, subscription_id, url, event_type, payload) \
             SELECT gen_random_uuid(), s.owner_id, s.id, s.url, 'webhook.test', \
                    jsonb_build_object('type', 'webhook.test', 'timestamp', now(), 'data', jsonb_build_object('n', g)) \
               FROM webhook_subscriptions s, generate_series(1, {count}) g WHERE s.id = '{subscription}'; \
             SELECT pg_notify('spool_webhooks', '')"
        ))
        .await
        .unwrap();
    receiver.wait_for(before + count, Duration::from_secs(300)).await;
    count as f64 / started.elapsed().as_secs_f64()
}

#[tokio::main]
async fn main() {
    let jobs = env_or("BENCH_JOBS", 500);
    let backlog = env_or("BENCH_DELIVERIES", 5_000);
    let mut settings = test_settings().await;
    settings.worker.max_batch_delay_ms = Some(2);
    settings.webhooks.poll_interval_ms = 1_000; // woken by NOTIFY, as in production
    settings.rate_limit.user = spool_shared::config::Quota { per_minute: 10_000_000, burst: 1_000_000 };
    settings.rate_limit.batch_jobs = settings.rate_limit.user;
    let mut app = TestApp::start(
        settings.clone(),
        AppOptions { worker_models: vec!["digits-cnn"], dispatcher: true, ..Default::default() },
    )
    .await;
    let token = app
        .api_token(app.user_id, &[Scope::Webhooks, Scope::JobsWrite, Scope::JobsRead], Duration::from_secs(3600))
        .await;

    // 1. Latency: jobs at ~50/s, one `job.succeeded` subscription.
    let receiver = Receiver::start().await;
    subscribe(&app, &token, &receiver.url(), &["job.succeeded"]).await;
    let pace = Duration::from_millis(20);
    let mut ticker = tokio::time::interval(pace);
    for i in 0..jobs {
        ticker.tick().await;
        let pixels: Vec<usize> = (0..64).map(|p| (p + i) % 17).collect();
        app.submit("digits-cnn", json!({"pixels": pixels})).await;
    }
    let received = receiver.wait_for(jobs, Duration::from_secs(120)).await;
    let mut latencies: Vec<f64> = received
        .iter()
        .map(|r| {
            let completed: chrono::DateTime<chrono::Utc> =
                r.json()["data"]["completed_at"].as_str().unwrap().parse().unwrap();
            (r.at - completed).num_microseconds().unwrap() as f64 / 1000.0
        })
        .collect();
    latencies.sort_by(f64::total_cmp);
    let mean = latencies.iter().sum::<f64>() / latencies.len() as f64;
    println!(
        "delivery latency after job completion ({jobs} jobs at 50/s): p50 {:.1} ms, p99 {:.1} ms, mean {mean:.1} ms, max {:.1} ms",
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        latencies[latencies.len() - 1]
    );

    // 2. Throughput on a backlog to one host: default bound (8 in flight per host), then 64.
    let backlog_receiver = Receiver::start().await;
    let subscription = subscribe(&app, &token, &backlog_receiver.url(), &["job.failed"]).await;
    let bounded = drain_backlog(&app, subscription, &backlog_receiver, backlog).await;
    println!(
        "dispatcher throughput, {backlog} deliveries to one host, per_destination {}: {bounded:.0} deliveries/s",
        settings.webhooks.per_destination
    );
    app.kill_dispatcher().await;
    app.settings.webhooks.per_destination = 64;
    app.start_dispatcher().await;
    let wide = drain_backlog(&app, subscription, &backlog_receiver, backlog).await;
    println!(
        "dispatcher throughput, {backlog} deliveries to one host, per_destination 64: {wide:.0} deliveries/s ({:.2}x)",
        wide / bounded
    );
    app.stop_worker().await;
}
