//! The API against its own OpenAPI description, with schemathesis: examples, boundary
//! values and random valid and invalid requests to every operation (and chains of them,
//! following the description's links). It fails on any 5xx, any status, header or
//! content type the description does not list, any body that does not match its
//! schema, and any schema-invalid request that is accepted. Valid requests that business
//! rules refuse (an unknown model, a bad email address) are not failures.

use std::path::PathBuf;

use spool_tests::{AppOptions, TestApp, lift_rate_limits, test_settings};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operation_keeps_to_the_openapi_description() {
    let mut settings = test_settings().await;
    // A 429 is documented, but would keep the run from reaching the operations.
    lift_rate_limits(&mut settings);
    let app = TestApp::start(settings, AppOptions { worker_models: vec!["digits-cnn"], ..Default::default() }).await;

    // An operator holds every scope, so every operation can answer more than 401/403.
    let tokens = app.new_operator_with_session().await;

    // Account endpoints take a session token; everything else an API token.
    let account = "^/v1/(auth|tokens|me)";
    schemathesis(&app, &tokens.api, &["--exclude-path-regex", account]).await;
    schemathesis(&app, &tokens.session, &["--include-path-regex", account]).await;
    app.stop().await;
}

async fn schemathesis(app: &TestApp, token: &str, filter: &[&str]) {
    let venv = std::env::var("SPOOL_VENV").expect("SPOOL_VENV is set: run the tests with scripts/test");
    let binary = PathBuf::from(venv).join("bin/schemathesis");
    assert!(binary.exists(), "{} is missing: scripts/setup installs it", binary.display());
    // Its reports and hypothesis's files go here, not into the checkout.
    let workdir = std::env::temp_dir().join(format!("spool-contract-{}", uuid::Uuid::now_v7().simple()));
    std::fs::create_dir_all(&workdir).unwrap();
    let output = tokio::process::Command::new(binary)
        .current_dir(&workdir)
        .args(["run", &app.url("/openapi.json")])
        .args(["--header", &format!("Authorization: Bearer {token}")])
        .args(["--checks", "all", "--exclude-checks", "positive_data_acceptance"])
        .args(["--max-examples", "25", "--seed", "20261129", "--workers", "2"])
        .args(["--generation-database", "none", "--no-color", "--output-truncate", "true"])
        .args(filter)
        .output()
        .await
        .expect("schemathesis runs");
    std::fs::remove_dir_all(&workdir).ok();
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "schemathesis found failures:\n{report}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}
