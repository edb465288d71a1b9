//! Nothing accepted is lost: the outbox relay publishes jobs the API could not, and a
//! job whose worker died mid-batch completes exactly once elsewhere.

use std::time::Duration;

use futures::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use sea_orm::{ConnectionTrait, DbBackend, Statement};
use secrecy::ExposeSecret;
use serde_json::{Value, json};
use spool_shared::amqp::{JobEnvelope, Topology};
use spool_shared::job::JobError;
use spool_tests::{AppOptions, StatusCode, TestApp, test_settings};
use spool_worker::store::{self, ClaimRequest, Completion, Outcome};
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_accepted_while_the_broker_is_unreachable_runs_after_an_api_restart() {
    let settings = test_settings().await;
    // The first API cannot reach RabbitMQ at all (nothing listens on port 1).
    let options = AppOptions {
        worker_models: vec!["digits-cnn"],
        api_amqp_url: Some("amqp://guest:guest@127.0.0.1:1/%2f".into()),
        ..Default::default()
    };
    let mut app = TestApp::start(settings.clone(), options).await;
    let response = app.post_job(&json!({"model": "digits-cnn", "input": {"pixels": vec![3; 64]}})).await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let id = response.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned();
    let unpublished = app
        .db
        .query_one_raw(Statement::from_string(
            DbBackend::Postgres,
            format!("SELECT published_at IS NULL AS pending FROM jobs WHERE id = '{id}'"),
        ))
        .await
        .unwrap()
        .unwrap();
    assert!(unpublished.try_get::<bool>("", "pending").unwrap(), "job must wait in the outbox");

    // "Crash" that API; a new one with a working broker relays the job.
    app.restart_api(settings).await;
    let job = app.wait_finished(&id, Duration::from_secs(30)).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["attempts"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_worker_crashed_completes_exactly_once() {
    let settings = test_settings().await;
    let mut app = TestApp::start(settings.clone(), AppOptions { worker_models: vec![], ..Default::default() }).await;
    let id: Uuid = app.submit("digits-cnn", json!({"pixels": vec![5; 64]})).await.parse().unwrap();

    // A "worker" takes the message and claims the job, then dies without acking.
    let topology = Topology::new(&settings);
    let connection = lapin::Connection::connect(settings.amqp_url.expose_secret(), Default::default()).await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel.basic_qos(1, BasicQosOptions::default()).await.unwrap();
    let mut consumer = channel
        .basic_consume(
            topology.job_queue("digits-cnn").as_str().into(),
            "doomed".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let delivery = tokio::time::timeout(Duration::from_secs(10), consumer.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(JobEnvelope::from_bytes(&delivery.data).unwrap().job_id, id);
    let claimed = store::claim(&app.db, &ClaimRequest::new(vec![id]), "doomed-worker").await.unwrap();
    assert_eq!(claimed.len(), 1);
    let doomed_attempt = claimed[0].attempt;
    connection.close(320, "simulated crash".into()).await.unwrap();

    // A healthy worker gets the redelivered message and takes the running job over.
    app.start_worker(&["digits-cnn"]).await;
    let job = app.wait_finished(&id.to_string(), Duration::from_secs(30)).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["attempts"], 2);
    let output = job["output"].clone();

    // The dead worker's late write of its attempt changes nothing.
    let stale = Completion {
        id,
        attempt: doomed_attempt,
        outcome: Outcome::Succeeded(
            serde_json::value::to_raw_value(&json!({"label": 9, "probabilities": []})).unwrap(),
        ),
        trace_id: None,
    };
    assert_eq!(store::complete(&app.db, &[stale], Some(1.0)).await.unwrap(), 0);
    let job: Value = app.get_job(&id.to_string()).await.json().await.unwrap();
    assert_eq!(job["output"], output);
    assert_eq!(job["attempts"], 2);
    app.stop_worker().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_stopped_mid_stream_leaves_no_job_behind() {
    let mut app = TestApp::start(test_settings().await, AppOptions::default()).await;
    let mut ids = Vec::new();
    for i in 0..150 {
        ids.push(app.submit("digits-cnn", json!({"pixels": vec![i % 17; 64]})).await);
    }
    // Graceful stop while jobs are still flowing: finish the batches in hand, ack, exit.
    app.stop_worker().await;
    let stuck = app
        .db
        .query_one_raw(Statement::from_string(
            DbBackend::Postgres,
            "SELECT count(*) AS n FROM jobs WHERE status = 'running'".to_owned(),
        ))
        .await
        .unwrap()
        .unwrap()
        .try_get::<i64>("", "n")
        .unwrap();
    assert_eq!(stuck, 0, "a graceful stop must not leave jobs running");

    app.start_worker(&["digits-cnn"]).await;
    for id in &ids {
        let job = app.wait_finished(id, Duration::from_secs(60)).await;
        assert_eq!(job["status"], "succeeded", "{job}");
        assert_eq!(job["attempts"], 1, "no job needed a second attempt: {job}");
    }
}

/// The job's status, attempts and attempt log, as the database has them.
async fn status_attempts_and_log(app: &TestApp, id: Uuid) -> (String, i32, Value) {
    let row = app
        .db
        .query_one_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT status, attempts, attempt_log FROM jobs WHERE id = $1",
            [id.into()],
        ))
        .await
        .unwrap()
        .unwrap();
    let status = row.try_get("", "status").unwrap();
    (status, row.try_get("", "attempts").unwrap(), row.try_get("", "attempt_log").unwrap())
}

/// A retryable failure publishes its retry before it writes the job back to `queued`. If
/// that write is held up (a database blip) longer than the retry tier's delay, the retry
/// comes back to a job still `running` its failed attempt: it takes the job over, and the
/// late write of the old attempt changes nothing. (Before, the retry was acked as
/// settled, the late write set `queued`, and the job waited forever with no message.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_that_overtakes_its_attempts_late_write_takes_the_job_over() {
    let app = TestApp::start(test_settings().await, AppOptions { worker_models: vec![], ..Default::default() }).await;
    let id: Uuid = app.submit("digits-cnn", json!({"pixels": vec![5; 64]})).await.parse().unwrap();
    let first = store::claim(&app.db, &ClaimRequest::new(vec![id]), "slow-writer").await.unwrap();
    assert_eq!(first[0].attempt, 1);

    // A copy that is neither redelivered nor the retry of attempt 1 leaves it alone.
    assert!(store::claim(&app.db, &ClaimRequest::new(vec![id]), "other").await.unwrap().is_empty());
    let retry = || ClaimRequest { retries: vec![(id, 1)], ..ClaimRequest::new(vec![id]) };
    let taken = store::claim(&app.db, &retry(), "next-worker").await.unwrap();
    assert_eq!(taken.len(), 1, "the retry takes the job over");
    assert_eq!(taken[0].attempt, 2);

    let late = Completion {
        id,
        attempt: 1,
        outcome: Outcome::Retrying {
            error: JobError::retryable("injected_fault", "attempt 1 failed"),
            delay: Duration::from_millis(500),
        },
        trace_id: None,
    };
    assert_eq!(store::complete(&app.db, &[late], Some(1.0)).await.unwrap(), 0, "the late write matches nothing");
    let (status, attempts, log) = status_attempts_and_log(&app, id).await;
    assert_eq!((status.as_str(), attempts), ("running", 2));
    assert_eq!(log.as_array().map(Vec::len), Some(1), "the replaced attempt is logged: {log}");
    assert_eq!((&log[0]["attempt"], &log[0]["worker_id"]), (&json!(1), &json!("slow-writer")), "{log}");
    assert_eq!(log[0]["outcome"], "taken_over", "{log}");
    // Another copy of the same retry finds its attempt over.
    assert!(store::claim(&app.db, &retry(), "late-copy").await.unwrap().is_empty());
}

/// A claim that committed but whose reply was lost (connection reset) is run again by the
/// worker: the second run returns the jobs the first one took, at the same attempt, instead
/// of nothing (which acked their messages and left the jobs `running` forever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_run_again_after_its_reply_was_lost_returns_the_jobs_it_took() {
    let app = TestApp::start(test_settings().await, AppOptions { worker_models: vec![], ..Default::default() }).await;
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(app.submit("digits-cnn", json!({"pixels": vec![i; 64]})).await.parse::<Uuid>().unwrap());
    }
    let request = ClaimRequest::new(ids.clone());
    let first = store::claim(&app.db, &request, "w").await.unwrap();
    assert_eq!(first.len(), 3);
    let again = store::claim(&app.db, &request, "w").await.unwrap();
    let mut attempts: Vec<(Uuid, i32)> = again.iter().map(|job| (job.id, job.attempt)).collect();
    attempts.sort();
    let mut expected: Vec<(Uuid, i32)> = ids.iter().map(|&id| (id, 1)).collect();
    expected.sort();
    assert_eq!(attempts, expected, "the same jobs, the same attempt");
    // Even where its messages now read as redelivered, each job comes back once, unchanged.
    let redelivered =
        ClaimRequest { ids: ids.clone(), redelivered: ids.clone(), retries: Vec::new(), token: request.token };
    let once = store::claim(&app.db, &redelivered, "w").await.unwrap();
    assert_eq!(once.len(), 3);
    assert!(once.iter().all(|job| job.attempt == 1));
    // Another batch's claim does not get them.
    assert!(store::claim(&app.db, &ClaimRequest::new(ids.clone()), "w2").await.unwrap().is_empty());
}

/// Closes the broker side of every connection whose name contains `needle`, as a
/// broker restart or network cut would.
fn close_broker_connections(needle: &str) -> usize {
    let listing = std::process::Command::new("rabbitmqctl")
        .args(["list_connections", "-q", "pid", "client_properties"])
        .output()
        .expect("rabbitmqctl runs");
    let text = String::from_utf8_lossy(&listing.stdout);
    let mut closed = 0;
    for line in text.lines().filter(|line| line.contains(needle)) {
        let pid = line.split('\t').next().unwrap_or_default();
        let status = std::process::Command::new("rabbitmqctl")
            .args(["close_connection", pid, "test: simulated broker failure"])
            .status()
            .expect("rabbitmqctl runs");
        assert!(status.success());
        closed += 1;
    }
    closed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_reconnects_after_losing_the_broker() {
    let app = TestApp::start(test_settings().await, AppOptions::default()).await;
    let first = app.submit("digits-cnn", json!({"pixels": vec![1; 64]})).await;
    assert_eq!(app.wait_finished(&first, Duration::from_secs(30)).await["status"], "succeeded");

    let worker_id = app.settings.worker.id.clone().unwrap();
    assert_eq!(close_broker_connections(&format!("spool-worker {worker_id}")), 1);

    let second = app.submit("digits-cnn", json!({"pixels": vec![2; 64]})).await;
    let job = app.wait_finished(&second, Duration::from_secs(30)).await;
    assert_eq!(job["status"], "succeeded", "{job}");
}

/// The worker's PostgreSQL breaker: cut the worker (only) off its database, and its jobs
/// wait, held and unacked, with the breaker open; restore it and they run once each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_cut_off_from_postgres_holds_its_jobs_until_the_database_returns() {
    let settings = test_settings().await;
    let mut app = TestApp::start(settings.clone(), AppOptions { worker_models: vec![], ..Default::default() }).await;
    // The worker logs in as its own role, which the test can lock out without touching the API.
    let role = format!("w{}", &Uuid::now_v7().simple().to_string()[20..]);
    let admin_url = settings.database_url.expose_secret().rsplit_once('/').unwrap().0.to_owned() + "/postgres";
    let admin = sea_orm::Database::connect(admin_url).await.unwrap();
    admin.execute_unprepared(&format!("CREATE ROLE {role} LOGIN SUPERUSER")).await.unwrap();
    let (server, database) = settings.database_url.expose_secret().rsplit_once('/').unwrap();
    let server = server.replacen("postgres:postgres@", &format!("{role}@"), 1);
    app.settings.database_url = format!("{server}/{database}").into();
    app.start_worker(&["digits-cnn"]).await;
    let warm = app.submit("digits-cnn", json!({"pixels": vec![3; 64]})).await;
    assert_eq!(app.wait_finished(&warm, Duration::from_secs(30)).await["status"], "succeeded");

    let lock_out = format!(
        "ALTER ROLE {role} NOLOGIN; SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{role}'"
    );
    admin.execute_unprepared(&lock_out).await.unwrap();
    let mut held = Vec::new();
    for i in 0..6 {
        held.push(app.submit("digits-cnn", json!({"pixels": vec![i; 64]})).await);
    }
    let operator = app.new_operator_token().await;
    let breaker_state = || async {
        let workers: Value = app.get_json_as("/v1/admin/workers", &operator).await;
        workers["data"][0]["database_breaker"].as_str().unwrap_or_default().to_owned()
    };
    let mut opened = false;
    for _ in 0..100 {
        if breaker_state().await == "open" {
            opened = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(opened, "the worker's PostgreSQL breaker opens");
    for id in &held {
        let job: Value = app.get_job(id).await.json().await.unwrap();
        assert_eq!(job["status"], "queued", "nothing ran, nothing was lost: {job}");
    }

    admin.execute_unprepared(&format!("ALTER ROLE {role} LOGIN")).await.unwrap();
    for id in &held {
        let job = app.wait_finished(id, Duration::from_secs(30)).await;
        assert_eq!(job["status"], "succeeded", "{job}");
        assert_eq!(job["attempts"], 1, "held, not bounced through the queue: {job}");
    }
    app.stop_worker().await;
    admin.execute_unprepared(&format!("DROP ROLE {role}")).await.unwrap();
}
