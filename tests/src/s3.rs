//! A real S3 API on loopback for the object-storage tests: moto's server (`tests/s3_server.py`, in
//! the venv `make setup-tests` makes), with the buckets and objects a test asks for, and a user whose
//! key it checks on every request.

use std::process::Stdio;
use std::time::Duration;

use reefline_common::objects::StoreSettings;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};

use crate::cache_dir;

/// A running S3 server; stopped when dropped.
pub struct S3Server {
    pub endpoint: String,
    pub access_key_id: String,
    pub secret_access_key: String,
    _child: Child,
    /// Closed when dropped: the server's cue to stop.
    _stdin: ChildStdin,
}

impl S3Server {
    /// Starts the server and fills it as `plan` says (see `tests/s3_server.py`).
    pub async fn start(plan: serde_json::Value) -> Self {
        let python = cache_dir().join("venv-moto/bin/python");
        assert!(python.exists(), "{} is missing: run `make setup-tests` first", python.display());
        let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("s3_server.py");
        let mut child = Command::new(python)
            .arg(script)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("starting the S3 server");
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(format!("{plan}\n").as_bytes()).await.expect("writing the plan");
        stdin.flush().await.expect("writing the plan");
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let line = tokio::time::timeout(Duration::from_secs(120), lines.next_line())
            .await
            .expect("the S3 server was not ready within 120 s")
            .expect("reading the S3 server")
            .expect("the S3 server stopped before it was ready");
        let ready: serde_json::Value = serde_json::from_str(&line).expect("the S3 server's line");
        let text = |k: &str| ready[k].as_str().expect("a string").to_owned();
        Self {
            endpoint: text("endpoint"),
            access_key_id: text("access_key_id"),
            secret_access_key: text("secret_access_key"),
            _child: child,
            _stdin: stdin,
        }
    }

    /// Store settings naming `buckets` on this server, with its user's key.
    pub fn stores(&self, buckets: &[&str]) -> StoreSettings {
        StoreSettings {
            s3_buckets: buckets.iter().map(|b| b.to_string()).collect(),
            endpoint: Some(self.endpoint.clone()),
            region: "us-east-1".into(),
            access_key_id: Some(self.access_key_id.clone().into()),
            secret_access_key: Some(self.secret_access_key.clone().into()),
            ..StoreSettings::default()
        }
    }
}
