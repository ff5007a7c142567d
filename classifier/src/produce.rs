//! Stage 6, produce: encode each outcome as a result record, produce it, and once the broker
//! acknowledges it mark the request's offset done.

use std::time::Duration;

use futures::StreamExt;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use reefline_common::producer::FutureProducer;
use reefline_schemas::{ClassificationResult, Codec, Status};
use tokio::sync::mpsc;

use crate::consume::Offsets;
use crate::infer::Outcome;

/// What the stage needs.
pub struct Produce {
    pub producer: FutureProducer,
    pub codec: Codec,
    pub topic: String,
    pub model_name: String,
    pub model_version: String,
    pub labels: crate::labels::Labels,
    pub offsets: Offsets,
}

/// Records produced at once, awaiting acknowledgement.
const IN_FLIGHT: usize = 512;

/// Runs until `outcomes` closes and every record is acknowledged.
pub async fn run(stage: Produce, outcomes: mpsc::Receiver<Outcome>) {
    let stream = futures::stream::unfold(outcomes, |mut rx| async move { rx.recv().await.map(|o| (o, rx)) });
    stream.for_each_concurrent(IN_FLIGHT, |outcome| stage.produce(outcome)).await;
}

impl Produce {
    fn result(&self, outcome: &Outcome) -> ClassificationResult {
        let r = &outcome.job.request;
        let (status, predictions, error_kind, error_message) = match &outcome.result {
            Ok(p) => (Status::Ok, p.clone(), None, None),
            Err(e) => (Status::Error, Vec::new(), Some(e.kind().to_owned()), Some(e.to_string())),
        };
        let marine_group = predictions
            .first()
            .and_then(|top| self.labels.get(top.index as usize))
            .and_then(|class| class.marine_group)
            .map(str::to_owned);
        ClassificationResult {
            request_id: r.request_id.clone(),
            batch_id: r.batch_id.clone(),
            batch_index: r.batch_index,
            batch_size: r.batch_size,
            url: r.url.clone(),
            status,
            predictions,
            marine_group,
            model_name: self.model_name.clone(),
            model_version: self.model_version.clone(),
            error_kind,
            error_message,
            submitted_at_ms: r.submitted_at_ms,
            completed_at_ms: chrono::Utc::now().timestamp_millis(),
        }
    }

    async fn produce(&self, outcome: Outcome) {
        let result = self.result(&outcome);
        let metrics = &self.offsets.metrics;
        let mut backoff = reefline_common::Backoff::new();
        while let Err(e) = self.try_produce(&result).await {
            tracing::warn!(request_id = %result.request_id, error = %e, "producing the result failed; retrying");
            backoff.wait().await;
        }
        let outcome_label = result.error_kind.as_deref().unwrap_or("ok");
        metrics.results.with_label_values(&[outcome_label]).inc();
        let e2e = (result.completed_at_ms - result.submitted_at_ms).max(0) as f64 / 1000.0;
        metrics.end_to_end_seconds.observe(e2e);
        tracing::debug!(request_id = %result.request_id, status = result.status.as_str(), "result produced");
        self.offsets.finish(outcome.job.partition, outcome.job.offset);
    }

    async fn try_produce(&self, result: &ClassificationResult) -> anyhow::Result<()> {
        let payload = self.codec.encode(&self.topic, result).await?;
        let headers =
            OwnedHeaders::new().insert(Header { key: "reefline-request-id", value: Some(result.request_id.as_str()) });
        let record = FutureRecord::to(&self.topic).key(result.request_id.as_str()).payload(&payload).headers(headers);
        self.producer.send(record, Duration::from_secs(5)).await.map_err(|(e, _)| e)?;
        Ok(())
    }
}
