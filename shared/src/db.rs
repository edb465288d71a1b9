//! PostgreSQL connection set-up.

use std::time::Duration;

use sea_orm::{ConnectOptions, Database, DatabaseConnection, DbErr};
use secrecy::ExposeSecret;

use crate::Settings;

/// Opens the connection pool described by the settings.
pub async fn connect(settings: &Settings) -> Result<DatabaseConnection, DbErr> {
    let mut options = ConnectOptions::new(settings.database_url.expose_secret().to_owned());
    options
        .max_connections(settings.database.max_connections)
        .min_connections(1)
        .acquire_timeout(Duration::from_millis(settings.database.acquire_timeout_ms))
        .sqlx_logging(false);
    Database::connect(options).await
}
