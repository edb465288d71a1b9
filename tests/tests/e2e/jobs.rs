//! The jobs API: idempotency, waiting, listing, cancel, validation and not-found.

use std::collections::HashSet;
use std::time::Duration;

use serde_json::{Value, json};
use spool_api::auth::Scope;
use spool_tests::{AppOptions, StatusCode, TestApp, spawn_app, spawn_app_with, test_settings};
use uuid::Uuid;

fn digit_input() -> Value {
    json!({"pixels": vec![0; 64]})
}

fn no_worker() -> AppOptions {
    AppOptions { worker_models: vec![], ..Default::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_key_replays_the_same_body_and_refuses_another() {
    let app = spawn_app_with(no_worker()).await;
    let body = json!({"model": "digits-cnn", "input": digit_input()});
    let send = |body: Value| {
        app.client
            .post(app.url("/v1/jobs"))
            .bearer_auth(&app.token)
            .header("Idempotency-Key", "order-7")
            .json(&body)
            .send()
    };
    let first = send(body.clone()).await.unwrap();
    assert_eq!(first.status(), StatusCode::ACCEPTED);
    let first: Value = first.json().await.unwrap();

    let replay = send(body.clone()).await.unwrap();
    assert_eq!(replay.status(), StatusCode::OK);
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    let replay: Value = replay.json().await.unwrap();
    assert_eq!(replay["id"], first["id"]);

    // Another input, or the same input with other options, is another request.
    let mut with_webhook = body.clone();
    with_webhook["webhook"] = json!("http://127.0.0.1:9/spool");
    let mut with_deadline = body.clone();
    with_deadline["start_within_secs"] = json!(60);
    for other in [json!({"model": "digits-cnn", "input": {"pixels": vec![1; 64]}}), with_webhook, with_deadline] {
        let response = send(other.clone()).await.unwrap();
        assert_eq!(response.status(), StatusCode::CONFLICT, "{other}");
        let problem: Value = response.json().await.unwrap();
        assert_eq!(problem["code"], "idempotency_key_reused");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_duplicates_create_one_job() {
    let app = spawn_app_with(no_worker()).await;
    let body = json!({"model": "digits-cnn", "input": digit_input()});
    let requests = (0..12).map(|_| {
        app.client
            .post(app.url("/v1/jobs"))
            .bearer_auth(&app.token)
            .header("Idempotency-Key", "same-key")
            .json(&body)
            .send()
    });
    let responses = futures::future::join_all(requests).await;
    let mut ids = HashSet::new();
    let mut created = 0;
    for response in responses {
        let response = response.unwrap();
        match response.status() {
            StatusCode::ACCEPTED => created += 1,
            StatusCode::OK => {}
            other => panic!("unexpected {other}"),
        }
        let job: Value = response.json().await.unwrap();
        ids.insert(job["id"].as_str().unwrap().to_owned());
    }
    assert_eq!(created, 1);
    assert_eq!(ids.len(), 1);
    let listed = app.get_json("/v1/jobs").await;
    assert_eq!(listed["data"].as_array().unwrap().len(), 1);
}

/// Concurrent submissions share insert statements (`job_inserter`): each caller must
/// still get its own job, keys must still replay, and usage must count every job once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_submissions_each_get_their_own_job() {
    let app = spawn_app_with(no_worker()).await;
    let send = |pixels: Vec<u8>, key: Option<String>| {
        let mut request = app.client.post(app.url("/v1/jobs")).bearer_auth(&app.token);
        if let Some(key) = key {
            request = request.header("Idempotency-Key", key);
        }
        request.json(&json!({"model": "digits-cnn", "input": {"pixels": pixels}})).send()
    };
    // 150 distinct jobs, 25 with their own keys, and 25 sharing one key and body.
    let distinct = (0..175u32).map(|i| {
        let pixels: Vec<u8> = (0..64).map(|p| ((i >> (p % 8)) & 1) as u8 * (p as u8 % 17)).collect();
        let key = (i >= 150).then(|| format!("own-{i}"));
        (pixels, key)
    });
    let shared = (0..25).map(|_| (vec![3u8; 64], Some("shared-key".to_owned())));
    let sent: Vec<(Vec<u8>, Option<String>)> = distinct.chain(shared).collect();
    let responses = futures::future::join_all(sent.iter().map(|(pixels, key)| send(pixels.clone(), key.clone()))).await;

    let mut ids = HashSet::new();
    let (mut created, mut replayed) = (0, 0);
    for ((pixels, _), response) in sent.iter().zip(responses) {
        let response = response.unwrap();
        match response.status() {
            StatusCode::ACCEPTED => created += 1,
            StatusCode::OK => replayed += 1,
            other => panic!("unexpected {other}"),
        }
        let job: Value = response.json().await.unwrap();
        assert_eq!(job["input"]["pixels"], json!(pixels), "a caller got someone else's job");
        ids.insert(job["id"].as_str().unwrap().to_owned());
    }
    assert_eq!((created, replayed, ids.len()), (176, 24, 176));
    let usage = app.get_json("/v1/me/usage").await;
    assert_eq!(usage["submitted"], 176, "{usage}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_counts_each_job_its_share_of_the_batch_it_ran_in() {
    // Queued before the worker starts, so that it finds them together and batches them.
    let mut app = spawn_app_with(AppOptions { worker_models: vec![], ..Default::default() }).await;
    let empty = app.client.get(app.url("/v1/me/usage")).bearer_auth(&app.token).send().await.unwrap();
    let empty = empty.text().await.unwrap();
    assert!(empty.contains(r#""inference_ms_total":0.0"#), "no jobs, no time (not -0.0): {empty}");

    let ids =
        futures::future::join_all((0..24u8).map(|i| app.submit("digits-cnn", json!({"pixels": vec![i % 17; 64]}))))
            .await;
    app.start_worker(&["digits-cnn"]).await;
    let mut expected = 0.0;
    let mut batched = false;
    for id in &ids {
        let job = app.wait_finished(id, Duration::from_secs(30)).await;
        let (ms, size) = (job["inference_ms"].as_f64().unwrap(), job["batch_size"].as_f64().unwrap());
        expected += ms / size;
        batched |= size > 1.0;
    }
    let usage = app.get_json("/v1/me/usage").await;
    let total = usage["inference_ms_total"].as_f64().unwrap();
    assert!((total - expected).abs() <= expected * 1e-6, "usage {total} ms, jobs' shares {expected} ms");
    assert_eq!(usage["succeeded"], 24);
    assert!(batched, "24 queued jobs all ran alone: the share was not tested");
}

/// `POST /v1/jobs` of a digit with a `Prefer` header.
async fn submit_preferring(app: &TestApp, prefer: &str) -> reqwest::Response {
    let job = json!({"model": "digits-cnn", "input": digit_input()});
    let request = app.client.post(app.url("/v1/jobs")).bearer_auth(&app.token).header("Prefer", prefer);
    request.json(&job).send().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefer_wait_returns_the_finished_job() {
    let app = spawn_app().await;
    let response = submit_preferring(&app, "wait=20").await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["preference-applied"], "wait=20");
    let job: Value = response.json().await.unwrap();
    assert_eq!(job["status"], "succeeded");
    assert!(job["output"]["label"].is_u64());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_poll_answers_when_the_job_finishes() {
    let mut app = spawn_app_with(no_worker()).await;
    let id = app.submit("digits-cnn", digit_input()).await;
    // Nothing runs it yet: a short wait returns the queued job after the wait.
    let started = std::time::Instant::now();
    let job = app.get_json(&format!("/v1/jobs/{id}?wait=1")).await;
    assert_eq!(job["status"], "queued");
    assert!(started.elapsed() >= Duration::from_millis(900));
    // A submission's wait that runs out is a 202 that says which wait it kept to.
    let response = submit_preferring(&app, "respond-async, wait=1").await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    assert_eq!(response.headers()["preference-applied"], "wait=1");

    let poll = {
        let client = app.client.clone();
        let url = app.url(&format!("/v1/jobs/{id}?wait=30"));
        let token = app.token.clone();
        tokio::spawn(
            async move { client.get(url).bearer_auth(token).send().await.unwrap().json::<Value>().await.unwrap() },
        )
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    app.start_worker(&["digits-cnn"]).await;
    let job = tokio::time::timeout(Duration::from_secs(25), poll).await.expect("long-poll answered").unwrap();
    assert_eq!(job["status"], "succeeded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_job_canceled_never_runs() {
    let mut app = spawn_app_with(no_worker()).await;
    let id = app.submit("digits-cnn", digit_input()).await;
    let response =
        app.client.post(app.url(&format!("/v1/jobs/{id}/cancel"))).bearer_auth(&app.token).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let job: Value = response.json().await.unwrap();
    assert_eq!(job["status"], "canceled");

    // A worker now receives the message and must skip the job.
    let witness = app.submit("digits-cnn", digit_input()).await;
    app.start_worker(&["digits-cnn"]).await;
    let witness = app.wait_finished(&witness, Duration::from_secs(30)).await;
    assert_eq!(witness["status"], "succeeded");
    let job: Value = app.get_job(&id).await.json().await.unwrap();
    assert_eq!(job["status"], "canceled");
    assert_eq!(job["attempts"], 0);
    assert!(job["started_at"].is_null());

    // A finished job cannot be canceled.
    let again =
        app.client.post(app.url(&format!("/v1/jobs/{id}/cancel"))).bearer_auth(&app.token).send().await.unwrap();
    assert_eq!(again.status(), StatusCode::CONFLICT);
    let problem: Value = again.json().await.unwrap();
    assert_eq!(problem["code"], "job_not_cancelable");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_pages_through_every_job_once_with_filters() {
    let app = spawn_app_with(no_worker()).await;
    let mut submitted = HashSet::new();
    for _ in 0..5 {
        submitted.insert(app.submit("digits-cnn", digit_input()).await);
    }
    submitted.insert(app.submit("minilm-embed", json!({"text": "hello"})).await);

    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let mut path = "/v1/jobs?limit=2".to_owned();
        if let Some(c) = &cursor {
            path.push_str(&format!("&cursor={c}"));
        }
        let page = app.get_json(&path).await;
        pages += 1;
        for job in page["data"].as_array().unwrap() {
            seen.push(job["id"].as_str().unwrap().to_owned());
        }
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(seen.len(), 6);
    assert_eq!(seen.iter().cloned().collect::<HashSet<_>>(), submitted);
    let mut sorted = seen.clone();
    sorted.sort_by(|a, b| b.cmp(a));
    assert_eq!(seen, sorted, "newest first");

    let filtered = app.get_json("/v1/jobs?model=minilm-embed&status=queued").await;
    assert_eq!(filtered["data"].as_array().unwrap().len(), 1);
    let none = app.get_json("/v1/jobs?status=succeeded").await;
    assert!(none["data"].as_array().unwrap().is_empty());

    let bad = app.client.get(app.url("/v1/jobs?status=done")).bearer_auth(&app.token).send().await.unwrap();
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
    let bad = app.client.get(app.url("/v1/jobs?limit=1000")).bearer_auth(&app.token).send().await.unwrap();
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_are_422_problems_naming_the_field() {
    let app = spawn_app_with(no_worker()).await;
    let cases = [
        (json!({"model": "digits-cnn", "input": {"pixels": vec![0; 63]}}), "/input/pixels"),
        (json!({"model": "digits-cnn", "input": {"pixels": [[0]]}}), "/input/pixels"),
        (json!({"model": "digits-cnn", "input": {"pixels": vec![17; 64]}}), "/input/pixels/0"),
        (json!({"model": "minilm-embed", "input": {"text": ""}}), "/input/text"),
        (json!({"model": "minilm-embed", "input": {"text": "x".repeat(8193)}}), "/input/text"),
        (json!({"model": "minilm-embed", "input": {"txt": "hello"}}), "/input"),
    ];
    for (body, pointer) in cases {
        let response = app.post_job(&body).await;
        assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        assert_eq!(response.headers()["content-type"], "application/problem+json");
        let problem: Value = response.json().await.unwrap();
        assert_eq!(problem["code"], "invalid_input");
        assert_eq!(problem["status"], 422);
        let pointers: Vec<&str> =
            problem["errors"].as_array().unwrap().iter().map(|e| e["pointer"].as_str().unwrap()).collect();
        assert!(pointers.contains(&pointer), "{pointer} not in {pointers:?}");
    }
    // PostgreSQL cannot store NUL characters: the client hears where, no 500.
    for body in [json!({"model": "minilm-embed", "input": {"text": "a\u{0}b"}})] {
        let response = app.post_job(&body).await;
        assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        let problem = response.json::<Value>().await.unwrap();
        assert_eq!(problem["code"], "invalid_input");
        assert_eq!(problem["errors"][0]["pointer"], "/input/text", "{problem}");
    }
    // Nothing was queued.
    let listed = app.get_json("/v1/jobs").await;
    assert!(listed["data"].as_array().unwrap().is_empty());

    let malformed = app
        .client
        .post(app.url("/v1/jobs"))
        .bearer_auth(&app.token)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(malformed.status(), StatusCode::BAD_REQUEST);
    let problem: Value = malformed.json().await.unwrap();
    assert_eq!(problem["code"], "invalid_body");

    // A body that is JSON but not the request's shape: the problem points at the field.
    for (body, pointer, detail) in [
        (json!({"input": {"pixels": [0]}}), "/model", "is required"),
        (json!({"model": ["digits-cnn"], "input": {}}), "/model", "must be a string"),
        (
            json!({"model": "digits-cnn", "input": {}, "start_within_secs": 0}),
            "/start_within_secs",
            "must be at least 1",
        ),
        (
            json!({"model": "digits-cnn", "input": {}, "webhook_events": "completed"}),
            "/webhook_events",
            "must be an array",
        ),
        (json!(["digits-cnn"]), "", "must be an object"),
    ] {
        let response = app.post_job(&body).await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{body}");
        let problem: Value = response.json().await.unwrap();
        assert_eq!(problem["code"], "invalid_body", "{problem}");
        assert_eq!(problem["errors"][0]["pointer"], pointer, "{problem}");
        assert_eq!(problem["errors"][0]["detail"], detail, "{problem}");
        assert_eq!(problem["detail"], format!("invalid body: {pointer} {detail}"), "{problem}");
    }

    // An oversized body is refused from its Content-Length, before it is read: send
    // only the head, as a client would that waits for an early answer.
    let head = format!(
        "POST /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        app.token,
        2 * 1024 * 1024
    );
    let response = raw_http(&app.address, head.as_bytes()).await;
    assert!(response.starts_with("HTTP/1.1 413"), "{response}");
    assert!(response.contains("application/problem+json"), "{response}");
    assert!(response.contains("\"code\":\"body_too_large\""), "{response}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_the_limit_without_a_length_is_refused_as_it_is_read() {
    let mut settings = test_settings().await;
    settings.api.max_body_bytes = 16 * 1024;
    let app = TestApp::start(settings, no_worker()).await;
    // HTTP/2 needs neither a Content-Length nor chunked encoding. curl streams stdin
    // (`-T -`) without declaring a length. 48 KiB fits in HTTP/2's first flow-control
    // window, so curl has sent it all when the answer comes.
    let mut curl = tokio::process::Command::new("curl")
        .args(["-sS", "--http2-prior-knowledge", "-X", "POST", "-T", "-", "-w", "\n%{http_version} %{http_code}"])
        .args(["-H", "content-type: application/json", "-H", &format!("authorization: Bearer {}", app.token)])
        .arg(app.url("/v1/jobs"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("curl runs");
    let body = format!(r#"{{"model": "digits-cnn", "input": "{}"}}"#, "a".repeat(48 * 1024));
    let mut stdin = curl.stdin.take().unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut stdin, body.as_bytes()).await.unwrap();
    drop(stdin);
    let output = curl.wait_with_output().await.unwrap();
    let (output, errors) = (String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.ends_with("\n2 413"), "{output} {errors}");
    assert!(output.contains("\"code\":\"body_too_large\""), "{output}");
    assert!(output.contains("limit of 16384 bytes"), "{output}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_models_and_jobs_and_other_users_jobs_are_404() {
    let app = spawn_app_with(no_worker()).await;
    let response = app.post_job(&json!({"model": "gpt-17", "input": {}})).await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert_eq!(response.json::<Value>().await.unwrap()["code"], "model_not_found");

    for id in [Uuid::now_v7().to_string(), "not-a-uuid".to_owned()] {
        let response = app.get_job(&id).await;
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        assert_eq!(response.json::<Value>().await.unwrap()["code"], "job_not_found");
    }

    let id = app.submit("digits-cnn", digit_input()).await;
    let (_, stranger) = app.new_user_with_token(&[Scope::JobsRead, Scope::JobsWrite]).await;
    let peek = app.client.get(app.url(&format!("/v1/jobs/{id}"))).bearer_auth(&stranger).send().await.unwrap();
    assert_eq!(peek.status(), StatusCode::NOT_FOUND);
    let cancel =
        app.client.post(app.url(&format!("/v1/jobs/{id}/cancel"))).bearer_auth(&stranger).send().await.unwrap();
    assert_eq!(cancel.status(), StatusCode::NOT_FOUND);
    let listed = app.get_json_as("/v1/jobs", &stranger).await;
    assert!(listed["data"].as_array().unwrap().is_empty());
}

/// Sends raw bytes and returns what the server answers within a second.
pub(crate) async fn raw_http(address: &str, bytes: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address.trim_start_matches("http://")).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    let mut buffer = vec![0u8; 16 * 1024];
    let mut received = Vec::new();
    while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(1), stream.read(&mut buffer)).await {
        if n == 0 {
            break;
        }
        received.extend_from_slice(&buffer[..n]);
        if received.windows(4).any(|w| w == b"\r\n\r\n") && received.ends_with(b"}") {
            break;
        }
    }
    String::from_utf8_lossy(&received).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_keeps_the_request_id_that_submitted_it_and_its_message_carries_it() {
    use lapin::options::BasicGetOptions;
    use secrecy::ExposeSecret;
    use spool_shared::amqp::{JobEnvelope, Topology};

    let settings = test_settings().await;
    let app = TestApp::start(settings.clone(), no_worker()).await;
    let submit = |request_id: String| {
        app.client
            .post(app.url("/v1/jobs"))
            .bearer_auth(&app.token)
            .header("x-request-id", request_id)
            .json(&json!({"model": "digits-cnn", "input": digit_input()}))
            .send()
    };
    // A plain id of the client's is kept.
    let kept = submit("client-req.42".into()).await.unwrap();
    assert_eq!(kept.headers()["x-request-id"], "client-req.42");
    let kept: Value = kept.json().await.unwrap();
    assert_eq!(kept["request_id"], "client-req.42");
    // Any other is replaced by a fresh one, which the job keeps.
    let replaced = submit("x".repeat(200)).await.unwrap();
    let fresh = replaced.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert!(Uuid::parse_str(&fresh).is_ok(), "{fresh}");
    let replaced: Value = replaced.json().await.unwrap();
    assert_eq!(replaced["request_id"], fresh.as_str());
    assert_eq!(
        app.get_json(&format!("/v1/jobs/{}", kept["id"].as_str().unwrap())).await["request_id"],
        "client-req.42"
    );

    // The workers' messages carry them as trace ids.
    let connection = lapin::Connection::connect(settings.amqp_url.expose_secret(), Default::default()).await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    let queue = Topology::new(&settings).job_queue("digits-cnn");
    let mut traces = std::collections::HashMap::new();
    while let Some(message) = channel.basic_get(queue.as_str().into(), BasicGetOptions::default()).await.unwrap() {
        let envelope = JobEnvelope::from_bytes(&message.delivery.data).unwrap();
        traces.insert(envelope.job_id.to_string(), envelope.trace_id);
    }
    assert_eq!(traces.len(), 2);
    assert_eq!(traces[kept["id"].as_str().unwrap()].as_deref(), Some("client-req.42"));
    assert_eq!(traces[replaced["id"].as_str().unwrap()].as_deref(), Some(fresh.as_str()));
    connection.close(200, "done".into()).await.unwrap();
}
