use spool_api::Application;
use spool_shared::{Settings, telemetry};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let settings = Settings::load()?;
    telemetry::init("info");
    let app = Application::build(settings).await?;
    app.run_until_stopped().await
}
