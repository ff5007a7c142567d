//! The classifier's Prometheus metrics, one set per stage.

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};
use reefline_common::ops::duration_buckets;

/// Counters, gauges and histograms for every stage.
#[derive(Clone)]
pub struct Metrics {
    /// Results produced, by outcome (`ok` or the error kind).
    pub results: IntCounterVec,
    pub fetch_seconds: Histogram,
    pub fetch_bytes: IntCounter,
    pub fetch_failures: IntCounterVec,
    /// Transient fetch failures that were retried, by kind.
    pub fetch_retries: IntCounterVec,
    pub preprocess_seconds: Histogram,
    /// The batching and inference figures, by model (each has its own queue and engine).
    pub queue_seconds: HistogramVec,
    pub batch_size: HistogramVec,
    pub inference_seconds: HistogramVec,
    pub inference_per_image_seconds: HistogramVec,
    pub end_to_end_seconds: Histogram,
    pub dead_letters: IntCounterVec,
    /// 1 while the consumer has its partitions paused because the pipeline is full.
    pub paused: IntGauge,
    pub pauses: IntCounter,
    /// Items waiting in each bounded channel, by the stage that reads it.
    pub queue_depth: IntGaugeVec,
    /// Engine threads of each model (`ENGINES`).
    pub engines: IntGaugeVec,
    /// The largest batch each model runs (`MAX_BATCH_SIZE`, or as measured at start).
    pub batch_size_limit: IntGaugeVec,
    /// Result cache lookups by outcome.
    pub cache_lookups: IntCounterVec,
    /// Panics caught in one image's stage, by stage (each became an `internal` error result).
    pub panics: IntCounterVec,
    /// Where a request's time goes, by stage and lane: `broker` (from its producer to this read:
    /// linger, broker, fetch wait and any backlog ahead of it), `admit` (read, until the pipeline
    /// takes it), `prepare` (fetch and decode, with their waits), `batch` (in the batching queue
    /// and behind the engine), `infer`, `produce` (until its result is acknowledged).
    pub stage_seconds: HistogramVec,
}

impl Metrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let m = Maker(registry);
        let model = &["model"];
        Ok(Self {
            stage_seconds: m.seconds_by(
                "classifier_stage_seconds",
                "Time a request spends in each stage, by stage and lane",
                &["stage", "lane"],
            )?,
            results: m.counter_by("classifier_results_total", "Results produced, by outcome", &["outcome"])?,
            fetch_seconds: m.seconds("classifier_fetch_seconds", "Time to fetch one image")?,
            fetch_bytes: m.add(IntCounter::new("classifier_fetch_bytes_total", "Image bytes fetched"))?,
            fetch_failures: m.counter_by("classifier_fetch_failures_total", "Failed fetches by kind", &["kind"])?,
            fetch_retries: m.counter_by(
                "classifier_fetch_retries_total",
                "Transient fetch failures retried, by kind",
                &["kind"],
            )?,
            preprocess_seconds: m
                .seconds("classifier_preprocess_seconds", "Time to decode and preprocess one image")?,
            queue_seconds: m.seconds_by(
                "classifier_batch_queue_seconds",
                "Time the oldest image of a batch waited in its model's batching queue",
                model,
            )?,
            batch_size: m.add(HistogramVec::new(
                HistogramOpts::new("classifier_batch_size", "Images per inference batch, by model")
                    .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0]),
                model,
            ))?,
            inference_seconds: m.seconds_by(
                "classifier_inference_seconds",
                "Time to run one batch through the model",
                model,
            )?,
            inference_per_image_seconds: m.seconds_by(
                "classifier_inference_per_image_seconds",
                "Inference time per image of a batch, by model",
                model,
            )?,
            end_to_end_seconds: m
                .seconds("classifier_end_to_end_seconds", "From submission to the result being acknowledged")?,
            dead_letters: m.counter_by(
                "classifier_dead_letters_total",
                "Records moved to the dead-letter topic, by kind",
                &["kind"],
            )?,
            paused: m.add(IntGauge::new(
                "classifier_consumer_paused",
                "1 while partitions are paused because the pipeline is full",
            ))?,
            pauses: m.add(IntCounter::new(
                "classifier_consumer_pauses_total",
                "Times the partitions were paused for backpressure",
            ))?,
            queue_depth: m.gauge_by("classifier_queue_depth", "Items waiting for each stage", &["stage"])?,
            engines: m.gauge_by(
                "classifier_engines",
                "Engine threads of each model, each with its own session",
                model,
            )?,
            batch_size_limit: m.gauge_by(
                "classifier_batch_size_limit",
                "The largest batch each model runs (MAX_BATCH_SIZE, or measured at start)",
                model,
            )?,
            cache_lookups: m.counter_by(
                "classifier_cache_lookups_total",
                "Result cache lookups by outcome: hit (the model did not run), miss, error (a miss)",
                &["outcome"],
            )?,
            panics: m.counter_by(
                "classifier_panics_total",
                "Panics caught in one image's stage, by stage",
                &["stage"],
            )?,
        })
    }
}

/// Makes metrics and registers each as it is made.
struct Maker<'a>(&'a Registry);

impl Maker<'_> {
    fn add<M: prometheus::core::Collector + Clone + 'static>(
        &self,
        metric: prometheus::Result<M>,
    ) -> prometheus::Result<M> {
        let metric = metric?;
        self.0.register(Box::new(metric.clone()))?;
        Ok(metric)
    }

    fn seconds(&self, name: &str, help: &str) -> prometheus::Result<Histogram> {
        self.add(Histogram::with_opts(HistogramOpts::new(name, help).buckets(duration_buckets())))
    }

    fn seconds_by(&self, name: &str, help: &str, labels: &[&str]) -> prometheus::Result<HistogramVec> {
        self.add(HistogramVec::new(HistogramOpts::new(name, help).buckets(duration_buckets()), labels))
    }

    fn counter_by(&self, name: &str, help: &str, labels: &[&str]) -> prometheus::Result<IntCounterVec> {
        self.add(IntCounterVec::new(Opts::new(name, help), labels))
    }

    fn gauge_by(&self, name: &str, help: &str, labels: &[&str]) -> prometheus::Result<IntGaugeVec> {
        self.add(IntGaugeVec::new(Opts::new(name, help), labels))
    }
}
