//! Identity and access against real PostgreSQL, Redis and an SMTP server (aiosmtpd):
//! accounts, mails, sessions, API tokens, revocation, throttling and rate limits.

use std::time::Duration;

use serde_json::{Value, json};
use spool_api::auth::{Scope, TokenGrant, TokenKind};
use spool_tests::{AppOptions, StatusCode, TestApp, spawn_app_with, test_settings, token_in_mail, wait_for_mail};
use uuid::Uuid;

fn no_worker() -> AppOptions {
    AppOptions { worker_models: vec![], ..Default::default() }
}

async fn problem(response: reqwest::Response) -> (StatusCode, String) {
    let status = response.status();
    let body: Value = response.json().await.unwrap_or_default();
    (status, body["code"].as_str().unwrap_or_default().to_owned())
}

async fn post(app: &TestApp, path: &str, token: Option<&str>, body: Value) -> reqwest::Response {
    let mut request = app.client.post(app.url(path)).json(&body);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    request.send().await.unwrap()
}

async fn get(app: &TestApp, path: &str, token: &str) -> reqwest::Response {
    app.client.get(app.url(path)).bearer_auth(token).send().await.unwrap()
}

async fn login(app: &TestApp, email: &str, password: &str) -> reqwest::Response {
    post(app, "/v1/auth/login", None, json!({"email": email, "password": password})).await
}

fn new_email() -> String {
    format!("reader-{}@example.com", Uuid::now_v7().simple())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_verify_login_create_token_submit_revoke() {
    let app = spawn_app_with(no_worker()).await;
    let email = new_email();
    let password = "violet-lantern-harbor";

    let weak = post(&app, "/v1/auth/register", None, json!({"email": email, "password": "short"})).await;
    assert_eq!(problem(weak).await, (StatusCode::UNPROCESSABLE_ENTITY, "invalid_input".into()));
    let common = post(&app, "/v1/auth/register", None, json!({"email": email, "password": "password1234"})).await;
    assert_eq!(problem(common).await, (StatusCode::UNPROCESSABLE_ENTITY, "invalid_input".into()));

    let created =
        post(&app, "/v1/auth/register", None, json!({"email": email.to_uppercase(), "password": password})).await;
    assert_eq!(created.status(), StatusCode::ACCEPTED);

    // Unverified: can sign in, cannot create API tokens.
    let session = login(&app, &email, password).await;
    assert_eq!(session.status(), StatusCode::OK);
    let session = session.json::<Value>().await.unwrap()["token"].as_str().unwrap().to_owned();
    let token_request = json!({"name": "nightly-script", "expires_in": "30d", "scopes": ["jobs:read", "jobs:write"]});
    let refused = post(&app, "/v1/tokens", Some(&session), token_request.clone()).await;
    assert_eq!(problem(refused).await, (StatusCode::FORBIDDEN, "email_not_verified".into()));

    let mail = wait_for_mail(&email, 0).await;
    assert!(mail.contains("Confirm your Spool account"));
    let verify_token = token_in_mail(&mail);
    let verified = post(&app, "/v1/auth/verify-email", None, json!({"token": verify_token})).await;
    assert_eq!(verified.status(), StatusCode::NO_CONTENT);
    let reused = post(&app, "/v1/auth/verify-email", None, json!({"token": verify_token})).await;
    assert_eq!(problem(reused).await, (StatusCode::BAD_REQUEST, "invalid_email_token".into()));

    let me: Value = get(&app, "/v1/me", &session).await.json().await.unwrap();
    assert_eq!((me["email"].as_str(), &me["email_verified"]), (Some(email.as_str()), &json!(true)));
    assert!(me.get("password").is_none() && me.get("password_hash").is_none());

    let created = post(&app, "/v1/tokens", Some(&session), token_request).await;
    assert_eq!(created.status(), StatusCode::CREATED);
    let created: Value = created.json().await.unwrap();
    let api_token = created["token"].as_str().unwrap().to_owned();
    let token_id = created["id"].as_str().unwrap().to_owned();
    assert_eq!(created["name"], "nightly-script");

    // The right token for each door.
    let job = json!({"model": "digits-cnn", "input": {"pixels": vec![0; 64]}});
    let submitted = post(&app, "/v1/jobs", Some(&api_token), job.clone()).await;
    assert_eq!(submitted.status(), StatusCode::ACCEPTED);
    let wrong = post(&app, "/v1/jobs", Some(&session), job.clone()).await;
    assert_eq!(problem(wrong).await, (StatusCode::UNAUTHORIZED, "wrong_token_purpose".into()));
    let wrong = get(&app, "/v1/tokens", &api_token).await;
    assert_eq!(problem(wrong).await, (StatusCode::UNAUTHORIZED, "wrong_token_purpose".into()));
    assert_eq!(get(&app, "/v1/me", &api_token).await.status(), StatusCode::OK);

    let listed: Value = get(&app, "/v1/tokens", &session).await.json().await.unwrap();
    let listed = &listed["data"][0];
    assert_eq!(listed["id"], token_id.as_str());
    assert!(listed["last_used_at"].is_string(), "{listed}");
    assert!(listed.get("token").is_none(), "the token is shown only once");

    let usage: Value = get(&app, "/v1/me/usage", &api_token).await.json().await.unwrap();
    assert_eq!(usage["submitted"], 1);
    assert_eq!(usage["models"][0]["model"], "digits-cnn");

    let revoked =
        app.client.delete(app.url(&format!("/v1/tokens/{token_id}"))).bearer_auth(&session).send().await.unwrap();
    assert_eq!(revoked.status(), StatusCode::NO_CONTENT);
    let after = post(&app, "/v1/jobs", Some(&api_token), job).await;
    assert_eq!(problem(after).await, (StatusCode::UNAUTHORIZED, "token_revoked".into()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_reaches_every_api_instance_at_once() {
    let settings = test_settings().await;
    let app = TestApp::start(settings.clone(), no_worker()).await;
    let other = TestApp::start(settings, no_worker()).await; // a second instance, same stores
    let (user_id, _) = app.new_user_with_token(&[Scope::JobsRead]).await;
    let token = app.api_token(user_id, &[Scope::JobsRead], Duration::from_secs(3600)).await;
    // Both instances have seen (and cached) the token as valid.
    assert_eq!(get(&app, "/v1/jobs", &token).await.status(), StatusCode::OK);
    assert_eq!(get(&other, "/v1/jobs", &token).await.status(), StatusCode::OK);

    let session = app.signer().sign(&TokenGrant {
        user_id,
        kind: TokenKind::Session,
        token_id: Uuid::now_v7(),
        scopes: &[],
        ttl: Some(Duration::from_secs(600)),
    });
    let session = session.unwrap();
    let list: Value = get(&app, "/v1/tokens", &session).await.json().await.unwrap();
    let token_id = list["data"][0]["id"].as_str().unwrap().to_owned(); // newest first
    let deleted =
        app.client.delete(app.url(&format!("/v1/tokens/{token_id}"))).bearer_auth(&session).send().await.unwrap();
    assert_eq!(deleted.status(), StatusCode::NO_CONTENT);
    for instance in [&app, &other] {
        let response = get(instance, "/v1/jobs", &token).await;
        assert_eq!(problem(response).await, (StatusCode::UNAUTHORIZED, "token_revoked".into()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_get_distinct_401s() {
    let app = spawn_app_with(no_worker()).await;
    let url = app.url("/v1/jobs");

    let missing = app.client.get(&url).send().await.unwrap();
    assert_eq!(missing.headers()["www-authenticate"], "Bearer");
    assert_eq!(problem(missing).await, (StatusCode::UNAUTHORIZED, "missing_token".into()));

    let garbage = app.client.get(&url).bearer_auth("v4.public.garbage").send().await.unwrap();
    assert_eq!(problem(garbage).await, (StatusCode::UNAUTHORIZED, "invalid_token".into()));

    let mut tampered = app.token.clone().into_bytes();
    let i = tampered.len() / 3;
    tampered[i] = if tampered[i] == b'a' { b'b' } else { b'a' };
    let response = app.client.get(&url).bearer_auth(String::from_utf8(tampered).unwrap()).send().await.unwrap();
    assert_eq!(problem(response).await, (StatusCode::UNAUTHORIZED, "invalid_token".into()));

    // Signed by a key this deployment does not trust.
    let (foreign_secret, _) = spool_api::auth::generate_key_pair().unwrap();
    let foreign = spool_api::auth::TokenSigner::new(&foreign_secret, "spool").unwrap().sign(&TokenGrant {
        user_id: app.user_id,
        kind: TokenKind::Api,
        token_id: Uuid::now_v7(),
        scopes: &[Scope::JobsRead],
        ttl: Some(Duration::from_secs(60)),
    });
    let response = app.client.get(&url).bearer_auth(foreign.unwrap()).send().await.unwrap();
    assert_eq!(problem(response).await, (StatusCode::UNAUTHORIZED, "invalid_token".into()));

    // A v4.local token (symmetric, encrypted): not what this API accepts.
    let local = "v4.local.32VIErrEkmY4JVILovbmfPXKW9wT1OdQepjMTC_MOtjA4kiqw7_tcaOM5GNEcnTxl60WkwMsYXw6FSNb_UdJPXjpzm0KW9ojM5f4O2mRvE2IcweP-PRdoHjd5-RHCiExR1IK6t6-tyebyWG6Ov7kKvBdkrrAJ837lKP3iDag2hzUPHuMKA";
    let response = app.client.get(&url).bearer_auth(local).send().await.unwrap();
    assert_eq!(problem(response).await, (StatusCode::UNAUTHORIZED, "unsupported_token".into()));

    let short = app.api_token(app.user_id, &[Scope::JobsRead], Duration::from_secs(1)).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let response = app.client.get(&url).bearer_auth(short).send().await.unwrap();
    assert_eq!(problem(response).await, (StatusCode::UNAUTHORIZED, "token_expired".into()));

    // A token whose row was never written (or whose account is gone) is not honoured.
    let orphan = app.signer().sign(&TokenGrant {
        user_id: app.user_id,
        kind: TokenKind::Api,
        token_id: Uuid::now_v7(),
        scopes: &[Scope::JobsRead],
        ttl: Some(Duration::from_secs(60)),
    });
    let response = app.client.get(&url).bearer_auth(orphan.unwrap()).send().await.unwrap();
    assert_eq!(problem(response).await, (StatusCode::UNAUTHORIZED, "token_revoked".into()));

    let read_only = app.api_token(app.user_id, &[Scope::JobsRead], Duration::from_secs(60)).await;
    let response =
        post(&app, "/v1/jobs", Some(&read_only), json!({"model": "digits-cnn", "input": {"pixels": vec![0; 64]}}))
            .await;
    assert_eq!(problem(response).await, (StatusCode::FORBIDDEN, "insufficient_scope".into()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registering_an_address_again_tells_only_its_owner_and_changes_nothing() {
    let app = spawn_app_with(no_worker()).await;
    let email = new_email();
    let (password, other) = ("violet-lantern-harbor", "crimson-otter-lagoon");
    let register =
        |password: &'static str| post(&app, "/v1/auth/register", None, json!({"email": email, "password": password}));
    assert_eq!(register(password).await.status(), StatusCode::ACCEPTED);
    let first = wait_for_mail(&email, 0).await;
    assert!(first.contains("Confirm your Spool account"), "{first}");

    // Not verified yet: a second registration sends another verification mail.
    let again = register(other).await;
    assert_eq!((again.status(), again.bytes().await.unwrap().len()), (StatusCode::ACCEPTED, 0));
    let second = wait_for_mail(&email, 1).await;
    assert!(second.contains("Confirm your Spool account"), "{second}");
    let verified = post(&app, "/v1/auth/verify-email", None, json!({"token": token_in_mail(&second)})).await;
    assert_eq!(verified.status(), StatusCode::NO_CONTENT);

    // Verified: the same answer, and a mail to the owner saying so.
    assert_eq!(register(other).await.status(), StatusCode::ACCEPTED);
    let third = wait_for_mail(&email, 2).await;
    assert!(
        third.contains("You already have a Spool account") && third.contains("/v1/auth/password/forgot"),
        "{third}"
    );
    // Neither registration changed the password.
    assert_eq!(
        problem(login(&app, &email, other).await).await,
        (StatusCode::UNAUTHORIZED, "invalid_credentials".into())
    );
    assert_eq!(login(&app, &email, password).await.status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_reset_signs_out_every_session_without_revealing_accounts() {
    let app = spawn_app_with(no_worker()).await;
    let email = new_email();
    let (old, new) = ("amber-quartz-meadow", "cobalt-fennel-spire");
    assert_eq!(
        post(&app, "/v1/auth/register", None, json!({"email": email, "password": old})).await.status(),
        StatusCode::ACCEPTED
    );
    let session: Value = login(&app, &email, old).await.json().await.unwrap();
    let session = session["token"].as_str().unwrap().to_owned();
    assert_eq!(get(&app, "/v1/me", &session).await.status(), StatusCode::OK);

    // Same answer for an unknown address, and no mail.
    let nobody = new_email();
    let unknown = post(&app, "/v1/auth/password/forgot", None, json!({"email": nobody})).await;
    assert_eq!(unknown.status(), StatusCode::ACCEPTED);
    let typo = post(&app, "/v1/auth/password/forgot", None, json!({"email": "reader@"})).await;
    assert_eq!(problem(typo).await, (StatusCode::UNPROCESSABLE_ENTITY, "invalid_input".into()));
    let known = post(&app, "/v1/auth/password/forgot", None, json!({"email": email})).await;
    assert_eq!(known.status(), StatusCode::ACCEPTED);
    let mail = wait_for_mail(&email, 1).await; // the second mail: after the verification one
    assert!(mail.contains("Reset your Spool password"), "{mail}");
    let reset_token = token_in_mail(&mail);

    let weak = post(&app, "/v1/auth/password/reset", None, json!({"token": reset_token, "new_password": "tiny"})).await;
    assert_eq!(problem(weak).await, (StatusCode::UNPROCESSABLE_ENTITY, "invalid_input".into()));
    let done = post(&app, "/v1/auth/password/reset", None, json!({"token": reset_token, "new_password": new})).await;
    assert_eq!(done.status(), StatusCode::NO_CONTENT);
    let reused = post(&app, "/v1/auth/password/reset", None, json!({"token": reset_token, "new_password": new})).await;
    assert_eq!(problem(reused).await, (StatusCode::BAD_REQUEST, "invalid_email_token".into()));

    assert_eq!(problem(get(&app, "/v1/me", &session).await).await, (StatusCode::UNAUTHORIZED, "token_revoked".into()));
    assert_eq!(problem(login(&app, &email, old).await).await, (StatusCode::UNAUTHORIZED, "invalid_credentials".into()));
    let fresh: Value = login(&app, &email, new).await.json().await.unwrap();
    assert_eq!(get(&app, "/v1/me", fresh["token"].as_str().unwrap()).await.status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_failed_logins_lock_the_account_for_a_while() {
    let mut settings = test_settings().await;
    settings.auth.max_failed_logins = 3;
    settings.auth.login_window_secs = 4;
    let app = TestApp::start(settings, no_worker()).await;
    let email = new_email();
    let password = "saffron-glacier-piano";
    post(&app, "/v1/auth/register", None, json!({"email": email, "password": password})).await;
    for _ in 0..3 {
        assert_eq!(
            problem(login(&app, &email, "wrong-password-123").await).await,
            (StatusCode::UNAUTHORIZED, "invalid_credentials".into())
        );
    }
    let locked = login(&app, &email, password).await;
    assert!(locked.headers().contains_key("retry-after"));
    assert_eq!(problem(locked).await, (StatusCode::TOO_MANY_REQUESTS, "login_locked".into()));
    tokio::time::sleep(Duration::from_millis(4500)).await; // the lockout expires
    assert_eq!(login(&app, &email, password).await.status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guesses_sent_at_once_get_no_more_tries_than_guesses_sent_one_by_one() {
    let mut settings = test_settings().await;
    settings.auth.max_failed_logins = 3;
    spool_tests::lift_rate_limits(&mut settings);
    let app = TestApp::start(settings, no_worker()).await;
    let email = new_email();
    post(&app, "/v1/auth/register", None, json!({"email": email, "password": "saffron-glacier-piano"})).await;
    let guesses = (0..12).map(|i| {
        let (app, email) = (&app, &email);
        async move { problem(login(app, email, &format!("wrong-password-{i:03}")).await).await }
    });
    let answers = futures::future::join_all(guesses).await;
    let checked = answers.iter().filter(|a| a.1 == "invalid_credentials").count();
    let locked = answers.iter().filter(|a| a.1 == "login_locked").count();
    assert_eq!((checked, locked), (3, 9), "{answers:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_show_in_headers_and_answer_429_past_the_burst() {
    let mut settings = test_settings().await;
    settings.rate_limit.user = spool_shared::config::Quota { per_minute: 60, burst: 5 };
    settings.rate_limit.operator = spool_shared::config::Quota { per_minute: 60, burst: 7 };
    let app = TestApp::start(settings, no_worker()).await;
    let mut remaining = Vec::new();
    for _ in 0..5 {
        let response = get(&app, "/v1/jobs", &app.token).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["ratelimit-limit"], "5");
        assert!(response.headers().contains_key("ratelimit-reset"));
        remaining.push(response.headers()["ratelimit-remaining"].to_str().unwrap().parse::<u32>().unwrap());
    }
    assert_eq!(remaining, [4, 3, 2, 1, 0]);
    let limited = get(&app, "/v1/jobs", &app.token).await;
    let retry_after: u64 = limited.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=2).contains(&retry_after), "one request per second: {retry_after}");
    assert_eq!(problem(limited).await, (StatusCode::TOO_MANY_REQUESTS, "rate_limited".into()));

    // Another token has its own bucket.
    let (_, other) = app.new_user_with_token(&[Scope::JobsRead]).await;
    assert_eq!(get(&app, "/v1/jobs", &other).await.status(), StatusCode::OK);

    // An operator's token gets the operator quota: on the first request, whose standing
    // comes from PostgreSQL, and on the next ones, read from Redis with the quota.
    let operator = app.new_operator_token().await;
    for expected_remaining in ["6", "5", "4"] {
        let response = get(&app, "/v1/admin/dead-letters", &operator).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["ratelimit-limit"], "7");
        assert_eq!(response.headers()["ratelimit-remaining"], expected_remaining);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_users_token_cannot_be_seen_or_revoked() {
    let app = spawn_app_with(no_worker()).await;
    let (victim, _) = app.new_user_with_token(&[Scope::JobsRead]).await;
    let victim_token = app.api_token(victim, &[Scope::JobsRead], Duration::from_secs(3600)).await;
    let (attacker, _) = app.new_user_with_token(&[Scope::JobsRead]).await;
    let session = |user_id| {
        app.signer()
            .sign(&TokenGrant {
                user_id,
                kind: TokenKind::Session,
                token_id: Uuid::now_v7(),
                scopes: &[],
                ttl: Some(Duration::from_secs(600)),
            })
            .unwrap()
    };
    let victim_list: Value = get(&app, "/v1/tokens", &session(victim)).await.json().await.unwrap();
    let victim_token_id = victim_list["data"][0]["id"].as_str().unwrap().to_owned();

    let attacker_list: Value = get(&app, "/v1/tokens", &session(attacker)).await.json().await.unwrap();
    assert!(attacker_list["data"].as_array().unwrap().iter().all(|t| t["id"] != victim_token_id.as_str()));
    let attempt = app
        .client
        .delete(app.url(&format!("/v1/tokens/{victim_token_id}")))
        .bearer_auth(session(attacker))
        .send()
        .await
        .unwrap();
    assert_eq!(problem(attempt).await, (StatusCode::NOT_FOUND, "token_not_found".into()));
    assert_eq!(get(&app, "/v1/jobs", &victim_token).await.status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_holds_at_most_100_live_tokens_and_revoking_one_frees_a_place() {
    let app = spawn_app_with(no_worker()).await;
    // The harness token of the test user is the first; 99 more fill the account.
    for _ in 0..99 {
        app.api_token(app.user_id, &[Scope::JobsRead], Duration::from_secs(3600)).await;
    }
    let grant = TokenGrant {
        user_id: app.user_id,
        kind: TokenKind::Session,
        token_id: Uuid::now_v7(),
        scopes: &[],
        ttl: Some(Duration::from_secs(600)),
    };
    let session = app.signer().sign(&grant).unwrap();
    let request = json!({"name": "one-too-many", "expires_in": "1d", "scopes": ["jobs:read"]});
    let refused = post(&app, "/v1/tokens", Some(&session), request.clone()).await;
    assert_eq!(problem(refused).await, (StatusCode::CONFLICT, "limit_reached".into()));

    let listed: Value = get(&app, "/v1/tokens", &session).await.json().await.unwrap();
    let tokens = listed["data"].as_array().unwrap();
    assert_eq!(tokens.len(), 100);
    let id = tokens[0]["id"].as_str().unwrap();
    let revoked = app.client.delete(app.url(&format!("/v1/tokens/{id}"))).bearer_auth(&session).send().await.unwrap();
    assert_eq!(revoked.status(), StatusCode::NO_CONTENT);
    let created = post(&app, "/v1/tokens", Some(&session), request).await;
    assert_eq!(created.status(), StatusCode::CREATED);

    // Live tokens are listed first, the revoked one after them.
    let listed: Value = get(&app, "/v1/tokens", &session).await.json().await.unwrap();
    let tokens = listed["data"].as_array().unwrap();
    assert_eq!(tokens.len(), 101);
    assert_eq!(tokens[0]["name"], "one-too-many");
    assert_eq!(tokens[100]["id"], id);
}

/// A private Redis for one test, so stopping it disturbs no other test.
async fn start_redis(port: u16) -> tokio::process::Child {
    let child = tokio::process::Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("redis-server is installed (scripts/setup)");
    for _ in 0..50 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return child;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("redis-server did not start on {port}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_down_revocation_still_holds_and_the_limiter_fails_open() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut redis = start_redis(port).await;
    let mut settings = test_settings().await;
    settings.redis_url = secrecy::SecretString::from(format!("redis://127.0.0.1:{port}"));
    let app = TestApp::start(settings, no_worker()).await;
    let session = app
        .signer()
        .sign(&TokenGrant {
            user_id: app.user_id,
            kind: TokenKind::Session,
            token_id: Uuid::now_v7(),
            scopes: &[],
            ttl: Some(Duration::from_secs(600)),
        })
        .unwrap();

    let before = get(&app, "/v1/jobs", &app.token).await;
    assert_eq!(before.status(), StatusCode::OK);
    assert!(before.headers().contains_key("ratelimit-remaining"), "limited while Redis is up");

    redis.kill().await.unwrap();
    let during = get(&app, "/v1/jobs", &app.token).await;
    assert_eq!(during.status(), StatusCode::OK, "PostgreSQL vouches for the token");
    assert!(!during.headers().contains_key("ratelimit-remaining"), "the limiter fails open");

    let list: Value = get(&app, "/v1/tokens", &session).await.json().await.unwrap();
    let token_id = list["data"][0]["id"].as_str().unwrap().to_owned();
    let revoked =
        app.client.delete(app.url(&format!("/v1/tokens/{token_id}"))).bearer_auth(&session).send().await.unwrap();
    assert_eq!(revoked.status(), StatusCode::NO_CONTENT);
    let after = get(&app, "/v1/jobs", &app.token).await;
    assert_eq!(problem(after).await, (StatusCode::UNAUTHORIZED, "token_revoked".into()));

    let metrics = app.client.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("spool_ratelimit_unavailable_total"), "the fail-open is counted");

    // Redis comes back empty: the revocation still holds (it lives in PostgreSQL).
    let _redis = start_redis(port).await;
    tokio::time::sleep(Duration::from_millis(1100)).await; // the handle retries once a second
    let back = get(&app, "/v1/jobs", &app.token).await;
    assert_eq!(problem(back).await, (StatusCode::UNAUTHORIZED, "token_revoked".into()));
}
