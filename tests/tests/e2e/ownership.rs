//! Object-level authorization, swept: one user's job, batch, webhook, delivery and token,
//! tried through every operation of `/openapi.json` that takes an id, by another user
//! holding every scope. Each answer must be the object's 404 (or 403 for an operators'
//! endpoint), and the objects must come out unchanged. A new operation with an id fails
//! this test until it says which object its id names.

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use spool_api::auth::{Scope, TokenGrant, TokenKind};
use spool_tests::{AppOptions, StatusCode, TestApp, test_settings};
use uuid::Uuid;

/// One user's objects, by kind.
struct Owned {
    job: String,
    batch: String,
    webhook: String,
    delivery: String,
    token: String,
}

impl Owned {
    /// The id a path template's parameter names, and the 404 code it must answer with.
    fn for_path(&self, template: &str) -> (&str, &'static str) {
        let kinds: [(&str, &str, &str); 6] = [
            ("/v1/webhooks/deliveries/", &self.delivery, "delivery_not_found"),
            ("/v1/webhooks/", &self.webhook, "webhook_not_found"),
            ("/v1/jobs/", &self.job, "job_not_found"),
            ("/v1/batches/", &self.batch, "batch_not_found"),
            ("/v1/tokens/", &self.token, "token_not_found"),
            ("/v1/admin/dead-letters/", &self.job, "insufficient_scope"),
        ];
        kinds
            .into_iter()
            .find(|(prefix, _, _)| template.starts_with(prefix))
            .map(|(_, id, code)| (id, code))
            .unwrap_or_else(|| panic!("{template}: say which object its id names"))
    }
}

fn session(app: &TestApp, user_id: Uuid) -> String {
    let grant = TokenGrant {
        user_id,
        kind: TokenKind::Session,
        token_id: Uuid::now_v7(),
        scopes: &[],
        ttl: Some(Duration::from_secs(600)),
    };
    app.signer().sign(&grant).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_users_objects_are_404_through_every_operation_that_takes_an_id() {
    // No worker: the owner's job stays queued, so a cancel that got through would show.
    let app = TestApp::start(test_settings().await, AppOptions { worker_models: vec![], ..Default::default() }).await;
    let (owner, _) = app.new_user_with_token(&[]).await;
    let owner_api = app.api_token(owner, &Scope::ALL, Duration::from_secs(3600)).await;
    let owner_session = session(&app, owner);
    let (other, _) = app.new_user_with_token(&[]).await;
    let other_api = app.api_token(other, &Scope::ALL, Duration::from_secs(3600)).await;
    let other_session = session(&app, other);

    let digits = json!({"pixels": vec![0; 64]});
    let (_, job) =
        app.call(&owner_api, Method::POST, "/v1/jobs", Some(json!({"model": "digits-cnn", "input": digits}))).await;
    let batch_body = json!({"model": "digits-cnn", "items": [{"input": digits}, {"input": digits}]});
    let (_, batch) = app.call(&owner_api, Method::POST, "/v1/batches", Some(batch_body)).await;
    let hook = json!({"url": "http://127.0.0.1:9/hook", "events": ["job.succeeded"]});
    let (_, webhook) = app.call(&owner_api, Method::POST, "/v1/webhooks", Some(hook)).await;
    let webhook_id = webhook["id"].as_str().unwrap().to_owned();
    app.call(&owner_api, Method::POST, &format!("/v1/webhooks/{webhook_id}/test"), None).await;
    let (_, log) = app.call(&owner_api, Method::GET, &format!("/v1/webhooks/{webhook_id}/deliveries"), None).await;
    let token_body = json!({"name": "owned", "expires_in": "1d", "scopes": ["jobs:read"]});
    let (_, token) = app.call(&owner_session, Method::POST, "/v1/tokens", Some(token_body)).await;
    let owned = Owned {
        job: job["id"].as_str().unwrap().into(),
        batch: batch["id"].as_str().unwrap().into(),
        webhook: webhook_id,
        delivery: log["data"][0]["id"].as_str().unwrap().into(),
        token: token["id"].as_str().unwrap().into(),
    };
    let owner_token_secret = token["token"].as_str().unwrap().to_owned();

    let spec: Value = app.client.get(app.url("/openapi.json")).send().await.unwrap().json().await.unwrap();
    let mut tried = 0;
    let mut wrong = Vec::new();
    for (template, item) in spec["paths"].as_object().unwrap() {
        let Some(open) = template.find('{') else { continue };
        let (id, expected) = owned.for_path(template);
        let close = open + template[open..].find('}').unwrap();
        let path = format!("{}{id}{}", &template[..open], &template[close + 1..]);
        for verb in item.as_object().unwrap().keys() {
            let method = Method::from_bytes(verb.to_uppercase().as_bytes()).unwrap();
            // Token management takes a session; everything else an API token.
            let token = if template.starts_with("/v1/tokens/") { &other_session } else { &other_api };
            let body = (method != Method::GET && method != Method::DELETE).then(|| json!({}));
            let (status, answer) = app.call(token, method.clone(), &path, body).await;
            tried += 1;
            if answer["code"] != expected {
                wrong.push(format!("{method} {path} → {status} {answer}"));
            }
        }
    }
    assert!(wrong.is_empty(), "another user reached an object:\n{}", wrong.join("\n"));
    assert!(tried >= 12, "every operation with an id was tried: {tried}");
    // A user's token with every scope still is not an operator's, and is told so.
    let (status, answer) = app.call(&other_api, Method::GET, "/v1/admin/breakers", None).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(answer["detail"], "only operators may do this; this account is not one", "{answer}");

    // Nothing of the owner's changed, and none of it shows in the other user's lists.
    let (_, job) = app.call(&owner_api, Method::GET, &format!("/v1/jobs/{}", owned.job), None).await;
    assert_eq!(job["status"], "queued", "{job}");
    let (_, batch) = app.call(&owner_api, Method::GET, &format!("/v1/batches/{}", owned.batch), None).await;
    assert_eq!(batch["counts"]["queued"], 2, "{batch}");
    let (status, _) = app.call(&owner_api, Method::GET, &format!("/v1/webhooks/{}", owned.webhook), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(app.call(&owner_token_secret, Method::GET, "/v1/jobs", None).await.0, StatusCode::OK);
    for (list, token) in [
        ("/v1/jobs", &other_api),
        ("/v1/batches", &other_api),
        ("/v1/webhooks", &other_api),
        ("/v1/tokens", &other_session),
    ] {
        let (_, listed) = app.call(token, Method::GET, list, None).await;
        let ids: Vec<&str> = listed["data"].as_array().unwrap().iter().filter_map(|o| o["id"].as_str()).collect();
        for id in [&owned.job, &owned.batch, &owned.webhook, &owned.token] {
            assert!(!ids.contains(&id.as_str()), "{list} shows {id} to another user");
        }
    }
}
