//! Replaying dead letters after a fix: each record goes back, unchanged, to the topic it came from.
//!
//! A replay reads the dead-letter topic from its consumer group's committed position (the
//! beginning, the first time) to the end the topic had when the replay started, so records that
//! fail again and are dead-lettered anew wait for the next replay instead of looping. The group's
//! position advances past every record read, replayed or filtered out.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use anyhow::Context;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::FutureRecord;

use rdkafka::{Offset, TopicPartitionList};
use reefline_common::producer::FutureProducer;

use reefline_common::kafka::{DEAD_LETTER_HEADERS, KafkaSettings};

/// Header naming the dead letter a replayed record came from, as `topic/partition/offset`.
pub const REPLAYED_FROM: &str = "reefline-replayed-from";

const TIMEOUT: Duration = Duration::from_secs(30);

/// What to replay.
#[derive(Clone, Debug, clap::Args)]
pub struct ReplayOptions {
    /// The dead-letter topic to read.
    #[arg(long, env = "DEAD_LETTER_TOPIC", default_value = "reefline.dead-letter")]
    pub dead_letter_topic: String,

    /// Consumer group that remembers how far earlier replays got; a new name starts from the beginning.
    #[arg(long, env = "REPLAY_GROUP", default_value = "reefline-replay")]
    pub group: String,

    /// Replay only records dead-lettered with this error kind (repeatable; default: every kind).
    #[arg(long = "kind")]
    pub kinds: Vec<String>,

    /// Count what would be replayed, by kind, without producing or moving the group's position.
    #[arg(long)]
    pub dry_run: bool,
}

/// What a replay did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ReplaySummary {
    /// Records read from the dead-letter topic.
    pub read: usize,
    /// Records produced back to their source topic (or that would be, in a dry run), by error kind.
    pub replayed: BTreeMap<String, usize>,
    /// Records left alone by the `--kind` filter.
    pub filtered_out: usize,
    /// Records without a `reefline-source-topic` header, which cannot be routed back.
    pub unroutable: usize,
}

impl std::fmt::Display for ReplaySummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let replayed: usize = self.replayed.values().sum();
        write!(f, "read {}, replayed {replayed}", self.read)?;
        for (kind, n) in &self.replayed {
            write!(f, " ({kind}: {n})")?;
        }
        write!(f, ", filtered out {}, unroutable {}", self.filtered_out, self.unroutable)
    }
}

fn header<'a>(message: &'a BorrowedMessage<'_>, key: &str) -> Option<&'a str> {
    let headers = message.headers()?;
    headers.iter().find(|h| h.key == key).and_then(|h| std::str::from_utf8(h.value?).ok())
}

/// Replays the dead letters from the group's position to the current end of the topic.
pub async fn replay(kafka: &KafkaSettings, options: &ReplayOptions) -> anyhow::Result<ReplaySummary> {
    let topic = options.dead_letter_topic.as_str();
    let mut config = kafka.consumer_config(&options.group);
    config.set("enable.auto.commit", "false");
    let consumer: StreamConsumer = config.create()?;
    let producer: FutureProducer = kafka.producer_config().create()?;

    let metadata = consumer.fetch_metadata(Some(topic), TIMEOUT).context("reading the topic's metadata")?;
    let partitions: Vec<i32> = metadata.topics().iter().flat_map(|t| t.partitions().iter().map(|p| p.id())).collect();
    anyhow::ensure!(!partitions.is_empty(), "topic {topic} does not exist");
    let mut wanted = TopicPartitionList::new();
    for p in &partitions {
        wanted.add_partition(topic, *p);
    }
    let committed = consumer.committed_offsets(wanted, TIMEOUT).context("reading the group's position")?;
    let mut assignment = TopicPartitionList::new();
    let mut ends: HashMap<i32, i64> = HashMap::new();
    for p in partitions {
        let (low, high) = consumer.fetch_watermarks(topic, p, TIMEOUT)?;
        let start = match committed.find_partition(topic, p).map(|e| e.offset()) {
            Some(Offset::Offset(o)) => o.max(low),
            _ => low,
        };
        if start < high {
            assignment.add_partition_offset(topic, p, Offset::Offset(start))?;
            ends.insert(p, high);
        }
    }

    let mut summary = ReplaySummary::default();
    if ends.is_empty() {
        return Ok(summary);
    }
    consumer.assign(&assignment)?;
    let mut done = TopicPartitionList::new();
    while !ends.is_empty() {
        let message =
            tokio::time::timeout(TIMEOUT, consumer.recv()).await.context("no dead letter arrived within 30 s")??;
        let (partition, offset) = (message.partition(), message.offset());
        if offset >= ends.get(&partition).copied().unwrap_or(0) {
            continue;
        }
        summary.read += 1;
        let kind = header(&message, "reefline-error-kind").unwrap_or("unknown").to_owned();
        if !options.kinds.is_empty() && !options.kinds.contains(&kind) {
            summary.filtered_out += 1;
        } else if let Some(source) = header(&message, "reefline-source-topic") {
            if !options.dry_run {
                send_back(&producer, &message, source).await?;
            }
            *summary.replayed.entry(kind).or_default() += 1;
        } else {
            summary.unroutable += 1;
        }
        done.add_partition_offset(topic, partition, Offset::Offset(offset + 1))?;
        if offset + 1 >= ends[&partition] {
            ends.remove(&partition);
        }
    }
    if !options.dry_run {
        consumer.commit(&done, rdkafka::consumer::CommitMode::Sync).context("saving the group's position")?;
    }
    Ok(summary)
}

/// Produces the record's key and payload to `source`, with its headers minus the dead-letter
/// ones and plus `reefline-replayed-from` (`topic/partition/offset` of the dead letter).
async fn send_back(producer: &FutureProducer, message: &BorrowedMessage<'_>, source: &str) -> anyhow::Result<()> {
    let from = format!("{}/{}/{}", message.topic(), message.partition(), message.offset());
    let mut headers = OwnedHeaders::new();
    if let Some(original) = message.headers() {
        for h in original.iter().filter(|h| !DEAD_LETTER_HEADERS.contains(&h.key) && h.key != REPLAYED_FROM) {
            headers = headers.insert(Header { key: h.key, value: h.value });
        }
    }
    headers = headers.insert(Header { key: REPLAYED_FROM, value: Some(&from) });
    let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(source).headers(headers);
    if let Some(key) = message.key() {
        record = record.key(key);
    }
    if let Some(payload) = message.payload() {
        record = record.payload(payload);
    }
    producer.send(record, TIMEOUT).await.map_err(|(e, _)| e).with_context(|| format!("producing to {source}"))?;
    Ok(())
}
