//! Webhooks against real HTTP receivers on loopback (allowlisted in the test settings),
//! verified with the official Standard Webhooks Python library.

use std::collections::HashSet;
use std::time::Duration;

use sea_orm::{ConnectionTrait, DbBackend, Statement};
use secrecy::SecretString;
use serde_json::{Value, json};
use spool_api::auth::Scope;
use spool_shared::sealing::generate_sealing_key;
use spool_tests::receiver::{Receiver, verify_with_standard_webhooks};
use spool_tests::{AppOptions, StatusCode, TestApp, test_settings};

async fn app_with_dispatcher(worker: bool) -> (TestApp, String) {
    let models = if worker { vec!["digits-cnn"] } else { vec![] };
    let app = TestApp::start(
        test_settings().await,
        AppOptions { worker_models: models, dispatcher: true, ..Default::default() },
    )
    .await;
    let token = app
        .api_token(app.user_id, &[Scope::Webhooks, Scope::JobsRead, Scope::JobsWrite], Duration::from_secs(3600))
        .await;
    (app, token)
}

async fn subscribe(app: &TestApp, token: &str, url: &str, events: &[&str]) -> (String, String) {
    let (status, created) =
        app.call(token, reqwest::Method::POST, "/v1/webhooks", Some(json!({"url": url, "events": events}))).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    (created["id"].as_str().unwrap().to_owned(), created["secret"].as_str().unwrap().to_owned())
}

async fn deliveries(app: &TestApp, token: &str, subscription: &str) -> Vec<Value> {
    let path = format!("/v1/webhooks/{subscription}/deliveries");
    app.call(token, reqwest::Method::GET, &path, None).await.1["data"].as_array().unwrap().clone()
}

/// The subscription's delivery log once its newest delivery has succeeded (or after 5 s,
/// for the caller's assertion to report).
async fn deliveries_once_succeeded(app: &TestApp, token: &str, subscription: &str) -> Vec<Value> {
    let mut log = Vec::new();
    for _ in 0..50 {
        log = deliveries(app, token, subscription).await;
        if log[0]["status"] == "succeeded" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    log
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_events_reach_subscriptions_and_job_webhooks_signed_per_standard_webhooks() {
    let (app, token) = app_with_dispatcher(true).await;
    let account = Receiver::start().await;
    let per_job = Receiver::start().await;
    let (_, secret) = subscribe(&app, &token, &account.url(), &["job.started", "job.succeeded"]).await;
    let response = app
        .post_job(&json!({
            "model": "digits-cnn", "input": {"pixels": vec![4; 64]},
            "webhook": per_job.url(), "webhook_events": ["started", "completed"],
        }))
        .await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let job_id = response.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned();
    // The submission made the account's job secret; asking for it now shows that one.
    let (_, job_secret) = app.call(&token, reqwest::Method::GET, "/v1/webhooks/job-secret", None).await;
    let job_secret = job_secret["secret"].as_str().unwrap().to_owned();
    let finished = app.wait_finished(&job_id, Duration::from_secs(30)).await;
    let fields = |job: &Value| job.as_object().unwrap().keys().cloned().collect::<Vec<_>>();

    for (receiver, secret) in [(&account, &secret), (&per_job, &job_secret)] {
        let received = receiver.wait_for(2, Duration::from_secs(15)).await;
        let mut types: Vec<String> = received.iter().map(|r| r.json()["type"].as_str().unwrap().to_owned()).collect();
        types.sort();
        assert_eq!(types, ["job.started", "job.succeeded"]);
        for delivery in &received {
            verify_with_standard_webhooks(secret, delivery).expect("the official library verifies the signature");
            assert!(delivery.header("webhook-id").starts_with("msg_"));
            let body = delivery.json();
            assert_eq!(body["data"]["id"], job_id.as_str());
            assert!(body["timestamp"].is_string());
            if body["type"] == "job.succeeded" {
                assert_eq!(body["data"]["status"], "succeeded");
                assert!(body["data"]["output"].is_object(), "{body}");
                // The job as GET /v1/jobs/{id} shows it.
                assert_eq!(fields(&body["data"]), fields(&finished), "{body}");
                assert_eq!(body["data"]["request_id"], finished["request_id"]);
            }
        }
        let ids: HashSet<&str> = received.iter().map(|r| r.header("webhook-id")).collect();
        assert_eq!(ids.len(), 2, "one id per event");
    }
    assert!(verify_with_standard_webhooks(&secret, &per_job.received()[0]).is_err(), "secrets are not shared");

    // The job's own log of its deliveries: both events, to both targets, all delivered.
    let path = format!("/v1/jobs/{job_id}/deliveries");
    let mut log = Vec::new();
    for _ in 0..50 {
        log = app.call(&token, reqwest::Method::GET, &path, None).await.1["data"].as_array().unwrap().clone();
        if log.len() == 4 && log.iter().all(|d| d["status"] == "succeeded") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut seen: Vec<(String, bool)> =
        log.iter().map(|d| (d["event_type"].as_str().unwrap().to_owned(), d["subscription_id"].is_null())).collect();
    seen.sort();
    let expected = [("job.started", false), ("job.started", true), ("job.succeeded", false), ("job.succeeded", true)];
    assert_eq!(seen, expected.map(|(e, per_job)| (e.to_owned(), per_job)), "{log:?}");
    assert!(log.iter().all(|d| d["status"] == "succeeded" && d["job_id"] == job_id.as_str()), "{log:?}");

    // A script with only the job scopes may resend its job's own deliveries, not the
    // subscriptions' ones.
    let jobs_only = app.api_token(app.user_id, &[Scope::JobsRead, Scope::JobsWrite], Duration::from_secs(600)).await;
    for delivery in &log {
        let path = format!("/v1/webhooks/deliveries/{}/retry", delivery["id"].as_str().unwrap());
        let (status, body) = app.call(&jobs_only, reqwest::Method::POST, &path, None).await;
        if delivery["subscription_id"].is_null() {
            assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        } else {
            assert_eq!((status, body["code"].as_str()), (StatusCode::FORBIDDEN, Some("insufficient_scope")));
        }
    }
    per_job.wait_for(4, Duration::from_secs(15)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ndjson_batch_carries_its_webhook_in_the_query() {
    let (app, token) = app_with_dispatcher(true).await;
    let receiver = Receiver::start().await;
    let url = receiver.url();
    let body: String = (0..3).map(|i| json!({"input": {"pixels": vec![i; 64]}}).to_string() + "\n").collect();
    let post = |query: Vec<(&'static str, &str)>, content_type: &'static str, body: String| {
        let request = app.client.post(app.url("/v1/batches")).query(&query).bearer_auth(&token);
        request.header("content-type", content_type).body(body).send()
    };
    let query = vec![
        ("model", "digits-cnn"),
        ("webhook", url.as_str()),
        ("webhook_events", "started"),
        ("webhook_events", "completed"),
    ];
    let response = post(query, "application/x-ndjson", body).await.unwrap();
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let batch_id = response.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned();

    let received = receiver.wait_for(7, Duration::from_secs(30)).await;
    let mut types: Vec<String> = received.iter().map(|r| r.json()["type"].as_str().unwrap().to_owned()).collect();
    types.sort();
    let expected = ["batch.completed", "job.started", "job.started", "job.started"];
    assert_eq!(types[..4], expected, "{types:?}");
    assert_eq!(types[4..], ["job.succeeded"; 3], "{types:?}");
    let (_, job_secret) = app.call(&token, reqwest::Method::GET, "/v1/webhooks/job-secret", None).await;
    for delivery in &received {
        verify_with_standard_webhooks(job_secret["secret"].as_str().unwrap(), delivery).expect("signed");
    }
    let completed = received.iter().map(|r| r.json()).find(|b| b["type"] == "batch.completed").unwrap();
    assert_eq!(completed["data"]["id"], batch_id.as_str());

    // A JSON batch has its webhook in the body; one in the query is refused, not ignored.
    let json_body = json!({"model": "digits-cnn", "items": [{"input": {"pixels": vec![0; 64]}}]}).to_string();
    let response = post(vec![("webhook", url.as_str())], "application/json", json_body).await.unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert_eq!(response.json::<Value>().await.unwrap()["code"], "invalid_request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_has_at_most_fifty_subscriptions() {
    let (app, token) = app_with_dispatcher(false).await;
    for _ in 0..50 {
        subscribe(&app, &token, "http://127.0.0.1:9/spool", &["job.succeeded"]).await;
    }
    let body = json!({"url": "http://127.0.0.1:9/spool", "events": ["job.succeeded"]});
    let (status, problem) = app.call(&token, reqwest::Method::POST, "/v1/webhooks", Some(body)).await;
    assert_eq!((status, problem["code"].as_str()), (StatusCode::CONFLICT, Some("limit_reached")), "{problem}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_secret_and_the_previous_one_both_verify_for_a_day() {
    let (app, token) = app_with_dispatcher(false).await;
    let receiver = Receiver::start().await;
    let (id, old) = subscribe(&app, &token, &receiver.url(), &["job.succeeded"]).await;
    let (status, rotated) =
        app.call(&token, reqwest::Method::POST, &format!("/v1/webhooks/{id}/rotate-secret"), None).await;
    assert_eq!(status, StatusCode::OK);
    let new = rotated["secret"].as_str().unwrap();
    assert_ne!(new, old);
    let (status, _) = app.call(&token, reqwest::Method::POST, &format!("/v1/webhooks/{id}/test"), None).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let received = receiver.wait_for(1, Duration::from_secs(10)).await;
    assert_eq!(received[0].json()["type"], "webhook.test");
    verify_with_standard_webhooks(new, &received[0]).expect("new secret verifies");
    verify_with_standard_webhooks(&old, &received[0]).expect("old secret still verifies");
}

/// The stored form of a subscription's secret.
async fn stored_secret(app: &TestApp, subscription: &str) -> String {
    let row = app
        .db
        .query_one_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT secret FROM webhook_subscriptions WHERE id = $1::uuid",
            [subscription.into()],
        ))
        .await
        .unwrap()
        .unwrap();
    row.try_get("", "secret").unwrap()
}

async fn set_stored_secret(app: &TestApp, subscription: &str, stored: &str) {
    app.db
        .execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "UPDATE webhook_subscriptions SET secret = $2 WHERE id = $1::uuid",
            [subscription.into(), stored.into()],
        ))
        .await
        .unwrap();
}

/// Rotates the sealing key as an operator would: a new key first in the API's and the
/// dispatcher's settings, then both restarted.
async fn put_a_new_sealing_key_first(app: &mut TestApp) {
    let mut rotated = app.settings.clone();
    rotated.webhooks.sealing_keys.insert(0, SecretString::from(generate_sealing_key().unwrap()));
    app.settings = rotated.clone();
    app.restart_api(rotated).await;
    app.kill_dispatcher().await;
    app.start_dispatcher().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_are_sealed_at_rest_bound_to_their_row_and_sealed_anew_at_start_when_stale() {
    let (mut app, token) = app_with_dispatcher(false).await;
    let receiver = Receiver::start().await;
    let (first, secret) = subscribe(&app, &token, &receiver.url(), &["job.succeeded"]).await;
    let sealed = stored_secret(&app, &first).await;
    assert!(sealed.starts_with("v4.local."), "{sealed}");
    assert!(!sealed.contains(secret.trim_start_matches("whsec_")));

    // A secret stored in clear (before sealing existed) still signs, and the API seals
    // it when it starts.
    let (second, _) = subscribe(&app, &token, &receiver.url(), &["job.succeeded"]).await;
    let clear = spool_shared::webhooks::new_secret();
    set_stored_secret(&app, &second, &clear).await;
    app.restart_api(app.settings.clone()).await;
    let resealed = stored_secret(&app, &second).await;
    assert!(resealed.starts_with("v4.local."), "{resealed}");
    app.call(&token, reqwest::Method::POST, &format!("/v1/webhooks/{second}/test"), None).await;
    let received = receiver.wait_for(1, Duration::from_secs(10)).await;
    verify_with_standard_webhooks(&clear, &received[0]).expect("the secret sealed at start signs");

    // A new sealing key goes first: at start the API seals every secret anew with it, and
    // the dispatcher, given the same keys, still signs with the same secrets.
    put_a_new_sealing_key_first(&mut app).await;
    let resealed = stored_secret(&app, &first).await;
    assert!(resealed.starts_with("v4.local.") && resealed != sealed, "{resealed}");
    app.call(&token, reqwest::Method::POST, &format!("/v1/webhooks/{first}/test"), None).await;
    let received = receiver.wait_for(2, Duration::from_secs(10)).await;
    verify_with_standard_webhooks(&secret, &received[1]).expect("the secret sealed with the new key signs");

    // A sealed secret copied into another row does not open there: nothing goes out
    // unsigned or signed with the wrong secret.
    set_stored_secret(&app, &second, &sealed).await;
    app.call(&token, reqwest::Method::POST, &format!("/v1/webhooks/{second}/test"), None).await;
    let mut log = Vec::new();
    for _ in 0..50 {
        log = deliveries(&app, &token, &second).await;
        if log[0]["last_error"].is_string() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(log[0]["last_error"], "no signing secret", "{}", log[0]);
    assert_eq!(receiver.received().len(), 2, "nothing more was sent");
}

/// The account's stored previous per-job secret.
async fn stored_previous_job_secret(app: &TestApp) -> String {
    let row = app
        .db
        .query_one_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT previous_webhook_secret FROM users WHERE id = $1",
            [app.user_id.into()],
        ))
        .await
        .unwrap()
        .unwrap();
    row.try_get("", "previous_webhook_secret").unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_job_secret_rotates_and_the_previous_one_signs_for_a_day_even_across_a_sealing_key_rotation() {
    let (mut app, token) = app_with_dispatcher(true).await;
    let receiver = Receiver::start().await;
    let (_, old) = app.call(&token, reqwest::Method::GET, "/v1/webhooks/job-secret", None).await;
    let old = old["secret"].as_str().unwrap().to_owned();
    let (status, new) = app.call(&token, reqwest::Method::POST, "/v1/webhooks/job-secret/rotate", None).await;
    assert_eq!(status, StatusCode::OK);
    let new = new["secret"].as_str().unwrap().to_owned();
    assert_ne!(new, old);
    let (_, shown) = app.call(&token, reqwest::Method::GET, "/v1/webhooks/job-secret", None).await;
    assert_eq!(shown["secret"], new.as_str());

    // The API seals the previous secret anew with a new first sealing key, too.
    let before = stored_previous_job_secret(&app).await;
    put_a_new_sealing_key_first(&mut app).await;
    let after = stored_previous_job_secret(&app).await;
    assert!(after.starts_with("v4.local.") && after != before, "{after}");

    let job = json!({"model": "digits-cnn", "input": {"pixels": vec![2; 64]}, "webhook": receiver.url()});
    assert_eq!(app.post_job(&job).await.status(), StatusCode::ACCEPTED);
    let received = receiver.wait_for(1, Duration::from_secs(15)).await;
    verify_with_standard_webhooks(&new, &received[0]).expect("the new secret signs");
    verify_with_standard_webhooks(&old, &received[0]).expect("the previous secret still signs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_are_retried_with_the_same_id_logged_redelivered_by_hand_and_410_disables() {
    let (app, token) = app_with_dispatcher(false).await;
    let receiver = Receiver::start().await;
    let (id, secret) = subscribe(&app, &token, &receiver.url(), &["job.succeeded"]).await;
    receiver.answer(&[500, 503]);
    app.call(&token, reqwest::Method::POST, &format!("/v1/webhooks/{id}/test"), None).await;
    let received = receiver.wait_for(3, Duration::from_secs(15)).await;
    let ids: HashSet<&str> = received.iter().map(|r| r.header("webhook-id")).collect();
    assert_eq!(ids.len(), 1, "the same webhook-id on every retry");
    let log = deliveries_once_succeeded(&app, &token, &id).await;
    let delivery = &log[0];
    assert_eq!(delivery["status"], "succeeded", "{delivery}");
    assert_eq!(delivery["attempts"], 3);
    let codes: Vec<i64> =
        delivery["attempt_log"].as_array().unwrap().iter().map(|a| a["status_code"].as_i64().unwrap()).collect();
    assert_eq!(codes, [500, 503, 200]);
    assert!(delivery["last_latency_ms"].is_i64());

    // By hand: sent again now, same id.
    let delivery_id = delivery["id"].as_str().unwrap();
    let path = format!("/v1/webhooks/deliveries/{delivery_id}/retry");
    assert_eq!(app.call(&token, reqwest::Method::POST, &path, None).await.0, StatusCode::ACCEPTED);
    let again = receiver.wait_for(4, Duration::from_secs(10)).await;
    assert_eq!(again[3].header("webhook-id"), again[0].header("webhook-id"));

    // 410 Gone: the subscription is disabled, nothing more is sent.
    receiver.answer(&[410]);
    app.call(&token, reqwest::Method::POST, &format!("/v1/webhooks/{id}/test"), None).await;
    receiver.wait_for(5, Duration::from_secs(10)).await;
    let mut disabled = Value::Null;
    for _ in 0..50 {
        disabled = app.call(&token, reqwest::Method::GET, &format!("/v1/webhooks/{id}"), None).await.1;
        if !disabled["disabled_at"].is_null() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!disabled["disabled_at"].is_null(), "{disabled}");
    let (status, problem) = app.call(&token, reqwest::Method::POST, &format!("/v1/webhooks/{id}/test"), None).await;
    assert_eq!(status, StatusCode::CONFLICT, "a disabled subscription takes no test: {problem}");
    assert_eq!(problem["code"], "webhook_disabled");

    // Re-enabled by its owner, with the same id and secret, it takes events again.
    let path = format!("/v1/webhooks/{id}");
    let (status, enabled) = app.call(&token, reqwest::Method::PATCH, &path, Some(json!({"enabled": true}))).await;
    assert_eq!(status, StatusCode::OK, "{enabled}");
    assert!(enabled["disabled_at"].is_null() && enabled["disabled_reason"].is_null(), "{enabled}");
    let (status, _) = app.call(&token, reqwest::Method::POST, &format!("/v1/webhooks/{id}/test"), None).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let received = receiver.wait_for(6, Duration::from_secs(10)).await;
    verify_with_standard_webhooks(&secret, &received[5]).expect("the same secret signs");
    // Changes are checked as a new subscription is.
    let private = json!({"url": "http://10.0.0.1/hook"});
    assert_eq!(
        app.call(&token, reqwest::Method::PATCH, &path, Some(private)).await.0,
        StatusCode::UNPROCESSABLE_ENTITY
    );
    let unknown = json!({"events": ["job.exploded"]});
    assert_eq!(
        app.call(&token, reqwest::Method::PATCH, &path, Some(unknown)).await.0,
        StatusCode::UNPROCESSABLE_ENTITY
    );
    let (status, changed) = app
        .call(&token, reqwest::Method::PATCH, &path, Some(json!({"events": ["job.failed"], "description": "ops"})))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!((changed["events"].clone(), changed["description"].clone()), (json!(["job.failed"]), json!("ops")));
    assert_eq!(changed["url"], receiver.url().as_str(), "fields left out stay");

    // Someone else's subscription does not exist for them.
    let (other, _) = app.new_user_with_token(&[]).await;
    let other_token = app.api_token(other, &[Scope::Webhooks], Duration::from_secs(60)).await;
    let (status, problem) = app.call(&other_token, reqwest::Method::GET, &format!("/v1/webhooks/{id}"), None).await;
    assert_eq!((status, problem["code"].as_str()), (StatusCode::NOT_FOUND, Some("webhook_not_found")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_down_for_a_while_gets_every_event_exactly_once() {
    let (app, token) = app_with_dispatcher(true).await;
    let receiver = Receiver::start().await;
    let (id, _) = subscribe(&app, &token, &receiver.url(), &["job.succeeded"]).await;
    receiver.stop().await;
    let mut jobs = Vec::new();
    for i in 0..5 {
        jobs.push(app.submit("digits-cnn", json!({"pixels": vec![i; 64]})).await);
    }
    for job in &jobs {
        app.wait_finished(job, Duration::from_secs(30)).await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let pending = deliveries(&app, &token, &id).await;
    assert_eq!(pending.len(), 5);
    assert!(pending.iter().all(|d| d["status"] == "pending" && d["last_error"].is_string()), "{pending:#?}");

    let receiver = receiver.resume().await;
    let received = receiver.wait_for(5, Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_secs(2)).await; // room for a duplicate to show up
    let received_after = receiver.received();
    assert_eq!(received_after.len(), received.len(), "no duplicates");
    let ids: HashSet<&str> = received_after.iter().map(|r| r.header("webhook-id")).collect();
    assert_eq!(ids.len(), 5, "each event once");
    let job_ids: HashSet<String> =
        received_after.iter().map(|r| r.json()["data"]["id"].as_str().unwrap().to_owned()).collect();
    assert_eq!(job_ids, jobs.iter().cloned().collect());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_queued_behind_a_slow_host_are_sent_once_each() {
    // One slot per host, 0.7 s an answer, a 3 s lease: the sixth delivery leased at once
    // would wait 3.5 s for its turn, past its lease, and be leased and sent again.
    let mut settings = test_settings().await;
    settings.webhooks.per_destination = 1;
    settings.webhooks.lease_ms = 3_000;
    settings.webhooks.request_timeout_ms = 1_000;
    let app = TestApp::start(settings, AppOptions { dispatcher: true, ..Default::default() }).await;
    let token = app.api_token(app.user_id, &[Scope::Webhooks], Duration::from_secs(3600)).await;
    let receiver = Receiver::start().await;
    let (id, _) = subscribe(&app, &token, &receiver.url(), &["job.succeeded"]).await;
    for _ in 0..6 {
        receiver.answer_slowly(200, Duration::from_millis(700));
    }
    for _ in 0..6 {
        app.call(&token, reqwest::Method::POST, &format!("/v1/webhooks/{id}/test"), None).await;
    }
    receiver.wait_for(6, Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_secs(4)).await; // past every lease: room for a second send
    let received = receiver.received();
    let ids: HashSet<&str> = received.iter().map(|r| r.header("webhook-id")).collect();
    assert_eq!((received.len(), ids.len()), (6, 6), "each delivery sent once");
    let log = deliveries(&app, &token, &id).await;
    assert!(log.iter().all(|d| d["status"] == "succeeded" && d["attempts"] == 1), "{log:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dispatcher_killed_mid_delivery_delivers_after_its_restart() {
    let (mut app, token) = app_with_dispatcher(false).await;
    let receiver = Receiver::start().await;
    let (id, _) = subscribe(&app, &token, &receiver.url(), &["job.succeeded"]).await;
    receiver.answer_slowly(200, Duration::from_secs(10));
    app.call(&token, reqwest::Method::POST, &format!("/v1/webhooks/{id}/test"), None).await;
    receiver.wait_for(1, Duration::from_secs(10)).await;
    app.kill_dispatcher().await;
    app.start_dispatcher().await;
    // Once the dead dispatcher's lease runs out, the delivery goes again, same id.
    let received = receiver.wait_for(2, Duration::from_secs(15)).await;
    assert_eq!(received[0].header("webhook-id"), received[1].header("webhook-id"));
    let log = deliveries_once_succeeded(&app, &token, &id).await;
    assert_eq!(log[0]["status"], "succeeded", "{log:#?}");
    assert_eq!(log[0]["attempts"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forbidden_and_invalid_targets_are_422_problems() {
    let mut settings = test_settings().await;
    settings.webhooks.allowed_hosts.clear();
    let app = TestApp::start(settings, AppOptions { worker_models: vec![], ..Default::default() }).await;
    let token = app.api_token(app.user_id, &[Scope::Webhooks, Scope::JobsWrite], Duration::from_secs(3600)).await;
    for url in [
        "https://10.0.0.8/hook",
        "https://127.0.0.1:9000/hook",
        "https://169.254.169.254/latest/meta-data/",
        "https://[::1]/hook",
        "https://[::ffff:10.0.0.1]/hook",
        "https://localhost/hook", // a host name resolving to a loopback address
        "http://127.0.0.1:9000/hook",
        "ftp://example.com/",
        "not a url",
    ] {
        let (status, problem) = app
            .call(&token, reqwest::Method::POST, "/v1/webhooks", Some(json!({"url": url, "events": ["job.failed"]})))
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{url}: {problem}");
        assert_eq!(problem["code"], "invalid_input");
        assert_eq!(problem["errors"][0]["pointer"], "/url", "{problem}");

        let response = app
            .client
            .post(app.url("/v1/jobs"))
            .bearer_auth(&token)
            .json(&json!({"model": "digits-cnn", "input": {"pixels": vec![0; 64]}, "webhook": url}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY, "{url}");
        let problem: Value = response.json().await.unwrap();
        assert_eq!(problem["errors"][0]["pointer"], "/webhook", "{problem}");
    }
    let (status, problem) = app
        .call(
            &token,
            reqwest::Method::POST,
            "/v1/webhooks",
            Some(json!({"url": "https://example.com/hook", "events": ["job.exploded"]})),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(problem["errors"][0]["pointer"], "/events");
    let (status, _) = app.call(&app.token, reqwest::Method::GET, "/v1/webhooks", None).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "the webhooks scope is needed");
}
