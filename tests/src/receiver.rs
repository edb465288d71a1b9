//! A real HTTP webhook receiver on loopback for the tests: records every request and
//! answers with scripted status codes (then 200), optionally slowly.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use poem::listener::{Acceptor, Listener, TcpListener};
use poem::{Request, Response, Server};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone)]
pub struct Received {
    pub headers: HashMap<String, String>,
    pub body: String,
    pub at: chrono::DateTime<chrono::Utc>,
}

impl Received {
    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).map(String::as_str).unwrap_or_default()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap()
    }
}

/// Scripted answers: each request takes the next `(status, delay)`; when none are
/// left, `200` at once.
#[derive(Default)]
struct Script {
    answers: VecDeque<(u16, Duration)>,
    received: Vec<Received>,
}

pub struct Receiver {
    pub port: u16,
    state: Arc<Mutex<Script>>,
    shutdown: CancellationToken,
}

impl Receiver {
    pub async fn start() -> Self {
        Self::start_on(0, Arc::default()).await
    }

    async fn start_on(port: u16, state: Arc<Mutex<Script>>) -> Self {
        let acceptor = TcpListener::bind(format!("127.0.0.1:{port}")).into_acceptor().await.unwrap();
        let port = acceptor.local_addr()[0].as_socket_addr().unwrap().port();
        let shared = Arc::clone(&state);
        let endpoint = poem::endpoint::make(move |request: Request| {
            let state = Arc::clone(&shared);
            async move {
                let headers = request
                    .headers()
                    .iter()
                    .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or_default().to_owned()))
                    .collect();
                let body = request.into_body().into_string().await.unwrap_or_default();
                let at = chrono::Utc::now();
                let (status, delay) = {
                    let mut script = state.lock().unwrap();
                    script.received.push(Received { headers, body, at });
                    script.answers.pop_front().unwrap_or((200, Duration::ZERO))
                };
                tokio::time::sleep(delay).await;
                Response::builder().status(poem::http::StatusCode::from_u16(status).unwrap()).finish()
            }
        });
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let _ = Server::new_with_acceptor(acceptor)
                .run_with_graceful_shutdown(endpoint, stop.cancelled_owned(), Some(Duration::from_millis(100)))
                .await;
        });
        Self { port, state, shutdown }
    }

    /// `http://127.0.0.1:<port>/hook` (the tests allowlist 127.0.0.1).
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hook", self.port)
    }

    /// The next requests get these status codes, in order.
    pub fn answer(&self, statuses: &[u16]) {
        self.state.lock().unwrap().answers.extend(statuses.iter().map(|s| (*s, Duration::ZERO)));
    }

    /// The next request is answered with `status` only after `delay`.
    pub fn answer_slowly(&self, status: u16, delay: Duration) {
        self.state.lock().unwrap().answers.push_back((status, delay));
    }

    pub fn received(&self) -> Vec<Received> {
        self.state.lock().unwrap().received.clone()
    }

    /// Waits until `count` requests arrived (panics after `timeout`).
    pub async fn wait_for(&self, count: usize, timeout: Duration) -> Vec<Received> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let received = self.received();
            if received.len() >= count {
                return received;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "got {} of {count} webhooks: {received:#?}",
                received.len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops listening (connections are refused) until [`resume`](Self::resume).
    pub async fn stop(&self) {
        self.shutdown.cancel();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    /// Listens again on the same port, keeping what was received.
    pub async fn resume(self) -> Self {
        Self::start_on(self.port, Arc::clone(&self.state)).await
    }
}

/// Verifies a delivery with the official Standard Webhooks Python library (PyPI
/// `standardwebhooks`), a verifier nobody here wrote. Returns its error text on failure.
pub fn verify_with_standard_webhooks(secret: &str, received: &Received) -> Result<(), String> {
    let python = std::env::var("SPOOL_PYTHON").unwrap_or_else(|_| "python3".into());
    let headers = serde_json::json!({
        "webhook-id": received.header("webhook-id"),
        "webhook-timestamp": received.header("webhook-timestamp"),
        "webhook-signature": received.header("webhook-signature"),
    });
    let script = "import json, sys\nfrom standardwebhooks import Webhook\n\
                  secret, headers, body = sys.argv[1], json.loads(sys.argv[2]), sys.stdin.read()\n\
                  Webhook(secret).verify(body, headers)\nprint('verified')";
    let mut child = std::process::Command::new(python)
        .args(["-c", script, secret, &headers.to_string()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    use std::io::Write;
    child.stdin.take().unwrap().write_all(received.body.as_bytes()).map_err(|e| e.to_string())?;
    let output = child.wait_with_output().map_err(|e| e.to_string())?;
    if output.status.success() && String::from_utf8_lossy(&output.stdout).trim() == "verified" {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).into_owned())
    }
}
