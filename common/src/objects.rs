//! Object storage: images named `s3://bucket/key` and feeds listed from `s3://bucket/prefix/`,
//! read through the Arrow project's `object_store` crate.
//!
//! The stores are the operator's, never the request's. The default S3 store reads the variables
//! every S3 tool reads (`AWS_ENDPOINT_URL`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, and AWS's own credential chain where no key is
//! given); `S3_BUCKETS` names the buckets a request may name on it. More stores (other endpoints,
//! other keys) are named in `STORES_FILE`. A bucket may be granted to some tenants only; to any
//! other tenant it is as unknown as a bucket nobody configured.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use object_store::aws::AmazonS3Builder;
use object_store::path::Path;
use object_store::{ClientOptions, ObjectStore, RetryConfig};
use reefline_schemas::rules::is_bucket_name;
use secrecy::{ExposeSecret, SecretString};
use url::Url;

/// The stores image URLs and feeds may name.
#[derive(Clone, Default, clap::Args)]
pub struct StoreSettings {
    /// Buckets of the default S3 store that `s3://` URLs may name, comma-separated; `name=team-a+team-b`
    /// grants a bucket to those tenants only.
    #[arg(long = "s3-buckets", env = "S3_BUCKETS", value_delimiter = ',')]
    pub s3_buckets: Vec<String>,

    /// The default store's endpoint (an S3-compatible store: MinIO, Ceph, moto); absent: AWS's for
    /// the region.
    #[arg(long = "aws-endpoint-url", env = "AWS_ENDPOINT_URL")]
    pub endpoint: Option<String>,

    /// The default store's region.
    #[arg(long = "aws-region", env = "AWS_REGION", default_value = "us-east-1")]
    pub region: String,

    /// The default store's access key; absent: AWS's credential chain (web identity, container and
    /// instance credentials), or unsigned requests to an endpoint given by `AWS_ENDPOINT_URL`.
    #[arg(long = "aws-access-key-id", env = "AWS_ACCESS_KEY_ID", hide_env_values = true)]
    pub access_key_id: Option<SecretString>,

    #[arg(long = "aws-secret-access-key", env = "AWS_SECRET_ACCESS_KEY", hide_env_values = true)]
    pub secret_access_key: Option<SecretString>,

    #[arg(long = "aws-session-token", env = "AWS_SESSION_TOKEN", hide_env_values = true)]
    pub session_token: Option<SecretString>,

    /// A TOML file of more stores: `[[store]]` tables, each with `buckets`, and optionally
    /// `endpoint`, `region`, `access_key_id`, `secret_access_key` and `tenants`.
    #[arg(long = "stores-file", env = "STORES_FILE")]
    pub stores_file: Option<PathBuf>,
}

impl std::fmt::Debug for StoreSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secret = |s: &Option<SecretString>| s.as_ref().map(|_| "<redacted>");
        f.debug_struct("StoreSettings")
            .field("s3_buckets", &self.s3_buckets)
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("access_key_id", &secret(&self.access_key_id))
            .field("secret_access_key", &secret(&self.secret_access_key))
            .field("session_token", &secret(&self.session_token))
            .field("stores_file", &self.stores_file)
            .finish()
    }
}

/// One `[[store]]` of the stores file.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct StoreEntry {
    buckets: Vec<String>,
    endpoint: Option<String>,
    region: Option<String>,
    access_key_id: Option<String>,
    secret_access_key: Option<String>,
    session_token: Option<String>,
    /// The tenants the buckets are granted to; absent: every tenant.
    tenants: Option<Vec<String>>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct StoresFile {
    #[serde(default)]
    store: Vec<StoreEntry>,
}

/// How the stores are reached: each request's timeouts, and how often the client retries a failed
/// request itself (the classifier retries transient failures on its own, with a delay that holds
/// no slot; a listing has no such second chance).
#[derive(Clone, Copy, Debug)]
pub struct Access {
    pub connect_timeout: Duration,
    pub timeout: Duration,
    pub retries: usize,
}

/// A bucket a request may name: its store, and the tenants it is granted to (`None`: all).
struct Bucket {
    store: Arc<dyn ObjectStore>,
    tenants: Option<Vec<String>>,
}

/// The buckets requests may name, each with its store.
#[derive(Default)]
pub struct Stores {
    buckets: HashMap<String, Bucket>,
}

/// Where an object lives: its bucket, and its key within it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectRef {
    pub bucket: String,
    pub key: Path,
}

/// The object an `s3://` URL names; `None` for any other scheme.
pub fn object_ref(url: &Url) -> Option<ObjectRef> {
    if url.scheme() != "s3" {
        return None;
    }
    let bucket = url.host_str()?.to_owned();
    let key = Path::from_url_path(url.path()).ok()?;
    Some(ObjectRef { bucket, key })
}

/// Why an object could not be read, in the kinds image results use.
#[derive(Debug, PartialEq, Eq)]
pub enum Failure {
    NotFound,
    /// The store refused the credentials, or they do not allow reading it.
    Forbidden(String),
    /// Another error status from the store.
    Status(u16, String),
    Timeout,
    /// No answer: the connection failed or broke.
    Connection(String),
    /// Anything else (an unusable key, say): not worth trying again.
    Other(String),
}

impl Failure {
    /// What went wrong with a read or a listing.
    pub fn of(e: &object_store::Error) -> Self {
        use object_store::client::{HttpError, HttpErrorKind};
        // The error's text names the store's address: results and answers get the kind of
        // failure and the store's own code instead.
        let full = text(e);
        let detail = summary(&full);
        match e {
            object_store::Error::NotFound { .. } => return Failure::NotFound,
            object_store::Error::PermissionDenied { .. } => {
                return Failure::Forbidden(format!("the store answered 403 Forbidden{detail}"));
            }
            object_store::Error::Unauthenticated { .. } => {
                return Failure::Forbidden(format!("the store answered 401 Unauthorized{detail}"));
            }
            object_store::Error::Generic { .. } => {}
            _ => return Failure::Other(format!("the store's client refused the request{detail}")),
        }
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
        while let Some(s) = source {
            if let Some(http) = s.downcast_ref::<HttpError>() {
                return match http.kind() {
                    HttpErrorKind::Timeout => Failure::Timeout,
                    HttpErrorKind::Connect => Failure::Connection("could not connect to the store".into()),
                    HttpErrorKind::Request | HttpErrorKind::Interrupted => {
                        Failure::Connection("the connection to the store broke off".into())
                    }
                    _ => Failure::Other("the store's answer could not be read".into()),
                };
            }
            source = s.source();
        }
        // The client's error for a status is not public; its text carries the status.
        match status_in(&full) {
            Some(code) => Failure::Status(code, format!("the store answered HTTP {code}{detail}")),
            None => Failure::Other(format!("the store's answer could not be used{detail}")),
        }
    }
}

/// The status in an object_store error's text ("... non-2xx status code: 503 Service Unavailable").
fn status_in(text: &str) -> Option<u16> {
    let at = text.find("status code: ")? + "status code: ".len();
    text.get(at..at + 3)?.parse().ok()
}

/// An error with its causes, in one line.
fn text(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let next = s.to_string();
        if !text.contains(&next) {
            text = format!("{text}: {next}");
        }
        source = s.source();
    }
    text
}

/// The `<Code>` and `<Message>` of an S3 error body, as ` (Code: Message)`.
fn summary(body: &str) -> String {
    let field = |tag: &str| {
        let open = format!("<{tag}>");
        let start = body.find(&open)? + open.len();
        let end = body[start..].find("</")? + start;
        Some(body[start..end].to_owned())
    };
    match (field("Code"), field("Message")) {
        (Some(code), Some(message)) => format!(" ({code}: {message})"),
        (Some(code), None) => format!(" ({code})"),
        _ => String::new(),
    }
}

/// Why a request may not name a bucket.
#[derive(Debug, thiserror::Error)]
#[error("bucket `{bucket}` is not one this service reads{}", readable_text(.readable))]
pub struct UnknownBucket {
    pub bucket: String,
    /// The buckets the caller may name.
    pub readable: Vec<String>,
}

fn readable_text(buckets: &[String]) -> String {
    if buckets.is_empty() {
        "; none is configured (S3_BUCKETS)".into()
    } else {
        format!("; it reads: {}", buckets.join(", "))
    }
}

impl Stores {
    /// The stores of `settings`, each reached as `access` says.
    pub fn new(settings: &StoreSettings, access: Access) -> anyhow::Result<Self> {
        let mut stores = Stores::default();
        if !settings.s3_buckets.is_empty() {
            let base = default_store(settings);
            for entry in &settings.s3_buckets {
                let entry = entry.trim();
                if entry.is_empty() {
                    continue;
                }
                let (bucket, tenants) = match entry.split_once('=') {
                    Some((bucket, tenants)) => (bucket, Some(tenants.split('+').map(str::to_owned).collect())),
                    None => (entry, None),
                };
                stores.add(bucket, tenants, base.clone(), is_http(settings.endpoint.as_deref()), access)?;
            }
        }
        if let Some(path) = &settings.stores_file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("reading STORES_FILE {}: {e}", path.display()))?;
            // Only the message and the line: the error's own text quotes the line, a secret perhaps.
            let file: StoresFile = toml::from_str(&text).map_err(|e| {
                let line = e.span().map(|span| text[..span.start.min(text.len())].lines().count().max(1));
                let at = line.map(|l| format!(" (line {l})")).unwrap_or_default();
                anyhow::anyhow!("STORES_FILE {}{at}: {}", path.display(), e.message())
            })?;
            for entry in file.store {
                let mut builder = AmazonS3Builder::new().with_region(entry.region.as_deref().unwrap_or("us-east-1"));
                if let Some(endpoint) = &entry.endpoint {
                    builder = builder.with_endpoint(endpoint);
                }
                match (&entry.access_key_id, &entry.secret_access_key) {
                    (Some(id), Some(secret)) => {
                        builder = builder.with_access_key_id(id).with_secret_access_key(secret);
                        if let Some(token) = &entry.session_token {
                            builder = builder.with_token(token);
                        }
                    }
                    (None, None) => builder = builder.with_skip_signature(entry.endpoint.is_some()),
                    _ => anyhow::bail!(
                        "STORES_FILE {}: a store has one of access_key_id and secret_access_key without the other",
                        path.display()
                    ),
                }
                for bucket in &entry.buckets {
                    let http = is_http(entry.endpoint.as_deref());
                    stores.add(bucket, entry.tenants.clone(), builder.clone(), http, access)?;
                }
            }
        }
        Ok(stores)
    }

    fn add(
        &mut self,
        bucket: &str,
        tenants: Option<Vec<String>>,
        builder: AmazonS3Builder,
        allow_http: bool,
        access: Access,
    ) -> anyhow::Result<()> {
        anyhow::ensure!(is_bucket_name(bucket), "`{bucket}` is not an S3 bucket name");
        if let Some(tenants) = &tenants {
            for tenant in tenants {
                anyhow::ensure!(
                    crate::auth::is_tenant_name(tenant),
                    "bucket `{bucket}` is granted to `{tenant}`, which is not a tenant name"
                );
            }
        }
        anyhow::ensure!(!self.buckets.contains_key(bucket), "bucket `{bucket}` is configured twice");
        let options = ClientOptions::new()
            .with_connect_timeout(access.connect_timeout)
            .with_timeout(access.timeout)
            .with_allow_http(allow_http);
        let retry = RetryConfig {
            max_retries: access.retries,
            retry_timeout: access.timeout * (access.retries as u32 + 1),
            ..RetryConfig::default()
        };
        let store = builder
            .with_bucket_name(bucket)
            .with_client_options(options)
            .with_retry(retry)
            .build()
            .map_err(|e| anyhow::anyhow!("the store of bucket `{bucket}`: {e}"))?;
        self.buckets.insert(bucket.to_owned(), Bucket { store: Arc::new(store), tenants });
        Ok(())
    }

    /// The store of `bucket` when `tenant` may read it.
    pub fn bucket(&self, bucket: &str, tenant: &str) -> Result<Arc<dyn ObjectStore>, UnknownBucket> {
        match self.buckets.get(bucket) {
            Some(b) if b.tenants.as_ref().is_none_or(|t| t.iter().any(|t| t == tenant)) => Ok(b.store.clone()),
            _ => Err(UnknownBucket { bucket: bucket.to_owned(), readable: self.readable(tenant) }),
        }
    }

    /// The buckets `tenant` may name, sorted.
    pub fn readable(&self, tenant: &str) -> Vec<String> {
        let mut names: Vec<String> = self
            .buckets
            .iter()
            .filter(|(_, b)| b.tenants.as_ref().is_none_or(|t| t.iter().any(|t| t == tenant)))
            .map(|(name, _)| name.clone())
            .collect();
        names.sort();
        names
    }

    /// Checks that `tenant` may read what `url` names (always, for a URL that is not `s3://`).
    pub fn check(&self, url: &Url, tenant: &str) -> Result<(), UnknownBucket> {
        match object_ref(url) {
            Some(object) => self.bucket(&object.bucket, tenant).map(|_| ()),
            // An s3 URL whose key the store could not read names nothing it may read.
            None if url.scheme() == "s3" => Err(UnknownBucket {
                bucket: url.host_str().unwrap_or_default().to_owned(),
                readable: self.readable(tenant),
            }),
            None => Ok(()),
        }
    }
}

/// Whether an endpoint is plain HTTP (a store on a private network, or on loopback in the tests).
fn is_http(endpoint: Option<&str>) -> bool {
    endpoint.is_some_and(|e| e.starts_with("http://"))
}

/// The default store: AWS's environment (credential chain included), then the settings over it.
fn default_store(settings: &StoreSettings) -> AmazonS3Builder {
    let mut builder = AmazonS3Builder::from_env().with_region(&settings.region);
    if let Some(endpoint) = &settings.endpoint {
        builder = builder.with_endpoint(endpoint);
    }
    match (&settings.access_key_id, &settings.secret_access_key) {
        (Some(id), Some(secret)) => {
            builder = builder.with_access_key_id(id.expose_secret()).with_secret_access_key(secret.expose_secret());
            if let Some(token) = &settings.session_token {
                builder = builder.with_token(token.expose_secret());
            }
        }
        // No key, an endpoint of the operator's: its objects are public.
        _ if settings.endpoint.is_some() => builder = builder.with_skip_signature(true),
        _ => {}
    }
    builder
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s3_urls_name_a_bucket_and_a_key() {
        let url = Url::parse("s3://reef-survey/2026/site%20a/IMG_0001.JPG").unwrap();
        assert_eq!(reefline_schemas::rules::check_s3_parts(&url), Ok(()));
        let object = object_ref(&url).unwrap();
        assert_eq!(object.bucket, "reef-survey");
        assert_eq!(object.key.as_ref(), "2026/site a/IMG_0001.JPG");
        assert_eq!(object_ref(&Url::parse("https://reef-survey/x.jpg").unwrap()), None);

        let refused = |raw: &str| reefline_schemas::rules::check_s3_parts(&Url::parse(raw).unwrap()).unwrap_err();
        assert!(refused("s3://reef-survey/").contains("names a bucket but no object"));
        assert!(refused("s3://Reef_Survey/x.jpg").contains("is not a bucket name"));
        assert!(refused("s3://ab/x.jpg").contains("is not a bucket name"));
        assert!(refused("s3://reef-survey/x.jpg?versionId=1").contains("no port, query or fragment"));
        assert!(refused("s3://reef-survey/a//x.jpg").contains("empty, `.` or `..` part"));
        // Encoded, the same: what the store would read is checked.
        assert!(refused("s3://reef-survey/a%2F%2Fx.jpg").contains("empty, `.` or `..` part"));
        assert!(refused("s3://reef-survey/x%00.jpg").contains("control character"));
        assert!(refused("s3://reef-survey/x%FF.jpg").contains("not UTF-8"));
    }

    fn access() -> Access {
        Access { connect_timeout: Duration::from_secs(1), timeout: Duration::from_secs(1), retries: 0 }
    }

    #[test]
    fn a_bucket_granted_to_tenants_is_unknown_to_the_others() {
        let settings = StoreSettings {
            s3_buckets: vec!["open-survey".into(), " team-photos=team-a+team-b".into()],
            endpoint: Some("http://127.0.0.1:9".into()),
            region: "us-east-1".into(),
            ..Default::default()
        };
        let stores = Stores::new(&settings, access()).unwrap();
        assert!(stores.bucket("open-survey", "team-c").is_ok());
        assert!(stores.bucket("team-photos", "team-b").is_ok());
        let refused = stores.bucket("team-photos", "team-c").err().unwrap();
        assert_eq!(refused.to_string(), "bucket `team-photos` is not one this service reads; it reads: open-survey");
        assert_eq!(stores.readable("team-a"), ["open-survey", "team-photos"]);
        let url = Url::parse("s3://elsewhere/x.jpg").unwrap();
        assert_eq!(stores.check(&url, "team-a").unwrap_err().bucket, "elsewhere");
        assert!(stores.check(&Url::parse("https://elsewhere/x.jpg").unwrap(), "team-a").is_ok());

        let none = Stores::new(&StoreSettings::default(), access()).unwrap();
        let refused = none.bucket("open-survey", "default").err().unwrap();
        assert!(refused.to_string().ends_with("none is configured (S3_BUCKETS)"), "{refused}");
    }

    #[test]
    fn bad_settings_are_refused_naming_the_fault() {
        let with = |buckets: &[&str]| StoreSettings {
            s3_buckets: buckets.iter().map(|b| b.to_string()).collect(),
            region: "us-east-1".into(),
            ..Default::default()
        };
        let error = |s: StoreSettings| Stores::new(&s, access()).err().unwrap().to_string();
        assert!(error(with(&["Bad_Bucket"])).contains("is not an S3 bucket name"));
        assert!(error(with(&["photos=Team A"])).contains("which is not a tenant name"));
        assert!(error(with(&["photos", "photos"])).contains("configured twice"));
    }

    #[test]
    fn s3_error_bodies_are_summarised() {
        let body = "<?xml version=\"1.0\"?><Error><Code>InvalidAccessKeyId</Code><Message>The key does not exist.</Message></Error>";
        assert_eq!(summary(body), " (InvalidAccessKeyId: The key does not exist.)");
        assert_eq!(summary("not xml"), "");
        let text = "Error performing GET http://127.0.0.1:1/b/k in 2ms - Server returned non-2xx status code: 503 Service Unavailable: ";
        assert_eq!(status_in(text), Some(503));
        assert_eq!(status_in("connection refused"), None);
    }
}
