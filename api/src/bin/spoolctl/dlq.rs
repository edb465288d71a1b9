//! `spoolctl dlq`: operators inspect, requeue and purge dead letters through the API.

use clap::{ArgGroup, Args, Subcommand};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::client::{CliError, Client};
use crate::output::{field, print_json, shorten, table};

#[derive(Subcommand)]
pub enum DlqCommand {
    /// List dead letters, newest first.
    List {
        #[command(flatten)]
        filter: Filter,
        /// At most this many (1–1000).
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// One dead letter with every attempt.
    Show { job_id: Uuid },
    /// Put dead letters back in the queue with a fresh attempt budget.
    #[command(group(ArgGroup::new("which").required(true).args(["ids", "model", "all"])))]
    Requeue {
        /// Job ids, comma-separated.
        #[arg(long, value_delimiter = ',')]
        ids: Vec<Uuid>,
        /// Every dead letter of this model.
        #[arg(long)]
        model: Option<String>,
        /// Every dead letter.
        #[arg(long)]
        all: bool,
    },
    /// Forget dead letters matching the filter (their jobs stay `failed`).
    Purge {
        #[command(flatten)]
        filter: Filter,
        /// Required: purging cannot be undone.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Args)]
pub struct Filter {
    #[arg(long)]
    model: Option<String>,
    /// The last error's code, e.g. `inference_error`.
    #[arg(long)]
    error_code: Option<String>,
    /// Failed at or after (RFC 3339).
    #[arg(long)]
    since: Option<String>,
    /// Failed before (RFC 3339).
    #[arg(long)]
    until: Option<String>,
}

impl Filter {
    fn query(self) -> Vec<(&'static str, String)> {
        [("model", self.model), ("error_code", self.error_code), ("since", self.since), ("until", self.until)]
            .into_iter()
            .filter_map(|(key, value)| value.map(|v| (key, v)))
            .collect()
    }
}

pub async fn run(command: DlqCommand, json_output: bool) -> Result<(), CliError> {
    let client = Client::from_config()?;
    match command {
        DlqCommand::List { filter, limit } => {
            let mut query = filter.query();
            query.push(("limit", limit.to_string()));
            let letters = client.get("/v1/admin/dead-letters", &query).await?;
            if json_output {
                print_json(&letters);
            } else {
                print_list(&letters);
            }
        }
        DlqCommand::Show { job_id } => {
            let letter = client.get(&format!("/v1/admin/dead-letters/{job_id}"), &[]).await?;
            if json_output {
                print_json(&letter);
            } else {
                print_letter(&letter);
            }
        }
        DlqCommand::Requeue { ids, model, all } => {
            let body = match (ids.is_empty(), model) {
                (false, _) => json!({"ids": ids}),
                (true, Some(model)) => json!({"model": model}),
                (true, None) => json!({"all": all}),
            };
            let affected = client.post("/v1/admin/dead-letters/requeue", &body).await?;
            report(&affected, "requeued", json_output);
        }
        DlqCommand::Purge { filter, yes } => {
            if !yes {
                return Err(CliError::Local("purging dead letters cannot be undone: add --yes".into()));
            }
            let affected = client.delete("/v1/admin/dead-letters", &filter.query()).await?;
            report(&affected, "purged", json_output);
        }
    }
    Ok(())
}

fn report(affected: &Value, verb: &str, json_output: bool) {
    if json_output {
        print_json(affected);
    } else {
        println!("{verb} {} dead letter(s)", field(affected, "count"));
    }
}

fn print_list(letters: &Value) {
    let data = letters["data"].as_array().cloned().unwrap_or_default();
    if data.is_empty() {
        println!("no dead letters");
        return;
    }
    let rows: Vec<Vec<String>> = data
        .iter()
        .map(|d| {
            vec![
                field(d, "job_id"),
                field(d, "model"),
                field(d, "attempts"),
                field(&d["error"], "code"),
                field(d, "failed_at"),
                shorten(&field(d, "input_summary"), 40),
            ]
        })
        .collect();
    println!("{}", table(&["JOB", "MODEL", "ATTEMPTS", "ERROR", "FAILED AT", "INPUT"], &rows));
}

fn print_letter(letter: &Value) {
    for key in ["job_id", "owner_id", "model", "attempts", "failed_at", "input_summary"] {
        println!("{:<14}{}", format!("{key}:"), field(letter, key));
    }
    println!("{:<14}{} — {}", "error:", field(&letter["error"], "code"), field(&letter["error"], "message"));
    let attempts = letter["attempt_log"].as_array().cloned().unwrap_or_default();
    let rows: Vec<Vec<String>> = attempts
        .iter()
        .map(|a| {
            vec![
                field(a, "attempt"),
                field(a, "worker_id"),
                field(a, "started_at"),
                field(a, "finished_at"),
                field(a, "outcome"),
                shorten(&format!("{}: {}", field(&a["error"], "code"), field(&a["error"], "message")), 60),
            ]
        })
        .collect();
    println!("\n{}", table(&["ATTEMPT", "WORKER", "STARTED", "FINISHED", "OUTCOME", "ERROR"], &rows));
}
