#[tokio::main]
async fn main() -> anyhow::Result<()> {
    reefline_ingest::main().await
}
