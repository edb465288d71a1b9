//! `spoolctl login` and `spoolctl token create`: turn an email and password into an API
//! token. The password is read from standard input, never from the command line (where
//! it would land in shell history and `ps`).

use std::io::BufRead;

use clap::Args;
use reqwest::Method;
use serde_json::{Value, json};

use crate::client::{CliError, Client, ClientConfig};
use crate::output::print_json;

#[derive(Args)]
pub struct TokenRequest {
    /// Your account's email; the password is read from standard input.
    #[arg(long)]
    email: String,
    /// A name to recognise the token by.
    #[arg(long, default_value = "spoolctl")]
    name: String,
    /// `1h` … `365d`.
    #[arg(long, default_value = "90d")]
    expires_in: String,
    /// Comma-separated scopes.
    #[arg(long, default_value = "jobs:read,jobs:write,webhooks", value_delimiter = ',')]
    scopes: Vec<String>,
}

/// Signs in and creates an API token; returns the API's answer (the token's metadata and `token`).
async fn create_token(client: &Client, request: &TokenRequest) -> Result<Value, CliError> {
    eprintln!("password for {}:", request.email);
    let mut password = String::new();
    std::io::stdin().lock().read_line(&mut password).map_err(|e| CliError::Local(format!("stdin: {e}")))?;
    let password = password.trim_end_matches(['\r', '\n']);
    let login = json!({"email": request.email, "password": password});
    let session = client.json(client.request_as(Method::POST, "/v1/auth/login", None).json(&login)).await?;
    let session = session["token"].as_str().unwrap_or_default().to_owned();
    let body = json!({"name": request.name, "expires_in": request.expires_in, "scopes": request.scopes});
    client.json(client.request_as(Method::POST, "/v1/tokens", Some(&session)).json(&body)).await
}

/// `spoolctl token create`: prints a new API token.
pub async fn token(request: TokenRequest, json_output: bool) -> Result<(), CliError> {
    let client = Client::from_config()?;
    let created = create_token(&client, &request).await?;
    if json_output {
        print_json(&created);
    } else {
        println!("{}", created["token"].as_str().unwrap_or_default());
    }
    Ok(())
}

/// `spoolctl login`: creates an API token and saves it with the API's address in
/// `~/.config/spool/config.toml` (readable by you only).
pub async fn login(request: TokenRequest, json_output: bool) -> Result<(), CliError> {
    let client = Client::from_config()?;
    let created = create_token(&client, &request).await?;
    let path = ClientConfig::path().ok_or_else(|| CliError::Local("no home directory for the config file".into()))?;
    let token = created["token"].as_str().unwrap_or_default();
    let config = toml::to_string(&ClientConfig { url: Some(client.base().to_owned()), token: Some(token.to_owned()) })
        .map_err(|e| CliError::Local(e.to_string()))?;
    write_private(&path, &config).map_err(|e| CliError::Local(format!("{}: {e}", path.display())))?;
    if json_output {
        print_json(&json!({"config": path, "token_id": created["id"]}));
    } else {
        println!("signed in; API token saved in {}", path.display());
    }
    Ok(())
}

fn write_private(path: &std::path::Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut file = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
    // `mode` applies only to a file it creates: one that was already there keeps its own.
    file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    file.write_all(contents.as_bytes())
}
