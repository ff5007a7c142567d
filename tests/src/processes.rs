//! What the fault tests act on: services as processes they can kill, a TCP proxy they can cut,
//! and a reader that counts what a topic holds.

use std::net::SocketAddr;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use clap::ValueEnum;
use reefline_common::kafka::KafkaSettings;
use tokio::sync::watch;

/// A service running as its own process, so that a test can kill it with SIGKILL or SIGTERM.
/// Each process, restarts included, logs to a file of its own ([`ServiceProcess::log`]).
pub struct ServiceProcess {
    /// Behind a lock so that waiting for its address (`&self`) can see it exit.
    child: std::sync::Mutex<Child>,
    pid: u32,
    pub log: std::path::PathBuf,
}

/// Environment variables for a service process, beyond `RUST_LOG`.
pub type Env<'a> = &'a [(&'a str, &'a str)];

fn log_path(name: &str) -> std::path::PathBuf {
    static STARTED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = STARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    std::env::temp_dir().join(format!("reefline-{name}-{}-{n}.log", std::process::id()))
}

impl ServiceProcess {
    /// Starts the classifier command `bin` (an integration test passes
    /// `env!("CARGO_BIN_EXE_classifier-under-test")`) with the settings' topics, group, model and broker.
    pub fn classifier(bin: &str, s: &reefline_classifier::Settings, name: &str) -> Self {
        Self::classifier_with_env(bin, s, name, &[])
    }

    /// Like [`ServiceProcess::classifier`], with these environment variables set too.
    pub fn classifier_with_env(bin: &str, s: &reefline_classifier::Settings, name: &str, env: Env<'_>) -> Self {
        let mut command = Self::classifier_command(Command::new(bin), s);
        command.envs(env.iter().copied());
        Self::spawn(command, name)
    }

    /// Like [`ServiceProcess::classifier`], killed with SIGKILL as soon as its resident memory
    /// passes `bytes`, as a container's memory limit (the kernel's OOM killer) would.
    pub fn classifier_with_memory_limit(bin: &str, s: &reefline_classifier::Settings, name: &str, bytes: u64) -> Self {
        let process = Self::spawn(Self::classifier_command(Command::new(bin), s), name);
        let pid = process.pid;
        std::thread::spawn(move || {
            let status = format!("/proc/{pid}/status");
            while let Ok(text) = std::fs::read_to_string(&status) {
                if text.lines().any(|l| l.starts_with("State:") && l.contains("zombie")) {
                    return;
                }
                if rss_of(&text, "VmRSS:") > bytes {
                    let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
                    return;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        process
    }

    fn classifier_command(mut command: Command, s: &reefline_classifier::Settings) -> Command {
        command
            .args(["--listen", "127.0.0.1:0"])
            .args(["--requests-topic", &s.topics.requests, "--results-topic", &s.topics.results])
            .args(["--interactive-topic", &s.topics.interactive])
            .args(["--dead-letter-topic", &s.topics.dead_letter, "--group-id", &s.group_id])
            .args(["--topic-partitions", &s.topics.partitions.to_string()])
            .args(["--session-timeout-ms", &s.kafka.session_timeout_ms.to_string()])
            .args(["--max-batch-size", &s.max_batch_size.to_string()])
            .args(["--engines", &s.engines.to_string()])
            .args(["--bulk-decode", s.bulk_decode.to_possible_value().expect("named").get_name()])
            .arg("--models-manifest")
            .arg(&s.models.manifest)
            .arg("--models-dir")
            .arg(&s.models.dir)
            .args(["--models", &s.models.served.join(","), "--default-model", &s.models.default])
            .arg("--ort-dylib")
            .arg(&s.ort_dylib)
            .args(["--fetch-allow", &s.fetch_allow.join(",")])
            .args(["--database-url", s.database.url()])
            .args(["--result-cache", &s.result_cache.to_string()])
            .args([
                "--max-image-bytes",
                &s.max_image_bytes.to_string(),
                "--max-image-side",
                &s.max_image_side.to_string(),
            ])
            .args(["--max-image-pixels", &s.max_image_pixels.to_string()])
            .args(["--decode-pixel-budget", &s.decode_pixel_budget.to_string()])
            .args(["--delivery-limit", &s.delivery_limit.to_string()])
            .args(["--kafka-brokers", &s.kafka.brokers, "--schema-registry-url", &s.registry.url]);
        command
    }

    /// Starts the sink command `bin` (`env!("CARGO_BIN_EXE_sink-under-test")`) with the settings'
    /// database, topics, group and broker, on a port it chooses ([`ServiceProcess::address`]).
    pub fn sink(bin: &str, s: &reefline_sink::Settings, name: &str) -> Self {
        Self::sink_with_env(bin, s, name, &[])
    }

    /// Like [`ServiceProcess::sink`], with these environment variables set too.
    pub fn sink_with_env(bin: &str, s: &reefline_sink::Settings, name: &str, env: Env<'_>) -> Self {
        let mut command = Command::new(bin);
        command.envs(env.iter().copied());
        command
            .args(["--listen", "127.0.0.1:0", "--database-url", s.database.url()])
            .args(["--results-topic", &s.topics.results, "--dead-letter-topic", &s.topics.dead_letter])
            .args(["--topic-partitions", &s.topics.partitions.to_string(), "--group-id", &s.group_id])
            .args(["--requests-topic", &s.topics.requests, "--requests-group-id", &s.requests_group_id])
            .args(["--interactive-topic", &s.topics.interactive])
            .args(["--session-timeout-ms", &s.kafka.session_timeout_ms.to_string()])
            .args(["--kafka-brokers", &s.kafka.brokers, "--schema-registry-url", &s.registry.url])
            .arg("--models-manifest")
            .arg(&s.models.manifest)
            .arg("--models-dir")
            .arg(&s.models.dir);
        Self::spawn(command, name)
    }

    /// Starts the ingest command `bin` (`env!("CARGO_BIN_EXE_ingest-under-test")`) with the
    /// settings' topics, database, broker and registry, on a port it chooses ([`ServiceProcess::address`]).
    pub fn ingest(bin: &str, s: &reefline_ingest::Settings, name: &str) -> Self {
        Self::ingest_with_env(bin, s, name, &[])
    }

    /// Like [`ServiceProcess::ingest`], with these environment variables set too.
    pub fn ingest_with_env(bin: &str, s: &reefline_ingest::Settings, name: &str, env: Env<'_>) -> Self {
        let mut command = Command::new(bin);
        command.envs(env.iter().copied());
        command
            .args(["--listen", "127.0.0.1:0", "--database-url", s.database.url()])
            .args(["--requests-topic", &s.topics.requests, "--results-topic", &s.topics.results])
            .args(["--interactive-topic", &s.topics.interactive])
            .args(["--topic-partitions", &s.topics.partitions.to_string()])
            .arg("--models-manifest")
            .arg(&s.models.manifest)
            .arg("--models-dir")
            .arg(&s.models.dir)
            .args(["--models", &s.models.served.join(","), "--default-model", &s.models.default])
            .args(["--kafka-brokers", &s.kafka.brokers, "--schema-registry-url", &s.registry.url]);
        Self::spawn(command, name)
    }

    /// The process's resident memory at its peak so far (VmHWM), in bytes.
    pub fn peak_rss(&self) -> u64 {
        rss_of(&std::fs::read_to_string(format!("/proc/{}/status", self.pid)).unwrap_or_default(), "VmHWM:")
    }

    fn spawn(mut command: Command, name: &str) -> Self {
        let path = log_path(name);
        let log = std::fs::File::create(&path).expect("log file");
        let child = command
            .env("RUST_LOG", "info")
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .expect("starting a service process");
        Self { pid: child.id(), child: std::sync::Mutex::new(child), log: path }
    }

    /// What the process has logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The address the process reports in its first log line containing `marker` and `addr=`
    /// (e.g. "sink listening"), once it has logged it.
    pub async fn address(&self, marker: &str) -> String {
        let log = self.log.display().to_string();
        crate::wait_for(&format!("`{marker}` in {log}"), Duration::from_secs(60), || async {
            let text = self.log_text();
            let address = text
                .lines()
                .filter(|l| l.contains(marker))
                .find_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix("addr=")).map(str::to_owned));
            // A process that exits before saying it (a refused setting, say) fails the test at
            // once, with what it logged, rather than after the whole wait.
            if address.is_none()
                && let Ok(Some(status)) = self.child.lock().expect("child lock").try_wait()
            {
                panic!("the process exited ({status}) before logging `{marker}`; {log}:\n{text}");
            }
            address
        })
        .await
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.get_mut().expect("child lock").try_wait(), Ok(None))
    }

    /// SIGKILL: no draining, no commit.
    pub fn kill(mut self) {
        let child = self.child.get_mut().expect("child lock");
        let _ = child.kill();
        let _ = child.wait();
    }

    /// SIGTERM, then waits for the process to exit; returns how long that took.
    pub fn terminate(self) -> Duration {
        self.terminate_with_status().0
    }

    /// SIGTERM, then waits for the process to exit: how long that took, and whether it exited 0.
    pub fn terminate_with_status(mut self) -> (Duration, bool) {
        let started = Instant::now();
        let _ = Command::new("kill").args(["-TERM", &self.pid.to_string()]).status();
        let exited = self.child.get_mut().expect("child lock").wait().is_ok_and(|status| status.success());
        (started.elapsed(), exited)
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        let child = self.child.get_mut().unwrap_or_else(std::sync::PoisonError::into_inner);
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// A size in bytes from the text of `/proc/PID/status` (`field` is `VmRSS:` or `VmHWM:`).
fn rss_of(status: &str, field: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// A TCP proxy in front of `target` that a test can cut (every connection dropped, new ones
/// closed at once, as when a server is down) and restore.
pub struct TcpProxy {
    pub addr: SocketAddr,
    up: watch::Sender<bool>,
}

impl TcpProxy {
    pub async fn start(target: &str) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("binding the proxy");
        let addr = listener.local_addr().expect("address");
        let (up, up_rx) = watch::channel(true);
        let target = target.to_owned();
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let mut up = up_rx.clone();
                if !*up.borrow_and_update() {
                    continue;
                }
                let target = target.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await else { return };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = up.wait_for(|up| !*up) => {}
                    }
                });
            }
        });
        Self { addr, up }
    }

    /// Drops every connection and refuses new ones until [`TcpProxy::restore`].
    pub fn cut(&self) {
        self.up.send_replace(false);
    }

    pub fn restore(&self) {
        self.up.send_replace(true);
    }
}

/// Reads `topic` from the start to its current end: (records, distinct keys).
pub async fn topic_counts(kafka: &KafkaSettings, topic: &str) -> (usize, usize) {
    let (kafka, topic) = (kafka.clone(), topic.to_owned());
    tokio::task::spawn_blocking(move || read_topic_counts(&kafka, &topic)).await.expect("counting task")
}

fn read_topic_counts(kafka: &KafkaSettings, topic: &str) -> (usize, usize) {
    use rdkafka::Message;
    use rdkafka::consumer::{BaseConsumer, Consumer};

    let group = format!("counter-{}", uuid::Uuid::now_v7().simple());
    let consumer: BaseConsumer = kafka.consumer_config(&group).create().expect("counting consumer");
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10)).expect("topic metadata");
    let mut ends = std::collections::HashMap::new();
    let mut assignment = rdkafka::TopicPartitionList::new();
    for partition in metadata.topics()[0].partitions() {
        let (_, high) = consumer.fetch_watermarks(topic, partition.id(), Duration::from_secs(10)).expect("watermarks");
        if high > 0 {
            ends.insert(partition.id(), high);
            assignment.add_partition_offset(topic, partition.id(), rdkafka::Offset::Beginning).expect("partition");
        }
    }
    consumer.assign(&assignment).expect("assigning");
    let (mut records, mut keys) = (0, std::collections::HashSet::new());
    let deadline = Instant::now() + Duration::from_secs(120);
    while !ends.is_empty() {
        assert!(Instant::now() < deadline, "timed out reading {topic}");
        let Some(message) = consumer.poll(Duration::from_millis(200)) else { continue };
        let message = message.expect("reading the topic");
        records += 1;
        keys.insert(message.key().map(<[u8]>::to_vec));
        if ends.get(&message.partition()).is_some_and(|end| message.offset() + 1 >= *end) {
            ends.remove(&message.partition());
        }
    }
    (records, keys.len())
}

/// How many records `topic` holds, from its partitions' watermarks (no record is read).
pub async fn topic_size(kafka: &KafkaSettings, topic: &str) -> i64 {
    let (kafka, topic) = (kafka.clone(), topic.to_owned());
    tokio::task::spawn_blocking(move || {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        let group = format!("sizer-{}", uuid::Uuid::now_v7().simple());
        let consumer: BaseConsumer = kafka.consumer_config(&group).create().expect("consumer");
        let metadata = consumer.fetch_metadata(Some(&topic), Duration::from_secs(10)).expect("topic metadata");
        metadata.topics()[0]
            .partitions()
            .iter()
            .map(|p| {
                let (low, high) =
                    consumer.fetch_watermarks(&topic, p.id(), Duration::from_secs(10)).expect("watermarks");
                high - low
            })
            .sum()
    })
    .await
    .expect("sizing task")
}

/// A TLS-terminating proxy in front of `target`, as a managed Kafka's TLS listener is to a client:
/// it presents a self-signed certificate for 127.0.0.1 (made with the system's `openssl`), whose
/// PEM is at [`TlsProxy::ca`] for clients to trust.
pub struct TlsProxy {
    pub addr: SocketAddr,
    pub ca: std::path::PathBuf,
    target: std::sync::Arc<std::sync::Mutex<String>>,
    folder: std::path::PathBuf,
}

impl TlsProxy {
    /// Starts the proxy; it forwards to nothing until [`TlsProxy::point_at`].
    pub async fn start() -> Self {
        let folder = std::env::temp_dir().join(format!("reefline-tls-{}", uuid::Uuid::now_v7().simple()));
        std::fs::create_dir_all(&folder).expect("certificate folder");
        let (cert, key) = (folder.join("cert.pem"), folder.join("key.pem"));
        let made = Command::new("openssl")
            .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1"])
            .args(["-addext", "subjectAltName=IP:127.0.0.1", "-keyout"])
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .output()
            .expect("running openssl");
        assert!(made.status.success(), "openssl: {}", String::from_utf8_lossy(&made.stderr));
        let identity = native_tls::Identity::from_pkcs8(&std::fs::read(&cert).unwrap(), &std::fs::read(&key).unwrap())
            .expect("TLS identity");
        let acceptor = tokio_native_tls::TlsAcceptor::from(native_tls::TlsAcceptor::new(identity).expect("acceptor"));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("binding the TLS proxy");
        let addr = listener.local_addr().expect("address");
        let target = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let forward_to = target.clone();
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let target = forward_to.lock().expect("target lock").clone();
                tokio::spawn(async move {
                    let Ok(mut inbound) = acceptor.accept(inbound).await else { return };
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await else { return };
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                });
            }
        });
        Self { addr, ca: cert, target, folder }
    }

    /// Forwards new connections to `target`.
    pub fn point_at(&self, target: &str) {
        *self.target.lock().expect("target lock") = target.to_owned();
    }
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.folder);
    }
}

/// The sum over `topic`'s partitions of the offsets `group` has committed (0 where none), read
/// without joining the group.
pub async fn committed_offsets(kafka: &KafkaSettings, group: &str, topic: &str) -> i64 {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let (kafka, group, topic) = (kafka.clone(), group.to_owned(), topic.to_owned());
    tokio::task::spawn_blocking(move || {
        let mut config = kafka.consumer_config(&group);
        config.set("enable.auto.commit", "false");
        let consumer: BaseConsumer = config.create().expect("offsets consumer");
        let metadata = consumer.fetch_metadata(Some(&topic), Duration::from_secs(10)).expect("topic metadata");
        let mut partitions = rdkafka::TopicPartitionList::new();
        for partition in metadata.topics()[0].partitions() {
            partitions.add_partition(&topic, partition.id());
        }
        let committed = consumer.committed_offsets(partitions, Duration::from_secs(10)).expect("committed offsets");
        committed.elements().iter().filter_map(|e| e.offset().to_raw()).filter(|&o| o > 0).sum()
    })
    .await
    .expect("offsets task")
}
