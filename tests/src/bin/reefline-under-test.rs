//! The `reefline` command line, built along with the end-to-end tests so that a test runs the
//! current code as a user would (`CARGO_BIN_EXE_reefline-under-test`).

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    reefline_cli::main().await
}
