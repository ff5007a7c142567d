use clap::Parser;
use reefline_ingest::{Application, Settings};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    reefline_common::init_telemetry();
    let settings = Settings::parse();
    let app = Application::build(settings).await?;
    app.run_until(reefline_common::shutdown_signal()).await?;
    Ok(())
}
