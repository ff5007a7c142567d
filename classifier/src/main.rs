#[tokio::main]
async fn main() -> anyhow::Result<()> {
    reefline_classifier::main().await
}
