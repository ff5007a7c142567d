//! What all three Reefline services share: Kafka client settings, the model manifest, telemetry,
//! the ops endpoints (`/metrics`, `/healthz`, `/readyz`), the shutdown signal, and the dead-letter replay.

pub mod auth;
pub mod docs;
pub mod guard;
pub mod http;
pub mod kafka;
pub mod models;
pub mod objects;
pub mod ops;
pub mod producer;
pub mod telemetry;
pub mod tenant;

/// Delays for waiting out an outage (broker, registry, database): 100 ms, doubling each time, at
/// most 10 s.
pub struct Backoff {
    next: std::time::Duration,
}

impl Backoff {
    const FIRST: std::time::Duration = std::time::Duration::from_millis(100);
    const MAX: std::time::Duration = std::time::Duration::from_secs(10);

    pub fn new() -> Self {
        Self { next: Self::FIRST }
    }

    /// Sleeps for the current delay, then doubles it for the next time.
    pub async fn wait(&mut self) {
        tokio::time::sleep(self.next).await;
        self.next = (self.next * 2).min(Self::MAX);
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

/// Runs `op` until it succeeds or fails for good: an error that `is_transient` says may pass (a
/// registry or broker away) is logged, naming `what`, and waited out with [`Backoff`].
pub async fn retry_transient<T, E, F, Fut>(what: &str, is_transient: impl Fn(&E) -> bool, mut op: F) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
    E: std::fmt::Display,
{
    let mut backoff = Backoff::new();
    loop {
        match op().await {
            Err(e) if is_transient(&e) => {
                tracing::warn!(error = %e, "{what} unavailable; retrying");
                backoff.wait().await;
            }
            other => return other,
        }
    }
}

/// Registers `T`'s schema for the values of `topic` in the background, waiting out a registry that
/// is away, so that a producer that does not register schemas finds the contract on a fresh stack.
pub fn register_schema<T: reefline_schemas::Message>(
    codec: reefline_schemas::Codec,
    topic: String,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let is_transient = reefline_schemas::CodecError::is_transient;
        match retry_transient("schema registry", is_transient, || codec.register::<T>(&topic)).await {
            Ok(id) => tracing::info!(subject = %format!("{topic}-value"), id, "schema registered"),
            Err(e) => {
                tracing::error!(subject = %format!("{topic}-value"), error = %e, "schema refused by the registry")
            }
        }
    })
}

/// Resolves when the process receives SIGINT or SIGTERM. The handlers are installed when this is
/// called, not when the future is first polled: a signal that comes between the two (as soon as a
/// service says it is listening, say) is not lost, nor does it kill the process without a drain.
pub fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{SignalKind, signal};
    let (interrupt, terminate) = (signal(SignalKind::interrupt()), signal(SignalKind::terminate()));
    async move {
        let wait = |signal: std::io::Result<tokio::signal::unix::Signal>| async move {
            match signal {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            () = wait(interrupt) => {},
            () = wait(terminate) => {},
        }
        tracing::info!("shutdown signal received");
    }
}
