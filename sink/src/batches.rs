//! The batches table: a row per submission from its request records, marked complete once every
//! image has a result, then an outbox for its `BatchCompleted` record and its callback.
//!
//! A feed has a row too (kind `feed`, its batch id the feed id), which ingest writes once the feed
//! is read; it is complete once every accepted line has a result. The batches its chunks travel in
//! (kind `feed_chunk`) are complete as submissions are, and tell nobody themselves.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use reefline_schemas::ImageRequest;
use reefline_schemas::view::{CallbackAttemptView, CallbackView};
use sqlx::PgPool;

/// Records the batches of `requests`; a batch seen before is left as it is.
pub async fn insert(pool: &PgPool, requests: &[ImageRequest]) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO batches (batch_id, total, callback_url, submitted_at, kind, feed_id, tenant)
         SELECT batch_id, total, callback_url, to_timestamp(submitted_ms / 1000.0),
                CASE WHEN feed_id IS NULL THEN 'submission' ELSE 'feed_chunk' END, feed_id, tenant
         FROM UNNEST($1::text[], $2::int[], $3::text[], $4::float8[], $5::text[], $6::text[])
              AS t(batch_id, total, callback_url, submitted_ms, feed_id, tenant)
         ON CONFLICT (batch_id) DO NOTHING",
    )
    .bind(requests.iter().map(|r| r.batch_id.as_str()).collect::<Vec<_>>())
    .bind(requests.iter().map(|r| r.batch_size).collect::<Vec<_>>())
    .bind(requests.iter().map(|r| r.callback_url.as_deref()).collect::<Vec<_>>())
    .bind(requests.iter().map(|r| r.submitted_at_ms as f64).collect::<Vec<_>>())
    .bind(requests.iter().map(|r| r.feed_id.as_deref()).collect::<Vec<_>>())
    .bind(requests.iter().map(crate::db::tenant_of_request).collect::<Vec<_>>())
    .execute(pool)
    .await?;
    Ok(())
}

/// Marks complete those of `batch_ids` that have a result for every image, and makes their
/// callbacks due; the number marked. Called after the results (or the requests) are committed, so
/// that of writers racing on one batch the last one sees every row; only one of them marks it.
pub async fn complete(pool: &PgPool, batch_ids: &[&str]) -> sqlx::Result<u64> {
    let done = sqlx::query(
        "UPDATE batches b
         SET completed_at = now(), callback_due_at = CASE WHEN b.callback_url IS NULL THEN NULL ELSE now() END
         FROM (SELECT batch_id, tenant, count(*) AS n FROM results WHERE batch_id = ANY($1) GROUP BY batch_id, tenant) c
         WHERE b.batch_id = c.batch_id AND b.tenant = c.tenant AND b.completed_at IS NULL AND c.n >= b.total
           AND b.kind <> 'feed'",
    )
    .bind(batch_ids)
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}

/// Marks complete the feeds (read to their end) whose every accepted line has a result, and makes
/// their callbacks due; the number marked. Lines are counted only once no request logged for the
/// feed's open chunks waits for its result, and counted distinct: a chunk an interrupted upload
/// produced (in part, maybe: that chunk's batch never fills) and its resend produced again has two
/// results for a line.
pub async fn complete_feeds(pool: &PgPool) -> sqlx::Result<u64> {
    let done = sqlx::query(
        "UPDATE batches f
         SET completed_at = now(), callback_due_at = CASE WHEN f.callback_url IS NULL THEN NULL ELSE now() END
         WHERE f.kind = 'feed' AND f.completed_at IS NULL
           AND NOT EXISTS (SELECT 1 FROM batches c JOIN requests q ON q.batch_id = c.batch_id
                           WHERE c.kind = 'feed_chunk' AND c.feed_id = f.batch_id AND c.completed_at IS NULL
                             AND NOT EXISTS (SELECT 1 FROM results r WHERE r.request_id = q.request_id))
           AND (SELECT count(DISTINCT line) FROM results r WHERE r.feed_id = f.batch_id AND r.tenant = f.tenant) >= f.total",
    )
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}

/// A completed batch's figures, for its `BatchCompleted` record and its callback.
#[derive(Clone, Debug)]
pub struct Summary {
    pub batch_id: String,
    /// Whether the batch is a feed (its batch id the feed id).
    pub feed: bool,
    pub total: i32,
    pub ok: i32,
    pub error: i32,
    pub marine: i32,
    pub marine_groups: HashMap<String, i32>,
    pub submitted_at: DateTime<Utc>,
    pub completed_at: DateTime<Utc>,
}

/// A completed batch as the table holds it.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct Finished {
    pub batch_id: String,
    /// `submission` or `feed`.
    pub kind: String,
    pub total: i32,
    pub submitted_at: DateTime<Utc>,
    pub completed_at: DateTime<Utc>,
}

/// The figures of each of `batches`: a feed's from the results of its lines (the latest result of
/// a line that has two).
pub async fn summaries(conn: &mut sqlx::PgConnection, batches: Vec<Finished>) -> sqlx::Result<Vec<Summary>> {
    let (feeds, submissions): (Vec<&Finished>, Vec<&Finished>) = batches.iter().partition(|b| b.kind == "feed");
    let ids = |batches: Vec<&Finished>| batches.into_iter().map(|b| b.batch_id.clone()).collect::<Vec<_>>();
    let counts: Vec<(String, String, Option<String>, i64)> = sqlx::query_as(
        "SELECT r.batch_id, r.status, r.marine_group, count(*) FROM results r JOIN batches b USING (batch_id)
         WHERE r.batch_id = ANY($1) AND r.tenant = b.tenant
         GROUP BY r.batch_id, r.status, r.marine_group
         UNION ALL
         SELECT feed_id, status, marine_group, count(*)
         FROM (SELECT DISTINCT ON (r.feed_id, r.line) r.feed_id, r.status, r.marine_group
               FROM results r JOIN feeds f ON f.feed_id = r.feed_id AND f.tenant = r.tenant
               WHERE r.feed_id = ANY($2) ORDER BY r.feed_id, r.line, r.completed_at DESC, r.request_id DESC) latest
         GROUP BY feed_id, status, marine_group",
    )
    .bind(ids(submissions))
    .bind(ids(feeds))
    .fetch_all(&mut *conn)
    .await?;
    let mut summaries: Vec<Summary> = batches
        .into_iter()
        .map(|Finished { batch_id, kind, total, submitted_at, completed_at }| Summary {
            batch_id,
            feed: kind == "feed",
            total,
            ok: 0,
            error: 0,
            marine: 0,
            marine_groups: HashMap::new(),
            submitted_at,
            completed_at,
        })
        .collect();
    let index: HashMap<String, usize> = summaries.iter().enumerate().map(|(i, s)| (s.batch_id.clone(), i)).collect();
    for (batch_id, status, group, n) in counts {
        let Some(&i) = index.get(&batch_id) else { continue };
        let (s, n) = (&mut summaries[i], n as i32);
        if status == "ok" {
            s.ok += n
        } else {
            s.error += n
        }
        if let Some(group) = group {
            s.marine += n;
            *s.marine_groups.entry(group).or_default() += n;
        }
    }
    Ok(summaries)
}

#[derive(sqlx::FromRow)]
struct Attempt {
    attempt: i32,
    at: DateTime<Utc>,
    status: Option<i32>,
    error: Option<String>,
}

/// The callback of batch `batch_id` and its attempts, if it has one.
pub async fn callback(pool: &PgPool, batch_id: &str, scope: Option<&str>) -> sqlx::Result<Option<CallbackView>> {
    type Row = (Option<String>, Option<DateTime<Utc>>, Option<DateTime<Utc>>, Option<DateTime<Utc>>);
    let row: Option<Row> = sqlx::query_as(
        "SELECT callback_url, callback_due_at, callback_delivered_at, callback_gave_up_at FROM batches
         WHERE batch_id = $1 AND ($2::text IS NULL OR tenant = $2)",
    )
    .bind(batch_id)
    .bind(scope)
    .fetch_optional(pool)
    .await?;
    let Some((Some(url), due, delivered, gave_up)) = row else { return Ok(None) };
    let attempts: Vec<Attempt> =
        sqlx::query_as("SELECT attempt, at, status, error FROM callback_attempts WHERE batch_id = $1 ORDER BY attempt")
            .bind(batch_id)
            .fetch_all(pool)
            .await?;
    let attempts = attempts
        .into_iter()
        .map(|a| CallbackAttemptView { attempt: a.attempt, at: a.at.to_rfc3339(), status: a.status, error: a.error })
        .collect();
    let state = match (delivered, gave_up, due) {
        (Some(_), _, _) => "delivered",
        (_, Some(_), _) => "gave_up",
        (_, _, Some(_)) => "due",
        _ => "waiting",
    };
    Ok(Some(CallbackView {
        url,
        state,
        next_attempt_at: due.filter(|_| delivered.is_none() && gave_up.is_none()).map(|t| t.to_rfc3339()),
        delivered_at: delivered.map(|t| t.to_rfc3339()),
        gave_up_at: gave_up.map(|t| t.to_rfc3339()),
        attempts,
    }))
}
