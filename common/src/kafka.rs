//! Kafka client settings shared by every service, passed through to librdkafka.

use rdkafka::ClientConfig;
use secrecy::{ExposeSecret, SecretString};

/// The pipeline's topics, the same for every service, and the partitions a service creates one
/// with when it is missing (the requests topic's partitions bound how many classifiers can share
/// the work).
#[derive(Clone, Debug, clap::Args)]
pub struct Topics {
    /// Topic the image requests go to (ingest and cameras) and are read from.
    #[arg(long = "requests-topic", env = "REQUESTS_TOPIC", default_value = "reefline.requests")]
    pub requests: String,

    /// Topic interactive requests go to (a waiting or small submission, the seed routes) and are
    /// read from first: every classifier takes them before any request of `requests` (the bulk
    /// lane: feeds, retries, large submissions), so they never wait behind a backlog.
    #[arg(long = "interactive-topic", env = "INTERACTIVE_TOPIC", default_value = "reefline.requests.interactive")]
    pub interactive: String,

    /// Topic the results go to.
    #[arg(long = "results-topic", env = "RESULTS_TOPIC", default_value = "reefline.results")]
    pub results: String,

    /// Topic the sink announces finished submissions on (`BatchCompleted`).
    #[arg(long = "batches-topic", env = "BATCHES_TOPIC", default_value = "reefline.batches")]
    pub batches: String,

    /// Topic records that cannot be processed are moved to.
    #[arg(long = "dead-letter-topic", env = "DEAD_LETTER_TOPIC", default_value = "reefline.dead-letter")]
    pub dead_letter: String,

    /// Partitions of a topic a service has to create.
    #[arg(long = "topic-partitions", env = "TOPIC_PARTITIONS", default_value_t = 6)]
    pub partitions: i32,
}

/// The two lanes requests travel: interactive work is read before any bulk work.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Deserialize, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Lane {
    /// Someone is waiting: a waiting or small submission, the seed routes.
    Interactive,
    /// Feeds, retries, large submissions: throughput, not latency.
    Bulk,
}

impl Lane {
    pub const ALL: [Lane; 2] = [Lane::Interactive, Lane::Bulk];

    /// The topic the lane's requests travel.
    pub fn topic(self, topics: &Topics) -> &str {
        match self {
            Lane::Interactive => &topics.interactive,
            Lane::Bulk => &topics.requests,
        }
    }

    /// Its name in metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Lane::Interactive => "interactive",
            Lane::Bulk => "bulk",
        }
    }
}

/// Where the brokers are and any extra librdkafka properties (SASL, SSL, tuning).
#[derive(Clone, Debug, clap::Args)]
pub struct KafkaSettings {
    /// Comma-separated bootstrap brokers.
    #[arg(long = "kafka-brokers", env = "KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    pub brokers: String,

    /// Consumer session timeout, in milliseconds; a group join takes about half of it.
    #[arg(long = "session-timeout-ms", env = "KAFKA_SESSION_TIMEOUT_MS", default_value_t = 10_000)]
    pub session_timeout_ms: u32,

    /// Extra librdkafka properties as `key=value`, comma-separated
    /// (e.g. `security.protocol=SASL_SSL,sasl.mechanism=PLAIN`). Values may be credentials: they
    /// are never logged (the keys are) and `--help` does not show them.
    #[arg(
        long = "kafka-property",
        env = "KAFKA_PROPERTIES",
        value_delimiter = ',',
        value_parser = parse_property,
        hide_env_values = true
    )]
    pub properties: Vec<Property>,

    /// How long a bulk producer waits to fill a batch, in milliseconds (the interactive lane's
    /// producers send each record at once; the classifier's bulk results wait `BULK_LINGER_MS`).
    /// Every produce request costs the broker a round of storage work, so a longer wait is cheaper:
    /// with the classifier's small batches, 5 ms sent nearly every result on its own (the local
    /// broker's CPU an image 1.68 ms; 0.87 at 25).
    #[arg(long = "kafka-linger-ms", env = "KAFKA_LINGER_MS", default_value_t = 25)]
    pub producer_linger_ms: u32,

    /// Largest producer batch, in bytes.
    #[arg(long = "kafka-batch-bytes", env = "KAFKA_BATCH_BYTES", default_value_t = 1_000_000)]
    pub producer_batch_bytes: u32,

    /// Producer compression: none, gzip, snappy, lz4 or zstd.
    #[arg(long = "kafka-compression", env = "KAFKA_COMPRESSION", default_value = "lz4")]
    pub producer_compression: String,

    /// Longest the broker may hold a consumer's fetch waiting for data, in milliseconds. A broker
    /// answers as soon as data arrives (Kafka does; the local nisshi does with the project's
    /// patch), so this costs no latency; shorter only means more fetches while idle.
    #[arg(long = "kafka-fetch-wait-ms", env = "KAFKA_FETCH_WAIT_MS", default_value_t = 2000)]
    pub consumer_fetch_wait_ms: u32,

    /// Consumer-group assignment strategy; cooperative-sticky moves only the partitions that
    /// must move when a member joins or leaves, so the others keep their work in flight.
    #[arg(long = "kafka-assignment-strategy", env = "KAFKA_ASSIGNMENT_STRATEGY", default_value = "cooperative-sticky")]
    pub consumer_assignment_strategy: String,

    /// Most a consumer prefetches into memory, in KiB; bounds memory with a large backlog.
    #[arg(long = "kafka-prefetch-kbytes", env = "KAFKA_PREFETCH_KBYTES", default_value_t = 8192)]
    pub consumer_prefetch_kbytes: u32,
}

/// One librdkafka property. Its value may be a credential (`sasl.password`, `ssl.key.password`,
/// a JAAS config), so it is held as a secret and `Debug` shows it only for keys that cannot hold one.
#[derive(Clone)]
pub struct Property {
    pub key: String,
    value: SecretString,
}

impl Property {
    pub fn new(key: impl Into<String>, value: impl Into<String>) -> Self {
        Self { key: key.into(), value: SecretString::from(value.into()) }
    }

    /// The value, to hand to librdkafka.
    pub fn value(&self) -> &str {
        self.value.expose_secret()
    }

    fn may_hold_secret(&self) -> bool {
        let key = self.key.to_ascii_lowercase();
        ["password", "secret", "jaas", "token", "key", "credential", "oauth"].iter().any(|word| key.contains(word))
    }
}

impl std::fmt::Debug for Property {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.may_hold_secret() {
            write!(f, "{}=<redacted>", self.key)
        } else {
            write!(f, "{}={}", self.key, self.value())
        }
    }
}

fn parse_property(s: &str) -> Result<Property, String> {
    let (k, v) =
        s.split_once('=').ok_or_else(|| format!("`{}` is not key=value", s.split('=').next().unwrap_or("")))?;
    Ok(Property::new(k.trim(), v.trim()))
}

impl KafkaSettings {
    /// Settings for a broker at `brokers` with no extra properties.
    pub fn new(brokers: impl Into<String>) -> Self {
        Self {
            brokers: brokers.into(),
            session_timeout_ms: 10_000,
            properties: Vec::new(),
            producer_linger_ms: 25,
            producer_batch_bytes: 1_000_000,
            producer_compression: "lz4".into(),
            consumer_fetch_wait_ms: 2000,
            consumer_assignment_strategy: "cooperative-sticky".into(),
            consumer_prefetch_kbytes: 8192,
        }
    }

    /// A client config with the brokers and the extra properties set; callers add their own.
    pub fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.brokers);
        for p in &self.properties {
            config.set(&p.key, p.value());
        }
        config
    }

    /// A producer config: all in-sync replicas acknowledge, retries on.
    ///
    /// Idempotence is off: every record is keyed by its request id and every consumer is
    /// idempotent, so a duplicate from a retry is harmless, whereas an idempotent producer turns
    /// records that time out during a broker outage into a fatal error that only a restart
    /// clears (seen with ingest after a broker restart). `KAFKA_PROPERTIES=enable.idempotence=true`
    /// turns it back on.
    pub fn producer_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.brokers)
            .set("enable.idempotence", "false")
            .set("acks", "all")
            .set("linger.ms", self.producer_linger_ms.to_string())
            .set("batch.size", self.producer_batch_bytes.to_string())
            .set("compression.type", &self.producer_compression)
            .set("message.timeout.ms", "30000");
        for p in &self.properties {
            config.set(&p.key, p.value());
        }
        config
    }

    /// A consumer config for `group`, storing offsets only when told to.
    pub fn consumer_config(&self, group: &str) -> ClientConfig {
        let session_timeout_ms = self.session_timeout_ms;
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.brokers)
            .set("group.id", group)
            .set("enable.auto.commit", "true")
            .set("auto.commit.interval.ms", "1000")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", session_timeout_ms.to_string())
            .set("heartbeat.interval.ms", (session_timeout_ms / 3).max(100).to_string())
            .set("fetch.wait.max.ms", self.consumer_fetch_wait_ms.to_string())
            .set("partition.assignment.strategy", &self.consumer_assignment_strategy)
            .set("queued.max.messages.kbytes", self.consumer_prefetch_kbytes.to_string())
            .set("statistics.interval.ms", STATISTICS_INTERVAL_MS);
        for p in &self.properties {
            config.set(&p.key, p.value());
        }
        config
    }
}

/// `config` sending each record at once (`linger.ms=0`), for an interactive lane's producer, unless
/// `KAFKA_PROPERTIES` sets the linger.
pub fn without_linger(settings: &KafkaSettings, config: ClientConfig) -> ClientConfig {
    with_linger(settings, config, 0)
}

/// `config` waiting `ms` milliseconds to fill a produce request, unless `KAFKA_PROPERTIES` sets the
/// linger.
pub fn with_linger(settings: &KafkaSettings, mut config: ClientConfig, ms: u32) -> ClientConfig {
    if !settings.properties.iter().any(|p| p.key == "linger.ms" || p.key == "queue.buffering.max.ms") {
        config.set("linger.ms", ms.to_string());
    }
    config
}

/// How often librdkafka reports its statistics (and so how fresh the lag metrics are).
const STATISTICS_INTERVAL_MS: &str = "5000";

/// `<service>_consumer_lag{topic,partition}`: records between a partition's high watermark and the
/// group's committed offset, for each partition this consumer is assigned, from librdkafka's
/// statistics. A partition given up leaves the metric.
#[derive(Clone)]
pub struct LagGauge(prometheus::IntGaugeVec);

impl LagGauge {
    /// The gauge `name` (e.g. `classifier_consumer_lag`), registered in `registry`.
    pub fn register(registry: &prometheus::Registry, name: &str) -> prometheus::Result<Self> {
        let help = "Records not yet committed by this consumer group, by topic and partition";
        let gauge = prometheus::IntGaugeVec::new(prometheus::Opts::new(name, help), &["topic", "partition"])?;
        registry.register(Box::new(gauge.clone()))?;
        Ok(Self(gauge))
    }

    pub fn record(&self, statistics: &rdkafka::statistics::Statistics) {
        for (topic, t) in &statistics.topics {
            for (id, p) in &t.partitions {
                if *id < 0 {
                    continue; // librdkafka's internal "unassigned" partition
                }
                let partition = id.to_string();
                let labels = [topic.as_str(), partition.as_str()];
                // librdkafka says -1 until the group has committed on the partition; then
                // everything from the low watermark is waiting (the consumer starts there).
                let lag = if p.consumer_lag >= 0 {
                    Some(p.consumer_lag)
                } else if p.hi_offset >= 0 && p.committed_offset < 0 {
                    Some((p.hi_offset - p.lo_offset.max(0)).max(0))
                } else {
                    None
                };
                match lag.filter(|_| p.desired) {
                    Some(lag) => self.0.with_label_values(&labels).set(lag),
                    None => {
                        let _ = self.0.remove_label_values(&labels);
                    }
                }
            }
        }
    }
}

/// A consumer context that records its lag ([`LagGauge`]) and otherwise behaves as the default.
pub struct LagContext(pub LagGauge);

impl rdkafka::ClientContext for LagContext {
    fn stats(&self, statistics: rdkafka::statistics::Statistics) {
        self.0.record(&statistics);
    }
}

impl rdkafka::consumer::ConsumerContext for LagContext {}

/// Creates `topics` with `partitions` partitions each, leaving any that already exist as they are.
pub async fn ensure_topics(
    settings: &KafkaSettings,
    topics: &[&str],
    partitions: i32,
) -> Result<(), rdkafka::error::KafkaError> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::types::RDKafkaErrorCode;

    let admin: AdminClient<DefaultClientContext> = settings.client_config().create()?;
    let new: Vec<NewTopic> = topics.iter().map(|t| NewTopic::new(t, partitions, TopicReplication::Fixed(-1))).collect();
    let options = AdminOptions::new().operation_timeout(Some(std::time::Duration::from_secs(30)));
    for result in admin.create_topics(&new, &options).await? {
        match result {
            Ok(topic) => tracing::info!(%topic, partitions, "created topic"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(rdkafka::error::KafkaError::AdminOp(code))
                    .inspect_err(|_| tracing::error!(%topic, ?code, "could not create topic"));
            }
        }
    }
    Ok(())
}

/// The headers [`dead_letter`] adds to a record.
pub const DEAD_LETTER_HEADERS: [&str; 6] = [
    "reefline-error-kind",
    "reefline-error",
    "reefline-source-topic",
    "reefline-source-partition",
    "reefline-source-offset",
    "reefline-failed-at-ms",
];

/// Drops a Kafka client on a thread of its own, waiting at most `limit`: a consumer's close (it
/// leaves its group) has no deadline of its own in librdkafka, and a broker connection that stops
/// answering half-way (a TLS proxy, say) must not hold a service's exit, or the process embedding
/// it, forever; nor may it block a runtime thread.
pub async fn close<C: Send + 'static>(client: C, what: &'static str, limit: std::time::Duration) {
    let (closed_tx, closed_rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        drop(client);
        let _ = closed_tx.send(());
    });
    if tokio::time::timeout(limit, closed_rx).await.is_err() {
        tracing::warn!(?limit, what, "a Kafka client did not close in time; stopping without waiting for it");
    }
}

/// The record a dead letter is about: where it was read and what it held.
pub struct Source<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<&'a [u8]>,
    pub payload: Option<&'a [u8]>,
    /// Its tenant's seal (`crate::tenant::SEAL_HEADER`), kept so that a replay keeps its tenant.
    pub seal: Option<&'a [u8]>,
}

impl<'a> From<&'a rdkafka::message::BorrowedMessage<'_>> for Source<'a> {
    fn from(message: &'a rdkafka::message::BorrowedMessage<'_>) -> Self {
        use rdkafka::Message;
        use rdkafka::message::Headers;
        let seal = message.headers().and_then(|headers| {
            (0..headers.count())
                .filter_map(|i| headers.try_get(i))
                .find(|h| h.key == crate::tenant::SEAL_HEADER)
                .and_then(|h| h.value)
        });
        Self {
            topic: message.topic(),
            partition: message.partition(),
            offset: message.offset(),
            key: message.key(),
            payload: message.payload(),
            seal,
        }
    }
}

/// Sends a record that could not be processed to the dead-letter topic, with headers naming the
/// error kind, the reason, where it came from and when. Retries with backoff until the broker has
/// it: the caller may move past the record only then.
pub async fn dead_letter(
    producer: &crate::producer::FutureProducer,
    topic: &str,
    source: Source<'_>,
    kind: &str,
    reason: &str,
) {
    tracing::warn!(
        topic = source.topic,
        partition = source.partition,
        offset = source.offset,
        kind,
        reason,
        "poison record moved to the dead-letter topic"
    );
    let mut backoff = crate::Backoff::OUTAGE.waits();
    while let Err(e) = try_dead_letter(producer, topic, &source, kind, reason).await {
        tracing::warn!(error = %e, "dead-letter produce failed; retrying");
        backoff.wait().await;
    }
}

async fn try_dead_letter(
    producer: &crate::producer::FutureProducer,
    topic: &str,
    source: &Source<'_>,
    kind: &str,
    reason: &str,
) -> Result<(), rdkafka::error::KafkaError> {
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::FutureRecord;

    let partition = source.partition.to_string();
    let offset = source.offset.to_string();
    let failed_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis().to_string())
        .unwrap_or_default();
    let headers = OwnedHeaders::new()
        .insert(Header { key: "reefline-error-kind", value: Some(kind) })
        .insert(Header { key: "reefline-error", value: Some(reason) })
        .insert(Header { key: "reefline-source-topic", value: Some(source.topic) })
        .insert(Header { key: "reefline-source-partition", value: Some(&partition) })
        .insert(Header { key: "reefline-source-offset", value: Some(&offset) })
        .insert(Header { key: "reefline-failed-at-ms", value: Some(&failed_at) });
    let headers = match source.seal {
        Some(seal) => headers.insert(Header { key: crate::tenant::SEAL_HEADER, value: Some(seal) }),
        None => headers,
    };
    let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic).headers(headers);
    if let Some(key) = source.key {
        record = record.key(key);
    }
    if let Some(payload) = source.payload {
        record = record.payload(payload);
    }
    producer.send(record, std::time::Duration::from_secs(30)).await.map(|_| ()).map_err(|(e, _)| e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_never_print() {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            kafka: KafkaSettings,
        }
        let cli = Cli::parse_from([
            "x",
            "--kafka-property",
            "security.protocol=SASL_SSL,sasl.username=reef,sasl.password=hunter2,ssl.key.password=k3y",
        ]);
        let shown = format!("{:?}", cli.kafka);
        assert!(shown.contains("security.protocol=SASL_SSL"), "{shown}");
        assert!(shown.contains("sasl.password=<redacted>"), "{shown}");
        assert!(!shown.contains("hunter2") && !shown.contains("k3y"), "{shown}");
        let config = cli.kafka.client_config();
        assert_eq!(config.get("sasl.password"), Some("hunter2"), "librdkafka still gets it");
    }
}
