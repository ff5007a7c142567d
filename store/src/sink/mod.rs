//! The sink's queries: it writes the results, and serves them, their batches and their feeds.

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use reefline_schemas::{ClassificationResult, Exif, Metadata, Prediction, Status};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::types::Json;

pub mod batches;
pub mod feeds;

/// A pool of its own for the lookup API, so that a burst of lookups never takes a connection the
/// writers need: at most `connections`, each statement cut off after `statement_timeout`, and a
/// lookup that waits longer than that for a connection fails (503) rather than queueing forever.
pub fn lookup_pool(url: &str, connections: u32, statement_timeout: Duration) -> anyhow::Result<PgPool> {
    // Custom plans: a lookup's `($n IS NULL OR tenant = $n)` filters then use the tenant's index
    // (a generic plan, chosen after five runs of a statement, cannot).
    let options = PgConnectOptions::from_str(url)?.options([
        ("statement_timeout", format!("{}", statement_timeout.as_millis())),
        ("plan_cache_mode", "force_custom_plan".to_owned()),
    ]);
    Ok(PgPoolOptions::new()
        .max_connections(connections.max(1))
        .acquire_timeout(statement_timeout)
        .connect_lazy_with(options))
}

/// A pool for the exports: at most `connections`, each query cut off after `statement_timeout`
/// (an export runs as long as its client reads, but its snapshot holds back VACUUM), and an export
/// that waits longer than `acquire_timeout_ms` for a connection fails (503).
pub fn export_pool(
    url: &str,
    connections: u32,
    acquire_timeout_ms: u64,
    statement_timeout: Duration,
) -> anyhow::Result<PgPool> {
    let options =
        PgConnectOptions::from_str(url)?.options([("statement_timeout", statement_timeout.as_millis().to_string())]);
    Ok(PgPoolOptions::new()
        .max_connections(connections.max(1))
        .acquire_timeout(Duration::from_millis(acquire_timeout_ms))
        .connect_lazy_with(options))
}

/// Writes `results` in one statement. Redelivered or repeated results are harmless: a row is
/// replaced only by a result completed no earlier than the one it holds, and never an `ok` by an
/// `error` (a redo that met a transient failure does not undo a good result). `results` must not
/// hold the same request twice (one statement cannot update a row twice).
pub async fn upsert(pool: &PgPool, results: &[ClassificationResult]) -> sqlx::Result<()> {
    let predictions: Vec<serde_json::Value> =
        results.iter().map(|r| serde_json::to_value(&r.predictions).unwrap_or_default()).collect();
    let metadata: Vec<Option<serde_json::Value>> =
        results.iter().map(|r| r.metadata.as_ref().and_then(|m| serde_json::to_value(m).ok())).collect();
    let exif: Vec<Option<serde_json::Value>> =
        results.iter().map(|r| r.exif.as_ref().and_then(|e| serde_json::to_value(e).ok())).collect();
    let text = |f: fn(&ClassificationResult) -> &str| results.iter().map(|r| f(r).to_owned()).collect::<Vec<String>>();
    let optional = |f: fn(&ClassificationResult) -> Option<&str>| {
        results.iter().map(|r| f(r).map(str::to_owned)).collect::<Vec<_>>()
    };
    let number = |f: fn(&ClassificationResult) -> i32| results.iter().map(f).collect::<Vec<i32>>();
    let millis = |f: fn(&ClassificationResult) -> i64| results.iter().map(|r| f(r) as f64).collect::<Vec<f64>>();
    sqlx::query!(
        "INSERT INTO results (request_id, batch_id, batch_index, batch_size, url, status, predictions, marine_group,
                              model_name, model_version, error_kind, error_message, submitted_at, completed_at,
                              feed_id, line, metadata, sha256, cached, exif, tenant)
         SELECT request_id, batch_id, batch_index, batch_size, url, status, predictions, marine_group, model_name,
                model_version, error_kind, error_message, to_timestamp(submitted_ms / 1000.0), to_timestamp(completed_ms / 1000.0),
                feed_id, line, metadata, sha256, cached, exif,
                -- A result from a classifier before tenants: its request's tenant, as recorded.
                COALESCE(t.tenant, (SELECT q.tenant FROM requests q WHERE q.request_id = t.request_id), 'default')
         FROM UNNEST($1::text[], $2::text[], $3::int[], $4::int[], $5::text[], $6::text[], $7::jsonb[], $8::text[],
                     $9::text[], $10::text[], $11::text[], $12::text[], $13::float8[], $14::float8[],
                     $15::text[], $16::int8[], $17::jsonb[], $18::text[], $19::bool[], $20::jsonb[], $21::text[])
              AS t(request_id, batch_id, batch_index, batch_size, url, status, predictions, marine_group, model_name,
                   model_version, error_kind, error_message, submitted_ms, completed_ms, feed_id, line, metadata,
                   sha256, cached, exif, tenant)
         ON CONFLICT (request_id) DO UPDATE SET
             status = EXCLUDED.status, predictions = EXCLUDED.predictions, marine_group = EXCLUDED.marine_group,
             model_name = EXCLUDED.model_name, model_version = EXCLUDED.model_version, error_kind = EXCLUDED.error_kind,
             error_message = EXCLUDED.error_message, completed_at = EXCLUDED.completed_at, stored_at = now(),
             sha256 = EXCLUDED.sha256, cached = EXCLUDED.cached, exif = EXCLUDED.exif
         WHERE results.completed_at <= EXCLUDED.completed_at
           AND NOT (results.status = 'ok' AND EXCLUDED.status = 'error')
           -- A record reusing another tenant's request id never replaces that tenant's row.
           AND results.tenant = EXCLUDED.tenant",
        &text(|r| &r.request_id),
        &text(|r| &r.batch_id),
        &number(|r| r.batch_index),
        &number(|r| r.batch_size),
        &text(|r| &r.url),
        &text(|r| r.status.as_str()),
        &predictions,
        &optional(|r| r.marine_group.as_deref()) as _,
        &text(|r| &r.model_name),
        &text(|r| &r.model_version),
        &optional(|r| r.error_kind.as_deref()) as _,
        &optional(|r| r.error_message.as_deref()) as _,
        &millis(|r| r.submitted_at_ms),
        &millis(|r| r.completed_at_ms),
        &optional(|r| r.feed_id.as_deref()) as _,
        &results.iter().map(|r| r.line).collect::<Vec<_>>() as _,
        &metadata as _,
        &optional(|r| r.sha256.as_deref()) as _,
        &results.iter().map(|r| r.cached).collect::<Vec<bool>>(),
        &exif as _,
        // `None` from a classifier before tenants: the statement takes its request's.
        &optional(|r| r.tenant.as_deref()) as _,
    )
    .execute(pool)
    .await?;
    Ok(())
}

/// A request with no result yet.
#[derive(Debug)]
pub struct Pending {
    pub request_id: String,
    pub batch_id: String,
    pub batch_index: i32,
    pub url: String,
    pub submitted_at: DateTime<Utc>,
}

/// A request of tenant `scope` (any tenant's when `None`) with no result yet.
pub async fn pending(pool: &PgPool, request_id: &str, scope: Option<&str>) -> sqlx::Result<Option<Pending>> {
    sqlx::query_as!(
        Pending,
        "SELECT request_id, batch_id, batch_index, url, submitted_at FROM requests
         WHERE request_id = $1 AND ($2::text IS NULL OR tenant = $2)",
        request_id,
        scope,
    )
    .fetch_optional(pool)
    .await
}

/// The number of images in a batch of tenant `scope`, from any of its requests seen.
pub async fn batch_size(pool: &PgPool, batch_id: &str, scope: Option<&str>) -> sqlx::Result<Option<i32>> {
    sqlx::query_scalar!(
        "SELECT batch_size FROM requests WHERE batch_id = $1 AND ($2::text IS NULL OR tenant = $2) LIMIT 1",
        batch_id,
        scope,
    )
    .fetch_optional(pool)
    .await
}

/// A stored result, as the lookup API returns it.
#[derive(Debug, sqlx::FromRow)]
pub struct Row {
    pub request_id: String,
    pub batch_id: String,
    pub batch_index: i32,
    pub batch_size: i32,
    pub url: String,
    pub status: String,
    pub predictions: Json<Vec<Prediction>>,
    pub marine_group: Option<String>,
    pub model_name: String,
    pub model_version: String,
    pub error_kind: Option<String>,
    pub error_message: Option<String>,
    pub submitted_at: DateTime<Utc>,
    pub completed_at: DateTime<Utc>,
    pub feed_id: Option<String>,
    pub line: Option<i64>,
    pub metadata: Option<Json<Metadata>>,
    pub sha256: Option<String>,
    pub cached: bool,
    pub exif: Option<Json<Exif>>,
    pub tenant: String,
}

impl Row {
    /// The result record the row was written from.
    pub fn into_result(self) -> ClassificationResult {
        ClassificationResult {
            request_id: self.request_id,
            batch_id: self.batch_id,
            batch_index: self.batch_index,
            batch_size: self.batch_size,
            url: self.url,
            status: if self.status == "ok" { Status::Ok } else { Status::Error },
            predictions: self.predictions.0,
            marine_group: self.marine_group,
            model_name: self.model_name,
            model_version: self.model_version,
            error_kind: self.error_kind,
            error_message: self.error_message,
            submitted_at_ms: self.submitted_at.timestamp_millis(),
            completed_at_ms: self.completed_at.timestamp_millis(),
            feed_id: self.feed_id,
            line: self.line,
            metadata: self.metadata.map(|m| m.0),
            sha256: self.sha256,
            cached: self.cached,
            exif: self.exif.map(|e| e.0),
            tenant: Some(self.tenant),
        }
    }
}

/// The columns a [`Row`] is read from, for the queries a search or an export writes at run time.
pub const COLUMNS: &str = "request_id, batch_id, batch_index, batch_size, url, status, predictions, marine_group,
                           model_name, model_version, error_kind, error_message, submitted_at, completed_at,
                           feed_id, line, metadata, sha256, cached, exif, tenant";

/// The result of `request_id` if it is tenant `scope`'s (any tenant's when `None`).
pub async fn result(pool: &PgPool, request_id: &str, scope: Option<&str>) -> sqlx::Result<Option<Row>> {
    sqlx::query_as!(
        Row,
        r#"SELECT request_id, batch_id, batch_index, batch_size, url, status,
                predictions AS "predictions: Json<Vec<Prediction>>", marine_group, model_name, model_version,
                error_kind, error_message, submitted_at, completed_at, feed_id, line,
                metadata AS "metadata: Json<Metadata>", sha256, cached, exif AS "exif: Json<Exif>", tenant
         FROM results WHERE request_id = $1 AND ($2::text IS NULL OR tenant = $2)"#,
        request_id,
        scope,
    )
    .fetch_optional(pool)
    .await
}

/// The results of `batch_id` if it is tenant `scope`'s (any tenant's when `None`).
pub async fn batch(pool: &PgPool, batch_id: &str, scope: Option<&str>) -> sqlx::Result<Vec<Row>> {
    sqlx::query_as!(
        Row,
        r#"SELECT request_id, batch_id, batch_index, batch_size, url, status,
                predictions AS "predictions: Json<Vec<Prediction>>", marine_group, model_name, model_version,
                error_kind, error_message, submitted_at, completed_at, feed_id, line,
                metadata AS "metadata: Json<Metadata>", sha256, cached, exif AS "exif: Json<Exif>", tenant
         FROM results WHERE batch_id = $1 AND ($2::text IS NULL OR tenant = $2) ORDER BY batch_index"#,
        batch_id,
        scope,
    )
    .fetch_all(pool)
    .await
}
