//! Stage 5, infer: each of a model's engines has its own thread; it takes batches from that
//! model's queue, decodes their bulk images into the batch's input, runs the model and turns
//! logits into labelled predictions.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;

use crate::batcher::EngineQueue;
use crate::engine::Engine;
use crate::error::ImageError;
use crate::job::{Classified, CurrentModel, Input, Job, ModelTag, Outcome, Prepared};
use crate::metrics::Metrics;
use crate::postprocess;
use crate::preprocess::Preprocess;
use crate::reload::Reload;
use reefline_common::labels::Labels;
use reefline_common::models::Outputs;

/// One model's engine, what swaps it when its file is replaced, and what turns its logits into
/// predictions.
pub struct Inference {
    pub engine: Box<dyn Engine>,
    pub model: Arc<ModelTag>,
    /// Told of a swapped-in file's version.
    pub current: CurrentModel,
    pub reload: Option<Reload>,
    pub labels: Labels,
    /// Whether its outputs are logits or already probabilities.
    pub outputs: Outputs,
    pub top_k: usize,
    /// How its model's input is made from a bulk image's bytes.
    pub preprocess: Preprocess,
    pub metrics: Metrics,
    /// The thread's niceness (`ENGINE_NICE`).
    pub nice: i32,
}

/// Spawns engine `index`'s thread; it ends when `batches` is closed and empty. It sends one `done`
/// per batch.
pub fn spawn(
    inference: Inference,
    index: usize,
    batches: Arc<EngineQueue<Prepared>>,
    outcomes: mpsc::Sender<Outcome>,
    done: mpsc::UnboundedSender<()>,
) -> std::thread::JoinHandle<()> {
    let Inference { mut engine, mut model, current, mut reload, labels, outputs, top_k, preprocess, metrics, nice } =
        inference;
    std::thread::Builder::new()
        .name(format!("infer-{}-{index}", model.name))
        .spawn(move || {
            crate::preprocess::lower_thread_priority(nice);
            let mut input = Vec::new();
            while let Some(mut batch) = batches.take() {
                if let Some((fresh, version)) = reload.as_mut().and_then(Reload::check) {
                    engine = fresh;
                    model = Arc::new(ModelTag { name: model.name.clone(), version });
                    *current.write().unwrap_or_else(std::sync::PoisonError::into_inner) = model.clone();
                }
                // The batch's input, each bulk image decoded into it here; one that cannot be is
                // answered with its error at once and leaves the batch.
                input.clear();
                let mut jobs = Vec::with_capacity(batch.len());
                for q in &mut batch {
                    q.item.job.lap(&metrics, "batch");
                }
                for Prepared { mut job, input: image } in batch.into_iter().map(|q| q.item) {
                    match fill(&mut input, image, &preprocess, &mut job, &metrics) {
                        Ok(()) => jobs.push(job),
                        Err(error) => {
                            let failed = Outcome { job, model: model.clone(), result: Err(error), cached: false };
                            if outcomes.blocking_send(failed).is_err() {
                                return;
                            }
                        }
                    }
                }
                let n = jobs.len();
                debug_assert_eq!(input.len(), n * preprocess.tensor_len());
                if n == 0 {
                    let _ = done.send(());
                    continue;
                }
                let spans: Vec<tracing::Span> =
                    jobs.iter().map(|job| tracing::info_span!(parent: &job.span, "infer", batch_size = n)).collect();
                let started = Instant::now();
                let result = engine.infer(&input, n);
                let elapsed = started.elapsed().as_secs_f64();
                drop(spans);
                metrics.inference_seconds.with_label_values(&[&model.name]).observe(elapsed);
                metrics.inference_per_image_seconds.with_label_values(&[&model.name]).observe(elapsed / n as f64);
                let _ = done.send(());
                let results = classified(result, n, |scores| {
                    let predictions = postprocess::predictions(scores, outputs, &labels, top_k);
                    let marine_group = postprocess::marine_group(&predictions, &labels);
                    Classified { predictions, marine_group }
                });
                for (mut job, result) in jobs.into_iter().zip(results) {
                    job.lap(&metrics, "infer");
                    if outcomes.blocking_send(Outcome { job, model: model.clone(), result, cached: false }).is_err() {
                        return;
                    }
                }
            }
        })
        .expect("spawning the inference thread")
}

/// Appends an image's tensor to the batch's `input`: a tensor as it is; a bulk image's bytes
/// decoded and preprocessed into it (`stage="decode"`), a panic there caught as the prepare
/// stage's are. On an error `input` is as it was.
fn fill(
    input: &mut Vec<f32>,
    image: Input,
    preprocess: &Preprocess,
    job: &mut Job,
    metrics: &Metrics,
) -> Result<(), ImageError> {
    let encoded = match image {
        Input::Tensor(tensor) => {
            input.extend_from_slice(&tensor);
            return Ok(());
        }
        Input::Encoded(encoded) => encoded,
    };
    let _decoding = tracing::info_span!(parent: &job.span, "decode").entered();
    let (started, len) = (Instant::now(), input.len());
    let decoded = std::panic::catch_unwind(AssertUnwindSafe(|| {
        preprocess.run_inspected_into(&encoded.bytes, &encoded.inspected, input)
    }));
    // Its pixels go back to the decode budget.
    drop(encoded);
    let result = decoded.unwrap_or_else(|panic| Err(crate::prepare::panicked(metrics, "decode", panic)));
    match &result {
        Ok(()) => metrics.preprocess_seconds.observe(started.elapsed().as_secs_f64()),
        Err(_) => input.truncate(len),
    }
    job.lap(metrics, "decode");
    result
}

/// Each of a batch's `n` images classified from its row of the engine's outputs by `classify`; or,
/// when the batch failed, each an inference error saying why.
fn classified(
    result: Result<Vec<Vec<f32>>, crate::engine::EngineError>,
    n: usize,
    classify: impl Fn(&[f32]) -> Classified,
) -> Vec<Result<Classified, ImageError>> {
    match result {
        Ok(rows) => rows.iter().map(|scores| Ok(classify(scores))).collect(),
        Err(e) => {
            tracing::error!(error = %e, batch = n, "inference failed");
            (0..n).map(|_| Err(ImageError::Inference(e.to_string()))).collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::preprocess::TEST_LITE0 as P;
    use reefline_common::kafka::Lane;

    fn job() -> Job {
        let (request, span, lap_at) = (Default::default(), tracing::Span::none(), Instant::now());
        Job { request, lane: Lane::Bulk, partition: 0, offset: 0, photo: None, crashed: None, span, slot: None, lap_at }
    }

    fn encoded(bytes: Vec<u8>, budget: &Arc<tokio::sync::Semaphore>) -> Input {
        let inspected = P.inspect(&bytes).expect("an image within the limits");
        let _budget = budget.clone().try_acquire_owned().expect("the budget is free");
        Input::Encoded(crate::job::Encoded { bytes, inspected, _budget })
    }

    fn image(format: image::ImageFormat) -> Vec<u8> {
        let img = image::RgbImage::from_fn(300, 200, |x, y| image::Rgb([x as u8, y as u8, (x ^ y) as u8]));
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, format).expect("encodes");
        out.into_inner()
    }

    #[test]
    fn a_bulk_image_is_decoded_into_the_batch_as_alone_and_one_that_fails_leaves_the_batch_as_it_was() {
        let metrics = Metrics::register(&prometheus::Registry::new()).unwrap();
        let budget = Arc::new(tokio::sync::Semaphore::new(1));
        let jpeg = image(image::ImageFormat::Jpeg);
        let alone = P.run(&jpeg).unwrap();

        let mut input = vec![7.0; 5];
        fill(&mut input, Input::Tensor(vec![1.0; 3]), &P, &mut job(), &metrics).unwrap();
        fill(&mut input, encoded(jpeg, &budget), &P, &mut job(), &metrics).unwrap();
        assert_eq!(input[..8], [7.0, 7.0, 7.0, 7.0, 7.0, 1.0, 1.0, 1.0]);
        assert!(input[8..] == alone[..], "the batch holds the tensor decoding alone gives, to the bit");
        assert_eq!(budget.available_permits(), 1, "its pixels went back to the budget");

        // A PNG whose header reads but whose pixels do not.
        let mut broken = image(image::ImageFormat::Png);
        let idat = broken.windows(4).position(|w| w == b"IDAT").unwrap() + 6;
        broken[idat..idat + 64].fill(0);
        let before = input.clone();
        let error = fill(&mut input, encoded(broken, &budget), &P, &mut job(), &metrics).unwrap_err();
        assert_eq!(error.kind(), "decode_failed", "{error}");
        assert!(input == before, "the batch's input is as it was");
        assert_eq!(budget.available_permits(), 1);
        assert_eq!(metrics.preprocess_seconds.get_sample_count(), 1, "only the decoded image is timed");
    }
}
