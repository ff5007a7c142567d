//! Reefline sink: writes results from Kafka into Postgres and serves the lookup API.

mod api;
mod consume;
mod error;
mod export;
mod feeds;
mod notify;
mod page;
mod search;
pub mod settings;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, Opts};
use rdkafka::consumer::{CommitMode, Consumer};
use reefline_common::auth::{ApiKeys, require_key};
use reefline_common::kafka::{LagContext, LagGauge};
use reefline_common::ops::{self, Readiness, duration_buckets};
use reefline_common::producer::FutureProducer;
use reefline_schemas::{BatchCompleted, Codec};
use tokio::net::TcpListener;

pub use crate::settings::Settings;

/// The `reefline-sink` command: settings from flags and environment, run until SIGINT/SIGTERM.
pub async fn main() -> anyhow::Result<()> {
    use clap::Parser;
    let _telemetry = reefline_common::telemetry::init("reefline-sink");
    let settings = Settings::parse();
    tracing::info!(?settings, "starting");
    let app = Application::build(settings).await?;
    app.run_until(reefline_common::shutdown_signal()).await
}

/// A sink with its database migrated, its consumer subscribed and its listener bound.
pub struct Application {
    listener: TcpListener,
    router: Router,
    streaming: Router,
    sink: consume::Sink,
    requests: consume::RequestLog,
    notifier: notify::Notifier,
    http: reefline_common::http::HttpLimits,
}

fn metrics(registry: &prometheus::Registry) -> prometheus::Result<consume::Metrics> {
    let m = consume::Metrics {
        rows: IntCounter::new("sink_rows_written_total", "Result rows upserted")?,
        received: IntCounter::new(
            "sink_results_received_total",
            "Result records read, redelivered duplicates included",
        )?,
        write_seconds: Histogram::with_opts(
            HistogramOpts::new("sink_write_seconds", "Time to write one batch in one transaction")
                .buckets(duration_buckets()),
        )?,
        batch_size: Histogram::with_opts(
            HistogramOpts::new("sink_batch_size", "Results per database transaction")
                .buckets(vec![1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0]),
        )?,
        write_failures: IntCounter::new("sink_write_failures_total", "Failed database transactions (retried)")?,
        dead_letters: IntCounterVec::new(
            Opts::new("sink_dead_letters_total", "Records moved to the dead-letter topic, by kind"),
            &["kind"],
        )?,
    };
    registry.register(Box::new(m.rows.clone()))?;
    registry.register(Box::new(m.received.clone()))?;
    registry.register(Box::new(m.write_seconds.clone()))?;
    registry.register(Box::new(m.batch_size.clone()))?;
    registry.register(Box::new(m.write_failures.clone()))?;
    registry.register(Box::new(m.dead_letters.clone()))?;
    Ok(m)
}

impl Application {
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let database_url = settings.database.url();
        let pool =
            reefline_store::connect(database_url, 8, Duration::from_secs(30), reefline_store::Schema::Known).await?;
        let lookups = reefline_store::sink::lookup_pool(
            database_url,
            settings.lookup_connections,
            Duration::from_millis(settings.lookup_timeout_ms),
        )?;
        let exports = exports(&settings)?;
        let t = &settings.topics;
        let topics = [&t.results, &t.dead_letter, &t.requests, &t.interactive, &t.batches].map(String::as_str);
        reefline_common::kafka::ensure_topics(&settings.kafka, &topics, settings.topics.partitions).await?;
        let registry = prometheus::Registry::new();
        // One gauge for both consumers: they read different topics.
        let lag = LagGauge::register(&registry, "sink_consumer_lag")?;
        let consumer: consume::LagConsumer =
            settings.kafka.consumer_config(&settings.group_id).create_with_context(LagContext(lag.clone()))?;
        consumer.subscribe(&[&settings.topics.results])?;
        let codec = Codec::new(&settings.registry)?;
        let wake = Arc::new(tokio::sync::Notify::new());
        let requests = request_log(&settings, &registry, lag, Parts { pool: &pool, codec: &codec, wake: &wake })?;
        let producer = settings.kafka.producer_config().create::<FutureProducer>()?;
        let notifier =
            notifier(&settings, &registry, producer.clone(), Parts { pool: &pool, codec: &codec, wake: &wake })?;
        let readiness = Readiness::default();
        readiness.set(true);
        let listener = TcpListener::bind(&settings.listen).await?;
        let keys = ApiKeys::load(&settings.auth)?;
        keys.announce("sink", listener.local_addr()?);
        let streaming =
            api::streaming_router(exports).route_layer(axum::middleware::from_fn_with_state(keys.clone(), require_key));
        let router = api::router(lookups)
            .route_layer(axum::middleware::from_fn_with_state(keys, require_key))
            .merge(ops::router(registry.clone(), readiness.clone()))
            .merge(reefline_common::docs::router(<api::ApiDoc as utoipa::OpenApi>::openapi()))
            .merge(page::router(&settings.ingest_url)?);
        let sink = consume::Sink {
            consumer,
            pool,
            codec,
            producer,
            dead_letter_topic: settings.topics.dead_letter.clone(),
            max_batch: settings.max_batch.max(1),
            linger: Duration::from_millis(settings.linger_ms),
            metrics: metrics(&registry)?,
            readiness,
            wake,
        };
        Ok(Self { listener, router, streaming, sink, requests, notifier, http: settings.http })
    }

    /// The address the lookup API listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("bound listener has an address")
    }

    /// Serves and consumes until `shutdown` resolves; commits what was written before returning.
    pub async fn run_until(self, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
        tracing::info!(addr = %self.local_addr(), "sink listening");
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let stopped = |rx: &tokio::sync::watch::Receiver<bool>| {
            let mut rx = rx.clone();
            async move {
                let _ = rx.wait_for(|s| *s).await;
            }
        };
        let server = tokio::spawn(reefline_common::http::serve_with_streaming(
            self.listener,
            self.router,
            self.streaming,
            self.http,
            stopped(&stop_rx),
        ));
        let (sink, requests, notifier) = (self.sink, self.requests, self.notifier);
        let register =
            reefline_common::register_schema::<BatchCompleted>(notifier.codec.clone(), notifier.topic.clone());
        let notices = notifier.run(stopped(&stop_rx));
        let results = async {
            sink.run(stopped(&stop_rx)).await;
            if let Err(e) = sink.consumer.commit_consumer_state(CommitMode::Sync) {
                tracing::debug!(error = %e, "final commit failed");
            }
        };
        let pending = async {
            requests.run(stopped(&stop_rx)).await;
            if let Err(e) = requests.consumer.commit_consumer_state(CommitMode::Sync) {
                tracing::debug!(error = %e, "final commit of the requests failed");
            }
        };
        let signal = async {
            shutdown.await;
            let _ = stop_tx.send(true);
        };
        tokio::join!(signal, results, pending, notices);
        register.abort();
        server.await?;
        // Both consumers leave their groups off the runtime, each within 10 s.
        let limit = Duration::from_secs(10);
        reefline_common::kafka::close(sink.consumer, "the results consumer", limit).await;
        reefline_common::kafka::close(requests.consumer, "the requests consumer", limit).await;
        tracing::info!("sink stopped");
        Ok(())
    }
}

/// What the sink's tasks share: the database, the Schema Registry codec, and the signal that a
/// batch may have completed.
struct Parts<'a> {
    pool: &'a sqlx::PgPool,
    codec: &'a Codec,
    wake: &'a Arc<tokio::sync::Notify>,
}

/// The exports' connections, class names and limits.
fn exports(settings: &Settings) -> anyhow::Result<export::Exports> {
    Ok(export::Exports {
        pool: reefline_store::sink::export_pool(
            settings.database.url(),
            settings.export_connections,
            settings.lookup_timeout_ms,
            Duration::from_secs(settings.export_timeout_s.max(1)),
        )?,
        classes: Arc::new(export::classes::Classes::load(&settings.models)?),
        running: Arc::default(),
        per_tenant: settings.exports_per_tenant.max(1),
        idle: Duration::from_secs(settings.export_idle_timeout_s.max(1)),
    })
}

/// The consumer that records every request, of both lanes, as pending.
fn request_log(
    settings: &Settings,
    registry: &prometheus::Registry,
    lag: LagGauge,
    parts: Parts<'_>,
) -> anyhow::Result<consume::RequestLog> {
    let consumer: consume::LagConsumer =
        settings.kafka.consumer_config(&settings.requests_group_id).create_with_context(LagContext(lag))?;
    consumer.subscribe(&[&settings.topics.requests, &settings.topics.interactive])?;
    let recorded = IntCounter::new("sink_requests_recorded_total", "Requests recorded as pending")?;
    let skipped = IntCounter::new("sink_requests_skipped_total", "Request records skipped as undecodable")?;
    registry.register(Box::new(recorded.clone()))?;
    registry.register(Box::new(skipped.clone()))?;
    Ok(consume::RequestLog {
        consumer,
        pool: parts.pool.clone(),
        codec: parts.codec.clone(),
        max_batch: settings.max_batch.max(1),
        linger: Duration::from_millis(settings.linger_ms),
        recorded,
        skipped,
        wake: parts.wake.clone(),
        tenants: reefline_common::tenant::TenantSeal::new(&settings.tenants)?,
    })
}

/// What tells of completed batches: the batches topic and the callbacks, retried.
fn notifier(
    settings: &Settings,
    registry: &prometheus::Registry,
    producer: FutureProducer,
    parts: Parts<'_>,
) -> anyhow::Result<notify::Notifier> {
    let notices = IntCounterVec::new(
        Opts::new("sink_batch_notices_total", "BatchCompleted records and callback attempts, by outcome"),
        &["kind", "outcome"],
    )?;
    registry.register(Box::new(notices.clone()))?;
    let policy = Arc::new(reefline_common::guard::AddressPolicy::from_allowlist(&settings.callback_allow));
    Ok(notify::Notifier {
        pool: parts.pool.clone(),
        producer,
        codec: parts.codec.clone(),
        topic: settings.topics.batches.clone(),
        client: notify::callback_client(policy.clone(), Duration::from_millis(settings.callback_timeout_ms))?,
        policy,
        secret: settings.callback_secret.clone(),
        public_url: settings.public_url.clone(),
        retry: notify::Retry {
            backoff: reefline_common::Backoff {
                base: Duration::from_millis(settings.callback_retry_base_ms),
                max: Duration::from_millis(settings.callback_retry_max_ms),
                jitter: false,
            },
            give_up_after: Duration::from_secs(settings.callback_give_up_after_s),
        },
        wake: parts.wake.clone(),
        notices,
    })
}
