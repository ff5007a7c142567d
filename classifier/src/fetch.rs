//! Fetching image bytes over HTTP with timeouts, a redirect limit and a size cap enforced while
//! the body streams in.

use std::time::Duration;

use reqwest::StatusCode;

use crate::error::ImageError;

/// Limits on one fetch.
#[derive(Clone, Copy, Debug)]
pub struct FetchLimits {
    pub connect_timeout: Duration,
    pub total_timeout: Duration,
    pub max_bytes: u64,
    pub max_redirects: usize,
}

/// A shared HTTP client (connection reuse across fetches) and its limits.
#[derive(Clone)]
pub struct Fetcher {
    client: reqwest::Client,
    limits: FetchLimits,
}

impl Fetcher {
    pub fn new(limits: FetchLimits) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .connect_timeout(limits.connect_timeout)
            .timeout(limits.total_timeout)
            .redirect(reqwest::redirect::Policy::limited(limits.max_redirects))
            .user_agent(concat!("reefline-classifier/", env!("CARGO_PKG_VERSION")))
            .no_proxy()
            .build()?;
        Ok(Self { client, limits })
    }

    /// The body of `url`, or why it could not be had.
    pub async fn fetch(&self, url: &str) -> Result<Vec<u8>, ImageError> {
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
        if e.is_timeout() {
            ImageError::Timeout(self.limits.total_timeout.as_secs())
        } else if e.is_redirect() {
            ImageError::Connection(format!("more than {} redirects", self.limits.max_redirects))
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
