//! Batches: thousands of jobs under one handle, as a script submits them.

use std::time::Duration;

use serde_json::{Value, json};
use spool_api::auth::Scope;
use spool_tests::receiver::Receiver;
use spool_tests::{AppOptions, StatusCode, TestApp, model_file, test_settings};

async fn batch(app: &TestApp, id: &str) -> Value {
    let response = app.client.get(app.url(&format!("/v1/batches/{id}"))).bearer_auth(&app.token).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    response.json().await.unwrap()
}

async fn wait_complete(app: &TestApp, id: &str, timeout: Duration) -> Value {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let batch = batch(app, id).await;
        if !batch["completed_at"].is_null() {
            return batch;
        }
        assert!(tokio::time::Instant::now() < deadline, "batch not complete in time: {batch}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn results(app: &TestApp, id: &str) -> Vec<Value> {
    let response =
        app.client.get(app.url(&format!("/v1/batches/{id}/results"))).bearer_auth(&app.token).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "application/x-ndjson");
    let text = response.text().await.unwrap();
    text.lines().map(|line| serde_json::from_str(line).unwrap()).collect()
}

fn post_ndjson(app: &TestApp, model: &str, body: String) -> reqwest::RequestBuilder {
    app.client
        .post(app.url(&format!("/v1/batches?model={model}")))
        .bearer_auth(&app.token)
        .header("content-type", "application/x-ndjson")
        .body(body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_thousand_digits_come_back_correct_and_in_submission_order() {
    let app = TestApp::start(test_settings().await, AppOptions::default()).await;
    let heldout = model_file("digits-cnn/heldout.json");
    let samples = heldout["samples"].as_array().unwrap();
    let count = 5_000;
    let body: String = (0..count)
        .map(|i| {
            json!({"input": {"pixels": samples[i % samples.len()]["pixels"]}, "custom_id": format!("item-{i}")})
                .to_string()
                + "\n"
        })
        .collect();
    let response = post_ndjson(&app, "digits-cnn", body).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let created: Value = response.json().await.unwrap();
    assert_eq!(created["total"], count);
    let id = created["id"].as_str().unwrap().to_owned();

    let done = wait_complete(&app, &id, Duration::from_secs(180)).await;
    assert_eq!(done["counts"]["succeeded"], count, "{done}");
    assert_eq!(done["progress"], 1.0);
    let lines = results(&app, &id).await;
    assert_eq!(lines.len(), count);
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(line["custom_id"], format!("item-{i}"), "submission order");
        assert_eq!(line["status"], "succeeded");
        // Same artifact, same input: exactly PyTorch's prediction.
        assert_eq!(line["output"]["label"], samples[i % samples.len()]["predicted"], "{line}");
    }

    // Someone else's batch does not exist for them.
    let (_, other) = app.new_user_with_token(&[Scope::JobsRead]).await;
    for path in [format!("/v1/batches/{id}"), format!("/v1/batches/{id}/results")] {
        let response = app.client.get(app.url(&path)).bearer_auth(&other).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::NOT_FOUND, "{path}");
        assert_eq!(response.json::<Value>().await.unwrap()["code"], "batch_not_found");
    }
    let (_, writer) = app.new_user_with_token(&[Scope::JobsWrite]).await;
    let response =
        app.client.post(app.url(&format!("/v1/batches/{id}/cancel"))).bearer_auth(&writer).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let listed: Value = app.get_json("/v1/batches").await;
    assert_eq!(listed["data"][0]["id"], id.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_line_or_item_refuses_the_whole_batch_naming_it() {
    let app = TestApp::start(test_settings().await, AppOptions { worker_models: vec![], ..Default::default() }).await;
    let good = json!({"input": {"pixels": vec![1; 64]}}).to_string();
    let body = format!("{good}\n{good}\n{{\"input\": {{\"pixels\": [1, 2\n{good}\n");
    let response = post_ndjson(&app, "digits-cnn", body).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let problem: Value = response.json().await.unwrap();
    assert_eq!(problem["code"], "invalid_input");
    assert!(problem["errors"][0]["detail"].as_str().unwrap().starts_with("line 3:"), "{problem}");

    // Schema errors name the line too, blank lines counted; a NUL (which PostgreSQL cannot
    // store) is named like any other bad field.
    let short = json!({"input": {"pixels": [1]}}).to_string();
    let nul = json!({"input": {"pixels": vec![1; 64]}, "custom_id": "a\u{0}"}).to_string();
    let response = post_ndjson(&app, "digits-cnn", format!("{good}\n\n\n{short}\n{nul}\n")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let problem: Value = response.json().await.unwrap();
    assert_eq!(problem["errors"][0]["pointer"], "/items/1/input/pixels", "{problem}");
    assert!(problem["errors"][0]["detail"].as_str().unwrap().starts_with("line 4:"), "{problem}");
    assert_eq!(problem["errors"][1]["pointer"], "/items/2/custom_id", "{problem}");
    assert!(problem["errors"][1]["detail"].as_str().unwrap().starts_with("line 5:"), "{problem}");

    let mut items: Vec<Value> = (0..5).map(|_| json!({"input": {"pixels": vec![1; 64]}})).collect();
    items[3] = json!({"input": {"pixels": vec![99; 64]}});
    let response = app
        .client
        .post(app.url("/v1/batches"))
        .bearer_auth(&app.token)
        .json(&json!({"model": "digits-cnn", "items": items}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let problem: Value = response.json().await.unwrap();
    assert!(problem["errors"][0]["pointer"].as_str().unwrap().starts_with("/items/3/input/pixels"), "{problem}");
    // Results are matched back by custom_id: two items may not share one.
    let twice = json!({"input": {"pixels": vec![1; 64]}, "custom_id": "same"}).to_string();
    let response = post_ndjson(
        &app,
        "digits-cnn",
        format!(
            "{twice}
{good}
{twice}
"
        ),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let problem: Value = response.json().await.unwrap();
    assert_eq!(problem["errors"][0]["pointer"], "/items/2/custom_id", "{problem}");
    assert_eq!(problem["errors"][0]["detail"], "line 3: \"same\" is also the custom_id of item 0", "{problem}");
    // A misspelt field is refused in JSON items as on NDJSON lines.
    let response = app
        .client
        .post(app.url("/v1/batches"))
        .bearer_auth(&app.token)
        .json(&json!({"model": "digits-cnn", "items": [{"input": {"pixels": vec![1; 64]}, "custom-id": "a"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert_eq!(response.json::<Value>().await.unwrap()["code"], "invalid_body");
    let jobs: Value = app.get_json("/v1/jobs").await;
    assert!(jobs["data"].as_array().unwrap().is_empty(), "all or nothing");

    // Over api.max_batch_bytes: a 413 problem from the declared length, before the body is read.
    let head = format!(
        "POST /v1/batches?model=digits-cnn HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/x-ndjson\r\nContent-Length: {}\r\n\r\n",
        app.token,
        app.settings.api.max_batch_bytes + 1
    );
    let response = crate::jobs::raw_http(&app.address, head.as_bytes()).await;
    assert!(response.starts_with("HTTP/1.1 413"), "{response}");
    assert!(response.contains("\"code\":\"body_too_large\""), "{response}");

    // Without a token, a chunked upload is refused before any of it is read: the answer
    // comes though the body never does.
    let head = "POST /v1/batches?model=digits-cnn HTTP/1.1\r\nHost: x\r\n\
                Content-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n";
    let response = crate::jobs::raw_http(&app.address, head.as_bytes()).await;
    assert!(response.starts_with("HTTP/1.1 401"), "{response}");
    assert!(response.contains("\"code\":\"missing_token\""), "{response}");

    let response = post_ndjson(&app, "no-such-model", good.clone()).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let response = post_ndjson(&app, "digits-cnn", String::new()).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY, "an empty batch");

    // Idempotency-Key: the same body replays the batch, another body is a conflict.
    let send = |body: String| post_ndjson(&app, "digits-cnn", body).header("Idempotency-Key", "nightly-42").send();
    let first: Value = send(good.clone()).await.unwrap().json().await.unwrap();
    let replay = send(good.clone()).await.unwrap();
    assert_eq!(replay.status(), StatusCode::OK);
    assert_eq!(replay.json::<Value>().await.unwrap()["id"], first["id"]);
    assert_eq!(send(format!("{good}\n{good}")).await.unwrap().status(), StatusCode::CONFLICT);

    // The same items with a webhook are another request.
    let send_json = |body: Value| {
        app.client
            .post(app.url("/v1/batches"))
            .bearer_auth(&app.token)
            .header("Idempotency-Key", "weekly-7")
            .json(&body)
            .send()
    };
    let items = json!([{"input": {"pixels": vec![0; 64]}}]);
    let plain = json!({"model": "digits-cnn", "items": items});
    assert_eq!(send_json(plain.clone()).await.unwrap().status(), StatusCode::ACCEPTED);
    assert_eq!(send_json(plain).await.unwrap().status(), StatusCode::OK);
    let hooked = json!({"model": "digits-cnn", "items": items, "webhook": "http://127.0.0.1:9/spool"});
    assert_eq!(send_json(hooked).await.unwrap().status(), StatusCode::CONFLICT);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canceling_mid_batch_stops_the_rest_and_the_counts_add_up() {
    let mut settings = test_settings().await;
    settings.worker.max_batch_size = Some(1); // slow enough to cancel mid-way
    settings.worker.batches_in_flight = 1;
    let mut app =
        TestApp::start(settings, AppOptions { worker_models: vec![], dispatcher: true, ..Default::default() }).await;
    let token = app
        .api_token(app.user_id, &[Scope::Webhooks, Scope::JobsRead, Scope::JobsWrite], Duration::from_secs(600))
        .await;
    let receiver = Receiver::start().await;
    let subscribed = app
        .client
        .post(app.url("/v1/webhooks"))
        .bearer_auth(&token)
        .json(&json!({"url": receiver.url(), "events": ["batch.completed"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(subscribed.status(), StatusCode::CREATED);

    let body: String = (0..2_000).map(|i| json!({"input": {"pixels": vec![i % 17; 64]}}).to_string() + "\n").collect();
    let created: Value = post_ndjson(&app, "digits-cnn", body).send().await.unwrap().json().await.unwrap();
    let id = created["id"].as_str().unwrap().to_owned();
    app.start_worker(&["digits-cnn"]).await;
    loop {
        if batch(&app, &id).await["counts"]["succeeded"].as_i64().unwrap() >= 20 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let canceled = app.post_json(&format!("/v1/batches/{id}/cancel")).await;
    let canceled = canceled["canceled"].as_i64().unwrap();
    assert!(canceled > 0, "jobs were still queued");
    let done = wait_complete(&app, &id, Duration::from_secs(60)).await;
    let counts = &done["counts"];
    let succeeded = counts["succeeded"].as_i64().unwrap();
    assert_eq!(counts["canceled"].as_i64().unwrap(), canceled, "{done}");
    assert_eq!(succeeded + canceled, 2_000, "every job accounted for: {done}");
    assert_eq!((counts["queued"].as_i64(), counts["running"].as_i64()), (Some(0), Some(0)));

    // One batch.completed event, with the same counts.
    let event = receiver.wait_for(1, Duration::from_secs(15)).await[0].json();
    assert_eq!(event["type"], "batch.completed");
    assert_eq!(event["data"]["id"], id.as_str());
    assert_eq!(event["data"]["counts"]["canceled"], canceled);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(receiver.received().len(), 1, "once");
    app.stop_worker().await;
}

/// The examples in `examples/` work against the real stack, as a user would run them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_scripts_submit_a_batch_and_collect_the_results() {
    let app = TestApp::start(test_settings().await, AppOptions::default()).await;
    let examples = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let python = std::env::var("SPOOL_PYTHON").unwrap_or_else(|_| "python3".into());
    for (program, script) in [(python.as_str(), "batch.py"), ("bash", "batch.sh")] {
        let output = tokio::process::Command::new(program)
            .arg(examples.join(script))
            .arg("250")
            .env("SPOOL_URL", app.url(""))
            .env("SPOOL_TOKEN", &app.token)
            .output()
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "{script}: {stderr}");
        let lines: Vec<Value> =
            String::from_utf8_lossy(&output.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 250, "{script}");
        for (i, line) in lines.iter().enumerate() {
            assert_eq!(line["custom_id"], format!("img-{i}"), "{script}: submission order");
            assert_eq!(line["status"], "succeeded");
            assert!((0..=9).contains(&line["label"].as_i64().unwrap()), "{script}: {line}");
        }
        let counts: Value = serde_json::from_str(stderr.lines().last().unwrap()).unwrap();
        assert_eq!(counts["succeeded"], 250, "{script}: {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_in_batches_count_against_the_accounts_batch_quota_item_by_item() {
    let mut settings = test_settings().await;
    // Five items at once, one more every 10 s: far slower than this test's submits.
    settings.rate_limit.batch_jobs = spool_shared::config::Quota { per_minute: 6, burst: 5 };
    let app = TestApp::start(settings, AppOptions { worker_models: vec![], ..Default::default() }).await;
    let items = |n: usize| json!({"model": "digits-cnn", "items": vec![json!({"input": {"pixels": vec![0; 64]}}); n]});
    let submit = |n: usize| app.client.post(app.url("/v1/batches")).bearer_auth(&app.token).json(&items(n)).send();

    assert_eq!(submit(3).await.unwrap().status(), StatusCode::ACCEPTED);
    // Three more items do not fit in the two left, though it is only the second request.
    let refused = submit(3).await.unwrap();
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry_after: u64 = refused.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    let problem: Value = refused.json().await.unwrap();
    assert_eq!(problem["code"], "rate_limited");
    assert_eq!(submit(2).await.unwrap().status(), StatusCode::ACCEPTED);

    let listed: Value = app.get_json("/v1/batches").await;
    let totals: Vec<i64> = listed["data"].as_array().unwrap().iter().map(|b| b["total"].as_i64().unwrap()).collect();
    assert_eq!(totals, [2, 3], "the refused batch created nothing");
}
