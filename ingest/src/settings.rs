//! Ingest's settings: flags with environment variables and local defaults.

use reefline_common::auth::AuthSettings;
use reefline_common::kafka::{KafkaSettings, Topics};
use reefline_schemas::RegistrySettings;

/// How ingest listens, where it produces, and the limits it enforces on requests.
#[derive(Clone, Debug, clap::Parser)]
#[command(name = "reefline-ingest", about = "Turns HTTP submissions of image URLs into Kafka records")]
pub struct Settings {
    /// Address the HTTP API (and /metrics, /healthz, /readyz) listens on.
    #[arg(long, env = "INGEST_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: String,

    /// The topics; ingest produces to `interactive` and `requests` (the bulk lane).
    #[command(flatten)]
    pub topics: Topics,

    /// Most URLs accepted in one submission.
    #[arg(long, env = "MAX_IMAGES_PER_REQUEST", default_value_t = 1000)]
    pub max_images: usize,

    /// Whether submissions may travel the interactive lane (`INTERACTIVE_TOPIC`); false: every
    /// submission travels the bulk lane (`REQUESTS_TOPIC`), as before there were lanes.
    #[arg(long, env = "INTERACTIVE_LANE", default_value_t = true, action = clap::ArgAction::Set)]
    pub interactive_lane: bool,

    /// Most images a submission may have to travel the interactive lane without asking: a larger
    /// one that does not wait travels the bulk lane unless it says `"priority": "interactive"`.
    #[arg(long, env = "INTERACTIVE_MAX_IMAGES", default_value_t = 16)]
    pub interactive_max_images: usize,

    /// Longest URL accepted, in bytes.
    #[arg(long, env = "MAX_URL_BYTES", default_value_t = 2048)]
    pub max_url_bytes: usize,

    /// Largest request body accepted, in bytes.
    #[arg(long, env = "MAX_BODY_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_body_bytes: usize,

    /// Longest ingest waits for the broker to acknowledge a submission's records before it answers
    /// 503 (with `Retry-After`), in milliseconds; a submission never waits longer than this.
    #[arg(long, env = "INGEST_DELIVERY_TIMEOUT_MS", default_value_t = 10_000)]
    pub delivery_timeout_ms: u64,

    /// Most images that may be waiting for the broker's acknowledgement at once, across all
    /// submissions; a submission that would go over is refused at once with 429 and `Retry-After`.
    /// Must be at least `MAX_IMAGES_PER_REQUEST`.
    #[arg(long, env = "INGEST_MAX_PENDING_IMAGES", default_value_t = 100_000)]
    pub max_pending_images: usize,

    /// Images per second each tenant may submit (0: no limit). A submission over it is refused with
    /// 429 `quota_exceeded` and `Retry-After`; a feed's chunks and retries wait for their turn.
    #[arg(long, env = "TENANT_IMAGES_PER_SECOND", default_value_t = 0)]
    pub tenant_images_per_second: u32,

    /// Most images of one tenant waiting for the broker's acknowledgement at once (0: no limit
    /// beyond `INGEST_MAX_PENDING_IMAGES`): a submission over it gets 429 `quota_exceeded`, a feed's
    /// chunk waits, so one tenant never takes the whole service's room.
    #[arg(long, env = "TENANT_MAX_PENDING_IMAGES", default_value_t = 0)]
    pub tenant_max_pending_images: usize,

    /// Images each tenant may submit a day (UTC; 0: no limit), counted across every ingest in the
    /// database: a submission over it gets 429 `quota_exceeded`, a feed stops before its chunk.
    #[arg(long, env = "TENANT_IMAGES_PER_DAY", default_value_t = 0)]
    pub tenant_images_per_day: u64,

    /// Most images a tenant may submit at once above its rate (its bucket's size); at least
    /// `TENANT_IMAGES_PER_SECOND` and `MAX_IMAGES_PER_REQUEST`.
    #[arg(long, env = "TENANT_IMAGES_BURST", default_value_t = 0)]
    pub tenant_images_burst: u32,

    /// Longest a submission may wait for its results (`wait`), in seconds; a longer `wait` is cut
    /// to this.
    #[arg(long, env = "INGEST_MAX_WAIT_SECONDS", default_value_t = 60.0)]
    pub max_wait_seconds: f64,

    /// How long `POST /api/infer` and `POST /classify` wait for their results when the request
    /// names no `wait`, in seconds (they answer inline, as the services they replace did).
    #[arg(long, env = "INGEST_INFER_WAIT_SECONDS", default_value_t = 30.0)]
    pub infer_wait_seconds: f64,

    /// Origins whose pages may call the API from a browser (CORS), comma-separated; `*` for any
    /// (the default: API keys travel in a header, never as cookies, so no page gets a caller's
    /// rights by being allowed). The sink's web page is one such caller.
    #[arg(long, env = "INGEST_CORS_ORIGINS", value_delimiter = ',', default_value = "*")]
    pub cors_origins: Vec<String>,

    #[command(flatten)]
    pub database: reefline_store::DatabaseSettings,

    /// Lines of a feed produced as one batch and settled together; an upload that breaks off
    /// resumes after the last settled chunk. At most a quarter of `FEED_WINDOW_IMAGES` when that
    /// is on (80 by default), so that a feed's progress moves as its share lets it on.
    #[arg(long, env = "FEED_CHUNK_LINES", default_value_t = 1000)]
    pub feed_chunk_lines: usize,

    /// Longest a feed's upload (or fetched list) may send nothing, in seconds; then it is
    /// interrupted (resend with the same Idempotency-Key to resume).
    #[arg(long, env = "FEED_IDLE_TIMEOUT_S", default_value_t = 60)]
    pub feed_idle_timeout_s: u64,

    /// Feed images on the broker without a result, across the feeds being read: each tenant with
    /// a feed being read gets an even part, split evenly between its feeds, and a feed's next
    /// lines are read (from its upload or source) only while it is within its part. So a second
    /// feed starts within seconds beside a first of a million lines. The window counts an image
    /// until the sink has written its result, so it must cover the classifiers' pipelines and the
    /// sink's lag as well as their fetches: about three seconds of their throughput keeps them
    /// busy (200 cost a 2-core stack a fifth of its rate); more only lengthens the queue a new
    /// feed joins. 0: no window (each feed is put on the broker as fast as the broker takes it).
    #[arg(long, env = "FEED_WINDOW_IMAGES", default_value_t = 320)]
    pub feed_window_images: u64,

    /// How long a feed being read by an upload that stopped being heard from stays its own
    /// (a resend with the same key answers 409 until then), in seconds.
    #[arg(long, env = "FEED_LEASE_S", default_value_t = 30)]
    pub feed_lease_s: u64,

    /// Longest a feed waits for the broker, the registry or the database before it is
    /// interrupted with 503, in seconds (it slows down while they are slow, and is never refused).
    #[arg(long, env = "FEED_STALL_TIMEOUT_S", default_value_t = 300)]
    pub feed_stall_timeout_s: u64,

    /// Most lines a feed may have, numbered as its rejects are (blank lines and a CSV's header
    /// count); a longer one is read to this line, settled, closed there (a resend with its key
    /// reads no further) and answered 400 `feed_too_long`.
    #[arg(long, env = "FEED_MAX_LINES", default_value_t = 10_000_000)]
    pub feed_max_lines: u64,

    /// Most lines a feed may reject; at the one past it the feed is closed, its lines before that
    /// settled, and the upload answered 400 `too_many_rejects`.
    #[arg(long, env = "FEED_MAX_REJECTED_LINES", default_value_t = 100_000)]
    pub feed_max_rejected_lines: u64,

    /// Most rejected lines of a feed kept (with their reasons) in `feed_rejects`, its first ones;
    /// the rest are only counted in the feed's `rejected`.
    #[arg(long, env = "FEED_MAX_STORED_REJECTS", default_value_t = 1_000)]
    pub feed_max_stored_rejects: u64,

    /// Most distinct URLs of a feed remembered to reject duplicates (~20 bytes each); past it, a
    /// URL is still checked against those remembered, but no more are remembered.
    #[arg(long, env = "FEED_DEDUP_ENTRIES", default_value_t = 1_000_000)]
    pub feed_dedup_entries: usize,

    /// Longest the fetch of a feed's `source_url` may take, from the request to its last byte, in
    /// seconds; then the feed is interrupted (a resend with its key resumes it).
    #[arg(long, env = "FEED_SOURCE_DEADLINE_S", default_value_t = 3_600)]
    pub feed_source_deadline_s: u64,

    /// Fewest bytes a second a `source_url` must send, on average over each 60 s spent waiting for
    /// it (the first 60 s are its grace); a slower one is cut off and the feed interrupted. 0: any rate.
    #[arg(long, env = "FEED_SOURCE_MIN_BYTES_PER_S", default_value_t = 1_024)]
    pub feed_source_min_bytes_per_s: u64,

    /// Addresses a feed's `source_url` may point at although not public: CIDRs, IPs or host names,
    /// comma-separated; the rules of the classifier's image fetches, with a list of its own (none by
    /// default: public addresses only), so that opening a photo server never opens the services'.
    #[arg(long, env = "SOURCE_ALLOW", value_delimiter = ',')]
    pub source_allow: Vec<String>,

    /// The object stores `s3://` image URLs and feeds from a prefix may name.
    #[command(flatten)]
    pub stores: reefline_common::objects::StoreSettings,

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

    /// The models a submission may name (`"model"`).
    #[command(flatten)]
    pub models: reefline_common::models::ModelSettings,
}
