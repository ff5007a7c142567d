//! Reefline's wire contract: the Avro schemas in `schemas/avro/`, the Rust types that match them,
//! the rules a record must follow to enter the pipeline, and their encoding in the Confluent wire
//! format through a Schema Registry.

mod codec;
pub mod rules;
mod types;
pub mod view;

pub use codec::{Codec, CodecError, RegistrySettings};
pub use types::{BatchCompleted, ClassificationResult, Exif, ImageRequest, Message, Metadata, Prediction, Status};

/// The Kafka header every request and result record carries with its request id.
pub const REQUEST_ID_HEADER: &str = "reefline-request-id";
/// The Kafka header every result record carries with its batch id, so that a reader waiting for
/// one batch skips the others without decoding them.
pub const BATCH_ID_HEADER: &str = "reefline-batch-id";
