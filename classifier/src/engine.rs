//! The inference engine: a small synchronous trait, the ONNX Runtime implementation, and the
//! thread it runs on (never the async runtime's workers).

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use ort::environment::Environment;
use ort::session::Session;
use ort::session::builder::{GraphOptimizationLevel, SessionBuilder};
use ort::value::TensorRef;

/// Runs the model on a batch of preprocessed images.
pub trait Engine: Send + 'static {
    /// `input` holds `batch` images of `image_len` floats each; returns `batch` rows of logits.
    fn infer(&mut self, input: &[f32], batch: usize) -> Result<Vec<Vec<f32>>, EngineError>;
}

/// Why a batch was not run.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// ONNX Runtime refused the input or failed running the model.
    #[error("ONNX Runtime: {0}")]
    Runtime(#[from] ort::Error),
    /// The model's output is not one row of logits an image.
    #[error("the model returned shape {shape:?} for a batch of {batch}")]
    Shape { shape: Vec<i64>, batch: usize },
}

/// Where inference runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Provider {
    /// ONNX Runtime's CPU execution provider.
    Cpu,
    /// NVIDIA GPUs through the CUDA execution provider (needs the `cuda` cargo feature and the
    /// `onnxruntime-gpu` library with CUDA 13 and cuDNN 9).
    Cuda,
}

/// ONNX Runtime's graph optimisation levels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Optimization {
    Disable,
    Basic,
    Extended,
    All,
}

impl Engine for Box<dyn Engine> {
    fn infer(&mut self, input: &[f32], batch: usize) -> Result<Vec<Vec<f32>>, EngineError> {
        (**self).infer(input, batch)
    }
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
    /// How many classes its output must have (its class table's); `None` takes any.
    pub classes: Option<usize>,
    /// Threads inside one operator; 0 lets ONNX Runtime decide.
    pub intra_threads: usize,
    /// Threads running independent operators at once; 0 lets ONNX Runtime decide.
    pub inter_threads: usize,
    /// Whether idle intra-op threads spin; spinning steals the cores the decoders need.
    pub spinning: bool,
    pub optimization: Optimization,
    pub provider: Provider,
    /// GPU ordinal for the CUDA provider.
    pub device_id: i32,
}

impl OrtOptions {
    /// CPU defaults for `model`, loading ONNX Runtime from `dylib`.
    pub fn cpu(dylib: PathBuf, model: PathBuf, image_size: usize) -> Self {
        Self {
            dylib,
            model,
            image_size,
            classes: None,
            intra_threads: 0,
            inter_threads: 0,
            spinning: false,
            optimization: Optimization::All,
            provider: Provider::Cpu,
            device_id: 0,
        }
    }
}

/// EfficientNet-Lite (or any `input[N,3,S,S]` → `logits[N,C]` model) on ONNX Runtime.
pub struct OrtEngine {
    session: Session,
    image_size: usize,
}

/// ONNX Runtime allows one environment per process, so every engine shares it; it is made under a
/// lock, as classifiers built side by side (tests run several) would otherwise each make one.
fn environment(dylib: &Path) -> anyhow::Result<Environment> {
    static ENV: Mutex<Option<Environment>> = Mutex::new(None);
    let mut env = ENV.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(env) = env.as_ref() {
        return Ok(env.clone());
    }
    let made = ort::init_from(dylib)
        .map_err(|e| anyhow::anyhow!("loading ONNX Runtime from {}: {e}", dylib.display()))?
        .with_name("reefline")
        .build()?;
    Ok(env.insert(made).clone())
}

impl OrtEngine {
    pub fn load(options: &OrtOptions) -> anyhow::Result<Self> {
        let env = environment(&options.dylib)?;
        let level = match options.optimization {
            Optimization::Disable => GraphOptimizationLevel::Disable,
            Optimization::Basic => GraphOptimizationLevel::Level1,
            Optimization::Extended => GraphOptimizationLevel::Level2,
            Optimization::All => GraphOptimizationLevel::All,
        };
        let e = |e: ort::Error<SessionBuilder>| anyhow::anyhow!("{e}");
        let mut builder = Session::builder(&env)?.with_optimization_level(level).map_err(e)?;
        builder = builder.with_intra_op_spinning(options.spinning).map_err(e)?;
        if options.intra_threads > 0 {
            builder = builder.with_intra_threads(options.intra_threads).map_err(e)?;
        }
        if options.inter_threads > 0 {
            builder = builder.with_inter_threads(options.inter_threads).map_err(e)?;
        }
        builder = register_provider(builder, options)?;
        let session = builder
            .commit_from_file(&options.model)
            .map_err(|e| anyhow::anyhow!("loading model {}: {e}", options.model.display()))?;
        let engine = Self { session, image_size: options.image_size };
        // Dimensions the file fixes (a named or -1 one takes any size) must be the manifest's.
        let s = options.image_size as i64;
        if let Some(input) = engine.session.inputs().first().and_then(|i| i.dtype().tensor_shape())
            && (input.len() != 4 || input[1..].iter().zip([3, s, s]).any(|(&d, want)| d > 0 && d != want))
        {
            anyhow::bail!(
                "{} takes input {:?}, not [N, 3, {s}, {s}] as its `image_size` says",
                options.model.display(),
                &input[..]
            );
        }
        if let (Some(want), Some(classes)) = (options.classes, engine.classes())
            && classes != want
        {
            anyhow::bail!("{} outputs {classes} classes; its class table has {want}", options.model.display());
        }
        Ok(engine)
    }

    /// How many classes the model outputs, where its file says (the last dimension of its output).
    pub fn classes(&self) -> Option<usize> {
        let shape = self.session.outputs().first()?.dtype().tensor_shape()?;
        shape.last().and_then(|&c| usize::try_from(c).ok()).filter(|&c| c > 0)
    }
}

#[cfg(feature = "cuda")]
fn register_provider(builder: SessionBuilder, options: &OrtOptions) -> anyhow::Result<SessionBuilder> {
    match options.provider {
        Provider::Cpu => Ok(builder),
        Provider::Cuda => {
            let cuda = ort::ep::CUDA::default().with_device_id(options.device_id).build().error_on_failure();
            builder
                .with_execution_providers([cuda])
                .map_err(|e| anyhow::anyhow!("registering the CUDA execution provider: {e}"))
        }
    }
}

#[cfg(not(feature = "cuda"))]
fn register_provider(builder: SessionBuilder, options: &OrtOptions) -> anyhow::Result<SessionBuilder> {
    match options.provider {
        Provider::Cpu => Ok(builder),
        Provider::Cuda => {
            anyhow::bail!("this classifier was built without the `cuda` feature; rebuild with `--features cuda`")
        }
    }
}

impl Engine for OrtEngine {
    fn infer(&mut self, input: &[f32], batch: usize) -> Result<Vec<Vec<f32>>, EngineError> {
        let s = self.image_size;
        let tensor = TensorRef::from_array_view(([batch, 3, s, s], input))?;
        let outputs = self.session.run(ort::inputs![tensor])?;
        let (shape, logits) = outputs[0].try_extract_tensor::<f32>()?;
        let classes = shape.last().copied().unwrap_or(0) as usize;
        if classes == 0 || logits.len() != batch * classes {
            return Err(EngineError::Shape { shape: shape.to_vec(), batch });
        }
        Ok(logits.chunks_exact(classes).map(<[f32]>::to_vec).collect())
    }
}
