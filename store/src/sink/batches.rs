//! The batches table: a row per submission from its request records, marked complete once every
//! image has a result, then an outbox for its `BatchCompleted` record and its callback.
//!
//! A feed has a row too (kind `feed`, its batch id the feed id), which ingest writes once the feed
//! is read; it is complete once every accepted line has a result. The batches its chunks travel in
//! (kind `feed_chunk`) are complete as submissions are, and tell nobody themselves.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use reefline_schemas::view::{CallbackAttemptView, CallbackView};
use sqlx::{PgConnection, PgPool};

/// Marks complete those of `batch_ids` that have a result for every image, and makes their
/// callbacks due; the number marked. Called after the results (or the requests) are committed, so
/// that of writers racing on one batch the last one sees every row; only one of them marks it.
pub async fn complete(pool: &PgPool, batch_ids: &[&str]) -> sqlx::Result<u64> {
    let batch_ids: Vec<String> = batch_ids.iter().map(|&id| id.to_owned()).collect();
    let done = sqlx::query!(
        "UPDATE batches b
         SET completed_at = now(), callback_due_at = CASE WHEN b.callback_url IS NULL THEN NULL ELSE now() END
         FROM (SELECT batch_id, tenant, count(*) AS n FROM results WHERE batch_id = ANY($1) GROUP BY batch_id, tenant) c
         WHERE b.batch_id = c.batch_id AND b.tenant = c.tenant AND b.completed_at IS NULL AND c.n >= b.total
           AND b.kind <> 'feed'",
        &batch_ids,
    )
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
    let done = sqlx::query!(
        "UPDATE batches f
         SET completed_at = now(), callback_due_at = CASE WHEN f.callback_url IS NULL THEN NULL ELSE now() END
         WHERE f.kind = 'feed' AND f.completed_at IS NULL
           AND NOT EXISTS (SELECT 1 FROM batches c JOIN requests q ON q.batch_id = c.batch_id
                           WHERE c.kind = 'feed_chunk' AND c.feed_id = f.batch_id AND c.completed_at IS NULL
                             AND NOT EXISTS (SELECT 1 FROM results r WHERE r.request_id = q.request_id))
           AND (SELECT count(DISTINCT line) FROM results r WHERE r.feed_id = f.batch_id AND r.tenant = f.tenant) >= f.total"
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
#[derive(Clone, Debug)]
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
pub async fn summaries(conn: &mut PgConnection, batches: Vec<Finished>) -> sqlx::Result<Vec<Summary>> {
    let (feeds, submissions): (Vec<&Finished>, Vec<&Finished>) = batches.iter().partition(|b| b.kind == "feed");
    let ids = |batches: Vec<&Finished>| batches.into_iter().map(|b| b.batch_id.clone()).collect::<Vec<_>>();
    let counts = sqlx::query!(
        r#"SELECT r.batch_id AS "batch_id!", r.status AS "status!", r.marine_group, count(*) AS "n!"
         FROM results r JOIN batches b USING (batch_id)
         WHERE r.batch_id = ANY($1) AND r.tenant = b.tenant
         GROUP BY r.batch_id, r.status, r.marine_group
         UNION ALL
         SELECT feed_id, status, marine_group, count(*)
         FROM (SELECT DISTINCT ON (r.feed_id, r.line) r.feed_id, r.status, r.marine_group
               FROM results r JOIN feeds f ON f.feed_id = r.feed_id AND f.tenant = r.tenant
               WHERE r.feed_id = ANY($2) ORDER BY r.feed_id, r.line, r.completed_at DESC, r.request_id DESC) latest
         GROUP BY feed_id, status, marine_group"#,
        &ids(submissions),
        &ids(feeds),
    )
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
    for count in counts {
        let Some(&i) = index.get(&count.batch_id) else { continue };
        let (s, n) = (&mut summaries[i], count.n as i32);
        if count.status == "ok" {
            s.ok += n
        } else {
            s.error += n
        }
        if let Some(group) = count.marine_group {
            s.marine += n;
            *s.marine_groups.entry(group).or_default() += n;
        }
    }
    Ok(summaries)
}

/// The callback of batch `batch_id` and its attempts, if it has one.
pub async fn callback(pool: &PgPool, batch_id: &str, scope: Option<&str>) -> sqlx::Result<Option<CallbackView>> {
    let row = sqlx::query!(
        "SELECT callback_url, callback_due_at, callback_delivered_at, callback_gave_up_at FROM batches
         WHERE batch_id = $1 AND ($2::text IS NULL OR tenant = $2)",
        batch_id,
        scope,
    )
    .fetch_optional(pool)
    .await?;
    let Some(row) = row else { return Ok(None) };
    let (Some(url), due, delivered, gave_up) =
        (row.callback_url, row.callback_due_at, row.callback_delivered_at, row.callback_gave_up_at)
    else {
        return Ok(None);
    };
    let attempts = sqlx::query!(
        "SELECT attempt, at, status, error FROM callback_attempts WHERE batch_id = $1 ORDER BY attempt",
        batch_id
    )
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

/// Whether the batch `batch_id` (a submission's or a feed chunk's, not a feed's) is tenant
/// `scope`'s (any tenant's when `None`): its row, or a result of it (written before its row).
pub async fn known(pool: &PgPool, batch_id: &str, scope: Option<&str>) -> sqlx::Result<bool> {
    sqlx::query_scalar!(
        r#"SELECT EXISTS (SELECT 1 FROM batches WHERE batch_id = $1 AND kind <> 'feed' AND ($2::text IS NULL OR tenant = $2))
               OR EXISTS (SELECT 1 FROM results WHERE batch_id = $1 AND ($2::text IS NULL OR tenant = $2)) AS "known!""#,
        batch_id,
        scope,
    )
    .fetch_one(pool)
    .await
}

/// Claims, in `tx`, up to 100 completed batches whose `BatchCompleted` record is not out yet (rows
/// another sink holds are skipped).
pub async fn claim_completed(tx: &mut PgConnection) -> sqlx::Result<Vec<Finished>> {
    sqlx::query_as!(
        Finished,
        r#"SELECT batch_id, kind, total, submitted_at, completed_at AS "completed_at!" FROM batches
           WHERE completed_at IS NOT NULL AND event_produced_at IS NULL AND kind <> 'feed_chunk'
           ORDER BY completed_at LIMIT 100 FOR UPDATE SKIP LOCKED"#
    )
    .fetch_all(tx)
    .await
}

/// Notes that the `BatchCompleted` records of `batch_ids` are out.
pub async fn mark_produced(tx: &mut PgConnection, batch_ids: &[String]) -> sqlx::Result<()> {
    sqlx::query!("UPDATE batches SET event_produced_at = now() WHERE batch_id = ANY($1)", batch_ids as _)
        .execute(tx)
        .await?;
    Ok(())
}

/// A callback claimed for one attempt.
pub struct Claimed {
    pub batch: Finished,
    pub callback_url: String,
    /// Attempts made before this one.
    pub attempts: i64,
}

/// Claims up to 50 callbacks that are due, keeping them from other sinks for `lease`.
pub async fn claim_callbacks(pool: &PgPool, lease: Duration) -> sqlx::Result<Vec<Claimed>> {
    let rows = sqlx::query!(
        r#"UPDATE batches b SET callback_due_at = now() + $1 * interval '1 millisecond'
           FROM (SELECT batch_id FROM batches WHERE callback_due_at <= now()
                 ORDER BY callback_due_at LIMIT 50 FOR UPDATE SKIP LOCKED) due
           WHERE b.batch_id = due.batch_id
           RETURNING b.batch_id, b.kind, b.callback_url AS "callback_url!", b.total, b.submitted_at,
                     b.completed_at AS "completed_at!",
                     (SELECT count(*) FROM callback_attempts a WHERE a.batch_id = b.batch_id) AS "attempts!""#,
        lease.as_millis() as f64,
    )
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| Claimed {
            batch: Finished {
                batch_id: r.batch_id,
                kind: r.kind,
                total: r.total,
                submitted_at: r.submitted_at,
                completed_at: r.completed_at,
            },
            callback_url: r.callback_url,
            attempts: r.attempts,
        })
        .collect())
}

/// A callback attempt's outcome and what comes next: tried again at `due`, or delivered, or
/// given up, at most one of them.
pub struct Attempt<'a> {
    pub batch_id: &'a str,
    pub attempt: i32,
    pub at: DateTime<Utc>,
    pub status: Option<i32>,
    pub error: Option<&'a str>,
    pub due: Option<DateTime<Utc>>,
    pub delivered: Option<DateTime<Utc>>,
    pub gave_up: Option<DateTime<Utc>>,
}

/// Records a callback attempt and the callback's next step, in one transaction.
pub async fn record_attempt(pool: &PgPool, a: &Attempt<'_>) -> sqlx::Result<()> {
    let mut tx = pool.begin().await?;
    sqlx::query!(
        "INSERT INTO callback_attempts (batch_id, attempt, at, status, error) VALUES ($1, $2, $3, $4, $5)",
        a.batch_id,
        a.attempt,
        a.at,
        a.status,
        a.error,
    )
    .execute(&mut *tx)
    .await?;
    sqlx::query!(
        "UPDATE batches SET callback_due_at = $2, callback_delivered_at = $3, callback_gave_up_at = $4
         WHERE batch_id = $1",
        a.batch_id,
        a.due,
        a.delivered,
        a.gave_up,
    )
    .execute(&mut *tx)
    .await?;
    tx.commit().await
}
