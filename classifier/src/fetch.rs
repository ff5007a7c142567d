//! Fetching image bytes over HTTP with timeouts, a redirect limit and a size cap enforced while
//! the body streams in.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::{StatusCode, Url, redirect};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::ImageError;
use crate::guard::{AddressPolicy, Blocked, GuardedResolver};

/// Limits on one fetch.
#[derive(Clone, Copy, Debug)]
pub struct FetchLimits {
    pub connect_timeout: Duration,
    pub total_timeout: Duration,
    pub max_bytes: u64,
    pub max_redirects: usize,
    /// Fetches in flight to one host at once, so one slow or huge site cannot take every slot.
    pub per_host: usize,
}

/// A semaphore per host, created on first use and dropped when idle.
#[derive(Default)]
struct HostSlots {
    hosts: Mutex<HashMap<String, Arc<Semaphore>>>,
}

impl HostSlots {
    async fn acquire(&self, host: &str, per_host: usize) -> Option<OwnedSemaphorePermit> {
        let slots = {
            let mut hosts = self.hosts.lock().expect("host slots lock");
            if hosts.len() > 4096 {
                // Forget hosts with nothing in flight.
                hosts.retain(|_, s| s.available_permits() < per_host);
            }
            hosts.entry(host.to_owned()).or_insert_with(|| Arc::new(Semaphore::new(per_host))).clone()
        };
        slots.acquire_owned().await.ok()
    }
}

/// A shared HTTP client (connection reuse across fetches) and its limits.
#[derive(Clone)]
pub struct Fetcher {
    client: reqwest::Client,
    limits: FetchLimits,
    policy: Arc<AddressPolicy>,
    hosts: Arc<HostSlots>,
}

/// Why a redirect was not followed.
#[derive(Debug, thiserror::Error)]
#[error("redirect refused: {0}")]
struct RedirectRefused(String);

impl Fetcher {
    pub fn new(limits: FetchLimits, policy: AddressPolicy) -> anyhow::Result<Self> {
        let policy = Arc::new(policy);
        let hops = policy.clone();
        // Every hop is checked like the first: at most `max_redirects`, http(s), no IP literal
        // outside the policy (names are checked by the resolver when they are connected to).
        let redirects = redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() > limits.max_redirects {
                let n = limits.max_redirects;
                return attempt.error(RedirectRefused(format!("more than {n} redirects")));
            }
            match hops.check_url(attempt.url()) {
                Ok(()) => attempt.follow(),
                Err(reason) => attempt.error(RedirectRefused(reason)),
            }
        });
        let client = reqwest::Client::builder()
            .connect_timeout(limits.connect_timeout)
            .timeout(limits.total_timeout)
            .redirect(redirects)
            .dns_resolver(Arc::new(GuardedResolver { policy: policy.clone() }))
            .user_agent(concat!("reefline-classifier/", env!("CARGO_PKG_VERSION")))
            .no_proxy()
            .build()?;
        Ok(Self { client, limits, policy, hosts: Arc::default() })
    }

    /// The body of `url`, or why it could not be had.
    pub async fn fetch(&self, url: &str) -> Result<Vec<u8>, ImageError> {
        let url = Url::parse(url).map_err(|e| ImageError::Blocked(format!("invalid URL: {e}")))?;
        self.policy.check_url(&url).map_err(ImageError::Blocked)?;
        let host = url.host_str().unwrap_or_default().to_ascii_lowercase();
        let _slot = self.hosts.acquire(&host, self.limits.per_host.max(1)).await;
        let mut response = self.client.get(url).send().await.map_err(|e| self.classify(e))?;
        match response.status() {
            StatusCode::OK => {}
            StatusCode::NOT_FOUND | StatusCode::GONE => return Err(ImageError::NotFound),
            other => return Err(ImageError::HttpStatus(other.as_u16())),
        }
        let limit = self.limits.max_bytes;
        if response.content_length().is_some_and(|len| len > limit) {
            return Err(ImageError::TooLarge { limit });
        }
        let mut body = Vec::with_capacity(response.content_length().unwrap_or(64 * 1024).min(limit) as usize);
        while let Some(chunk) = response.chunk().await.map_err(|e| self.classify(e))? {
            if body.len() as u64 + chunk.len() as u64 > limit {
                return Err(ImageError::TooLarge { limit });
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }

    fn classify(&self, e: reqwest::Error) -> ImageError {
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            if let Some(blocked) = s.downcast_ref::<Blocked>() {
                return ImageError::Blocked(blocked.to_string());
            }
            if let Some(refused) = s.downcast_ref::<RedirectRefused>() {
                return ImageError::Blocked(refused.to_string());
            }
            source = s.source();
        }
        if e.is_timeout() {
            ImageError::Timeout(self.limits.total_timeout.as_secs())
        } else {
            let mut message = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                message = format!("{message}: {s}");
                source = s.source();
            }
            ImageError::Connection(message)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_host_gets_at_most_its_share_of_fetches() {
        let slots = HostSlots::default();
        let first = slots.acquire("photos.example", 1).await.unwrap();
        let other_host = slots.acquire("other.example", 1).await;
        assert!(other_host.is_some(), "another host is not held up");
        let mut second = Box::pin(slots.acquire("photos.example", 1));
        assert!(futures::poll!(&mut second).is_pending(), "a second fetch to the same host waits");
        drop(first);
        assert!(second.await.is_some());
    }
}
