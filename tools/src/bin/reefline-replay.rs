//! `reefline-replay`: sends dead letters back to the topics they came from, after a fix.

use clap::Parser;
use reefline_common::kafka::KafkaSettings;
use reefline_tools::replay::{ReplayOptions, replay};

#[derive(Parser)]
#[command(name = "reefline-replay", about = "Replays dead-lettered records to the topics they came from")]
struct Cli {
    #[command(flatten)]
    kafka: KafkaSettings,

    #[command(flatten)]
    options: ReplayOptions,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _telemetry = reefline_common::telemetry::init("reefline-replay");
    let cli = Cli::parse();
    let summary = replay(&cli.kafka, &cli.options).await?;
    let what = if cli.options.dry_run { "dry run (nothing produced)" } else { "replay done" };
    println!("{what}: {summary}");
    Ok(())
}
