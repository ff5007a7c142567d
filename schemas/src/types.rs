//! The records that travel through Kafka, matching the `.avsc` files field for field.

use std::sync::LazyLock;

use apache_avro::Schema;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// A record type with its Avro schema.
pub trait Message: Serialize + DeserializeOwned + Send + Sync {
    /// The schema's JSON text, as registered.
    const SCHEMA: &'static str;
    /// The parsed schema, used as the reader schema when decoding.
    fn schema() -> &'static Schema;
}

macro_rules! message {
    ($ty:ty, $file:literal) => {
        impl Message for $ty {
            const SCHEMA: &'static str = include_str!(concat!("../avro/", $file));
            fn schema() -> &'static Schema {
                static SCHEMA: LazyLock<Schema> = LazyLock::new(|| {
                    Schema::parse_str(<$ty as Message>::SCHEMA).expect(concat!($file, " is valid Avro"))
                });
                &SCHEMA
            }
        }
    };
}

/// What a submitter said about one image (a feed's other columns), carried into its result.
pub type Metadata = std::collections::BTreeMap<String, String>;

/// One image to classify (`image_request.avsc`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ImageRequest {
    pub request_id: String,
    pub batch_id: String,
    pub batch_index: i32,
    pub batch_size: i32,
    pub url: String,
    pub submitted_at_ms: i64,
    pub source: String,
    /// The model named by the submission; `None` for the classifier's default.
    #[serde(default)]
    pub model: Option<String>,
    /// Where the sink POSTs the submission's summary when it is done; `None` for none.
    #[serde(default)]
    pub callback_url: Option<String>,
    /// The bulk feed the image came in; `None` for a submission.
    #[serde(default)]
    pub feed_id: Option<String>,
    /// The line of the feed the URL was on, from 1.
    #[serde(default)]
    pub line: Option<i64>,
    /// What the submitter said about the image; `None` for nothing.
    #[serde(default)]
    pub metadata: Option<Metadata>,
    /// The tenant it belongs to, as ingest claims it; honoured only under a valid seal
    /// (`reefline_common::tenant`).
    #[serde(default)]
    pub tenant: Option<String>,
}
message!(ImageRequest, "image_request.avsc");

/// One class of the model's outputs (an ImageNet class for the EfficientNet models) and its
/// probability.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Prediction {
    pub index: i32,
    pub wnid: String,
    pub label: String,
    /// A marine class's scientific name; `None` for other classes (and in records written before it).
    #[serde(default)]
    pub scientific_name: Option<String>,
    pub score: f32,
}

/// Whether an image was classified.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    #[default]
    Ok,
    Error,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Error => "error",
        }
    }
}

/// What a photo says of itself (its EXIF, and its size from its header); `None` where it says nothing.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Exif {
    /// EXIF DateTimeOriginal, ISO 8601 (with its offset when the photo gives one).
    pub taken_at: Option<String>,
    /// Degrees, north positive.
    pub gps_latitude: Option<f64>,
    /// Degrees, east positive.
    pub gps_longitude: Option<f64>,
    /// Metres above sea level (negative below).
    pub gps_altitude: Option<f64>,
    pub camera_make: Option<String>,
    pub camera_model: Option<String>,
    /// Pixels, from the image's header.
    pub width: Option<i32>,
    pub height: Option<i32>,
}

/// The outcome for one image (`classification_result.avsc`). A test builds one from the fields it
/// cares about and `..Default::default()`, so that a new field touches no fixture.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ClassificationResult {
    pub request_id: String,
    pub batch_id: String,
    pub batch_index: i32,
    pub batch_size: i32,
    pub url: String,
    /// `ok` or `error`: a string on the wire because apache-avro cannot serialise enums inside records.
    #[serde(with = "status_as_string")]
    pub status: Status,
    pub predictions: Vec<Prediction>,
    pub marine_group: Option<String>,
    pub model_name: String,
    pub model_version: String,
    pub error_kind: Option<String>,
    pub error_message: Option<String>,
    pub submitted_at_ms: i64,
    pub completed_at_ms: i64,
    /// The request's feed.
    #[serde(default)]
    pub feed_id: Option<String>,
    /// The request's line in its feed.
    #[serde(default)]
    pub line: Option<i64>,
    /// The request's metadata.
    #[serde(default)]
    pub metadata: Option<Metadata>,
    /// SHA-256 of the fetched bytes, lowercase hex.
    #[serde(default)]
    pub sha256: Option<String>,
    /// Whether the predictions were reused from the same bytes classified before by the same model.
    #[serde(default)]
    pub cached: bool,
    /// What the photo says of itself.
    #[serde(default)]
    pub exif: Option<Exif>,
    /// The tenant the request belongs to; `None` in records written before tenants (the default).
    #[serde(default)]
    pub tenant: Option<String>,
}
message!(ClassificationResult, "classification_result.avsc");

impl ClassificationResult {
    /// Whether `new`, a result for the same request, takes this one's place (at-least-once
    /// delivery repeats results; a redo may end differently): the later result wins, except that
    /// an `error` never undoes an `ok` (a redo that met a transient failure).
    pub fn is_replaced_by(&self, new: &ClassificationResult) -> bool {
        self.completed_at_ms <= new.completed_at_ms && !(self.status == Status::Ok && new.status == Status::Error)
    }
}

/// A submission all of whose images have a result (`batch_completed.avsc`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BatchCompleted {
    pub batch_id: String,
    pub total: i32,
    pub ok: i32,
    pub error: i32,
    pub marine: i32,
    pub marine_groups: std::collections::HashMap<String, i32>,
    pub submitted_at_ms: i64,
    pub completed_at_ms: i64,
}
message!(BatchCompleted, "batch_completed.avsc");

mod status_as_string {
    use super::Status;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(status: &Status, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(status.as_str())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Status, D::Error> {
        match String::deserialize(d)?.as_str() {
            "ok" => Ok(Status::Ok),
            "error" => Ok(Status::Error),
            other => Err(serde::de::Error::custom(format!("status `{other}` is neither ok nor error"))),
        }
    }
}
