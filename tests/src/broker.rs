//! The broker the tests run against: a real nisshi process on a free port.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use reefline_common::kafka::KafkaSettings;

use crate::{cache_dir, free_port, wait_for};

/// A nisshi broker process, killed when dropped.
pub struct Broker {
    child: Child,
    pub addr: String,
    /// The address clients are told to connect to, when not `addr`.
    advertised: Option<String>,
    /// Where the broker keeps its sqlite database.
    data: PathBuf,
}

impl Broker {
    /// Starts a broker on a free port with the local stack's storage, durable sqlite, in a fresh
    /// temporary folder (so that [`Broker::restart`] keeps its topics, records and committed
    /// offsets), and waits until it accepts connections.
    pub async fn start() -> Self {
        Self::start_advertising(None).await
    }

    /// Like [`Broker::start`], but telling clients to connect to `advertised` (a proxy in front
    /// of it, say) instead of its own address.
    pub async fn start_advertising(advertised: Option<&str>) -> Self {
        let data = std::env::temp_dir().join(format!("reefline-broker-{}", uuid::Uuid::now_v7().simple()));
        std::fs::create_dir_all(&data).expect("broker data folder");
        let addr = format!("127.0.0.1:{}", free_port());
        let child = Self::spawn(&addr, advertised.unwrap_or(&addr), &data);
        let broker = Self { child, addr, advertised: advertised.map(str::to_owned), data };
        broker.wait_listening().await;
        broker
    }

    fn spawn(addr: &str, advertised: &str, data: &Path) -> Child {
        let bin =
            std::env::var_os("NISSHI_BIN").map(PathBuf::from).unwrap_or_else(|| cache_dir().join("tools/bin/nisshi"));
        assert!(bin.exists(), "{} is missing: run `make setup` (or `make test`) first", bin.display());
        let (url, advertised) = (format!("tcp://{addr}"), format!("tcp://{advertised}"));
        // A shell keeps the broker on a leash: when this process goes, however it goes, the pipe on
        // the shell's stdin closes and the shell kills the broker.
        let leash = r#""$0" "$@" & broker=$!; read -r _; kill -9 "$broker"; wait "$broker""#;
        // nisshi reads a sqlite path relative to its working directory.
        Command::new("sh")
            .args(["-c", leash])
            .arg(&bin)
            .args(["broker", "--listener-url", &url, "--advertised-listener-url", &advertised])
            .args(["--storage-engine", "sqlite://broker.db"])
            .current_dir(data)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting nisshi")
    }

    async fn wait_listening(&self) {
        wait_for("the broker to listen", Duration::from_secs(30), || {
            let addr = self.addr.clone();
            async move { tokio::net::TcpStream::connect(&addr).await.ok().map(drop) }
        })
        .await;
    }

    /// SIGKILLs the broker and waits until it is gone.
    fn kill(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }

    /// SIGKILLs the broker and starts it again on the same address and storage; returns once it
    /// accepts connections, after about `down` without a broker.
    pub async fn restart(&mut self, down: Duration) {
        self.kill();
        tokio::time::sleep(down).await;
        self.child = Self::spawn(&self.addr, self.advertised.as_deref().unwrap_or(&self.addr), &self.data);
        self.wait_listening().await;
    }

    /// SIGKILLs the broker; [`Broker::restart`] brings it back.
    pub fn stop(&mut self) {
        self.kill();
    }

    pub fn kafka(&self) -> KafkaSettings {
        KafkaSettings::new(self.addr.clone())
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        // A failing test unwinds before its services stop; killing the broker under them would
        // make their Kafka clients wait on close. The broker goes when the test process does.
        if std::thread::panicking() {
            // Dropping the child would close the leash's stdin and kill it all the same.
            std::mem::forget(self.child.stdin.take());
            return;
        }
        self.kill();
        let _ = std::fs::remove_dir_all(&self.data);
    }
}
