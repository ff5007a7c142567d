//! The classifier's settings: flags with environment variables and local defaults.

use std::path::PathBuf;

use reefline_common::kafka::{KafkaSettings, Topics};

use crate::engine::{Optimization, Provider};
use reefline_schemas::RegistrySettings;

/// Topics, model, batching and fetching limits of one classifier instance.
#[derive(Clone, Debug, clap::Parser)]
#[command(name = "reefline-classifier", about = "Classifies the images named on the requests topic")]
pub struct Settings {
    /// Address /metrics, /healthz and /readyz listen on.
    #[arg(long, env = "CLASSIFIER_LISTEN", default_value = "127.0.0.1:8082")]
    pub listen: String,

    #[command(flatten)]
    pub topics: Topics,

    /// Consumer group shared by all classifier instances.
    #[arg(long, env = "CLASSIFIER_GROUP", default_value = "reefline-classifier")]
    pub group_id: String,

    /// The models served (all of the manifest's by default) and the default one.
    #[command(flatten)]
    pub models: reefline_common::models::ModelSettings,

    /// The ONNX Runtime shared library.
    #[arg(long, env = "ORT_DYLIB_PATH", default_value = ".cache/onnxruntime/libonnxruntime.so.1.31.1")]
    pub ort_dylib: PathBuf,

    /// ONNX Runtime intra-op threads of each engine; 0: the cores shared between a model's
    /// engines (one each, with one engine per core).
    #[arg(long, env = "ORT_INTRA_THREADS", default_value_t = 0)]
    pub intra_threads: usize,

    /// Engine threads per model, each with its own ONNX Runtime session, taking the model's
    /// batches from one queue; 0: one per core on a CPU, one on a GPU.
    #[arg(long, env = "ENGINES", default_value_t = 0)]
    pub engines: usize,

    /// ONNX Runtime inter-op threads; 0 lets it decide.
    #[arg(long, env = "ORT_INTER_THREADS", default_value_t = 0)]
    pub inter_threads: usize,

    /// Let idle ONNX Runtime threads spin (lower latency, but they steal cores from decoding).
    #[arg(long, env = "ORT_SPINNING", default_value_t = false)]
    pub ort_spinning: bool,

    /// ONNX Runtime graph optimisation level.
    #[arg(long, env = "ORT_OPTIMIZATION", value_enum, default_value_t = Optimization::All)]
    pub ort_optimization: Optimization,

    /// Where inference runs: cpu, or cuda (needs the `cuda` cargo feature).
    #[arg(long, env = "EXECUTION_PROVIDER", value_enum, default_value_t = Provider::Cpu)]
    pub execution_provider: Provider,

    /// GPU ordinal for the CUDA execution provider.
    #[arg(long, env = "CUDA_DEVICE_ID", default_value_t = 0)]
    pub cuda_device_id: i32,

    /// Classes reported per image.
    #[arg(long, env = "TOP_K", default_value_t = 5)]
    pub top_k: usize,

    /// Most images in one inference batch; 0: measured for each model at start, the cheapest
    /// size an image (the smallest within 5%) among those whose batch runs within
    /// `BATCH_LATENCY_MS`, logged and exported as `classifier_batch_size_limit{model}`.
    #[arg(long, env = "MAX_BATCH_SIZE", default_value_t = 0)]
    pub max_batch_size: usize,

    /// With `MAX_BATCH_SIZE=0`, the longest one batch may take to run, in milliseconds.
    #[arg(long, env = "BATCH_LATENCY_MS", default_value_t = 50)]
    pub batch_latency_ms: u64,

    /// Bulk requests the pipeline holds at once, from their read until their result is handed to
    /// the producer (0: eight batches' worth for each engine, at least 32). Enough keeps the
    /// engines busy; each more is one an interactive request may find ahead of it on a core. Raise
    /// it for image hosts far away (each fetch waits longer).
    #[arg(long, env = "BULK_IN_FLIGHT", default_value_t = 0)]
    pub bulk_in_flight: usize,

    /// Longest a partial batch waits for company while the engine is busy, in milliseconds.
    #[arg(long, env = "MAX_BATCH_DELAY_MS", default_value_t = 10)]
    pub max_batch_delay_ms: u64,

    /// Image fetches in flight at once.
    #[arg(long, env = "FETCH_CONCURRENCY", default_value_t = 64)]
    pub fetch_concurrency: usize,

    /// Image fetches in flight to one host at once.
    #[arg(long, env = "FETCH_PER_HOST", default_value_t = 16)]
    pub fetch_per_host: usize,

    /// Image fetches started per second to one host (0: no limit); a host that answers 429 or 503
    /// with `Retry-After` gets no fetch before that time (at most 120 s) either way.
    #[arg(long, env = "FETCH_HOST_RATE", default_value_t = 0.0)]
    pub fetch_host_rate: f64,

    /// Connect timeout for one fetch, in seconds.
    #[arg(long, env = "FETCH_CONNECT_TIMEOUT_S", default_value_t = 5)]
    pub fetch_connect_timeout_s: u64,

    /// Total timeout for one fetch, body included, in seconds.
    #[arg(long, env = "FETCH_TIMEOUT_S", default_value_t = 20)]
    pub fetch_timeout_s: u64,

    /// Redirects followed per fetch.
    #[arg(long, env = "FETCH_MAX_REDIRECTS", default_value_t = 5)]
    pub fetch_max_redirects: usize,

    /// Destinations opened although not public: CIDRs, IPs or host names, comma-separated
    /// (e.g. `127.0.0.1/32` for a local photo server). Everything else private is refused. Image
    /// fetches only: feed sources and callbacks have their own (`SOURCE_ALLOW`, `CALLBACK_ALLOW`).
    #[arg(long, env = "FETCH_ALLOW", value_delimiter = ',')]
    pub fetch_allow: Vec<String>,

    #[command(flatten)]
    pub database: reefline_store::DatabaseSettings,

    /// Reuse the predictions stored for the same bytes (SHA-256) and model version instead of
    /// running the model again.
    #[arg(long, env = "RESULT_CACHE", default_value_t = true, action = clap::ArgAction::Set)]
    pub result_cache: bool,

    /// Let every tenant reuse every tenant's cached predictions (by default a tenant reuses only
    /// its own: whether another team sent the same photo is not revealed).
    #[arg(long, env = "RESULT_CACHE_SHARED", default_value_t = false, action = clap::ArgAction::Set)]
    pub result_cache_shared: bool,

    /// Tries of a request alone, after a classifier stopped mid-way, before it is moved to the
    /// dead-letter topic as one that stops the process (kind `crash_loop`); 0: off. The ledger is
    /// the database at `DATABASE_URL`.
    #[arg(long, env = "DELIVERY_LIMIT", default_value_t = 3)]
    pub delivery_limit: u32,

    /// Retries of a transient fetch failure (timeout, connection failure, 429, 5xx).
    #[arg(long, env = "FETCH_RETRIES", default_value_t = 3)]
    pub fetch_retries: u32,

    /// First retry delay in milliseconds; it doubles each retry, with jitter.
    #[arg(long, env = "FETCH_RETRY_BASE_MS", default_value_t = 500)]
    pub fetch_retry_base_ms: u64,

    /// Longest retry delay, in milliseconds.
    #[arg(long, env = "FETCH_RETRY_MAX_MS", default_value_t = 10_000)]
    pub fetch_retry_max_ms: u64,

    /// Longest image URL accepted on a request read from Kafka, in bytes (ingest's limit has the
    /// same name); at most 8192. A longer one is dead-lettered as `invalid_request`.
    #[arg(long, env = "MAX_URL_BYTES", default_value_t = 2048)]
    pub max_url_bytes: usize,

    /// Largest image accepted, in bytes.
    #[arg(long, env = "MAX_IMAGE_BYTES", default_value_t = 20 * 1024 * 1024)]
    pub max_image_bytes: u64,

    /// Largest width or height accepted, in pixels.
    #[arg(long, env = "MAX_IMAGE_SIDE", default_value_t = 10_000)]
    pub max_image_side: u32,

    /// Most pixels (width × height) accepted; bounds the memory one decode may take
    /// (at most 8 bytes a pixel).
    #[arg(long, env = "MAX_IMAGE_PIXELS", default_value_t = 50_000_000)]
    pub max_image_pixels: u64,

    /// A JPEG is shrunk in the IDCT (1/2, 1/4, 1/8) while its shorter side stays at least this
    /// many times the model's resize target (256 for a 224 input). 2 keeps the reference's pixels
    /// for photos up to twice the target (a 12-megapixel photo decodes at 1/4); 1 decodes least
    /// (at 1/8), for survey-camera photos where speed matters more than bit-parity.
    #[arg(long, env = "JPEG_SCALE_MARGIN", default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=8))]
    pub jpeg_scale_margin: u32,

    /// Most pixels being decoded at once, across all decoding threads (at most 8 bytes each):
    /// bounds decode memory by what is decoded together, not only per image. An image larger
    /// than this is decoded alone.
    #[arg(long, env = "DECODE_PIXEL_BUDGET", default_value_t = 100_000_000)]
    pub decode_pixel_budget: u64,

    /// Where bulk images are decoded and preprocessed: `engine`, by the engine thread that runs
    /// them, just before (one core does an image's whole work, with no hand-off between threads);
    /// `pool`, on threads of their own (`DECODE_THREADS`, at `DECODE_NICE`) beside the engines;
    /// `auto`, `engine` on the CPU and `pool` on a GPU, whose one engine thread would decode for
    /// the whole GPU on one core. On the CPU the pool's hand-offs leave cores idle between an
    /// engine wanting an image and a decoder having one ready (4–8 % of the time with
    /// 12-megapixel photos), which decoding in the engines does not. Interactive images are
    /// always decoded on threads of their own, at the default priority.
    #[arg(long, env = "BULK_DECODE", value_enum, default_value_t = BulkDecode::Auto)]
    pub bulk_decode: BulkDecode,

    /// Images decoded and preprocessed at once outside the engines, in each lane; 0 means one per core.
    #[arg(long, env = "DECODE_THREADS", default_value_t = 0)]
    pub decode_threads: usize,

    /// Scheduling niceness of the pool's decoding threads (0 to 19; 0 leaves them equal to
    /// inference). Inference is the bottleneck, so by default decoding yields a shared core to it.
    #[arg(long, env = "DECODE_NICE", default_value_t = 10, value_parser = clap::value_parser!(i32).range(0..=19))]
    pub decode_nice: i32,

    /// How long the bulk lane's results wait to fill a produce request, in milliseconds (the
    /// interactive lane's go at once). Every produce request costs the broker a round of storage
    /// work, and the sink a fetch and a transaction: on 2 cores, 100 against `KAFKA_LINGER_MS`'s 25
    /// cut the broker's CPU an image from 1.6 to 0.6 ms, and the sink's and Postgres's by a third;
    /// 200 cut the services' around the classifier by another third (a bulk result reaches the sink
    /// up to 0.2 s after it is ready). `KAFKA_PROPERTIES=linger.ms=...` sets every producer's.
    #[arg(long, env = "BULK_LINGER_MS", default_value_t = 200)]
    pub bulk_linger_ms: u32,

    /// Scheduling niceness of the engine threads (0 to 19). Above 0, the short tasks around them
    /// (reading and producing records, an interactive image's decode, and on a shared machine
    /// the broker's and the other services' work) take a core as soon as they are ready instead
    /// of waiting out a batch's time slice; keep it below `DECODE_NICE`.
    #[arg(long, env = "ENGINE_NICE", default_value_t = 5, value_parser = clap::value_parser!(i32).range(0..=19))]
    pub engine_nice: i32,

    #[command(flatten)]
    pub kafka: KafkaSettings,

    #[command(flatten)]
    pub registry: RegistrySettings,

    #[command(flatten)]
    pub tenants: reefline_common::tenant::TenantSettings,

    /// The object stores `s3://` image URLs may name.
    #[command(flatten)]
    pub stores: reefline_common::objects::StoreSettings,
}

impl Settings {
    /// Bulk requests the pipeline holds at once (`BULK_IN_FLIGHT`, or eight batches of `batch`
    /// for each of `engines` engines, at least 32).
    pub fn bulk_depth(&self, batch: usize, engines: usize) -> usize {
        match self.bulk_in_flight {
            0 => (8 * batch.max(1) * engines.max(1)).max(32),
            n => n,
        }
    }

    /// How `model` is given its images: its manifest entry's input within these limits.
    pub fn preprocess(&self, model: &reefline_common::models::Model) -> crate::preprocess::Preprocess {
        crate::preprocess::Preprocess {
            size: model.image_size,
            spec: crate::preprocess::InputSpec::of(model),
            max_side: self.max_image_side,
            max_pixels: self.max_image_pixels,
            jpeg_scale_margin: self.jpeg_scale_margin,
        }
    }

    /// Whether the engines decode bulk images themselves (`BULK_DECODE`).
    pub fn engines_decode(&self) -> bool {
        match self.bulk_decode {
            BulkDecode::Engine => true,
            BulkDecode::Pool => false,
            BulkDecode::Auto => self.execution_provider == crate::engine::Provider::Cpu,
        }
    }

    /// Engine threads per model (`ENGINES`, or one per core on a CPU and one on a GPU).
    pub fn engines(&self) -> usize {
        match (self.engines, self.execution_provider) {
            (0, crate::engine::Provider::Cpu) => std::thread::available_parallelism().map_or(1, usize::from),
            (0, _) => 1,
            (n, _) => n,
        }
    }

    /// The ONNX Runtime options these settings describe, for the model in `model` taking
    /// `image_size`-pixel squares.
    pub fn ort_options(&self, model: PathBuf, image_size: u32) -> crate::engine::OrtOptions {
        crate::engine::OrtOptions {
            dylib: self.ort_dylib.clone(),
            model,
            image_size: image_size as usize,
            classes: None,
            intra_threads: match self.intra_threads {
                0 => (std::thread::available_parallelism().map_or(1, usize::from) / self.engines()).max(1),
                n => n,
            },
            inter_threads: self.inter_threads,
            spinning: self.ort_spinning,
            optimization: self.ort_optimization,
            provider: self.execution_provider,
            device_id: self.cuda_device_id,
        }
    }
}

/// Where bulk images are decoded (`BULK_DECODE`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BulkDecode {
    Auto,
    Engine,
    Pool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn engines_decode_bulk_images_on_the_cpu_or_where_told_to() {
        let decode = |args: &[&str]| {
            Settings::try_parse_from(["classifier"].iter().chain(args)).expect("valid flags").engines_decode()
        };
        assert!(decode(&["--engines", "1"]));
        assert!(decode(&["--engines", "2"]));
        assert!(!decode(&["--engines", "1", "--execution-provider", "cuda"]), "a GPU's engine never decodes");
        assert!(decode(&["--execution-provider", "cuda", "--bulk-decode", "engine"]));
        assert!(!decode(&["--engines", "2", "--bulk-decode", "pool"]));
    }
}
