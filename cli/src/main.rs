#[tokio::main]
async fn main() -> anyhow::Result<()> {
    reefline_cli::main().await
}
