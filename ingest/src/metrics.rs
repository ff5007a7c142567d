//! Ingest's Prometheus metrics.

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry};

/// Counters and histograms for submissions.
pub struct Metrics {
    /// Submissions by route and outcome (accepted or an error kind).
    pub submissions: IntCounterVec,
    /// Image requests produced to Kafka, by route.
    pub images: IntCounterVec,
    /// Time to produce a submission's records and have them acknowledged.
    pub produce_seconds: HistogramVec,
    /// Images admitted and waiting for the broker's acknowledgement.
    pub pending: IntGauge,
    /// Submissions waiting for their results (`wait`).
    pub waiting: IntGauge,
    /// Submissions that waited, by route and whether all their results came in time.
    pub waits: IntCounterVec,
    /// Lines of feeds settled, by outcome (accepted or rejected).
    pub feed_lines: IntCounterVec,
    /// Images produced, by tenant (tenants are configured: the labels are bounded).
    pub tenant_images: IntCounterVec,
    /// Images of submissions produced, by lane (feeds and retries travel the bulk lane).
    pub lane_images: IntCounterVec,
    /// How long a feed's next lines waited for its share of the classifiers.
    pub feed_share_wait: prometheus::Histogram,
    /// Submissions refused for their tenant's quota, by tenant.
    pub quota_refusals: IntCounterVec,
}

impl Metrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let submissions = IntCounterVec::new(
            Opts::new("ingest_submissions_total", "Submissions by route and outcome"),
            &["route", "outcome"],
        )?;
        let images =
            IntCounterVec::new(Opts::new("ingest_images_total", "Image requests produced to Kafka"), &["route"])?;
        let produce_seconds = HistogramVec::new(
            HistogramOpts::new("ingest_produce_seconds", "Time until a submission's records are acknowledged")
                .buckets(reefline_common::ops::duration_buckets()),
            &["route"],
        )?;
        let pending = IntGauge::new("ingest_pending_images", "Images waiting for the broker's acknowledgement")?;
        let waiting = IntGauge::new("ingest_waiting_submissions", "Submissions waiting for their results")?;
        let waits = IntCounterVec::new(
            Opts::new("ingest_waits_total", "Submissions that waited for their results, by outcome"),
            &["route", "outcome"],
        )?;
        let feed_lines = IntCounterVec::new(
            Opts::new("ingest_feed_lines_total", "Lines of bulk feeds settled, by outcome"),
            &["outcome"],
        )?;
        let tenant_images = IntCounterVec::new(
            Opts::new("ingest_tenant_images_total", "Image requests produced to Kafka, by tenant"),
            &["tenant"],
        )?;
        let lane_images = IntCounterVec::new(
            Opts::new("ingest_lane_images_total", "Image requests of submissions produced to Kafka, by lane"),
            &["lane"],
        )?;
        registry.register(Box::new(lane_images.clone()))?;
        let feed_share_wait = prometheus::Histogram::with_opts(
            HistogramOpts::new("ingest_feed_share_wait_seconds", "Time a feed's next lines waited for its share")
                .buckets(reefline_common::ops::duration_buckets()),
        )?;
        registry.register(Box::new(feed_share_wait.clone()))?;
        let quota_refusals = IntCounterVec::new(
            Opts::new("ingest_quota_refusals_total", "Submissions refused for their tenant's quota, by tenant"),
            &["tenant"],
        )?;
        registry.register(Box::new(tenant_images.clone()))?;
        registry.register(Box::new(quota_refusals.clone()))?;
        registry.register(Box::new(feed_lines.clone()))?;
        registry.register(Box::new(pending.clone()))?;
        registry.register(Box::new(waiting.clone()))?;
        registry.register(Box::new(waits.clone()))?;
        registry.register(Box::new(submissions.clone()))?;
        registry.register(Box::new(images.clone()))?;
        registry.register(Box::new(produce_seconds.clone()))?;
        Ok(Self {
            submissions,
            images,
            produce_seconds,
            pending,
            waiting,
            waits,
            feed_lines,
            tenant_images,
            lane_images,
            feed_share_wait,
            quota_refusals,
        })
    }
}
