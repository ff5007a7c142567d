//! Kafka to Postgres: read results in batches, write each batch in one transaction, and only
//! then store the offsets for commit.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use prometheus::{Histogram, IntCounter, IntCounterVec};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::producer::FutureProducer;
use rdkafka::{Offset, TopicPartitionList};
use reefline_schemas::{ClassificationResult, Codec};
use sqlx::PgPool;

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
            let first = tokio::select! {
                () = &mut shutdown => return,
                m = self.consumer.recv() => m,
            };
            let mut batch = Vec::with_capacity(self.max_batch);
            match first {
                Ok(m) => batch.push(m),
                Err(e) => {
                    tracing::warn!(error = %e, "consumer error");
                    continue;
                }
            }
            let deadline = tokio::time::Instant::now() + self.linger;
            while batch.len() < self.max_batch {
                tokio::select! {
                    m = self.consumer.recv() => match m {
                        Ok(m) => batch.push(m),
                        Err(e) => tracing::warn!(error = %e, "consumer error"),
                    },
                    () = tokio::time::sleep_until(deadline) => break,
                }
            }
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
            match crate::db::upsert(&self.pool, &results).await {
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
        self.store_offsets(messages);
    }

    async fn dead_letter(&self, message: &BorrowedMessage<'_>, e: reefline_schemas::CodecError) {
        reefline_common::kafka::dead_letter(&self.producer, &self.dead_letter_topic, message, e.kind(), &e.to_string())
            .await;
        self.metrics.dead_letters.with_label_values(&[e.kind()]).inc();
    }

    fn store_offsets(&self, messages: &[BorrowedMessage<'_>]) {
        let mut next: HashMap<i32, i64> = HashMap::new();
        for m in messages {
            let e = next.entry(m.partition()).or_insert(0);
            *e = (*e).max(m.offset() + 1);
        }
        let mut tpl = TopicPartitionList::new();
        for (partition, offset) in next {
            let _ = tpl.add_partition_offset(&self.topic, partition, Offset::Offset(offset));
        }
        if let Err(e) = self.consumer.store_offsets(&tpl) {
            tracing::debug!(error = %e, "offsets not stored (partition revoked?)");
        }
    }
}
