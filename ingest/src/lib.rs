//! Reefline ingest: accepts image URLs over HTTP and produces one Kafka record per image.

mod error;
pub mod feeds;
mod metrics;
mod quota;
mod routes;
pub mod settings;
pub mod validate;
mod wait;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use reefline_common::auth::{ApiKeys, require_key};
use reefline_common::ops::{self, Readiness};
use reefline_common::producer::FutureProducer;
use reefline_schemas::{Codec, ImageRequest};
use tokio::net::TcpListener;

pub use error::IngestError;
pub use settings::Settings;

/// The `reefline-ingest` command: settings from flags and environment, run until SIGINT/SIGTERM.
pub async fn main() -> anyhow::Result<()> {
    use clap::Parser;
    let _telemetry = reefline_common::telemetry::init("reefline-ingest");
    let settings = Settings::parse();
    let app = Application::build(settings).await?;
    app.run_until(reefline_common::shutdown_signal()).await?;
    Ok(())
}

/// Everything a request handler needs.
pub(crate) struct AppState {
    pub settings: Settings,
    /// Names of the models a submission may ask for.
    pub models: Vec<String>,
    pub producer: FutureProducer,
    /// The interactive lane's producer: it sends each record at once (no linger).
    pub interactive_producer: FutureProducer,
    pub codec: Codec,
    pub metrics: metrics::Metrics,
    /// One permit per image that may wait for the broker's acknowledgement.
    pub pending: tokio::sync::Semaphore,
    /// Submissions waiting for their results.
    pub waiters: Arc<wait::Waiters>,
    /// The feeds ledger, once the database has been reached.
    pub feeds: Arc<std::sync::OnceLock<sqlx::PgPool>>,
    /// The client a feed's `source_url` is fetched with, and the address rules it follows.
    pub source_client: reqwest::Client,
    pub source_policy: Arc<reefline_common::guard::AddressPolicy>,
    /// The buckets `s3://` URLs may name, and the stores feeds from a prefix are listed in.
    pub stores: reefline_common::objects::Stores,
    /// Seals each request record's tenant.
    pub tenants: reefline_common::tenant::TenantSeal,
    /// Each tenant's rate.
    pub quotas: quota::Quotas,
}

impl AppState {
    /// Images admitted and not yet answered.
    pub fn pending_images(&self) -> usize {
        self.settings.max_pending_images - self.pending.available_permits()
    }

    /// How long the seed routes wait for results when a request names no `wait`.
    pub fn infer_wait(&self) -> std::time::Duration {
        std::time::Duration::from_secs_f64(self.settings.infer_wait_seconds.max(0.0))
    }
}

/// Keeps `/readyz` telling whether the broker answers: every second, a metadata request for the
/// requests topic through the producer's connections.
async fn watch_broker(state: Arc<AppState>, readiness: Readiness) {
    loop {
        let reachable = state.producer.broker_answers(&state.settings.topics.requests).await;
        if reachable != readiness.get() {
            if reachable {
                tracing::info!("broker reachable; ready");
            } else {
                tracing::warn!("broker unreachable; not ready (submissions will get 503)");
            }
        }
        readiness.set(reachable);
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}

/// The producer gives up on a record after the delivery timeout, so no submission waits longer;
/// its queue holds every image admitted, so admitted records are never refused for lack of room.
/// Properties given in `KAFKA_PROPERTIES` win.
fn producer_config(settings: &Settings) -> rdkafka::ClientConfig {
    let mut config = settings.kafka.producer_config();
    let ours = [
        ("message.timeout.ms", settings.delivery_timeout_ms.to_string()),
        ("queue.buffering.max.messages", settings.max_pending_images.clamp(1, i32::MAX as usize).to_string()),
        // Reconnect within a second of the broker coming back, not librdkafka's default 10 s.
        ("reconnect.backoff.max.ms", "1000".to_owned()),
    ];
    for (key, value) in ours {
        if !settings.kafka.properties.iter().any(|p| p.key == key) {
            config.set(key, value);
        }
    }
    config
}

/// Lets browser pages of `origins` submit: a preflight is answered before any key is asked for.
fn cors(origins: &[String]) -> anyhow::Result<tower_http::cors::CorsLayer> {
    use axum::http::{HeaderName, HeaderValue, Method, header};
    use tower_http::cors::{AllowOrigin, CorsLayer};
    let allow = if origins.iter().any(|o| o.trim() == "*") {
        AllowOrigin::any()
    } else {
        let origins: Vec<HeaderValue> =
            origins.iter().map(|o| HeaderValue::from_str(o.trim())).collect::<Result<_, _>>()?;
        AllowOrigin::list(origins)
    };
    Ok(CorsLayer::new()
        .allow_origin(allow)
        .allow_methods([Method::POST])
        .allow_headers([header::CONTENT_TYPE, header::AUTHORIZATION, HeaderName::from_static("x-api-key")])
        .max_age(std::time::Duration::from_secs(600)))
}

/// A bound, ready-to-run ingest service.
pub struct Application {
    listener: TcpListener,
    router: Router,
    streaming: Router,
    state: Arc<AppState>,
    readiness: Readiness,
    results: rdkafka::consumer::StreamConsumer,
}

/// The API's routes behind its keys, with the ops endpoints and the docs; and the feeds', which
/// stream for as long as their upload lasts: no body limit, no overall request timeout (an
/// upload that stops sending is cut off by FEED_IDLE_TIMEOUT_S instead).
fn routers(
    state: &Arc<AppState>,
    keys: ApiKeys,
    registry: prometheus::Registry,
    readiness: Readiness,
) -> anyhow::Result<(Router, Router)> {
    let router = routes::router(state.clone())
        .layer(DefaultBodyLimit::max(state.settings.max_body_bytes))
        .route_layer(axum::middleware::from_fn_with_state(keys.clone(), require_key))
        .merge(ops::router(registry, readiness))
        .merge(reefline_common::docs::router(<routes::ApiDoc as utoipa::OpenApi>::openapi()))
        .layer(cors(&state.settings.cors_origins)?);
    let streaming = feeds::router(state.clone())
        .route_layer(axum::middleware::from_fn_with_state(keys, require_key))
        .layer(cors(&state.settings.cors_origins)?);
    Ok((router, streaming))
}

/// Settings that cannot work together, refused at start naming what to change.
fn check(settings: &Settings, keys: &ApiKeys, tenants: &reefline_common::tenant::TenantSeal) -> anyhow::Result<()> {
    anyhow::ensure!(
        settings.max_pending_images >= settings.max_images,
        "INGEST_MAX_PENDING_IMAGES ({}) must be at least MAX_IMAGES_PER_REQUEST ({})",
        settings.max_pending_images,
        settings.max_images
    );
    // Open mode's callers are the default tenant's.
    let named = if keys.is_empty() { vec![reefline_common::auth::DEFAULT_TENANT.to_owned()] } else { keys.tenants() };
    if let Some(tenant) = named.into_iter().find(|t| t != tenants.kafka_tenant()) {
        anyhow::ensure!(
            tenants.can_seal(),
            "API keys name tenant `{tenant}`, but TENANT_SECRET is not set: without it the classifiers and the \
             sink cannot tell its requests from the requests topic's tenant (`{}`); set the same TENANT_SECRET \
             on ingest, every classifier and the sink",
            tenants.kafka_tenant()
        );
    }
    Ok(())
}

impl Application {
    /// Creates the topics if needed, connects the producer, starts reading results for waiting
    /// submissions and binds the listener.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let topics = &settings.topics;
        reefline_common::kafka::ensure_topics(
            &settings.kafka,
            &[&topics.requests, &topics.interactive, &topics.results],
            topics.partitions,
        )
        .await?;
        let keys = ApiKeys::load(&settings.auth)?;
        let tenants = reefline_common::tenant::TenantSeal::new(&settings.tenants)?;
        check(&settings, &keys, &tenants)?;
        let models = settings.models.load()?.into_iter().map(|m| m.name).collect();
        let producer: FutureProducer = producer_config(&settings).create()?;
        let interactive_producer: FutureProducer =
            reefline_common::kafka::without_linger(&settings.kafka, producer_config(&settings)).create()?;
        let pending = tokio::sync::Semaphore::new(settings.max_pending_images);
        let codec = Codec::new(&settings.registry)?;
        let registry = prometheus::Registry::new();
        let metrics = metrics::Metrics::register(&registry)?;
        let readiness = Readiness::default();
        let waiters = Arc::new(wait::Waiters::new(metrics.waiting.clone()));
        let results = wait::results_consumer(&settings.kafka, &settings.topics.results).await?;
        let listener = TcpListener::bind(&settings.listen).await?;
        let source_policy = Arc::new(reefline_common::guard::AddressPolicy::from_allowlist(&settings.source_allow));
        let source_client = feeds::source_client(source_policy.clone())?;
        // A listing is not tried again as a whole: the client retries each page itself.
        let access = reefline_common::objects::Access {
            connect_timeout: std::time::Duration::from_secs(10),
            timeout: std::time::Duration::from_secs(60),
            retries: 5,
        };
        let stores = reefline_common::objects::Stores::new(&settings.stores, access)?;
        let quotas = quota::Quotas::new(
            settings.tenant_images_per_second,
            settings.tenant_images_burst,
            settings.max_images,
            settings.tenant_max_pending_images,
        );
        let state = Arc::new(AppState {
            settings,
            models,
            producer,
            interactive_producer,
            codec,
            metrics,
            pending,
            waiters,
            feeds: Arc::default(),
            source_client,
            source_policy,
            stores,
            tenants,
            quotas,
        });
        keys.announce("ingest", listener.local_addr()?);
        let (router, streaming) = routers(&state, keys, registry, readiness.clone())?;
        Ok(Self { listener, router, streaming, state, readiness, results })
    }

    /// The address the service listens on (useful when bound to port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("bound listener has an address")
    }

    /// Serves until `shutdown` resolves, then finishes the requests in flight.
    pub async fn run_until(self, shutdown: impl Future<Output = ()> + Send + 'static) -> std::io::Result<()> {
        tracing::info!(addr = %self.local_addr(), "ingest listening");
        let probe = tokio::spawn(watch_broker(self.state.clone(), self.readiness));
        let follow = tokio::spawn(wait::follow(self.results, self.state.codec.clone(), self.state.waiters.clone()));
        let topic = self.state.settings.topics.requests.clone();
        let register = reefline_common::register_schema::<ImageRequest>(self.state.codec.clone(), topic);
        let ledger = tokio::spawn(feeds::connect_in_background(self.state.clone()));
        let (router, http) = (self.router, self.state.settings.http);
        reefline_common::http::serve_with_streaming(self.listener, router, self.streaming, http, shutdown).await;
        ledger.abort();
        probe.abort();
        follow.abort();
        register.abort();
        tracing::info!("ingest stopped");
        Ok(())
    }
}
