//! Each lane's consumer and what it has taken, shared by the stages that read requests (consume)
//! and acknowledge their results (produce): which offsets may be stored (a partition's offset
//! moves past a message only once it and every message before it have their results acknowledged
//! by the broker, [`OffsetTracker`]), the requests read but not yet in the pipeline, and the
//! consumer's rebalance callbacks, which hand revoked partitions over cleanly ([`Context`]).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use reefline_common::kafka::Lane;

use crate::deliveries::{Deliveries, Mode};
use crate::job::Job;

/// Messages in flight on one partition, in offset order, with whether each is finished.
#[derive(Default, Debug)]
pub struct PartitionOffsets {
    in_flight: BTreeMap<i64, bool>,
    /// The offset to store (next to read): the first message's until one is finished.
    next: Option<i64>,
}

impl PartitionOffsets {
    /// A message was taken from the partition.
    pub fn start(&mut self, offset: i64) {
        self.next.get_or_insert(offset);
        self.in_flight.insert(offset, false);
    }

    /// The offset stored (or, before anything is, where this owner began): where the partition
    /// stands once nothing is unfinished.
    pub fn next(&self) -> Option<i64> {
        self.next
    }

    /// A message's result is acknowledged; returns the offset to store (next to read), if it moved.
    pub fn finish(&mut self, offset: i64) -> Option<i64> {
        if let Some(done) = self.in_flight.get_mut(&offset) {
            *done = true;
        }
        let mut next = None;
        while let Some(entry) = self.in_flight.first_entry() {
            if !*entry.get() {
                break;
            }
            next = Some(entry.key() + 1);
            entry.remove();
        }
        if next.is_some() {
            self.next = next;
        }
        next
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Messages taken and not yet finished (finished ones wait here for those before them).
    pub fn unfinished(&self) -> usize {
        self.in_flight.values().filter(|done| !**done).count()
    }

    /// Forgets a message that will not be finished here (it was never handed to the pipeline);
    /// the stored offset never moves past it.
    pub fn forget(&mut self, offset: i64) {
        if self.in_flight.get(&offset) == Some(&false) {
            self.in_flight.remove(&offset);
        }
    }
}

/// Offsets for every assigned partition of one topic.
#[derive(Default, Debug)]
pub struct OffsetTracker {
    partitions: HashMap<i32, PartitionOffsets>,
}

impl OffsetTracker {
    pub fn start(&mut self, partition: i32, offset: i64) {
        self.partitions.entry(partition).or_default().start(offset);
    }

    pub fn finish(&mut self, partition: i32, offset: i64) -> Option<i64> {
        self.partitions.get_mut(&partition)?.finish(offset)
    }

    /// Forgets one message of a partition (see [`PartitionOffsets::forget`]).
    pub fn forget(&mut self, partition: i32, offset: i64) {
        if let Some(p) = self.partitions.get_mut(&partition) {
            p.forget(offset);
        }
    }

    /// Messages in flight on `partition`.
    pub fn in_flight_on(&self, partition: i32) -> usize {
        self.partitions.get(&partition).map_or(0, PartitionOffsets::in_flight)
    }

    /// Where each partition stands (see [`PartitionOffsets::next`]).
    pub fn next_offsets(&self) -> Vec<(i32, i64)> {
        self.partitions.iter().filter_map(|(p, offsets)| Some((*p, offsets.next()?))).collect()
    }

    /// Forgets a partition that was revoked.
    pub fn revoke(&mut self, partition: i32) {
        self.partitions.remove(&partition);
    }

    pub fn in_flight(&self) -> usize {
        self.partitions.values().map(PartitionOffsets::in_flight).sum()
    }

    /// Messages taken and not yet finished, on every partition.
    pub fn unfinished(&self) -> usize {
        self.partitions.values().map(PartitionOffsets::unfinished).sum()
    }
}

/// Requests read and decoded but not yet handed to the pipeline (it was full), oldest first.
/// Shared with the rebalance callback, which takes back those of revoked partitions.
#[derive(Clone, Default)]
pub struct Backlog(Arc<Mutex<VecDeque<Job>>>);

impl Backlog {
    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Job>> {
        self.0.lock().expect("backlog lock")
    }
    pub(crate) fn pop_front(&self) -> Option<Job> {
        self.lock().pop_front()
    }
    pub(crate) fn push_front(&self, job: Job) {
        self.lock().push_front(job);
    }
    pub(crate) fn push_back(&self, job: Job) {
        self.lock().push_back(job);
    }
    pub(crate) fn is_empty(&self) -> bool {
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
        let started = std::time::Instant::now();
        let dropped = self.drop_waiting(revoked);
        let left = self.wait_for_in_flight(revoked, started);
        let (clean, committed) = self.commit(consumer, topic, revoked);
        {
            let mut tracker = self.tracker.lock().expect("offset tracker lock");
            let mut modes = self.modes.lock().expect("modes lock");
            for partition in revoked {
                tracker.revoke(*partition);
                modes.remove(partition);
            }
        }
        if committed && left == 0 {
            self.record_handover(clean);
        }
        tracing::info!(
            partitions = revoked.len(),
            dropped,
            unfinished = left,
            took_ms = started.elapsed().as_millis() as u64,
            "partitions drained and handed over"
        );
    }

    /// Drops the revoked partitions' requests not yet handed to the pipeline; how many.
    fn drop_waiting(&self, revoked: &[i32]) -> usize {
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
    }

    /// Waits until the revoked partitions' requests in the pipeline are done, at most until
    /// [`DRAIN_TIMEOUT`] after `started`; how many are not.
    fn wait_for_in_flight(&self, revoked: &[i32], started: std::time::Instant) -> usize {
        let in_flight = || {
            let tracker = self.tracker.lock().expect("offset tracker lock");
            revoked.iter().map(|p| tracker.in_flight_on(*p)).sum::<usize>()
        };
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
        in_flight()
    }

    /// Commits each revoked partition where the tracker says it stands (past every request
    /// finished here in order), whatever librdkafka last had stored: those offsets, and whether
    /// the commit took. Nothing more starts on them (this runs in the consume task's poll), so
    /// that stays put meanwhile.
    fn commit(&self, consumer: &BaseConsumer<Self>, topic: &str, revoked: &[i32]) -> (Vec<(i32, i64)>, bool) {
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
        (clean, committed)
    }

    /// Records a clean handover of the partitions at `clean`, so that the next owner takes them
    /// as usual.
    fn record_handover(&self, clean: Vec<(i32, i64)>) {
        // Written by a task of its own and waited for at most HANDOVER_TIMEOUT: a consumer dropped
        // while its runtime shuts down (a service stopped by a panic) revokes its partitions here
        // too, and a runtime that is shutting down never runs the task (the wait ends at once)
        // where blocking on the write itself would wait forever.
        let flavor = tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor());
        if !matches!(flavor, Ok(tokio::runtime::RuntimeFlavor::MultiThread)) {
            return;
        }
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
    pub(crate) fn start(&self, partition: i32, offset: i64) {
        self.tracker.lock().expect("offset tracker lock").start(partition, offset);
    }

    /// A request read but left when the classifier stops, before the pipeline had it: the next
    /// owner reads it.
    pub(crate) fn forget(&self, partition: i32, offset: i64) {
        self.tracker.lock().expect("offset tracker lock").forget(partition, offset);
    }

    pub(crate) fn unfinished(&self) -> usize {
        self.tracker.lock().expect("offset tracker lock").unfinished()
    }

    /// How the request at `offset` is to be taken: a partition's first request since it was
    /// assigned asks the delivery ledger.
    pub(crate) async fn mode(&self, partition: i32, offset: i64) -> Mode {
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
    pub(crate) fn set_paused(&self, paused: bool) {
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

/// `classifier_in_flight`: requests taken from Kafka whose results are not yet acknowledged, read
/// from the offset tracker whenever the metrics are scraped (the tracker keeps no metrics).
pub struct InFlight {
    /// Each lane's.
    trackers: Vec<Arc<Mutex<OffsetTracker>>>,
    gauge: prometheus::IntGauge,
}

impl InFlight {
    pub fn register(
        registry: &prometheus::Registry,
        trackers: Vec<Arc<Mutex<OffsetTracker>>>,
    ) -> prometheus::Result<()> {
        let gauge = prometheus::IntGauge::new(
            "classifier_in_flight",
            "Requests taken from Kafka whose results are not yet acknowledged",
        )?;
        registry.register(Box::new(Self { trackers, gauge }))
    }
}

impl prometheus::core::Collector for InFlight {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        self.gauge.desc()
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        let unfinished: usize = self.trackers.iter().map(|t| t.lock().map_or(0, |t| t.unfinished())).sum();
        self.gauge.set(unfinished as i64);
        self.gauge.collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_move_only_past_contiguous_finished_messages() {
        let mut p = PartitionOffsets::default();
        for o in 10..15 {
            p.start(o);
        }
        assert_eq!(p.finish(12), None);
        assert_eq!((p.in_flight(), p.unfinished()), (5, 4), "12 is done but waits for 10 and 11");
        assert_eq!(p.finish(11), None);
        assert_eq!(p.finish(10), Some(13));
        assert_eq!(p.finish(14), None);
        assert_eq!(p.finish(13), Some(15));
        assert_eq!(p.in_flight(), 0);
    }

    #[test]
    fn a_forgotten_tail_is_never_passed() {
        let mut t = OffsetTracker::default();
        for o in 10..14 {
            t.start(0, o);
        }
        // 12 and 13 were never handed to the pipeline when the partition was revoked.
        t.forget(0, 12);
        t.forget(0, 13);
        assert_eq!(t.in_flight_on(0), 2);
        assert_eq!(t.finish(0, 11), None);
        assert_eq!(t.finish(0, 10), Some(12), "the next owner starts at the first forgotten one");
        assert_eq!(t.in_flight_on(0), 0);
    }

    #[test]
    fn partitions_are_independent_and_revocation_forgets() {
        let mut t = OffsetTracker::default();
        t.start(0, 5);
        t.start(1, 7);
        assert_eq!(t.finish(1, 7), Some(8));
        assert_eq!(t.in_flight(), 1);
        t.revoke(0);
        assert_eq!(t.finish(0, 5), None);
        assert_eq!(t.in_flight(), 0);
    }
}
