//! `reefline-registry`: the local Schema Registry (see `reefline_tools::registry`).

use std::path::PathBuf;

use clap::Parser;
use reefline_tools::registry::Registry;

/// A small Confluent-compatible Schema Registry for local use and tests.
#[derive(Parser, Debug)]
struct Settings {
    /// Address to listen on.
    #[arg(long, env = "REGISTRY_LISTEN", default_value = "127.0.0.1:8085")]
    listen: String,

    /// File that keeps the registered schemas across restarts; in memory only when unset.
    #[arg(long, env = "REGISTRY_FILE")]
    file: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _telemetry = reefline_common::telemetry::init("reefline-registry");
    let settings = Settings::parse();
    let registry = match settings.file {
        Some(file) => Registry::open(file)?,
        None => Registry::in_memory(),
    };
    let listener = tokio::net::TcpListener::bind(&settings.listen).await?;
    tracing::info!(addr = %listener.local_addr()?, "schema registry listening");
    axum::serve(listener, registry.router()).with_graceful_shutdown(reefline_common::shutdown_signal()).await?;
    Ok(())
}
