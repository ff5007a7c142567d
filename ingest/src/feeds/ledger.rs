//! The feeds ledger in Postgres: which feed an `Idempotency-Key` names, who is reading it, how far
//! its reading has got, and every line it rejected. Ingest writes it as it reads; the sink serves it.

use std::time::Duration;

use sqlx::PgPool;
use sqlx::migrate::MigrateDatabase;
use sqlx::postgres::PgPoolOptions;
use uuid::Uuid;

use super::parse::{Chunk, Line};

/// Connects (creating the database when it does not exist) and applies the schema's migrations,
/// the same the sink applies (`sink/migrations`), so either may start first.
pub async fn connect(url: &str) -> anyhow::Result<PgPool> {
    if !sqlx::Postgres::database_exists(url).await? {
        // Another service may be creating it at this moment.
        if let Err(e) = sqlx::Postgres::create_database(url).await {
            anyhow::ensure!(sqlx::Postgres::database_exists(url).await?, e);
        }
    }
    let pool = PgPoolOptions::new().max_connections(4).acquire_timeout(Duration::from_secs(10)).connect(url).await?;
    let mut migrator = sqlx::migrate!("../sink/migrations");
    // A sink of a later version may have applied migrations this ingest does not know.
    migrator.set_ignore_missing(true);
    migrator.run(&pool).await?;
    Ok(pool)
}

/// A feed as the ledger holds it.
#[derive(Clone, Debug, sqlx::FromRow)]
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

/// What a new upload finds.
pub enum Opened {
    /// A feed to read from `feed.last_line + 1` on (from the start for a new one) under `lease`.
    Read { feed: Feed, lease: Uuid, resumed: bool },
    /// Read to its end already: the upload is answered with what it holds.
    Done(Feed),
    /// Another upload of it is being read.
    Busy(Feed),
    /// The key names a feed of another file, source or model.
    Reused(Feed),
}

/// What a feed is opened with.
pub struct NewFeed<'a> {
    /// The uploader's tenant: its Idempotency-Keys are its own.
    pub tenant: &'a str,
    pub idempotency_key: Option<&'a str>,
    pub format: Option<&'a str>,
    pub source_url: Option<&'a str>,
    pub model: Option<&'a str>,
    /// Kept from the upload that created the feed; a resend's is ignored.
    pub callback_url: Option<&'a str>,
    /// What the key is used for ([`fingerprint`]): a resend must match it.
    pub fingerprint: &'a str,
}

/// The fingerprint of a feed's upload: its format as asked for, `source_url` and model, and the
/// first bytes of its body (none for a fetched list, which may change between fetches).
pub fn fingerprint(format: Option<&str>, source_url: Option<&str>, model: Option<&str>, first_bytes: &[u8]) -> String {
    use sha2::Digest;
    let mut hash = sha2::Sha256::new();
    for part in [format, source_url, model] {
        hash.update(part.unwrap_or("").as_bytes());
        hash.update([0]);
    }
    hash.update(first_bytes);
    hex::encode(hash.finalize())
}

const FEED_COLUMNS: &str = "feed_id, state, lines_read, accepted, rejected, last_line, chunks";

/// Opens a feed for reading: a new one, or the one its idempotency key names, unless that one is
/// read already or being read by a reader heard from within `lease_for`.
pub async fn open(pool: &PgPool, new: &NewFeed<'_>, lease_for: Duration) -> sqlx::Result<Opened> {
    let lease = Uuid::now_v7();
    let feed_id = Uuid::now_v7().to_string();
    let inserted: Option<Feed> = sqlx::query_as(&format!(
        "INSERT INTO feeds (feed_id, key_scope, idempotency_key, format, source_url, model, callback_url, state, reader,
                            tenant, fingerprint)
         VALUES ($1, $2, $3, $4, $5, $6, $7, 'reading', $8, $2, $9)
         ON CONFLICT (key_scope, idempotency_key) DO NOTHING
         RETURNING {FEED_COLUMNS}"
    ))
    .bind(&feed_id)
    .bind(new.tenant)
    .bind(new.idempotency_key)
    .bind(new.format.unwrap_or("auto"))
    .bind(new.source_url)
    .bind(new.model)
    .bind(new.callback_url)
    .bind(lease)
    .bind(new.fingerprint)
    .fetch_optional(pool)
    .await?;
    if let Some(feed) = inserted {
        return Ok(Opened::Read { feed, lease, resumed: false });
    }
    // The key names a feed already: take it over unless it is read or its reader is alive.
    let taken: Option<Feed> = sqlx::query_as(&format!(
        "UPDATE feeds SET state = 'reading', reader = $3, updated_at = now()
         WHERE key_scope = $1 AND idempotency_key = $2 AND state <> 'read'
           AND (state = 'interrupted' OR updated_at < now() - make_interval(secs => $4))
           AND (fingerprint IS NULL OR fingerprint = $5)
         RETURNING {FEED_COLUMNS}"
    ))
    .bind(new.tenant)
    .bind(new.idempotency_key)
    .bind(lease)
    .bind(lease_for.as_secs_f64())
    .bind(new.fingerprint)
    .fetch_optional(pool)
    .await?;
    if let Some(feed) = taken {
        return Ok(Opened::Read { feed, lease, resumed: true });
    }
    let (feed, same): (Feed, bool) = {
        let row: (String, bool) = sqlx::query_as(
            "SELECT feed_id, fingerprint IS NULL OR fingerprint = $3 FROM feeds WHERE key_scope = $1 AND idempotency_key = $2",
        )
        .bind(new.tenant)
        .bind(new.idempotency_key)
        .bind(new.fingerprint)
        .fetch_one(pool)
        .await?;
        let feed = sqlx::query_as(&format!("SELECT {FEED_COLUMNS} FROM feeds WHERE feed_id = $1"))
            .bind(&row.0)
            .fetch_one(pool)
            .await?;
        (feed, row.1)
    };
    Ok(match (same, feed.state.as_str()) {
        (false, _) => Opened::Reused(feed),
        (true, "read") => Opened::Done(feed),
        (true, _) => Opened::Busy(feed),
    })
}

/// Why a checkpoint was not written.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("another upload of this feed took it over")]
    LostLease,
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// Settles the lines of `chunk` (the accepted ones are on the broker): records the rejected ones
/// (while the feed has fewer than `max_stored_rejects` recorded; the rest are only counted), moves
/// the counts and the last settled line on, and notes the format and metadata columns; in one
/// transaction, and only while `lease` holds the feed.
pub async fn checkpoint(
    pool: &PgPool,
    feed_id: &str,
    lease: Uuid,
    chunk: &Chunk,
    max_stored_rejects: u64,
    bytes: Bytes,
) -> Result<(), CheckpointError> {
    let lines = &chunk.lines;
    let Some(last_line) = lines.iter().map(Line::number).max() else { return Ok(()) };
    let (mut lines_, mut contents, mut reasons) = (Vec::new(), Vec::new(), Vec::new());
    for line in lines {
        if let Line::Rejected { line, reason, content } = line {
            lines_.push(*line as i64);
            reasons.push(reason.as_str());
            contents.push(content.as_str());
        }
    }
    let accepted = (lines.len() - lines_.len()) as i64;
    let mut tx = pool.begin().await?;
    let rejected_after: Option<i64> = sqlx::query_scalar(
        "UPDATE feeds SET lines_read = lines_read + $3, accepted = accepted + $4, rejected = rejected + $5,
                          last_line = $6, chunks = chunks + CASE WHEN $4 > 0 THEN 1 ELSE 0 END,
                          columns = $7, format = $8, updated_at = now(),
                          size_bytes = coalesce($9, size_bytes), read_bytes = $10
         WHERE feed_id = $1 AND reader = $2 AND state = 'reading'
         RETURNING rejected",
    )
    .bind(feed_id)
    .bind(lease)
    .bind(lines.len() as i64)
    .bind(accepted)
    .bind(lines_.len() as i64)
    .bind(last_line as i64)
    .bind(sqlx::types::Json(&chunk.columns))
    .bind(chunk.format.as_str())
    .bind(bytes.size.map(|n| n as i64))
    .bind(bytes.read as i64)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(rejected_after) = rejected_after else { return Err(CheckpointError::LostLease) };
    let stored = rejects_to_store(rejected_after - lines_.len() as i64, lines_.len(), max_stored_rejects);
    if stored == 0 {
        tx.commit().await?;
        return Ok(());
    }
    lines_.truncate(stored);
    reasons.truncate(stored);
    contents.truncate(stored);
    sqlx::query(
        "INSERT INTO feed_rejects (feed_id, line, reason, content, tenant)
         SELECT $1, line, reason, content, (SELECT tenant FROM feeds WHERE feed_id = $1)
         FROM UNNEST($2::int8[], $3::text[], $4::text[]) AS t(line, reason, content)
         ON CONFLICT DO NOTHING",
    )
    .bind(feed_id)
    .bind(&lines_)
    .bind(&reasons)
    .bind(&contents)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

/// How big the feed is, when known, and how much of it the reader has consumed: what the sink
/// estimates the lines to come from.
#[derive(Clone, Copy, Debug)]
pub struct Bytes {
    pub size: Option<u64>,
    pub read: u64,
}

/// How many of a chunk's `in_chunk` rejected lines are recorded (its first ones), when the feed
/// had rejected `rejected_before` lines before it: every earlier chunk recorded its first rejects
/// while the feed had fewer than `max_stored` recorded, so `min(rejected_before, max_stored)` are
/// recorded already, however many uploads the feed took.
pub(super) fn rejects_to_store(rejected_before: i64, in_chunk: usize, max_stored: u64) -> usize {
    let recorded = rejected_before.max(0) as u64;
    (max_stored.saturating_sub(recorded)).min(in_chunk as u64) as usize
}

/// Keeps the lease alive while the reader reads or waits (for its client, the broker, its
/// tenant's quota); whether `lease` still holds the feed.
pub async fn heartbeat(pool: &PgPool, feed_id: &str, lease: Uuid) -> sqlx::Result<bool> {
    let held =
        sqlx::query("UPDATE feeds SET updated_at = now() WHERE feed_id = $1 AND reader = $2 AND state = 'reading'")
            .bind(feed_id)
            .bind(lease)
            .execute(pool)
            .await?;
    Ok(held.rows_affected() == 1)
}

/// Renews the lease every `every` for as long as the reader runs (the task is aborted when it
/// ends), so that a slow but live reader is never taken over: reading a chunk, producing it and
/// waiting for room can each outlast the lease.
pub async fn keep(pool: PgPool, feed_id: String, lease: Uuid, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        match heartbeat(&pool, &feed_id, lease).await {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => tracing::warn!(%feed_id, error = %e, "could not renew a feed's lease; retrying"),
        }
    }
}

/// Ends the reading: `read` (in `format`) when the upload was read to its end, or to a limit that
/// ends the feed there, else `interrupted` (a resend with the same key resumes it). Returns the
/// feed as it now is.
///
/// A feed read to its end gets its row in the batches table in the same transaction: the sink
/// marks it complete once every accepted line has a result, and tells of it (its `BatchCompleted`
/// record, its callback) as it tells of a submission.
pub async fn close(
    pool: &PgPool,
    feed_id: &str,
    lease: Uuid,
    read: Option<super::parse::Format>,
) -> sqlx::Result<Option<Feed>> {
    let mut tx = pool.begin().await?;
    let feed: Option<Feed> = sqlx::query_as(&format!(
        "UPDATE feeds SET state = $3, updated_at = now(), read_at = CASE WHEN $3 = 'read' THEN now() END,
                          format = COALESCE($4, format)
         WHERE feed_id = $1 AND reader = $2 AND state = 'reading'
         RETURNING {FEED_COLUMNS}"
    ))
    .bind(feed_id)
    .bind(lease)
    .bind(if read.is_some() { "read" } else { "interrupted" })
    .bind(read.map(|f| f.as_str()))
    .fetch_optional(&mut *tx)
    .await?;
    if feed.as_ref().is_some_and(|f| f.state == "read") {
        sqlx::query(
            "INSERT INTO batches (batch_id, kind, total, callback_url, submitted_at, tenant)
             SELECT feed_id, 'feed', accepted, callback_url, created_at, tenant FROM feeds WHERE feed_id = $1
             ON CONFLICT (batch_id) DO NOTHING",
        )
        .bind(feed_id)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(feed)
}

#[cfg(test)]
mod tests {
    use super::rejects_to_store;

    #[test]
    fn rejects_are_recorded_up_to_the_cap_across_chunks_and_uploads() {
        assert_eq!(rejects_to_store(0, 300, 1000), 300);
        assert_eq!(rejects_to_store(900, 300, 1000), 100);
        assert_eq!(rejects_to_store(1000, 300, 1000), 0);
        // A feed that recorded every reject before the cap existed records no more.
        assert_eq!(rejects_to_store(5000, 300, 1000), 0);
        assert_eq!(rejects_to_store(0, 300, 0), 0);
        // Uploads resumed after each chunk: what is recorded adds up to the cap, never past it.
        let mut before = 0;
        let mut recorded = 0;
        for in_chunk in [400, 0, 400, 400, 400] {
            recorded += rejects_to_store(before, in_chunk, 1000);
            before += in_chunk as i64;
        }
        assert_eq!(recorded, 1000);
    }
}
