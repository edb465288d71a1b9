//! `spoolctl jobs`: submit one job, look at jobs, cancel one.

use clap::Subcommand;
use reqwest::Method;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::client::{CliError, Client};
use crate::output::{field, print_json, print_page, shorten};

#[derive(Subcommand)]
pub enum JobsCommand {
    /// Submit a job.
    Submit {
        #[arg(long)]
        model: String,
        /// The input: JSON, `@file.json`, or `-` for standard input.
        #[arg(long)]
        input: String,
        /// Wait for the job to finish (up to 60 s per poll, until it does).
        #[arg(long)]
        wait: bool,
        /// Makes retrying this command safe.
        #[arg(long)]
        idempotency_key: Option<String>,
    },
    /// One job.
    Get {
        id: Uuid,
        /// Long-poll up to this many seconds for it to finish.
        #[arg(long)]
        wait: Option<u64>,
    },
    /// Your jobs, newest first.
    List {
        #[arg(long)]
        status: Option<String>,
        #[arg(long)]
        model: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// Cancel a job that has not finished.
    Cancel { id: Uuid },
}

/// Reads a JSON argument: inline, `@path`, or `-` (standard input).
pub fn read_json_arg(arg: &str) -> Result<Value, CliError> {
    let text = match arg {
        "-" => std::io::read_to_string(std::io::stdin()).map_err(|e| CliError::Local(format!("stdin: {e}")))?,
        path if path.starts_with('@') => {
            std::fs::read_to_string(&path[1..]).map_err(|e| CliError::Local(format!("{}: {e}", &path[1..])))?
        }
        inline => inline.to_owned(),
    };
    serde_json::from_str(&text).map_err(|e| CliError::Local(format!("the input is not JSON: {e}")))
}

fn is_terminal(job: &Value) -> bool {
    matches!(job["status"].as_str(), Some("succeeded" | "failed" | "canceled"))
}

/// Polls with `?wait=60` until the job finishes.
pub async fn wait_for(client: &Client, id: &str) -> Result<Value, CliError> {
    loop {
        let job = client.get_patiently(&format!("/v1/jobs/{id}"), &[("wait", "60".into())]).await?;
        if is_terminal(&job) {
            return Ok(job);
        }
    }
}

/// Exit code 5 when an awaited job did not succeed.
fn settle(job: &Value, json_output: bool) -> Result<(), CliError> {
    if json_output {
        print_json(job);
    } else {
        print_job(job);
    }
    match job["status"].as_str() {
        Some("failed" | "canceled") => Err(CliError::Unsuccessful(format!("job {}", field(job, "status")))),
        _ => Ok(()),
    }
}

pub async fn run(command: JobsCommand, json_output: bool) -> Result<(), CliError> {
    let client = Client::from_config()?;
    match command {
        JobsCommand::Submit { model, input, wait, idempotency_key } => {
            let body = json!({"model": model, "input": read_json_arg(&input)?});
            let mut request = client.request(Method::POST, "/v1/jobs")?.json(&body);
            if let Some(key) = idempotency_key {
                request = request.header("Idempotency-Key", key);
            }
            let job = client.json(request).await?;
            if wait && !is_terminal(&job) {
                let done = wait_for(&client, job["id"].as_str().unwrap_or_default()).await?;
                return settle(&done, json_output);
            }
            if wait { settle(&job, json_output) } else { show(&job, json_output) }
        }
        JobsCommand::Get { id, wait } => {
            let query: Vec<(&str, String)> = wait.map(|w| ("wait", w.min(60).to_string())).into_iter().collect();
            show(&client.get(&format!("/v1/jobs/{id}"), &query).await?, json_output)
        }
        JobsCommand::List { status, model, limit } => {
            let mut query = vec![("limit", limit.to_string())];
            query.extend(status.map(|s| ("status", s)));
            query.extend(model.map(|m| ("model", m)));
            let page = client.get("/v1/jobs", &query).await?;
            print_page(&page, json_output, &["JOB", "MODEL", "STATUS", "ATTEMPTS", "CREATED"], |j| {
                let columns = ["id", "model", "status", "attempts", "created_at"];
                columns.iter().map(|key| field(j, key)).collect()
            });
            Ok(())
        }
        JobsCommand::Cancel { id } => {
            let job = client.json(client.request(Method::POST, &format!("/v1/jobs/{id}/cancel"))?).await?;
            show(&job, json_output)
        }
    }
}

fn show(job: &Value, json_output: bool) -> Result<(), CliError> {
    if json_output {
        print_json(job);
    } else {
        print_job(job);
    }
    Ok(())
}

fn print_job(job: &Value) {
    for key in ["id", "model", "status", "attempts", "created_at", "completed_at"] {
        println!("{:<14}{}", format!("{key}:"), field(job, key));
    }
    if !job["output"].is_null() {
        println!("{:<14}{}", "output:", shorten(&job["output"].to_string(), 200));
    }
    if !job["error"].is_null() {
        println!("{:<14}{} — {}", "error:", field(&job["error"], "code"), field(&job["error"], "message"));
    }
}
