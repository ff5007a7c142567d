//! The sink command, built along with the end-to-end tests so that the fault tests always run the
//! current code (`CARGO_BIN_EXE_sink-under-test`).

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    reefline_sink::main().await
}
