//! Time per image of each CPU stage on the cached photos: decode + preprocess, and inference at
//! several batch sizes, each on one thread. `cargo run --release -p reefline-e2e --example stage_costs`
use std::time::Instant;

use reefline_classifier::engine::{Engine, OrtEngine, OrtOptions};
use reefline_classifier::preprocess::Preprocess;
use reefline_e2e::cache_dir;

fn main() -> anyhow::Result<()> {
    let dir = cache_dir().join("photos");
    let mut photos: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)?
        .filter_map(|e| e.ok())
        .map(|e| (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).unwrap()))
        .collect();
    photos.sort();
    let pre = Preprocess { size: 224, max_side: 10_000, max_pixels: 50_000_000 };
    let mut total = 0.0;
    for (name, bytes) in &photos {
        let started = Instant::now();
        for _ in 0..10 {
            pre.run(bytes).map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
        }
        let ms = started.elapsed().as_secs_f64() * 100.0;
        total += ms;
        let dims = image::image_dimensions(dir.join(name)).map(|(w, h)| format!("{w}x{h}")).unwrap_or_default();
        println!("preprocess {name:24} {dims:>9} {:>7} bytes {ms:6.2} ms", bytes.len());
    }
    println!("preprocess mean {:.2} ms/image (one thread)", total / photos.len() as f64);

    let cache = cache_dir();
    for threads in [1, 2] {
        let mut options = OrtOptions::cpu(
            cache.join("onnxruntime/libonnxruntime.so.1.31.1"),
            cache.join("models/efficientnet-lite0.onnx"),
            224,
        );
        options.intra_threads = threads;
        let mut engine = OrtEngine::load(&options)?;
        let tensor = pre.run(&photos[0].1).map_err(|e| anyhow::anyhow!("{e}"))?;
        for batch in [1, 4, 8, 16, 32] {
            let input = tensor.repeat(batch);
            engine.infer(&input, batch).map_err(|e| anyhow::anyhow!(e))?;
            let started = Instant::now();
            let reps = 64 / batch;
            for _ in 0..reps {
                engine.infer(&input, batch).map_err(|e| anyhow::anyhow!(e))?;
            }
            let per_image = started.elapsed().as_secs_f64() * 1000.0 / (reps * batch) as f64;
            println!(
                "infer threads {threads} batch {batch:3}: {per_image:.2} ms/image ({:.0} images/s)",
                1000.0 / per_image
            );
        }
    }
    Ok(())
}
