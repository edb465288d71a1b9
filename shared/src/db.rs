//! PostgreSQL connection set-up.

use std::time::Duration;

use sea_orm::sqlx::postgres::{PgListener, PgSslMode};
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
    if loopback_without_sslmode(settings.database_url.expose_secret()) {
        // TLS to a server on this machine protects nothing, and cost the submit path
        // ~14% of PostgreSQL's throughput (pgbench). A URL's own `sslmode` always wins.
        options.map_sqlx_postgres_opts(|pg| pg.ssl_mode(PgSslMode::Disable));
    }
    Database::connect(options).await
}

/// Calls `on_notice` with the payload of every `NOTIFY` on `channel`, for as long as the
/// future is polled: when the connection drops it listens again a second later. `on_gap`
/// runs whenever notices may have been missed: when listening (re)starts and when the
/// connection is lost.
pub async fn listen_forever(
    db: &DatabaseConnection,
    channel: &str,
    mut on_gap: impl FnMut(),
    mut on_notice: impl FnMut(&str),
) {
    loop {
        let session = async {
            let mut listener = PgListener::connect_with(db.get_postgres_connection_pool()).await?;
            listener.listen(channel).await?;
            on_gap();
            loop {
                on_notice(listener.recv().await?.payload());
            }
            #[allow(unreachable_code)]
            Ok::<(), sea_orm::sqlx::Error>(())
        };
        if let Err(error) = session.await {
            tracing::warn!(%error, channel, "LISTEN connection lost; listening again in a second");
        }
        on_gap();
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn loopback_without_sslmode(url: &str) -> bool {
    let Some(authority) = url.split_once("://").map(|(_, rest)| rest.split(['/', '?']).next().unwrap_or_default())
    else {
        return false;
    };
    let host = authority.rsplit_once('@').map_or(authority, |(_, host)| host);
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.split_once(']'))
        .map_or_else(|| host.rsplit_once(':').map_or(host, |(name, _)| name), |(ipv6, _)| ipv6);
    let loopback = host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
    loopback && !url.contains("sslmode=")
}

#[cfg(test)]
mod tests {
    use super::loopback_without_sslmode;

    #[test]
    fn only_loopback_urls_without_their_own_sslmode_skip_tls() {
        assert!(loopback_without_sslmode("postgres://postgres:pw@127.0.0.1:5432/spool"));
        assert!(loopback_without_sslmode("postgres://localhost/spool"));
        assert!(loopback_without_sslmode("postgres://u@[::1]:5432/spool"));
        assert!(!loopback_without_sslmode("postgres://u@127.0.0.1:5432/spool?sslmode=require"));
        assert!(!loopback_without_sslmode("postgres://u:pw@db.internal:5432/spool"));
        assert!(!loopback_without_sslmode("postgres://u:pw@10.0.0.5/spool"));
        assert!(!loopback_without_sslmode("not a url"));
    }
}
