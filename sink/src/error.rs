//! The sink API's errors, and the checks of a request's query every handler shares: each error has
//! a stable `kind` (the JSON body's) and one status, mapped here.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// A query string that parsed, or the error naming what did not.
pub(crate) fn query<T>(
    query: Result<axum::extract::Query<T>, axum::extract::rejection::QueryRejection>,
) -> Result<T, ApiError> {
    query.map(|q| q.0).map_err(|e| ApiError::InvalidField { field: "query", message: e.body_text() })
}

/// A page's `limit`: 1 to 1,000, 100 when absent.
pub(crate) fn page_limit(limit: Option<i64>) -> Result<i64, ApiError> {
    match limit.unwrap_or(100) {
        limit @ 1..=1000 => Ok(limit),
        limit => Err(ApiError::InvalidField { field: "limit", message: format!("{limit} is not from 1 to 1000") }),
    }
}

/// Why a lookup failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ApiError {
    #[error("no request `{0}` is known")]
    UnknownRequest(String),
    #[error("no batch `{0}` is known")]
    UnknownBatch(String),
    #[error("no feed `{0}` is known")]
    UnknownFeed(String),
    #[error("`{field}`: {message}")]
    InvalidField { field: &'static str, message: String },
    #[error("{message}")]
    Unexportable { missing: Vec<&'static str>, message: String },
    #[error("this tenant runs {limit} exports already (EXPORTS_PER_TENANT); retry when one ends")]
    TooManyExports { limit: u32 },
    #[error("the database is unavailable")]
    Database(sqlx::Error),
}

impl From<sqlx::Error> for ApiError {
    /// A value Postgres cannot hold as text (a NUL character) is the request's fault, not the
    /// database's: a 400, not a 503.
    fn from(e: sqlx::Error) -> Self {
        match &e {
            sqlx::Error::Database(db) if db.code().as_deref() == Some("22021") => ApiError::InvalidField {
                field: "request",
                message: "a value holds a character that cannot be stored or searched for (NUL)".into(),
            },
            _ => ApiError::Database(e),
        }
    }
}

impl ApiError {
    fn kind(&self) -> &'static str {
        match self {
            ApiError::UnknownRequest(_) | ApiError::UnknownBatch(_) | ApiError::UnknownFeed(_) => "not_found",
            ApiError::InvalidField { .. } => "invalid_field",
            ApiError::TooManyExports { .. } => "too_many_exports",
            ApiError::Unexportable { .. } => "missing_fields",
            ApiError::Database(_) => "database_unavailable",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match self {
            ApiError::UnknownRequest(_) | ApiError::UnknownBatch(_) | ApiError::UnknownFeed(_) => StatusCode::NOT_FOUND,
            ApiError::InvalidField { .. } => StatusCode::BAD_REQUEST,
            ApiError::TooManyExports { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unexportable { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Database(ref e) => {
                tracing::error!(error = %e, "lookup failed");
                StatusCode::SERVICE_UNAVAILABLE
            }
        };
        let field = match &self {
            ApiError::InvalidField { field, .. } => Some(*field),
            _ => None,
        };
        let mut body = json!({"error": {"kind": self.kind(), "field": field, "message": self.to_string()}});
        if let ApiError::Unexportable { missing, .. } = &self {
            body["error"]["missing"] = json!(missing);
        }
        if status == StatusCode::TOO_MANY_REQUESTS {
            return (status, [(axum::http::header::RETRY_AFTER, "5")], Json(body)).into_response();
        }
        (status, Json(body)).into_response()
    }
}
