//! `spool-dispatcher`: sends webhook deliveries (see `spool_worker::dispatcher`). Runs
//! beside the workers; several may run at once.

use anyhow::Context;
use spool_shared::shutdown::wait_for_signal;
use spool_shared::{Settings, db, telemetry};
use spool_worker::dispatcher::Dispatcher;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let settings = Settings::load()?;
    telemetry::init("info");
    if let Some(bind) = &settings.webhooks.metrics_bind {
        let address: std::net::SocketAddr = bind.parse()?;
        metrics_exporter_prometheus::PrometheusBuilder::new().with_http_listener(address).install()?;
        tracing::info!(%address, "serving Prometheus metrics");
    }
    let db = db::connect(&settings).await.context("connecting to PostgreSQL")?;
    let dispatcher = Dispatcher::new(db, settings.webhooks.clone())?;
    let shutdown = CancellationToken::new();
    let trigger = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown requested; finishing deliveries in flight");
        trigger.cancel();
    });
    dispatcher.run(shutdown).await;
    Ok(())
}
