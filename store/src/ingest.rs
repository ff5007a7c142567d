//! Ingest's queries: the feeds ledger (which feed an `Idempotency-Key` names, who reads it, how far
//! its reading has got, every line it rejected), a feed's share of the classifiers, the retries of
//! transient failures and the tenants' daily counts. Ingest writes `feeds`, `feed_rejects` and
//! `tenant_usage`; it reads `results` and `batches` for shares and retries.

use chrono::{DateTime, Utc};
use reefline_schemas::Metadata;
use sqlx::types::Json;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

/// A feed as the ledger holds it.
#[derive(Clone, Debug)]
pub struct Feed {
    pub feed_id: String,
    pub state: String,
    pub lines_read: i64,
    pub accepted: i64,
    pub rejected: i64,
    /// Every line up to this one is settled (accepted and on the broker, or rejected).
    pub last_line: i64,
    pub chunks: i32,
}

/// What a new feed is opened with.
pub struct NewFeed<'a> {
    /// The uploader's tenant: its Idempotency-Keys are its own.
    pub tenant: &'a str,
    pub idempotency_key: Option<&'a str>,
    pub format: &'a str,
    pub source_url: Option<&'a str>,
    pub model: Option<&'a str>,
    pub callback_url: Option<&'a str>,
    /// What the key is used for: a resend must match it.
    pub fingerprint: &'a str,
}

/// Inserts a new feed read under `lease`, unless its key names one already.
pub async fn insert_feed(pool: &PgPool, feed_id: &str, new: &NewFeed<'_>, lease: Uuid) -> sqlx::Result<Option<Feed>> {
    sqlx::query_as!(
        Feed,
        "INSERT INTO feeds (feed_id, key_scope, idempotency_key, format, source_url, model, callback_url, state, reader,
                            tenant, fingerprint)
         VALUES ($1, $2, $3, $4, $5, $6, $7, 'reading', $8, $2, $9)
         ON CONFLICT (key_scope, idempotency_key) DO NOTHING
         RETURNING feed_id, state, lines_read, accepted, rejected, last_line, chunks",
        feed_id,
        new.tenant,
        new.idempotency_key,
        new.format,
        new.source_url,
        new.model,
        new.callback_url,
        lease,
        new.fingerprint,
    )
    .fetch_optional(pool)
    .await
}

/// Takes over the feed tenant `tenant`'s key names for `lease`, unless it is read, its reader was
/// heard from within `lease_for_s`, or it was made from another upload (`fingerprint`).
pub async fn take_over(
    pool: &PgPool,
    tenant: &str,
    key: Option<&str>,
    fingerprint: &str,
    lease: Uuid,
    lease_for_s: f64,
) -> sqlx::Result<Option<Feed>> {
    sqlx::query_as!(
        Feed,
        "UPDATE feeds SET state = 'reading', reader = $3, updated_at = now()
         WHERE key_scope = $1 AND idempotency_key = $2 AND state <> 'read'
           AND (state = 'interrupted' OR updated_at < now() - make_interval(secs => $4))
           AND (fingerprint IS NULL OR fingerprint = $5)
         RETURNING feed_id, state, lines_read, accepted, rejected, last_line, chunks",
        tenant,
        key,
        lease,
        lease_for_s,
        fingerprint,
    )
    .fetch_optional(pool)
    .await
}

/// The feed tenant `tenant`'s key names, and whether it was made from the same upload.
pub async fn keyed(pool: &PgPool, tenant: &str, key: Option<&str>, fingerprint: &str) -> sqlx::Result<(Feed, bool)> {
    let row = sqlx::query!(
        r#"SELECT feed_id, state, lines_read, accepted, rejected, last_line, chunks,
                  fingerprint IS NULL OR fingerprint = $3 AS "same!"
           FROM feeds WHERE key_scope = $1 AND idempotency_key = $2"#,
        tenant,
        key,
        fingerprint,
    )
    .fetch_one(pool)
    .await?;
    let feed = Feed {
        feed_id: row.feed_id,
        state: row.state,
        lines_read: row.lines_read,
        accepted: row.accepted,
        rejected: row.rejected,
        last_line: row.last_line,
        chunks: row.chunks,
    };
    Ok((feed, row.same))
}

/// A chunk of a feed's lines, settled: its counts, its rejects and what the feed is now known to be.
pub struct Settled<'a> {
    pub lines: i64,
    pub accepted: i64,
    pub rejected: i64,
    pub last_line: i64,
    pub columns: &'a [String],
    pub format: &'a str,
    /// The feed's size in bytes, when known.
    pub size_bytes: Option<i64>,
    pub read_bytes: i64,
}

/// Moves the counts of the feed `feed_id` on by `chunk`, in `tx`, while `lease` holds it; the
/// feed's rejects after it, or `None` when the lease is lost.
pub async fn settle(
    tx: &mut PgConnection,
    feed_id: &str,
    lease: Uuid,
    chunk: &Settled<'_>,
) -> sqlx::Result<Option<i64>> {
    sqlx::query_scalar!(
        "UPDATE feeds SET lines_read = lines_read + $3, accepted = accepted + $4, rejected = rejected + $5,
                          last_line = $6, chunks = chunks + CASE WHEN $4 > 0 THEN 1 ELSE 0 END,
                          columns = $7, format = $8, updated_at = now(),
                          size_bytes = coalesce($9, size_bytes), read_bytes = $10
         WHERE feed_id = $1 AND reader = $2 AND state = 'reading'
         RETURNING rejected",
        feed_id,
        lease,
        chunk.lines,
        chunk.accepted,
        chunk.rejected,
        chunk.last_line,
        Json(chunk.columns) as _,
        chunk.format,
        chunk.size_bytes,
        chunk.read_bytes,
    )
    .fetch_optional(tx)
    .await
}

/// Records rejected lines of the feed `feed_id`, in `tx`: `lines[i]` refused for `reasons[i]`,
/// its start `contents[i]`. A line recorded before is left as it is.
pub async fn reject(
    tx: &mut PgConnection,
    feed_id: &str,
    lines: &[i64],
    reasons: &[&str],
    contents: &[&str],
) -> sqlx::Result<()> {
    sqlx::query!(
        "INSERT INTO feed_rejects (feed_id, line, reason, content, tenant)
         SELECT $1, line, reason, content, (SELECT tenant FROM feeds WHERE feed_id = $1)
         FROM UNNEST($2::int8[], $3::text[], $4::text[]) AS t(line, reason, content)
         ON CONFLICT DO NOTHING",
        feed_id,
        lines as _,
        reasons as _,
        contents as _,
    )
    .execute(tx)
    .await?;
    Ok(())
}

/// Renews `lease` on the feed `feed_id`; whether it still holds the feed.
pub async fn heartbeat(pool: &PgPool, feed_id: &str, lease: Uuid) -> sqlx::Result<bool> {
    let held = sqlx::query!(
        "UPDATE feeds SET updated_at = now() WHERE feed_id = $1 AND reader = $2 AND state = 'reading'",
        feed_id,
        lease,
    )
    .execute(pool)
    .await?;
    Ok(held.rows_affected() == 1)
}

/// Ends `lease`'s reading of the feed `feed_id`: `read` in `format` (`Some`) or `interrupted`; a
/// feed read gets its row in the batches table in the same transaction. The feed as it now is.
pub async fn close(pool: &PgPool, feed_id: &str, lease: Uuid, read: Option<&str>) -> sqlx::Result<Option<Feed>> {
    let mut tx = pool.begin().await?;
    let feed = sqlx::query_as!(
        Feed,
        "UPDATE feeds SET state = $3, updated_at = now(), read_at = CASE WHEN $3 = 'read' THEN now() END,
                          format = COALESCE($4, format)
         WHERE feed_id = $1 AND reader = $2 AND state = 'reading'
         RETURNING feed_id, state, lines_read, accepted, rejected, last_line, chunks",
        feed_id,
        lease,
        if read.is_some() { "read" } else { "interrupted" },
        read,
    )
    .fetch_optional(&mut *tx)
    .await?;
    if feed.as_ref().is_some_and(|f| f.state == "read") {
        sqlx::query!(
            "INSERT INTO batches (batch_id, kind, total, callback_url, submitted_at, tenant)
             SELECT feed_id, 'feed', accepted, callback_url, created_at, tenant FROM feeds WHERE feed_id = $1
             ON CONFLICT (batch_id) DO NOTHING",
            feed_id,
        )
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(feed)
}

/// Records the batch a chunk of a feed travels in: `total` images, the first submitted at
/// `submitted_ms` (Unix milliseconds).
pub async fn open_chunk(
    pool: &PgPool,
    batch_id: &str,
    total: i32,
    submitted_ms: i64,
    feed_id: &str,
    tenant: &str,
) -> sqlx::Result<()> {
    let submitted_ms = submitted_ms as f64;
    sqlx::query!(
        "INSERT INTO batches (batch_id, total, submitted_at, kind, feed_id, tenant)
         VALUES ($1, $2, to_timestamp($3::float8 / 1000.0), 'feed_chunk', $4, $5)
         ON CONFLICT (batch_id) DO NOTHING",
        batch_id,
        total,
        submitted_ms,
        feed_id,
        tenant,
    )
    .execute(pool)
    .await?;
    Ok(())
}

/// The feed `feed_id`'s share of a `window` of images (split evenly between the tenants with a
/// feed read within `lease_s`, and each tenant's part between its feeds), and its images without a
/// result in the chunks it opened since `since`.
pub async fn share(
    pool: &PgPool,
    feed_id: &str,
    tenant: &str,
    window: f64,
    lease_s: f64,
    since: DateTime<Utc>,
) -> sqlx::Result<(f64, i64)> {
    let row = sqlx::query!(
        r#"WITH active AS (
               SELECT feed_id, tenant FROM feeds
               WHERE state = 'reading' AND updated_at > now() - make_interval(secs => $4)
           )
           SELECT $3::float8 / greatest(1, (SELECT count(DISTINCT tenant) FROM active))
                             / greatest(1, (SELECT count(*) FROM active WHERE tenant = $2)) AS "share!",
                  coalesce((SELECT sum(b.total - (SELECT count(*) FROM results r WHERE r.batch_id = b.batch_id))
                            FROM batches b
                            WHERE b.kind = 'feed_chunk' AND b.feed_id = $1 AND b.completed_at IS NULL
                              AND b.submitted_at >= $5), 0)::int8 AS "open!""#,
        feed_id,
        tenant,
        window,
        lease_s,
        since,
    )
    .fetch_one(pool)
    .await?;
    Ok((row.share, row.open))
}

/// Whether the feed `feed_id` is tenant `scope`'s (any tenant's when `None`).
pub async fn feed_exists(pool: &PgPool, feed_id: &str, scope: Option<&str>) -> sqlx::Result<bool> {
    sqlx::query_scalar!(
        r#"SELECT EXISTS (SELECT 1 FROM feeds WHERE feed_id = $1 AND ($2::text IS NULL OR tenant = $2)) AS "known!""#,
        feed_id,
        scope,
    )
    .fetch_one(pool)
    .await
}

/// Whether the batch `batch_id` is tenant `scope`'s (any tenant's when `None`).
pub async fn batch_exists(pool: &PgPool, batch_id: &str, scope: Option<&str>) -> sqlx::Result<bool> {
    sqlx::query_scalar!(
        r#"SELECT EXISTS (SELECT 1 FROM batches WHERE batch_id = $1 AND ($2::text IS NULL OR tenant = $2)) AS "known!""#,
        batch_id,
        scope,
    )
    .fetch_one(pool)
    .await
}

/// Takes, in `tx`, the lock that lets one retry of `id` run at a time (across every ingest; it is
/// released when `tx` ends); whether it was free.
pub async fn lock_retry(tx: &mut PgConnection, id: &str) -> sqlx::Result<bool> {
    sqlx::query_scalar!(r#"SELECT pg_try_advisory_xact_lock(hashtextextended('retry ' || $1, 0)) AS "locked!""#, id)
        .fetch_one(tx)
        .await
}

/// A failed result's request, as the results table holds it.
pub struct Failed {
    pub request_id: String,
    pub batch_id: String,
    pub batch_index: i32,
    pub batch_size: i32,
    pub url: String,
    pub model_name: String,
    pub feed_id: Option<String>,
    pub line: Option<i64>,
    pub metadata: Option<Json<Metadata>>,
    pub tenant: String,
}

/// Which results a retry reads.
#[derive(Clone, Copy, Debug)]
pub enum RetryOf<'a> {
    Feed(&'a str),
    Batch(&'a str),
}

/// Up to `limit` results of a feed or batch of tenant `scope` (any tenant's when `None`) that
/// failed for a reason worth trying again, after `(batch_id, batch_index)` in that order. The
/// reasons are the ones the classifier itself retries (`ImageError::is_transient`): timeouts,
/// connection failures, 429 and 5xx answers. A statement for each, so that each reads its own index.
pub async fn transient_failures(
    tx: &mut PgConnection,
    of: RetryOf<'_>,
    scope: Option<&str>,
    after: (&str, i32),
    limit: i64,
) -> sqlx::Result<Vec<Failed>> {
    match of {
        RetryOf::Feed(feed_id) => {
            sqlx::query_as!(
                Failed,
                r#"SELECT request_id, batch_id, batch_index, batch_size, url, model_name, feed_id, line,
                          metadata AS "metadata: Json<Metadata>", tenant
                   FROM results
                   WHERE feed_id = $1 AND ($2::text IS NULL OR tenant = $2) AND status = 'error'
                     AND (error_kind IN ('timeout', 'connection_failed')
                          OR (error_kind = 'http_status'
                              AND substring(error_message from 'HTTP ([0-9]{3})') ~ '^(429|5[0-9][0-9])$'))
                     AND (batch_id, batch_index) > ($3, $4)
                   ORDER BY batch_id, batch_index LIMIT $5"#,
                feed_id,
                scope,
                after.0,
                after.1,
                limit,
            )
            .fetch_all(tx)
            .await
        }
        RetryOf::Batch(batch_id) => {
            sqlx::query_as!(
                Failed,
                r#"SELECT request_id, batch_id, batch_index, batch_size, url, model_name, feed_id, line,
                          metadata AS "metadata: Json<Metadata>", tenant
                   FROM results
                   WHERE batch_id = $1 AND ($2::text IS NULL OR tenant = $2) AND status = 'error'
                     AND (error_kind IN ('timeout', 'connection_failed')
                          OR (error_kind = 'http_status'
                              AND substring(error_message from 'HTTP ([0-9]{3})') ~ '^(429|5[0-9][0-9])$'))
                     AND (batch_id, batch_index) > ($3, $4)
                   ORDER BY batch_id, batch_index LIMIT $5"#,
                batch_id,
                scope,
                after.0,
                after.1,
                limit,
            )
            .fetch_all(tx)
            .await
        }
    }
}

/// Adds `n` images to `tenant`'s count of the UTC day unless that would pass `per_day`; whether it did.
pub async fn count_images(pool: &PgPool, tenant: &str, n: i64, per_day: i64) -> sqlx::Result<bool> {
    let taken = sqlx::query_scalar!(
        "INSERT INTO tenant_usage AS u (tenant, day, images) VALUES ($1, (now() AT TIME ZONE 'UTC')::date, $2)
         ON CONFLICT (tenant, day) DO UPDATE SET images = u.images + EXCLUDED.images
         WHERE u.images + EXCLUDED.images <= $3
         RETURNING images",
        tenant,
        n,
        per_day,
    )
    .fetch_optional(pool)
    .await?;
    Ok(taken.is_some())
}
