#[tokio::main]
async fn main() -> anyhow::Result<()> {
    reefline_sink::main().await
}
