//! Per-tenant quotas: images per second, as a token bucket per tenant (GCRA, from `governor`).
//! A submission over its tenant's rate is refused at once (`429 quota_exceeded`, `Retry-After`
//! saying when it would fit); bulk work (feed chunks, retries) waits for its turn instead, so an
//! accepted line is never lost and a feed is read only as fast as its tenant may go.

use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};

/// The tenants' image rates; unlimited when no rate is set.
pub struct Quotas {
    images: Option<Limit>,
    clock: DefaultClock,
}

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
    pub fn new(per_second: u32, burst: u32, max_images: usize) -> Self {
        let images = NonZeroU32::new(per_second).map(|rate| {
            let burst = burst.max(per_second).max(max_images.min(u32::MAX as usize) as u32);
            let burst = NonZeroU32::new(burst).unwrap_or(rate);
            let limiter = DefaultKeyedRateLimiter::keyed(Quota::per_second(rate).allow_burst(burst));
            Limit { limiter, per_second, burst }
        });
        Self { images, clock: DefaultClock::default() }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tenant_over_its_rate_is_told_when_it_fits_and_others_are_not_slowed() {
        let quotas = Quotas::new(2, 4, 4);
        assert_eq!(quotas.admit("reef", 4), Ok(()));
        let over = quotas.admit("reef", 2).unwrap_err();
        assert_eq!(over.per_second, 2);
        assert!(
            over.retry_after > Duration::from_millis(500) && over.retry_after <= Duration::from_secs(1),
            "{over:?}"
        );
        assert_eq!(quotas.admit("kelp", 4), Ok(()), "each tenant has a bucket of its own");
        assert!(Quotas::new(0, 0, 1000).admit("reef", 1_000_000).is_ok(), "no rate: no limit");
    }

    #[test]
    fn the_burst_holds_at_least_one_submission() {
        let quotas = Quotas::new(1, 1, 100);
        assert_eq!(quotas.admit("reef", 100), Ok(()));
        assert!(quotas.admit("reef", 1).is_err());
    }

    #[tokio::test]
    async fn bulk_work_waits_for_its_turn() {
        let quotas = Quotas::new(1000, 0, 10);
        let started = std::time::Instant::now();
        quotas.wait("reef", 1100).await;
        // A burst of 1,000 at once, then 100 more at 1,000 a second: about 100 ms, never at once.
        assert!(started.elapsed() >= Duration::from_millis(80), "{:?}", started.elapsed());
        assert!(quotas.admit("reef", 10).is_err(), "the bucket is empty after the wait");
    }
}
