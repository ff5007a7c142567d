//! The pace a fetched list (`source_url`) must keep: a byte at least every `idle`, the whole list
//! within a deadline, and a least average rate, so a server that sends a byte a minute cannot hold
//! a reader for ever. Only the time spent waiting for the server counts towards the rate and the
//! deadline: while the reader waits for the broker (backpressure) or for the feed's share of the
//! classifiers, the server is not asked for more.

use std::io;
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use tokio::time::Instant;

use super::ByteStream;

/// The span the least rate is measured over; the first one is the grace a server gets to start.
pub const WINDOW: Duration = Duration::from_secs(60);

/// What a fetched list must keep to.
#[derive(Clone, Copy, Debug)]
pub struct Pace {
    /// Longest the server may send nothing.
    pub idle: Duration,
    /// Longest the whole fetch may wait for the server, from the request to the last byte.
    pub deadline: Duration,
    /// Fewest bytes a second, on average over each [`WINDOW`] of waiting for the server.
    pub min_bytes_per_s: u64,
}

/// The bytes of one window of waiting, and whether they were enough.
#[derive(Debug, Default)]
struct Window {
    waited: Duration,
    bytes: u64,
}

impl Window {
    /// Adds `waited` and the `bytes` that came in it; once the window is full, checks its rate and
    /// starts the next one.
    fn add(&mut self, waited: Duration, bytes: u64, min_bytes_per_s: u64) -> Result<(), String> {
        self.waited += waited;
        self.bytes += bytes;
        if self.waited < WINDOW {
            return Ok(());
        }
        let needed = (min_bytes_per_s as f64 * self.waited.as_secs_f64()) as u64;
        let window = std::mem::take(self);
        if window.bytes < needed {
            return Err(format!(
                "source_url sent {} bytes in {} s, slower than the least rate of {min_bytes_per_s} bytes a second",
                window.bytes,
                window.waited.as_secs()
            ));
        }
        Ok(())
    }

    /// How long until the window is full.
    fn left(&self) -> Duration {
        WINDOW.saturating_sub(self.waited)
    }
}

/// `stream`, ended with an error (`TimedOut`) when it falls behind `pace`; `started` is when the
/// request was sent.
pub fn paced(
    stream: impl Stream<Item = io::Result<Bytes>> + Send + 'static,
    pace: Pace,
    started: Instant,
) -> ByteStream {
    // The time spent waiting for the server so far (the response's headers included).
    let state = (Box::pin(stream), Window::default(), started.elapsed(), false);
    Box::pin(futures::stream::unfold(state, move |(mut stream, mut window, mut spent, ended)| async move {
        if ended {
            return None;
        }
        let mut silent = Duration::ZERO;
        let failure = loop {
            let now = Instant::now();
            if spent >= pace.deadline {
                break format!("source_url was not read to its end within {} s", pace.deadline.as_secs());
            }
            let wait = pace.idle.saturating_sub(silent).min(window.left()).min(pace.deadline - spent);
            let item = match tokio::time::timeout(wait, stream.next()).await {
                Ok(None) => return None,
                Ok(Some(item)) => Some(item),
                Err(_) => None,
            };
            let waited = now.elapsed();
            silent += waited;
            spent += waited;
            let bytes = match &item {
                Some(Ok(bytes)) => bytes.len() as u64,
                _ => 0,
            };
            if let Err(slow) = window.add(waited, bytes, pace.min_bytes_per_s) {
                break slow;
            }
            match item {
                Some(item) => return Some((item, (stream, window, spent, false))),
                None if silent >= pace.idle => {
                    break format!("source_url sent no bytes for {} s", pace.idle.as_secs());
                }
                None => {}
            }
        };
        Some((Err(io::Error::new(io::ErrorKind::TimedOut, failure)), (stream, window, spent, true)))
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PACE: Pace =
        Pace { idle: Duration::from_secs(60), deadline: Duration::from_secs(3600), min_bytes_per_s: 1024 };

    /// `chunks` chunks of `size` bytes, one every `every`.
    fn server(chunks: usize, size: usize, every: Duration) -> impl Stream<Item = io::Result<Bytes>> + Send {
        futures::stream::iter(0..chunks).then(move |_| async move {
            tokio::time::sleep(every).await;
            Ok(Bytes::from(vec![b'x'; size]))
        })
    }

    /// Reads `stream` to its end: the bytes that came, the error that ended it, the time it took.
    async fn drain(mut stream: ByteStream) -> (usize, Option<io::Error>, Duration) {
        let started = Instant::now();
        let mut bytes = 0;
        while let Some(item) = stream.next().await {
            match item {
                Ok(b) => bytes += b.len(),
                Err(e) => return (bytes, Some(e), started.elapsed()),
            }
        }
        (bytes, None, started.elapsed())
    }

    #[tokio::test(start_paused = true)]
    async fn a_byte_every_59_seconds_is_cut_off_at_the_end_of_the_first_window() {
        let (bytes, error, took) = drain(paced(server(1000, 1, Duration::from_secs(59)), PACE, Instant::now())).await;
        let error = error.expect("a trickle is cut off");
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert_eq!(
            error.to_string(),
            "source_url sent 1 bytes in 60 s, slower than the least rate of 1024 bytes a second"
        );
        assert_eq!((bytes, took.as_secs()), (1, 60));
    }

    #[tokio::test(start_paused = true)]
    async fn a_steady_server_is_read_to_its_end_however_long_the_reader_waits_between_reads() {
        // 2 KiB a second for ten minutes.
        let stream = paced(server(600, 2048, Duration::from_secs(1)), PACE, Instant::now());
        assert_eq!(drain(stream).await.0, 600 * 2048);

        // A server with the whole list ready, read by a reader held back by the broker (or its
        // share of the classifiers) for ten minutes between reads, past the deadline: its
        // waiting is not the server's slowness.
        let mut stream = paced(server(10, 16, Duration::ZERO), PACE, Instant::now());
        let mut bytes = 0;
        while let Some(item) = stream.next().await {
            bytes += item.unwrap().len();
            tokio::time::sleep(Duration::from_secs(600)).await;
        }
        assert_eq!(bytes, 160);
    }

    #[tokio::test(start_paused = true)]
    async fn a_fast_enough_server_is_cut_off_at_the_deadline() {
        let pace = Pace { deadline: Duration::from_millis(300_500), ..PACE };
        let (bytes, error, took) = drain(paced(server(1000, 4096, Duration::from_secs(1)), pace, Instant::now())).await;
        assert_eq!(error.unwrap().to_string(), "source_url was not read to its end within 300 s");
        assert_eq!((bytes, took.as_millis()), (300 * 4096, 300_500));
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_server_is_cut_off_after_the_idle_time() {
        let pace = Pace { idle: Duration::from_secs(45), min_bytes_per_s: 0, ..PACE };
        let (bytes, error, took) = drain(paced(server(3, 8, Duration::from_secs(100)), pace, Instant::now())).await;
        assert_eq!(error.unwrap().to_string(), "source_url sent no bytes for 45 s");
        assert_eq!((bytes, took.as_secs()), (0, 45));
    }
}
