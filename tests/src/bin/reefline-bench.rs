//! The project's single-process limit, for `make bench` (scripts/bench.py): read bytes → decode →
//! preprocess → batched inference, in one process, no network, no Kafka, with the classifier's own
//! code and default settings, over the bench photos (`photos/` and `bench-photos/` in the cache,
//! or the folders `--photos` names).
//! Prints one JSON line: `{"images": N, "photos": P, "images_per_s": X}`.
//!
//! With `--serve`, serves those photos instead for the pipeline runs: `GET /p/{n}` answers photo
//! `n` modulo their count. It prints `{"url": BASE, "photos": P}`, then serves until its standard
//! input closes.
//! (A lean server, so that the benchmark's own photo server takes as little as it can of the
//! cores the pipeline is measured on.)

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use reefline_classifier::engine::{Engine, OrtEngine, OrtOptions};
use reefline_classifier::preprocess::{InputSpec, Preprocess};
use reefline_e2e::cache_dir;

/// Benchmark settings.
#[derive(Parser, Debug)]
struct Args {
    /// Images pushed through (the photos, round-robin).
    #[arg(long, default_value_t = 1000)]
    images: usize,
    /// Classifier micro-batch size (the classifier's default).
    #[arg(long, default_value_t = 8)]
    max_batch: usize,
    /// ONNX Runtime intra-op threads (0: all cores, the classifier's default).
    #[arg(long, default_value_t = 0)]
    intra_threads: usize,
    /// Serve the photos over HTTP instead of measuring (see the module docs).
    #[arg(long)]
    serve: bool,
    /// Niceness of the decoding threads (the classifier's default).
    #[arg(long, default_value_t = 10)]
    decode_nice: i32,
    /// The model file, relative to the cache (the classifier's default model).
    #[arg(long, default_value = "models/efficientnet-lite0.onnx")]
    model_file: String,
    /// The model's square input side.
    #[arg(long, default_value_t = 224)]
    image_size: u32,
    /// How far the IDCT may shrink a JPEG (the classifier's `JPEG_SCALE_MARGIN`).
    #[arg(long, env = "JPEG_SCALE_MARGIN", default_value_t = 2)]
    jpeg_scale_margin: u32,
    /// Folders of photos under the cache, searched recursively.
    #[arg(long, num_args = 1.., default_values = ["photos", "bench-photos"])]
    photos: Vec<String>,
}

/// The photos of `folders` (under the cache), in the order scripts/bench.py serves them.
fn load_photos(folders: &[String]) -> anyhow::Result<Vec<Vec<u8>>> {
    fn files(dir: &Path, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
        for entry in std::fs::read_dir(dir).with_context(|| format!("{} (run make setup)", dir.display()))? {
            let path = entry?.path();
            if path.is_dir() { files(&path, out)? } else { out.push(path) }
        }
        Ok(())
    }
    let mut names = Vec::new();
    for folder in folders {
        files(&cache_dir().join(folder), &mut names)?;
    }
    names.sort();
    names.iter().map(|p| std::fs::read(p).map_err(Into::into)).collect()
}

/// The classifier's default ONNX Runtime options for the model, with `intra_threads`.
fn ort_options(args: &Args) -> OrtOptions {
    let cache = cache_dir();
    let mut options = OrtOptions::cpu(
        cache.join("onnxruntime/libonnxruntime.so.1.31.1"),
        cache.join(&args.model_file),
        args.image_size as usize,
    );
    options.intra_threads = args.intra_threads;
    options
}

/// Images/s of decode + preprocess (one thread per core, at the classifier's lower priority)
/// feeding batched inference (its own thread).
fn measure_limit(photos: &[Vec<u8>], args: &Args) -> anyhow::Result<f64> {
    let (images, max_batch, nice) = (args.images, args.max_batch, args.decode_nice);
    let mut engine = OrtEngine::load(&ort_options(args))?;
    let pre = Preprocess {
        size: args.image_size,
        spec: InputSpec::EFFICIENTNET_LITE,
        max_side: 10_000,
        max_pixels: 50_000_000,
        jpeg_scale_margin: args.jpeg_scale_margin,
    };
    let warm = pre.run(&photos[0]).map_err(|e| anyhow::anyhow!("{e}"))?;
    engine.infer(&warm.repeat(max_batch), max_batch).map_err(|e| anyhow::anyhow!(e))?;

    let cores = std::thread::available_parallelism().map_or(2, usize::from);
    let next = Arc::new(AtomicUsize::new(0));
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<f32>>(max_batch * 2);
    let started = Instant::now();
    let decoders: Vec<_> = (0..cores)
        .map(|_| {
            let (next, tx, photos) = (next.clone(), tx.clone(), photos.to_vec());
            std::thread::spawn(move || {
                reefline_classifier::preprocess::lower_thread_priority(nice);
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= images {
                        return;
                    }
                    let tensor = pre.run(&photos[i % photos.len()]).expect("test photos decode");
                    if tx.send(tensor).is_err() {
                        return;
                    }
                }
            })
        })
        .collect();
    drop(tx);
    let mut done = 0;
    let mut input = Vec::new();
    while let Ok(first) = rx.recv() {
        input.clear();
        input.extend_from_slice(&first);
        let mut n = 1;
        while n < max_batch {
            match rx.try_recv() {
                Ok(t) => {
                    input.extend_from_slice(&t);
                    n += 1;
                }
                Err(_) => break,
            }
        }
        engine.infer(&input, n).map_err(|e| anyhow::anyhow!(e))?;
        done += n;
    }
    for d in decoders {
        d.join().map_err(|_| anyhow::anyhow!("decoder panicked"))?;
    }
    anyhow::ensure!(done == images, "inferred {done} of {images}");
    Ok(images as f64 / started.elapsed().as_secs_f64())
}

/// Serves `photos` at `/p/{n}` on a free loopback port until standard input closes.
fn serve(photos: Vec<Vec<u8>>) -> anyhow::Result<()> {
    use axum::extract::{Path, State};
    use axum::http::{StatusCode, header};
    use axum::response::IntoResponse;

    async fn photo(
        State(photos): State<Arc<Vec<axum::body::Bytes>>>,
        Path(n): Path<String>,
    ) -> axum::response::Response {
        let Ok(n) = n.parse::<usize>() else { return StatusCode::NOT_FOUND.into_response() };
        let body = photos[n % photos.len()].clone();
        let kind = if body.starts_with(&[0xff, 0xd8]) { "image/jpeg" } else { "image/png" };
        ([(header::CONTENT_TYPE, kind)], body).into_response()
    }

    let photos: Arc<Vec<axum::body::Bytes>> = Arc::new(photos.into_iter().map(Into::into).collect());
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}/p", listener.local_addr()?);
        println!("{}", serde_json::json!({ "url": url, "photos": photos.len() }));
        let app = axum::Router::new().route("/p/{n}", axum::routing::get(photo)).with_state(photos);
        let stdin_closed = async {
            let _ = tokio::task::spawn_blocking(|| std::io::copy(&mut std::io::stdin(), &mut std::io::sink())).await;
        };
        axum::serve(listener, app).with_graceful_shutdown(stdin_closed).await?;
        Ok(())
    })
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let photos = load_photos(&args.photos)?;
    if args.serve {
        return serve(photos);
    }
    let rate = measure_limit(&photos, &args)?;
    println!("{}", serde_json::json!({ "images": args.images, "photos": photos.len(), "images_per_s": rate }));
    Ok(())
}
