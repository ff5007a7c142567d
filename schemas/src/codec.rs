//! Encoding and decoding records in the Confluent wire format (magic byte, schema id, Avro body)
//! through a Schema Registry.

use std::time::Duration;

use apache_avro::from_value;
use schema_registry_converter::async_impl::avro::{AvroDecoder, AvroEncoder};
use schema_registry_converter::async_impl::schema_registry::{SrSettings, post_schema};
use schema_registry_converter::error::SRCError;
use schema_registry_converter::schema_registry_common::{SchemaType, SubjectNameStrategy, SuppliedSchema};
use secrecy::{ExposeSecret, SecretString};

use crate::Message;

/// Where the Schema Registry is and how to authenticate to it.
#[derive(Clone, clap::Args)]
pub struct RegistrySettings {
    /// Schema Registry base URL (Confluent REST API).
    #[arg(long = "schema-registry-url", env = "SCHEMA_REGISTRY_URL", default_value = "http://127.0.0.1:8085")]
    pub url: String,

    /// Basic-auth user for the registry, if it needs one.
    #[arg(long = "schema-registry-user", env = "SCHEMA_REGISTRY_USER")]
    pub user: Option<String>,

    /// Basic-auth password for the registry.
    #[arg(long = "schema-registry-password", env = "SCHEMA_REGISTRY_PASSWORD", hide_env_values = true)]
    pub password: Option<SecretString>,
}

impl std::fmt::Debug for RegistrySettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistrySettings")
            .field("url", &self.url)
            .field("user", &self.user)
            .field("password", &self.password)
            .finish()
    }
}

impl RegistrySettings {
    /// Settings for an unauthenticated registry at `url`.
    pub fn new(url: impl Into<String>) -> Self {
        Self { url: url.into(), user: None, password: None }
    }
}

/// Why a record could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The registry could not be reached, timed out, or answered anything but a definite "not
    /// found" (5xx, 429, an unreadable body, ...); trying again may work.
    #[error("schema registry unavailable: {0}")]
    RegistryUnavailable(String),
    /// The registry does not know the schema id (or refused a schema): the record itself is at fault.
    #[error("schema registry refused: {0}")]
    Registry(String),
    /// The bytes are not a decodable Confluent-framed Avro record.
    #[error("undecodable record: {0}")]
    Undecodable(String),
    /// The record decoded but does not fit the expected type.
    #[error("record does not match {expected}: {reason}")]
    Mismatch { expected: &'static str, reason: String },
}

impl CodecError {
    /// Stable snake_case name, used as a metric label and a dead-letter header.
    pub fn kind(&self) -> &'static str {
        match self {
            CodecError::RegistryUnavailable(_) => "registry_unavailable",
            CodecError::Registry(_) => "schema_registry",
            CodecError::Undecodable(_) => "undecodable",
            CodecError::Mismatch { .. } => "schema_mismatch",
        }
    }

    /// Whether retrying the same bytes later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, CodecError::RegistryUnavailable(_))
    }

    /// Sorts the converter's errors by what the caller should do. The crate marks only failed
    /// connections and 502/503 as retriable; here every registry answer but 404 (unknown id or
    /// subject), 409 (incompatible) and 422 (invalid schema) is transient too: a 500, 504, 429
    /// or a proxy's page must not turn good records into dead letters.
    fn from_src(e: SRCError) -> Self {
        let text = match &e.cause {
            Some(cause) => format!("{}: {cause}", e.error),
            None => e.error.clone(),
        };
        if e.retriable {
            return CodecError::RegistryUnavailable(text);
        }
        if let Some(status) = http_status(&e.error) {
            return match status {
                404 | 409 | 422 => CodecError::Registry(text),
                _ => CodecError::RegistryUnavailable(text),
            };
        }
        if e.error.contains("RawRegisteredSchema") || e.error.contains("from response") {
            // The registry answered 2xx with a body that is not a registry's.
            CodecError::RegistryUnavailable(text)
        } else {
            CodecError::Undecodable(text)
        }
    }
}

/// The status in the converter's "HTTP request to schema registry failed with status 404 Not Found".
fn http_status(error: &str) -> Option<u16> {
    let rest = error.strip_prefix("HTTP request to schema registry failed with status ")?;
    rest.split_whitespace().next()?.parse().ok()
}

/// Encodes and decodes [`Message`]s, registering their schemas under the topic-name strategy.
#[derive(Clone)]
pub struct Codec {
    registry: SrSettings,
    encoder: std::sync::Arc<AvroEncoder>,
    decoder: std::sync::Arc<AvroDecoder>,
}

impl Codec {
    pub fn new(settings: &RegistrySettings) -> Result<Self, CodecError> {
        let mut builder = SrSettings::new_builder(settings.url.trim_end_matches('/').to_owned());
        builder.no_proxy().set_timeout(Duration::from_secs(10));
        if let Some(user) = &settings.user {
            builder.set_basic_authorization(user, settings.password.as_ref().map(|p| p.expose_secret()));
        }
        let sr = builder.build().map_err(CodecError::from_src)?;
        Ok(Self {
            encoder: std::sync::Arc::new(AvroEncoder::new(sr.clone())),
            decoder: std::sync::Arc::new(AvroDecoder::new(sr.clone())),
            registry: sr,
        })
    }

    /// Registers `T`'s schema for the values of `topic` (the registry answers the existing id when
    /// it is registered already) and returns its id. The services do this when they start, so a
    /// producer configured not to register schemas, as production producers are, finds the
    /// latest version on a fresh stack.
    pub async fn register<T: Message>(&self, topic: &str) -> Result<u32, CodecError> {
        let schema = SuppliedSchema::new(None, SchemaType::Avro, T::SCHEMA.to_owned());
        let registered = post_schema(&self.registry, format!("{topic}-value"), schema).await;
        registered.map(|r| r.id).map_err(CodecError::from_src)
    }

    /// Encodes `item` as the value of a record on `topic`, registering its schema on first use.
    pub async fn encode<T: Message>(&self, topic: &str, item: &T) -> Result<Vec<u8>, CodecError> {
        let strategy = SubjectNameStrategy::TopicNameStrategyWithSchema(
            topic.to_owned(),
            false,
            SuppliedSchema::new(None, SchemaType::Avro, T::SCHEMA.to_owned()),
        );
        let result = self.encoder.encode_struct(item, &strategy).await;
        if result.is_err() {
            self.encoder.remove_errors_from_cache();
        }
        result.map_err(CodecError::from_src)
    }

    /// Decodes a record value written with any registered schema that resolves to `T`'s.
    pub async fn decode<T: Message>(&self, bytes: Option<&[u8]>) -> Result<T, CodecError> {
        let bytes = bytes.ok_or_else(|| CodecError::Undecodable("record has no value".into()))?;
        let decoded = match self.decoder.decode(Some(bytes)).await {
            Ok(d) => d,
            Err(e) => {
                // The crate caches failures (a 404 for an id included) until told otherwise.
                self.decoder.remove_errors_from_cache();
                return Err(CodecError::from_src(e));
            }
        };
        let expected = std::any::type_name::<T>().rsplit("::").next().unwrap_or("record");
        // Avro resolution matches records by name: a result is not a request, however similar.
        if let (Some(writer), Some(reader)) = (&decoded.name, T::schema().name())
            && writer.name() != reader.name()
        {
            return Err(CodecError::Mismatch { expected, reason: format!("the record is a `{}`", writer.name()) });
        }
        let value =
            decoded.value.resolve(T::schema()).map_err(|e| CodecError::Mismatch { expected, reason: e.to_string() })?;
        from_value(&value).map_err(|e| CodecError::Mismatch { expected, reason: e.to_string() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failed(status: &str) -> CodecError {
        let error = format!("HTTP request to schema registry failed with status {status}");
        CodecError::from_src(SRCError::new(&error, Some("RawError".into()), false))
    }

    #[test]
    fn only_a_definite_refusal_is_permanent() {
        for status in ["500 Internal Server Error", "504 Gateway Timeout", "429 Too Many Requests", "401 Unauthorized"]
        {
            assert!(failed(status).is_transient(), "{status}");
        }
        for status in ["404 Not Found", "409 Conflict", "422 Unprocessable Entity"] {
            assert_eq!(failed(status).kind(), "schema_registry", "{status}");
        }
        let garbled = SRCError::non_retryable_without_cause("could not parse to RawRegisteredSchema");
        assert!(CodecError::from_src(garbled).is_transient());
        let bytes = SRCError::non_retryable_without_cause("Invalid magic byte 7");
        assert_eq!(CodecError::from_src(bytes).kind(), "undecodable");
    }
}
