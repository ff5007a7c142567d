//! What all three Reefline services share: Kafka client settings, the model manifest, telemetry,
//! the ops endpoints (`/metrics`, `/healthz`, `/readyz`), the shutdown signal, and the dead-letter replay.

pub mod auth;
pub mod docs;
pub mod guard;
pub mod http;
pub mod kafka;
pub mod labels;
pub mod models;
pub mod objects;
pub mod ops;
pub mod producer;
pub mod telemetry;
pub mod tenant;

/// Exponential backoff, the one every retry uses: `base` after the first failure, doubling after
/// each, at most `max`; with `jitter`, each delay is half its step plus a random part of the other
/// half, so that many retries started together spread out.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Backoff {
    pub base: std::time::Duration,
    pub max: std::time::Duration,
    pub jitter: bool,
}

impl Backoff {
    /// For waiting out an outage (broker, registry, database): 100 ms, doubling, at most 10 s.
    pub const OUTAGE: Self =
        Self { base: std::time::Duration::from_millis(100), max: std::time::Duration::from_secs(10), jitter: false };

    /// The wait after failed attempt number `attempt` (from 1).
    pub fn delay(&self, attempt: u32) -> std::time::Duration {
        let step = self.base.saturating_mul(1 << attempt.saturating_sub(1).min(20)).min(self.max);
        if self.jitter { step / 2 + step.mul_f64(fastrand::f64() / 2.0) } else { step }
    }

    /// The waits of one run of failures, in turn.
    pub fn waits(self) -> Waits {
        Waits { backoff: self, failed: 0 }
    }
}

/// One run of failures' waits: see [`Backoff::waits`].
pub struct Waits {
    backoff: Backoff,
    failed: u32,
}

impl Waits {
    /// Sleeps for the wait after one more failure.
    pub async fn wait(&mut self) {
        self.failed = self.failed.saturating_add(1);
        tokio::time::sleep(self.backoff.delay(self.failed)).await;
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
    let mut backoff = Backoff::OUTAGE.waits();
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::Backoff;

    #[test]
    fn delays_double_to_the_cap() {
        let backoff = Backoff { base: Duration::from_secs(10), max: Duration::from_secs(3600), jitter: false };
        let delays: Vec<u64> = (1..=11).map(|n| backoff.delay(n).as_secs()).collect();
        assert_eq!(delays, [10, 20, 40, 80, 160, 320, 640, 1280, 2560, 3600, 3600]);
        assert_eq!(Backoff::OUTAGE.delay(1), Duration::from_millis(100));
        assert_eq!(Backoff::OUTAGE.delay(40), Duration::from_secs(10), "a long outage waits the cap, no overflow");
    }

    #[test]
    fn jittered_delays_stay_within_half_and_all_of_their_step() {
        let backoff = Backoff { base: Duration::from_millis(100), max: Duration::from_millis(1000), jitter: true };
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..100 {
            fastrand::seed(rng.u64(..));
            let d1 = backoff.delay(1);
            assert!(d1 >= Duration::from_millis(50) && d1 <= Duration::from_millis(100), "{d1:?}");
            let d3 = backoff.delay(3);
            assert!(d3 >= Duration::from_millis(200) && d3 <= Duration::from_millis(400), "{d3:?}");
            let d9 = backoff.delay(9);
            assert!(d9 >= Duration::from_millis(500) && d9 <= Duration::from_millis(1000), "capped: {d9:?}");
        }
    }
}
