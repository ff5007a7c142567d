//! The ingest command, built along with the end-to-end tests so that a test can run the current
//! code as a process of its own and measure it (`CARGO_BIN_EXE_ingest-under-test`).

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    reefline_ingest::main().await
}
