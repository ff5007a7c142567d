//! Stages 2 and 3, fetch and preprocess: many concurrent fetches on the async runtime, then
//! decoding and preprocessing on a pool of blocking threads sized to the cores.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{Semaphore, mpsc};

use crate::consume::Job;
use crate::error::ImageError;
use crate::fetch::Fetcher;
use crate::metrics::Metrics;
use crate::preprocess::Preprocess;

/// A request with its model input, ready for the batching queue.
pub struct Prepared {
    pub job: Job,
    pub tensor: Vec<f32>,
}

/// A request that failed before inference.
pub struct Failed {
    pub job: Job,
    pub error: ImageError,
}

/// What the stage needs.
pub struct Prepare {
    pub fetcher: Fetcher,
    pub preprocess: Preprocess,
    pub fetch_concurrency: usize,
    pub decode_threads: usize,
    pub metrics: Metrics,
}

/// Runs until `jobs` closes and every fetch it started has been passed on.
pub async fn run(
    stage: Prepare,
    mut jobs: mpsc::Receiver<Job>,
    prepared: mpsc::Sender<Prepared>,
    failed: mpsc::Sender<Failed>,
) {
    let fetches = Arc::new(Semaphore::new(stage.fetch_concurrency));
    let decoders = Arc::new(Semaphore::new(stage.decode_threads));
    let stage = Arc::new(stage);
    let mut tasks = tokio::task::JoinSet::new();
    while let Some(job) = jobs.recv().await {
        let Ok(permit) = fetches.clone().acquire_owned().await else { break };
        let (stage, decoders, prepared, failed) = (stage.clone(), decoders.clone(), prepared.clone(), failed.clone());
        tasks.spawn(async move {
            let result = stage.prepare(&job.request.url, &decoders).await;
            drop(permit);
            let _ = match result {
                Ok(tensor) => prepared.send(Prepared { job, tensor }).await.map_err(drop),
                Err(error) => failed.send(Failed { job, error }).await.map_err(drop),
            };
        });
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
}

impl Prepare {
    async fn prepare(&self, url: &str, decoders: &Arc<Semaphore>) -> Result<Vec<f32>, ImageError> {
        let started = Instant::now();
        let bytes = self
            .fetcher
            .fetch(url)
            .await
            .inspect_err(|e| self.metrics.fetch_failures.with_label_values(&[e.kind()]).inc())?;
        self.metrics.fetch_seconds.observe(started.elapsed().as_secs_f64());
        self.metrics.fetch_bytes.inc_by(bytes.len() as u64);
        let _permit = decoders.acquire().await.map_err(|e| ImageError::DecodeFailed(e.to_string()))?;
        let preprocess = self.preprocess;
        let started = Instant::now();
        let tensor = tokio::task::spawn_blocking(move || preprocess.run(&bytes))
            .await
            .map_err(|e| ImageError::DecodeFailed(format!("decoder panicked: {e}")))??;
        self.metrics.preprocess_seconds.observe(started.elapsed().as_secs_f64());
        Ok(tensor)
    }
}
