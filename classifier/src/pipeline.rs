//! The pipeline assembled from its stages, in the order one image meets them, and taken down in
//! the same order: consume → prepare → batcher → infer → produce. `Application::run_until` starts
//! it with [`Pipeline::start`], runs the consumers until it is told to stop, then calls
//! [`Pipeline::finish`].

use std::sync::{Arc, Weak};
use std::time::Duration;

use reefline_common::kafka::Lane;
use reefline_common::producer::FutureProducer;
use reefline_schemas::Codec;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::batcher::{self, EngineQueue};
use crate::fetch::{FetchLimits, Fetcher};
use crate::job::{self, Job, Outcome, Prepared};
use crate::offsets::Lanes;
use crate::settings::Settings;
use crate::{ServedModel, cache, guard, infer, metrics, prepare, produce, turns};

/// How deep the queues between the stages are.
#[derive(Clone, Copy, Debug)]
pub struct Depths {
    /// The largest batch any model runs: every queue is sized by it.
    pub batch: usize,
    /// Bulk requests in the pipeline at once (`BULK_IN_FLIGHT`).
    pub bulk: usize,
    /// Bulk requests read and waiting for a place in the pipeline, in the prepare stage's turns.
    pub waiting: usize,
}

impl Depths {
    pub fn of(served: &[ServedModel], s: &Settings) -> Self {
        let batch = served.iter().map(|m| m.batch_size).max().unwrap_or(1).max(1);
        let engines_each = served.iter().map(|m| m.engines.len()).max().unwrap_or(1);
        // Bulk requests read wait for a place in the pipeline (`BULK_IN_FLIGHT`) in the prepare
        // stage's turns, as many as its queue held before there were lanes: the consumer pauses
        // its partitions only when they and this hand-over channel are full, as rarely as it did
        // then (a partition revoked while paused has been seen to stall a cooperative rebalance).
        Self { batch, bulk: s.bulk_depth(batch, engines_each), waiting: batch * 4 + s.fetch_concurrency.max(1) * 16 }
    }
}

/// What the stages after the consumers need from the application.
pub struct Parts<'a> {
    pub settings: &'a Settings,
    pub metrics: &'a metrics::Metrics,
    pub default_model: usize,
    pub producer: FutureProducer,
    pub interactive_producer: FutureProducer,
    pub codec: Codec,
    pub lanes: Lanes,
    pub tenants: reefline_common::tenant::TenantSeal,
}

/// The running stages after the consumers, and the channels the consumers feed them through.
pub struct Pipeline {
    /// Where each lane's consumer sends the requests it reads.
    pub interactive: mpsc::Sender<Job>,
    pub bulk: mpsc::Sender<Job>,
    prepare: JoinHandle<()>,
    batchers: Vec<JoinHandle<()>>,
    engines: Vec<std::thread::JoinHandle<()>>,
    produce: JoinHandle<()>,
    stopping: produce::Stopping,
}

/// One batching queue per model, so that a batch never mixes models, with its engine threads.
struct Models {
    inputs: Vec<prepare::ModelInput>,
    batchers: Vec<JoinHandle<()>>,
    engines: Vec<std::thread::JoinHandle<()>>,
    prepared: Vec<mpsc::WeakSender<Prepared>>,
    batches: Vec<Weak<EngineQueue<Prepared>>>,
}

impl Pipeline {
    /// Starts every stage after the consumers, each model's batcher and engines included.
    pub fn start(served: Vec<ServedModel>, parts: Parts<'_>) -> anyhow::Result<Self> {
        let (s, metrics) = (parts.settings, parts.metrics);
        let depths = Depths::of(&served, s);
        let (bulk, bulk_rx) = mpsc::channel(depths.batch * 4);
        let (interactive, interactive_rx) = mpsc::channel(depths.batch * 4);
        let (outcome_tx, outcome_rx) = mpsc::channel(depths.batch * 8);
        let models = start_models(served, &parts, depths, &outcome_tx);
        tokio::spawn(crate::sample_queue_depths(
            metrics.clone(),
            bulk.downgrade(),
            models.prepared,
            models.batches,
            outcome_tx.downgrade(),
        ));
        let lanes = prepare::Lanes {
            interactive: interactive_rx,
            bulk: bulk_rx,
            bulk_slots: Arc::new(tokio::sync::Semaphore::new(depths.bulk)),
            waiting: turns::Turns::default(),
            most_waiting: depths.waiting,
            waiting_depth: metrics.queue_depth.with_label_values(&["admit"]),
        };
        let stage = prepare_stage(s, models.inputs, parts.default_model, metrics)?;
        let prepare = tokio::spawn(prepare::run(stage, lanes, outcome_tx.clone()));
        drop(outcome_tx);
        let stopping = produce::Stopping::default();
        let produce = produce::Produce {
            producer: parts.producer,
            interactive_producer: parts.interactive_producer,
            codec: parts.codec,
            topic: s.topics.results.clone(),
            dead_letter_topic: s.topics.dead_letter.clone(),
            lanes: parts.lanes,
            metrics: metrics.clone(),
            stopping: stopping.clone(),
            tenants: parts.tenants,
        };
        let produce = tokio::spawn(produce::run(produce, outcome_rx));
        tracing::info!(bulk_in_flight = depths.bulk, "pipeline running");
        let (batchers, engines) = (models.batchers, models.engines);
        Ok(Self { interactive, bulk, prepare, batchers, engines, produce, stopping })
    }

    /// Once the consumers have stopped (and dropped their senders): lets every request in the
    /// pipeline through, stage after stage, and waits for the engine threads.
    pub async fn finish(self) -> anyhow::Result<()> {
        drop((self.interactive, self.bulk));
        self.stopping.begin();
        self.prepare.await?;
        for batcher in self.batchers {
            batcher.await?;
        }
        self.produce.await?;
        for engine in self.engines {
            tokio::task::spawn_blocking(move || engine.join())
                .await?
                .map_err(|_| anyhow::anyhow!("inference thread panicked"))?;
        }
        Ok(())
    }
}

/// Each model's batcher and engine threads, and the queue the prepare stage fills for it.
fn start_models(
    served: Vec<ServedModel>,
    parts: &Parts<'_>,
    depths: Depths,
    outcomes: &mpsc::Sender<Outcome>,
) -> Models {
    let (s, metrics) = (parts.settings, parts.metrics);
    let mut models = Models { inputs: vec![], batchers: vec![], engines: vec![], prepared: vec![], batches: vec![] };
    for ServedModel { model, labels, engines: pool, batch_size, reload } in served {
        let policy = batcher::BatchPolicy {
            max_size: batch_size,
            max_delay: Duration::from_millis(s.max_batch_delay_ms),
            engines: pool.len(),
            // Twice the bulk images, so an interactive one never waits behind them in the
            // channel; but at most 16 batches of 8 an engine, so that a large
            // `BULK_IN_FLIGHT` (far image hosts) does not hold its images' decoded tensors.
            most_queued: (2 * depths.bulk).min(16 * batch_size.max(8) * pool.len().max(1)),
        };
        metrics.engines.with_label_values(&[&model.name]).set(pool.len() as i64);
        metrics.batch_size_limit.with_label_values(&[&model.name]).set(batch_size as i64);
        let tag = Arc::new(job::ModelTag { name: model.name.clone(), version: model.version.clone() });
        let preprocess = s.preprocess(&model);
        let (prepared_tx, prepared_rx) = mpsc::channel(depths.batch * 4);
        let batches = Arc::new(EngineQueue::default());
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        models.prepared.push(prepared_tx.downgrade());
        models.batches.push(Arc::downgrade(&batches));
        let size = metrics.batch_size.with_label_values(&[&model.name]);
        let queued = metrics.queue_seconds.with_label_values(&[&model.name]);
        let urgent = |p: &Prepared| p.job.lane == Lane::Interactive;
        let dispatched = move |n: usize, waited: Duration| {
            size.observe(n as f64);
            queued.observe(waited.as_secs_f64());
        };
        models.batchers.push(tokio::spawn(batcher::run(
            policy,
            prepared_rx,
            batches.clone(),
            done_rx,
            urgent,
            dispatched,
        )));
        let current: job::CurrentModel = Arc::new(std::sync::RwLock::new(tag.clone()));
        for (i, engine) in pool.into_iter().enumerate() {
            let inference = infer::Inference {
                engine,
                model: tag.clone(),
                current: current.clone(),
                reload: reload.clone(),
                labels: labels.clone(),
                outputs: model.outputs,
                top_k: s.top_k,
                preprocess,
                metrics: metrics.clone(),
                nice: s.engine_nice,
            };
            models.engines.push(infer::spawn(inference, i, batches.clone(), outcomes.clone(), done_tx.clone()));
        }
        models.inputs.push(prepare::ModelInput { tag, current, preprocess, queue: prepared_tx });
    }
    models
}

/// The prepare stage: fetches (with their limits, address rules and object stores), the result
/// cache, decoding on threads bounded to the cores, and each model's input.
fn prepare_stage(
    s: &Settings,
    models: Vec<prepare::ModelInput>,
    default_model: usize,
    metrics: &metrics::Metrics,
) -> anyhow::Result<prepare::Prepare> {
    let connect_timeout = Duration::from_secs(s.fetch_connect_timeout_s);
    let limits = FetchLimits {
        connect_timeout,
        total_timeout: Duration::from_secs(s.fetch_timeout_s),
        max_bytes: s.max_image_bytes,
        max_redirects: s.fetch_max_redirects,
        per_host: s.fetch_per_host,
        host_rate: s.fetch_host_rate,
    };
    // Transient failures are tried again by the fetch stage, after a delay that holds no slot.
    let access = reefline_common::objects::Access { connect_timeout, timeout: limits.total_timeout, retries: 0 };
    let stores = reefline_common::objects::Stores::new(&s.stores, access)?;
    let database = s.result_cache.then(|| s.database.url());
    Ok(prepare::Prepare {
        fetcher: Fetcher::new(limits, guard::AddressPolicy::from_allowlist(&s.fetch_allow), stores)?,
        models,
        default_model,
        fetch_concurrency: s.fetch_concurrency.max(1),
        decode_threads: match s.decode_threads {
            0 => std::thread::available_parallelism().map_or(2, usize::from),
            n => n,
        },
        decode_nice: s.decode_nice,
        engines_decode: s.engines_decode(),
        pixel_budget: prepare::PixelBudget::new(s.decode_pixel_budget),
        cache: cache::ResultCache::new(
            database,
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
    })
}
