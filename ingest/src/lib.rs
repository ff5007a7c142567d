//! Reefline ingest: accepts image URLs over HTTP and produces one Kafka record per image.

mod error;
mod metrics;
mod routes;
pub mod settings;
pub mod validate;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use rdkafka::producer::FutureProducer;
use reefline_common::auth::{ApiKeys, require_key};
use reefline_common::ops::{self, Readiness};
use reefline_schemas::Codec;
use tokio::net::TcpListener;

pub use error::IngestError;
pub use settings::Settings;

/// Everything a request handler needs.
pub(crate) struct AppState {
    pub settings: Settings,
    pub producer: FutureProducer,
    pub codec: Codec,
    pub metrics: metrics::Metrics,
}

/// A bound, ready-to-run ingest service.
pub struct Application {
    listener: TcpListener,
    router: Router,
}

impl Application {
    /// Creates the topic if needed, connects the producer and binds the listener.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        reefline_common::kafka::ensure_topics(
            &settings.kafka,
            &[&settings.requests_topic],
            settings.requests_partitions,
        )
        .await?;
        let producer: FutureProducer = settings.kafka.producer_config().create()?;
        let codec = Codec::new(&settings.registry)?;
        let registry = prometheus::Registry::new();
        let metrics = metrics::Metrics::register(&registry)?;
        let readiness = Readiness::default();
        readiness.set(true);
        let listener = TcpListener::bind(&settings.listen).await?;
        let body_limit = settings.max_body_bytes;
        let state = Arc::new(AppState { settings, producer, codec, metrics });
        let keys = ApiKeys::load(&state.settings.auth)?;
        keys.announce("ingest", listener.local_addr()?);
        let router = routes::router(state)
            .layer(DefaultBodyLimit::max(body_limit))
            .route_layer(axum::middleware::from_fn_with_state(keys, require_key))
            .merge(ops::router(registry, readiness));
        Ok(Self { listener, router })
    }

    /// The address the service listens on (useful when bound to port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("bound listener has an address")
    }

    /// Serves until `shutdown` resolves, then finishes the requests in flight.
    pub async fn run_until(self, shutdown: impl Future<Output = ()> + Send + 'static) -> std::io::Result<()> {
        tracing::info!(addr = %self.local_addr(), "ingest listening");
        axum::serve(self.listener, self.router).with_graceful_shutdown(shutdown).await
    }
}
