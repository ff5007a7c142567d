//! Feed lookups: `GET /v1/feeds/{id}` (how far it has got) and `GET /v1/feeds/{id}/rejects`
//! (every line refused, with its reason), from the ledger ingest keeps and the results written here.

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use reefline_store::sink::{batches, feeds};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

use reefline_common::auth::Caller;

use crate::error::ApiError;

/// A feed's progress: what was read, what has a result, and how fast results come.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct FeedView {
    pub feed_id: String,
    /// `reading` (its upload is being read), `interrupted` (the upload broke off: resend it with
    /// the same Idempotency-Key) or `read`.
    #[schema(example = "read")]
    pub state: String,
    /// `csv`, `ndjson`, `text`, or `auto` while the first line is not read.
    pub format: String,
    pub source_url: Option<String>,
    pub model: Option<String>,
    /// Its metadata columns, in the feed's order.
    pub columns: Vec<String>,
    /// Lines read so far (blank lines and a CSV header not counted).
    pub lines_read: i64,
    pub accepted: i64,
    pub rejected: i64,
    /// Images with a result, of those accepted.
    pub completed: i64,
    pub ok: i64,
    pub error: i64,
    pub pending: i64,
    /// Read to its end, and every accepted image has a result.
    pub done: bool,
    /// Results per second over the last minute.
    pub images_per_second: f64,
    /// Its part of every result the classifiers gave over the last minute (0 to 1): beside other
    /// feeds being read, each tenant's feeds share the classifiers evenly (`FEED_WINDOW_IMAGES`).
    pub share: f64,
    /// Seconds until every accepted image has a result at that rate; `null` when done, or when no
    /// result came in the last minute. While the feed is still being read, its lines to come are
    /// estimated from its size (an upload's Content-Length, a source's) and the bytes read at its
    /// last checkpoint (`null` without them).
    pub eta_seconds: Option<f64>,
    pub created_at: String,
    pub read_at: Option<String>,
    /// When the last accepted line got its result (the moment its `BatchCompleted` record and
    /// callback go out); `null` until then.
    pub completed_at: Option<String>,
    /// The feed's `callback_url`, its state and every attempt; `null` when it has none.
    pub callback: Option<reefline_schemas::view::CallbackView>,
    pub links: FeedLinks,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct FeedLinks {
    pub rejects: String,
    pub results: String,
}

/// How far a feed has got.
#[utoipa::path(get, path = "/v1/feeds/{feed_id}", params(("feed_id" = String, Path, description = "The id ingest's POST /v1/feeds answered with")), responses(
    (status = 200, description = "The feed's progress", body = FeedView),
    (status = 401, description = "A key is required and none or a wrong one was sent", body = reefline_schemas::view::ErrorBody),
    (status = 404, description = "not_found: no such feed", body = reefline_schemas::view::ErrorBody),
    (status = 503, description = "database_unavailable", body = reefline_schemas::view::ErrorBody),
))]
pub async fn progress(
    State(pool): State<PgPool>,
    caller: Caller,
    Path(feed_id): Path<String>,
) -> Result<Json<FeedView>, ApiError> {
    let row = feeds::progress(&pool, &feed_id, caller.scope())
        .await?
        .ok_or_else(|| ApiError::UnknownFeed(feed_id.clone()))?;
    // The feed's batches row, which carries its callback's progress, is written once the feed is
    // read; until then its callback is waiting.
    let callback = match batches::callback(&pool, &feed_id, caller.scope()).await? {
        None => row.callback_url.clone().map(|url| reefline_schemas::view::CallbackView {
            url,
            state: "waiting",
            next_attempt_at: None,
            delivered_at: None,
            gave_up_at: None,
            attempts: Vec::new(),
        }),
        known => known,
    };
    Ok(Json(FeedView::of(row, callback)))
}

impl FeedView {
    /// The view of the feed `row` describes, with its callback's progress.
    fn of(row: feeds::Progress, callback: Option<reefline_schemas::view::CallbackView>) -> Self {
        let completed = row.ok + row.error;
        let pending = (row.accepted - completed).max(0);
        let done = row.state == "read" && pending == 0;
        let rate = row.recent as f64 / row.window_s;
        let eta_seconds = if done { None } else { eta_seconds(&row, completed, pending, rate) };
        let links = FeedLinks {
            rejects: format!("/v1/feeds/{}/rejects", row.feed_id),
            results: format!("/v1/feeds/{}/results?format=csv", row.feed_id),
        };
        Self {
            feed_id: row.feed_id,
            state: row.state,
            format: row.format,
            source_url: row.source_url,
            model: row.model,
            columns: row.columns.0,
            lines_read: row.lines_read,
            accepted: row.accepted,
            rejected: row.rejected,
            completed,
            ok: row.ok,
            error: row.error,
            pending,
            done,
            images_per_second: (rate * 100.0).round() / 100.0,
            share: if row.everyone_recent > 0 {
                (row.recent as f64 / row.everyone_recent as f64 * 100.0).round() / 100.0
            } else {
                0.0
            },
            eta_seconds,
            created_at: row.created_at.to_rfc3339(),
            read_at: row.read_at.map(|t| t.to_rfc3339()),
            completed_at: row.completed_at.map(|t| t.to_rfc3339()),
            callback,
            links,
        }
    }
}

/// Seconds until a feed still under way is done at `rate` images a second; unknown while it is
/// read and its size, or the bytes read at its last checkpoint, are not known: the lines to come
/// are estimated from them.
fn eta_seconds(row: &feeds::Progress, completed: i64, pending: i64, rate: f64) -> Option<f64> {
    let expected = match (row.state.as_str(), row.size_bytes) {
        ("reading", Some(size)) if row.read_bytes > 0 => {
            Some((row.accepted as f64 * (size as f64 / row.read_bytes as f64).max(1.0)).round() as i64)
        }
        ("reading", _) => None,
        _ => Some(row.accepted),
    };
    expected.filter(|_| rate > 0.0).map(|expected| {
        // At least what is accepted and waiting (a small upload is read ahead of its lines).
        let to_go = (expected - completed).max(pending);
        (to_go as f64 / rate * 10.0).round() / 10.0
    })
}

/// A page of rejected lines.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)] // a misspelt filter is refused, not silently left out
pub struct RejectsQuery {
    /// Lines after this one (the `next_after` of the page before).
    after: Option<i64>,
    /// At most this many, 1 to 1,000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<i64>,
}

/// A line of a feed that was not accepted, and why.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Reject {
    pub line: i64,
    #[schema(example = "not a usable URL: scheme `ftp` is not allowed; use http, https, s3 or az")]
    pub reason: String,
    /// The line as it was sent (its first 200 bytes).
    pub content: String,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct RejectsPage {
    pub feed_id: String,
    pub rejects: Vec<Reject>,
    /// Pass as `after` for the next page; `null` on the last.
    pub next_after: Option<i64>,
}

/// The lines a feed rejected, in line order, a page at a time.
#[utoipa::path(get, path = "/v1/feeds/{feed_id}/rejects", params(("feed_id" = String, Path, description = "A feed id"), RejectsQuery), responses(
    (status = 200, description = "A page of rejected lines", body = RejectsPage),
    (status = 400, description = "invalid_field: `limit` or `after` out of range", body = reefline_schemas::view::ErrorBody),
    (status = 401, description = "A key is required and none or a wrong one was sent", body = reefline_schemas::view::ErrorBody),
    (status = 404, description = "not_found: no such feed", body = reefline_schemas::view::ErrorBody),
    (status = 503, description = "database_unavailable", body = reefline_schemas::view::ErrorBody),
))]
pub async fn rejects(
    State(pool): State<PgPool>,
    caller: Caller,
    Path(feed_id): Path<String>,
    query: Result<Query<RejectsQuery>, QueryRejection>,
) -> Result<Json<RejectsPage>, ApiError> {
    let query = crate::error::query(query)?;
    let limit = crate::error::page_limit(query.limit)?;
    feeds::columns(&pool, &feed_id, caller.scope()).await?.ok_or_else(|| ApiError::UnknownFeed(feed_id.clone()))?;
    let rejects = feeds::rejects(&pool, &feed_id, query.after.unwrap_or(0), limit + 1).await?;
    let mut rejects: Vec<Reject> =
        rejects.into_iter().map(|r| Reject { line: r.line, reason: r.reason, content: r.content }).collect();
    let next_after = (rejects.len() as i64 > limit).then(|| {
        rejects.truncate(limit as usize);
        rejects.last().map_or(0, |r| r.line)
    });
    Ok(Json(RejectsPage { feed_id, rejects, next_after }))
}
