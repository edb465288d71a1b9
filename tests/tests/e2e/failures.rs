//! Failure handling: retries with backoff, dead letters, operator requeue.

use std::time::Duration;

use chrono::{DateTime, Utc};
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use sea_orm::ConnectionTrait;
use secrecy::ExposeSecret;
use serde_json::{Value, json};
use spool_shared::amqp::Topology;
use spool_tests::{AppOptions, StatusCode, TestApp, test_settings};

fn time(value: &Value) -> DateTime<Utc> {
    value.as_str().unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_job_is_dead_lettered_after_max_attempts_then_requeued_once_fixed() {
    let mut settings = test_settings().await;
    settings.amqp.retry_tiers_ms = vec![300, 600, 1200];
    settings.worker.max_attempts = 3;
    settings.worker.fail_marker = Some("POISON".into());
    let mut app =
        TestApp::start(settings.clone(), AppOptions { worker_models: vec!["minilm-embed"], ..Default::default() })
            .await;

    let poison = app.submit("minilm-embed", json!({"text": "a POISON pill"})).await;
    let healthy = app.submit("minilm-embed", json!({"text": "a healthy sentence"})).await;
    let job = app.wait_finished(&poison, Duration::from_secs(30)).await;
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["dead_lettered"], true);
    assert_eq!(job["attempts"], 3, "exactly max_attempts");
    assert_eq!(job["error"]["code"], "injected_fault");
    assert_eq!(app.wait_finished(&healthy, Duration::from_secs(10)).await["status"], "succeeded");

    // The operator's view: every attempt, with the backoff between them.
    let operator = app.new_operator_token().await;
    let letters: Value = app.get_json_as("/v1/admin/dead-letters?model=minilm-embed", &operator).await;
    let letter = &letters["data"][0];
    assert_eq!(letter["job_id"], poison.as_str());
    assert!(letter["input_summary"].as_str().unwrap().contains("POISON"));
    let log = letter["attempt_log"].as_array().unwrap();
    let outcomes: Vec<&str> = log.iter().map(|a| a["outcome"].as_str().unwrap()).collect();
    assert_eq!(outcomes, ["retry", "retry", "dead_lettered"]);
    // Each retry started at least its tier's delay after the previous attempt started
    // (the message enters the delay queue before the attempt's result is written).
    for (i, minimum_ms) in [(0, 300), (1, 600)] {
        let waited = time(&log[i + 1]["started_at"]) - time(&log[i]["started_at"]);
        assert!(waited.num_milliseconds() >= minimum_ms, "backoff {i}: waited {waited}");
    }

    // Its message went through the dead-letter queue, which the workers drain once the
    // job is recorded (PostgreSQL is what operators work from).
    let connection = lapin::Connection::connect(settings.amqp_url.expose_secret(), Default::default()).await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    let mut drained = false;
    for _ in 0..50 {
        let dead = channel
            .queue_declare(
                Topology::new(&settings).dead_queue().as_str().into(),
                QueueDeclareOptions { passive: true, ..Default::default() },
                FieldTable::default(),
            )
            .await
            .unwrap();
        if dead.message_count() == 0 {
            drained = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(drained);

    // A user cannot reach operator endpoints.
    let refused = app.client.get(app.url("/v1/admin/dead-letters")).bearer_auth(&app.token).send().await.unwrap();
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);

    // "Fix" the model: a worker without the fault; then requeue.
    app.stop_worker().await;
    let mut fixed = settings.clone();
    fixed.worker.fail_marker = None;
    app.settings = fixed;
    app.start_worker(&["minilm-embed"]).await;
    let requeued: Value = app
        .client
        .post(app.url("/v1/admin/dead-letters/requeue"))
        .bearer_auth(&operator)
        .json(&json!({"ids": [poison]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(requeued["count"], 1);
    let job = app.wait_finished(&poison, Duration::from_secs(30)).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["dead_lettered"], false);
    assert_eq!(job["attempts"], 1, "a fresh attempt budget");
    let history = app
        .db
        .query_one_raw(sea_orm::Statement::from_string(
            sea_orm::DbBackend::Postgres,
            format!("SELECT jsonb_array_length(attempt_log) AS n FROM jobs WHERE id = '{poison}'"),
        ))
        .await
        .unwrap()
        .unwrap()
        .try_get::<i32>("", "n")
        .unwrap();
    assert_eq!(history, 4, "earlier attempts are kept");
    let audited = app
        .db
        .query_one_raw(sea_orm::Statement::from_string(
            sea_orm::DbBackend::Postgres,
            "SELECT count(*) AS n FROM audit_log WHERE action = 'dead_letters.requeue' AND affected = 1".to_owned(),
        ))
        .await
        .unwrap()
        .unwrap()
        .try_get::<i64>("", "n")
        .unwrap();
    assert_eq!(audited, 1);

    let empty: Value = app.get_json_as("/v1/admin/dead-letters", &operator).await;
    assert!(empty["data"].as_array().unwrap().is_empty());
    app.stop_worker().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_model_opens_its_breaker_the_api_answers_503_and_it_recovers_by_itself() {
    let mut settings = test_settings().await;
    settings.amqp.retry_tiers_ms = vec![100];
    settings.worker.max_attempts = 50;
    settings.worker.fail_marker = Some("POISON".into());
    settings.worker.heartbeat_interval_ms = 200;
    settings.worker.model_breaker = spool_shared::breaker::BreakerSettings {
        failure_rate: 0.5,
        window: 2,
        min_calls: 2,
        open_for_ms: 1500,
        probes: 1,
    };
    let app = TestApp::start(settings, AppOptions { worker_models: vec!["minilm-embed"], ..Default::default() }).await;
    let operator = app.new_operator_token().await;
    let breakers = || async {
        let list: Value = app.get_json_as("/v1/admin/breakers", &operator).await;
        list["data"].as_array().unwrap().iter().find(|m| m["model"] == "minilm-embed").cloned().unwrap()
    };

    let mut poison = Vec::new();
    for i in 0..3 {
        poison.push(app.submit("minilm-embed", json!({"text": format!("POISON {i}")})).await);
    }
    let mut opened = false;
    for _ in 0..100 {
        let state = breakers().await;
        if state["open"] == 1 && state["accepting"] == false {
            opened = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(opened, "the breaker opened: {}", breakers().await);

    let healthy = json!({"model": "minilm-embed", "input": {"text": "all is well"}});
    let refused = app.post_job(&healthy).await;
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(refused.headers().contains_key("retry-after"));
    assert_eq!(refused.json::<Value>().await.unwrap()["code"], "model_unavailable");

    // The failure stops (the poison is withdrawn); the breaker probes and closes by itself.
    for id in &poison {
        app.client.post(app.url(&format!("/v1/jobs/{id}/cancel"))).bearer_auth(&app.token).send().await.unwrap();
    }
    let mut accepted = None;
    for _ in 0..100 {
        let response = app.post_job(&healthy).await;
        if response.status() == StatusCode::ACCEPTED {
            accepted = Some(response.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let id = accepted.expect("accepted again once the breaker is half-open");
    assert_eq!(app.wait_finished(&id, Duration::from_secs(30)).await["status"], "succeeded");
    let mut closed = false;
    for _ in 0..50 {
        if breakers().await["closed"] == 1 {
            closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(closed, "the breaker closed after a good probe: {}", breakers().await);

    let workers: Value = app.get_json_as("/v1/admin/workers", &operator).await;
    assert_eq!(workers["data"][0]["breakers"]["minilm-embed"], "closed");
    assert_eq!(workers["data"][0]["device"], "cpu");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_the_broker_dead_letters_still_ends_its_job() {
    use futures::StreamExt;
    use lapin::options::{BasicConsumeOptions, BasicNackOptions};

    let settings = test_settings().await;
    let mut app = TestApp::start(settings.clone(), AppOptions { worker_models: vec![], ..Default::default() }).await;
    let id = app.submit("digits-cnn", json!({"pixels": vec![4; 64]})).await;

    // A consumer that "crashes" on the message every time: the broker gives up after
    // x-delivery-limit and dead-letters it.
    let connection = lapin::Connection::connect(settings.amqp_url.expose_secret(), Default::default()).await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    let mut consumer = channel
        .basic_consume(
            Topology::new(&settings).job_queue("digits-cnn").as_str().into(),
            "crasher".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut deliveries = 0;
    while let Ok(Some(Ok(delivery))) = tokio::time::timeout(Duration::from_secs(2), consumer.next()).await {
        deliveries += 1;
        delivery.nack(BasicNackOptions { requeue: true, ..Default::default() }).await.unwrap();
    }
    assert_eq!(deliveries, spool_shared::amqp::DELIVERY_LIMIT + 1);
    connection.close(200, "done".into()).await.unwrap();

    // A worker's dead-letter sink records the job as failed: it does not stay queued.
    app.start_worker(&["digits-cnn"]).await;
    let job = app.wait_finished(&id, Duration::from_secs(30)).await;
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["dead_lettered"], true);
    assert_eq!(job["error"]["code"], "delivery_limit");
    app.stop_worker().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_past_its_start_deadline_fails_without_running() {
    let mut app =
        TestApp::start(test_settings().await, AppOptions { worker_models: vec![], ..Default::default() }).await;
    let late =
        app.post_job(&json!({"model": "digits-cnn", "input": {"pixels": vec![0; 64]}, "start_within_secs": 1})).await;
    assert_eq!(late.status(), StatusCode::ACCEPTED);
    let late: Value = late.json().await.unwrap();
    assert!(late["start_deadline"].is_string());
    let in_time = app
        .post_job(&json!({"model": "digits-cnn", "input": {"pixels": vec![0; 64]}, "start_within_secs": 600}))
        .await
        .json::<Value>()
        .await
        .unwrap();
    let invalid =
        app.post_job(&json!({"model": "digits-cnn", "input": {"pixels": vec![0; 64]}, "start_within_secs": 0})).await;
    assert_eq!(invalid.status(), StatusCode::BAD_REQUEST);

    tokio::time::sleep(Duration::from_millis(1500)).await;
    app.start_worker(&["digits-cnn"]).await;
    let late = app.wait_finished(late["id"].as_str().unwrap(), Duration::from_secs(30)).await;
    assert_eq!(late["status"], "failed", "{late}");
    assert_eq!(late["error"]["code"], "deadline_exceeded");
    assert_eq!(late["attempts"], 0, "never run");
    assert!(late["started_at"].is_null());
    let in_time = app.wait_finished(in_time["id"].as_str().unwrap(), Duration::from_secs(30)).await;
    assert_eq!(in_time["status"], "succeeded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forward_past_the_execution_timeout_fails_as_retryable_timeout() {
    let mut settings = test_settings().await;
    settings.worker.execution_timeout_ms = 1; // no forward is that fast
    settings.worker.max_attempts = 2;
    settings.amqp.retry_tiers_ms = vec![100];
    let app = TestApp::start(settings, AppOptions { worker_models: vec!["minilm-embed"], ..Default::default() }).await;
    let id = app.submit("minilm-embed", json!({"text": "slow enough"})).await;
    let job = app.wait_finished(&id, Duration::from_secs(30)).await;
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["error"]["code"], "timeout");
    assert_eq!(job["error"]["retryable"], true);
    assert_eq!(job["attempts"], 2);
    assert_eq!(job["dead_lettered"], true);
}
