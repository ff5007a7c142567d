//! Fetching image bytes over HTTP with timeouts, a redirect limit and a size cap enforced while
//! the body streams in; and reading them from object stores (`s3://bucket/key`) under the same
//! limits, each bucket taking the place of a host.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::{StatusCode, Url, redirect};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use futures::StreamExt;
use reefline_common::objects::{Failure, Stores, object_ref};

use crate::error::ImageError;
use crate::guard::{AddressPolicy, Blocked, GuardedResolver, error_text};

/// Limits on one fetch.
#[derive(Clone, Copy, Debug)]
pub struct FetchLimits {
    pub connect_timeout: Duration,
    pub total_timeout: Duration,
    pub max_bytes: u64,
    pub max_redirects: usize,
    /// Fetches in flight to one host at once, so one slow or huge site cannot take every slot.
    pub per_host: usize,
    /// Fetches started per second to one host (0: no limit).
    pub host_rate: f64,
}

/// What one host is allowed: so many fetches at once, at most so many started a second, and none
/// before the time a `Retry-After` it sent asked for.
struct Host {
    slots: Arc<Semaphore>,
    /// When the next fetch may start (the rate, and any `Retry-After`).
    next: Mutex<Instant>,
}

/// The hosts being fetched from, created on first use and dropped when idle.
#[derive(Default)]
struct Hosts {
    hosts: Mutex<HashMap<String, Arc<Host>>>,
}

/// Longest a host's `Retry-After` is honoured.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(120);

impl Hosts {
    fn get(&self, host: &str, per_host: usize) -> Arc<Host> {
        let mut hosts = self.hosts.lock().expect("hosts lock");
        if hosts.len() > 4096 {
            // Forget hosts with nothing in flight and nothing to wait for.
            let now = Instant::now();
            hosts.retain(|_, h| h.slots.available_permits() < per_host || *h.next.lock().expect("host") > now);
        }
        let host = hosts.entry(host.to_owned()).or_insert_with(|| {
            Arc::new(Host { slots: Arc::new(Semaphore::new(per_host)), next: Mutex::new(Instant::now()) })
        });
        host.clone()
    }
}

impl Host {
    /// Waits for this host's turn: a free slot, then the start time its rate (`per_second`, 0 for
    /// no limit) and any `Retry-After` allow.
    async fn turn(&self, per_second: f64) -> Option<OwnedSemaphorePermit> {
        let slot = self.slots.clone().acquire_owned().await.ok()?;
        let start = {
            let mut next = self.next.lock().expect("host");
            let start = (*next).max(Instant::now());
            *next = start + pace(per_second);
            start
        };
        tokio::time::sleep_until(start.into()).await;
        Some(slot)
    }

    /// Starts no fetch before `after` from now (a 429 or 503 with `Retry-After`).
    fn back_off(&self, after: Duration) {
        let until = Instant::now() + after.min(MAX_RETRY_AFTER);
        let mut next = self.next.lock().expect("host");
        *next = (*next).max(until);
    }
}

/// The time between two fetch starts at `per_second` (0 or less: no limit).
fn pace(per_second: f64) -> Duration {
    if per_second > 0.0 { Duration::from_secs_f64(1.0 / per_second) } else { Duration::ZERO }
}

/// A `Retry-After` header's wait: seconds, or an HTTP date.
fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let value = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    (at.with_timezone(&chrono::Utc) - chrono::Utc::now()).to_std().ok()
}

/// A shared HTTP client (connection reuse across fetches) and its limits.
#[derive(Clone)]
pub struct Fetcher {
    client: reqwest::Client,
    limits: FetchLimits,
    policy: Arc<AddressPolicy>,
    hosts: Arc<Hosts>,
    stores: Arc<Stores>,
}

/// Where an image's bytes come from.
enum Source {
    Object(Arc<dyn object_store::ObjectStore>, object_store::path::Path),
    Web(Url),
}

/// Why a redirect was not followed.
#[derive(Debug, thiserror::Error)]
#[error("redirect refused: {0}")]
struct RedirectRefused(String);

impl Fetcher {
    pub fn new(limits: FetchLimits, policy: AddressPolicy, stores: Stores) -> anyhow::Result<Self> {
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
        Ok(Self { client, limits, policy, hosts: Arc::default(), stores: Arc::new(stores) })
    }

    /// The body of `url`, or why it could not be had, with the place among the `work`ing tasks it
    /// took. The host's turn (a slot of its own, its rate, its `Retry-After`) is waited for first,
    /// and only then a place among the working tasks and one of the `fetches` shared by every host
    /// (`started` is told when): a slow or throttled host's images wait among themselves, never
    /// holding a slot another host's images could use. A host is a host name and port, or a
    /// bucket; a bucket is read only when `tenant` may read it.
    pub async fn fetch(
        &self,
        url: &str,
        tenant: &str,
        work: &Arc<Semaphore>,
        fetches: &Semaphore,
        started: impl FnOnce(),
    ) -> Result<(Vec<u8>, OwnedSemaphorePermit), ImageError> {
        let url = Url::parse(url).map_err(|e| ImageError::Blocked(format!("invalid URL: {e}")))?;
        let (authority, source) = if reefline_schemas::rules::is_object_scheme(url.scheme()) {
            let object = object_ref(&url)
                .ok_or_else(|| ImageError::Blocked("an object URL whose key the store cannot read".into()))?;
            let store =
                self.stores.bucket(&object.bucket, tenant).map_err(|e| ImageError::UnknownBucket(e.to_string()))?;
            (reefline_common::objects::base_url(&object.bucket), Source::Object(store, object.key))
        } else {
            self.policy.check_url(&url).map_err(ImageError::Blocked)?;
            let authority = format!(
                "{}:{}",
                url.host_str().unwrap_or_default().to_ascii_lowercase(),
                url.port_or_known_default().unwrap_or(0)
            );
            (authority, Source::Web(url))
        };
        let host = self.hosts.get(&authority, self.limits.per_host.max(1));
        let _turn = host.turn(self.limits.host_rate).await;
        let stopping = |e: tokio::sync::AcquireError| ImageError::Connection(e.to_string());
        let working = work.clone().acquire_owned().await.map_err(stopping)?;
        let _fetch = fetches.acquire().await.map_err(stopping)?;
        started();
        let body = match source {
            Source::Object(store, key) => self.read_object(&*store, &key).await.inspect_err(|e| {
                if let ImageError::StoreStatus(429 | 503, _) = e {
                    // The store asks for less: its bucket waits a moment.
                    host.back_off(Duration::from_secs(1));
                }
            })?,
            Source::Web(url) => self.read_web(url, &host).await?,
        };
        Ok((body, working))
    }

    /// A web image's bytes; a 429 or 503 with `Retry-After` holds its `host` back.
    async fn read_web(&self, url: Url, host: &Host) -> Result<Vec<u8>, ImageError> {
        let mut response = self.client.get(url).send().await.map_err(|e| self.classify(e))?;
        match response.status() {
            StatusCode::OK => {}
            StatusCode::NOT_FOUND | StatusCode::GONE => return Err(ImageError::NotFound),
            other => {
                if matches!(other, StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE)
                    && let Some(after) = retry_after(response.headers())
                {
                    host.back_off(after);
                }
                return Err(ImageError::HttpStatus(other.as_u16()));
            }
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

    /// An object's bytes, refused before they are read when the store says it is too large.
    async fn read_object(
        &self,
        store: &dyn object_store::ObjectStore,
        key: &object_store::path::Path,
    ) -> Result<Vec<u8>, ImageError> {
        let limit = self.limits.max_bytes;
        let deadline = self.limits.total_timeout;
        let read = async {
            let object =
                store.get_opts(key, object_store::GetOptions::default()).await.map_err(|e| self.object_error(&e))?;
            if object.meta.size > limit {
                return Err(ImageError::TooLarge { limit });
            }
            let mut body = Vec::with_capacity(object.meta.size as usize);
            let mut chunks = object.into_stream();
            while let Some(chunk) = chunks.next().await {
                let chunk = chunk.map_err(|e| self.object_error(&e))?;
                if body.len() as u64 + chunk.len() as u64 > limit {
                    return Err(ImageError::TooLarge { limit });
                }
                body.extend_from_slice(&chunk);
            }
            Ok(body)
        };
        tokio::time::timeout(deadline, read).await.map_err(|_| ImageError::Timeout(deadline.as_secs()))?
    }

    fn object_error(&self, e: &object_store::Error) -> ImageError {
        match Failure::of(e) {
            Failure::NotFound => ImageError::NotFound,
            Failure::Forbidden(reason) => ImageError::Forbidden(reason),
            Failure::Status(code, reason) => ImageError::StoreStatus(code, reason),
            Failure::Timeout => ImageError::Timeout(self.limits.total_timeout.as_secs()),
            Failure::Connection(reason) => ImageError::Connection(reason),
            Failure::Other(reason) => ImageError::Internal(format!("reading the object failed: {reason}")),
        }
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
            ImageError::Connection(error_text(&e))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_host_gets_at_most_its_share_of_fetches() {
        let hosts = Hosts::default();
        let first = hosts.get("photos.example", 1).turn(0.0).await.unwrap();
        let other_host = hosts.get("other.example", 1).turn(0.0).await;
        assert!(other_host.is_some(), "another host is not held up");
        let host = hosts.get("photos.example", 1);
        let mut second = Box::pin(host.turn(0.0));
        assert!(futures::poll!(&mut second).is_pending(), "a second fetch to the same host waits");
        drop(first);
        assert!(second.await.is_some());
    }

    #[tokio::test]
    async fn a_host_is_paced_by_its_rate_and_its_retry_after() {
        let host = Hosts::default().get("photos.example:443", 8);
        let started = Instant::now();
        for _ in 0..3 {
            drop(host.turn(20.0).await);
        }
        // Three starts at 20 a second: the third at least 100 ms after the first.
        assert!(started.elapsed() >= Duration::from_millis(100), "{:?}", started.elapsed());
        host.back_off(Duration::from_secs(30));
        let next = *host.next.lock().unwrap();
        assert!(next >= started + Duration::from_secs(30), "no fetch before the Retry-After");
        let mut waiting = Box::pin(host.turn(20.0));
        assert!(futures::poll!(&mut waiting).is_pending());
        host.back_off(Duration::from_secs(3600));
        assert!(*host.next.lock().unwrap() <= Instant::now() + MAX_RETRY_AFTER, "a Retry-After is capped");
    }

    #[tokio::test]
    async fn failures_name_no_resolved_address_and_no_token() {
        let limits = FetchLimits {
            connect_timeout: Duration::from_secs(5),
            total_timeout: Duration::from_secs(10),
            max_bytes: 1 << 20,
            max_redirects: 3,
            per_host: 4,
            host_rate: 0.0,
        };
        let (work, fetches) = (Arc::new(Semaphore::new(4)), Semaphore::new(4));
        let fetch = |fetcher: Fetcher, url: String| {
            let (work, fetches) = (work.clone(), &fetches);
            async move {
                match fetcher.fetch(&url, "default", &work, fetches, || {}).await {
                    Ok(_) => panic!("{url} was fetched"),
                    Err(e) => e,
                }
            }
        };

        let guarded = Fetcher::new(limits, AddressPolicy::default(), Stores::default()).unwrap();
        let refused = fetch(guarded, "http://localhost/x.jpg?sig=s3cret".into()).await;
        let message = refused.to_string();
        assert_eq!(refused.kind(), "blocked_address", "{message}");
        assert!(message.contains("`localhost`"), "{message}");
        assert!(!message.contains("127.0.0.1") && !message.contains("::1") && !message.contains("s3cret"), "{message}");

        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let open =
            Fetcher::new(limits, AddressPolicy::from_allowlist(&["127.0.0.1/32".into()]), Stores::default()).unwrap();
        let failed = fetch(open, format!("http://127.0.0.1:{port}/x.jpg?sig=s3cret")).await;
        assert_eq!(failed.kind(), "connection_failed", "{failed}");
        assert!(!failed.to_string().contains("s3cret"), "{failed}");

        let fetcher = Fetcher::new(limits, AddressPolicy::default(), Stores::default()).unwrap();
        let unknown = fetch(fetcher, "s3://reef-survey/a.jpg".into()).await;
        assert_eq!(unknown.kind(), "unknown_bucket");
        assert_eq!(
            unknown.to_string(),
            "bucket `reef-survey` is not one this service reads; none is configured (S3_BUCKETS, AZURE_CONTAINERS)"
        );
    }

    #[test]
    fn retry_after_is_seconds_or_a_date() {
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(reqwest::header::RETRY_AFTER, "120".parse().unwrap());
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(120)));
        let soon = (chrono::Utc::now() + chrono::Duration::seconds(60)).to_rfc2822();
        headers.insert(reqwest::header::RETRY_AFTER, soon.parse().unwrap());
        let wait = retry_after(&headers).unwrap();
        assert!(wait > Duration::from_secs(55) && wait <= Duration::from_secs(60), "{wait:?}");
        headers.insert(reqwest::header::RETRY_AFTER, "soon".parse().unwrap());
        assert_eq!(retry_after(&headers), None);
    }
}
