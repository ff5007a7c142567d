//! Reefline classifier: a consumer-group member that turns image requests into labelled results.
//!
//! One image flows through one file per stage, in order: `consume` → `prepare` (fetch, then
//! decode/preprocess) → `batcher` → `infer` → `produce` → back to the lane's offsets
//! (`offsets.rs`, which both ends share).
//! Every model served has its own batching queue and its pool of engines, each on a thread of its
//! own; the stages around them are shared.
//! Stages talk through bounded channels, so a slow stage slows the one before it.

pub mod batcher;
mod cache;
mod consume;
mod deliveries;
pub mod engine;
pub mod error;
pub mod fetch;
pub use reefline_common::guard;
mod infer;
mod job;
mod jpeg;
mod metrics;
pub mod offsets;
pub mod photo;
mod pipeline;
pub mod postprocess;
mod prepare;
pub mod preprocess;
mod produce;
mod reload;
mod resample;
pub mod settings;
pub mod sizing;
mod turns;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use rdkafka::consumer::{CommitMode, Consumer};
use reefline_common::ops::{self, Readiness};
use reefline_common::producer::FutureProducer;
use reefline_schemas::{ClassificationResult, Codec, ImageRequest};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use crate::engine::{Engine, OrtEngine};
use crate::offsets::OffsetTracker;
use crate::offsets::{Context, Lanes, Offsets, RequestConsumer};
pub use crate::settings::Settings;
use reefline_common::kafka::Lane;
use reefline_common::labels::Labels;
use reefline_common::models::Model;

/// The `reefline-classifier` command: settings from flags and environment, run until SIGTERM.
pub async fn main() -> anyhow::Result<()> {
    use clap::Parser;
    let _telemetry = reefline_common::telemetry::init("reefline-classifier");
    let app = Application::build(Settings::parse()).await?;
    tracing::info!(ops = %app.local_addr(), "classifier built");
    app.run_until(reefline_common::shutdown_signal()).await
}

/// A classifier with its model loaded, its consumer subscribed and its ops listener bound.
pub struct Application {
    settings: Settings,
    listener: TcpListener,
    ops: Router,
    readiness: Readiness,
    /// One engine per model served, in manifest order.
    engines: Vec<ServedModel>,
    default_model: usize,
    /// Each lane's consumer and offsets.
    lanes: Lanes,
    metrics: metrics::Metrics,
    producer: FutureProducer,
    /// Produces interactive requests' results, each at once (no linger).
    interactive_producer: FutureProducer,
    codec: Codec,
    /// Whose each request is.
    tenants: reefline_common::tenant::TenantSeal,
}

impl Application {
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let manifest = settings.models.manifest()?;
        let models = settings.models.served(manifest.models.clone())?;
        let default_model = models.iter().position(|m| m.name == settings.models.default).unwrap_or(0);
        // Each class table read once, however many models name their outputs by it.
        let mut tables = std::collections::HashMap::<String, Labels>::new();
        let mut engines = Vec::with_capacity(models.len());
        for model in models {
            let labels = match tables.entry(model.labels.clone()) {
                std::collections::hash_map::Entry::Occupied(table) => table.get().clone(),
                std::collections::hash_map::Entry::Vacant(table) => {
                    table.insert(settings.models.classes(manifest.label_set(&model))?).clone()
                }
            };
            engines.push(load_model(&settings, model, labels).await?);
        }
        let t = &settings.topics;
        let topics = [&t.requests, &t.interactive, &t.results, &t.dead_letter].map(String::as_str);
        reefline_common::kafka::ensure_topics(&settings.kafka, &topics, settings.topics.partitions).await?;

        let registry = prometheus::Registry::new();
        let metrics = metrics::Metrics::register(&registry)?;
        // One gauge for both lanes' consumers: they read different topics.
        let lag = reefline_common::kafka::LagGauge::register(&registry, "classifier_consumer_lag")?;
        let lanes = Lanes {
            interactive: lane_consumer(&settings, Lane::Interactive, &lag)?,
            bulk: lane_consumer(&settings, Lane::Bulk, &lag)?,
        };
        offsets::InFlight::register(&registry, vec![lanes.interactive.tracker.clone(), lanes.bulk.tracker.clone()])?;
        let producer: FutureProducer = reefline_common::kafka::with_linger(
            &settings.kafka,
            settings.kafka.producer_config(),
            settings.bulk_linger_ms,
        )
        .create()?;
        let interactive_producer: FutureProducer =
            reefline_common::kafka::without_linger(&settings.kafka, settings.kafka.producer_config()).create()?;
        let codec = Codec::new(&settings.registry)?;

        let readiness = Readiness::default();
        let listener = TcpListener::bind(&settings.listen).await?;
        let ops = ops::router(registry, readiness.clone());
        let tenants = reefline_common::tenant::TenantSeal::new(&settings.tenants)?;
        Ok(Self {
            settings,
            listener,
            ops,
            readiness,
            engines,
            default_model,
            lanes,
            metrics,
            producer,
            interactive_producer,
            codec,
            tenants,
        })
    }

    /// Wraps each of every model's inference engines, e.g. to instrument or throttle it. A
    /// wrapped engine is not reloaded when its file is replaced.
    pub fn wrap_engine(mut self, wrap: impl Fn(Box<dyn Engine>) -> Box<dyn Engine>) -> Self {
        self.engines = self
            .engines
            .into_iter()
            .map(|served| ServedModel {
                engines: served.engines.into_iter().map(&wrap).collect(),
                reload: None,
                ..served
            })
            .collect();
        self
    }

    /// The address /metrics, /healthz and /readyz are served on.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("bound listener has an address")
    }

    /// Classifies until `shutdown` resolves; then stops consuming, finishes what is in flight,
    /// stores and commits its offsets, and returns.
    pub async fn run_until(self, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
        let ops_addr = self.local_addr();
        let Self { settings: s, listener, ops, readiness, engines, default_model, lanes, metrics, .. } = self;
        let (producer, codec, tenants) = (self.producer, self.codec, self.tenants);
        // The ops port keeps the API's connection limits: a silent or idle connection is closed.
        let (ops_stop, ops_stopped) = tokio::sync::oneshot::channel::<()>();
        let stopped = async move {
            let _ = ops_stopped.await;
        };
        let ops_server = tokio::spawn(reefline_common::http::serve(listener, ops, Default::default(), stopped));
        let parts = pipeline::Parts {
            settings: &s,
            metrics: &metrics,
            default_model,
            producer: producer.clone(),
            interactive_producer: self.interactive_producer.clone(),
            codec: codec.clone(),
            lanes: lanes.clone(),
            tenants: tenants.clone(),
        };
        let pipeline = pipeline::Pipeline::start(engines, parts)?;
        let probe = tokio::spawn(watch_dependencies(
            producer.clone(),
            s.topics.requests.clone(),
            s.registry.clone(),
            readiness.clone(),
        ));
        tracing::info!(ops = %ops_addr, topic = %s.topics.requests, interactive_topic = %s.topics.interactive, group = %s.group_id, "classifier running");
        let register = register_schemas(&codec, &s.topics);
        let consume = |lane: Lane| consume::Consume {
            lane,
            offsets: lanes.get(lane).clone(),
            metrics: metrics.clone(),
            codec: codec.clone(),
            producer: producer.clone(),
            dead_letter_topic: s.topics.dead_letter.clone(),
            max_url_bytes: s.max_url_bytes,
            tenants: tenants.clone(),
        };
        // Both lanes stop reading together. Each reads in a task of its own: a rebalance's drain
        // blocks its lane's task (inside its consumer's poll) and must not hold the other's.
        let shutdown = futures::FutureExt::shared(Box::pin(shutdown));
        let (interactive, bulk) = (pipeline.interactive.clone(), pipeline.bulk.clone());
        let reading = [
            tokio::spawn(consume::run(consume(Lane::Interactive), interactive, shutdown.clone())),
            tokio::spawn(consume::run(consume(Lane::Bulk), bulk, shutdown)),
        ];
        for lane in reading {
            lane.await?;
        }

        tracing::info!("draining in-flight requests");
        probe.abort();
        register.iter().for_each(tokio::task::JoinHandle::abort);
        readiness.set(false);
        pipeline.finish().await?;
        producer.flush(Duration::from_secs(10))?;
        self.interactive_producer.flush(Duration::from_secs(10))?;
        commit_and_hand_over(&lanes).await;
        let _ = ops_stop.send(());
        let _ = ops_server.await;
        close(lanes).await;
        tracing::info!("classifier stopped");
        Ok(())
    }
}

/// Registers both ends of the classifier's contract (so that cameras producing requests straight
/// to Kafka find the request schema too), each retried by a task of its own until it is.
fn register_schemas(codec: &Codec, topics: &reefline_common::kafka::Topics) -> Vec<tokio::task::JoinHandle<()>> {
    let requests = [&topics.requests, &topics.interactive]
        .map(|topic| reefline_common::register_schema::<ImageRequest>(codec.clone(), topic.clone()));
    let results = reefline_common::register_schema::<ClassificationResult>(codec.clone(), topics.results.clone());
    requests.into_iter().chain([results]).collect()
}

/// Closes both lanes' consumers, side by side.
async fn close(lanes: Lanes) {
    let Lanes { interactive, bulk } = lanes;
    let close = |offsets: Offsets, what| reefline_common::kafka::close(offsets.consumer, what, Duration::from_secs(10));
    tokio::join!(close(interactive, "the interactive requests consumer"), close(bulk, "the requests consumer"));
}

/// Commits each lane's offsets and, where nothing it took is left unfinished, records the clean
/// handover in the delivery ledger.
async fn commit_and_hand_over(lanes: &Lanes) {
    for lane in Lane::ALL {
        let offsets = lanes.get(lane);
        match offsets.consumer.commit_consumer_state(CommitMode::Sync) {
            Ok(()) | Err(rdkafka::error::KafkaError::ConsumerCommit(rdkafka::types::RDKafkaErrorCode::NoOffset)) => {
                offsets.hand_over_cleanly().await;
            }
            Err(e) => tracing::warn!(error = %e, lane = lane.as_str(), "final commit failed"),
        }
    }
}

/// Loads `model`'s engines (`ENGINES`, side by side) and, where `MAX_BATCH_SIZE` is 0, measures
/// its batch sizes on the first of them.
async fn load_model(settings: &Settings, mut model: Model, labels: Labels) -> anyhow::Result<ServedModel> {
    let path = settings.models.path(&model);
    let mut options = settings.ort_options(path.clone(), model.image_size);
    options.classes = Some(labels.len());
    let load: reload::Loader = Arc::new(move || Ok(Box::new(OrtEngine::load(&options)?)));
    let loading: Vec<_> = (0..settings.engines())
        .map(|_| {
            let load = load.clone();
            tokio::task::spawn_blocking(move || load())
        })
        .collect();
    let mut engines = Vec::with_capacity(loading.len());
    for engine in loading {
        engines.push(engine.await??);
    }
    let version = model.version.clone();
    let (watch, version) = tokio::task::spawn_blocking(move || reload::Reload::new(path, &version, load)).await??;
    // The version of the file as it is: the manifest's, unless the file was replaced.
    model.version = version;
    let batch_size = match settings.max_batch_size {
        0 => {
            let image_len = settings.preprocess(&model).tensor_len();
            let bound = Duration::from_millis(settings.batch_latency_ms);
            let costs;
            (engines, costs) = tokio::task::spawn_blocking(move || {
                let costs = sizing::measure(&mut engines[0], image_len, usize::MAX, bound);
                (engines, costs)
            })
            .await?;
            let costs = costs?;
            let measured: Vec<String> =
                costs.iter().map(|c| format!("{}: {:.2} ms", c.batch, c.per_image().as_secs_f64() * 1e3)).collect();
            let chosen = sizing::choose(&costs, bound);
            tracing::info!(model = %model.name, batch_size = chosen, per_image = ?measured, "batch size measured");
            chosen
        }
        n => n,
    };
    tracing::info!(model = %model.name, version = %model.version, engines = engines.len(), batch_size, "model loaded");
    Ok(ServedModel { model, labels, engines, batch_size, reload: Some(watch) })
}

/// A model the classifier serves, its engines (each with a session of its own), the batch size
/// they run, and what reloads them when its file is replaced.
struct ServedModel {
    model: Model,
    /// What its outputs are called.
    labels: Labels,
    engines: Vec<Box<dyn Engine>>,
    batch_size: usize,
    reload: Option<reload::Reload>,
}

/// Keeps `/readyz` telling whether the classifier can work: every 5 s, a metadata request for the
/// requests topic (the broker answers) and `GET /config` on the Schema Registry (it answers 2xx).
async fn watch_dependencies(
    producer: FutureProducer,
    topic: String,
    registry: reefline_schemas::RegistrySettings,
    readiness: Readiness,
) {
    use secrecy::ExposeSecret;
    let client = reqwest::Client::builder().timeout(Duration::from_secs(2)).no_proxy().build().ok();
    let config = format!("{}/config", registry.url.trim_end_matches('/'));
    loop {
        let broker = producer.broker_answers(&topic).await;
        let schemas = match &client {
            Some(client) => {
                let mut request = client.get(&config);
                if let Some(user) = &registry.user {
                    request = request.basic_auth(user, registry.password.as_ref().map(|p| p.expose_secret()));
                }
                request.send().await.is_ok_and(|r| r.status().is_success())
            }
            None => false,
        };
        let ready = broker && schemas;
        if ready != readiness.get() {
            if ready {
                tracing::info!("broker and schema registry reachable; ready");
            } else {
                tracing::warn!(broker, schema_registry = schemas, "a dependency is unreachable; not ready");
            }
        }
        readiness.set(ready);
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}

/// A lane's consumer, subscribed to its topic in its own group (the bulk lane's is `CLASSIFIER_GROUP`,
/// the interactive lane's the same with `.interactive`), with its offsets and delivery ledger.
fn lane_consumer(settings: &Settings, lane: Lane, lag: &reefline_common::kafka::LagGauge) -> anyhow::Result<Offsets> {
    let topic = lane.topic(&settings.topics);
    let group = match lane {
        Lane::Bulk => settings.group_id.clone(),
        Lane::Interactive => format!("{}.interactive", settings.group_id),
    };
    let tracker = Arc::new(Mutex::new(OffsetTracker::default()));
    let (backlog, modes) = (offsets::Backlog::default(), offsets::Modes::default());
    let deliveries =
        deliveries::Deliveries::new(Some(settings.database.url()), &group, topic, settings.delivery_limit)?;
    let context = Context {
        tracker: tracker.clone(),
        backlog: backlog.clone(),
        lag: lag.clone(),
        modes: modes.clone(),
        deliveries: deliveries.clone(),
    };
    let consumer: RequestConsumer = settings.kafka.consumer_config(&group).create_with_context(context)?;
    consumer.subscribe(&[topic])?;
    Ok(Offsets { consumer: Arc::new(consumer), backlog, tracker, topic: topic.to_owned(), modes, deliveries })
}

/// Samples how full each bounded channel is, for `classifier_queue_depth{stage}` (the stage that
/// reads it); ends once the pipeline has shut down.
async fn sample_queue_depths(
    metrics: metrics::Metrics,
    jobs: mpsc::WeakSender<job::Job>,
    prepared: Vec<mpsc::WeakSender<job::Prepared>>,
    batches: Vec<std::sync::Weak<batcher::EngineQueue<job::Prepared>>>,
    outcomes: mpsc::WeakSender<job::Outcome>,
) {
    fn depth<T>(tx: &mpsc::WeakSender<T>) -> Option<i64> {
        tx.upgrade().map(|tx| (tx.max_capacity() - tx.capacity()) as i64)
    }
    // A stage with one queue per model: the sum over the models' queues.
    fn total<T>(txs: &[mpsc::WeakSender<T>]) -> Option<i64> {
        txs.iter().filter_map(depth).reduce(|a, b| a + b)
    }
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tick.tick().await;
        let depths = [
            ("prepare", depth(&jobs)),
            ("batch", total(&prepared)),
            ("infer", batches.iter().filter_map(|q| Some(q.upgrade()?.len() as i64)).reduce(|a, b| a + b)),
            ("produce", depth(&outcomes)),
        ];
        if depths.iter().all(|(_, d)| d.is_none()) {
            return;
        }
        for (stage, d) in depths {
            metrics.queue_depth.with_label_values(&[stage]).set(d.unwrap_or(0));
        }
    }
}
