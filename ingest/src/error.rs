//! Ingest's error type: every way a submission can be refused, with its HTTP status.

use axum::Json;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// Why a submission was refused.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("request body is not valid JSON: {0}")]
    InvalidJson(String),
    #[error("`{field}`: {message}")]
    InvalidField { field: String, message: String },
    #[error("`{field}` is required")]
    MissingField { field: String },
    #[error("`images` is empty; send between 1 and {limit} URLs")]
    EmptyImages { limit: usize },
    #[error("`images` holds {count} URLs; the limit is {limit}")]
    TooManyImages { count: usize, limit: usize },
    #[error("`{field}` is not a usable image URL: {reason}")]
    InvalidUrl { field: String, reason: String },
    #[error("`{field}`: {reason}")]
    UnknownBucket { field: String, reason: String },
    #[error("`model` is `{name}`, which is not a model served here; the models are: {served}")]
    UnknownModel { name: String, served: String },
    #[error("request body is larger than the limit of {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("Content-Type must be application/json")]
    UnsupportedMediaType,
    #[error("the broker did not accept the request: {0}; retry later")]
    Unavailable(String),
    #[error("{pending} images are already waiting for the broker (limit {limit}); retry later")]
    Overloaded { pending: usize, limit: usize },
    #[error("bulk feeds are not available: the database (DATABASE_URL) has not been reached yet; retry later")]
    FeedsUnavailable,
    #[error("feed {feed_id} is being read from another upload with this Idempotency-Key; retry when it ends")]
    FeedInProgress { feed_id: String },
    #[error("{}", unreadable(feed_id, reason))]
    UnreadableFeed { feed_id: String, reason: String },
    #[error(
        "the feed goes on past line {limit}, the most lines a feed may have: feed {feed_id} was read to line {limit} \
         and closed there (a resend with its key reads no further); line {line} and the rest were not read, send \
         them as a feed of their own"
    )]
    FeedTooLong { feed_id: String, limit: u64, line: u64 },
    #[error(
        "line {line} would be the feed's rejected line {}; the limit is {limit}: feed {feed_id} was read to the \
         line before it and closed there (a resend with its key reads no further); see its rejects, correct the \
         list and send it as a new feed", limit + 1
    )]
    TooManyRejects { feed_id: String, limit: u64, line: u64 },
    #[error("no {what} `{id}` is known")]
    NotFound { what: &'static str, id: String },
    #[error(
        "this Idempotency-Key names feed {feed_id}, sent with another file, source_url, model or format; use a new key for a new feed"
    )]
    IdempotencyKeyReused { feed_id: String },
    #[error("this key's role is `{role}`; submitting needs `submit` or `admin`")]
    Forbidden { role: &'static str },
    #[error("this tenant may submit {per_second} images a second; this submission fits in {retry_after_s} s")]
    QuotaExceeded { per_second: u32, retry_after_s: u64 },
    #[error("{limit} images of this tenant already wait for the broker (TENANT_MAX_PENDING_IMAGES); retry later")]
    TenantOverloaded { limit: usize },
    #[error("this tenant may submit {per_day} images a day (UTC) and has used them; more after midnight UTC")]
    DailyQuotaExceeded { per_day: u64, retry_after_s: u64 },
    #[error("{what} `{id}` is being retried already; retry when that ends")]
    RetryInProgress { what: &'static str, id: String },
}

fn unreadable(feed_id: &str, reason: &str) -> String {
    if feed_id.is_empty() {
        return reason.to_owned();
    }
    format!(
        "{reason}. Feed {feed_id} keeps every line settled before that: resend with the same Idempotency-Key to resume"
    )
}

impl IngestError {
    /// Stable snake_case name, used in the error body and as a metric label.
    /// The refusal of images over their tenant's day.
    pub fn over_day(over: crate::quota::OverDay) -> Self {
        IngestError::DailyQuotaExceeded { per_day: over.per_day, retry_after_s: over.retry_after.as_secs().max(1) }
    }

    /// Refuses `caller` unless its role may submit.
    pub fn unless_submitter(caller: &reefline_common::auth::Caller) -> Result<(), IngestError> {
        if caller.may_submit() { Ok(()) } else { Err(IngestError::Forbidden { role: caller.role.as_str() }) }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            IngestError::InvalidJson(_) => "invalid_json",
            IngestError::InvalidField { .. } => "invalid_field",
            IngestError::MissingField { .. } => "missing_field",
            IngestError::EmptyImages { .. } => "empty_images",
            IngestError::TooManyImages { .. } => "too_many_images",
            IngestError::InvalidUrl { .. } => "invalid_url",
            IngestError::UnknownModel { .. } => "unknown_model",
            IngestError::UnknownBucket { .. } => "unknown_bucket",
            IngestError::BodyTooLarge { .. } => "body_too_large",
            IngestError::UnsupportedMediaType => "unsupported_media_type",
            IngestError::Unavailable(_) => "unavailable",
            IngestError::Overloaded { .. } => "overloaded",
            IngestError::FeedsUnavailable => "feeds_unavailable",
            IngestError::FeedInProgress { .. } => "feed_in_progress",
            IngestError::UnreadableFeed { .. } => "unreadable_feed",
            IngestError::FeedTooLong { .. } => "feed_too_long",
            IngestError::TooManyRejects { .. } => "too_many_rejects",
            IngestError::NotFound { .. } => "not_found",
            IngestError::Forbidden { .. } => "forbidden",
            IngestError::IdempotencyKeyReused { .. } => "idempotency_key_reused",
            IngestError::QuotaExceeded { .. }
            | IngestError::DailyQuotaExceeded { .. }
            | IngestError::TenantOverloaded { .. } => "quota_exceeded",
            IngestError::RetryInProgress { .. } => "retry_in_progress",
        }
    }

    /// The field the error is about, when there is one.
    fn field(&self) -> Option<&str> {
        match self {
            IngestError::InvalidField { field, .. }
            | IngestError::MissingField { field }
            | IngestError::InvalidUrl { field, .. }
            | IngestError::UnknownBucket { field, .. } => Some(field),
            IngestError::EmptyImages { .. } | IngestError::TooManyImages { .. } => Some("images"),
            IngestError::UnknownModel { .. } => Some("model"),
            _ => None,
        }
    }

    fn status(&self) -> StatusCode {
        match self {
            IngestError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            IngestError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            IngestError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            IngestError::Overloaded { .. }
            | IngestError::QuotaExceeded { .. }
            | IngestError::DailyQuotaExceeded { .. }
            | IngestError::TenantOverloaded { .. } => StatusCode::TOO_MANY_REQUESTS,
            IngestError::FeedsUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            IngestError::FeedInProgress { .. } => StatusCode::CONFLICT,
            IngestError::NotFound { .. } => StatusCode::NOT_FOUND,
            IngestError::Forbidden { .. } => StatusCode::FORBIDDEN,
            IngestError::IdempotencyKeyReused { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            IngestError::RetryInProgress { .. } => StatusCode::CONFLICT,
            _ => StatusCode::BAD_REQUEST,
        }
    }
}

impl IntoResponse for IngestError {
    fn into_response(self) -> Response {
        let body = Json(json!({
            "error": { "kind": self.kind(), "field": self.field(), "message": self.to_string() }
        }));
        let retry_after = match self {
            IngestError::Unavailable(_) | IngestError::FeedsUnavailable => Some(5),
            IngestError::Overloaded { .. }
            | IngestError::FeedInProgress { .. }
            | IngestError::TenantOverloaded { .. } => Some(1),
            IngestError::RetryInProgress { .. } => Some(5),
            IngestError::QuotaExceeded { retry_after_s, .. }
            | IngestError::DailyQuotaExceeded { retry_after_s, .. } => Some(retry_after_s),
            _ => None,
        };
        // The rest of the body is not read: a refused request's, or a feed's that failed half-way.
        let too_large = matches!(
            self,
            IngestError::BodyTooLarge { .. }
                | IngestError::UnreadableFeed { .. }
                | IngestError::FeedTooLong { .. }
                | IngestError::TooManyRejects { .. }
                | IngestError::DailyQuotaExceeded { .. }
        );
        let mut response = (self.status(), body).into_response();
        if let Some(seconds) = retry_after {
            response.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from(seconds));
        }
        if too_large {
            // The rest of the body is never read, so the connection cannot carry another request:
            // say so, or a client reuses it and its next request meets the close (as nginx does).
            response.headers_mut().insert(header::CONNECTION, header::HeaderValue::from_static("close"));
        }
        response
    }
}
