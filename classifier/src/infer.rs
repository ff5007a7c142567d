//! Stage 5, infer: each of a model's engines has its own thread; it takes batches from that
//! model's queue, runs the model and turns logits into labelled predictions.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;

use crate::batcher::EngineQueue;
use crate::engine::Engine;
use crate::error::ImageError;
use crate::job::{Classified, CurrentModel, ModelTag, Outcome, Prepared};
use crate::metrics::Metrics;
use crate::postprocess;
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
    pub image_len: usize,
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
    let Inference { mut engine, mut model, current, mut reload, labels, outputs, top_k, image_len, metrics, nice } =
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
                let n = batch.len();
                input.clear();
                for q in &batch {
                    input.extend_from_slice(&q.item.tensor);
                }
                debug_assert_eq!(input.len(), n * image_len);
                let spans: Vec<tracing::Span> = batch
                    .iter()
                    .map(|q| tracing::info_span!(parent: &q.item.job.span, "infer", batch_size = n))
                    .collect();
                for q in &mut batch {
                    q.item.job.lap(&metrics, "batch");
                }
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
                for (mut q, result) in batch.into_iter().zip(results) {
                    q.item.job.lap(&metrics, "infer");
                    if outcomes
                        .blocking_send(Outcome { job: q.item.job, model: model.clone(), result, cached: false })
                        .is_err()
                    {
                        return;
                    }
                }
            }
        })
        .expect("spawning the inference thread")
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
