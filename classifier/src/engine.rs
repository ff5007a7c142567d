//! The inference engine: a small synchronous trait, the ONNX Runtime implementation, and the
//! thread it runs on (never the async runtime's workers).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ort::environment::Environment;
use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::TensorRef;

/// Runs the model on a batch of preprocessed images.
pub trait Engine: Send + 'static {
    /// `input` holds `batch` images of `image_len` floats each; returns `batch` rows of logits.
    fn infer(&mut self, input: &[f32], batch: usize) -> Result<Vec<Vec<f32>>, String>;
}

/// How the ONNX Runtime session is built.
#[derive(Clone, Debug)]
pub struct OrtOptions {
    /// The ONNX Runtime shared library (`libonnxruntime.so.*`).
    pub dylib: PathBuf,
    /// The `.onnx` model file.
    pub model: PathBuf,
    /// Square input side.
    pub image_size: usize,
    /// Threads inside one operator; 0 lets ONNX Runtime decide.
    pub intra_threads: usize,
}

/// EfficientNet-Lite (or any `input[N,3,S,S]` → `logits[N,C]` model) on ONNX Runtime.
pub struct OrtEngine {
    session: Session,
    image_size: usize,
}

/// ONNX Runtime allows one environment per process, so every engine shares it.
fn environment(dylib: &Path) -> anyhow::Result<Environment> {
    static ENV: OnceLock<Environment> = OnceLock::new();
    if let Some(env) = ENV.get() {
        return Ok(env.clone());
    }
    let env = ort::init_from(dylib)
        .map_err(|e| anyhow::anyhow!("loading ONNX Runtime from {}: {e}", dylib.display()))?
        .with_name("reefline")
        .build()?;
    Ok(ENV.get_or_init(|| env).clone())
}

impl OrtEngine {
    pub fn load(options: &OrtOptions) -> anyhow::Result<Self> {
        let env = environment(&options.dylib)?;
        let mut builder = Session::builder(&env)?
            .with_optimization_level(GraphOptimizationLevel::All)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        if options.intra_threads > 0 {
            builder = builder.with_intra_threads(options.intra_threads).map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        let session = builder
            .commit_from_file(&options.model)
            .map_err(|e| anyhow::anyhow!("loading model {}: {e}", options.model.display()))?;
        Ok(Self { session, image_size: options.image_size })
    }
}

impl Engine for OrtEngine {
    fn infer(&mut self, input: &[f32], batch: usize) -> Result<Vec<Vec<f32>>, String> {
        let s = self.image_size;
        let tensor = TensorRef::from_array_view(([batch, 3, s, s], input)).map_err(|e| e.to_string())?;
        let outputs = self.session.run(ort::inputs![tensor]).map_err(|e| e.to_string())?;
        let (shape, logits) = outputs[0].try_extract_tensor::<f32>().map_err(|e| e.to_string())?;
        let classes = shape.last().copied().unwrap_or(0) as usize;
        if classes == 0 || logits.len() != batch * classes {
            return Err(format!("model returned shape {shape:?} for a batch of {batch}"));
        }
        Ok(logits.chunks_exact(classes).map(<[f32]>::to_vec).collect())
    }
}
