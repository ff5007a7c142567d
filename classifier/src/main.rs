use clap::Parser;
use reefline_classifier::{Application, Settings};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    reefline_common::init_telemetry();
    let app = Application::build(Settings::parse()).await?;
    tracing::info!(ops = %app.local_addr(), "classifier built");
    app.run_until(reefline_common::shutdown_signal()).await
}
