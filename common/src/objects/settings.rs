//! The stores' settings: the default S3 and Azure stores from the variables their own tools read,
//! and more stores from the operator's `STORES_FILE`.

use std::path::{Path, PathBuf};

use object_store::aws::AmazonS3Builder;
use object_store::azure::MicrosoftAzureBuilder;
use secrecy::{ExposeSecret, SecretString};

use super::{Access, Stores};

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

impl StoreEntry {
    /// An S3 store's client builder; what is wrong with the entry otherwise.
    fn s3(&self) -> Result<AmazonS3Builder, String> {
        if self.buckets.is_empty() {
            return Err("a store names no `buckets` (or `containers`, with kind = \"azure\")".into());
        }
        if !self.containers.is_empty() || self.account.is_some() || self.access_key.is_some() {
            return Err("an s3 store names `buckets` and `access_key_id`; `containers`, `account` and `access_key` are an azure store's".into());
        }
        let mut builder = AmazonS3Builder::new().with_region(self.region.as_deref().unwrap_or("us-east-1"));
        if let Some(endpoint) = &self.endpoint {
            builder = builder.with_endpoint(endpoint);
        }
        match (&self.access_key_id, &self.secret_access_key) {
            (Some(id), Some(secret)) => {
                builder = builder.with_access_key_id(id).with_secret_access_key(secret);
                if let Some(token) = &self.session_token {
                    builder = builder.with_token(token);
                }
            }
            (None, None) => builder = builder.with_skip_signature(self.endpoint.is_some()),
            _ => return Err("a store has one of access_key_id and secret_access_key without the other".into()),
        }
        Ok(builder)
    }

    /// An Azure store's client builder; what is wrong with the entry otherwise.
    fn azure(&self) -> Result<MicrosoftAzureBuilder, String> {
        let account = self.account.as_deref().ok_or("an azure store has no `account`")?;
        let s3_fields = !self.buckets.is_empty()
            || self.region.is_some()
            || self.access_key_id.is_some()
            || self.secret_access_key.is_some()
            || self.session_token.is_some();
        if s3_fields || self.containers.is_empty() {
            return Err("an azure store names `containers`, and optionally `access_key`; `buckets`, `region`, `access_key_id`, `secret_access_key` and `session_token` are an s3 store's".into());
        }
        let mut builder = MicrosoftAzureBuilder::new().with_account(account);
        if let Some(key) = &self.access_key {
            builder = builder.with_access_key(key);
        }
        if let Some(endpoint) = &self.endpoint {
            builder = builder.with_endpoint(endpoint.clone());
        }
        Ok(builder)
    }
}

impl Stores {
    /// Adds the stores `path` (a `STORES_FILE`) names.
    pub(super) fn add_file(&mut self, path: &Path, access: Access) -> anyhow::Result<()> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("reading STORES_FILE {}: {e}", path.display()))?;
        // Only the message and the line: the error's own text quotes the line, a secret perhaps.
        let file: StoresFile = toml::from_str(&text).map_err(|e| {
            let line = e.span().map(|span| text[..span.start.min(text.len())].lines().count().max(1));
            let at = line.map(|l| format!(" (line {l})")).unwrap_or_default();
            anyhow::anyhow!("STORES_FILE {}{at}: {}", path.display(), e.message())
        })?;
        let fault = |message: String| anyhow::anyhow!("STORES_FILE {}: {message}", path.display());
        for entry in file.store {
            let http = is_http(entry.endpoint.as_deref());
            match entry.kind.as_deref().unwrap_or("s3") {
                "s3" => {
                    let builder = entry.s3().map_err(fault)?;
                    for bucket in &entry.buckets {
                        self.add(bucket, entry.tenants.clone(), builder.clone(), http, access)?;
                    }
                }
                "azure" => {
                    let builder = entry.azure().map_err(fault)?;
                    for container in &entry.containers {
                        self.add_azure(container, entry.tenants.clone(), builder.clone(), http, access)?;
                    }
                }
                other => return Err(fault(format!("a store's kind is `s3` or `azure`, not `{other}`"))),
            }
        }
        Ok(())
    }
}

/// The entries of a list setting (`name` or `name=team-a+team-b`), blank ones left out: each name,
/// and the tenants it is granted to (`None`: all).
pub(super) fn grants(entries: &[String]) -> impl Iterator<Item = (&str, Option<Vec<String>>)> {
    entries.iter().map(|e| e.trim()).filter(|e| !e.is_empty()).map(|entry| match entry.split_once('=') {
        Some((name, tenants)) => (name, Some(tenants.split('+').map(str::to_owned).collect())),
        None => (entry, None),
    })
}

/// Whether an endpoint is plain HTTP (a store on a private network, or on loopback in the tests).
pub(super) fn is_http(endpoint: Option<&str>) -> bool {
    endpoint.is_some_and(|e| e.starts_with("http://"))
}

/// The default store: AWS's environment (credential chain included), then the settings over it.
pub(super) fn default_store(settings: &StoreSettings) -> AmazonS3Builder {
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

/// The default Azure store: Azure's environment (its credential chain included), then the
/// settings over it.
pub(super) fn default_azure_store(settings: &StoreSettings) -> MicrosoftAzureBuilder {
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
