//! The batches table: a row per submission from its request records, marked complete once every
//! image has a result, then an outbox for its `BatchCompleted` record and its callback.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use reefline_schemas::ImageRequest;
use reefline_schemas::view::{CallbackAttemptView, CallbackView};
use sqlx::PgPool;

/// Records the batches of `requests`; a batch seen before is left as it is.
pub async fn insert(pool: &PgPool, requests: &[ImageRequest]) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO batches (batch_id, total, callback_url, submitted_at)
         SELECT batch_id, total, callback_url, to_timestamp(submitted_ms / 1000.0)
         FROM UNNEST($1::text[], $2::int[], $3::text[], $4::float8[]) AS t(batch_id, total, callback_url, submitted_ms)
         ON CONFLICT (batch_id) DO NOTHING",
    )
    .bind(requests.iter().map(|r| r.batch_id.as_str()).collect::<Vec<_>>())
    .bind(requests.iter().map(|r| r.batch_size).collect::<Vec<_>>())
    .bind(requests.iter().map(|r| r.callback_url.as_deref()).collect::<Vec<_>>())
    .bind(requests.iter().map(|r| r.submitted_at_ms as f64).collect::<Vec<_>>())
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
         FROM (SELECT batch_id, count(*) AS n FROM results WHERE batch_id = ANY($1) GROUP BY batch_id) c
         WHERE b.batch_id = c.batch_id AND b.completed_at IS NULL AND c.n >= b.total",
    )
    .bind(batch_ids)
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}

/// A completed batch's figures, for its `BatchCompleted` record and its callback.
#[derive(Clone, Debug)]
pub struct Summary {
    pub batch_id: String,
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
    pub total: i32,
    pub submitted_at: DateTime<Utc>,
    pub completed_at: DateTime<Utc>,
}

/// The figures of each of `batches`.
pub async fn summaries(conn: &mut sqlx::PgConnection, batches: Vec<Finished>) -> sqlx::Result<Vec<Summary>> {
    let ids: Vec<&str> = batches.iter().map(|b| b.batch_id.as_str()).collect();
    let counts: Vec<(String, String, Option<String>, i64)> = sqlx::query_as(
        "SELECT batch_id, status, marine_group, count(*) FROM results WHERE batch_id = ANY($1)
         GROUP BY batch_id, status, marine_group",
    )
    .bind(&ids)
    .fetch_all(&mut *conn)
    .await?;
    let mut summaries: Vec<Summary> = batches
        .into_iter()
        .map(|Finished { batch_id, total, submitted_at, completed_at }| Summary {
            batch_id,
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
pub async fn callback(pool: &PgPool, batch_id: &str) -> sqlx::Result<Option<CallbackView>> {
    type Row = (Option<String>, Option<DateTime<Utc>>, Option<DateTime<Utc>>, Option<DateTime<Utc>>);
    let row: Option<Row> = sqlx::query_as(
        "SELECT callback_url, callback_due_at, callback_delivered_at, callback_gave_up_at FROM batches WHERE batch_id = $1",
    )
    .bind(batch_id)
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
