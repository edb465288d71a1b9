//! Failure handling: retries with backoff, dead letters, operator requeue.

use std::time::Duration;

use chrono::{DateTime, Utc};
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use sea_orm::ConnectionTrait;
use secrecy::ExposeSecret;
use serde_json::{Value, json};
use spool_shared::Settings;
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

/// Takes the model's next message, as a worker whose attempt failed would, and sends it
/// through the retry tier (whose TTL dead-letters it back to the job queue).
async fn send_through_the_retry_tier(settings: &Settings, model: &str) {
    use futures::StreamExt;
    use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions};

    let topology = Topology::new(settings);
    let connection = lapin::Connection::connect(settings.amqp_url.expose_secret(), Default::default()).await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    let mut consumer = channel
        .basic_consume(
            topology.job_queue(model).as_str().into(),
            "retrier".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let delivery = tokio::time::timeout(Duration::from_secs(10), consumer.next()).await.unwrap().unwrap().unwrap();
    let tier = topology.retry_exchange(topology.retry_tiers()[0]);
    let properties = lapin::BasicProperties::default().with_delivery_mode(2);
    let publish = BasicPublishOptions::default();
    let confirm = channel.basic_publish(tier.as_str().into(), model.into(), publish, &delivery.data, properties);
    assert!(confirm.await.unwrap().await.unwrap().is_ack());
    delivery.ack(BasicAckOptions::default()).await.unwrap();
    connection.close(200, "done".into()).await.unwrap();
}

/// A consumer that "crashes" on the model's message every time, until the broker gives up
/// after `x-delivery-limit` and dead-letters it.
async fn crash_until_dead_lettered(settings: &Settings, model: &str) {
    use futures::StreamExt;
    use lapin::options::{BasicConsumeOptions, BasicNackOptions};

    let connection = lapin::Connection::connect(settings.amqp_url.expose_secret(), Default::default()).await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    let mut consumer = channel
        .basic_consume(
            Topology::new(settings).job_queue(model).as_str().into(),
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
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_the_broker_dead_letters_still_ends_its_job() {
    let settings = test_settings().await;
    let mut app = TestApp::start(settings.clone(), AppOptions { worker_models: vec![], ..Default::default() }).await;
    let id = app.submit("digits-cnn", json!({"pixels": vec![4; 64]})).await;
    // Retried once first: the message's first death is `expired` (out of the retry tier).
    send_through_the_retry_tier(&settings, "digits-cnn").await;
    crash_until_dead_lettered(&settings, "digits-cnn").await;

    // A worker's dead-letter sink records the job as failed: it does not stay queued.
    app.start_worker(&["digits-cnn"]).await;
    let job = app.wait_finished(&id, Duration::from_secs(30)).await;
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["dead_lettered"], true);
    assert_eq!(job["error"]["code"], "delivery_limit");
    let message = job["error"]["message"].as_str().unwrap();
    assert!(message.contains("(delivery_limit)"), "the latest death's reason: {message}");
    app.stop_worker().await;
}

/// The dead-letter sink keeps a message it cannot record yet and retries the write (before,
/// it neither acked nor nacked it: the job stayed unrecorded until the connection closed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_is_recorded_once_the_database_takes_the_write_again() {
    let settings = test_settings().await;
    let mut app = TestApp::start(settings.clone(), AppOptions { worker_models: vec![], ..Default::default() }).await;
    let id = app.submit("digits-cnn", json!({"pixels": vec![4; 64]})).await;
    crash_until_dead_lettered(&settings, "digits-cnn").await;

    // PostgreSQL refuses the sink's write (a trigger raises, as a failing database would).
    app.db
        .execute_unprepared(
            "CREATE FUNCTION refuse_write() RETURNS trigger LANGUAGE plpgsql AS $$ \
             BEGIN RAISE EXCEPTION 'simulated database failure'; END $$; \
             CREATE TRIGGER refuse_dead_letters BEFORE UPDATE ON jobs FOR EACH ROW \
             WHEN (NEW.dead_lettered) EXECUTE FUNCTION refuse_write()",
        )
        .await
        .unwrap();
    app.start_worker(&["digits-cnn"]).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let job: Value = app.get_job(&id).await.json().await.unwrap();
    assert_eq!(job["status"], "queued", "not recorded while the write fails: {job}");

    app.db.execute_unprepared("DROP TRIGGER refuse_dead_letters ON jobs").await.unwrap();
    let job = app.wait_finished(&id, Duration::from_secs(30)).await;
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["dead_lettered"], true);
    app.stop_worker().await;
}

/// A batch taken just as the model's breaker opens waits, unclaimed, until the breaker
/// admits it (before, it was claimed, refused and requeued: an attempt spent and a
/// `job.started` sent without running, a delivery counted toward the delivery limit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_taken_while_the_model_breaker_is_open_waits_for_it_unclaimed() {
    let mut settings = test_settings().await;
    settings.worker.max_attempts = 1;
    settings.worker.fail_marker = Some("POISON".into());
    // One beat at start: the API keeps accepting while this worker's breaker is open.
    settings.worker.heartbeat_interval_ms = 60_000;
    settings.worker.model_breaker = spool_shared::breaker::BreakerSettings {
        failure_rate: 0.5,
        window: 1,
        min_calls: 1,
        open_for_ms: 2000,
        probes: 1,
    };
    let app = TestApp::start(settings, AppOptions { worker_models: vec!["minilm-embed"], ..Default::default() }).await;

    // The poison opens the breaker while the consumer already waits for its next batch.
    let poison = app.submit("minilm-embed", json!({"text": "POISON"})).await;
    let poison = app.wait_finished(&poison, Duration::from_secs(30)).await;
    assert_eq!(poison["status"], "failed", "{poison}");
    let healthy = app.submit("minilm-embed", json!({"text": "arrives while the breaker is open"})).await;
    let job = app.wait_finished(&healthy, Duration::from_secs(30)).await;
    assert_eq!(job["status"], "succeeded", "{}", job["error"]);
    assert_eq!(job["attempts"], 1, "no attempt spent while the breaker refused");
    let waited = time(&job["started_at"]) - time(&poison["completed_at"]);
    assert!(waited.num_milliseconds() >= 1500, "it ran once the breaker let a probe through, after {waited}");
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
async fn a_job_that_started_in_time_keeps_its_retries_past_the_start_deadline() {
    let mut settings = test_settings().await;
    settings.amqp.retry_tiers_ms = vec![700];
    settings.worker.max_attempts = 3;
    settings.worker.fail_marker = Some("POISON".into());
    let app = TestApp::start(settings, AppOptions { worker_models: vec!["minilm-embed"], ..Default::default() }).await;
    // Its retries come back 0.7 and 1.4 s after it started, past its 1 s deadline.
    let body = json!({"model": "minilm-embed", "input": {"text": "a POISON pill"}, "start_within_secs": 1});
    let job: Value = app.post_job(&body).await.json().await.unwrap();
    let job = app.wait_finished(job["id"].as_str().unwrap(), Duration::from_secs(30)).await;
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["error"]["code"], "injected_fault", "{job}");
    assert_eq!(job["attempts"], 3, "{job}");
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
