//! Reefline classifier: a consumer-group member that turns image requests into labelled results.
//!
//! One image flows through one file per stage, in order: `consume` → `prepare` (fetch, then
//! decode/preprocess) → `batcher` → `infer` → `produce` → back to `consume`'s offset store.
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

use crate::consume::{Context, Lanes, Offsets, RequestConsumer};
use crate::engine::{Engine, OrtEngine};
use crate::fetch::{FetchLimits, Fetcher};
use crate::offsets::OffsetTracker;
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
    labels: Labels,
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
        let labels = Labels::load(&settings.labels_path)?;
        let models = settings.models.load()?;
        let default_model = models.iter().position(|m| m.name == settings.models.default).unwrap_or(0);
        let mut engines = Vec::with_capacity(models.len());
        for model in models {
            engines.push(load_model(&settings, model).await?);
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
        metrics::InFlight::register(&registry, vec![lanes.interactive.tracker.clone(), lanes.bulk.tracker.clone()])?;
        let producer: FutureProducer = settings.kafka.producer_config().create()?;
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
            labels,
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
        let s = &self.settings;
        let metrics = self.metrics.clone();
        let (ops_stop_tx, ops_stop_rx) = tokio::sync::oneshot::channel::<()>();
        // The ops port keeps the API's connection limits: a silent or idle connection is closed.
        let ops_server = tokio::spawn(reefline_common::http::serve(
            self.listener,
            self.ops,
            reefline_common::http::HttpLimits::default(),
            async move {
                let _ = ops_stop_rx.await;
            },
        ));

        // Queues are sized by the largest batch any model runs.
        let batch = self.engines.iter().map(|served| served.batch_size).max().unwrap_or(1).max(1);
        let engines_each = self.engines.iter().map(|served| served.engines.len()).max().unwrap_or(1);
        let bulk_depth = s.bulk_depth(batch, engines_each);
        // Bulk requests read wait for a place in the pipeline (`BULK_IN_FLIGHT`) in the prepare
        // stage's turns, as many as its queue held before there were lanes: the consumer pauses
        // its partitions only when they and this hand-over channel are full, as rarely as it did
        // then (a partition revoked while paused has been seen to stall a cooperative rebalance).
        let most_waiting = batch * 4 + s.fetch_concurrency.max(1) * 16;
        let (jobs_tx, jobs_rx) = mpsc::channel(batch * 4);
        let (interactive_tx, interactive_rx) = mpsc::channel(batch * 4);
        let (outcome_tx, outcome_rx) = mpsc::channel(batch * 8);

        // One batching queue per model, so that a batch never mixes models, and its engine threads.
        let (mut inputs, mut batchers, mut engines) = (Vec::new(), Vec::new(), Vec::new());
        let (mut prepared_queues, mut batch_queues) = (Vec::new(), Vec::new());
        for ServedModel { model, engines: pool, batch_size, reload } in self.engines {
            let policy = batcher::BatchPolicy {
                max_size: batch_size,
                max_delay: Duration::from_millis(s.max_batch_delay_ms),
                engines: pool.len(),
                // Twice the bulk images, so an interactive one never waits behind them in the
                // channel; but at most 16 batches of 8 an engine, so that a large
                // `BULK_IN_FLIGHT` (far image hosts) does not hold its images' decoded tensors.
                most_queued: (2 * bulk_depth).min(16 * batch_size.max(8) * pool.len().max(1)),
            };
            metrics.engines.with_label_values(&[&model.name]).set(pool.len() as i64);
            metrics.batch_size_limit.with_label_values(&[&model.name]).set(batch_size as i64);
            let tag = Arc::new(job::ModelTag { name: model.name.clone(), version: model.version.clone() });
            let preprocess = s.preprocess(model.image_size);
            let (prepared_tx, prepared_rx) = mpsc::channel(batch * 4);
            let batches = Arc::new(batcher::EngineQueue::default());
            let (done_tx, done_rx) = mpsc::unbounded_channel();
            prepared_queues.push(prepared_tx.downgrade());
            batch_queues.push(Arc::downgrade(&batches));
            let (size, queued) = (
                metrics.batch_size.with_label_values(&[&model.name]),
                metrics.queue_seconds.with_label_values(&[&model.name]),
            );
            let urgent = |p: &job::Prepared| p.job.lane == Lane::Interactive;
            batchers.push(tokio::spawn(batcher::run(
                policy,
                prepared_rx,
                batches.clone(),
                done_rx,
                urgent,
                move |n, waited| {
                    size.observe(n as f64);
                    queued.observe(waited.as_secs_f64());
                },
            )));
            let current: job::CurrentModel = Arc::new(std::sync::RwLock::new(tag.clone()));
            for (i, engine) in pool.into_iter().enumerate() {
                let inference = infer::Inference {
                    engine,
                    model: tag.clone(),
                    current: current.clone(),
                    reload: reload.clone(),
                    labels: self.labels.clone(),
                    top_k: s.top_k,
                    image_len: preprocess.tensor_len(),
                    metrics: metrics.clone(),
                    nice: s.engine_nice,
                };
                engines.push(infer::spawn(inference, i, batches.clone(), outcome_tx.clone(), done_tx.clone()));
            }
            inputs.push(prepare::ModelInput { tag, current, preprocess, queue: prepared_tx });
        }

        let decode_threads = if s.decode_threads == 0 {
            std::thread::available_parallelism().map_or(2, usize::from)
        } else {
            s.decode_threads
        };
        let stage = prepare::Prepare {
            fetcher: Fetcher::new(
                FetchLimits {
                    connect_timeout: Duration::from_secs(s.fetch_connect_timeout_s),
                    total_timeout: Duration::from_secs(s.fetch_timeout_s),
                    max_bytes: s.max_image_bytes,
                    max_redirects: s.fetch_max_redirects,
                    per_host: s.fetch_per_host,
                    host_rate: s.fetch_host_rate,
                },
                guard::AddressPolicy::from_allowlist(&s.fetch_allow),
                reefline_common::objects::Stores::new(
                    &s.stores,
                    // Transient failures are tried again by the fetch stage, after a delay that holds no slot.
                    reefline_common::objects::Access {
                        connect_timeout: Duration::from_secs(s.fetch_connect_timeout_s),
                        timeout: Duration::from_secs(s.fetch_timeout_s),
                        retries: 0,
                    },
                )?,
            )?,
            models: inputs,
            default_model: self.default_model,
            fetch_concurrency: s.fetch_concurrency.max(1),
            decode_threads,
            decode_nice: s.decode_nice,
            pixel_budget: prepare::PixelBudget::new(s.decode_pixel_budget),
            cache: cache::ResultCache::new(
                s.result_cache.then(|| secrecy::ExposeSecret::expose_secret(&s.database_url)),
                s.result_cache_shared,
                Duration::from_secs(1),
                metrics.cache_lookups.clone(),
            )?,
            retry: prepare::RetryPolicy {
                max_retries: s.fetch_retries,
                backoff: reefline_common::Backoff {
                    base: Duration::from_millis(s.fetch_retry_base_ms),
                    max: Duration::from_millis(s.fetch_retry_max_ms),
                    jitter: true,
                },
            },
            metrics: metrics.clone(),
        };
        tokio::spawn(sample_queue_depths(
            metrics.clone(),
            jobs_tx.downgrade(),
            prepared_queues,
            batch_queues,
            outcome_tx.downgrade(),
        ));
        let lanes = prepare::Lanes {
            interactive: interactive_rx,
            bulk: jobs_rx,
            bulk_slots: Arc::new(tokio::sync::Semaphore::new(bulk_depth)),
            waiting: turns::Turns::default(),
            most_waiting,
            waiting_depth: metrics.queue_depth.with_label_values(&["admit"]),
        };
        let prepare = tokio::spawn(prepare::run(stage, lanes, outcome_tx.clone()));
        drop(outcome_tx);
        let stopping = produce::Stopping::default();
        let produce = tokio::spawn(produce::run(
            produce::Produce {
                producer: self.producer.clone(),
                interactive_producer: self.interactive_producer.clone(),
                codec: self.codec.clone(),
                topic: s.topics.results.clone(),
                dead_letter_topic: s.topics.dead_letter.clone(),
                lanes: self.lanes.clone(),
                metrics: metrics.clone(),
                stopping: stopping.clone(),
                tenants: self.tenants.clone(),
            },
            outcome_rx,
        ));

        let probe = tokio::spawn(watch_dependencies(
            self.producer.clone(),
            s.topics.requests.clone(),
            s.registry.clone(),
            self.readiness.clone(),
        ));
        tracing::info!(
            ops = %ops_addr,
            topic = %s.topics.requests,
            interactive_topic = %s.topics.interactive,
            group = %s.group_id,
            bulk_in_flight = bulk_depth,
            "classifier running"
        );
        // Both ends of its contract: cameras that produce requests straight to Kafka find it too.
        let register = [
            reefline_common::register_schema::<ImageRequest>(self.codec.clone(), s.topics.requests.clone()),
            reefline_common::register_schema::<ImageRequest>(self.codec.clone(), s.topics.interactive.clone()),
            reefline_common::register_schema::<ClassificationResult>(self.codec.clone(), s.topics.results.clone()),
        ];
        let consume = |lane: Lane| consume::Consume {
            lane,
            offsets: self.lanes.get(lane).clone(),
            metrics: metrics.clone(),
            codec: self.codec.clone(),
            producer: self.producer.clone(),
            dead_letter_topic: s.topics.dead_letter.clone(),
            max_url_bytes: s.max_url_bytes,
            tenants: self.tenants.clone(),
        };
        // Both lanes stop reading together. Each reads in a task of its own: a rebalance's drain
        // blocks its lane's task (inside its consumer's poll) and must not hold the other's.
        let shutdown = futures::FutureExt::shared(Box::pin(shutdown));
        let lanes = [
            tokio::spawn(consume::run(consume(Lane::Interactive), interactive_tx, shutdown.clone())),
            tokio::spawn(consume::run(consume(Lane::Bulk), jobs_tx, shutdown)),
        ];
        for lane in lanes {
            lane.await?;
        }

        tracing::info!("draining in-flight requests");
        stopping.begin();
        probe.abort();
        register.iter().for_each(tokio::task::JoinHandle::abort);
        self.readiness.set(false);
        prepare.await?;
        for batcher in batchers {
            batcher.await?;
        }
        produce.await?;
        for engine in engines {
            tokio::task::spawn_blocking(move || engine.join())
                .await?
                .map_err(|_| anyhow::anyhow!("inference thread panicked"))?;
        }
        self.producer.flush(Duration::from_secs(10))?;
        self.interactive_producer.flush(Duration::from_secs(10))?;
        for lane in Lane::ALL {
            let offsets = self.lanes.get(lane);
            match offsets.consumer.commit_consumer_state(CommitMode::Sync) {
                Ok(())
                | Err(rdkafka::error::KafkaError::ConsumerCommit(rdkafka::types::RDKafkaErrorCode::NoOffset)) => {
                    offsets.hand_over_cleanly().await;
                }
                Err(e) => tracing::warn!(error = %e, lane = lane.as_str(), "final commit failed"),
            }
        }
        let _ = ops_stop_tx.send(());
        let _ = ops_server.await;
        let Lanes { interactive, bulk } = self.lanes;
        let close =
            |offsets: Offsets, what| reefline_common::kafka::close(offsets.consumer, what, Duration::from_secs(10));
        tokio::join!(close(interactive, "the interactive requests consumer"), close(bulk, "the requests consumer"));
        tracing::info!("classifier stopped");
        Ok(())
    }
}

/// Loads `model`'s engines (`ENGINES`, side by side) and, where `MAX_BATCH_SIZE` is 0, measures
/// its batch sizes on the first of them.
async fn load_model(settings: &Settings, mut model: Model) -> anyhow::Result<ServedModel> {
    let path = settings.models.path(&model);
    let options = settings.ort_options(path.clone(), model.image_size);
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
            let image_len = settings.preprocess(model.image_size).tensor_len();
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
    Ok(ServedModel { model, engines, batch_size, reload: Some(watch) })
}

/// A model the classifier serves, its engines (each with a session of its own), the batch size
/// they run, and what reloads them when its file is replaced.
struct ServedModel {
    model: Model,
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
    let (backlog, modes) = (consume::Backlog::default(), consume::Modes::default());
    let deliveries = deliveries::Deliveries::new(
        Some(secrecy::ExposeSecret::expose_secret(&settings.database_url)),
        &group,
        topic,
        settings.delivery_limit,
    )?;
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
