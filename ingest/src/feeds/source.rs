//! A feed ingest fetches itself: `{"source_url": "https://…/list.csv.gz"}`, fetched under the
//! same server-side request forgery rules as the classifier's image fetches.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use futures::StreamExt;
use reefline_common::guard::{AddressPolicy, Blocked, GuardedResolver};
use url::Url;

use super::pace::{Pace, paced};
use super::parse::Format;
use super::{ByteStream, FeedSource};
use crate::error::IngestError;

/// Largest JSON body of a feed source.
const MAX_SOURCE_REQUEST_BYTES: usize = 64 * 1024;

/// The client lists are fetched with: addresses checked when they are resolved (`SOURCE_ALLOW`
/// opens private ones), no redirects, no proxy.
pub fn client(policy: Arc<AddressPolicy>) -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .redirect(reqwest::redirect::Policy::none())
        .dns_resolver(Arc::new(GuardedResolver { policy }))
        .user_agent(concat!("reefline-ingest/", env!("CARGO_PKG_VERSION")))
        .no_proxy()
        .build()?)
}

/// Reads the JSON request naming the source.
pub async fn parse_request(body: Body) -> Result<FeedSource, IngestError> {
    let bytes = axum::body::to_bytes(body, MAX_SOURCE_REQUEST_BYTES)
        .await
        .map_err(|_| IngestError::BodyTooLarge { limit: MAX_SOURCE_REQUEST_BYTES })?;
    crate::validate::parse_json(&bytes)
}

/// Starts fetching `url`: its body as a stream that must keep to `pace`, and the format its
/// Content-Type or file name names.
pub async fn open(
    client: &reqwest::Client,
    policy: &AddressPolicy,
    url: &Url,
    pace: Pace,
) -> Result<(ByteStream, Option<Format>, Option<u64>), IngestError> {
    let started = tokio::time::Instant::now();
    let refused = |reason: String| IngestError::UnreadableFeed { feed_id: String::new(), reason };
    policy.check_url(url).map_err(|reason| refused(format!("source_url is refused: {reason}")))?;
    let headers_within = pace.idle.min(pace.deadline);
    let response = tokio::time::timeout(headers_within, client.get(url.clone()).send())
        .await
        .map_err(|_| refused(format!("source_url sent no answer within {} s", headers_within.as_secs())))?
        .map_err(|e| refused(explain(&e)))?;
    if !response.status().is_success() {
        return Err(refused(format!("source_url answered {}", response.status())));
    }
    let format = response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(Format::from_media_type)
        .or_else(|| Format::from_file_name(url.path()));
    let size = response.content_length();
    let stream = response.bytes_stream().map(|r| r.map_err(std::io::Error::other));
    Ok((paced(stream, pace, started), format, size))
}

/// A failed fetch's message with its causes, the URL redacted; a refused address says so, naming
/// the host and never what it resolved to.
fn explain(e: &reqwest::Error) -> String {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(blocked) = s.downcast_ref::<Blocked>() {
            return format!("source_url is refused: {blocked}");
        }
        source = s.source();
    }
    format!("source_url could not be fetched: {}", reefline_common::guard::error_text(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_failed_source_names_no_resolved_address_and_no_token() {
        let refused = client(Arc::new(AddressPolicy::default())).unwrap();
        let e = refused.get("http://localhost/list.csv?token=s3cret").send().await.unwrap_err();
        let reason = explain(&e);
        assert!(reason.starts_with("source_url is refused: `localhost` resolves only to"), "{reason}");
        assert!(!reason.contains("127.0.0.1") && !reason.contains("::1") && !reason.contains("s3cret"), "{reason}");

        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let open = client(Arc::new(AddressPolicy::from_allowlist(&["127.0.0.1/32".into()]))).unwrap();
        let e = open.get(format!("http://127.0.0.1:{port}/list.csv?token=s3cret")).send().await.unwrap_err();
        let reason = explain(&e);
        assert!(reason.starts_with("source_url could not be fetched"), "{reason}");
        assert!(!reason.contains("s3cret"), "{reason}");
    }
}
