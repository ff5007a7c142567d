//! Stage 1, consume: read requests from Kafka, decode them and hand them to the pipeline, each
//! offset tracked (`offsets.rs`) so that it is stored only once the result for it and everything
//! before it on the partition is acknowledged.

use std::pin::Pin;
use std::time::{Duration, Instant};

use rdkafka::message::{BorrowedMessage, Message};
use reefline_common::producer::FutureProducer;
use reefline_schemas::{Codec, CodecError, ImageRequest};
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;

use crate::deliveries::Mode;
use crate::job::Job;
use crate::metrics::Metrics;
use crate::offsets::{Backlog, Offsets};
use reefline_common::kafka::Lane;

/// How long a full pipeline may hold the next request before the partitions are paused (under a
/// steady backlog a batch frees room every ~100 ms). Pausing
/// makes librdkafka drop what it has prefetched and fetch it again on resume, so it is kept for a
/// real stall: pausing whenever the pipeline was momentarily full (under a backlog, at almost
/// every request) made the broker read the same records over and over, and each resume waited
/// for a fetch already in flight.
const PAUSE_AFTER: Duration = Duration::from_millis(250);

/// What one lane's consume stage needs.
pub struct Consume {
    pub lane: Lane,
    pub offsets: Offsets,
    pub metrics: Metrics,
    pub codec: Codec,
    pub producer: FutureProducer,
    pub dead_letter_topic: String,
    pub max_url_bytes: usize,
    pub tenants: reefline_common::tenant::TenantSeal,
}

/// Reads until `shutdown` fires, sending decoded requests to `jobs` and poison records to the
/// dead-letter topic. When `jobs` stays full for [`PAUSE_AFTER`] the assigned partitions are
/// paused — the consumer keeps polling, so the group does not think it dead — and resumed once
/// the requests held back have been handed over. Until then librdkafka's own prefetch, bounded by
/// `KAFKA_PREFETCH_KBYTES`, holds what is waiting.
pub async fn run(consume: Consume, jobs: mpsc::Sender<Job>, shutdown: impl Future<Output = ()>) {
    let reader = Reader { consume, jobs };
    tokio::pin!(shutdown);
    let mut paused = false;
    loop {
        let message = match reader.next_message(&mut paused, shutdown.as_mut()).await {
            Next::Message(message) => message,
            Next::Again => continue,
            Next::Stop => return,
        };
        if reader.take(&message, shutdown.as_mut()).await.is_err() {
            return;
        }
    }
}

/// One lane's reading: what [`run`] reads with, and where it hands requests on.
struct Reader {
    consume: Consume,
    jobs: mpsc::Sender<Job>,
}

/// What the read loop does next.
enum Next<'a> {
    Message(BorrowedMessage<'a>),
    /// A request held back was handed on, or the consumer erred: look again.
    Again,
    /// Told to stop, or the pipeline is gone.
    Stop,
}

/// Reading stops: told to, or the pipeline is gone.
struct Stop;

impl Reader {
    fn set_paused(&self, paused: bool) {
        self.consume.offsets.set_paused(paused);
        if paused {
            self.consume.metrics.pauses.inc();
        }
        self.consume.metrics.paused.set(i64::from(paused));
    }

    /// Hands the requests held back on, pausing the partitions while the pipeline stays full for
    /// [`PAUSE_AFTER`], and reads the next record.
    async fn next_message(&self, paused: &mut bool, mut shutdown: Pin<&mut impl Future<Output = ()>>) -> Next<'_> {
        let (backlog, jobs) = (&self.consume.offsets.backlog, &self.jobs);
        if hand_over(backlog, jobs).is_err() {
            return Next::Stop;
        }
        if backlog.is_empty() && *paused {
            *paused = false;
            self.set_paused(false);
        }
        if !backlog.is_empty() && !*paused {
            tokio::select! {
                () = &mut shutdown => return Next::Stop,
                permit = jobs.reserve() => return send_held(permit, backlog),
                () = tokio::time::sleep(PAUSE_AFTER) => {
                    *paused = true;
                    self.set_paused(true);
                }
            }
        }
        let message = tokio::select! {
            () = &mut shutdown => return Next::Stop,
            permit = jobs.reserve(), if *paused => return send_held(permit, backlog),
            m = self.consume.offsets.consumer.recv() => m,
        };
        match message {
            Ok(message) => {
                if *paused {
                    // Fetched before the pause, or from a partition assigned since: pause that one too.
                    self.set_paused(true);
                }
                Next::Message(message)
            }
            Err(e) => {
                tracing::warn!(error = %e, "consumer error");
                Next::Again
            }
        }
    }

    /// Takes a record: tracks its offset, takes it alone after an unclean handover (or moves it
    /// aside, tried too often), then hands its request on or moves it to the dead-letter topic.
    async fn take(
        &self,
        message: &BorrowedMessage<'_>,
        mut shutdown: Pin<&mut impl Future<Output = ()>>,
    ) -> Result<(), Stop> {
        let Consume { lane, offsets, metrics, producer, dead_letter_topic, .. } = &self.consume;
        let (partition, offset, read_at) = (message.partition(), message.offset(), Instant::now());
        offsets.start(partition, offset);
        record_broker_wait(metrics, *lane, message);
        let (alone, crashed) = self.careful(message, shutdown.as_mut()).await?;
        // Waiting out a registry or broker outage here must not hold up a stop: what is not
        // finished is not committed, so it is read again after a restart.
        let checked = tokio::select! {
            () = &mut shutdown => return self.stopped(message),
            checked = self.check(message) => checked,
        };
        match checked {
            Ok(request) => {
                let span = job_span(&request, message);
                let (lane, photo, slot, lap_at) = (*lane, None, None, read_at);
                offsets.backlog.push_back(Job { request, lane, partition, offset, photo, crashed, span, slot, lap_at });
                if alone {
                    // Nothing else is taken until it is finished.
                    tokio::select! {
                        () = &mut shutdown => return self.stopped(message),
                        idle = idle(offsets, &offsets.backlog, &self.jobs, 0) => idle.map_err(|()| Stop)?,
                    }
                    offsets.deliveries.finished(partition, offset).await;
                }
            }
            Err((kind, reason)) => {
                let moved =
                    reefline_common::kafka::dead_letter(producer, dead_letter_topic, message.into(), kind, &reason);
                tokio::select! {
                    () = &mut shutdown => return Err(Stop),
                    () = moved => {}
                }
                metrics.dead_letters.with_label_values(&[kind]).inc();
                offsets.finish(partition, offset);
            }
        }
        Ok(())
    }

    /// Stops reading with `message` unfinished: its offset is forgotten, for the next owner to read.
    fn stopped<T>(&self, message: &BorrowedMessage<'_>) -> Result<T, Stop> {
        self.consume.offsets.forget(message.partition(), message.offset());
        Err(Stop)
    }

    /// After a partition's last owner stopped mid-way, its next requests are taken alone and
    /// counted: one that was tried alone `DELIVERY_LIMIT` times is moved aside, for an operator to
    /// replay once it is fixed, and failed with its reason as a result, so that its batch
    /// completes. Whether this one is taken alone, and the tries it was moved aside after.
    async fn careful(
        &self,
        message: &BorrowedMessage<'_>,
        mut shutdown: Pin<&mut impl Future<Output = ()>>,
    ) -> Result<(bool, Option<u32>), Stop> {
        let Consume { offsets, metrics, producer, dead_letter_topic, .. } = &self.consume;
        let (partition, offset) = (message.partition(), message.offset());
        if offsets.deliveries.limit() == 0 || !matches!(offsets.mode(partition, offset).await, Mode::Careful { .. }) {
            return Ok((false, None));
        }
        tokio::select! {
            () = &mut shutdown => return self.stopped(message),
            idle = idle(offsets, &offsets.backlog, &self.jobs, 1) => idle.map_err(|()| Stop)?,
        }
        let limit = offsets.deliveries.limit();
        match offsets.deliveries.try_once(partition, offset).await {
            Some(tries) if tries > limit => {
                let reason = crate::error::ImageError::CrashLoop { tries: limit }.to_string();
                tracing::warn!(partition, offset, "{reason}");
                let moved = reefline_common::kafka::dead_letter(
                    producer,
                    dead_letter_topic,
                    message.into(),
                    "crash_loop",
                    &reason,
                );
                tokio::select! {
                    () = &mut shutdown => return self.stopped(message),
                    () = moved => {}
                }
                metrics.dead_letters.with_label_values(&["crash_loop"]).inc();
                Ok((false, Some(limit)))
            }
            _ => Ok((true, None)),
        }
    }

    /// The request a record holds, or why it is moved aside: it does not decode, or decodes to a
    /// request no ingest would have accepted (a NUL in its URL, ids that are not UUIDs, ...), or
    /// claims a tenant without ingest's seal (no claim: the topic's tenant). A registry away is
    /// waited out.
    async fn check(&self, message: &BorrowedMessage<'_>) -> Result<ImageRequest, (&'static str, String)> {
        let Consume { codec, max_url_bytes, tenants, .. } = &self.consume;
        let decoded = reefline_common::retry_transient("schema registry", CodecError::is_transient, || {
            codec.decode::<ImageRequest>(message.payload())
        })
        .await;
        let mut request = decoded.map_err(|e| (e.kind(), e.to_string()))?;
        request.check(*max_url_bytes).map_err(|reason| ("invalid_request", reason))?;
        let tenant = tenants
            .tenant_of(request.tenant.as_deref(), &request.request_id, message.headers())
            .map_err(|reason| ("unsealed_tenant", reason))?;
        request.tenant = Some(tenant);
        Ok(request)
    }
}

/// Hands the oldest request held back on, through `permit`; stops when the pipeline is gone.
fn send_held<'a>(permit: Result<mpsc::Permit<'_, Job>, mpsc::error::SendError<()>>, backlog: &Backlog) -> Next<'a> {
    match (permit, backlog.pop_front()) {
        (Ok(permit), Some(job)) => {
            permit.send(job);
            Next::Again
        }
        _ => Next::Stop,
    }
}

/// How long a record waited between its producer and this read (the produce linger, the broker,
/// the consumer's fetch and any backlog ahead of it), by the broker's timestamp.
fn record_broker_wait(metrics: &Metrics, lane: Lane, message: &rdkafka::message::BorrowedMessage<'_>) {
    if let Some(created) = message.timestamp().to_millis() {
        let waited = (chrono::Utc::now().timestamp_millis() - created).max(0) as f64 / 1000.0;
        metrics.stage_seconds.with_label_values(&["broker", lane.as_str()]).observe(waited);
    }
}

/// A request's `classify` span, continuing the trace its record carries.
fn job_span(request: &ImageRequest, message: &rdkafka::message::BorrowedMessage<'_>) -> tracing::Span {
    let span = tracing::info_span!(
        "classify",
        request_id = %request.request_id,
        batch_id = %request.batch_id,
        partition = message.partition(),
        offset = message.offset(),
    );
    reefline_common::telemetry::continue_from(&span, message.headers());
    span
}

/// Hands the backlog to the pipeline while it has room; `Err` when the pipeline is gone.
fn hand_over(backlog: &Backlog, jobs: &mpsc::Sender<Job>) -> Result<(), ()> {
    while let Some(job) = backlog.pop_front() {
        match jobs.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(job)) => {
                backlog.push_front(job);
                break;
            }
            Err(TrySendError::Closed(_)) => return Err(()),
        }
    }
    Ok(())
}

/// Waits until at most `left` requests taken are unfinished, handing the backlog over meanwhile.
async fn idle(offsets: &Offsets, backlog: &Backlog, jobs: &mpsc::Sender<Job>, left: usize) -> Result<(), ()> {
    loop {
        hand_over(backlog, jobs)?;
        if offsets.unfinished() <= left {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
