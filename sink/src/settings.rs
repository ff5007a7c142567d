//! The sink's settings: flags with environment variables and local defaults.

use reefline_common::auth::AuthSettings;
use reefline_common::kafka::KafkaSettings;
use reefline_schemas::RegistrySettings;
use secrecy::{ExposeSecret, SecretString};

/// Where results come from, where they go, and how the lookup API listens.
#[derive(Clone, clap::Parser)]
#[command(name = "reefline-sink", about = "Writes results to Postgres and serves the lookup API")]
pub struct Settings {
    /// Address the lookup API (and /metrics, /healthz, /readyz) listens on.
    #[arg(long, env = "SINK_LISTEN", default_value = "127.0.0.1:8081")]
    pub listen: String,

    /// Postgres URL; the database is created and migrated at start-up.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/reefline",
        hide_env_values = true
    )]
    pub database_url: SecretString,

    /// Topic the results are read from.
    #[arg(long, env = "RESULTS_TOPIC", default_value = "reefline.results")]
    pub results_topic: String,

    /// Topic undecodable records are moved to.
    #[arg(long, env = "DEAD_LETTER_TOPIC", default_value = "reefline.dead-letter")]
    pub dead_letter_topic: String,

    /// Topic the requests are read from, to know what is pending before its result arrives.
    #[arg(long, env = "REQUESTS_TOPIC", default_value = "reefline.requests")]
    pub requests_topic: String,

    /// Consumer group that records the requests (its own, beside the results group).
    #[arg(long, env = "SINK_REQUESTS_GROUP", default_value = "reefline-sink-requests")]
    pub requests_group_id: String,

    /// Partitions given to topics the sink has to create.
    #[arg(long, env = "TOPIC_PARTITIONS", default_value_t = 6)]
    pub topic_partitions: i32,

    /// Consumer group of the sink instances.
    #[arg(long, env = "SINK_GROUP", default_value = "reefline-sink")]
    pub group_id: String,

    /// Consumer session timeout; a group join takes about half of it.
    #[arg(long, env = "KAFKA_SESSION_TIMEOUT_MS", default_value_t = 10_000)]
    pub session_timeout_ms: u32,

    /// Most results written in one database transaction.
    #[arg(long, env = "SINK_MAX_BATCH", default_value_t = 500)]
    pub max_batch: usize,

    /// Longest a partial batch waits for more results before it is written, in milliseconds.
    #[arg(long, env = "SINK_LINGER_MS", default_value_t = 50)]
    pub linger_ms: u64,

    /// Database connections the lookup API may hold (its own, apart from the writers' 8).
    #[arg(long, env = "LOOKUP_CONNECTIONS", default_value_t = 4)]
    pub lookup_connections: u32,

    /// Longest a lookup may run or wait for a connection, in milliseconds; then 503.
    #[arg(long, env = "LOOKUP_TIMEOUT_MS", default_value_t = 5000)]
    pub lookup_timeout_ms: u64,

    #[command(flatten)]
    pub auth: AuthSettings,

    #[command(flatten)]
    pub http: reefline_common::http::HttpLimits,

    #[command(flatten)]
    pub kafka: KafkaSettings,

    #[command(flatten)]
    pub registry: RegistrySettings,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("listen", &self.listen)
            .field("database_url", &url_without_password(self.database_url.expose_secret()))
            .field("results_topic", &self.results_topic)
            .field("group_id", &self.group_id)
            .field("auth", &self.auth)
            .field("kafka", &self.kafka)
            .field("registry", &self.registry)
            .finish_non_exhaustive()
    }
}

/// The database URL with any password replaced, for logs; a URL that does not parse is not shown
/// at all (it may still hold one).
pub fn url_without_password(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) => {
            if parsed.password().is_some() {
                let _ = parsed.set_password(Some("***"));
            }
            parsed.into()
        }
        Err(_) => "<unparsable>".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_hidden_whatever_they_hold() {
        for (url, shown) in [
            ("postgres://reef:p%40ss@db:5432/reefline", "postgres://reef:***@db:5432/reefline"),
            ("postgres://reef:p@ss@db/reefline", "postgres://reef:***@db/reefline"),
            ("postgres://reef@db/reefline", "postgres://reef@db/reefline"),
            ("not a url: hunter2", "<unparsable>"),
        ] {
            assert_eq!(url_without_password(url), shown, "{url}");
        }
    }
}
