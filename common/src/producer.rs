//! A Kafka producer with rdkafka's `FutureProducer` interface whose delivery reports are served
//! by a thread that blocks on them a second at a time.
//!
//! rdkafka 0.39's `FutureProducer` polls every 100 ms with a deadline whose last millisecond
//! rounds down to a zero timeout, so its thread spins for about a millisecond in every hundred:
//! 1 % of a core per producer with nothing to do, the largest part of an idle stack's CPU. Polling
//! for a second at a time makes that 0.1 %. Delivery reports still arrive as soon as librdkafka
//! has them: the thread is woken by each one.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rdkafka::ClientContext;
use rdkafka::client::Client;
use rdkafka::config::{ClientConfig, FromClientConfig};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::{Message, OwnedMessage, Timestamp, ToBytes};
use rdkafka::producer::future_producer::{Delivery, OwnedDeliveryResult};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, FutureRecord, Producer as _, ProducerContext};
use tokio::sync::oneshot;

/// How long the delivery thread blocks waiting for a report.
const POLL: Duration = Duration::from_secs(1);
/// How long `send` waits before trying a full queue again.
const QUEUE_FULL_RETRY: Duration = Duration::from_millis(100);

/// Hands each delivery report to the `send` waiting for it; logs as rdkafka's default context does.
pub struct Reports;

impl ClientContext for Reports {}

impl ProducerContext for Reports {
    type DeliveryOpaque = Box<oneshot::Sender<OwnedDeliveryResult>>;

    fn delivery(&self, result: &DeliveryResult<'_>, waiting: Self::DeliveryOpaque) {
        let owned = match result {
            Ok(message) => Ok(Delivery {
                partition: message.partition(),
                offset: message.offset(),
                timestamp: message.timestamp(),
            }),
            Err((error, message)) => Err((error.clone(), message.detach())),
        };
        // The sender may have stopped waiting (a cancelled request); the record is delivered all the same.
        let _ = waiting.send(owned);
    }
}

/// A producer whose `send` resolves when the broker has acknowledged the record (or it failed).
/// Clones share one client.
#[derive(Clone)]
pub struct FutureProducer {
    inner: Arc<BaseProducer<Reports>>,
    _poller: Arc<Poller>,
}

/// Stops the delivery thread when the last clone of the producer goes.
struct Poller(Arc<AtomicBool>);

impl Drop for Poller {
    fn drop(&mut self) {
        // The thread notices within a second and drops its handle to the client.
        self.0.store(true, Ordering::Relaxed);
    }
}

impl FromClientConfig for FutureProducer {
    fn from_config(config: &ClientConfig) -> KafkaResult<Self> {
        use rdkafka::config::FromClientConfigAndContext;
        let inner = Arc::new(BaseProducer::from_config_and_context(config, Reports)?);
        let stop = Arc::new(AtomicBool::new(false));
        let (producer, stopped) = (inner.clone(), stop.clone());
        std::thread::Builder::new()
            .name("kafka-deliveries".into())
            .spawn(move || {
                while !stopped.load(Ordering::Relaxed) {
                    producer.poll(POLL);
                }
            })
            .map_err(|e| KafkaError::ClientCreation(format!("starting the delivery thread: {e}")))?;
        Ok(Self { inner, _poller: Arc::new(Poller(stop)) })
    }
}

impl FutureProducer {
    /// Queues `record` and waits for the broker's answer. While the queue is full it tries again
    /// until `queue_timeout` has passed (`Duration::ZERO`: not at all), as rdkafka's does.
    // The error carries the record back, as rdkafka's own `FutureProducer::send` does.
    #[allow(clippy::result_large_err)]
    pub async fn send<K, P>(&self, record: FutureRecord<'_, K, P>, queue_timeout: Duration) -> OwnedDeliveryResult
    where
        K: ToBytes + ?Sized,
        P: ToBytes + ?Sized,
    {
        let started = Instant::now();
        let topic = record.topic;
        let (tx, rx) = oneshot::channel();
        let mut base = BaseRecord::with_opaque_to(record.topic, Box::new(tx));
        base.partition = record.partition;
        base.payload = record.payload;
        base.key = record.key;
        base.timestamp = record.timestamp;
        base.headers = record.headers;
        loop {
            match self.inner.send(base) {
                Ok(()) => {
                    // Every queued record gets a report, if only the purge's when the client closes.
                    return rx.await.unwrap_or_else(|_| {
                        let message =
                            OwnedMessage::new(None, None, topic.to_owned(), Timestamp::NotAvailable, -1, 0, None);
                        Err((KafkaError::Canceled, message))
                    });
                }
                Err((e, again))
                    if e == KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull)
                        && started.elapsed() < queue_timeout =>
                {
                    base = again;
                    tokio::time::sleep(QUEUE_FULL_RETRY).await;
                }
                Err((e, failed)) => {
                    let message = OwnedMessage::new(
                        failed.payload.map(|p| p.to_bytes().to_vec()),
                        failed.key.map(|k| k.to_bytes().to_vec()),
                        failed.topic.to_owned(),
                        failed.timestamp.map_or(Timestamp::NotAvailable, Timestamp::CreateTime),
                        failed.partition.unwrap_or(-1),
                        0,
                        failed.headers,
                    );
                    return Err((e, message));
                }
            }
        }
    }

    /// The underlying client (metadata requests).
    pub fn client(&self) -> &Client<Reports> {
        self.inner.client()
    }

    /// Whether the broker answers a metadata request for `topic` within 2 s (for `/readyz`).
    pub async fn broker_answers(&self, topic: &str) -> bool {
        let (producer, topic) = (self.clone(), topic.to_owned());
        tokio::task::spawn_blocking(move || {
            producer.client().fetch_metadata(Some(&topic), Duration::from_secs(2)).is_ok()
        })
        .await
        .unwrap_or(false)
    }

    /// Waits until every queued record has been delivered or `timeout` has passed.
    pub fn flush(&self, timeout: Duration) -> KafkaResult<()> {
        self.inner.flush(timeout)
    }
}
