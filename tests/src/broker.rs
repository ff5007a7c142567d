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
    /// Where a durable broker keeps its sqlite database (`None`: in memory).
    data: Option<PathBuf>,
}

impl Broker {
    /// Starts a broker with in-memory storage on a free port and waits until it accepts connections.
    pub async fn start() -> Self {
        Self::launch(format!("127.0.0.1:{}", free_port()), None).await
    }

    /// Starts a broker with durable sqlite storage in a fresh temporary folder, so that it can
    /// be restarted ([`Broker::restart`]) with its topics, records and committed offsets.
    pub async fn start_durable() -> Self {
        let data = std::env::temp_dir().join(format!("reefline-broker-{}", uuid::Uuid::now_v7().simple()));
        std::fs::create_dir_all(&data).expect("broker data folder");
        Self::launch(format!("127.0.0.1:{}", free_port()), Some(data)).await
    }

    async fn launch(addr: String, data: Option<PathBuf>) -> Self {
        let child = Self::spawn(&addr, data.as_deref());
        let broker = Self { child, addr, data };
        broker.wait_listening().await;
        broker
    }

    fn spawn(addr: &str, data: Option<&Path>) -> Child {
        let bin =
            std::env::var_os("NISSHI_BIN").map(PathBuf::from).unwrap_or_else(|| cache_dir().join("tools/bin/nisshi"));
        assert!(bin.exists(), "{} is missing: run `make setup` (or `make test`) first", bin.display());
        let url = format!("tcp://{addr}");
        // A shell keeps the broker on a leash: when this process goes, however it goes, the pipe on
        // the shell's stdin closes and the shell kills the broker.
        let leash = r#""$0" "$@" & broker=$!; read -r _; kill -9 "$broker"; wait "$broker""#;
        // nisshi reads a sqlite path relative to its working directory.
        let storage = if data.is_some() { "sqlite://broker.db" } else { "memory://reefline/" };
        let mut command = Command::new("sh");
        command
            .args(["-c", leash])
            .arg(&bin)
            .args(["broker", "--listener-url", &url, "--advertised-listener-url", &url, "--storage-engine", storage])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(data) = data {
            command.current_dir(data);
        }
        command.spawn().expect("starting nisshi")
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
    /// accepts connections, after about `down` without a broker. Only a durable broker keeps its data.
    pub async fn restart(&mut self, down: Duration) {
        self.kill();
        tokio::time::sleep(down).await;
        self.child = Self::spawn(&self.addr, self.data.as_deref());
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
            return;
        }
        self.kill();
        if let Some(data) = &self.data {
            let _ = std::fs::remove_dir_all(data);
        }
    }
}
