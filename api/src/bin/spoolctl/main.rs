//! `spoolctl`: the Spool command-line tool. Client commands talk to the API
//! (`SPOOL_URL`, `SPOOL_TOKEN`, or `~/.config/spool/config.toml`); the setup commands
//! (keys, the first operator, development tokens) talk to the database directly, with the
//! server's configuration.

mod account;
mod batch;
mod client;
mod dlq;
mod jobs;
mod output;

use std::io::Read;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use migration::{Migrator, MigratorTrait};
use secrecy::ExposeSecret;
use spool_api::auth::{self, Role, TokenSigner};
use spool_api::identity::accounts::{self, Email};
use spool_api::identity::passwords::NewPassword;
use spool_api::identity::tokens::{self, TokenLifetime};
use spool_shared::{Settings, db};

#[derive(Parser)]
#[command(
    name = "spoolctl",
    version,
    about = "Spool command-line tool",
    after_help = "Exit codes: 0 success, 1 bad local input or configuration, 2 bad arguments, \
                  3 the API refused the request, 4 the API is unreachable or failing, 5 what was awaited \
                  (a job, a batch) did not succeed."
)]
struct Cli {
    /// Print the API's JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Sign in: create an API token and save it in ~/.config/spool/config.toml.
    Login {
        #[command(flatten)]
        request: account::TokenRequest,
    },
    /// Jobs: submit, get, list, cancel.
    Jobs {
        #[command(subcommand)]
        command: jobs::JobsCommand,
    },
    /// Batches: submit an NDJSON file, follow it, fetch its results.
    Batch {
        #[command(subcommand)]
        command: batch::BatchCommand,
    },
    /// Token signing and webhook sealing keys.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Operator accounts.
    Operator {
        #[command(subcommand)]
        command: OperatorCommand,
    },
    /// Dead letters (operators).
    Dlq {
        #[command(subcommand)]
        command: dlq::DlqCommand,
    },
    /// API tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Print a new PASETO v4 key pair and a webhook sealing key, as TOML `[auth]` and
    /// `[webhooks]` sections.
    Generate,
}

#[derive(Subcommand)]
enum OperatorCommand {
    /// Create an operator account (or promote an existing one). Reads the password from
    /// standard input.
    Create {
        #[arg(long)]
        email: String,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Create an API token with your email and password (read from standard input).
    Create {
        #[command(flatten)]
        request: account::TokenRequest,
    },
    /// Issue an API token for an account, creating a verified account with a random
    /// password if the address has none (for development and for operators' scripts).
    Mint {
        #[arg(long, default_value = "dev@spool.localhost")]
        email: String,
        #[arg(long, default_value = "spoolctl")]
        name: String,
        /// Lifetime: `1h` … `365d`, or `never` where the config allows it.
        #[arg(long, default_value = "30d")]
        ttl: String,
        /// Comma-separated scopes.
        #[arg(long, default_value = "jobs:read,jobs:write", value_delimiter = ',')]
        scopes: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("spoolctl: {error}");
            return ExitCode::FAILURE;
        }
    };
    let local = |result: anyhow::Result<()>| result.map_err(|e| client::CliError::Local(format!("{e:#}")));
    let outcome = match cli.command {
        Command::Login { request } => runtime.block_on(account::login(request, cli.json)),
        Command::Jobs { command } => runtime.block_on(jobs::run(command, cli.json)),
        Command::Batch { command } => runtime.block_on(batch::run(command, cli.json)),
        Command::Token { command: TokenCommand::Create { request } } => {
            runtime.block_on(account::token(request, cli.json))
        }
        Command::Dlq { command } => runtime.block_on(dlq::run(command, cli.json)),
        Command::Keys { command: KeysCommand::Generate } => local(generate_keys()),
        Command::Operator { command: OperatorCommand::Create { email } } => {
            local(runtime.block_on(create_operator(email)))
        }
        Command::Token { command: TokenCommand::Mint { email, name, ttl, scopes } } => {
            local(runtime.block_on(mint_token(email, name, ttl, scopes)))
        }
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("spoolctl: {error}");
            error.exit_code()
        }
    }
}

fn generate_keys() -> anyhow::Result<()> {
    let (secret, public) = auth::generate_key_pair()?;
    let sealing = spool_shared::sealing::generate_sealing_key()?;
    println!("[auth]\npublic_keys = [\"{public}\"]\nsecret_key = \"{secret}\"");
    println!("\n[webhooks]\nsealing_keys = [\"{sealing}\"]");
    Ok(())
}

async fn create_operator(email: String) -> anyhow::Result<()> {
    let settings = Settings::load()?;
    let email = Email::parse(&email)?;
    let mut password = String::new();
    std::io::stdin().read_to_string(&mut password).context("reading the password from stdin")?;
    let password = NewPassword::parse(password.trim_end_matches(['\r', '\n']).to_owned())?;
    let db = connect(&settings).await?;
    let user = accounts::create_verified_user(&db, &email, password, Role::Operator).await?;
    println!("operator {} ({})", user.email, user.id);
    Ok(())
}

/// Issues an API token, creating a verified account with a random password if the address
/// has none.
async fn mint_token(email: String, name: String, ttl: String, scopes: Vec<String>) -> anyhow::Result<()> {
    let settings = Settings::load()?;
    let secret = settings
        .auth
        .secret_key
        .as_ref()
        .context("auth.secret_key is not configured (see `spoolctl keys generate`)")?;
    let signer = TokenSigner::new(secret.expose_secret(), &settings.auth.issuer)?;
    let lifetime = TokenLifetime::parse(&ttl, settings.auth.allow_never_expiring_tokens)?;
    let scopes = tokens::parse_scopes(&scopes)?;
    let email = Email::parse(&email)?;
    let db = connect(&settings).await?;
    let user = match accounts::find_by_email(&db, &email).await? {
        Some(user) => user,
        None => {
            let (random, _) = spool_api::identity::new_secret();
            accounts::create_verified_user(&db, &email, NewPassword::parse(random)?, Role::User).await?
        }
    };
    let issued = tokens::issue(&db, &signer, user.id, name, lifetime, &scopes).await?;
    println!("{}", issued.token);
    Ok(())
}

async fn connect(settings: &Settings) -> anyhow::Result<sea_orm::DatabaseConnection> {
    let db = db::connect(settings).await.context("connecting to PostgreSQL")?;
    Migrator::up(&db, None).await.context("running migrations")?;
    Ok(db)
}
