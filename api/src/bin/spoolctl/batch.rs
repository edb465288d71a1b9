//! `spoolctl batch`: submit an NDJSON file as one batch, follow it, fetch its results.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};
use reqwest::Method;
use serde_json::Value;
use uuid::Uuid;

use crate::client::{CliError, Client};
use crate::output::{field, print_json, print_page, table};

#[derive(Subcommand)]
pub enum BatchCommand {
    /// Submit a file of `{"input": …, "custom_id": …}` lines as one batch.
    Submit {
        /// NDJSON file (`-` for standard input).
        file: PathBuf,
        #[arg(long)]
        model: String,
        /// Follow the batch with a progress bar until it completes.
        #[arg(long)]
        wait: bool,
        /// With --wait: write the results (NDJSON, submission order) here.
        #[arg(long, requires = "wait")]
        output: Option<PathBuf>,
        /// Makes retrying this command safe.
        #[arg(long)]
        idempotency_key: Option<String>,
        /// An https URL to POST every job's events (and `batch.completed`) to, signed with
        /// the account's job webhook secret.
        #[arg(long)]
        webhook: Option<String>,
        /// Which job events go to --webhook: started, completed (default completed).
        #[arg(long, value_delimiter = ',', requires = "webhook")]
        webhook_events: Vec<String>,
    },
    /// Progress: jobs per status.
    Status { id: Uuid },
    /// Your batches, newest first.
    List {
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// Results as NDJSON, in submission order.
    Results {
        id: Uuid,
        /// Write to this file instead of standard output.
        #[arg(long)]
        output: Option<PathBuf>,
    },
    /// Cancel the jobs not yet started.
    Cancel { id: Uuid },
}

pub async fn run(command: BatchCommand, json_output: bool) -> Result<(), CliError> {
    let client = Client::from_config()?;
    match command {
        BatchCommand::Submit { file, model, wait, output, idempotency_key, webhook, webhook_events } => {
            let body = if file.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin()).map_err(|e| CliError::Local(format!("stdin: {e}")))?
            } else {
                std::fs::read_to_string(&file).map_err(|e| CliError::Local(format!("{}: {e}", file.display())))?
            };
            let mut query = vec![("model", model)];
            query.extend(webhook.map(|url| ("webhook", url)));
            query.extend(webhook_events.into_iter().map(|event| ("webhook_events", event)));
            let mut request = client
                .request(Method::POST, "/v1/batches")?
                .query(&query)
                .header("content-type", "application/x-ndjson")
                .body(body);
            if let Some(key) = idempotency_key {
                request = request.header("Idempotency-Key", key);
            }
            let batch = client.json(request).await?;
            let id = field(&batch, "id");
            if !wait {
                return show(&batch, json_output);
            }
            let done = follow(&client, &id, !json_output).await?;
            if let Some(path) = output {
                save_results(&client, &id, Some(path)).await?;
            }
            show(&done, json_output)?;
            let unsuccessful =
                done["counts"]["failed"].as_i64().unwrap_or(0) + done["counts"]["canceled"].as_i64().unwrap_or(0);
            if unsuccessful > 0 {
                return Err(CliError::Unsuccessful(format!("{unsuccessful} job(s) of the batch did not succeed")));
            }
            Ok(())
        }
        BatchCommand::Status { id } => show(&client.get(&format!("/v1/batches/{id}"), &[]).await?, json_output),
        BatchCommand::List { limit } => {
            let page = client.get("/v1/batches", &[("limit", limit.to_string())]).await?;
            print_page(&page, json_output, &["BATCH", "MODEL", "JOBS", "FINISHED", "OUTCOMES", "CREATED"], |b| {
                let progress = b["progress"].as_f64().map_or("-".into(), |p| format!("{:.0}%", p * 100.0));
                vec![
                    field(b, "id"),
                    field(b, "model"),
                    field(b, "total"),
                    progress,
                    outcomes(b),
                    field(b, "created_at"),
                ]
            });
            Ok(())
        }
        BatchCommand::Results { id, output } => save_results(&client, &id.to_string(), output).await,
        BatchCommand::Cancel { id } => {
            let canceled = client.json(client.request(Method::POST, &format!("/v1/batches/{id}/cancel"))?).await?;
            if json_output {
                print_json(&canceled);
            } else {
                println!("canceled {} job(s)", field(&canceled, "canceled"));
            }
            Ok(())
        }
    }
}

/// Polls the batch until it completes, drawing a progress bar on a terminal.
async fn follow(client: &Client, id: &str, draw: bool) -> Result<Value, CliError> {
    let bar = if draw { ProgressBar::new(0) } else { ProgressBar::hidden() };
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} jobs finished ({per_sec}, eta {eta}) {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    loop {
        let batch = client.get_patiently(&format!("/v1/batches/{id}"), &[]).await?;
        let counts = &batch["counts"];
        let done: u64 = ["succeeded", "failed", "canceled"].iter().filter_map(|s| counts[*s].as_u64()).sum();
        bar.set_length(batch["total"].as_u64().unwrap_or(0));
        bar.set_position(done);
        bar.set_message(format!("{} failed", counts["failed"].as_u64().unwrap_or(0)));
        if !batch["completed_at"].is_null() {
            bar.finish();
            return Ok(batch);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Streams the results to `output` (or standard output) without holding them.
async fn save_results(client: &Client, id: &str, output: Option<PathBuf>) -> Result<(), CliError> {
    let mut response = client.execute(client.request(Method::GET, &format!("/v1/batches/{id}/results"))?).await?;
    let mut sink: Box<dyn Write> = match &output {
        Some(path) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(path).map_err(|e| CliError::Local(format!("{}: {e}", path.display())))?,
        )),
        None => Box::new(std::io::stdout().lock()),
    };
    while let Some(chunk) = response.chunk().await.map_err(|e| CliError::Unavailable(e.to_string()))? {
        sink.write_all(&chunk).map_err(|e| CliError::Local(e.to_string()))?;
    }
    sink.flush().map_err(|e| CliError::Local(e.to_string()))
}

fn show(batch: &Value, json_output: bool) -> Result<(), CliError> {
    if json_output {
        print_json(batch);
        return Ok(());
    }
    for key in ["id", "model", "total", "progress", "created_at", "completed_at"] {
        println!("{:<14}{}", format!("{key}:"), field(batch, key));
    }
    let counts = &batch["counts"];
    let statuses = ["queued", "running", "succeeded", "failed", "canceled"];
    println!("\n{}", table(&statuses, &[statuses.iter().map(|s| field(counts, s)).collect()]));
    Ok(())
}

/// The finished jobs of a batch by how they ended, e.g. `64 succeeded, 1436 canceled`.
fn outcomes(batch: &Value) -> String {
    let counts: Vec<String> = ["succeeded", "failed", "canceled"]
        .into_iter()
        .filter_map(|status| {
            let n = batch["counts"][status].as_i64().unwrap_or(0);
            (n > 0).then(|| format!("{n} {status}"))
        })
        .collect();
    if counts.is_empty() { "-".into() } else { counts.join(", ") }
}
