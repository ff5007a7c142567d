//! A real Azure Blob API on loopback for the object-storage tests: Microsoft's Azurite emulator
//! (`tests/azurite`, installed by `make setup-tests`), in memory, with a storage account of the test's
//! own whose key it checks on every request, and the containers and blobs a test asks for.

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use object_store::ObjectStore;
use object_store::azure::MicrosoftAzureBuilder;
use reefline_common::objects::StoreSettings;
use sha2::Sha256;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// The storage account the server knows.
pub const ACCOUNT: &str = "reefline";

/// A running Azure Blob server; stopped when dropped.
pub struct AzureServer {
    /// The blob endpoint with the account in its path, as an emulator is addressed.
    pub endpoint: String,
    /// The account's key (base64).
    pub key: String,
    _child: Child,
}

impl AzureServer {
    /// Starts Azurite on a free port with an account whose key is made for this server.
    pub async fn start() -> Self {
        let bin = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("azurite/node_modules/.bin/azurite-blob");
        assert!(bin.exists(), "{} is missing: run `make setup-tests` first", bin.display());
        let key = STANDARD.encode(uuid::Uuid::now_v7().as_bytes().repeat(4));
        let mut child = Command::new(bin)
            .args(["--blobHost", "127.0.0.1", "--blobPort", "0", "--inMemoryPersistence"])
            .args(["--skipApiVersionCheck", "--disableTelemetry"])
            .env("AZURITE_ACCOUNTS", format!("{ACCOUNT}:{key}"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("starting Azurite");
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let listening = tokio::time::timeout(Duration::from_secs(120), async {
            while let Some(line) = lines.next_line().await.expect("reading Azurite") {
                if let Some(url) = line.split("successfully listens on ").nth(1) {
                    return url.trim().to_owned();
                }
            }
            panic!("Azurite stopped before it listened");
        })
        .await
        .expect("Azurite did not listen within 120 s");
        // The rest of its output is read and dropped, so that it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Self { endpoint: format!("{listening}/{ACCOUNT}"), key, _child: child }
    }

    /// Creates a container (Azure's Create Container, signed with the account's key).
    pub async fn create_container(&self, name: &str) {
        let date = chrono::Utc::now().format("%a, %d %b %Y %H:%M:%S GMT").to_string();
        let version = "2021-08-06";
        // Shared Key: the verb, eleven empty standard headers, the x-ms- headers, the resource.
        let to_sign = format!(
            "PUT\n\n\n\n\n\n\n\n\n\n\n\nx-ms-date:{date}\nx-ms-version:{version}\n/{ACCOUNT}/{ACCOUNT}/{name}\nrestype:container"
        );
        let mut mac = Hmac::<Sha256>::new_from_slice(&STANDARD.decode(&self.key).unwrap()).unwrap();
        mac.update(to_sign.as_bytes());
        let signature = STANDARD.encode(mac.finalize().into_bytes());
        let response = reqwest::Client::new()
            .put(format!("{}/{name}?restype=container", self.endpoint))
            .header("x-ms-date", date)
            .header("x-ms-version", version)
            .header("authorization", format!("SharedKey {ACCOUNT}:{signature}"))
            .header("content-length", "0")
            .send()
            .await
            .expect("creating a container");
        assert_eq!(response.status(), 201, "creating container {name}: {}", response.text().await.unwrap_or_default());
    }

    /// A client of `container` with the account's key, to fill it.
    pub fn container(&self, container: &str) -> Arc<dyn ObjectStore> {
        let store = MicrosoftAzureBuilder::new()
            .with_account(ACCOUNT)
            .with_access_key(&self.key)
            .with_endpoint(self.endpoint.clone())
            .with_container_name(container)
            .with_client_options(object_store::ClientOptions::new().with_allow_http(true))
            .build()
            .expect("an Azure client");
        Arc::new(store)
    }

    /// Store settings naming `containers` on this server, with the account's key.
    pub fn stores(&self, containers: &[&str]) -> StoreSettings {
        StoreSettings {
            azure_containers: containers.iter().map(|c| c.to_string()).collect(),
            azure_account: Some(ACCOUNT.into()),
            azure_access_key: Some(self.key.clone().into()),
            azure_endpoint: Some(self.endpoint.clone()),
            ..StoreSettings::default()
        }
    }
}
