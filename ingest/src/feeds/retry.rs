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
use reefline_schemas::ImageRequest;
use reefline_store::ingest as store;
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
    answer(retry(&state, &caller, feed_id, |id| store::RetryOf::Feed(id)).await)
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
    answer(retry(&state, &caller, batch_id, |id| store::RetryOf::Batch(id)).await)
}

fn answer(outcome: Result<Retried, IngestError>) -> Response {
    match outcome {
        Ok(retried) => (StatusCode::ACCEPTED, Json(retried)).into_response(),
        Err(e) => e.into_response(),
    }
}

/// Reads the failed rows of the feed or batch `id` (`of` says which; of the caller's tenant) a page
/// at a time and produces each page again.
async fn retry(
    state: &AppState,
    caller: &Caller,
    id: String,
    of: fn(&str) -> store::RetryOf<'_>,
) -> Result<Retried, IngestError> {
    IngestError::unless_submitter(caller)?;
    let pool = state.feeds.get().cloned().ok_or(IngestError::FeedsUnavailable)?;
    // Another tenant's feed or batch answers as an unknown one. Asked of the feed's or batch's own
    // row (its primary key): as fast for another tenant's id as for an unknown one.
    let (what, known) = match of(&id) {
        store::RetryOf::Feed(id) => ("feed", store::feed_exists(&pool, id, caller.scope()).await),
        store::RetryOf::Batch(id) => ("batch", store::batch_exists(&pool, id, caller.scope()).await),
    };
    let known = known.map_err(super::database)?;
    if !known {
        return Err(IngestError::NotFound { what, id });
    }
    // The rows are read in a transaction holding the retry's lock, released when it ends (also
    // when this ingest dies): a second retry of the same id, on any ingest, is refused meanwhile.
    let mut tx = pool.begin().await.map_err(super::database)?;
    let locked = store::lock_retry(&mut tx, &id).await.map_err(super::database)?;
    if !locked {
        return Err(IngestError::RetryInProgress { what, id });
    }
    // Read a page at a time, each page its own statement: the transaction holds the lock between
    // pages but no snapshot, so a retry that waits for its tenant's rate holds back no VACUUM.
    let stall = Duration::from_secs(state.settings.feed_stall_timeout_s.max(1));
    let chunk_size = CHUNK.min(state.settings.max_pending_images).max(1);
    let (mut after, mut retried) = ((String::new(), -1), 0u64);
    loop {
        let page = store::transient_failures(&mut tx, of(&id), caller.scope(), (&after.0, after.1), chunk_size as i64)
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

fn request(row: store::Failed) -> ImageRequest {
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
