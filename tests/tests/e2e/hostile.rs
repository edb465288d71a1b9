//! Hostile input against every operation the OpenAPI document lists: whatever a client
//! sends, the answer is a success or an RFC 9457 problem with a stable `code` — never a
//! 5xx. Operations are read from `/openapi.json`, so a new endpoint is covered the day it
//! is added.

use reqwest::Method;
use serde_json::Value;
use spool_tests::{AppOptions, OperatorTokens, TestApp, lift_rate_limits, test_settings};

/// Small, so that an oversized body is cheap to send.
const MAX_BODY_BYTES: usize = 64 * 1024;

/// What goes where a path parameter belongs.
fn path_values() -> Vec<String> {
    vec![
        "not-a-uuid".into(),
        "00000000-0000-0000-0000-000000000000".into(),
        "0198a1b2-0000-7000-8000-000000000000".into(),
        "%00".into(),
        "%F0%28%8C%28".into(),
        "9".repeat(400),
    ]
}

/// Bodies, with the content type they claim.
fn bodies() -> Vec<(&'static str, Vec<u8>)> {
    let deep = format!("{}{}", "[".repeat(20_000), "]".repeat(20_000));
    vec![
        ("application/json", b"".to_vec()),
        ("application/json", b"{".to_vec()),
        ("application/json", b"null".to_vec()),
        ("application/json", b"[]".to_vec()),
        ("application/json", b"\"text\"".to_vec()),
        ("application/json", b"1e999".to_vec()),
        ("application/json", br#"{"model": 7, "input": [], "items": {}, "url": 1, "events": "x"}"#.to_vec()),
        ("application/json", br#"{"model": "digits-cnn", "input": {"pixels": "\u0000"}, "webhook": {"url": "file:///etc/passwd"}}"#.to_vec()),
        ("application/json", br#"{"email": "\u0000@x", "password": "", "token": "\u0000", "name": "", "expires_in": "-1s", "scopes": ["root"]}"#.to_vec()),
        ("application/json", br#"{"ids": ["nope"], "model": "", "all": "yes", "url": "http://[::1]/", "events": ["*"]}"#.to_vec()),
        ("application/json", deep.into_bytes()),
        ("application/json", vec![0xff, 0xfe, 0x00, 0x7b]),
        ("application/x-ndjson", b"{\"model\":\"digits-cnn\"}\n\xff\n{".to_vec()),
        ("text/plain", b"hello".to_vec()),
        ("application/x-www-form-urlencoded", b"a=b&c".to_vec()),
        ("application/json", vec![b' '; MAX_BODY_BYTES + 1]),
    ]
}

/// Query strings a careless or hostile client sends.
const QUERIES: &[&str] = &[
    "",
    "?wait=-1&limit=abc&cursor=%25%25&status=nope&model=&before=yesterday",
    "?wait=99999999999999999999999&limit=-5&cursor=AAAA&status=queued,running,zzz",
    "?limit=0&cursor=eyJ4Ijoi&ids=1,2,3&older_than_secs=-1",
];

/// Headers that steer a request's handling.
fn header_variants() -> Vec<Vec<(&'static str, String)>> {
    vec![
        vec![],
        vec![("prefer", "wait=-5".into()), ("idempotency-key", "k".repeat(1_000))],
        vec![("prefer", "wait=99999999999999999999".into()), ("idempotency-key", String::new())],
        vec![("x-request-id", "bad id with spaces".into()), ("accept", "application/xml".into())],
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whatever_a_client_sends_it_gets_no_5xx_and_every_4xx_is_a_problem_with_a_code() {
    let mut settings = test_settings().await;
    lift_rate_limits(&mut settings);
    settings.api.max_body_bytes = MAX_BODY_BYTES;
    settings.api.max_batch_bytes = MAX_BODY_BYTES;
    let app = TestApp::start(settings, AppOptions { worker_models: vec![], ..Default::default() }).await;

    let OperatorTokens { api: everything, session } = app.new_operator_with_session().await;
    let spec: Value = app.client.get(app.url("/openapi.json")).send().await.unwrap().json().await.unwrap();
    let operations: Vec<(Method, String)> = spec["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, item)| {
            item.as_object().unwrap().keys().filter_map(move |verb| {
                Method::from_bytes(verb.to_uppercase().as_bytes()).ok().map(|method| (method, path.clone()))
            })
        })
        .collect();
    assert!(operations.len() >= 30, "the document lists every operation: {}", operations.len());

    // One dimension varied at a time from a plain request: bodies (with both tokens),
    // query strings, steering headers, and who asks.
    let mut probes = Vec::new();
    for (method, template) in &operations {
        let paths: Vec<String> = if template.contains('{') {
            path_values().iter().map(|value| fill_path(template, value)).collect()
        } else {
            vec![template.clone()]
        };
        for path in paths {
            let probe = |token: Option<&str>| Probe {
                method: method.clone(),
                path: path.clone(),
                token: token.map(str::to_owned),
                ..Default::default()
            };
            if *method != Method::GET {
                for (content_type, body) in bodies() {
                    for token in [everything.as_str(), session.as_str()] {
                        probes.push(Probe { body: Some((content_type, body.clone())), ..probe(Some(token)) });
                    }
                }
            }
            for query in QUERIES {
                probes.push(Probe { query, ..probe(Some(&everything)) });
            }
            for headers in header_variants() {
                probes.push(Probe { headers, ..probe(Some(&everything)) });
            }
            for token in [None, Some("v4.public.garbage"), Some(app.token.as_str())] {
                probes.push(probe(token));
            }
        }
    }
    assert!(probes.len() > 2_000, "the sweep is wide: {} requests", probes.len());

    // A fresh connection per probe: one the server closed after refusing an oversized
    // body must not fail the next probe.
    let client = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
    let mut offences = Vec::new();
    let mut seen = std::collections::BTreeMap::<(u16, String), usize>::new();
    let mut body_too_large = Vec::new();
    for probe in &probes {
        let (status, content_type, text) = probe.send(&client, &app).await;
        let code = serde_json::from_str::<Value>(&text).ok().and_then(|v| v["code"].as_str().map(str::to_owned));
        if status == 413 {
            body_too_large
                .push(serde_json::from_str::<Value>(&text).unwrap()["detail"].as_str().unwrap_or_default().to_owned());
        }
        *seen.entry((status, code.unwrap_or_default())).or_default() += 1;
        if !acceptable(status, &content_type, &text) {
            offences.push(format!("{probe} → {status}: {}", text.chars().take(300).collect::<String>()));
        }
    }
    eprintln!("{} probes, answered (status, code) × count: {seen:?}", probes.len());
    let detail = "the body is over this endpoint's limit of 65536 bytes";
    assert!(
        !body_too_large.is_empty() && body_too_large.iter().all(|d| d == detail),
        "413 says the limit: {body_too_large:?}"
    );
    assert!(
        offences.is_empty(),
        "{} of {} requests were answered badly:\n{}",
        offences.len(),
        probes.len(),
        offences.iter().take(25).cloned().collect::<Vec<_>>().join("\n")
    );
}

#[derive(Default)]
struct Probe {
    method: Method,
    path: String,
    query: &'static str,
    token: Option<String>,
    headers: Vec<(&'static str, String)>,
    body: Option<(&'static str, Vec<u8>)>,
}

impl Probe {
    fn oversized(&self) -> bool {
        self.body.as_ref().is_some_and(|(_, body)| body.len() > MAX_BODY_BYTES)
    }

    /// Status, content type and body text of the answer.
    async fn send(&self, client: &reqwest::Client, app: &TestApp) -> (u16, String, String) {
        let mut request = client.request(self.method.clone(), app.url(&format!("{}{}", self.path, self.query)));
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        for (name, value) in &self.headers {
            request = request.header(*name, value);
        }
        if let Some((content_type, body)) = &self.body {
            request = request.header("content-type", *content_type).body(body.clone());
        }
        let response = match request.send().await {
            Ok(response) => response,
            // The server may answer 413 and close the connection before reading a body
            // it will not take, while the client is still writing it (RFC 9110 §15.5.14).
            Err(error) if self.oversized() => return (0, String::new(), format!("connection closed: {error}")),
            Err(error) => panic!("{self}: {error}"),
        };
        let status = response.status().as_u16();
        let content_type =
            response.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
        (status, content_type, response.text().await.unwrap_or_default())
    }
}

impl std::fmt::Display for Probe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}{}", self.method, self.path, self.query)?;
        if let Some((content_type, body)) = &self.body {
            write!(
                f,
                " [{content_type}, {} bytes: {:?}]",
                body.len(),
                String::from_utf8_lossy(&body[..body.len().min(40)])
            )?;
        }
        let token = self.token.as_deref().map_or("none", |t| &t[..t.len().min(16)]);
        write!(f, " token={token} headers={:?}", self.headers.iter().map(|(n, _)| *n).collect::<Vec<_>>())
    }
}

fn fill_path(template: &str, value: &str) -> String {
    let mut path = String::new();
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        let close = rest[open..].find('}').map_or(rest.len(), |i| open + i + 1);
        path.push_str(&rest[..open]);
        path.push_str(value);
        rest = &rest[close..];
    }
    path.push_str(rest);
    path
}

/// A success of any kind, or a 4xx that is a problem document naming its code.
fn acceptable(status: u16, content_type: &str, body: &str) -> bool {
    match status {
        0 => true, // an oversized body, refused before it was read
        200..=399 => true,
        400..=499 => {
            let Ok(problem) = serde_json::from_str::<Value>(body) else { return false };
            content_type.starts_with("application/problem+json")
                && problem["status"] == status
                && problem["title"].is_string()
                && problem["code"].as_str().is_some_and(|code| !code.is_empty())
        }
        _ => false,
    }
}
