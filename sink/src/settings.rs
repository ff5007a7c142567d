//! The sink's settings: flags with environment variables and local defaults.

use reefline_common::auth::AuthSettings;
use reefline_common::kafka::{KafkaSettings, Topics};
use reefline_schemas::RegistrySettings;
use secrecy::SecretString;

/// Where results come from, where they go, and how the lookup API listens.
#[derive(Clone, clap::Parser)]
#[command(name = "reefline-sink", about = "Writes results to Postgres and serves the lookup API")]
pub struct Settings {
    /// Address the lookup API (and /metrics, /healthz, /readyz) listens on.
    #[arg(long, env = "SINK_LISTEN", default_value = "127.0.0.1:8081")]
    pub listen: String,

    #[command(flatten)]
    pub database: reefline_store::DatabaseSettings,

    /// The topics: results are read from `results`, and `requests` too, to know what is pending
    /// before its result arrives.
    #[command(flatten)]
    pub topics: Topics,

    /// Consumer group that records the requests (its own, beside the results group).
    #[arg(long, env = "SINK_REQUESTS_GROUP", default_value = "reefline-sink-requests")]
    pub requests_group_id: String,

    /// Consumer group of the sink instances.
    #[arg(long, env = "SINK_GROUP", default_value = "reefline-sink")]
    pub group_id: String,

    /// Most results written in one database transaction.
    #[arg(long, env = "SINK_MAX_BATCH", default_value_t = 500)]
    pub max_batch: usize,

    /// Longest a partial batch waits for more results before it is written, in milliseconds.
    #[arg(long, env = "SINK_LINGER_MS", default_value_t = 50)]
    pub linger_ms: u64,

    /// Database connections the lookup API may hold (its own, apart from the writers' 8).
    #[arg(long, env = "LOOKUP_CONNECTIONS", default_value_t = 4)]
    pub lookup_connections: u32,

    /// Database connections the exports (`…/results?format=`) may hold at once, apart from the
    /// lookups': an export streams for as long as its client reads, within `EXPORT_TIMEOUT_S`.
    #[arg(long, env = "EXPORT_CONNECTIONS", default_value_t = 4)]
    pub export_connections: u32,

    /// Exports one tenant may run at once (an admin's count as one tenant's); more get 429
    /// `too_many_exports`, so that one tenant's exports never take every connection.
    #[arg(long, env = "EXPORTS_PER_TENANT", default_value_t = 1)]
    pub exports_per_tenant: u32,

    /// Longest an export may wait for its client to read the next piece, in seconds; then it is
    /// ended (its connection and snapshot released).
    #[arg(long, env = "EXPORT_IDLE_TIMEOUT_S", default_value_t = 30)]
    pub export_idle_timeout_s: u64,

    /// Longest an export's query may run, in seconds (Postgres' statement_timeout): an open
    /// snapshot holds back VACUUM of the results table.
    #[arg(long, env = "EXPORT_TIMEOUT_S", default_value_t = 1800)]
    pub export_timeout_s: u64,

    /// The model manifest and its class tables, which the exports name classes from (the sink
    /// reads no model file; `MODELS` and `DEFAULT_MODEL` are not its concern).
    #[command(flatten)]
    pub models: reefline_common::models::ModelSettings,

    /// Longest a lookup may run or wait for a connection, in milliseconds; then 503.
    #[arg(long, env = "LOOKUP_TIMEOUT_MS", default_value_t = 5000)]
    pub lookup_timeout_ms: u64,

    /// Secret the callbacks are signed with (HMAC-SHA256, `Reefline-Signature`); without one they
    /// go unsigned.
    #[arg(long, env = "CALLBACK_SECRET", hide_env_values = true)]
    pub callback_secret: Option<SecretString>,

    /// Where the web page (`/`) sends submissions: ingest's URL as a browser reaches it.
    #[arg(long, env = "SINK_INGEST_URL", default_value = "http://127.0.0.1:8080")]
    pub ingest_url: String,

    /// Where the sink's API is reached from outside, for the links in callbacks.
    #[arg(long, env = "SINK_PUBLIC_URL", default_value = "http://127.0.0.1:8081")]
    pub public_url: String,

    /// First wait before a failed callback is tried again, in milliseconds; it doubles with each
    /// failure, up to `CALLBACK_RETRY_MAX_MS`.
    #[arg(long, env = "CALLBACK_RETRY_BASE_MS", default_value_t = 10_000)]
    pub callback_retry_base_ms: u64,

    /// Longest wait between two tries of a callback, in milliseconds.
    #[arg(long, env = "CALLBACK_RETRY_MAX_MS", default_value_t = 3_600_000)]
    pub callback_retry_max_ms: u64,

    /// How long after a batch completes its callback is still tried, in seconds.
    #[arg(long, env = "CALLBACK_GIVE_UP_AFTER_S", default_value_t = 86_400)]
    pub callback_give_up_after_s: u64,

    /// Longest one callback may take, in milliseconds.
    #[arg(long, env = "CALLBACK_TIMEOUT_MS", default_value_t = 10_000)]
    pub callback_timeout_ms: u64,

    /// Callback destinations opened although not public: CIDRs, IPs or host names, comma-separated;
    /// the rules of the classifier's image fetches, with a list of its own (none by default: public
    /// addresses only).
    #[arg(long, env = "CALLBACK_ALLOW", value_delimiter = ',')]
    pub callback_allow: Vec<String>,

    #[command(flatten)]
    pub auth: AuthSettings,

    #[command(flatten)]
    pub tenants: reefline_common::tenant::TenantSettings,

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
            .field("database", &self.database)
            .field("topics", &self.topics)
            .field("group_id", &self.group_id)
            .field("callback_secret", &self.callback_secret)
            .field("public_url", &self.public_url)
            .field("ingest_url", &self.ingest_url)
            .field("callback_allow", &self.callback_allow)
            .field("auth", &self.auth)
            .field("tenants", &self.tenants)
            .field("kafka", &self.kafka)
            .field("registry", &self.registry)
            .finish_non_exhaustive()
    }
}
