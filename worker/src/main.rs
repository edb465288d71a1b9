use spool_shared::{Settings, telemetry};
use spool_worker::Application;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let settings = Settings::load()?;
    telemetry::init("info");
    if let Some(bind) = &settings.worker.metrics_bind {
        let address: std::net::SocketAddr = bind.parse()?;
        metrics_exporter_prometheus::PrometheusBuilder::new().with_http_listener(address).install()?;
        tracing::info!(%address, "serving Prometheus metrics");
    }
    let app = Application::build(settings).await?;
    app.run_until_stopped().await
}
