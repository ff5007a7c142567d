//! The delivery ledger, against a request that kills the process (an image whose decode runs out
//! of memory, say): without it the request is read again after every restart, and kills every
//! classifier that takes its partition.
//!
//! A classifier that hands a partition over cleanly (every request it took finished and the offset
//! committed: a rebalance's drain, a SIGTERM) records the offset it left it at. One that takes a
//! partition over at any other offset knows its last owner stopped mid-way, somewhere among the
//! next requests: it takes the next [`CAREFUL_WINDOW`] of them one at a time, each alone in the
//! pipeline, counting each try. A request tried `DELIVERY_LIMIT` times alone without finishing
//! is moved to the dead-letter topic instead of being tried again. Nothing is written while a
//! partition is worked normally; the ledger is the sink's database, and when it does not answer
//! requests are taken as usual.

use std::time::Duration;

use reefline_store::classifier::{self as store, Partition};
use sqlx::PgPool;

/// How many requests after an unclean handover are taken one at a time. The one that stopped the
/// last owner is usually among them (its requests are taken in offset order); when it lies
/// further on, each crash moves the committed offset past another window, until it is.
pub const CAREFUL_WINDOW: i64 = 64;

/// How a partition's requests are taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Side by side, as usual.
    Normal,
    /// One at a time and counted, up to (not including) this offset.
    Careful { until: i64 },
}

/// How to take a partition whose first request is at `offset`, its last owner having left it at
/// `clean_offset` (`None`: not cleanly) or it being `new` to the ledger.
///
/// An offset before the clean handover's belongs to another incarnation of the topic: the topic was
/// deleted and created again (after `make reset`, a new broker beside the same database), or the
/// group's offsets were moved back (a replay). Neither is a crash: offsets move back only by hand,
/// and the record is of the old log, so the partition is taken as usual.
fn mode(clean_offset: Option<i64>, new: bool, offset: i64) -> Mode {
    match clean_offset {
        _ if new => Mode::Normal,
        Some(clean) if offset <= clean => Mode::Normal,
        _ => Mode::Careful { until: offset + CAREFUL_WINDOW },
    }
}

/// The ledger of one consumer group on one topic.
#[derive(Clone)]
pub struct Deliveries {
    /// `None`: off (`DELIVERY_LIMIT=0`, or no database).
    pool: Option<PgPool>,
    group: String,
    topic: String,
    limit: u32,
}

impl Deliveries {
    /// A ledger in the database at `url` (connected when first used), or none; `limit` tries
    /// alone before a request is dead-lettered (0: off).
    pub fn new(url: Option<&str>, group: &str, topic: &str, limit: u32) -> anyhow::Result<Self> {
        let pool = url.filter(|_| limit > 0).map(|url| store::lazy_pool(url, 2, Duration::from_secs(2))).transpose()?;
        Ok(Self { pool, group: group.to_owned(), topic: topic.to_owned(), limit })
    }

    fn partition(&self, partition: i32) -> Partition<'_> {
        Partition { group: &self.group, topic: &self.topic, partition }
    }

    pub fn limit(&self) -> u32 {
        self.limit
    }

    /// A partition's first request since it was assigned here is at `offset`: how to take it and
    /// those after it. A partition never seen before is taken normally; so is every partition when
    /// the ledger does not answer.
    pub async fn assigned(&self, partition: i32, offset: i64) -> Mode {
        let Some(pool) = &self.pool else { return Mode::Normal };
        // Claims the partition (no longer clean) and reads how it was left, in one statement.
        let claimed = store::claim(pool, self.partition(partition)).await;
        self.forget_tries(pool, partition, offset, true).await;
        match claimed {
            Ok((left_at, new)) => {
                let mode = mode(left_at, new, offset);
                if let Mode::Careful { .. } = mode {
                    tracing::warn!(
                        partition,
                        offset,
                        clean_offset = left_at,
                        window = CAREFUL_WINDOW,
                        "the partition's last owner stopped mid-way: taking its next requests one at a time"
                    );
                } else if left_at.is_some_and(|clean| offset < clean) {
                    tracing::info!(
                        partition,
                        offset,
                        clean_offset = left_at,
                        "the partition starts before its last clean handover: a new topic (or its offsets reset)"
                    );
                }
                mode
            }
            Err(e) => {
                tracing::warn!(partition, error = %e, "the delivery ledger did not answer; taking requests as usual");
                Mode::Normal
            }
        }
    }

    /// Counts a try of the request at `offset`, about to be taken alone: the tries so far, this
    /// one included, or `None` when the ledger did not answer.
    pub async fn try_once(&self, partition: i32, offset: i64) -> Option<u32> {
        let pool = self.pool.as_ref()?;
        let tries = store::count_try(pool, self.partition(partition), offset).await;
        tries
            .inspect_err(|e| tracing::warn!(partition, offset, error = %e, "the delivery ledger did not answer"))
            .ok()
            .map(|n| n as u32)
    }

    /// The request at `offset`, taken alone, finished: its tries are forgotten, so that being
    /// taken alone again (its offset not yet committed when a later request stopped the process)
    /// does not count against it.
    pub async fn finished(&self, partition: i32, offset: i64) {
        let Some(pool) = &self.pool else { return };
        self.forget_tries(pool, partition, offset, false).await;
    }

    /// Forgets the tries counted on `partition` at `offset`, or (`below`) before it.
    async fn forget_tries(&self, pool: &PgPool, partition: i32, offset: i64, below: bool) {
        let _ = store::forget_tries(pool, self.partition(partition), offset, below).await;
    }

    /// Records that these partitions were handed over cleanly, each at its committed offset.
    pub async fn handed_over(&self, committed: &[(i32, i64)]) {
        let Some(pool) = &self.pool else { return };
        let (partitions, offsets): (Vec<i32>, Vec<i64>) = committed.iter().copied().unzip();
        let marked = store::handed_over(pool, &self.group, &self.topic, &partitions, &offsets).await;
        if let Err(e) = marked {
            tracing::warn!(error = %e, "the delivery ledger did not record a clean handover");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_partition_left_mid_way_is_taken_carefully() {
        assert_eq!(mode(None, true, 0), Mode::Normal, "never seen");
        assert_eq!(mode(Some(5000), false, 5000), Mode::Normal, "handed over cleanly");
        assert_eq!(mode(None, false, 5000), Mode::Careful { until: 5000 + CAREFUL_WINDOW }, "left mid-way");
        assert_eq!(mode(Some(4000), false, 5000), Mode::Careful { until: 5000 + CAREFUL_WINDOW }, "moved on since");
        // A recreated topic starts again at 0: the old log's clean offset says nothing of it.
        assert_eq!(mode(Some(5000), false, 0), Mode::Normal);
    }
}
