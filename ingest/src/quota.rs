//! Per-tenant quotas: images per second, as a token bucket per tenant (GCRA, from `governor`),
//! and images per day, counted in Postgres so that every ingest instance agrees. A submission over
//! its tenant's rate is refused at once (`429 quota_exceeded`, `Retry-After` saying when it would
//! fit); bulk work (feed chunks, retries) waits for its turn instead, so an accepted line is never
//! lost and a feed is read only as fast as its tenant may go. Over the day's images, a submission
//! is refused and a feed stops before the chunk that would go over (resumable the next day).

use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};

/// The tenants' image rates, and their images waiting for the broker; unlimited when not set.
pub struct Quotas {
    images: Option<Limit>,
    clock: DefaultClock,
    /// Most images of one tenant waiting for the broker at once (0: no limit), and each tenant's room.
    max_pending: usize,
    pending: std::sync::Mutex<std::collections::HashMap<String, std::sync::Arc<tokio::sync::Semaphore>>>,
}

/// A tenant's images waiting for the broker, held until they are answered.
pub type Pending = Option<tokio::sync::OwnedSemaphorePermit>;

struct Limit {
    limiter: DefaultKeyedRateLimiter<String>,
    per_second: u32,
    burst: NonZeroU32,
}

/// A submission that does not fit its tenant's rate now.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OverQuota {
    /// Images per second the tenant may send.
    pub per_second: u32,
    /// How long until the submission would fit.
    pub retry_after: Duration,
}

impl Quotas {
    /// `per_second` images a second per tenant (0: unlimited), in bursts of at most `burst`
    /// (at least one submission's worth, `max_images`, so that every submission can fit).
    pub fn new(per_second: u32, burst: u32, max_images: usize, max_pending: usize) -> Self {
        let images = NonZeroU32::new(per_second).map(|rate| {
            let burst = burst.max(per_second).max(max_images.min(u32::MAX as usize) as u32);
            let burst = NonZeroU32::new(burst).unwrap_or(rate);
            let limiter = DefaultKeyedRateLimiter::keyed(Quota::per_second(rate).allow_burst(burst));
            Limit { limiter, per_second, burst }
        });
        // Room for at least one submission, as the service-wide limit.
        let max_pending = if max_pending == 0 { 0 } else { max_pending.max(max_images) };
        Self { images, clock: DefaultClock::default(), max_pending, pending: Default::default() }
    }

    fn room(&self, tenant: &str) -> std::sync::Arc<tokio::sync::Semaphore> {
        let mut rooms = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        rooms
            .entry(tenant.to_owned())
            .or_insert_with(|| std::sync::Arc::new(tokio::sync::Semaphore::new(self.max_pending)))
            .clone()
    }

    /// Room for `n` of `tenant`'s images among those waiting for the broker now, or `Err(limit)`:
    /// one tenant never fills the whole service's `INGEST_MAX_PENDING_IMAGES`.
    pub fn admit_pending(&self, tenant: &str, n: usize) -> Result<Pending, usize> {
        if self.max_pending == 0 {
            return Ok(None);
        }
        self.room(tenant).try_acquire_many_owned(n as u32).map(Some).map_err(|_| self.max_pending)
    }

    /// Waits for room for `n` of `tenant`'s images (at most its limit at once: a larger chunk takes
    /// the whole room).
    pub async fn wait_pending(&self, tenant: &str, n: usize) -> Pending {
        if self.max_pending == 0 {
            return None;
        }
        let n = n.min(self.max_pending) as u32;
        self.room(tenant).acquire_many_owned(n).await.ok()
    }

    /// Takes `n` images of `tenant`'s rate now, or says when they would fit.
    pub fn admit(&self, tenant: &str, n: usize) -> Result<(), OverQuota> {
        let Some(Limit { limiter, per_second, burst }) = &self.images else { return Ok(()) };
        let Some(cells) = NonZeroU32::new(n.min(u32::MAX as usize) as u32) else { return Ok(()) };
        let per_second = *per_second;
        match limiter.check_key_n(&tenant.to_owned(), cells) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => {
                Err(OverQuota { per_second, retry_after: not_until.wait_time_from(self.clock.now()) })
            }
            // More than a burst: it can never fit at once (submissions are at most a burst).
            Err(_) => Err(OverQuota {
                per_second,
                retry_after: Duration::from_secs_f64(f64::from(cells.get() - burst.get()) / f64::from(per_second)),
            }),
        }
    }

    /// Waits until `n` images of `tenant` fit its rate, a burst at a time.
    pub async fn wait(&self, tenant: &str, n: usize) {
        let Some(Limit { limiter, burst, .. }) = &self.images else { return };
        let key = tenant.to_owned();
        let mut left = n;
        while left > 0 {
            let take = left.min(burst.get() as usize);
            let cells = NonZeroU32::new(take as u32).expect("take is at least 1");
            // `take` is at most a burst, so it always fits eventually.
            let _ = limiter.until_key_n_ready(&key, cells).await;
            left -= take;
        }
    }
}

/// A tenant's images of the day are used up (UTC days).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OverDay {
    pub per_day: u64,
    /// Until the next UTC day.
    pub retry_after: Duration,
}

/// Adds `n` images to `tenant`'s count of the day unless that would pass `per_day` (0: no limit).
/// A database that does not answer admits the images (the per-second rate still holds).
pub async fn take_daily(pool: Option<&sqlx::PgPool>, tenant: &str, n: usize, per_day: u64) -> Result<(), OverDay> {
    let Some(pool) = pool.filter(|_| per_day > 0) else { return Ok(()) };
    let now = chrono::Utc::now();
    let tomorrow = (now.date_naive() + chrono::Days::new(1)).and_hms_opt(0, 0, 0).expect("midnight").and_utc();
    let over = OverDay { per_day, retry_after: (tomorrow - now).to_std().unwrap_or_default() };
    if n as u64 > per_day {
        return Err(over);
    }
    match reefline_store::ingest::count_images(pool, tenant, n as i64, per_day as i64).await {
        Ok(true) => Ok(()),
        Ok(false) => Err(over),
        Err(e) => {
            tracing::warn!(tenant, error = %e, "the daily quota could not be counted; admitting");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tenant_over_its_rate_is_told_when_it_fits_and_others_are_not_slowed() {
        let quotas = Quotas::new(2, 4, 4, 0);
        assert_eq!(quotas.admit("reef", 4), Ok(()));
        let over = quotas.admit("reef", 2).unwrap_err();
        assert_eq!(over.per_second, 2);
        assert!(
            over.retry_after > Duration::from_millis(500) && over.retry_after <= Duration::from_secs(1),
            "{over:?}"
        );
        assert_eq!(quotas.admit("kelp", 4), Ok(()), "each tenant has a bucket of its own");
        assert!(Quotas::new(0, 0, 1000, 0).admit("reef", 1_000_000).is_ok(), "no rate: no limit");
    }

    #[test]
    fn the_burst_holds_at_least_one_submission() {
        let quotas = Quotas::new(1, 1, 100, 0);
        assert_eq!(quotas.admit("reef", 100), Ok(()));
        assert!(quotas.admit("reef", 1).is_err());
    }

    #[tokio::test]
    async fn a_tenant_fills_only_its_own_room_at_the_broker() {
        let quotas = Quotas::new(0, 0, 2, 5);
        let held = quotas.admit_pending("reef", 4).unwrap();
        assert_eq!(quotas.admit_pending("reef", 2).unwrap_err(), 5);
        assert!(quotas.admit_pending("kelp", 5).is_ok(), "another tenant's room is its own");
        drop(held);
        assert!(quotas.admit_pending("reef", 5).is_ok());
        assert!(Quotas::new(0, 0, 2, 0).admit_pending("reef", 1_000_000).unwrap().is_none());
        // A chunk larger than the room waits for all of it rather than for ever.
        assert!(quotas.wait_pending("kelp", 100).await.is_some());
    }

    #[tokio::test]
    async fn bulk_work_waits_for_its_turn() {
        let quotas = Quotas::new(1000, 0, 10, 0);
        let started = std::time::Instant::now();
        quotas.wait("reef", 1100).await;
        // A burst of 1,000 at once, then 100 more at 1,000 a second: about 100 ms, never at once.
        assert!(started.elapsed() >= Duration::from_millis(80), "{:?}", started.elapsed());
        assert!(quotas.admit("reef", 10).is_err(), "the bucket is empty after the wait");
    }
}
