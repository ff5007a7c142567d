//! One upload of a feed being read under its lease: its chunks produced (within the feed's share)
//! and settled in the ledger, and the feed closed as read, or as interrupted on any failure.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use reefline_schemas::ImageRequest;
use sqlx::PgPool;
use uuid::Uuid;

use super::parse::{self, Chunk, Cut, Line, ReadError};
use super::{ByteStream, Limits, database, ledger, produce, share};
use crate::AppState;
use crate::error::IngestError;

/// One upload of a feed being read, under its lease.
pub(super) struct Reader {
    pub(super) state: Arc<AppState>,
    pub(super) pool: PgPool,
    pub(super) lease: Uuid,
    pub(super) feed_id: String,
    pub(super) model: Option<String>,
    /// The uploader's tenant, which every request of the feed carries.
    pub(super) tenant: String,
    pub(super) limits: Limits,
    /// When this upload began to be read.
    pub(super) since: chrono::DateTime<chrono::Utc>,
    /// The feed's size in bytes when known, and the bytes read so far (for the sink's estimate
    /// of the lines to come).
    pub(super) size: Option<u64>,
    pub(super) read_bytes: Arc<AtomicU64>,
}

impl Reader {
    /// Reads `stream` to its end, producing and settling each chunk past `settled` (the last line
    /// an earlier upload settled); closes the feed as read, or as interrupted on any failure. A feed
    /// cut short by a limit (too many lines, too many rejects) is closed as read where it was cut,
    /// so that no resend reads on past the limit, and answered with the limit's error.
    pub(super) async fn run(
        self,
        stream: ByteStream,
        options: parse::Options,
        settled: i64,
    ) -> Result<ledger::Feed, IngestError> {
        let every = self.limits.lease / 3;
        let keep = tokio::spawn(ledger::keep(self.pool.clone(), self.feed_id.clone(), self.lease, every));
        let _keep = AbortOnDrop(keep);
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Chunk>(2);
        let parse = tokio::task::spawn_blocking(move || {
            let input = tokio_util::io::SyncIoBridge::new(tokio_util::io::StreamReader::new(stream));
            parse::read(input, options, |chunk| tx.blocking_send(chunk).is_ok())
        });
        let mut failure = None;
        while let Some(mut chunk) = rx.recv().await {
            // Lines an earlier upload of the feed settled are read again, not produced again.
            chunk.lines.retain(|l| l.number() as i64 > settled);
            if let Err(e) = self.settle(&chunk).await {
                failure = Some(e);
                break;
            }
        }
        drop(rx);
        let read = parse.await.map_err(|e| IngestError::Unavailable(format!("the feed's parser failed: {e}")));
        let (failure, format) = match (failure, read) {
            (Some(failure), _) => (Some(failure), None),
            (None, Ok(Ok(outcome))) => (outcome.cut.map(|cut| self.cut(cut)), Some(outcome.format)),
            (None, Ok(Err(e))) => (Some(self.unreadable(e)), None),
            (None, Err(e)) => (Some(e), None),
        };
        let closed = ledger::close(&self.pool, &self.feed_id, self.lease, format).await;
        if let Some(failure) = failure {
            if format.is_some() {
                tracing::info!(feed_id = %self.feed_id, error = %failure, "feed cut short by a limit and closed");
            } else {
                tracing::info!(feed_id = %self.feed_id, error = %failure, "feed interrupted; a resend with its key resumes it");
            }
            return Err(failure);
        }
        tracing::info!(feed_id = %self.feed_id, "feed read");
        closed.map_err(database)?.ok_or_else(|| self.lost())
    }

    fn cut(&self, cut: Cut) -> IngestError {
        let feed_id = self.feed_id.clone();
        match cut {
            Cut::TooLong { limit, line } => IngestError::FeedTooLong { feed_id, limit, line },
            Cut::TooManyRejects { limit, line } => IngestError::TooManyRejects { feed_id, limit, line },
        }
    }

    fn unreadable(&self, e: ReadError) -> IngestError {
        IngestError::UnreadableFeed { feed_id: self.feed_id.clone(), reason: e.to_string() }
    }

    fn lost(&self) -> IngestError {
        IngestError::FeedInProgress { feed_id: self.feed_id.clone() }
    }

    /// Produces the accepted lines of a chunk as one batch and, once the broker has them all,
    /// records the chunk in the ledger.
    async fn settle(&self, chunk: &Chunk) -> Result<(), IngestError> {
        let lines = &chunk.lines[..];
        if lines.is_empty() {
            return Ok(());
        }
        let requests = self.plan(lines);
        // Only while the lease holds: a reader that lost it (a resend took the feed over after
        // the database was away for longer than the lease) must not produce lines twice. A
        // database that does not answer cannot have given the feed to another reader either.
        if let Ok(false) = ledger::heartbeat(&self.pool, &self.feed_id, self.lease).await {
            return Err(self.lost());
        }
        if !requests.is_empty() {
            let per_day = self.state.settings.tenant_images_per_day;
            if let Err(over) = crate::quota::take_daily(Some(&self.pool), &self.tenant, requests.len(), per_day).await {
                self.state.metrics.quota_refusals.with_label_values(&[&self.tenant]).inc();
                return Err(IngestError::over_day(over));
            }
            self.produce(&requests).await?;
        }
        let metrics = &self.state.metrics;
        metrics.feed_lines.with_label_values(&["accepted"]).inc_by(requests.len() as u64);
        metrics.feed_lines.with_label_values(&["rejected"]).inc_by((lines.len() - requests.len()) as u64);
        let started = Instant::now();
        let mut backoff = reefline_common::Backoff::OUTAGE.waits();
        let max_stored = self.limits.max_stored_rejects;
        loop {
            let bytes = ledger::Bytes { size: self.size, read: self.read_bytes.load(Ordering::Relaxed) };
            match ledger::checkpoint(&self.pool, &self.feed_id, self.lease, chunk, max_stored, bytes).await {
                Ok(()) => return Ok(()),
                Err(ledger::CheckpointError::LostLease) => return Err(self.lost()),
                Err(ledger::CheckpointError::Database(e)) if started.elapsed() > self.limits.stall => {
                    return Err(database(e));
                }
                Err(ledger::CheckpointError::Database(e)) => {
                    tracing::warn!(feed_id = %self.feed_id, error = %e, "the ledger did not take a chunk; retrying");
                    backoff.wait().await;
                }
            }
        }
    }

    /// Puts a chunk's requests on the broker: at once without a window, else a part at a time,
    /// each once the feed is within its share ([`share`]).
    async fn produce(&self, requests: &[ImageRequest]) -> Result<(), IngestError> {
        let pause = || self.wait_a_moment();
        let (state, stall) = (&self.state, self.limits.stall);
        let window = state.settings.feed_window_images;
        if window == 0 {
            return produce::produce_chunk(state, "feeds", requests, stall, pause).await;
        }
        let share = share::Share {
            pool: &self.pool,
            feed_id: &self.feed_id,
            tenant: &self.tenant,
            window,
            lease: self.limits.lease,
            since: self.since,
        };
        if let Err(e) = share.open_chunk(requests).await {
            tracing::warn!(feed_id = %self.feed_id, error = %e, "the chunk's batch is not recorded; the sink will record it");
        }
        let mut rest = requests;
        while !rest.is_empty() {
            let started = Instant::now();
            let step = share.admit(rest.len() as u64).await as usize;
            state.metrics.feed_share_wait.observe(started.elapsed().as_secs_f64());
            let (now, later) = rest.split_at(step.min(rest.len()));
            produce::produce_chunk(state, "feeds", now, stall, pause).await?;
            rest = later;
        }
        Ok(())
    }

    /// One request per accepted line, as a batch of its own.
    fn plan(&self, lines: &[Line]) -> Vec<ImageRequest> {
        let batch_id = Uuid::now_v7().to_string();
        let submitted_at_ms = chrono::Utc::now().timestamp_millis();
        let accepted: Vec<_> = lines
            .iter()
            .filter_map(|l| match l {
                Line::Accepted { line, url, metadata } => Some((*line, url, metadata)),
                Line::Rejected { .. } => None,
            })
            .collect();
        let batch_size = accepted.len() as i32;
        accepted
            .into_iter()
            .enumerate()
            .map(|(i, (line, url, metadata))| ImageRequest {
                request_id: Uuid::now_v7().to_string(),
                batch_id: batch_id.clone(),
                batch_index: i as i32,
                batch_size,
                url: url.clone(),
                submitted_at_ms,
                source: "feed".into(),
                model: self.model.clone(),
                callback_url: None,
                feed_id: Some(self.feed_id.clone()),
                line: Some(line as i64),
                metadata: (!metadata.is_empty()).then(|| metadata.clone()),
                tenant: Some(self.tenant.clone()),
            })
            .collect()
    }

    /// A second's pause.
    async fn wait_a_moment(&self) {
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// A task aborted when this is dropped (the feed's lease keeper, when its reader ends).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
