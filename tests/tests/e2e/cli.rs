//! `spoolctl` against the real stack: what a script or an operator sees.

use std::time::Duration;

use serde_json::json;
use spool_api::auth::Role;
use spool_tests::{AppOptions, TEST_PASSWORD, TestApp, spoolctl, spoolctl_with, test_settings};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spoolctl_dlq_lists_shows_requeues_and_purges_dead_letters() {
    let mut settings = test_settings().await;
    settings.worker.max_attempts = 1;
    settings.worker.fail_marker = Some("POISON".into());
    let app = TestApp::start(settings, AppOptions { worker_models: vec!["minilm-embed"], ..Default::default() }).await;
    let first = app.submit("minilm-embed", json!({"text": "POISON one"})).await;
    let second = app.submit("minilm-embed", json!({"text": "POISON two"})).await;
    for id in [&first, &second] {
        assert_eq!(app.wait_finished(id, Duration::from_secs(30)).await["dead_lettered"], true);
    }
    let operator = app.new_operator_token().await;
    let url = app.url("");

    let listed = spoolctl(&url, &operator, &["--json", "dlq", "list", "--model", "minilm-embed"]).await;
    assert_eq!(listed.code, 0, "{}", listed.stderr);
    let ids: Vec<String> =
        listed.json()["data"].as_array().unwrap().iter().map(|d| d["job_id"].as_str().unwrap().to_owned()).collect();
    assert_eq!(ids.len(), 2);
    assert!(ids.contains(&first) && ids.contains(&second));

    let table = spoolctl(&url, &operator, &["dlq", "list"]).await;
    assert_eq!(table.code, 0);
    assert!(table.stdout.starts_with("JOB"), "{}", table.stdout);
    assert!(table.stdout.contains("injected_fault"), "{}", table.stdout);

    let shown = spoolctl(&url, &operator, &["dlq", "show", &first]).await;
    assert_eq!(shown.code, 0, "{}", shown.stderr);
    assert!(shown.stdout.contains("dead_lettered") && shown.stdout.contains("POISON one"), "{}", shown.stdout);
    let missing = spoolctl(&url, &operator, &["dlq", "show", &uuid::Uuid::now_v7().to_string()]).await;
    assert_eq!(missing.code, 3, "a problem from the API: {}", missing.stderr);
    assert!(missing.stderr.contains("job_not_found"), "{}", missing.stderr);

    // Errors a script can tell apart by exit code.
    let user = spoolctl(&url, &app.token, &["dlq", "list"]).await;
    assert_eq!(user.code, 3, "operators only: {}", user.stderr);
    let unsure = spoolctl(&url, &operator, &["dlq", "purge"]).await;
    assert_eq!(unsure.code, 1, "purge needs --yes");
    let nowhere = spoolctl("http://127.0.0.1:9", &operator, &["dlq", "list"]).await;
    assert_eq!(nowhere.code, 4, "{}", nowhere.stderr);
    let bad = spoolctl(&url, &operator, &["dlq", "requeue"]).await;
    assert_eq!(bad.code, 2, "clap usage error");

    let requeued = spoolctl(&url, &operator, &["--json", "dlq", "requeue", "--ids", &first]).await;
    assert_eq!(requeued.json()["count"], 1);
    assert_eq!(app.wait_finished(&first, Duration::from_secs(30)).await["attempts"], 1);

    let purged = spoolctl(&url, &operator, &["dlq", "purge", "--model", "minilm-embed", "--yes"]).await;
    assert_eq!(purged.code, 0, "{}", purged.stderr);
    assert_eq!(purged.stdout.trim(), "purged 2 dead letter(s)", "the requeued one failed again");
    let empty = spoolctl(&url, &operator, &["--json", "dlq", "list"]).await;
    assert!(empty.json()["data"].as_array().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spoolctl_logs_in_submits_jobs_and_batches_and_waits_for_them() {
    let app = TestApp::start(test_settings().await, AppOptions::default()).await;
    let url = app.url("");
    let home = std::env::temp_dir().join(format!("spoolctl-login-{}", uuid::Uuid::now_v7().simple()));
    let (_, email) = app.new_account(Role::User).await;

    // login: the password comes on stdin; the token lands in the config file, 0600.
    let wrong =
        spoolctl_with(&home, &[("SPOOL_URL", &url)], &["login", "--email", &email], Some("nope-nope-nope\n")).await;
    assert_eq!(wrong.code, 3, "{}", wrong.stderr);
    assert!(wrong.stderr.contains("invalid_credentials"), "{}", wrong.stderr);
    // A config file already there, readable by all, is made private as the token goes in.
    let config = home.join("spool/config.toml");
    std::fs::create_dir_all(config.parent().unwrap()).unwrap();
    std::fs::write(&config, "").unwrap();
    std::fs::set_permissions(&config, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let login = spoolctl_with(
        &home,
        &[("SPOOL_URL", &url)],
        &["--json", "login", "--email", &email],
        Some(&format!("{TEST_PASSWORD}\n")),
    )
    .await;
    assert_eq!(login.code, 0, "{}", login.stderr);
    let token_id = login.json()["token_id"].as_str().map(uuid::Uuid::parse_str);
    assert!(matches!(token_id, Some(Ok(_))), "{}", login.stdout);
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&config).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    let with_config = |args: &'static [&'static str]| spoolctl_with(&home, &[], args, None);

    // jobs submit --wait uses the saved URL and token.
    let job = spoolctl_with(
        &home,
        &[],
        &[
            "--json",
            "jobs",
            "submit",
            "--model",
            "digits-cnn",
            "--input",
            &json!({"pixels": vec![5; 64]}).to_string(),
            "--wait",
        ],
        None,
    )
    .await;
    assert_eq!(job.code, 0, "{}", job.stderr);
    let job = job.json();
    assert_eq!(job["status"], "succeeded");
    let listed = with_config(&["--json", "jobs", "list"]).await.json();
    assert_eq!(listed["data"][0]["id"], job["id"]);
    let table = with_config(&["jobs", "list"]).await.stdout;
    let first_row = table.lines().nth(1).unwrap_or_default();
    assert!(table.starts_with("JOB") && first_row.starts_with(job["id"].as_str().unwrap()), "{table}");
    assert!(first_row.contains("succeeded"), "{table}");
    let bad = with_config(&["jobs", "submit", "--model", "digits-cnn", "--input", "{\"pixels\": [1]}"]).await;
    assert_eq!(bad.code, 3, "a 422 from the API");
    assert!(bad.stderr.contains("/input/pixels"), "{}", bad.stderr);
    let unreadable = with_config(&["jobs", "submit", "--model", "digits-cnn", "--input", "@/nonexistent.json"]).await;
    assert_eq!(unreadable.code, 1, "{}", unreadable.stderr);

    // batch submit --wait --output: 300 items, results in order.
    let dir = std::env::temp_dir().join(format!("spoolctl-batch-{}", uuid::Uuid::now_v7().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let input = dir.join("digits.jsonl");
    let lines: String = (0..300)
        .map(|i| json!({"input": {"pixels": vec![i % 17; 64]}, "custom_id": format!("row-{i}")}).to_string() + "\n")
        .collect();
    std::fs::write(&input, lines).unwrap();
    let results = dir.join("results.jsonl");
    let args = [
        "--json",
        "batch",
        "submit",
        input.to_str().unwrap(),
        "--model",
        "digits-cnn",
        "--wait",
        "--output",
        results.to_str().unwrap(),
    ];
    let batch = spoolctl_with(&home, &[], &args, None).await;
    assert_eq!(batch.code, 0, "{}", batch.stderr);
    let batch = batch.json();
    assert_eq!(batch["counts"]["succeeded"], 300, "{batch}");
    assert_eq!(batch["progress"], 1.0);
    let saved: Vec<serde_json::Value> =
        std::fs::read_to_string(&results).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(saved.len(), 300);
    assert!(saved.iter().enumerate().all(|(i, l)| l["custom_id"] == format!("row-{i}") && l["output"].is_object()));
    let id = batch["id"].as_str().unwrap();
    let status = spoolctl_with(&home, &[], &["batch", "status", id], None).await;
    assert!(status.stdout.contains("succeeded") && status.stdout.contains("300"), "{}", status.stdout);
}

/// A batch that ends with canceled jobs: `--wait` reports it and exits 5, so a script can
/// tell "it ran, but not everything succeeded" from a refusal (3) or an outage (4).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spoolctl_batch_wait_exits_5_when_jobs_did_not_succeed() {
    let app = TestApp::start(test_settings().await, AppOptions { worker_models: vec![], ..Default::default() }).await;
    let url = app.url("");
    let dir = std::env::temp_dir().join(format!("spoolctl-cancel-{}", uuid::Uuid::now_v7().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let input = dir.join("digits.jsonl");
    let lines: String = (0..50).map(|i| json!({"input": {"pixels": vec![i % 17; 64]}}).to_string() + "\n").collect();
    std::fs::write(&input, lines).unwrap();
    let file = input.to_str().unwrap();

    let no_wait =
        spoolctl(&url, &app.token, &["batch", "submit", file, "--model", "digits-cnn", "--output", "x"]).await;
    assert_eq!(no_wait.code, 2, "--output needs --wait: {}", no_wait.stderr);

    // No worker runs: the batch waits until it is canceled from elsewhere.
    let args = ["--json", "batch", "submit", file, "--model", "digits-cnn", "--wait"];
    let waiting = spoolctl(&url, &app.token, &args);
    let cancel_it = async {
        let id = loop {
            let listed = spoolctl(&url, &app.token, &["--json", "batch", "list"]).await.json();
            if let Some(id) = listed["data"][0]["id"].as_str() {
                break id.to_owned();
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let canceled = spoolctl(&url, &app.token, &["--json", "batch", "cancel", &id]).await;
        assert_eq!(canceled.code, 0, "{}", canceled.stderr);
        assert_eq!(canceled.json()["canceled"], 50);
    };
    let (waited, ()) = tokio::join!(waiting, cancel_it);
    assert_eq!(waited.code, 5, "{}", waited.stderr);
    let batch = waited.json();
    assert_eq!(batch["counts"]["canceled"], 50, "{batch}");
    assert!(!batch["completed_at"].is_null());
    assert!(waited.stderr.contains("50 job(s) of the batch did not succeed"), "{}", waited.stderr);
    // The table says how the batch ended, not only that it did.
    let table = spoolctl(&url, &app.token, &["batch", "list"]).await.stdout;
    assert!(table.contains("OUTCOMES") && table.contains("50 canceled"), "{table}");
}
