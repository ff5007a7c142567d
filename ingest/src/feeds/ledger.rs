//! The feeds ledger in Postgres: which feed an `Idempotency-Key` names, who is reading it, how far
//! its reading has got, and every line it rejected. Ingest writes it as it reads; the sink serves it.

use std::time::Duration;

use reefline_store::ingest as store;
use sqlx::PgPool;
use uuid::Uuid;

use super::parse::{Chunk, Line};

pub use reefline_store::ingest::Feed;

/// Connects (creating the database when it does not exist) and brings the schema up to date, as
/// the sink does, so either may start first.
pub async fn connect(url: &str) -> anyhow::Result<PgPool> {
    reefline_store::connect(url, 4, Duration::from_secs(10), reefline_store::Schema::KnownOrNewer).await
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

/// Opens a feed for reading: a new one, or the one its idempotency key names, unless that one is
/// read already or being read by a reader heard from within `lease_for`.
pub async fn open(pool: &PgPool, new: &NewFeed<'_>, lease_for: Duration) -> sqlx::Result<Opened> {
    let lease = Uuid::now_v7();
    let feed_id = Uuid::now_v7().to_string();
    let stored = store::NewFeed {
        tenant: new.tenant,
        idempotency_key: new.idempotency_key,
        format: new.format.unwrap_or("auto"),
        source_url: new.source_url,
        model: new.model,
        callback_url: new.callback_url,
        fingerprint: new.fingerprint,
    };
    if let Some(feed) = store::insert_feed(pool, &feed_id, &stored, lease).await? {
        return Ok(Opened::Read { feed, lease, resumed: false });
    }
    // The key names a feed already: take it over unless it is read or its reader is alive.
    let taken =
        store::take_over(pool, new.tenant, new.idempotency_key, new.fingerprint, lease, lease_for.as_secs_f64())
            .await?;
    if let Some(feed) = taken {
        return Ok(Opened::Read { feed, lease, resumed: true });
    }
    let (feed, same) = store::keyed(pool, new.tenant, new.idempotency_key, new.fingerprint).await?;
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
    let settled = store::Settled {
        lines: lines.len() as i64,
        accepted: (lines.len() - lines_.len()) as i64,
        rejected: lines_.len() as i64,
        last_line: last_line as i64,
        columns: &chunk.columns,
        format: chunk.format.as_str(),
        size_bytes: bytes.size.map(|n| n as i64),
        read_bytes: bytes.read as i64,
    };
    let mut tx = pool.begin().await?;
    let Some(rejected_after) = store::settle(&mut tx, feed_id, lease, &settled).await? else {
        return Err(CheckpointError::LostLease);
    };
    let stored = rejects_to_store(rejected_after - lines_.len() as i64, lines_.len(), max_stored_rejects);
    if stored > 0 {
        lines_.truncate(stored);
        reasons.truncate(stored);
        contents.truncate(stored);
        store::reject(&mut tx, feed_id, &lines_, &reasons, &contents).await?;
    }
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
    store::heartbeat(pool, feed_id, lease).await
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
    store::close(pool, feed_id, lease, read.map(|f| f.as_str())).await
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
