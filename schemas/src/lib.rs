//! Reefline's wire contract: the Avro schemas in `schemas/avro/`, the Rust types that match them,
//! and their encoding in the Confluent wire format through a Schema Registry.
//! The `registry` module is a small registry for local use and tests.

mod codec;
pub mod registry;
pub mod rules;
mod types;

pub use codec::{Codec, CodecError, RegistrySettings};
pub use types::{ClassificationResult, ImageRequest, Message, Prediction, Status};
