//! Fair share of the classifiers between the feeds being read. Every line of a feed travels the
//! bulk topic, whose partitions are read in order: a feed put on the broker whole would make the
//! next one wait for all of it. So a feed's lines are admitted to the broker only while its images
//! there without a result are fewer than its share of `FEED_WINDOW_IMAGES`: the window is split
//! evenly between the tenants with a feed being read, and each tenant's part between its feeds.
//! The rest of the feed waits at its source (an upload is read no faster). The counts are read
//! from the database, so every ingest instance agrees on them.

use std::time::Duration;

use chrono::{DateTime, Utc};
use reefline_schemas::ImageRequest;
use sqlx::PgPool;

/// How often a feed waiting for its share looks again.
const POLL: Duration = Duration::from_millis(100);

/// A feed's place in the window, for one reader.
pub struct Share<'a> {
    pub pool: &'a PgPool,
    pub feed_id: &'a str,
    pub tenant: &'a str,
    /// `FEED_WINDOW_IMAGES`.
    pub window: u64,
    /// A feed whose reader has not been heard from for this long no longer takes a share.
    pub lease: Duration,
    /// When this reader began: chunks put on the broker before (by an upload that broke off) are
    /// not counted; one that broke off half-way would never fill.
    pub since: DateTime<Utc>,
}

/// What the database says of a feed's share now.
#[derive(Debug, PartialEq)]
pub struct Standing {
    /// Images the feed may have on the broker without a result.
    pub share: u64,
    /// Images of its chunks (all of each chunk, its lines not yet produced too) without a result.
    pub open: u64,
}

impl Share<'_> {
    /// Records the batch a chunk of `requests` travels in before any of it is produced, so that
    /// its images count against the feed's share from the first (the sink records it too, from
    /// the requests topic, a moment later).
    pub async fn open_chunk(&self, requests: &[ImageRequest]) -> sqlx::Result<()> {
        let Some(first) = requests.first() else { return Ok(()) };
        let (batch_id, total, submitted_ms) = (&first.batch_id, first.batch_size, first.submitted_at_ms);
        reefline_store::ingest::open_chunk(self.pool, batch_id, total, submitted_ms, self.feed_id, self.tenant).await
    }

    /// The feed's share and its images without a result.
    pub async fn standing(&self) -> sqlx::Result<Standing> {
        let (window, lease) = (self.window as f64, self.lease.as_secs_f64());
        let (share, open) =
            reefline_store::ingest::share(self.pool, self.feed_id, self.tenant, window, lease, self.since).await?;
        Ok(Standing { share: share.floor().max(1.0) as u64, open: open.max(0) as u64 })
    }

    /// Waits until the feed may put more images on the broker, and says how many: at least one,
    /// at most `left` (the lines of its chunk not yet produced, which `open` counts) and about a
    /// quarter of its share, so that its images on the broker stay within the share. A database
    /// that does not answer admits the rest of the chunk (the lease check and the checkpoint
    /// deal with it) rather than holding the feed.
    pub async fn admit(&self, left: u64) -> u64 {
        loop {
            match self.standing().await {
                Ok(Standing { share, open }) => {
                    let produced = open.saturating_sub(left);
                    let step = (share / 4).clamp(1, left.max(1));
                    if produced == 0 || produced + step <= share {
                        return step;
                    }
                }
                Err(e) => {
                    tracing::warn!(feed_id = self.feed_id, error = %e, "the feed's share is unknown; producing its chunk");
                    return left.max(1);
                }
            }
            tokio::time::sleep(POLL).await;
        }
    }
}
