//! The lookup API: `GET /v1/results/{request_id}` and `GET /v1/batches/{batch_id}`.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use reefline_schemas::Prediction;
use serde::Serialize;
use serde_json::json;
use sqlx::PgPool;

use crate::db::{self, Row};

pub(crate) fn router(pool: PgPool) -> Router {
    Router::new()
        .route("/v1/results/{request_id}", get(result))
        .route("/v1/batches/{batch_id}", get(batch))
        .with_state(pool)
}

/// Why a lookup failed.
#[derive(Debug, thiserror::Error)]
enum ApiError {
    #[error("no result for request `{0}` yet")]
    UnknownRequest(String),
    #[error("no results for batch `{0}` yet")]
    UnknownBatch(String),
    #[error("the database is unavailable")]
    Database(#[from] sqlx::Error),
}

impl ApiError {
    fn kind(&self) -> &'static str {
        match self {
            ApiError::UnknownRequest(_) | ApiError::UnknownBatch(_) => "not_found",
            ApiError::Database(_) => "database_unavailable",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match self {
            ApiError::UnknownRequest(_) | ApiError::UnknownBatch(_) => StatusCode::NOT_FOUND,
            ApiError::Database(ref e) => {
                tracing::error!(error = %e, "lookup failed");
                StatusCode::SERVICE_UNAVAILABLE
            }
        };
        (status, Json(json!({"error": {"kind": self.kind(), "message": self.to_string()}}))).into_response()
    }
}

#[derive(Serialize)]
struct Model {
    name: String,
    version: String,
}

#[derive(Serialize)]
struct ErrorView {
    kind: String,
    message: String,
}

/// One result as the API shows it.
#[derive(Serialize)]
struct ResultView {
    request_id: String,
    batch_id: String,
    batch_index: i32,
    url: String,
    status: String,
    predictions: Vec<Prediction>,
    /// Whether the top class is a marine animal.
    marine: bool,
    marine_group: Option<String>,
    model: Model,
    error: Option<ErrorView>,
    submitted_at: String,
    completed_at: String,
}

impl From<Row> for ResultView {
    fn from(r: Row) -> Self {
        let error = match (r.error_kind, r.error_message) {
            (Some(kind), message) => Some(ErrorView { kind, message: message.unwrap_or_default() }),
            _ => None,
        };
        Self {
            request_id: r.request_id,
            batch_id: r.batch_id,
            batch_index: r.batch_index,
            url: r.url,
            status: r.status,
            predictions: r.predictions.0,
            marine: r.marine_group.is_some(),
            marine_group: r.marine_group,
            model: Model { name: r.model_name, version: r.model_version },
            error,
            submitted_at: r.submitted_at.to_rfc3339(),
            completed_at: r.completed_at.to_rfc3339(),
        }
    }
}

async fn result(State(pool): State<PgPool>, Path(request_id): Path<String>) -> Result<Json<ResultView>, ApiError> {
    let row = db::result(&pool, &request_id).await?.ok_or(ApiError::UnknownRequest(request_id))?;
    Ok(Json(row.into()))
}

/// A batch's progress and the results it has so far, in submission order.
#[derive(Serialize)]
struct BatchView {
    batch_id: String,
    total: i64,
    completed: i64,
    pending: i64,
    ok: i64,
    error: i64,
    done: bool,
    results: Vec<ResultView>,
}

async fn batch(State(pool): State<PgPool>, Path(batch_id): Path<String>) -> Result<Json<BatchView>, ApiError> {
    let rows = db::batch(&pool, &batch_id).await?;
    let Some(first) = rows.first() else { return Err(ApiError::UnknownBatch(batch_id)) };
    let total = i64::from(first.batch_size);
    let completed = rows.len() as i64;
    let ok = rows.iter().filter(|r| r.status == "ok").count() as i64;
    Ok(Json(BatchView {
        batch_id,
        total,
        completed,
        pending: total - completed,
        ok,
        error: completed - ok,
        done: completed >= total,
        results: rows.into_iter().map(ResultView::from).collect(),
    }))
}
