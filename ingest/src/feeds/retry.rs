//! `POST /v1/feeds/{id}/retry` and `POST /v1/batches/{id}/retry`: the images of a feed or batch
//! whose result is a transient failure (a timeout, a connection failure, an HTTP 429 or 5xx) are
//! sent through again under their own request ids, so that each one's row is replaced by its new
//! outcome (a good result is never replaced by a failure). A key retries its own tenant's work
//! only; one retry of a feed or batch runs at a time (a second answers `409`), across every ingest.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use reefline_schemas::{ImageRequest, Metadata};
use serde::Serialize;

use reefline_common::auth::Caller;

use crate::AppState;
use crate::error::IngestError;

/// How many images are produced at a time, at most (and at most `INGEST_MAX_PENDING_IMAGES`: a
/// chunk waits for room for all of its images at once).
const CHUNK: usize = 1000;

/// The images sent through again.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct Retried {
    /// The feed or batch id.
    id: String,
    /// Images whose transient failure is being classified again.
    retried: u64,
}

/// A failed result's request, as the results table holds it.
#[derive(sqlx::FromRow)]
struct Failed {
    request_id: String,
    batch_id: String,
    batch_index: i32,
    batch_size: i32,
    url: String,
    model_name: String,
    feed_id: Option<String>,
    line: Option<i64>,
    metadata: Option<sqlx::types::Json<Metadata>>,
    tenant: String,
}

/// The failures worth trying again: timeouts, connection failures, 429 and 5xx answers, the
/// failures the classifier itself retries (`ImageError::is_transient`).
const TRANSIENT: &str = "status = 'error' AND (error_kind IN ('timeout', 'connection_failed')
    OR (error_kind = 'http_status' AND substring(error_message from 'HTTP ([0-9]{3})') ~ '^(429|5[0-9][0-9])$'))";

/// Send a feed's transiently failed images through again.
#[utoipa::path(post, path = "/v1/feeds/{feed_id}/retry", params(("feed_id" = String, Path, description = "A feed id")), responses(
    (status = 202, description = "Those images are on their way again; their rows will hold their new outcome", body = Retried),
    (status = 401, description = "unauthorized", body = reefline_schemas::view::ErrorBody),
    (status = 403, description = "forbidden: the key's role is `read`", body = reefline_schemas::view::ErrorBody),
    (status = 404, description = "not_found: no such feed", body = reefline_schemas::view::ErrorBody),
    (status = 409, description = "retry_in_progress: this feed is being retried already; Retry-After", body = reefline_schemas::view::ErrorBody),
    (status = 503, description = "unavailable: the database or the broker did not answer", body = reefline_schemas::view::ErrorBody),
))]
pub(crate) async fn feed(State(state): State<Arc<AppState>>, caller: Caller, Path(feed_id): Path<String>) -> Response {
    answer(retry(&state, &caller, "feed_id", feed_id).await)
}

/// Send a batch's transiently failed images through again.
#[utoipa::path(post, path = "/v1/batches/{batch_id}/retry", params(("batch_id" = String, Path, description = "A batch id")), responses(
    (status = 202, description = "Those images are on their way again; their rows will hold their new outcome", body = Retried),
    (status = 401, description = "unauthorized", body = reefline_schemas::view::ErrorBody),
    (status = 403, description = "forbidden: the key's role is `read`", body = reefline_schemas::view::ErrorBody),
    (status = 404, description = "not_found: no such batch", body = reefline_schemas::view::ErrorBody),
    (status = 409, description = "retry_in_progress: this batch is being retried already; Retry-After", body = reefline_schemas::view::ErrorBody),
    (status = 503, description = "unavailable: the database or the broker did not answer", body = reefline_schemas::view::ErrorBody),
))]
pub(crate) async fn batch(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    Path(batch_id): Path<String>,
) -> Response {
    answer(retry(&state, &caller, "batch_id", batch_id).await)
}

fn answer(outcome: Result<Retried, IngestError>) -> Response {
    match outcome {
        Ok(retried) => (StatusCode::ACCEPTED, Json(retried)).into_response(),
        Err(e) => e.into_response(),
    }
}

/// Reads the failed rows of `column = id` (of the caller's tenant) a page at a time and produces
/// each page again.
async fn retry(state: &AppState, caller: &Caller, column: &str, id: String) -> Result<Retried, IngestError> {
    IngestError::unless_submitter(caller)?;
    let pool = state.feeds.get().cloned().ok_or(IngestError::FeedsUnavailable)?;
    let what = if column == "feed_id" { "feed" } else { "batch" };
    // Another tenant's feed or batch answers as an unknown one.
    // Asked of the feed's or batch's own row (its primary key): as fast for another tenant's id
    // as for an unknown one.
    let known: bool = sqlx::query_scalar(&format!(
        "SELECT EXISTS (SELECT 1 FROM {table} WHERE {column} = $1 AND ($2::text IS NULL OR tenant = $2))",
        table = if column == "feed_id" { "feeds" } else { "batches" }
    ))
    .bind(&id)
    .bind(caller.scope())
    .fetch_one(&pool)
    .await
    .map_err(super::database)?;
    if !known {
        return Err(IngestError::NotFound { what, id });
    }
    // The rows are read in a transaction holding the retry's lock, released when it ends (also
    // when this ingest dies): a second retry of the same id, on any ingest, is refused meanwhile.
    let mut tx = pool.begin().await.map_err(super::database)?;
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock(hashtextextended('retry ' || $1, 0))")
        .bind(&id)
        .fetch_one(&mut *tx)
        .await
        .map_err(super::database)?;
    if !locked {
        return Err(IngestError::RetryInProgress { what, id });
    }
    // Read a page at a time, each page its own statement: the transaction holds the lock between
    // pages but no snapshot, so a retry that waits for its tenant's rate holds back no VACUUM.
    let sql = format!(
        "SELECT request_id, batch_id, batch_index, batch_size, url, model_name, feed_id, line, metadata, tenant
         FROM results WHERE {column} = $1 AND {TRANSIENT} AND ($2::text IS NULL OR tenant = $2)
           AND (batch_id, batch_index) > ($3, $4)
         ORDER BY batch_id, batch_index LIMIT $5"
    );
    let stall = Duration::from_secs(state.settings.feed_stall_timeout_s.max(1));
    let chunk_size = CHUNK.min(state.settings.max_pending_images).max(1);
    let (mut after, mut retried) = ((String::new(), -1), 0u64);
    loop {
        let page: Vec<Failed> = sqlx::query_as(&sql)
            .bind(&id)
            .bind(caller.scope())
            .bind(&after.0)
            .bind(after.1)
            .bind(chunk_size as i64)
            .fetch_all(&mut *tx)
            .await
            .map_err(super::database)?;
        let Some(last) = page.last() else { break };
        after = (last.batch_id.clone(), last.batch_index);
        let chunk: Vec<ImageRequest> = page.into_iter().map(request).collect();
        let pause = || tokio::time::sleep(Duration::from_secs(1));
        super::produce::produce_chunk(state, "retry", &chunk, stall, pause).await?;
        retried += chunk.len() as u64;
        if chunk.len() < chunk_size {
            break;
        }
    }
    let _ = tx.rollback().await;
    tracing::info!(%id, retried, "transient failures sent through again");
    Ok(Retried { id, retried })
}

fn request(row: Failed) -> ImageRequest {
    ImageRequest {
        request_id: row.request_id,
        batch_id: row.batch_id,
        batch_index: row.batch_index,
        batch_size: row.batch_size,
        url: row.url,
        submitted_at_ms: chrono::Utc::now().timestamp_millis(),
        source: "retry".into(),
        model: Some(row.model_name),
        callback_url: None,
        feed_id: row.feed_id,
        line: row.line,
        metadata: row.metadata.map(|m| m.0),
        tenant: Some(row.tenant),
    }
}
