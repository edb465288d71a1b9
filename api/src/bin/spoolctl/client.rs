//! The HTTP side of `spoolctl`: where the API is, the caller's token, and errors that map
//! onto exit codes.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde::Deserialize;
use serde_json::Value;

/// `~/.config/spool/config.toml`; `SPOOL_URL` and `SPOOL_TOKEN` override it.
#[derive(Debug, Default, Deserialize, serde::Serialize)]
pub struct ClientConfig {
    pub url: Option<String>,
    pub token: Option<String>,
}

impl ClientConfig {
    pub fn path() -> Option<PathBuf> {
        let base = std::env::var_os("XDG_CONFIG_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".config")))?;
        Some(base.join("spool").join("config.toml"))
    }

    pub fn load() -> Result<Self, CliError> {
        let mut config = match Self::path() {
            Some(path) if path.exists() => {
                let text = std::fs::read_to_string(&path)
                    .map_err(|e| CliError::Local(format!("reading {}: {e}", path.display())))?;
                toml::from_str(&text).map_err(|e| CliError::Local(format!("{}: {e}", path.display())))?
            }
            _ => Self::default(),
        };
        if let Ok(url) = std::env::var("SPOOL_URL") {
            config.url = Some(url);
        }
        if let Ok(token) = std::env::var("SPOOL_TOKEN") {
            config.token = Some(token);
        }
        Ok(config)
    }
}

/// Why a command failed; each kind has its own exit code so scripts can tell them apart.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Bad local input: arguments, files, configuration.
    #[error("{0}")]
    Local(String),
    /// The API answered with a problem (4xx).
    #[error("{}", describe_problem(.0))]
    Refused(Value),
    /// The API could not be reached or failed (network error, 5xx).
    #[error("{0}")]
    Unavailable(String),
    /// The request worked, but what was awaited ended badly (a job failed or was canceled).
    #[error("{0}")]
    Unsuccessful(String),
}

impl CliError {
    pub fn exit_code(&self) -> ExitCode {
        ExitCode::from(match self {
            Self::Local(_) => 1,
            Self::Refused(_) => 3,
            Self::Unavailable(_) => 4,
            Self::Unsuccessful(_) => 5,
        })
    }
}

fn describe_problem(problem: &Value) -> String {
    let text = |key: &str| problem.get(key).and_then(Value::as_str).unwrap_or_default().to_owned();
    let mut message = format!("{} ({}): {}", text("title"), text("code"), text("detail"));
    for error in problem.get("errors").and_then(Value::as_array).into_iter().flatten() {
        let pointer = error.get("pointer").and_then(Value::as_str).unwrap_or_default();
        let detail = error.get("detail").and_then(Value::as_str).unwrap_or_default();
        message.push_str(&format!("\n  {pointer}: {detail}"));
    }
    message
}

/// Retries of [`Client::get_patiently`]: 1 + 2 + 4 + 8 + 8 s, about half a minute.
const PATIENT_RETRIES: usize = 5;

pub struct Client {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

impl Client {
    pub fn from_config() -> Result<Self, CliError> {
        let config = ClientConfig::load()?;
        let base = config.url.unwrap_or_else(|| "http://127.0.0.1:8080".into()).trim_end_matches('/').to_owned();
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            // Long enough for the longest server-side wait (60 s) plus a margin.
            .timeout(Duration::from_secs(90))
            .user_agent(concat!("spoolctl/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| CliError::Local(format!("HTTP client: {e}")))?;
        Ok(Self { http, base, token: config.token })
    }

    pub async fn get(&self, path: &str, query: &[(&str, String)]) -> Result<Value, CliError> {
        self.send(Method::GET, path, query, None).await
    }

    /// A GET that rides out short outages (a restarting API, a dropped connection): for
    /// commands that follow a job or batch for minutes, one blip should not end the wait.
    pub async fn get_patiently(&self, path: &str, query: &[(&str, String)]) -> Result<Value, CliError> {
        let mut pause = Duration::from_secs(1);
        for _ in 0..PATIENT_RETRIES {
            match self.get(path, query).await {
                Err(CliError::Unavailable(error)) => {
                    eprintln!("spoolctl: {error}; retrying in {}s", pause.as_secs());
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(8));
                }
                answered => return answered,
            }
        }
        self.get(path, query).await
    }

    pub async fn post(&self, path: &str, body: &Value) -> Result<Value, CliError> {
        self.send(Method::POST, path, &[], Some(body)).await
    }

    pub async fn delete(&self, path: &str, query: &[(&str, String)]) -> Result<Value, CliError> {
        self.send(Method::DELETE, path, query, None).await
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// A request to the API with the configured token.
    pub fn request(&self, method: Method, path: &str) -> Result<reqwest::RequestBuilder, CliError> {
        let token = self.token.as_deref().ok_or_else(|| {
            CliError::Local("no API token: set SPOOL_TOKEN or run `spoolctl login` (see --help)".into())
        })?;
        Ok(self.http.request(method, format!("{}{path}", self.base)).bearer_auth(token))
    }

    /// A request without the configured token (logging in), or with another one.
    pub fn request_as(&self, method: Method, path: &str, token: Option<&str>) -> reqwest::RequestBuilder {
        let request = self.http.request(method, format!("{}{path}", self.base));
        match token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&Value>,
    ) -> Result<Value, CliError> {
        let mut request = self.request(method, path)?.query(query);
        if let Some(body) = body {
            request = request.json(body);
        }
        self.json(request).await
    }

    /// Sends the request and reads a JSON answer, mapping failures onto [`CliError`].
    pub async fn json(&self, request: reqwest::RequestBuilder) -> Result<Value, CliError> {
        let response = self.execute(request).await?;
        let bytes = response.bytes().await.map_err(|e| CliError::Unavailable(e.to_string()))?;
        if bytes.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&bytes).map_err(|e| CliError::Unavailable(format!("unreadable answer: {e}")))
    }

    /// Sends the request; a non-2xx answer becomes the matching [`CliError`].
    pub async fn execute(&self, request: reqwest::RequestBuilder) -> Result<reqwest::Response, CliError> {
        let response = request.send().await.map_err(|e| CliError::Unavailable(format!("{}: {e}", self.base)))?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let bytes = response.bytes().await.map_err(|e| CliError::Unavailable(e.to_string()))?;
        let body: Value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()))
        };
        match status {
            s if s.is_client_error() && body.get("code").is_some() => Err(CliError::Refused(body)),
            StatusCode::SERVICE_UNAVAILABLE if body.get("code").is_some() => {
                Err(CliError::Unavailable(describe_problem(&body)))
            }
            s => Err(CliError::Unavailable(format!("{}: HTTP {s}", self.base))),
        }
    }
}
