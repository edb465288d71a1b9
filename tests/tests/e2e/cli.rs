//! `spoolctl` against the real stack: what a script or an operator sees.

use std::time::Duration;

use serde_json::json;
use spool_tests::{AppOptions, TestApp, spoolctl, test_settings};

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
