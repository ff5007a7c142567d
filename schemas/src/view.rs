//! How results look over HTTP. The sink's lookups and ingest's answers in the same call show one
//! JSON shape, built here from the result record.

use serde::Serialize;

use crate::{ClassificationResult, Prediction, Status};

/// The model that gave a result.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct ModelView {
    pub name: String,
    pub version: String,
}

/// Why an image has no predictions.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorView {
    pub kind: String,
    pub message: String,
}

/// One image's result.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct ResultView {
    pub request_id: String,
    pub batch_id: String,
    pub batch_index: i32,
    pub url: String,
    /// `ok` or `error`.
    #[schema(value_type = String, example = "ok")]
    pub status: &'static str,
    pub predictions: Vec<Prediction>,
    /// Whether the top class is a marine animal.
    pub marine: bool,
    pub marine_group: Option<String>,
    pub model: ModelView,
    pub error: Option<ErrorView>,
    pub submitted_at: String,
    pub completed_at: String,
    /// The bulk feed the image came in (absent for a submission).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub feed_id: Option<String>,
    /// Its line in the feed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<i64>,
    /// What the submitter said about the image (a feed's other columns).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metadata: Option<crate::Metadata>,
    /// SHA-256 of the fetched bytes (absent when nothing was fetched).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// The predictions were reused from the same bytes classified before by the same model version.
    pub cached: bool,
    /// What the photo says of itself: EXIF date, GPS and camera, and its size.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exif: Option<crate::Exif>,
}

impl From<ClassificationResult> for ResultView {
    fn from(r: ClassificationResult) -> Self {
        let error = r.error_kind.map(|kind| ErrorView { kind, message: r.error_message.unwrap_or_default() });
        Self {
            request_id: r.request_id,
            batch_id: r.batch_id,
            batch_index: r.batch_index,
            url: r.url,
            status: r.status.as_str(),
            predictions: r.predictions,
            marine: r.marine_group.is_some(),
            marine_group: r.marine_group,
            model: ModelView { name: r.model_name, version: r.model_version },
            error,
            submitted_at: rfc3339(r.submitted_at_ms),
            completed_at: rfc3339(r.completed_at_ms),
            feed_id: r.feed_id,
            line: r.line,
            metadata: r.metadata,
            sha256: r.sha256,
            cached: r.cached,
            exif: r.exif,
        }
    }
}

/// A batch's progress and the results it has so far, in submission order.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct BatchView {
    pub batch_id: String,
    pub total: i64,
    pub completed: i64,
    pub pending: i64,
    pub ok: i64,
    pub error: i64,
    pub done: bool,
    pub results: Vec<ResultView>,
    /// The submission's callback, when it named one (the sink's lookup only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub callback: Option<CallbackView>,
}

/// Where a submission's callback stands: `waiting` (the batch is not done), `due`, `delivered` or
/// `gave_up`, and every attempt.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct CallbackView {
    pub url: String,
    #[schema(value_type = String, example = "delivered")]
    pub state: &'static str,
    pub next_attempt_at: Option<String>,
    pub delivered_at: Option<String>,
    pub gave_up_at: Option<String>,
    pub attempts: Vec<CallbackAttemptView>,
}

/// One try of a callback: the HTTP status it got, or why it got none.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct CallbackAttemptView {
    pub attempt: i32,
    pub at: String,
    pub status: Option<i32>,
    pub error: Option<String>,
}

impl BatchView {
    /// The view of a batch of `total` images of which `results` are done.
    pub fn new(batch_id: String, total: i64, results: Vec<ClassificationResult>) -> Self {
        let completed = results.len() as i64;
        let ok = results.iter().filter(|r| r.status == Status::Ok).count() as i64;
        Self {
            batch_id,
            total,
            completed,
            pending: total - completed,
            ok,
            error: completed - ok,
            done: completed >= total,
            results: results.into_iter().map(ResultView::from).collect(),
            callback: None,
        }
    }
}

/// Every error answer of the HTTP APIs: `{"error": {"kind", "field", "message"}}`.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// What went wrong: a stable kind, the request field at fault where there is one, and a message.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    #[schema(example = "invalid_url")]
    pub kind: String,
    #[schema(example = "images[1]")]
    pub field: Option<String>,
    #[schema(
        example = "`images[1]` is not a usable image URL: scheme `ftp` is not allowed; use http, https, s3 or az"
    )]
    pub message: String,
    /// `missing_fields`: the columns or options that would fill what is missing.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(example = json!(["timestamp"]))]
    pub missing: Option<Vec<String>>,
}

/// Milliseconds since the epoch as RFC 3339, in UTC.
pub fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms).unwrap_or_default().to_rfc3339()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(index: i32, status: Status) -> ClassificationResult {
        ClassificationResult {
            request_id: format!("r{index}"),
            batch_id: "b".into(),
            batch_index: index,
            batch_size: 3,
            url: "https://example.org/a.jpg".into(),
            status,
            model_name: "m".into(),
            model_version: "v".into(),
            error_kind: (status == Status::Error).then(|| "not_found".into()),
            submitted_at_ms: 1_764_000_000_123,
            completed_at_ms: 1_764_000_001_000,
            ..Default::default()
        }
    }

    #[test]
    fn a_batch_counts_what_is_done() {
        let view = BatchView::new("b".into(), 3, vec![result(0, Status::Ok), result(2, Status::Error)]);
        assert_eq!((view.total, view.completed, view.pending, view.ok, view.error, view.done), (3, 2, 1, 1, 1, false));
        let error = view.results[1].error.as_ref().expect("an error result has its error");
        assert_eq!((error.kind.as_str(), error.message.as_str()), ("not_found", ""));
        assert_eq!(view.results[0].submitted_at, "2025-11-24T16:00:00.123+00:00");
    }
}
