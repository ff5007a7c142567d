//! Why one image could not be classified: each becomes an `error` result, never a crash.

/// A per-image failure with a stable kind.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("the server answered 404 Not Found")]
    NotFound,
    #[error("the server answered HTTP {0}")]
    HttpStatus(u16),
    /// The store refused the credentials, or they do not allow reading the object.
    #[error("reading refused: {0}")]
    Forbidden(String),
    /// An `s3://` URL naming a bucket this classifier may not read for the request's tenant.
    #[error("{0}")]
    UnknownBucket(String),
    /// Another error status from an object store.
    #[error("{0}")]
    StoreStatus(u16, String),
    #[error("fetching the image timed out after {0} s")]
    Timeout(u64),
    #[error("could not connect: {0}")]
    Connection(String),
    #[error("the image is larger than the limit of {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("the content is not an image in a supported format (JPEG, PNG, GIF, WebP, BMP)")]
    NotAnImage,
    #[error("the image could not be decoded: {0}")]
    DecodeFailed(String),
    #[error("the image is {width}x{height} pixels; the limit is {limit}")]
    DimensionsTooLarge { width: u32, height: u32, limit: String },
    #[error("fetching refused: {0}")]
    Blocked(String),
    #[error("inference failed: {0}")]
    Inference(String),
    #[error("`model` is `{name}`, which this classifier does not serve; it serves: {served}")]
    UnknownModel { name: String, served: String },
    #[error(
        "a classifier stopped while working on this image alone {tries} times (out of memory, say); it is not tried again"
    )]
    CrashLoop { tries: u32 },
    /// A stage panicked on this image (a bug, in a parser say): which stage, and what it said.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ImageError {
    /// Whether fetching again later may succeed: timeouts, connection failures, 429 and 5xx.
    pub fn is_transient(&self) -> bool {
        match self {
            ImageError::Timeout(_) | ImageError::Connection(_) => true,
            ImageError::HttpStatus(status) | ImageError::StoreStatus(status, _) => {
                *status == 429 || (500..600).contains(status)
            }
            _ => false,
        }
    }

    /// Stable snake_case name, used in results and as a metric label.
    pub fn kind(&self) -> &'static str {
        match self {
            ImageError::NotFound => "not_found",
            ImageError::HttpStatus(_) | ImageError::StoreStatus(..) => "http_status",
            ImageError::Forbidden(_) => "forbidden",
            ImageError::UnknownBucket(_) => "unknown_bucket",
            ImageError::Timeout(_) => "timeout",
            ImageError::Connection(_) => "connection_failed",
            ImageError::TooLarge { .. } => "too_large",
            ImageError::NotAnImage => "not_an_image",
            ImageError::DecodeFailed(_) => "decode_failed",
            ImageError::DimensionsTooLarge { .. } => "dimensions_too_large",
            ImageError::Blocked(_) => "blocked_address",
            ImageError::Inference(_) => "inference_failed",
            ImageError::UnknownModel { .. } => "unknown_model",
            ImageError::CrashLoop { .. } => "crash_loop",
            ImageError::Internal(_) => "internal",
        }
    }
}
