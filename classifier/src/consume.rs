//! Stage 1, consume: read requests from Kafka, decode them, track their offsets, and store an
//! offset only once the result for it and everything before it on the partition is acknowledged.

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use reefline_common::producer::FutureProducer;
use reefline_schemas::{Codec, CodecError, ImageRequest};
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;

use crate::deliveries::{Deliveries, Mode};
use crate::job::Job;
use crate::metrics::Metrics;
use crate::offsets::OffsetTracker;
use reefline_common::kafka::Lane;

/// Requests read and decoded but not yet handed to the pipeline (it was full), oldest first.
/// Shared with the rebalance callback, which takes back those of revoked partitions.
#[derive(Clone, Default)]
pub struct Backlog(Arc<Mutex<VecDeque<Job>>>);

impl Backlog {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Job>> {
        self.0.lock().expect("backlog lock")
    }
    fn pop_front(&self) -> Option<Job> {
        self.lock().pop_front()
    }
    fn push_front(&self, job: Job) {
        self.lock().push_front(job);
    }
    fn push_back(&self, job: Job) {
        self.lock().push_back(job);
    }
    fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }
}

/// Longest a rebalance waits for the revoked partitions' requests in flight to be finished. The
/// pipeline finishes them in about its depth divided by its rate (a few seconds; more on a loaded
/// machine); librdkafka keeps heartbeating meanwhile, and the group waits for this member up to
/// `max.poll.interval.ms` (5 minutes).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);

/// Longest wait for the delivery ledger to record a clean handover.
const HANDOVER_TIMEOUT: Duration = Duration::from_secs(10);

/// How each partition's requests are taken, from its first request since it was assigned here
/// (forgotten when it is revoked).
pub type Modes = Arc<Mutex<HashMap<i32, Mode>>>;

/// Consumer callbacks: hand revoked partitions over cleanly.
pub struct Context {
    pub tracker: Arc<Mutex<OffsetTracker>>,
    pub backlog: Backlog,
    pub lag: reefline_common::kafka::LagGauge,
    pub modes: Modes,
    pub deliveries: Deliveries,
}

impl Context {
    /// Drains the revoked partitions before they go, as vector's Kafka source does: requests not
    /// yet handed to the pipeline are dropped (nothing was produced for them; the next owner
    /// reads them), those in the pipeline are waited for (at most [`DRAIN_TIMEOUT`]) until their
    /// results are acknowledged and their offsets stored, and the offsets are committed, so the
    /// next owner starts exactly after the last result produced here and redoes nothing.
    fn drain(&self, consumer: &BaseConsumer<Self>, topic: &str, revoked: &[i32]) {
        let dropped = {
            let mut backlog = self.backlog.lock();
            let before = backlog.len();
            let mut tracker = self.tracker.lock().expect("offset tracker lock");
            backlog.retain(|job| {
                let keep = !revoked.contains(&job.partition);
                if !keep {
                    tracker.forget(job.partition, job.offset);
                }
                keep
            });
            before - backlog.len()
        };
        let in_flight = || {
            let tracker = self.tracker.lock().expect("offset tracker lock");
            revoked.iter().map(|p| tracker.in_flight_on(*p)).sum::<usize>()
        };
        let started = std::time::Instant::now();
        let wait = || {
            while in_flight() > 0 && started.elapsed() < DRAIN_TIMEOUT {
                std::thread::sleep(Duration::from_millis(5));
            }
        };
        // This runs inside the consume task's poll: let the runtime move its other tasks away.
        match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
            Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(wait),
            _ => wait(),
        }
        let left = in_flight();
        // Each revoked partition is committed where the tracker says it stands (past every
        // request finished here in order), whatever librdkafka last had stored. Nothing more
        // starts on them (this runs in the consume task's poll), so that stays put meanwhile.
        let clean: Vec<(i32, i64)> = {
            let tracker = self.tracker.lock().expect("offset tracker lock");
            tracker.next_offsets().into_iter().filter(|(p, _)| revoked.contains(p)).collect()
        };
        let mut offsets = TopicPartitionList::new();
        for (partition, offset) in &clean {
            let _ = offsets.add_partition_offset(topic, *partition, Offset::Offset(*offset));
        }
        let committed = offsets.count() == 0
            || match consumer.commit(&offsets, rdkafka::consumer::CommitMode::Sync) {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(error = %e, "commit before handing partitions over failed");
                    false
                }
            };
        {
            let mut tracker = self.tracker.lock().expect("offset tracker lock");
            let mut modes = self.modes.lock().expect("modes lock");
            for partition in revoked {
                tracker.revoke(*partition);
                modes.remove(partition);
            }
        }
        // A clean handover is recorded, so that the next owner takes the partitions as usual.
        let flavor = tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor());
        // Written by a task of its own and waited for at most HANDOVER_TIMEOUT: a consumer dropped
        // while its runtime shuts down (a service stopped by a panic) revokes its partitions here
        // too, and a runtime that is shutting down never runs the task (the wait ends at once)
        // where blocking on the write itself would wait forever.
        if committed && left == 0 && matches!(flavor, Ok(tokio::runtime::RuntimeFlavor::MultiThread)) {
            let (done_tx, done_rx) = std::sync::mpsc::sync_channel(1);
            let deliveries = self.deliveries.clone();
            tokio::runtime::Handle::current().spawn(async move {
                deliveries.handed_over(&clean).await;
                let _ = done_tx.send(());
            });
            if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                tokio::task::block_in_place(|| done_rx.recv_timeout(HANDOVER_TIMEOUT))
            {
                tracing::warn!("the delivery ledger took too long to record a clean handover");
            }
        }
        tracing::info!(
            partitions = revoked.len(),
            dropped,
            unfinished = left,
            took_ms = started.elapsed().as_millis() as u64,
            "partitions drained and handed over"
        );
    }
}

impl ClientContext for Context {
    fn stats(&self, statistics: rdkafka::statistics::Statistics) {
        self.lag.record(&statistics);
    }
}

impl ConsumerContext for Context {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(tpl) => {
                let elements = tpl.elements();
                let revoked: Vec<i32> = elements.iter().map(|e| e.partition()).collect();
                if let Some(topic) = elements.first().map(|e| e.topic()) {
                    self.drain(consumer, topic, &revoked);
                }
                // A partition given up while paused (the pipeline was full) is resumed first: a
                // cooperative rebalance whose revoked partitions stay paused was seen never to
                // hand them over (the next owner got them only once this member was dropped from
                // the group for not polling, and redid what it had finished).
                if let Err(e) = consumer.resume(tpl) {
                    tracing::debug!(error = %e, "could not resume the partitions given up");
                }
            }
            Rebalance::Assign(tpl) => tracing::info!(partitions = tpl.count(), "partitions assigned"),
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance error"),
        }
    }
}

pub type RequestConsumer = StreamConsumer<Context>;

/// How long a full pipeline may hold the next request before the partitions are paused (under a
/// steady backlog a batch frees room every ~100 ms). Pausing
/// makes librdkafka drop what it has prefetched and fetch it again on resume, so it is kept for a
/// real stall: pausing whenever the pipeline was momentarily full (under a backlog, at almost
/// every request) made the broker read the same records over and over, and each resume waited
/// for a fetch already in flight.
const PAUSE_AFTER: Duration = Duration::from_millis(250);

/// Marks requests done and stores the offsets that may now be committed.
#[derive(Clone)]
pub struct Offsets {
    pub consumer: Arc<RequestConsumer>,
    pub backlog: Backlog,
    pub tracker: Arc<Mutex<OffsetTracker>>,
    pub topic: String,
    pub modes: Modes,
    pub deliveries: Deliveries,
}

impl Offsets {
    fn start(&self, partition: i32, offset: i64) {
        self.tracker.lock().expect("offset tracker lock").start(partition, offset);
    }

    /// A request read but left when the classifier stops, before the pipeline had it: the next
    /// owner reads it.
    fn forget(&self, partition: i32, offset: i64) {
        self.tracker.lock().expect("offset tracker lock").forget(partition, offset);
    }

    fn unfinished(&self) -> usize {
        self.tracker.lock().expect("offset tracker lock").unfinished()
    }

    /// How the request at `offset` is to be taken: a partition's first request since it was
    /// assigned asks the delivery ledger.
    async fn mode(&self, partition: i32, offset: i64) -> Mode {
        let known = self.modes.lock().expect("modes lock").get(&partition).copied();
        let mode = match known {
            Some(mode) => mode,
            None => self.deliveries.assigned(partition, offset).await,
        };
        let mode = match mode {
            Mode::Careful { until } if offset >= until => Mode::Normal,
            mode => mode,
        };
        self.modes.lock().expect("modes lock").insert(partition, mode);
        mode
    }

    /// Records a clean handover of every partition taken, when nothing taken is unfinished and
    /// the offsets are committed (a stop).
    pub async fn hand_over_cleanly(&self) {
        // Requests read but never handed to the pipeline are the next owner's to read.
        let unsent: Vec<Job> = self.backlog.lock().drain(..).collect();
        let clean = {
            let mut tracker = self.tracker.lock().expect("offset tracker lock");
            for job in unsent {
                tracker.forget(job.partition, job.offset);
            }
            if tracker.unfinished() > 0 {
                return;
            }
            tracker.next_offsets()
        };
        self.deliveries.handed_over(&clean).await;
    }

    /// Pauses or resumes every assigned partition.
    fn set_paused(&self, paused: bool) {
        let result = self
            .consumer
            .assignment()
            .and_then(|tpl| if paused { self.consumer.pause(&tpl) } else { self.consumer.resume(&tpl) });
        if let Err(e) = result {
            tracing::warn!(error = %e, paused, "could not pause or resume partitions");
        }
    }

    /// The result for `offset` is acknowledged.
    ///
    /// The offset is stored while the tracker is held: results are acknowledged on many tasks at
    /// once, and storing after letting go let an older offset be stored after a newer one (the
    /// stored offset moved back) and let a rebalance's drain see nothing in flight and commit
    /// before the last offset was stored (its successor redid up to a batch).
    pub fn finish(&self, partition: i32, offset: i64) {
        let mut tracker = self.tracker.lock().expect("offset tracker lock");
        if let Some(next) = tracker.finish(partition, offset) {
            let mut tpl = TopicPartitionList::new();
            if tpl.add_partition_offset(&self.topic, partition, Offset::Offset(next)).is_ok()
                && let Err(e) = self.consumer.store_offsets(&tpl)
            {
                // The partition was revoked meanwhile; its new owner will redo what is not committed.
                tracing::debug!(partition, next, error = %e, "offset not stored");
            }
        }
    }
}

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

/// Each lane's offsets.
#[derive(Clone)]
pub struct Lanes {
    pub interactive: Offsets,
    pub bulk: Offsets,
}

impl Lanes {
    pub fn get(&self, lane: Lane) -> &Offsets {
        match lane {
            Lane::Interactive => &self.interactive,
            Lane::Bulk => &self.bulk,
        }
    }
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
