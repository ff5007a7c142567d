//! Answers in the same call: a submission that asks to wait is answered with its results once
//! they are all in, read from the results topic.
//!
//! Every ingest instance reads every partition of the results topic, outside any consumer group,
//! from the end each partition had when the instance started. So whichever instance holds a
//! waiting submission sees its results, behind any load balancer and wherever the classifiers
//! run, and nothing is committed or shared. A submission is registered before its records are
//! produced, so none of its results can pass unseen. Waiting holds no thread and no database
//! connection: an entry in a map and a channel. Results of batches nobody here waits for are
//! skipped by their `reefline-batch-id` header, without being decoded.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use reefline_common::kafka::KafkaSettings;
use reefline_schemas::{BATCH_ID_HEADER, ClassificationResult, Codec};
use tokio::sync::oneshot;

/// The submissions waiting for their results.
pub struct Waiters {
    batches: Mutex<HashMap<String, Waiting>>,
    waiting: prometheus::IntGauge,
}

/// One waiting submission: its request ids in order, and the results in so far.
struct Waiting {
    request_ids: Vec<String>,
    results: Vec<Option<ClassificationResult>>,
    remaining: usize,
    done: Option<oneshot::Sender<()>>,
}

/// A submission's place among the waiters; leaving it (an answer, an error, a client that hung
/// up) removes it.
pub struct Registration<'a> {
    waiters: &'a Waiters,
    batch_id: String,
    done: Option<oneshot::Receiver<()>>,
    registered: bool,
}

impl Waiters {
    pub fn new(waiting: prometheus::IntGauge) -> Self {
        Self { batches: Mutex::default(), waiting }
    }

    /// Registers batch `batch_id` with its request ids, before any of its records is produced.
    pub fn register(&self, batch_id: &str, request_ids: Vec<String>) -> Registration<'_> {
        let (tx, rx) = oneshot::channel();
        let waiting = Waiting {
            results: vec![None; request_ids.len()],
            remaining: request_ids.len(),
            request_ids,
            done: Some(tx),
        };
        let mut batches = self.batches.lock().expect("waiters lock");
        batches.insert(batch_id.to_owned(), waiting);
        self.waiting.set(batches.len() as i64);
        Registration { waiters: self, batch_id: batch_id.to_owned(), done: Some(rx), registered: true }
    }

    fn is_waiting_for(&self, batch_id: &str) -> bool {
        self.batches.lock().expect("waiters lock").contains_key(batch_id)
    }

    fn is_empty(&self) -> bool {
        self.batches.lock().expect("waiters lock").is_empty()
    }

    /// Takes in one result: kept when it belongs to a waiting submission (a repeated one replaces
    /// the first by the sink's rule), and the submission told when it was the last one missing.
    fn deliver(&self, result: ClassificationResult) {
        let mut batches = self.batches.lock().expect("waiters lock");
        let Some(waiting) = batches.get_mut(&result.batch_id) else { return };
        let Ok(index) = usize::try_from(result.batch_index) else { return };
        if waiting.request_ids.get(index) != Some(&result.request_id) {
            return;
        }
        match &mut waiting.results[index] {
            Some(old) if old.is_replaced_by(&result) => *old = result,
            Some(_) => {}
            slot @ None => {
                *slot = Some(result);
                waiting.remaining -= 1;
                if waiting.remaining == 0
                    && let Some(done) = waiting.done.take()
                {
                    let _ = done.send(());
                }
            }
        }
    }
}

impl Registration<'_> {
    /// Waits up to `timeout` for every result; then the results in so far, in submission order
    /// (all of them when it did not time out).
    pub async fn finish(mut self, timeout: Duration) -> Vec<ClassificationResult> {
        if let Some(done) = self.done.take() {
            let _ = tokio::time::timeout(timeout, done).await;
        }
        self.leave().map(|w| w.results.into_iter().flatten().collect()).unwrap_or_default()
    }

    fn leave(&mut self) -> Option<Waiting> {
        if !std::mem::take(&mut self.registered) {
            return None;
        }
        let mut batches = self.waiters.batches.lock().expect("waiters lock");
        let waiting = batches.remove(&self.batch_id);
        self.waiters.waiting.set(batches.len() as i64);
        waiting
    }
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        self.leave();
    }
}

/// A consumer of every partition of `topic` from its current end, in no consumer group.
pub async fn results_consumer(kafka: &KafkaSettings, topic: &str) -> anyhow::Result<StreamConsumer> {
    let mut config = kafka.client_config();
    config
        // Only for librdkafka's sake: assigned partitions join no group and commit nothing.
        .set("group.id", "reefline-ingest-waiters")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        // The broker answers a fetch as soon as a result arrives: a long wait only spares it idle
        // fetches, as for every consumer of the pipeline.
        .set("fetch.wait.max.ms", kafka.consumer_fetch_wait_ms.to_string());
    let topic = topic.to_owned();
    // The ends are read before any submission is taken: every result produced after them is seen.
    tokio::task::spawn_blocking(move || -> anyhow::Result<StreamConsumer> {
        let consumer: StreamConsumer = config.create()?;
        let timeout = Duration::from_secs(10);
        let metadata = consumer.fetch_metadata(Some(&topic), timeout)?;
        let partitions = metadata.topics().first().map(|t| t.partitions().len()).unwrap_or(0);
        anyhow::ensure!(partitions > 0, "the results topic `{topic}` has no partitions");
        let mut list = TopicPartitionList::new();
        for partition in 0..partitions as i32 {
            let (_, high) = consumer.fetch_watermarks(&topic, partition, timeout)?;
            list.add_partition_offset(&topic, partition, Offset::Offset(high))?;
        }
        consumer.assign(&list)?;
        Ok(consumer)
    })
    .await?
}

/// Reads results for the waiters until the task is stopped.
pub async fn follow(consumer: StreamConsumer, codec: Codec, waiters: Arc<Waiters>) {
    let mut stream = consumer.stream();
    while let Some(message) = stream.next().await {
        let message = match message {
            Ok(message) => message,
            Err(e) => {
                tracing::warn!(error = %e, "reading results for waiting submissions");
                continue;
            }
        };
        let batch_id = message
            .headers()
            .and_then(|h| h.iter().find(|h| h.key == BATCH_ID_HEADER))
            .and_then(|h| h.value)
            .and_then(|v| std::str::from_utf8(v).ok());
        let wanted = match batch_id {
            Some(batch_id) => waiters.is_waiting_for(batch_id),
            // A producer that sets no header (an older classifier): decoded while anyone waits.
            None => !waiters.is_empty(),
        };
        if !wanted {
            continue;
        }
        match codec.decode::<ClassificationResult>(message.payload()).await {
            Ok(result) => waiters.deliver(result),
            Err(e) => tracing::debug!(error = %e, "a result record that does not decode (the sink dead-letters it)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reefline_schemas::Status;

    fn result(batch: &str, index: i32, status: Status, completed_at_ms: i64) -> ClassificationResult {
        ClassificationResult {
            request_id: format!("{batch}-{index}"),
            batch_id: batch.into(),
            batch_index: index,
            batch_size: 2,
            url: "https://example.org/a.jpg".into(),
            status,
            model_name: "m".into(),
            model_version: "v".into(),
            submitted_at_ms: 0,
            completed_at_ms,
            ..Default::default()
        }
    }

    fn waiters() -> Waiters {
        Waiters::new(prometheus::IntGauge::new("waiting", "waiting").unwrap())
    }

    #[tokio::test]
    async fn a_submission_gets_its_results_in_order_once_all_are_in() {
        let waiters = waiters();
        let registration = waiters.register("b", vec!["b-0".into(), "b-1".into()]);
        waiters.deliver(result("b", 1, Status::Ok, 5));
        waiters.deliver(result("other", 0, Status::Ok, 5));
        waiters.deliver(result("b", 0, Status::Error, 5));
        // A repeat that ends better replaces the first; one that ends worse does not.
        waiters.deliver(result("b", 0, Status::Ok, 6));
        waiters.deliver(result("b", 1, Status::Error, 7));
        let results = registration.finish(Duration::from_secs(60)).await;
        let got: Vec<_> = results.iter().map(|r| (r.request_id.as_str(), r.status)).collect();
        assert_eq!(got, [("b-0", Status::Ok), ("b-1", Status::Ok)]);
        assert!(waiters.is_empty());
    }

    #[tokio::test]
    async fn a_submission_that_times_out_gets_what_is_in_and_leaves() {
        let waiters = waiters();
        let registration = waiters.register("b", vec!["b-0".into(), "b-1".into()]);
        waiters.deliver(result("b", 1, Status::Ok, 5));
        // A result whose request id is not the one given at that place is someone else's.
        let mut stranger = result("b", 0, Status::Ok, 5);
        stranger.request_id = "x".into();
        waiters.deliver(stranger);
        let results = registration.finish(Duration::from_millis(1)).await;
        assert_eq!(results.iter().map(|r| r.batch_index).collect::<Vec<_>>(), [1]);
        assert!(waiters.is_empty());
        drop(waiters.register("c", vec!["c-0".into()]));
        assert!(waiters.is_empty(), "a client that hangs up leaves no entry behind");
    }
}
