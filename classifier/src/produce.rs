//! Stage 6, produce: encode each outcome as a result record, produce it, and once the broker
//! acknowledges it mark the request's offset done.
//!
//! A failure that retrying cannot cure (the result is larger than the broker takes, the record
//! does not encode) moves the request to the dead-letter topic, so the partition's offsets keep
//! moving; any other failure (broker or registry away) is retried until it works, or until the
//! classifier has been stopping for [`Stopping::GRACE`], when the request is left for a redo.

use std::sync::Arc;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use futures::StreamExt;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use reefline_common::kafka::Source;
use reefline_common::producer::FutureProducer;
use reefline_schemas::rules::{ERROR_MESSAGE_BYTES, truncate};
use reefline_schemas::{BATCH_ID_HEADER, ClassificationResult, Codec, CodecError, REQUEST_ID_HEADER, Status};
use tokio::sync::mpsc;
use tracing::Instrument;

use crate::job::Outcome;
use crate::offsets::Lanes;
use reefline_common::kafka::Lane;

/// What the stage needs.
pub struct Produce {
    pub producer: FutureProducer,
    /// The interactive lane's results go through this one (no linger).
    pub interactive_producer: FutureProducer,
    pub codec: Codec,
    pub topic: String,
    pub dead_letter_topic: String,
    /// Each lane's offsets (and topic, which a dead letter names as its source).
    pub lanes: Lanes,
    pub metrics: crate::metrics::Metrics,
    pub stopping: Stopping,
    /// Seals a dead-lettered request's tenant again, so that a replay keeps it.
    pub tenants: reefline_common::tenant::TenantSeal,
}

/// When the classifier began to stop, once it has.
#[derive(Clone, Default)]
pub struct Stopping(Arc<OnceLock<Instant>>);

impl Stopping {
    /// How long a stopping classifier keeps retrying what it has in hand.
    pub const GRACE: Duration = Duration::from_secs(10);

    pub fn begin(&self) {
        let _ = self.0.set(Instant::now());
    }

    /// Whether the classifier has been stopping for longer than [`Stopping::GRACE`].
    fn given_up(&self) -> bool {
        self.0.get().is_some_and(|t| t.elapsed() > Self::GRACE)
    }
}

/// Records produced at once, awaiting acknowledgement.
const IN_FLIGHT: usize = 512;

/// Runs until `outcomes` closes and every record is acknowledged (or given up on while stopping).
pub async fn run(stage: Produce, outcomes: mpsc::Receiver<Outcome>) {
    let stream = futures::stream::unfold(outcomes, |mut rx| async move { rx.recv().await.map(|o| (o, rx)) });
    stream.for_each_concurrent(IN_FLIGHT, |outcome| stage.produce(outcome)).await;
}

/// Why a result was not produced.
enum Failure {
    /// Retrying the same record cannot work: (kind, reason).
    Permanent(&'static str, String),
    Transient(String),
}

fn classify_kafka(e: &KafkaError) -> Failure {
    use RDKafkaErrorCode::*;
    match e.rdkafka_error_code() {
        Some(MessageSizeTooLarge | InvalidMessageSize | MessageBatchTooLarge) => {
            Failure::Permanent("result_too_large", format!("the broker refused the result: {e}"))
        }
        Some(InvalidMessage | InvalidRecord) => {
            Failure::Permanent("result_refused", format!("the broker refused the result: {e}"))
        }
        _ => Failure::Transient(e.to_string()),
    }
}

fn classify_codec(e: CodecError) -> Failure {
    match e {
        CodecError::Undecodable(_) | CodecError::Mismatch { .. } => Failure::Permanent("unencodable", e.to_string()),
        // The registry away, or refusing the result schema (a deployment fault, the same for every
        // record): wait for it rather than dead-letter every result.
        CodecError::RegistryUnavailable(_) | CodecError::Registry(_) => Failure::Transient(e.to_string()),
    }
}

impl Produce {
    fn result(&self, outcome: &Outcome) -> ClassificationResult {
        let r = &outcome.job.request;
        let (status, predictions, marine_group, error_kind, error_message) = match &outcome.result {
            Ok(c) => (Status::Ok, c.predictions.clone(), c.marine_group.clone(), None, None),
            Err(e) => (
                Status::Error,
                Vec::new(),
                None,
                Some(e.kind().to_owned()),
                Some(truncate(&e.to_string(), ERROR_MESSAGE_BYTES).to_owned()),
            ),
        };
        ClassificationResult {
            request_id: r.request_id.clone(),
            batch_id: r.batch_id.clone(),
            batch_index: r.batch_index,
            batch_size: r.batch_size,
            url: r.url.clone(),
            status,
            predictions,
            marine_group,
            model_name: outcome.model.name.clone(),
            model_version: outcome.model.version.clone(),
            error_kind,
            error_message,
            submitted_at_ms: r.submitted_at_ms,
            completed_at_ms: chrono::Utc::now().timestamp_millis(),
            feed_id: r.feed_id.clone(),
            line: r.line,
            metadata: r.metadata.clone(),
            sha256: outcome.job.photo.as_ref().map(|p| p.sha256.clone()),
            cached: outcome.cached,
            exif: outcome.job.photo.as_ref().map(|p| p.exif.clone()),
            tenant: r.tenant.clone(),
        }
    }

    async fn produce(&self, mut outcome: Outcome) {
        outcome.job.slot = None;
        let result = self.result(&outcome);
        let metrics = &self.metrics;
        let mut backoff = reefline_common::Backoff::OUTAGE.waits();
        let outcome_label = loop {
            let producing = tracing::info_span!(parent: &outcome.job.span, "produce", status = result.status.as_str());
            match self.try_produce(&result, &outcome.job).instrument(producing).await {
                Ok(()) => break result.error_kind.as_deref().unwrap_or("ok"),
                Err(Failure::Permanent(kind, reason)) => {
                    if !self.dead_letter(&outcome, kind, &reason).await {
                        return;
                    }
                    metrics.dead_letters.with_label_values(&[kind]).inc();
                    break kind;
                }
                Err(Failure::Transient(e)) => {
                    if self.stopping.given_up() {
                        tracing::warn!(request_id = %result.request_id, error = %e, "stopping with a result unproduced; it will be redone");
                        return;
                    }
                    tracing::warn!(request_id = %result.request_id, error = %e, "producing the result failed; retrying");
                    backoff.wait().await;
                }
            }
        };
        metrics.results.with_label_values(&[outcome_label]).inc();
        let e2e = (result.completed_at_ms - result.submitted_at_ms).max(0) as f64 / 1000.0;
        metrics.end_to_end_seconds.observe(e2e);
        tracing::debug!(request_id = %result.request_id, status = result.status.as_str(), "result produced");
        let mut job = outcome.job;
        job.lap(metrics, "produce");
        self.lanes.get(job.lane).finish(job.partition, job.offset);
    }

    /// Produces `result`, its record carrying the trace context of its job's span, through its
    /// lane's producer.
    async fn try_produce(&self, result: &ClassificationResult, job: &crate::job::Job) -> Result<(), Failure> {
        let span = &job.span;
        let payload = self.codec.encode(&self.topic, result).await.map_err(classify_codec)?;
        let headers = OwnedHeaders::new()
            .insert(Header { key: REQUEST_ID_HEADER, value: Some(result.request_id.as_str()) })
            .insert(Header { key: BATCH_ID_HEADER, value: Some(result.batch_id.as_str()) });
        let headers = reefline_common::telemetry::inject(span, headers);
        let record = FutureRecord::to(&self.topic).key(result.request_id.as_str()).payload(&payload).headers(headers);
        let producer = if job.lane == Lane::Interactive { &self.interactive_producer } else { &self.producer };
        producer.send(record, Duration::from_secs(5)).await.map_err(|(e, _)| classify_kafka(&e))?;
        Ok(())
    }

    /// Moves the request whose result cannot be produced to the dead-letter topic, encoded as it
    /// was read (a replay sends it back to the requests topic). False if the classifier stopped
    /// before the broker took it.
    async fn dead_letter(&self, outcome: &Outcome, kind: &str, reason: &str) -> bool {
        let job = &outcome.job;
        let mut backoff = reefline_common::Backoff::OUTAGE.waits();
        let payload = loop {
            match self.codec.encode(&self.lanes.get(job.lane).topic, &job.request).await {
                Ok(payload) => break payload,
                Err(e) if self.stopping.given_up() => {
                    tracing::warn!(request_id = %job.request.request_id, error = %e, "stopping with a dead letter unsent; the request will be redone");
                    return false;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "encoding a dead letter failed; retrying");
                    backoff.wait().await;
                }
            }
        };
        let seal = job.request.tenant.as_deref().and_then(|t| self.tenants.seal(t, &job.request.request_id));
        let source = Source {
            topic: &self.lanes.get(job.lane).topic,
            partition: job.partition,
            offset: job.offset,
            key: Some(job.request.request_id.as_bytes()),
            payload: Some(&payload),
            seal: seal.as_deref().map(str::as_bytes),
        };
        let send = reefline_common::kafka::dead_letter(&self.producer, &self.dead_letter_topic, source, kind, reason);
        tokio::pin!(send);
        loop {
            tokio::select! {
                () = &mut send => return true,
                () = tokio::time::sleep(Duration::from_secs(1)) => if self.stopping.given_up() {
                    tracing::warn!(request_id = %job.request.request_id, "stopping with a dead letter unsent; the request will be redone");
                    return false;
                },
            }
        }
    }
}
