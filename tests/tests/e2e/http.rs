//! Service endpoints: health, readiness, metrics, OpenAPI, docs, request ids, models.

use serde_json::Value;
use spool_tests::{AppOptions, StatusCode, TestApp, spawn_app_with};

async fn app_without_worker() -> TestApp {
    spawn_app_with(AppOptions { worker_models: vec![], ..Default::default() }).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_readiness_metrics_and_request_ids() {
    let app = app_without_worker().await;

    let health = app.client.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    assert!(health.headers().contains_key("x-request-id"));

    // The publisher connects in the background; readiness follows within seconds.
    let mut ready = None;
    for _ in 0..50 {
        let response = app.client.get(app.url("/readyz")).send().await.unwrap();
        if response.status() == StatusCode::OK {
            ready = Some(response.json::<Value>().await.unwrap());
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let ready = ready.expect("ready within 5 s");
    assert_eq!(ready["postgres"], true);
    assert_eq!(ready["rabbitmq"], true);
    assert_eq!(ready["redis"], true);

    let metrics = app.client.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("spool_http_request_duration_seconds"), "{metrics}");
    // The counters to alert on exist before anything went wrong.
    for series in [
        "spool_ratelimit_unavailable_total",
        r#"spool_api_rejected_unavailable_total{model="minilm-embed",reason="breakers_open"}"#,
    ] {
        assert!(metrics.contains(series), "{series} missing from:\n{metrics}");
    }

    let traced = app.client.get(app.url("/healthz")).header("x-request-id", "trace-me-42").send().await.unwrap();
    assert_eq!(traced.headers()["x-request-id"], "trace-me-42");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_paths_and_methods_get_404_and_405_problems() {
    let app = app_without_worker().await;

    let unknown = app.client.get(app.url("/v1/nothing-here")).send().await.unwrap();
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
    assert_eq!(unknown.headers()["content-type"], "application/problem+json");

    // A method the path does not take: 405, naming the ones it does (RFC 9110).
    let wrong_method = app.client.delete(app.url("/v1/jobs")).bearer_auth(&app.token).send().await.unwrap();
    assert_eq!(wrong_method.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(wrong_method.headers()["allow"], "GET, POST");
    assert_eq!(wrong_method.json::<Value>().await.unwrap()["code"], "method_not_allowed");
    let wrong_method = app.client.put(app.url("/v1/webhooks/job-secret")).send().await.unwrap();
    assert_eq!(wrong_method.headers()["allow"], "GET");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_description_and_docs_match_what_the_api_enforces() {
    let app = app_without_worker().await;

    let spec: Value = app.client.get(app.url("/openapi.json")).send().await.unwrap().json().await.unwrap();
    assert!(spec["paths"]["/v1/jobs"]["post"].is_object());
    assert!(spec["components"]["securitySchemes"]["BearerAuth"].is_object());
    assert_eq!(app.client.get(app.url("/docs")).send().await.unwrap().status(), StatusCode::OK);

    // Option fields are null, and the description says they may be.
    let page = app.get_json("/v1/jobs?limit=1").await;
    assert!(page["next_cursor"].is_null(), "{page}");
    assert_eq!(spec["components"]["schemas"]["JobPage"]["properties"]["next_cursor"]["nullable"], true);
    // Parameter ranges are in the description, and enforced.
    let limit = &spec["paths"]["/v1/jobs"]["get"]["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "limit")
        .unwrap()["schema"];
    assert_eq!((limit["minimum"].as_f64(), limit["maximum"].as_f64()), (Some(1.0), Some(100.0)), "{limit}");
    let response = app.client.get(app.url("/v1/jobs?limit=101")).bearer_auth(&app.token).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert_eq!(response.json::<Value>().await.unwrap()["code"], "invalid_parameter");
    // An empty cursor is the first page; one this API did not give is refused.
    for list in ["/v1/jobs", "/v1/batches"] {
        let first = app.client.get(app.url(&format!("{list}?cursor="))).bearer_auth(&app.token).send().await.unwrap();
        assert_eq!(first.status(), StatusCode::OK, "{list}");
        let made_up =
            app.client.get(app.url(&format!("{list}?cursor=page-2"))).bearer_auth(&app.token).send().await.unwrap();
        assert_eq!(made_up.status(), StatusCode::BAD_REQUEST, "{list}");
        assert_eq!(made_up.json::<Value>().await.unwrap()["code"], "invalid_parameter");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_show_their_schemas_queue_depth_and_workers() {
    let app = app_without_worker().await;

    let models: Value = app.get_json("/v1/models").await;
    let names: Vec<&str> = models["data"].as_array().unwrap().iter().map(|m| m["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["digits-cnn", "minilm-embed"]);
    assert_eq!(models["data"][0]["input_schema"]["properties"]["pixels"]["minItems"], 64);

    // No worker runs here: jobs wait, and the catalog says so.
    for _ in 0..2 {
        app.submit("digits-cnn", serde_json::json!({"pixels": vec![0; 64]})).await;
    }
    let models: Value = app.get_json("/v1/models").await;
    let digits = &models["data"][0];
    assert_eq!((digits["queue_depth"].as_u64(), digits["workers_online"].as_u64()), (Some(2), Some(0)), "{digits}");
    assert_eq!(digits["health"], "no_worker");
    assert_eq!(models["data"][1]["queue_depth"], 0);
}
