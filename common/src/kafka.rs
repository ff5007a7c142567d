//! Kafka client settings shared by every service, passed through to librdkafka.

use rdkafka::ClientConfig;

/// Where the brokers are and any extra librdkafka properties (SASL, SSL, tuning).
#[derive(Clone, Debug, clap::Args)]
pub struct KafkaSettings {
    /// Comma-separated bootstrap brokers.
    #[arg(long = "kafka-brokers", env = "KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    pub brokers: String,

    /// Extra librdkafka properties as `key=value`, comma-separated
    /// (e.g. `security.protocol=SASL_SSL,sasl.mechanism=PLAIN`).
    #[arg(long = "kafka-property", env = "KAFKA_PROPERTIES", value_delimiter = ',', value_parser = parse_property)]
    pub properties: Vec<(String, String)>,
}

fn parse_property(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once('=').ok_or_else(|| format!("`{s}` is not key=value"))?;
    Ok((k.trim().to_owned(), v.trim().to_owned()))
}

impl KafkaSettings {
    /// Settings for a broker at `brokers` with no extra properties.
    pub fn new(brokers: impl Into<String>) -> Self {
        Self { brokers: brokers.into(), properties: Vec::new() }
    }

    /// A client config with the brokers and the extra properties set; callers add their own.
    pub fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.brokers);
        for (k, v) in &self.properties {
            config.set(k, v);
        }
        config
    }

    /// A producer config: idempotent, all replicas acknowledge.
    pub fn producer_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            .set("compression.type", "lz4")
            .set("message.timeout.ms", "30000");
        for (k, v) in &self.properties {
            config.set(k, v);
        }
        config
    }

    /// A consumer config for `group`, storing offsets only when told to.
    pub fn consumer_config(&self, group: &str, session_timeout_ms: u32) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.brokers)
            .set("group.id", group)
            .set("enable.auto.commit", "true")
            .set("auto.commit.interval.ms", "1000")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", session_timeout_ms.to_string())
            .set("heartbeat.interval.ms", (session_timeout_ms / 3).max(100).to_string());
        for (k, v) in &self.properties {
            config.set(k, v);
        }
        config
    }
}
