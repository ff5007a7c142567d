//! The lookup API: `GET /v1/results/{request_id}` and `GET /v1/batches/{batch_id}`.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use reefline_schemas::view::{BatchView, ErrorBody, ResultView};
use serde::Serialize;
use sqlx::PgPool;

use reefline_common::auth::Caller;

use reefline_store::sink::{self as db, Row};

use crate::error::ApiError;

/// The sink's HTTP API.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(title = "Reefline lookups", description = "Results and batches, as the sink has written them to Postgres. Submissions go to ingest (port 8080 locally)."),
    paths(result, batch, crate::search::search, crate::search::export, crate::feeds::progress, crate::feeds::rejects, crate::export::feed_results, crate::export::batch_results),
    modifiers(&API_KEYS),
)]
pub(crate) struct ApiDoc;

const API_KEYS: reefline_common::docs::ApiKeys = reefline_common::docs::ApiKeys;

pub(crate) fn router(pool: PgPool) -> Router {
    Router::new()
        .route("/v1/results", get(crate::search::search))
        .route("/v1/results/{request_id}", get(result))
        .route("/v1/batches/{batch_id}", get(batch))
        .route("/v1/feeds/{feed_id}", get(crate::feeds::progress))
        .route("/v1/feeds/{feed_id}/rejects", get(crate::feeds::rejects))
        .with_state(pool)
}

/// The exports: they last as long as their rows take to send, so they are served without the
/// request timeout, on connections of their own with no statement timeout.
pub(crate) fn streaming_router(exports: crate::export::Exports) -> Router {
    Router::new()
        .route("/v1/feeds/{feed_id}/results", get(crate::export::feed_results))
        .route("/v1/batches/{batch_id}/results", get(crate::export::batch_results))
        .route("/v1/results/export", get(crate::search::export))
        .with_state(exports)
}

/// A request whose result is not in yet.
#[derive(Serialize, utoipa::ToSchema)]
struct PendingView {
    request_id: String,
    batch_id: String,
    batch_index: i32,
    url: String,
    #[schema(value_type = String, example = "pending")]
    status: &'static str,
    submitted_at: String,
}

/// 200 with the result; 202 with `"status": "pending"` while the request is known but not done;
/// 404 when the request is unknown.
#[utoipa::path(get, path = "/v1/results/{request_id}", params(("request_id" = String, Path, description = "An id ingest answered with")), responses(
    (status = 200, description = "The result", body = ResultView),
    (status = 202, description = "Known, not classified yet", body = PendingView),
    (status = 401, description = "A key is required and none or a wrong one was sent", body = ErrorBody),
    (status = 404, description = "not_found: no such request", body = ErrorBody),
    (status = 503, description = "database_unavailable", body = ErrorBody),
))]
async fn result(
    State(pool): State<PgPool>,
    caller: Caller,
    Path(request_id): Path<String>,
) -> Result<Response, ApiError> {
    // Another tenant's request answers as an unknown one does.
    if let Some(row) = db::result(&pool, &request_id, caller.scope()).await? {
        return Ok(Json(ResultView::from(row.into_result())).into_response());
    }
    let pending = db::pending(&pool, &request_id, caller.scope()).await?.ok_or(ApiError::UnknownRequest(request_id))?;
    let view = PendingView {
        request_id: pending.request_id,
        batch_id: pending.batch_id,
        batch_index: pending.batch_index,
        url: pending.url,
        status: "pending",
        submitted_at: pending.submitted_at.to_rfc3339(),
    };
    Ok((StatusCode::ACCEPTED, Json(view)).into_response())
}

#[utoipa::path(get, path = "/v1/batches/{batch_id}", params(("batch_id" = String, Path, description = "An id ingest answered with")), responses(
    (status = 200, description = "The batch's progress, its results so far in submission order, and its callback", body = BatchView),
    (status = 401, description = "A key is required and none or a wrong one was sent", body = ErrorBody),
    (status = 404, description = "not_found: no such batch", body = ErrorBody),
    (status = 503, description = "database_unavailable", body = ErrorBody),
))]
async fn batch(
    State(pool): State<PgPool>,
    caller: Caller,
    Path(batch_id): Path<String>,
) -> Result<Json<BatchView>, ApiError> {
    let rows = db::batch(&pool, &batch_id, caller.scope()).await?;
    let total = match rows.first() {
        Some(first) => first.batch_size,
        None => db::batch_size(&pool, &batch_id, caller.scope())
            .await?
            .ok_or_else(|| ApiError::UnknownBatch(batch_id.clone()))?,
    };
    let callback = db::batches::callback(&pool, &batch_id, caller.scope()).await?;
    let view = BatchView::new(batch_id, i64::from(total), rows.into_iter().map(Row::into_result).collect());
    Ok(Json(BatchView { callback, ..view }))
}
