//! Kafka to Postgres: read results in batches, write each batch in one transaction, and only
//! then store the offsets for commit.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus::{Histogram, IntCounter, IntCounterVec};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::{Offset, TopicPartitionList};
use reefline_common::kafka::LagContext;
use reefline_common::producer::FutureProducer;
use reefline_schemas::{ClassificationResult, Codec, ImageRequest};
use sqlx::PgPool;
use tokio::sync::Notify;

use reefline_store::sink as db;

/// The sink's consumers: they report their lag.
pub type LagConsumer = StreamConsumer<LagContext>;

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
    pub consumer: LagConsumer,
    pub pool: PgPool,
    pub codec: Codec,
    pub producer: FutureProducer,
    pub dead_letter_topic: String,
    pub max_batch: usize,
    pub linger: Duration,
    pub metrics: Metrics,
    /// Ready while the database takes writes.
    pub readiness: reefline_common::ops::Readiness,
    /// Told when a batch completes.
    pub wake: Arc<Notify>,
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

    /// Decodes, checks, writes and stores the offsets of one batch; retries the database until it
    /// answers. A record that does not decode, breaks the contract's rules, or that Postgres
    /// refuses is moved to the dead-letter topic with its reason; the rest is written.
    async fn write(&self, messages: &[BorrowedMessage<'_>]) {
        // The latest result per request (one statement cannot touch a row twice), with the
        // message it came from.
        let mut latest: HashMap<String, (ClassificationResult, usize)> = HashMap::with_capacity(messages.len());
        for (i, message) in messages.iter().enumerate() {
            let checked = decode::<ClassificationResult>(&self.codec, message)
                .await
                .map_err(|e| (e.kind(), e.to_string()))
                .and_then(|r| r.check().map(|()| r).map_err(|reason| ("invalid_result", reason)));
            match checked {
                Ok(r) => {
                    self.metrics.received.inc();
                    match latest.get(&r.request_id) {
                        Some((existing, _)) if !existing.is_replaced_by(&r) => {}
                        _ => {
                            latest.insert(r.request_id.clone(), (r, i));
                        }
                    }
                }
                Err((kind, reason)) => self.dead_letter(message, kind, &reason).await,
            }
        }
        let (results, sources): (Vec<ClassificationResult>, Vec<usize>) = latest.into_values().unzip();
        // A `store` span per result, in the trace its record carries, open until it is written.
        let spans: Vec<tracing::Span> = results
            .iter()
            .zip(&sources)
            .map(|(r, &i)| {
                let span = tracing::info_span!("store", request_id = %r.request_id, batch_id = %r.batch_id);
                reefline_common::telemetry::continue_from(&span, messages[i].headers());
                span
            })
            .collect();
        let refused = write_isolating(
            &results,
            |rows| async move {
                let started = Instant::now();
                db::upsert(&self.pool, rows).await?;
                complete_batches(&self.pool, &self.wake, rows.iter().map(|r| r.batch_id.as_str())).await?;
                self.readiness.set(true);
                self.metrics.write_seconds.observe(started.elapsed().as_secs_f64());
                self.metrics.batch_size.observe(rows.len() as f64);
                self.metrics.rows.inc_by(rows.len() as u64);
                Ok(())
            },
            |e, rows| {
                self.readiness.set(false);
                self.metrics.write_failures.inc();
                tracing::warn!(error = %e, rows, "database write failed; retrying");
            },
            std::future::pending(),
        )
        .await
        .unwrap_or_default();
        drop(spans);
        for (i, reason) in refused {
            self.dead_letter(&messages[sources[i]], "refused_by_database", &reason).await;
        }
        store_offsets(&self.consumer, messages);
    }

    async fn dead_letter(&self, message: &BorrowedMessage<'_>, kind: &str, reason: &str) {
        reefline_common::kafka::dead_letter(&self.producer, &self.dead_letter_topic, message.into(), kind, reason)
            .await;
        self.metrics.dead_letters.with_label_values(&[kind]).inc();
    }
}

/// Writes `items` with `write`, waiting out a database outage (`on_outage` is told of each failed
/// try; `shutdown` ends the wait, and then `None` is returned). When Postgres refuses what a write
/// holds (a data error: a NUL byte, a value out of range), the items are halved until each refused
/// one is alone; everything else is written, and the refused are returned (index and reason).
async fn write_isolating<'a, T, W, F>(
    items: &'a [T],
    mut write: W,
    mut on_outage: impl FnMut(&sqlx::Error, usize),
    shutdown: impl Future<Output = ()>,
) -> Option<Vec<(usize, String)>>
where
    W: FnMut(&'a [T]) -> F,
    F: Future<Output = sqlx::Result<()>>,
{
    tokio::pin!(shutdown);
    let mut refused = Vec::new();
    let mut pending = Vec::with_capacity(16);
    pending.push(0..items.len());
    while let Some(range) = pending.pop() {
        if range.is_empty() {
            continue;
        }
        let mut backoff = reefline_common::Backoff::OUTAGE.waits();
        loop {
            match write(&items[range.clone()]).await {
                Ok(()) => break,
                Err(e) if reefline_store::is_refusal(&e) => {
                    if range.len() == 1 {
                        let reason = match &e {
                            sqlx::Error::Database(db) => {
                                format!("{e} (SQLSTATE {})", db.code().as_deref().unwrap_or("?"))
                            }
                            _ => e.to_string(),
                        };
                        refused.push((range.start, reason));
                    } else {
                        let middle = range.start + range.len() / 2;
                        pending.push(middle..range.end);
                        pending.push(range.start..middle);
                    }
                    break;
                }
                Err(e) => on_outage(&e, range.len()),
            }
            tokio::select! {
                () = backoff.wait() => {}
                () = &mut shutdown => return None,
            }
        }
    }
    Some(refused)
}

/// Decodes a record's value, waiting out a registry outage (good records never become dead letters
/// because the registry was away).
async fn decode<T: reefline_schemas::Message>(
    codec: &Codec,
    message: &BorrowedMessage<'_>,
) -> Result<T, reefline_schemas::CodecError> {
    let is_transient = reefline_schemas::CodecError::is_transient;
    reefline_common::retry_transient("schema registry", is_transient, || codec.decode::<T>(message.payload())).await
}

/// Waits for the next message, then takes more for at most `linger`, up to `max`; `None` once
/// `shutdown` fires.
async fn next_batch<'c>(
    consumer: &'c LagConsumer,
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

/// Stores, for commit, the offset after the last of `messages` in each partition (of each topic:
/// the requests log reads both lanes).
fn store_offsets(consumer: &LagConsumer, messages: &[BorrowedMessage<'_>]) {
    let mut next: HashMap<(&str, i32), i64> = HashMap::new();
    for m in messages {
        let e = next.entry((m.topic(), m.partition())).or_insert(0);
        *e = (*e).max(m.offset() + 1);
    }
    let mut tpl = TopicPartitionList::new();
    for ((topic, partition), offset) in next {
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
    pub consumer: LagConsumer,
    pub pool: PgPool,
    pub codec: Codec,
    pub max_batch: usize,
    pub linger: Duration,
    /// Requests recorded, and records skipped as undecodable.
    pub recorded: IntCounter,
    pub skipped: IntCounter,
    /// Told when a batch completes.
    pub wake: Arc<Notify>,
    /// Whose each request is.
    pub tenants: reefline_common::tenant::TenantSeal,
}

/// Marks complete the batches among `batch_ids` that now have every result, and wakes the
/// notifier when one did.
async fn complete_batches(pool: &PgPool, wake: &Notify, batch_ids: impl Iterator<Item = &str>) -> sqlx::Result<()> {
    let mut ids: Vec<&str> = batch_ids.collect();
    ids.sort_unstable();
    ids.dedup();
    if db::batches::complete(pool, &ids).await? > 0 {
        wake.notify_one();
    }
    Ok(())
}

impl RequestLog {
    /// Runs until `shutdown` fires; a batch not yet written is read again after a restart.
    /// Requests that break the contract's rules or that Postgres refuses are skipped (the
    /// classifier dead-letters them).
    pub async fn run(&self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        while let Some(batch) = next_batch(&self.consumer, self.max_batch, self.linger, shutdown.as_mut()).await {
            let mut requests = Vec::with_capacity(batch.len());
            for message in &batch {
                let checked = decode::<ImageRequest>(&self.codec, message)
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|r| r.check(reefline_schemas::rules::URL_CEILING_BYTES).map(|()| r))
                    .and_then(|mut r| {
                        // The tenant it claims only under ingest's seal; no claim: the topic's. A
                        // claim without one is skipped (the classifier dead-letters it).
                        r.tenant =
                            Some(self.tenants.tenant_of(r.tenant.as_deref(), &r.request_id, message.headers())?);
                        Ok(r)
                    });
                match checked {
                    Ok(r) => requests.push(r),
                    Err(reason) => {
                        self.skipped.inc();
                        tracing::debug!(%reason, offset = message.offset(), "request record skipped");
                    }
                }
            }
            let written = write_isolating(
                &requests,
                |rows| async move {
                    reefline_store::submissions::record(&self.pool, rows).await?;
                    // A batch whose results were all written before its requests completes now.
                    complete_batches(&self.pool, &self.wake, rows.iter().map(|r| r.batch_id.as_str())).await
                },
                |e, rows| tracing::warn!(error = %e, rows, "recording requests failed; retrying"),
                shutdown.as_mut(),
            )
            .await;
            let Some(refused) = written else { return };
            for (i, reason) in &refused {
                self.skipped.inc();
                tracing::warn!(request_id = %requests[*i].request_id, %reason, "request refused by the database; skipped");
            }
            self.recorded.inc_by((requests.len() - refused.len()) as u64);
            store_offsets(&self.consumer, &batch);
        }
    }
}
