//! What travels between the stages: a request read from Kafka ([`Job`]), its model input once
//! fetched and preprocessed ([`Prepared`]), and its final outcome ([`Outcome`]) with the model
//! that gave it ([`ModelTag`]). Every stage imports these from here; besides them, the infer stage
//! takes its batches from the batcher's queue, and the produce stage marks offsets done through
//! the consume stage's lanes.

use std::sync::Arc;
use std::time::Instant;

use reefline_common::kafka::Lane;
use reefline_schemas::{ImageRequest, Prediction};

use crate::error::ImageError;
use crate::metrics::Metrics;
use crate::photo::Photo;

/// One request on its way through the pipeline, with where it came from.
pub struct Job {
    pub request: ImageRequest,
    /// The lane it was read from, and its place there.
    pub lane: Lane,
    pub partition: i32,
    pub offset: i64,
    /// What its bytes said, once fetched.
    pub photo: Option<Photo>,
    /// Set when classifiers stopped this many times working on it alone: it is failed with
    /// [`ImageError::CrashLoop`] instead of being tried again.
    pub crashed: Option<u32>,
    /// Its `classify` span (a child of the trace its record carried), open until its result is
    /// produced; each stage's span is a child of it.
    pub span: tracing::Span,
    /// A bulk request's place among the bulk requests the pipeline may hold
    /// (`BULK_IN_FLIGHT`), given back when its result reaches the producer: a result waiting out
    /// `BULK_LINGER_MS` and the broker's acknowledgement holds no place an engine's next image
    /// could take (with a 200 ms linger they held nearly all 32, and the cores stood idle).
    pub slot: Option<tokio::sync::OwnedSemaphorePermit>,
    /// When its current stage began (when it was read, at first), for the latency of each stage.
    pub lap_at: Instant,
}

impl Job {
    /// Ends the stage it was in: the time since the last lap is observed under `stage` and its lane.
    pub fn lap(&mut self, metrics: &Metrics, stage: &'static str) {
        let now = Instant::now();
        let seconds = now.duration_since(self.lap_at).as_secs_f64();
        metrics.stage_seconds.with_label_values(&[stage, self.lane.as_str()]).observe(seconds);
        self.lap_at = now;
    }
}

/// A model as results name it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelTag {
    pub name: String,
    pub version: String,
}

/// The model version an engine runs now: the engine thread changes it when it swaps in a replaced
/// file, and the result cache looks predictions up under it.
pub type CurrentModel = Arc<std::sync::RwLock<Arc<ModelTag>>>;

/// A request with its model input, ready for its model's batching queue.
pub struct Prepared {
    pub job: Job,
    pub input: Input,
}

/// A model input: the tensor, or the bytes the engine decodes into its batch.
pub enum Input {
    /// Decoded already: an interactive image, decoded on a thread of its own while the engines
    /// run, so that its answer never waits for a decode behind bulk ones.
    Tensor(Vec<f32>),
    /// A bulk image, decoded by the engine thread that runs it, straight into the batch's input:
    /// one core then decodes, resizes and infers it in turn, with no hand-off between threads, no
    /// tensor of its own, and its pixels still in that core's cache when inference reads them.
    Encoded(Encoded),
}

/// A bulk image's bytes, inspected and within the limits, waiting for its engine to decode them.
pub struct Encoded {
    pub bytes: Vec<u8>,
    pub inspected: crate::preprocess::Inspected,
    /// Its pixels' share of the decode budget, held until it is decoded.
    pub _budget: tokio::sync::OwnedSemaphorePermit,
}

/// What the model said of one image: the top classes and, when the top one is a marine animal,
/// its group.
#[derive(Clone, Debug, PartialEq)]
pub struct Classified {
    pub predictions: Vec<Prediction>,
    pub marine_group: Option<String>,
}

/// A request's final outcome, ready to be produced, with the model that gave it (or was asked
/// for, when it is not served).
pub struct Outcome {
    pub job: Job,
    pub model: Arc<ModelTag>,
    pub result: Result<Classified, ImageError>,
    /// The predictions came from the result cache: the model did not run.
    pub cached: bool,
}
