//! Kafka to Postgres: read results in batches, write each batch in one transaction, and only
//! then store the offsets for commit.

use std::collections::HashMap;
use std::pin::Pin;
use std::time::{Duration, Instant};

use prometheus::{Histogram, IntCounter, IntCounterVec};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::{Offset, TopicPartitionList};
use reefline_common::producer::FutureProducer;
use reefline_schemas::{ClassificationResult, Codec, ImageRequest};
use sqlx::PgPool;

use crate::db;

/// How long a stopping sink keeps trying to write the batch in hand.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// The sink's metrics.
#[derive(Clone)]
pub struct Metrics {
    pub rows: IntCounter,
    /// Result records decoded, duplicates included.
    pub received: IntCounter,
    pub write_seconds: Histogram,
    pub batch_size: Histogram,
    pub write_failures: IntCounter,
    pub dead_letters: IntCounterVec,
}

/// What the loop needs.
pub struct Sink {
    pub consumer: StreamConsumer,
    pub pool: PgPool,
    pub codec: Codec,
    pub producer: FutureProducer,
    pub topic: String,
    pub dead_letter_topic: String,
    pub max_batch: usize,
    pub linger: Duration,
    pub metrics: Metrics,
    /// Ready while the database takes writes.
    pub readiness: reefline_common::ops::Readiness,
}

impl Sink {
    /// Runs until `shutdown` fires; the batch in hand is written before it returns, unless the
    /// database stays down for [`SHUTDOWN_GRACE`].
    pub async fn run(&self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            let Some(batch) = next_batch(&self.consumer, self.max_batch, self.linger, shutdown.as_mut()).await else {
                return;
            };
            let write = self.write(&batch);
            tokio::pin!(write);
            tokio::select! {
                () = &mut write => {}
                () = &mut shutdown => {
                    // Finish the batch in hand unless the database is down; an unwritten batch's
                    // offsets are not stored, so it is read again after the restart.
                    if tokio::time::timeout(SHUTDOWN_GRACE, write).await.is_err() {
                        tracing::warn!(records = batch.len(), "stopping with a batch unwritten; it will be read again");
                    }
                    return;
                }
            }
        }
    }

    /// Decodes, writes and stores the offsets of one batch; retries the database until it answers.
    async fn write(&self, messages: &[BorrowedMessage<'_>]) {
        let mut results: HashMap<String, ClassificationResult> = HashMap::with_capacity(messages.len());
        for message in messages {
            match self.codec.decode_waiting::<ClassificationResult>(message.payload()).await {
                Ok(r) => {
                    self.metrics.received.inc();
                    // Keep the latest result per request: one statement cannot touch a row twice.
                    match results.get(&r.request_id) {
                        Some(existing) if existing.completed_at_ms > r.completed_at_ms => {}
                        _ => {
                            results.insert(r.request_id.clone(), r);
                        }
                    }
                }
                Err(e) => self.dead_letter(message, e).await,
            }
        }
        let results: Vec<ClassificationResult> = results.into_values().collect();
        let mut backoff = reefline_common::Backoff::new();
        loop {
            let started = Instant::now();
            match db::upsert(&self.pool, &results).await {
                Ok(()) => {
                    self.readiness.set(true);
                    self.metrics.write_seconds.observe(started.elapsed().as_secs_f64());
                    self.metrics.batch_size.observe(results.len() as f64);
                    self.metrics.rows.inc_by(results.len() as u64);
                    break;
                }
                Err(e) => {
                    self.readiness.set(false);
                    self.metrics.write_failures.inc();
                    tracing::warn!(error = %e, rows = results.len(), "database write failed; retrying");
                    backoff.wait().await;
                }
            }
        }
        store_offsets(&self.consumer, &self.topic, messages);
    }

    async fn dead_letter(&self, message: &BorrowedMessage<'_>, e: reefline_schemas::CodecError) {
        reefline_common::kafka::dead_letter(&self.producer, &self.dead_letter_topic, message, e.kind(), &e.to_string())
            .await;
        self.metrics.dead_letters.with_label_values(&[e.kind()]).inc();
    }
}

/// Waits for the next message, then takes more for at most `linger`, up to `max`; `None` once
/// `shutdown` fires.
async fn next_batch<'c>(
    consumer: &'c StreamConsumer,
    max: usize,
    linger: Duration,
    mut shutdown: Pin<&mut impl Future<Output = ()>>,
) -> Option<Vec<BorrowedMessage<'c>>> {
    let first = loop {
        tokio::select! {
            () = &mut shutdown => return None,
            m = consumer.recv() => match m {
                Ok(m) => break m,
                Err(e) => tracing::warn!(error = %e, "consumer error"),
            },
        }
    };
    let mut batch = Vec::with_capacity(max);
    batch.push(first);
    let deadline = tokio::time::Instant::now() + linger;
    while batch.len() < max {
        tokio::select! {
            m = consumer.recv() => match m {
                Ok(m) => batch.push(m),
                Err(e) => tracing::warn!(error = %e, "consumer error"),
            },
            () = tokio::time::sleep_until(deadline) => break,
        }
    }
    Some(batch)
}

/// Stores, for commit, the offset after the last of `messages` in each partition.
fn store_offsets(consumer: &StreamConsumer, topic: &str, messages: &[BorrowedMessage<'_>]) {
    let mut next: HashMap<i32, i64> = HashMap::new();
    for m in messages {
        let e = next.entry(m.partition()).or_insert(0);
        *e = (*e).max(m.offset() + 1);
    }
    let mut tpl = TopicPartitionList::new();
    for (partition, offset) in next {
        let _ = tpl.add_partition_offset(topic, partition, Offset::Offset(offset));
    }
    if let Err(e) = consumer.store_offsets(&tpl) {
        tracing::debug!(error = %e, "offsets not stored (partition revoked?)");
    }
}

/// Records every request read from the requests topic, so that lookups can say "pending"
/// before a result exists. Undecodable records are skipped: dead-lettering them is the
/// classifier's job.
pub struct RequestLog {
    pub consumer: StreamConsumer,
    pub pool: PgPool,
    pub codec: Codec,
    pub topic: String,
    pub max_batch: usize,
    pub linger: Duration,
    /// Requests recorded, and records skipped as undecodable.
    pub recorded: IntCounter,
    pub skipped: IntCounter,
}

impl RequestLog {
    /// Runs until `shutdown` fires; a batch not yet written is read again after a restart.
    pub async fn run(&self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        while let Some(batch) = next_batch(&self.consumer, self.max_batch, self.linger, shutdown.as_mut()).await {
            let mut requests = Vec::with_capacity(batch.len());
            for message in &batch {
                match self.codec.decode_waiting::<ImageRequest>(message.payload()).await {
                    Ok(r) => requests.push(r),
                    Err(e) => {
                        self.skipped.inc();
                        tracing::debug!(error = %e, offset = message.offset(), "request record skipped");
                    }
                }
            }
            let mut backoff = reefline_common::Backoff::new();
            loop {
                match db::insert_requests(&self.pool, &requests).await {
                    Ok(()) => break,
                    Err(e) => tracing::warn!(error = %e, rows = requests.len(), "recording requests failed; retrying"),
                }
                tokio::select! {
                    () = backoff.wait() => {}
                    () = &mut shutdown => return,
                }
            }
            self.recorded.inc_by(requests.len() as u64);
            store_offsets(&self.consumer, &self.topic, &batch);
        }
    }
}
