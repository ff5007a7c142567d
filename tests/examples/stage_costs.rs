//! CPU time per image of each stage, each on one thread: decoding and resizing (the centre crop and
//! normalisation with it) as the classifier does them now (libjpeg-turbo, scaled in the IDCT for
//! large JPEGs; and with `JPEG_SCALE_MARGIN=1`, which scales more) and as it did before (the
//! `image` crate's decoder at full size), on the test photos,
//! the benchmark's photos and their 12-megapixel versions; then inference of every model of the
//! manifest at several batch sizes. Also what learning from the bytes costs (their sha256, EXIF and
//! header, for every image).
//! `cargo run --release -p reefline-e2e --example stage_costs`
//!
//! `stage_costs --bound MODEL [PHOTOS]` prints instead one JSON line: what the hardware needs an
//! image of the photos under the cache folder `PHOTOS` (default `bench-photos`) on one core —
//! decode, resize, and `MODEL`'s inference at its cheapest batch size on one thread — from which
//! `make bench` computes the hardware's bound (cores ÷ their sum).
use std::path::Path;
use std::time::Instant;

use reefline_classifier::engine::{Engine, OrtEngine, OrtOptions};
use reefline_classifier::preprocess::{InputSpec, Preprocess};
use reefline_classifier::sizing;
use reefline_e2e::cache_dir;

const PRE: Preprocess = Preprocess {
    size: 224,
    spec: InputSpec::EFFICIENTNET_LITE,
    max_side: 10_000,
    max_pixels: 50_000_000,
    jpeg_scale_margin: 2,
};

fn photos(dir: &Path) -> Vec<Vec<u8>> {
    let mut paths = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() { dirs.push(path) } else { paths.push(path) }
        }
    }
    paths.sort();
    paths.iter().map(|p| std::fs::read(p).expect("a photo")).collect()
}

/// Milliseconds per call of `f`, the mean over `reps` passes over `items`.
fn ms_per<T>(items: &[T], reps: usize, mut f: impl FnMut(&T)) -> f64 {
    let started = Instant::now();
    for _ in 0..reps {
        items.iter().for_each(&mut f);
    }
    started.elapsed().as_secs_f64() * 1000.0 / (reps * items.len()) as f64
}

/// Milliseconds per image to decode `bytes` as `pre` does (libjpeg-turbo, scaled in the IDCT),
/// and to resize what that decoded.
fn decode_and_resize(pre: &Preprocess, bytes: &[Vec<u8>], reps: usize) -> anyhow::Result<(f64, f64)> {
    let decode = |b: &Vec<u8>| pre.inspect(b).and_then(|i| pre.decode(b, &i)).map_err(|e| anyhow::anyhow!("{e}"));
    let decoded: Vec<_> = bytes.iter().map(decode).collect::<anyhow::Result<_>>()?;
    // One buffer for every decode, as each classifier thread keeps one.
    let mut pixels = Vec::new();
    let decode_ms = ms_per(bytes, reps, |b| {
        let inspected = pre.inspect(b).expect("inspects");
        pre.decode_into(b, &inspected, &mut pixels).expect("decodes");
    });
    let resize_ms = ms_per(&decoded, reps, |(rgb, w, h)| {
        std::hint::black_box(pre.tensor_from_rgb(rgb, *w, *h));
    });
    Ok((decode_ms, resize_ms))
}

fn stages(what: &str, bytes: &[Vec<u8>], reps: usize) -> anyhow::Result<()> {
    if bytes.is_empty() {
        println!("{what}: none (run `make bench` once to make the 12 MP photos)");
        return Ok(());
    }
    let megapixels = bytes
        .iter()
        .map(|b| image::ImageReader::new(std::io::Cursor::new(b)).with_guessed_format().ok()?.into_dimensions().ok())
        .map(|d| d.map_or(0.0, |(w, h)| f64::from(w) * f64::from(h) / 1e6))
        .sum::<f64>()
        / bytes.len() as f64;
    let before: Vec<_> = bytes.iter().map(|b| image::load_from_memory(b).expect("decodes").into_rgb8()).collect();
    let decode_before = ms_per(bytes, reps, |b| drop(image::load_from_memory(b).expect("decodes").into_rgb8()));
    let resize_before = ms_per(&before, reps, |img| {
        std::hint::black_box(PRE.tensor_from_rgb(img.as_raw(), img.width(), img.height()));
    });
    let (decode_after, resize_after) = decode_and_resize(&PRE, bytes, reps)?;
    let (decode_least, resize_least) = decode_and_resize(&Preprocess { jpeg_scale_margin: 1, ..PRE }, bytes, reps)?;
    let learn = ms_per(bytes, reps, |b| drop(reefline_classifier::photo::learn(b)));
    println!("{what} ({} photos, {megapixels:.1} MP on average), ms per image:", bytes.len());
    println!("  learn (sha256, EXIF, header):    {learn:6.2}");
    println!("  before (image crate, full size): decode {decode_before:6.2}  resize {resize_before:6.2}");
    println!("  now (libjpeg-turbo, IDCT scale): decode {decode_after:6.2}  resize {resize_after:6.2}");
    println!("  JPEG_SCALE_MARGIN=1:             decode {decode_least:6.2}  resize {resize_least:6.2}");
    Ok(())
}

/// Milliseconds an image of `model`'s inference on one thread at batch sizes 1, 2, 4 and 8,
/// measured as the classifier measures its batch sizes, in five passes a few tenths of a second
/// apart: each size's median pass, then the cheapest size and its cost. (One pass, a tenth of a
/// second a size, moved by a tenth between runs on a drifting machine: 8.68 to 9.64 ms.)
fn best_inference(
    model: &reefline_common::models::Model,
    path: &Path,
    image_len: usize,
) -> anyhow::Result<(f64, usize)> {
    let mut options = OrtOptions::cpu(
        cache_dir().join("onnxruntime/libonnxruntime.so.1.31.1"),
        path.to_path_buf(),
        model.image_size as usize,
    );
    options.intra_threads = 1;
    let mut engine = OrtEngine::load(&options)?;
    let passes = (0..PASSES)
        .map(|_| sizing::measure(&mut engine, image_len, 8, std::time::Duration::MAX))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let median = |batch: usize| {
        let mut runs: Vec<_> = passes.iter().flatten().filter(|c| c.batch == batch).map(|c| c.per_image()).collect();
        runs.sort();
        runs[runs.len() / 2]
    };
    let best = passes[0]
        .iter()
        .map(|c| (median(c.batch), c.batch))
        .min()
        .ok_or_else(|| anyhow::anyhow!("nothing measured"))?;
    Ok((best.0.as_secs_f64() * 1000.0, best.1))
}

/// Passes over the batch sizes that [`best_inference`] takes the median of.
const PASSES: usize = 5;

/// The `--bound` line (see the module's doc).
fn bound(model_name: &str, folder: &str) -> anyhow::Result<()> {
    let cache = cache_dir();
    let models = reefline_e2e::model_settings();
    let model = models
        .load()?
        .into_iter()
        .find(|m| m.name == model_name)
        .ok_or_else(|| anyhow::anyhow!("no model {model_name}"))?;
    let margin = std::env::var("JPEG_SCALE_MARGIN").ok().and_then(|m| m.parse().ok()).unwrap_or(PRE.jpeg_scale_margin);
    let pre = Preprocess { size: model.image_size, spec: InputSpec::of(&model), jpeg_scale_margin: margin, ..PRE };
    let bytes = photos(&cache.join(folder));
    anyhow::ensure!(!bytes.is_empty(), "no photos under {folder}");
    let (decode, resize) = decode_and_resize(&pre, &bytes, 2)?;
    let learn = ms_per(&bytes, 2, |b| drop(reefline_classifier::photo::learn(b)));
    let (infer, batch) = best_inference(&model, &models.path(&model), pre.tensor_len())?;
    println!(
        "{}",
        serde_json::json!({
            "model": model.name, "photos": folder, "decode_ms": decode, "resize_ms": resize, "learn_ms": learn,
            "infer_ms": infer, "infer_batch": batch, "ms_per_image": decode + resize + infer,
        })
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--bound") {
        let model = args.get(1).ok_or_else(|| anyhow::anyhow!("usage: stage_costs --bound MODEL [PHOTOS]"))?;
        return bound(model, args.get(2).map_or("bench-photos", String::as_str));
    }
    let cache = cache_dir();
    stages("test photos", &photos(&cache.join("photos")), 10)?;
    stages("bench photos", &photos(&cache.join("bench-photos")), 3)?;
    stages("12 MP camera versions", &photos(&cache.join("camera-photos-12mp")), 2)?;

    // Inference per image of every model of the manifest, on one thread and on two.
    let models = reefline_e2e::model_settings();
    let photo = &photos(&cache.join("photos"))[0];
    for model in models.load()? {
        let pre = Preprocess { size: model.image_size, spec: InputSpec::of(&model), ..PRE };
        let tensor = pre.run(photo).map_err(|e| anyhow::anyhow!("{e}"))?;
        for threads in [1, 2] {
            let mut options = OrtOptions::cpu(
                cache.join("onnxruntime/libonnxruntime.so.1.31.1"),
                models.path(&model),
                pre.size as usize,
            );
            options.intra_threads = threads;
            let mut engine = OrtEngine::load(&options)?;
            for batch in [1, 8, 32] {
                let input = tensor.repeat(batch);
                engine.infer(&input, batch).map_err(|e| anyhow::anyhow!(e))?;
                let started = Instant::now();
                let reps = (64 / batch).max(2);
                for _ in 0..reps {
                    engine.infer(&input, batch).map_err(|e| anyhow::anyhow!(e))?;
                }
                let per_image = started.elapsed().as_secs_f64() * 1000.0 / (reps * batch) as f64;
                println!(
                    "infer {:24} threads {threads} batch {batch:3}: {per_image:6.2} ms/image ({:.0} images/s)",
                    model.name,
                    1000.0 / per_image
                );
            }
        }
    }
    Ok(())
}
