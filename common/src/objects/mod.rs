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
use std::sync::Arc;
use std::time::Duration;

use object_store::aws::AmazonS3Builder;
use object_store::azure::MicrosoftAzureBuilder;
use object_store::path::Path;
use object_store::{ClientOptions, ObjectStore, RetryConfig};
use reefline_schemas::rules::{is_bucket_name, is_container_name};
use url::Url;

mod failure;
mod settings;

pub use failure::Failure;
pub use settings::StoreSettings;
use settings::{default_azure_store, default_store, grants, is_http};

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
    let bucket = bucket_key(url.scheme(), url.host_str()?)?;
    let key = Path::from_url_path(url.path()).ok()?;
    Some(ObjectRef { bucket, key })
}

/// How the stores know the bucket or container `name` of an object URL's `scheme`: an S3 bucket by
/// its name, an Azure container by `az://` and its name; `None` for a scheme that names no object.
pub fn bucket_key(scheme: &str, name: &str) -> Option<String> {
    match scheme {
        "s3" => Some(name.to_owned()),
        "az" => Some(format!("az://{name}")),
        _ => None,
    }
}

/// The URL of the top of a bucket (`s3://reef-survey`) or container (`az://survey-photos`), as
/// [`ObjectRef::bucket`] names it.
pub fn base_url(bucket: &str) -> String {
    if bucket.contains("://") { bucket.to_owned() } else { format!("s3://{bucket}") }
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
            let (base, http) = (default_store(settings), is_http(settings.endpoint.as_deref()));
            for (bucket, tenants) in grants(&settings.s3_buckets) {
                stores.add(bucket, tenants, base.clone(), http, access)?;
            }
        }
        if !settings.azure_containers.is_empty() {
            let (base, http) = (default_azure_store(settings), is_http(settings.azure_endpoint.as_deref()));
            for (container, tenants) in grants(&settings.azure_containers) {
                stores.add_azure(container, tenants, base.clone(), http, access)?;
            }
        }
        if let Some(path) = &settings.stores_file {
            stores.add_file(path, access)?;
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
        let name = bucket_key("az", container).expect("az is an object scheme");
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
            None => match bucket_key(url.scheme(), url.host_str().unwrap_or_default()) {
                Some(bucket) => Err(UnknownBucket { bucket, readable: self.readable(tenant) }),
                None => Ok(()),
            },
        }
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
}
