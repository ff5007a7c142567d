use clap::Parser;
use reefline_sink::{Application, Settings};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    reefline_common::init_telemetry();
    let settings = Settings::parse();
    tracing::info!(?settings, "starting");
    let app = Application::build(settings).await?;
    app.run_until(reefline_common::shutdown_signal()).await
}
