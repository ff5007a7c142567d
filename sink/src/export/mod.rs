//! Exports: every result of a feed (`GET /v1/feeds/{id}/results`), a batch
//! (`GET /v1/batches/{id}/results`) or a search (`GET /v1/results/export`, in `search.rs`) in any
//! export format, filtered, streamed from Postgres row by row as the client reads (constant memory
//! whatever the size). `query.rs` checks what is asked for; `stream.rs` runs the export.

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::response::Response;
use reefline_schemas::ClassificationResult;
use reefline_schemas::view::ResultView;
use sqlx::PgPool;
use sqlx::postgres::PgArguments;

use reefline_common::auth::Caller;

use crate::error::ApiError;
use reefline_store::sink::COLUMNS;

mod camtrap;
pub mod classes;
mod coco;
mod megadetector;
mod query;
mod stream;
mod table;

use query::FILTERS;
pub(crate) use query::{ExportQuery, Filters, bind, check_status_and_score};
pub(crate) use stream::stream;

/// Turns results into an export's bytes, a piece at a time.
trait Encode: Send {
    fn push(&mut self, result: ClassificationResult);
    /// Bytes encoded and not yet taken.
    fn buffered(&self) -> usize;
    /// What is encoded so far.
    fn take(&mut self) -> Bytes;
    /// Ends the export (what comes after the last result).
    fn finish(&mut self) {}
    /// How many times the results are read (from one snapshot), each pass after a `next_pass`.
    fn passes(&self) -> usize {
        1
    }
    fn next_pass(&mut self) {}
}

/// One result object per line.
#[derive(Default)]
struct Lines(Vec<u8>);

impl Encode for Lines {
    fn push(&mut self, result: ClassificationResult) {
        let _ = serde_json::to_writer(&mut self.0, &ResultView::from(result));
        self.0.push(b'\n');
    }

    fn buffered(&self) -> usize {
        self.0.len()
    }

    fn take(&mut self) -> Bytes {
        Bytes::from(std::mem::take(&mut self.0))
    }
}

/// What the exports need: their connections, the classes the MegaDetector and COCO formats list, and
/// the limits that keep idle or greedy clients from holding every connection.
#[derive(Clone)]
pub struct Exports {
    pub pool: PgPool,
    pub classes: std::sync::Arc<classes::Classes>,
    /// Exports running, by tenant.
    pub running: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, u32>>>,
    /// Most exports one tenant may run at once.
    pub per_tenant: u32,
    /// Longest an export waits for its client to read.
    pub idle: std::time::Duration,
}

/// A caller's running export, counted against its tenant until dropped.
pub(crate) struct Running {
    running: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, u32>>>,
    pub(crate) caller: Caller,
}

impl Exports {
    /// Counts an export of `caller`'s tenant, before it uses any connection.
    pub(crate) fn start(&self, caller: Caller) -> Result<Running, ApiError> {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        let count = running.entry(caller.tenant.clone()).or_default();
        if *count >= self.per_tenant {
            return Err(ApiError::TooManyExports { limit: self.per_tenant });
        }
        *count += 1;
        Ok(Running { running: self.running.clone(), caller })
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = running.get_mut(&self.caller.tenant) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                running.remove(&self.caller.tenant);
            }
        }
    }
}

/// Every result of a feed, in line order.
#[utoipa::path(get, path = "/v1/feeds/{feed_id}/results", params(("feed_id" = String, Path, description = "A feed id"), ExportQuery), responses(
    (status = 200, description = "The results, streamed: CSV (one row per image: url, line, the feed's metadata columns, status, error, top-5 labels, indices and scores, marine group, model, times), NDJSON (one result per line), the MegaDetector or COCO Camera Traps JSON, or a Camtrap DP ZIP",
        content((String = "text/csv"), (String = "application/x-ndjson"), (String = "application/json"), (String = "application/zip"))),
    (status = 400, description = "invalid_field: a filter or format that is not one", body = reefline_schemas::view::ErrorBody),
    (status = 401, description = "A key is required and none or a wrong one was sent", body = reefline_schemas::view::ErrorBody),
    (status = 404, description = "not_found: no such feed", body = reefline_schemas::view::ErrorBody),
    (status = 422, description = "missing_fields: format=camtrap-dp, and a field the package requires cannot be filled; `missing` names the columns or options that would fill it", body = reefline_schemas::view::ErrorBody),
    (status = 429, description = "too_many_exports: the tenant runs EXPORTS_PER_TENANT exports already; Retry-After", body = reefline_schemas::view::ErrorBody),
    (status = 503, description = "database_unavailable", body = reefline_schemas::view::ErrorBody),
))]
pub async fn feed_results(
    State(exports): State<Exports>,
    caller: Caller,
    Path(feed_id): Path<String>,
    query: Result<Query<ExportQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let filters = crate::error::query(query)?.check()?;
    let running = exports.start(caller)?;
    let scope = running.caller.scope().map(str::to_owned);
    // Another tenant's feed answers as an unknown one; a feed's results are its tenant's.
    let columns = reefline_store::sink::feeds::columns(&exports.pool, &feed_id, scope.as_deref())
        .await?
        .ok_or_else(|| ApiError::UnknownFeed(feed_id.clone()))?;
    // Each line once, its latest result; the filters apply to that result.
    let latest = reefline_store::sink::feeds::latest_per_line("$1", "(SELECT tenant FROM feeds WHERE feed_id = $1)");
    let selection = Selection {
        sql: format!("SELECT {COLUMNS} FROM ({latest}) latest WHERE {FILTERS} ORDER BY line"),
        arguments: filters.arguments(&feed_id, scope)?,
        what: "feed",
        deployment: Some(feed_id.clone()),
        id: feed_id,
        columns,
    };
    stream(exports, selection, filters, running).await
}

/// Every result of a batch, in submission order.
#[utoipa::path(get, path = "/v1/batches/{batch_id}/results", params(("batch_id" = String, Path, description = "A batch id"), ExportQuery), responses(
    (status = 200, description = "The results, streamed in the format asked for (as for a feed)",
        content((String = "text/csv"), (String = "application/x-ndjson"), (String = "application/json"), (String = "application/zip"))),
    (status = 400, description = "invalid_field: a filter or format that is not one", body = reefline_schemas::view::ErrorBody),
    (status = 401, description = "A key is required and none or a wrong one was sent", body = reefline_schemas::view::ErrorBody),
    (status = 404, description = "not_found: no such batch", body = reefline_schemas::view::ErrorBody),
    (status = 422, description = "missing_fields: format=camtrap-dp, and a field the package requires cannot be filled", body = reefline_schemas::view::ErrorBody),
    (status = 429, description = "too_many_exports: the tenant runs EXPORTS_PER_TENANT exports already; Retry-After", body = reefline_schemas::view::ErrorBody),
    (status = 503, description = "database_unavailable", body = reefline_schemas::view::ErrorBody),
))]
pub async fn batch_results(
    State(exports): State<Exports>,
    caller: Caller,
    Path(batch_id): Path<String>,
    query: Result<Query<ExportQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let filters = crate::error::query(query)?.check()?;
    let running = exports.start(caller)?;
    let scope = running.caller.scope().map(str::to_owned);
    // Another tenant's batch answers as an unknown one; a batch's results are its tenant's.
    let known = reefline_store::sink::batches::known(&exports.pool, &batch_id, scope.as_deref()).await?;
    if !known {
        return Err(ApiError::UnknownBatch(batch_id));
    }
    let mut keys_of = PgArguments::default();
    bind(&mut keys_of, batch_id.clone())?;
    bind(&mut keys_of, scope.clone())?;
    let of_batch = "batch_id = $1 AND ($2::text IS NULL OR tenant = $2)";
    let columns = metadata_keys(&exports.pool, &filters, of_batch, keys_of).await?;
    let selection = Selection {
        sql: format!("SELECT {COLUMNS} FROM results WHERE batch_id = $1 AND {FILTERS} ORDER BY batch_index"),
        arguments: filters.arguments(&batch_id, scope)?,
        what: "batch",
        deployment: Some(batch_id.clone()),
        id: batch_id,
        columns,
    };
    stream(exports, selection, filters, running).await
}

/// A CSV's columns: every metadata key of the results `condition` finds (bound by `arguments`);
/// none for the other formats, which read no columns.
pub(crate) async fn metadata_keys(
    pool: &PgPool,
    filters: &Filters,
    condition: &str,
    arguments: PgArguments,
) -> Result<Vec<String>, ApiError> {
    if !filters.has_columns() {
        return Ok(Vec::new());
    }
    let keys = format!(
        "SELECT DISTINCT k FROM results, jsonb_object_keys(COALESCE(metadata, '{{}}')) AS k WHERE {condition} ORDER BY k"
    );
    Ok(sqlx::query_scalar_with(&keys, arguments).fetch_all(pool).await?)
}

/// Which results an export reads, and what they are of.
pub(crate) struct Selection {
    /// The query, and what it binds.
    pub sql: String,
    pub arguments: PgArguments,
    /// `feed`, `batch` or `search`, and its id (a search's: `results`).
    pub what: &'static str,
    pub id: String,
    /// The Camtrap DP deployment of images that name none: the feed's or batch's id; none in a
    /// search, where each image's own feed or batch is.
    pub deployment: Option<String>,
    /// The metadata keys, the CSV's columns.
    pub columns: Vec<String>,
}
