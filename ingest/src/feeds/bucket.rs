//! A feed from a bucket's or container's prefix: `{"source": "s3://bucket/survey-2026/", "match": "**/*.jpg"}`
//! (or `az://container/survey-2026/`).
//! The prefix is listed page by page while the feed is read (a listing of millions of keys holds
//! one page at a time), and each matching object becomes one NDJSON line, its key, size and ETag
//! as metadata, read by the same parser, ledger and chunks as an uploaded feed. Keys come in the
//! store's order (S3: by key), so a resend under the same `Idempotency-Key` resumes after the
//! last settled object while the prefix is unchanged.

use bytes::Bytes;
use futures::StreamExt;
use globset::{GlobBuilder, GlobMatcher};
use object_store::path::Path;
use reefline_common::objects::{Failure, Stores};
use url::Url;

use super::ByteStream;
use crate::error::IngestError;

/// The objects a prefix feed takes when it names no `match`.
pub const DEFAULT_MATCH: &str = "**/*.{jpg,jpeg,png,gif,webp,bmp}";

/// A prefix being listed.
pub struct Listing {
    /// The prefix, as the feed's source: `s3://bucket/prefix/`.
    pub source: String,
    /// The glob its keys are matched with.
    pub pattern: String,
    /// One NDJSON line per matching object.
    pub stream: ByteStream,
}

/// Checks `source` and `pattern`, and starts listing: the first page is asked for before the feed
/// is opened, so that an unknown prefix's store or refused credentials answer at once.
pub async fn open(stores: &Stores, tenant: &str, source: &str, pattern: Option<&str>) -> Result<Listing, IngestError> {
    let (bucket, prefix) = prefix_of(source)?;
    let store = stores
        .bucket(&bucket, tenant)
        .map_err(|e| IngestError::UnknownBucket { field: "source".into(), reason: e.to_string() })?;
    let pattern = pattern.unwrap_or(DEFAULT_MATCH).to_owned();
    let matcher = glob(&pattern)?;
    let base =
        Url::parse(&format!("{}/", reefline_common::objects::base_url(&bucket))).expect("a bucket name makes a URL");
    let mut source = base.clone();
    if !prefix.as_ref().is_empty() {
        source.path_segments_mut().expect("object URLs have a path").clear().extend(prefix.parts()).push("");
    }
    let source = source.to_string();

    let mut objects = store.list(Some(&prefix));
    let first = objects.next().await;
    if let Some(Err(e)) = &first {
        return Err(IngestError::UnreadableFeed {
            feed_id: String::new(),
            reason: format!("listing {source} failed: {}", describe(e)),
        });
    }
    let strip = if prefix.as_ref().is_empty() { 0 } else { prefix.as_ref().len() + 1 };
    let listed = futures::stream::iter(first).chain(objects).filter_map(move |object| {
        std::future::ready(match object {
            Ok(object) => line(&object, strip, &matcher, &base).map(Ok),
            Err(e) => Some(Err(std::io::Error::other(format!("listing the prefix failed: {}", describe(&e))))),
        })
    });
    Ok(Listing { source, pattern, stream: Box::pin(listed) })
}

/// The bucket (its store's key) and the prefix a feed's `source`, `s3://bucket/prefix/` or
/// `az://container/prefix/`, names; a 400 naming what is wrong with it.
fn prefix_of(source: &str) -> Result<(String, Path), IngestError> {
    let invalid = |reason: String| IngestError::InvalidUrl { field: "source".into(), reason };
    let url = Url::parse(source.trim()).map_err(|e| invalid(e.to_string()))?;
    let (kind, is_name): (&str, fn(&str) -> bool) = match url.scheme() {
        "s3" => ("bucket", reefline_schemas::rules::is_bucket_name),
        "az" => ("container", reefline_schemas::rules::is_container_name),
        other => {
            return Err(invalid(format!(
                "a feed's `source` is a bucket's or container's prefix, `s3://bucket/prefix/` or `az://container/prefix/` (scheme `{other}`); a list of URLs goes in `source_url`"
            )));
        }
    };
    let name = url.host_str().unwrap_or_default();
    if !is_name(name) {
        return Err(invalid(format!("`{name}` is not a {kind} name")));
    }
    let bucket = reefline_common::objects::bucket_key(url.scheme(), name).expect("an object URL's scheme");
    let credentials = !url.username().is_empty() || url.password().is_some();
    if url.port().is_some() || url.query().is_some() || url.fragment().is_some() || credentials {
        return Err(invalid(format!(
            "a prefix is `{}://{name}/prefix/`, with no credentials, port, query or fragment",
            url.scheme()
        )));
    }
    let path = url.path().trim_start_matches('/');
    if !path.is_empty() {
        reefline_schemas::rules::check_key_parts(path).map_err(invalid)?;
    }
    let prefix = Path::from_url_path(url.path()).map_err(|e| invalid(e.to_string()))?;
    Ok((bucket, prefix))
}

/// The feed line of a listed object (its URL, key, size and ETag), if its key below the prefix
/// (`strip` bytes of it) matches; none for a folder marker (`survey/`, read as the prefix itself).
fn line(object: &object_store::ObjectMeta, strip: usize, matcher: &GlobMatcher, base: &Url) -> Option<Bytes> {
    let key = object.location.as_ref();
    let below = key.get(strip..).filter(|below| !below.is_empty())?;
    if !matcher.is_match(below) {
        return None;
    }
    let mut url = base.clone();
    url.path_segments_mut().expect("object URLs have a path").clear().extend(key.split('/'));
    let line = serde_json::json!({
        "url": url.as_str(),
        "key": key,
        "size": object.size,
        "etag": object.e_tag.as_deref().unwrap_or_default().trim_matches('"'),
    });
    Some(Bytes::from(format!("{line}\n")))
}

/// The glob keys are matched with: `*` stays within a `/`-separated part, `**` crosses them, case is ignored.
fn glob(pattern: &str) -> Result<GlobMatcher, IngestError> {
    let invalid = |message: String| IngestError::InvalidField { field: "match".into(), message };
    if pattern.is_empty() || pattern.len() > 256 {
        return Err(invalid("a glob of 1 to 256 bytes, such as `**/*.jpg`".into()));
    }
    GlobBuilder::new(pattern)
        .case_insensitive(true)
        .literal_separator(true)
        .build()
        .map(|g| g.compile_matcher())
        .map_err(|e| invalid(format!("not a glob: {}", e.kind())))
}

fn describe(e: &object_store::Error) -> String {
    match Failure::of(e) {
        Failure::NotFound => "the store has no such bucket or container".into(),
        Failure::Forbidden(reason)
        | Failure::Status(_, reason)
        | Failure::Connection(reason)
        | Failure::Other(reason) => reason,
        Failure::Timeout => "the store did not answer in time".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_below_the_prefix_without_regard_to_case() {
        let default = glob(DEFAULT_MATCH).unwrap();
        for key in ["a.jpg", "site-a/day-1/IMG_0001.JPG", "x/y.webp"] {
            assert!(default.is_match(key), "{key}");
        }
        for key in ["notes.txt", "site-a/IMG_0001.jpg.xmp"] {
            assert!(!default.is_match(key), "{key}");
        }
        let one_level = glob("*/*.png").unwrap();
        assert!(one_level.is_match("site-a/x.PNG"));
        assert!(!one_level.is_match("site-a/day-1/x.png"), "`*` does not cross a slash");
        let bad = glob("**/*.{jpg").err().unwrap();
        assert_eq!(bad.kind(), "invalid_field");
        assert!(bad.to_string().starts_with("`match`: not a glob"), "{bad}");
    }
}
