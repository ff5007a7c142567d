//! The sink's reads of the feeds ingest records: a feed's progress, its columns and its rejects.

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use sqlx::types::Json;

/// The latest result of each line of the feed `feed_id` of tenant `tenant` (SQL expressions), in
/// line order: a line can have two results (a chunk produced twice: an upload cut off between its
/// produce and its checkpoint, or a slow reader whose lease was taken over), and every count,
/// export and search takes each line once. [`progress`] spells the same out for its check.
pub fn latest_per_line(feed_id: &str, tenant: &str) -> String {
    format!(
        "SELECT DISTINCT ON (line) * FROM results WHERE feed_id = {feed_id} AND tenant = {tenant}
         ORDER BY line, completed_at DESC, request_id DESC"
    )
}

/// A feed's metadata columns, or `None` for a feed unknown to tenant `scope` (any tenant when `None`).
pub async fn columns(pool: &PgPool, feed_id: &str, scope: Option<&str>) -> sqlx::Result<Option<Vec<String>>> {
    let columns = sqlx::query_scalar!(
        r#"SELECT columns AS "columns: Json<Vec<String>>" FROM feeds
           WHERE feed_id = $1 AND ($2::text IS NULL OR tenant = $2)"#,
        feed_id,
        scope,
    )
    .fetch_optional(pool)
    .await?;
    Ok(columns.map(|c| c.0))
}

/// A feed as the ledger holds it, its results' counts and the rates its progress is told from.
pub struct Progress {
    pub feed_id: String,
    pub state: String,
    pub format: String,
    pub source_url: Option<String>,
    pub model: Option<String>,
    pub callback_url: Option<String>,
    pub columns: Json<Vec<String>>,
    pub lines_read: i64,
    pub accepted: i64,
    pub rejected: i64,
    pub created_at: DateTime<Utc>,
    pub read_at: Option<DateTime<Utc>>,
    /// When the feed's batch completed: every accepted line has a result.
    pub completed_at: Option<DateTime<Utc>>,
    pub ok: i64,
    pub error: i64,
    /// Its results over the last minute.
    pub recent: i64,
    /// Results of every submission and feed over the last minute.
    pub everyone_recent: i64,
    pub size_bytes: Option<i64>,
    pub read_bytes: i64,
    /// The seconds `recent` counts over: the last minute, or the feed's age when younger.
    pub window_s: f64,
}

/// The progress of feed `feed_id` if it is tenant `scope`'s (any tenant's when `None`).
pub async fn progress(pool: &PgPool, feed_id: &str, scope: Option<&str>) -> sqlx::Result<Option<Progress>> {
    sqlx::query_as!(
        Progress,
        r#"SELECT f.feed_id, f.state, f.format, f.source_url, f.model, f.callback_url,
                  f.columns AS "columns: Json<Vec<String>>", f.lines_read, f.accepted, f.rejected,
                  f.size_bytes, f.read_bytes, f.created_at, f.read_at, b.completed_at AS "completed_at?",
                  r.ok AS "ok!", r.error AS "error!", r.recent AS "recent!",
                  (SELECT count(*) FROM results WHERE completed_at > now() - interval '1 minute') AS "everyone_recent!",
                  GREATEST(1.0, LEAST(60.0, EXTRACT(EPOCH FROM now() - f.created_at)::float8)) AS "window_s!"
           FROM feeds f
                CROSS JOIN LATERAL (SELECT count(*) FILTER (WHERE status = 'ok') AS ok,
                                           count(*) FILTER (WHERE status = 'error') AS error,
                                           count(*) FILTER (WHERE completed_at > now() - interval '1 minute') AS recent
                                    FROM (SELECT DISTINCT ON (line) * FROM results
                                          WHERE feed_id = f.feed_id AND tenant = f.tenant
                                          ORDER BY line, completed_at DESC, request_id DESC) latest) r
                LEFT JOIN batches b ON b.batch_id = f.feed_id AND b.kind = 'feed' AND b.tenant = f.tenant
           WHERE f.feed_id = $1 AND ($2::text IS NULL OR f.tenant = $2)"#,
        feed_id,
        scope,
    )
    .fetch_optional(pool)
    .await
}

/// A line a feed rejected.
pub struct Reject {
    pub line: i64,
    pub reason: String,
    pub content: String,
}

/// Up to `limit` of the lines feed `feed_id` rejected after line `after`, in line order.
pub async fn rejects(pool: &PgPool, feed_id: &str, after: i64, limit: i64) -> sqlx::Result<Vec<Reject>> {
    sqlx::query_as!(
        Reject,
        "SELECT line, reason, content FROM feed_rejects WHERE feed_id = $1 AND line > $2 ORDER BY line LIMIT $3",
        feed_id,
        after,
        limit,
    )
    .fetch_all(pool)
    .await
}
