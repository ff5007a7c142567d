//! Stages 2 and 3, fetch and preprocess: many concurrent fetches on the async runtime, then
//! decoding and preprocessing (at the input size of the model the request names) on a pool of
//! blocking threads sized to the cores; each input goes to its model's batching queue. A panic in
//! one image's stage (a parser's bug on hostile bytes) is caught where it happens and becomes that
//! image's `internal` error result: its offset finishes and the images behind it keep flowing.

use std::any::Any;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Instant;

use futures::FutureExt;
use reefline_schemas::rules::{SHORT_TEXT_BYTES, truncate};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::JoinError;
use tracing::Instrument;

use crate::error::ImageError;
use crate::fetch::Fetcher;
use crate::job::{Encoded, Input, Job, ModelTag, Outcome, Prepared};
use crate::metrics::Metrics;
use crate::preprocess::Preprocess;
use crate::turns::Turns;
use reefline_common::kafka::Lane;

/// A model the stage prepares input for: how (its input size) and where its inputs go (its
/// batching queue).
pub struct ModelInput {
    pub tag: Arc<ModelTag>,
    /// The version its engine runs now.
    pub current: crate::job::CurrentModel,
    pub preprocess: Preprocess,
    pub queue: mpsc::Sender<Prepared>,
}

/// What the stage needs.
pub struct Prepare {
    pub fetcher: Fetcher,
    /// The models served, and the index of the one a request naming none gets.
    pub models: Vec<ModelInput>,
    pub default_model: usize,
    pub fetch_concurrency: usize,
    pub decode_threads: usize,
    pub decode_nice: i32,
    /// Bulk images go to their engine undecoded (`BULK_DECODE`).
    pub engines_decode: bool,
    /// Pixels being decoded at once, across the decoding threads ([`PixelBudget`]).
    pub pixel_budget: PixelBudget,
    pub retry: RetryPolicy,
    pub metrics: Metrics,
    /// Predictions already made for the same bytes.
    pub cache: crate::cache::ResultCache,
}

/// Bounds the memory decoding takes by the pixels decoded at once, not only per image: a decode
/// takes the pixels it decodes to from the budget (read from its header: a JPEG scaled in the
/// IDCT holds a quarter to a sixty-fourth of its pixels) and gives them back when
/// the image is preprocessed. An image larger than the whole budget waits until it has the
/// budget to itself. Small photos decode side by side; two camera-sized ones may have to take turns.
pub struct PixelBudget {
    semaphore: Arc<Semaphore>,
    total: u32,
}

impl PixelBudget {
    pub fn new(total: u64) -> Self {
        let total = total.clamp(1, u64::from(u32::MAX)) as u32;
        Self { semaphore: Arc::new(Semaphore::new(total as usize)), total }
    }

    /// What decoding an image of `pixels` takes from the budget.
    pub fn cost(&self, pixels: u64) -> u32 {
        pixels.clamp(1, u64::from(self.total)) as u32
    }
}

/// Tasks that may wait for their host's turn, per fetch slot.
const QUEUE_PER_FETCH: usize = 16;

/// The places a lane's tasks take, at three levels. Waiting for their host's turn (its own slots,
/// rate and Retry-After) they hold only a place in a wide queue; from their turn on (fetching,
/// holding fetched bytes, decoding) a place among twice the fetches; fetching, a fetch slot. So a
/// slow or throttled host's images wait among themselves, and other hosts' go by them (up to the
/// queue's width); a task waiting out a retry delay holds neither of the others. Each lane has
/// its own, so that an interactive request never queues behind bulk ones for a place.
#[derive(Clone)]
struct Places {
    queued: Arc<Semaphore>,
    work: Arc<Semaphore>,
    fetches: Arc<Semaphore>,
    decoders: Arc<Semaphore>,
}

impl Places {
    fn new(stage: &Prepare) -> Self {
        Self {
            queued: Arc::new(Semaphore::new(stage.fetch_concurrency * QUEUE_PER_FETCH)),
            work: Arc::new(Semaphore::new(stage.fetch_concurrency * 2)),
            fetches: Arc::new(Semaphore::new(stage.fetch_concurrency)),
            decoders: Arc::new(Semaphore::new(stage.decode_threads)),
        }
    }
}

/// The requests the stage takes: each lane's, and the places bulk requests take in the whole
/// pipeline.
pub struct Lanes {
    pub interactive: mpsc::Receiver<Job>,
    pub bulk: mpsc::Receiver<Job>,
    /// Bulk requests the pipeline may hold at once (`BULK_IN_FLIGHT`): enough to keep the engine
    /// busy, few enough that an interactive request finds short queues.
    pub bulk_slots: Arc<Semaphore>,
    /// Bulk requests read and waiting for a place, taken in turns by tenant and feed.
    pub waiting: Turns<Job>,
    /// How many may wait: when as many do, the bulk channel fills and the consumer pauses.
    pub most_waiting: usize,
    /// `classifier_queue_depth{stage="admit"}`: how many wait.
    pub waiting_depth: prometheus::IntGauge,
}

impl Lanes {
    /// The next request: an interactive one whenever one waits, else a bulk one once a bulk
    /// slot is free, the next in turn; `None` once both lanes are closed and no request waits.
    async fn next(&mut self, open: &mut [bool; 2]) -> Option<Job> {
        loop {
            // Whatever is read already joins the turns first, so that a turn sees every feed.
            while open[1] && self.waiting.len() < self.most_waiting {
                match self.bulk.try_recv() {
                    Ok(job) => wait_in_turn(&mut self.waiting, job),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => open[1] = false,
                }
            }
            self.waiting_depth.set(self.waiting.len() as i64);
            let (any_waiting, room) = (!self.waiting.is_empty(), self.waiting.len() < self.most_waiting);
            tokio::select! {
                biased;
                job = self.interactive.recv(), if open[0] => match job {
                    Some(job) => return Some(job),
                    None => open[0] = false,
                },
                slot = self.bulk_slots.clone().acquire_owned(), if any_waiting => {
                    let mut job = self.waiting.pop()?;
                    job.slot = Some(slot.ok()?);
                    return Some(job);
                }
                job = self.bulk.recv(), if open[1] && room => match job {
                    Some(job) => wait_in_turn(&mut self.waiting, job),
                    None => open[1] = false,
                },
                else => return None,
            }
        }
    }
}

/// Queues a bulk request behind the others of its tenant and its feed (or submission).
fn wait_in_turn(waiting: &mut Turns<Job>, job: Job) {
    let request = &job.request;
    let tenant = request.tenant.clone();
    let source = request.feed_id.clone().unwrap_or_else(|| request.batch_id.clone());
    waiting.push(tenant.as_deref(), &source, job);
}

/// Runs until both lanes close and every fetch it started has been passed on.
pub async fn run(
    stage: Prepare,
    mut lanes: Lanes,
    // Failures skip the batch and go straight to the producer.
    failed: mpsc::Sender<Outcome>,
) {
    let places = [Places::new(&stage), Places::new(&stage)];
    let stage = Arc::new(stage);
    let mut tasks = tokio::task::JoinSet::new();
    let mut open = [true, true];
    while let Some(mut job) = lanes.next(&mut open).await {
        job.lap(&stage.metrics, "admit");
        let places = &places[usize::from(job.lane == Lane::Bulk)];
        // A request classifiers kept stopping on fails under its model, as one naming no served model does.
        let chosen = stage.model_for(&job).and_then(|model| match job.crashed {
            Some(tries) => Err((stage.models[model].tag.clone(), ImageError::CrashLoop { tries })),
            None => Ok(model),
        });
        let model = match chosen {
            Ok(model) => model,
            Err((tag, error)) => {
                if failed.send(Outcome { job, model: tag, result: Err(error), cached: false }).await.is_err() {
                    break;
                }
                continue;
            }
        };
        let Ok(permit) = places.queued.clone().acquire_owned().await else { break };
        tasks.spawn(prepare_one(stage.clone(), job, model, places.clone(), failed.clone(), permit));
        while let Some(joined) = tasks.try_join_next() {
            escaped(joined);
        }
    }
    while let Some(joined) = tasks.join_next().await {
        escaped(joined);
    }
}

/// One image, holding its place in the stage (`_queued`) until it is passed on: fetched, looked
/// up in the result cache, decoded, and given to its model's batching queue; or, cached or failed,
/// sent straight to the producer.
async fn prepare_one(
    stage: Arc<Prepare>,
    mut job: Job,
    model: usize,
    places: Places,
    failed: mpsc::Sender<Outcome>,
    _queued: tokio::sync::OwnedSemaphorePermit,
) {
    let input = &stage.models[model];
    let fetching = tracing::info_span!(parent: &job.span, "fetch");
    let fetched = caught(
        stage
            .fetch(&job.request.url, job.request.tenant.as_deref(), &places.work, &places.fetches)
            .instrument(fetching),
    )
    .await
    .unwrap_or_else(|panic| Err(panicked(&stage.metrics, "fetch", panic)));
    let learned = match fetched {
        Ok((bytes, working)) => stage.learn(bytes).await.map(|learned| (learned, working)),
        Err(error) => Err(error),
    };
    let decoded = match learned {
        Ok(((photo, bytes), _working)) => {
            // The same bytes classified before by the same model: its predictions, no decode.
            let model = input.current.read().map_or_else(|e| e.into_inner().clone(), |m| m.clone());
            let cached = stage.cache.get(&photo.sha256, &model, job.request.tenant.as_deref()).await;
            job.photo = Some(photo);
            if let Some(classified) = cached {
                job.lap(&stage.metrics, "prepare");
                let _ = failed.send(Outcome { job, model, result: Ok(classified), cached: true }).await;
                return;
            }
            // The decoder slot is held until the input is handed on: when the batching queue is
            // full, decoding stops rather than piling up finished tensors.
            let Ok(slot) = places.decoders.acquire().await else { return };
            let decoding = tracing::info_span!(parent: &job.span, "decode");
            let decoded = stage.model_input(input.preprocess, bytes, job.lane);
            let image = caught(decoded.instrument(decoding))
                .await
                .unwrap_or_else(|panic| Err(panicked(&stage.metrics, "decode", panic)));
            image.map(|image| (image, slot))
        }
        Err(error) => Err(error),
    };
    job.lap(&stage.metrics, "prepare");
    let _ = match decoded {
        Ok((image, _slot)) => input.queue.send(Prepared { job, input: image }).await.map_err(drop),
        Err(error) => {
            let outcome = Outcome { job, model: input.tag.clone(), result: Err(error), cached: false };
            failed.send(outcome).await.map_err(drop)
        }
    };
}

/// A panic's payload.
type Panic = Box<dyn Any + Send>;

/// Awaits one image's stage work, catching a panic in it.
async fn caught<T>(work: impl Future<Output = T>) -> Result<T, Panic> {
    AssertUnwindSafe(work).catch_unwind().await
}

/// Runs `work` on a blocking thread, catching a panic there.
async fn on_blocking_thread<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> Result<T, Panic> {
    tokio::task::spawn_blocking(move || std::panic::catch_unwind(AssertUnwindSafe(work)))
        .await
        // Cancelled: the runtime is shutting down, and the result will not be produced anyway.
        .unwrap_or_else(|e| Err(Box::new(e.to_string())))
}

/// Runs `work` on a new thread at the default priority, catching a panic.
async fn on_own_thread<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> Result<T, Panic> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("decode-interactive".into())
        .spawn(move || {
            let _ = tx.send(std::panic::catch_unwind(AssertUnwindSafe(work)));
        })
        .map_err(|e| Box::new(e.to_string()) as Panic)?;
    rx.await.unwrap_or_else(|e| Err(Box::new(e.to_string())))
}

/// Longest part of a panic's message an `internal` error repeats.
const PANIC_MESSAGE_BYTES: usize = 200;

/// What a panic said, when it said it as text.
fn panic_message(panic: &Panic) -> &str {
    match (panic.downcast_ref::<&str>(), panic.downcast_ref::<String>()) {
        (Some(message), _) => message,
        (_, Some(message)) => message,
        _ => "(no message)",
    }
}

/// The `internal` error a panic in one image's `stage` becomes, counted and logged.
pub(crate) fn panicked(metrics: &Metrics, stage: &'static str, panic: Panic) -> ImageError {
    let message = truncate(panic_message(&panic), PANIC_MESSAGE_BYTES);
    metrics.panics.with_label_values(&[stage]).inc();
    tracing::error!(stage, panic = message, "a stage panicked on one image; its result is an `internal` error");
    ImageError::Internal(format!("the {stage} stage panicked: {message}"))
}

/// Logs a task that ended in a panic outside every caught stage (its image gets no result).
fn escaped(joined: Result<(), JoinError>) {
    if let Err(e) = joined
        && let Ok(panic) = e.try_into_panic()
    {
        tracing::error!(panic = panic_message(&panic), "an image's task panicked outside its stages");
    }
}

/// How transient fetch failures are retried: with backoff (jittered, so that retries of many
/// images spread out), a bounded number of times.
#[derive(Clone, Copy, Debug)]
pub struct RetryPolicy {
    pub max_retries: u32,
    pub backoff: reefline_common::Backoff,
}

impl Prepare {
    /// The index of the model `job` names (the default when it names none); else the tag its
    /// result carries and why it cannot be classified.
    fn model_for(&self, job: &Job) -> Result<usize, (Arc<ModelTag>, ImageError)> {
        let Some(name) = job.request.model.as_deref() else { return Ok(self.default_model) };
        self.models.iter().position(|m| m.tag.name == name).ok_or_else(|| {
            let served = self.models.iter().map(|m| m.tag.name.as_str()).collect::<Vec<_>>().join(", ");
            let tag = ModelTag { name: truncate(name, SHORT_TEXT_BYTES).to_owned(), version: String::new() };
            (Arc::new(tag), ImageError::UnknownModel { name: truncate(name, 64).to_owned(), served })
        })
    }

    /// Hashes the bytes and reads their EXIF and header, on a blocking thread (a camera JPEG is
    /// megabytes).
    async fn learn(&self, bytes: Vec<u8>) -> Result<(crate::photo::Photo, Vec<u8>), ImageError> {
        on_blocking_thread(move || (crate::photo::learn(&bytes), bytes))
            .await
            .map_err(|panic| panicked(&self.metrics, "metadata", panic))
    }

    /// The model input, once the image's pixels fit in the decode budget; the caller holds a
    /// decoder slot. Where the engines decode (`BULK_DECODE`), a bulk image's bytes go to its
    /// engine, which decodes them into its batch ([`Input::Encoded`], holding the budget until
    /// then); else it is decoded here on a blocking thread at `DECODE_NICE`. An interactive image
    /// is decoded here on a thread of its own at the default priority, while the engines run: it
    /// is not held behind bulk decoding and inference (the blocking threads, once lowered, stay
    /// lowered).
    async fn model_input(&self, preprocess: Preprocess, bytes: Vec<u8>, lane: Lane) -> Result<Input, ImageError> {
        let inspected = preprocess.inspect(&bytes)?;
        let cost = self.pixel_budget.cost(inspected.decoded_pixels());
        let budget = self
            .pixel_budget
            .semaphore
            .clone()
            .acquire_many_owned(cost)
            .await
            .map_err(|e| ImageError::DecodeFailed(e.to_string()))?;
        if lane == Lane::Bulk && self.engines_decode {
            return Ok(Input::Encoded(Encoded { bytes, inspected, _budget: budget }));
        }
        let (started, nice) = (Instant::now(), self.decode_nice);
        let decode = move || {
            if lane == Lane::Bulk {
                crate::preprocess::lower_thread_priority(nice);
            }
            preprocess.run_inspected(&bytes, &inspected)
        };
        let decoded = match lane {
            Lane::Bulk => on_blocking_thread(decode).await,
            Lane::Interactive => on_own_thread(decode).await,
        };
        let tensor = decoded.map_err(|panic| panicked(&self.metrics, "decode", panic))??;
        drop(budget);
        self.metrics.preprocess_seconds.observe(started.elapsed().as_secs_f64());
        Ok(Input::Tensor(tensor))
    }

    /// Fetches, retrying transient failures after a delay that holds no slot; the bytes come with
    /// the place among the working tasks the fetch took (held until the image is handed on).
    async fn fetch(
        &self,
        url: &str,
        tenant: Option<&str>,
        work: &Arc<Semaphore>,
        fetches: &Semaphore,
    ) -> Result<(Vec<u8>, OwnedSemaphorePermit), ImageError> {
        let mut retry = 0;
        loop {
            let mut started = Instant::now();
            let tenant = tenant.unwrap_or(reefline_common::auth::DEFAULT_TENANT);
            let result = self.fetcher.fetch(url, tenant, work, fetches, || started = Instant::now()).await;
            match result {
                Ok((bytes, working)) => {
                    self.metrics.fetch_seconds.observe(started.elapsed().as_secs_f64());
                    self.metrics.fetch_bytes.inc_by(bytes.len() as u64);
                    return Ok((bytes, working));
                }
                Err(e) if e.is_transient() && retry < self.retry.max_retries => {
                    retry += 1;
                    self.metrics.fetch_retries.with_label_values(&[e.kind()]).inc();
                    tracing::debug!(url, retry, error = %e, "transient fetch failure; retrying");
                    tokio::time::sleep(self.retry.backoff.delay(retry)).await;
                }
                Err(e) => {
                    self.metrics.fetch_failures.with_label_values(&[e.kind()]).inc();
                    return Err(e);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pixel_budget_charges_what_an_image_decodes_to_at_most_the_whole_budget() {
        let budget = PixelBudget::new(100_000_000);
        assert_eq!(budget.cost(500 * 375), 187_500);
        assert_eq!(budget.cost(4000 * 3000), 12_000_000);
        assert_eq!(budget.cost(250_000_000), 100_000_000, "a huge image waits for the whole budget, never forever");
        assert_eq!(budget.cost(0), 1);
        assert_eq!(PixelBudget::new(u64::MAX).cost(u64::MAX), u32::MAX);
    }

    #[tokio::test]
    async fn a_panic_in_a_stage_becomes_an_internal_error_naming_the_stage_and_is_counted() {
        let metrics = Metrics::register(&prometheus::Registry::new()).unwrap();
        let on_runtime = caught(async { panic!("EXIF offset {} is out of range", 70_000) }).await;
        let error: ImageError = panicked(&metrics, "fetch", on_runtime.unwrap_err());
        assert_eq!(error.kind(), "internal");
        assert_eq!(error.to_string(), "internal error: the fetch stage panicked: EXIF offset 70000 is out of range");

        let on_blocking = on_blocking_thread(|| -> Vec<u8> { panic!("{}", "header ".repeat(1000)) }).await;
        let ImageError::Internal(message) = panicked(&metrics, "metadata", on_blocking.unwrap_err()) else {
            panic!("not internal")
        };
        assert!(message.starts_with("the metadata stage panicked: header header "), "{message}");
        assert!(message.len() <= 64 + PANIC_MESSAGE_BYTES, "the panic's message is truncated: {}", message.len());

        let unprintable = on_blocking_thread(|| std::panic::panic_any(7_u8)).await.unwrap_err();
        assert_eq!(
            panicked(&metrics, "decode", unprintable).to_string(),
            "internal error: the decode stage panicked: (no message)"
        );
        assert_eq!(on_blocking_thread(|| 7).await.ok(), Some(7), "work that does not panic gives its value");
        assert_eq!(caught(async { 7 }).await.ok(), Some(7));

        let counted = |stage: &str| metrics.panics.with_label_values(&[stage]).get();
        assert_eq!((counted("fetch"), counted("metadata"), counted("decode")), (1, 1, 1));
    }
}
