//! Object storage: images named `s3://bucket/key` (S3 and S3-compatible stores) or
//! `az://container/blob` (Azure Blob Storage), and feeds listed from `s3://bucket/prefix/` or
//! `az://container/prefix/`, read through the Arrow project's `object_store` crate.
//!
//! The stores are the operator's, never the request's. The default S3 store reads the variables
//! every S3 tool reads (`AWS_ENDPOINT_URL`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, and AWS's own credential chain where no key is
//! given); `S3_BUCKETS` names the buckets a request may name on it. The default Azure store reads
//! Azure's (`AZURE_STORAGE_ACCOUNT_NAME`, `AZURE_STORAGE_ACCOUNT_KEY`, `AZURE_STORAGE_ENDPOINT`);
//! `AZURE_CONTAINERS` names its containers. More stores (other endpoints, other keys) are named in
//! `STORES_FILE`. A bucket or container may be granted to some tenants only; to any other tenant
//! it is as unknown as one nobody configured.
//!
//! A bucket is known by its name (`reef-survey`), a container by its URL's start
//! (`az://survey-photos`), so that the two never clash.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use object_store::aws::AmazonS3Builder;
use object_store::azure::MicrosoftAzureBuilder;
use object_store::path::Path;
use object_store::{ClientOptions, ObjectStore, RetryConfig};
use reefline_schemas::rules::{is_bucket_name, is_container_name};
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

    /// Containers of the default Azure Blob store that `az://` URLs may name, comma-separated;
    /// `name=team-a+team-b` grants a container to those tenants only.
    #[arg(long = "azure-containers", env = "AZURE_CONTAINERS", value_delimiter = ',')]
    pub azure_containers: Vec<String>,

    /// The default Azure store's storage account.
    #[arg(long = "azure-storage-account-name", env = "AZURE_STORAGE_ACCOUNT_NAME")]
    pub azure_account: Option<String>,

    /// The default Azure store's account key; absent: Azure's credential chain (workload and
    /// managed identity, the Azure CLI).
    #[arg(long = "azure-storage-account-key", env = "AZURE_STORAGE_ACCOUNT_KEY", hide_env_values = true)]
    pub azure_access_key: Option<SecretString>,

    /// The default Azure store's blob endpoint, with the account in its path for an emulator
    /// (Azurite: `http://127.0.0.1:10000/devstoreaccount1`); absent: `https://<account>.blob.core.windows.net`.
    #[arg(long = "azure-storage-endpoint", env = "AZURE_STORAGE_ENDPOINT")]
    pub azure_endpoint: Option<String>,

    /// A TOML file of more stores: `[[store]]` tables. An S3 store (`kind = "s3"`, the default) has
    /// `buckets`, and optionally `endpoint`, `region`, `access_key_id`, `secret_access_key` and
    /// `session_token`; an Azure one (`kind = "azure"`) has `containers` and `account`, and
    /// optionally `access_key` and `endpoint`. Either may have `tenants`.
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
            .field("azure_containers", &self.azure_containers)
            .field("azure_account", &self.azure_account)
            .field("azure_access_key", &secret(&self.azure_access_key))
            .field("azure_endpoint", &self.azure_endpoint)
            .field("stores_file", &self.stores_file)
            .finish()
    }
}

/// One `[[store]]` of the stores file.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct StoreEntry {
    /// `s3` (the default) or `azure`.
    kind: Option<String>,
    #[serde(default)]
    buckets: Vec<String>,
    #[serde(default)]
    containers: Vec<String>,
    /// Azure: the storage account, and its key.
    account: Option<String>,
    access_key: Option<String>,
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

/// The object an `s3://` or `az://` URL names; `None` for any other scheme. Its `bucket` is the
/// bucket's name, or `az://` and the container's.
pub fn object_ref(url: &Url) -> Option<ObjectRef> {
    let name = url.host_str()?;
    let bucket = match url.scheme() {
        "s3" => name.to_owned(),
        "az" => format!("az://{name}"),
        _ => return None,
    };
    let key = Path::from_url_path(url.path()).ok()?;
    Some(ObjectRef { bucket, key })
}

/// The URL of the top of a bucket (`s3://reef-survey`) or container (`az://survey-photos`), as
/// [`ObjectRef::bucket`] names it.
pub fn base_url(bucket: &str) -> String {
    if bucket.contains("://") { bucket.to_owned() } else { format!("s3://{bucket}") }
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

/// The `<Code>` and `<Message>` (its first line) of an S3 or Azure error body, as ` (Code: Message)`.
fn summary(body: &str) -> String {
    let field = |tag: &str| {
        let open = format!("<{tag}>");
        let start = body.find(&open)? + open.len();
        let end = body[start..].find("</")? + start;
        Some(body[start..end].to_owned())
    };
    // Azure's message runs on with its request id and time on lines of their own.
    let message = field("Message").map(|m| m.lines().next().unwrap_or_default().trim().to_owned());
    match (field("Code"), message) {
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
        "; none is configured (S3_BUCKETS, AZURE_CONTAINERS)".into()
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
                let (bucket, tenants) = split_grant(entry);
                stores.add(bucket, tenants, base.clone(), is_http(settings.endpoint.as_deref()), access)?;
            }
        }
        if !settings.azure_containers.is_empty() {
            let base = default_azure_store(settings);
            for entry in &settings.azure_containers {
                let entry = entry.trim();
                if entry.is_empty() {
                    continue;
                }
                let (container, tenants) = split_grant(entry);
                stores.add_azure(
                    container,
                    tenants,
                    base.clone(),
                    is_http(settings.azure_endpoint.as_deref()),
                    access,
                )?;
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
                let http = is_http(entry.endpoint.as_deref());
                match entry.kind.as_deref().unwrap_or("s3") {
                    "s3" => {}
                    "azure" => {
                        let account = entry.account.as_deref().ok_or_else(|| {
                            anyhow::anyhow!("STORES_FILE {}: an azure store has no `account`", path.display())
                        })?;
                        let s3_fields = !entry.buckets.is_empty()
                            || entry.region.is_some()
                            || entry.access_key_id.is_some()
                            || entry.secret_access_key.is_some()
                            || entry.session_token.is_some();
                        anyhow::ensure!(
                            !s3_fields && !entry.containers.is_empty(),
                            "STORES_FILE {}: an azure store names `containers`, and optionally `access_key`; `buckets`, `region`, `access_key_id`, `secret_access_key` and `session_token` are an s3 store's",
                            path.display()
                        );
                        let mut builder = MicrosoftAzureBuilder::new().with_account(account);
                        if let Some(key) = &entry.access_key {
                            builder = builder.with_access_key(key);
                        }
                        if let Some(endpoint) = &entry.endpoint {
                            builder = builder.with_endpoint(endpoint.clone());
                        }
                        for container in &entry.containers {
                            stores.add_azure(container, entry.tenants.clone(), builder.clone(), http, access)?;
                        }
                        continue;
                    }
                    other => anyhow::bail!(
                        "STORES_FILE {}: a store's kind is `s3` or `azure`, not `{other}`",
                        path.display()
                    ),
                }
                anyhow::ensure!(
                    !entry.buckets.is_empty(),
                    "STORES_FILE {}: a store names no `buckets` (or `containers`, with kind = \"azure\")",
                    path.display()
                );
                anyhow::ensure!(
                    entry.containers.is_empty() && entry.account.is_none() && entry.access_key.is_none(),
                    "STORES_FILE {}: an s3 store names `buckets` and `access_key_id`; `containers`, `account` and `access_key` are an azure store's",
                    path.display()
                );
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
        self.check_new(bucket, &tenants)?;
        let (options, retry) = client(access, allow_http);
        let store = builder
            .with_bucket_name(bucket)
            .with_client_options(options)
            .with_retry(retry)
            .build()
            .map_err(|e| anyhow::anyhow!("the store of bucket `{bucket}`: {e}"))?;
        self.buckets.insert(bucket.to_owned(), Bucket { store: Arc::new(store), tenants });
        Ok(())
    }

    fn add_azure(
        &mut self,
        container: &str,
        tenants: Option<Vec<String>>,
        builder: MicrosoftAzureBuilder,
        allow_http: bool,
        access: Access,
    ) -> anyhow::Result<()> {
        anyhow::ensure!(is_container_name(container), "`{container}` is not an Azure container name");
        let name = format!("az://{container}");
        self.check_new(&name, &tenants)?;
        let (options, retry) = client(access, allow_http);
        let store = builder
            .with_container_name(container)
            .with_client_options(options)
            .with_retry(retry)
            .build()
            .map_err(|e| anyhow::anyhow!("the store of container `{container}`: {e}"))?;
        self.buckets.insert(name, Bucket { store: Arc::new(store), tenants });
        Ok(())
    }

    fn check_new(&self, name: &str, tenants: &Option<Vec<String>>) -> anyhow::Result<()> {
        for tenant in tenants.iter().flatten() {
            anyhow::ensure!(
                crate::auth::is_tenant_name(tenant),
                "`{name}` is granted to `{tenant}`, which is not a tenant name"
            );
        }
        anyhow::ensure!(!self.buckets.contains_key(name), "`{name}` is configured twice");
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

    /// Checks that `tenant` may read what `url` names (always, for a URL that names no object).
    pub fn check(&self, url: &Url, tenant: &str) -> Result<(), UnknownBucket> {
        match object_ref(url) {
            Some(object) => self.bucket(&object.bucket, tenant).map(|_| ()),
            // An object URL whose key the store could not read names nothing it may read.
            None if reefline_schemas::rules::is_object_scheme(url.scheme()) => Err(UnknownBucket {
                bucket: match url.scheme() {
                    "s3" => url.host_str().unwrap_or_default().to_owned(),
                    scheme => format!("{scheme}://{}", url.host_str().unwrap_or_default()),
                },
                readable: self.readable(tenant),
            }),
            None => Ok(()),
        }
    }
}

/// `name=team-a+team-b`: the name, and the tenants it is granted to (`None`: all).
fn split_grant(entry: &str) -> (&str, Option<Vec<String>>) {
    match entry.split_once('=') {
        Some((name, tenants)) => (name, Some(tenants.split('+').map(str::to_owned).collect())),
        None => (entry, None),
    }
}

/// A store's client: each request's timeouts, plain HTTP where the endpoint is, and retries.
fn client(access: Access, allow_http: bool) -> (ClientOptions, RetryConfig) {
    let options = ClientOptions::new()
        .with_connect_timeout(access.connect_timeout)
        .with_timeout(access.timeout)
        .with_allow_http(allow_http);
    let retry = RetryConfig {
        max_retries: access.retries,
        retry_timeout: access.timeout * (access.retries as u32 + 1),
        ..RetryConfig::default()
    };
    (options, retry)
}

/// The default Azure store: Azure's environment (its credential chain included), then the
/// settings over it.
fn default_azure_store(settings: &StoreSettings) -> MicrosoftAzureBuilder {
    let mut builder = MicrosoftAzureBuilder::from_env();
    if let Some(account) = &settings.azure_account {
        builder = builder.with_account(account);
    }
    if let Some(key) = &settings.azure_access_key {
        builder = builder.with_access_key(key.expose_secret());
    }
    if let Some(endpoint) = &settings.azure_endpoint {
        builder = builder.with_endpoint(endpoint.clone());
    }
    builder
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

    #[test]
    fn az_urls_name_a_container_and_a_blob() {
        let url = Url::parse("az://survey-photos/2026/site%20a/IMG_0001.JPG").unwrap();
        assert_eq!(reefline_schemas::rules::check_az_parts(&url), Ok(()));
        let object = object_ref(&url).unwrap();
        assert_eq!((object.bucket.as_str(), object.key.as_ref()), ("az://survey-photos", "2026/site a/IMG_0001.JPG"));
        assert_eq!(base_url(&object.bucket), "az://survey-photos");
        assert_eq!(base_url("reef-survey"), "s3://reef-survey");

        let refused = |raw: &str| reefline_schemas::rules::check_az_parts(&Url::parse(raw).unwrap()).unwrap_err();
        assert!(refused("az://survey-photos/").contains("names a container but no blob"));
        assert!(refused("az://survey--photos/x.jpg").contains("is not a container name"));
        assert!(refused("az://survey.photos/x.jpg").contains("is not a container name"));
        assert!(refused("az://survey-photos/x.jpg?sv=2021").contains("no port, query or fragment"));
        assert!(refused("az://survey-photos/a//x.jpg").contains("empty, `.` or `..` part"));
    }

    #[test]
    fn azure_containers_are_known_by_their_url_and_granted_like_buckets() {
        let file = std::env::temp_dir().join(format!("stores-{}.toml", std::process::id()));
        std::fs::write(
            &file,
            "[[store]]\nkind = \"azure\"\ncontainers = [\"team-photos\"]\naccount = \"reef\"\naccess_key = \"a2V5\"\ntenants = [\"team-a\"]\n",
        )
        .unwrap();
        let settings = StoreSettings {
            s3_buckets: vec!["open-survey".into()],
            azure_containers: vec!["survey-photos".into()],
            azure_account: Some("reef".into()),
            azure_access_key: Some("a2V5".to_owned().into()),
            stores_file: Some(file.clone()),
            region: "us-east-1".into(),
            ..Default::default()
        };
        let stores = Stores::new(&settings, access()).unwrap();
        assert_eq!(stores.readable("team-a"), ["az://survey-photos", "az://team-photos", "open-survey"]);
        assert_eq!(stores.readable("team-b"), ["az://survey-photos", "open-survey"]);
        let url = Url::parse("az://team-photos/x.jpg").unwrap();
        assert!(stores.check(&url, "team-a").is_ok());
        assert_eq!(stores.check(&url, "team-b").unwrap_err().bucket, "az://team-photos");
        // An S3 bucket of the same name is another store.
        assert!(stores.check(&Url::parse("s3://survey-photos/x.jpg").unwrap(), "team-a").is_err());

        for (entry, fault) in [
            ("kind = \"azure\"\ncontainers = [\"x-photos\"]", "has no `account`"),
            ("kind = \"gcs\"\nbuckets = [\"x-photos\"]", "is `s3` or `azure`, not `gcs`"),
            ("buckets = [\"x-photos\"]\naccount = \"reef\"", "are an azure store's"),
            ("kind = \"azure\"\naccount = \"reef\"\ncontainers = [\"x\"]\nregion = \"eu\"", "are an s3 store's"),
            ("endpoint = \"http://127.0.0.1:9\"", "names no `buckets`"),
        ] {
            std::fs::write(&file, format!("[[store]]\n{entry}\n")).unwrap();
            let error = Stores::new(&StoreSettings { stores_file: Some(file.clone()), ..Default::default() }, access())
                .err()
                .unwrap()
                .to_string();
            assert!(error.contains(fault), "{entry}: {error}");
        }
        let _ = std::fs::remove_file(file);
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
        assert!(refused.to_string().ends_with("none is configured (S3_BUCKETS, AZURE_CONTAINERS)"), "{refused}");
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
        let azure = "<Error><Code>AuthenticationFailed</Code><Message>Server failed to authenticate the request.\nRequestId:1\nTime:2026</Message></Error>";
        assert_eq!(summary(azure), " (AuthenticationFailed: Server failed to authenticate the request.)");
        let text = "Error performing GET http://127.0.0.1:1/b/k in 2ms - Server returned non-2xx status code: 503 Service Unavailable: ";
        assert_eq!(status_in(text), Some(503));
        assert_eq!(status_in("connection refused"), None);
    }
}
