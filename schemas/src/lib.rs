//! Reefline's wire contract: the Avro schemas in `schemas/avro/`, the Rust types that match them,
//! the rules a record must follow to enter the pipeline, and their encoding in the Confluent wire
//! format through a Schema Registry.

mod codec;
pub mod rules;
mod types;

pub use codec::{Codec, CodecError, RegistrySettings};
pub use types::{ClassificationResult, ImageRequest, Message, Prediction, Status};
