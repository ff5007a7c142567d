//! The end-to-end harness: a real broker process (nisshi), the local Schema Registry, a fresh
//! Postgres database, a local HTTP server for the photos, and the three services in-process, all
//! on ports chosen by the OS.

use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::Path as UrlPath;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use reefline_classifier::engine::Engine;
use reefline_common::kafka::KafkaSettings;
use reefline_schemas::RegistrySettings;
use tokio::sync::watch;

pub mod workload;

/// The workspace's cache folder (`REEFLINE_CACHE`, else `.cache/` at the workspace root).
pub fn cache_dir() -> PathBuf {
    std::env::var_os("REEFLINE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.cache"))
}

fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

/// Polls `check` until it returns `Some`, or panics after `timeout` naming `what`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

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

/// Serves `router` on a free port in the background; returns its address.
pub async fn serve(router: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("binding");
    let addr = listener.local_addr().expect("address");
    tokio::spawn(async move { axum::serve(listener, router).await });
    addr
}

/// Starts the local Schema Registry in memory; returns its settings.
pub async fn start_registry() -> RegistrySettings {
    let addr = serve(reefline_schemas::registry::Registry::in_memory().router()).await;
    RegistrySettings::new(format!("http://{addr}"))
}

/// Serves the cached photos at `/photos/{name}`, an HTML page at `/page.jpg`, a redirect to the
/// cloud metadata address at `/to-metadata.jpg`, `/flaky/{name}` that answers 503 the first time,
/// `/always-503.jpg`, and 404 elsewhere.
pub async fn start_photo_server() -> String {
    let dir = cache_dir().join("photos");
    let flaky_dir = dir.clone();
    let failed_once = std::sync::Arc::new(std::sync::Mutex::new(std::collections::HashSet::<String>::new()));
    assert!(dir.join("chelsea.png").exists(), "{} has no photos: run `make setup` first", dir.display());
    let router = Router::new()
        .route(
            "/photos/{name}",
            axum::routing::get(move |UrlPath(name): UrlPath<String>| {
                let dir = dir.clone();
                async move {
                    match tokio::fs::read(dir.join(name.replace('/', ""))).await {
                        Ok(bytes) => (StatusCode::OK, [(header::CONTENT_TYPE, "image/jpeg")], bytes).into_response(),
                        Err(_) => StatusCode::NOT_FOUND.into_response(),
                    }
                }
            }),
        )
        .route(
            "/flaky/{name}",
            axum::routing::get(move |UrlPath(name): UrlPath<String>| {
                let (dir, failed_once) = (flaky_dir.clone(), failed_once.clone());
                async move {
                    if failed_once.lock().expect("lock").insert(name.clone()) {
                        return StatusCode::SERVICE_UNAVAILABLE.into_response();
                    }
                    match tokio::fs::read(dir.join(name.replace('/', ""))).await {
                        Ok(bytes) => (StatusCode::OK, bytes).into_response(),
                        Err(_) => StatusCode::NOT_FOUND.into_response(),
                    }
                }
            }),
        )
        .route("/always-503.jpg", axum::routing::get(|| async { StatusCode::SERVICE_UNAVAILABLE }))
        .route(
            "/to-metadata.jpg",
            axum::routing::get(|| async {
                (StatusCode::FOUND, [(header::LOCATION, "http://169.254.169.254/latest/meta-data/")])
            }),
        )
        .route(
            "/page.jpg",
            axum::routing::get(|| async {
                ([(header::CONTENT_TYPE, "image/jpeg")], "<html><body>not an image</body></html>")
            }),
        );
    format!("http://{}", serve(router).await)
}

/// The 20 labelled foolbox photos: (file name, ImageNet class index).
pub fn foolbox_photos() -> Vec<(String, usize)> {
    let mut photos: Vec<(String, usize)> = std::fs::read_dir(cache_dir().join("photos"))
        .expect("photos folder")
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .filter_map(|name| {
            let stem = name.strip_prefix("imagenet_")?.strip_suffix(".jpg")?;
            let class = stem.split('_').nth(1)?.parse().ok()?;
            Some((name, class))
        })
        .collect();
    photos.sort();
    photos
}

/// A database of its own for one test, dropped by [`TestDatabase::drop_database`].
pub struct TestDatabase {
    pub url: String,
}

impl TestDatabase {
    pub fn new() -> Self {
        let base = std::env::var("TEST_DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into());
        Self { url: format!("{}/reefline_test_{}", base.trim_end_matches('/'), uuid::Uuid::now_v7().simple()) }
    }

    /// The database server's `host:port`.
    pub fn server(&self) -> String {
        let url = reqwest::Url::parse(&self.url).expect("database URL");
        format!("{}:{}", url.host_str().unwrap_or("127.0.0.1"), url.port().unwrap_or(5432))
    }

    /// The database's URL with its host and port replaced by `addr` (e.g. a [`TcpProxy`]).
    pub fn url_via(&self, addr: SocketAddr) -> String {
        let mut url = reqwest::Url::parse(&self.url).expect("database URL");
        url.set_ip_host(addr.ip()).expect("host");
        url.set_port(Some(addr.port())).expect("port");
        url.into()
    }

    pub async fn pool(&self) -> sqlx::PgPool {
        sqlx::PgPool::connect(&self.url).await.expect("connecting to the test database")
    }

    pub async fn drop_database(self) {
        use sqlx::migrate::MigrateDatabase;
        let _ = sqlx::Postgres::force_drop_database(&self.url).await;
    }
}

impl Default for TestDatabase {
    fn default() -> Self {
        Self::new()
    }
}

/// What a pipeline test needs around the services: a broker, the registry, the photo server, its
/// own database, and its own topic and group names.
pub struct TestEnv {
    pub broker: Broker,
    pub registry: RegistrySettings,
    /// Base URL of the photo server ([`start_photo_server`]).
    pub photos: String,
    pub db: TestDatabase,
    pub names: Names,
}

impl TestEnv {
    pub async fn start() -> Self {
        Self::with_broker(Broker::start().await).await
    }

    /// An environment whose broker keeps its data on disk and can be restarted.
    pub async fn start_durable() -> Self {
        Self::with_broker(Broker::start_durable().await).await
    }

    async fn with_broker(broker: Broker) -> Self {
        let registry = start_registry().await;
        let photos = start_photo_server().await;
        Self { broker, registry, photos, db: TestDatabase::new(), names: Names::new() }
    }

    /// Settings for the three services, pointing at this environment.
    pub fn settings(&self) -> StackSettings {
        StackSettings::new(self.broker.kafka(), self.registry.clone(), &self.db.url, &self.names)
    }

    /// Drops the test's database; the broker goes with `self`.
    pub async fn finish(self) {
        self.db.drop_database().await;
    }
}

/// Names unique to one test: topics and consumer groups.
pub struct Names {
    pub requests: String,
    pub results: String,
    pub dead_letter: String,
    pub classifier_group: String,
    pub sink_group: String,
}

impl Names {
    pub fn new() -> Self {
        let id = uuid::Uuid::now_v7().simple().to_string();
        Self {
            requests: format!("requests-{id}"),
            results: format!("results-{id}"),
            dead_letter: format!("dead-letter-{id}"),
            classifier_group: format!("classifier-{id}"),
            sink_group: format!("sink-{id}"),
        }
    }
}

impl Default for Names {
    fn default() -> Self {
        Self::new()
    }
}

/// Settings for each service pointing at the test's broker, registry, database and names.
pub struct StackSettings {
    pub ingest: reefline_ingest::Settings,
    pub classifier: reefline_classifier::Settings,
    pub sink: reefline_sink::Settings,
}

/// Session timeout for test consumers: group joins take about half of it.
const SESSION_TIMEOUT_MS: u32 = 6000;

impl StackSettings {
    pub fn new(kafka: KafkaSettings, registry: RegistrySettings, database_url: &str, names: &Names) -> Self {
        use clap::Parser;
        let cache = cache_dir();
        let mut ingest = reefline_ingest::Settings::parse_from(["ingest"]);
        ingest.listen = "127.0.0.1:0".into();
        ingest.requests_topic = names.requests.clone();
        ingest.requests_partitions = 3;
        ingest.kafka = kafka.clone();
        ingest.registry = registry.clone();

        let mut classifier = reefline_classifier::Settings::parse_from(["classifier"]);
        classifier.listen = "127.0.0.1:0".into();
        classifier.requests_topic = names.requests.clone();
        classifier.results_topic = names.results.clone();
        classifier.dead_letter_topic = names.dead_letter.clone();
        classifier.topic_partitions = 3;
        classifier.group_id = names.classifier_group.clone();
        classifier.session_timeout_ms = SESSION_TIMEOUT_MS;
        classifier.model_path = cache.join("models/efficientnet-lite0.onnx");
        classifier.labels_path = cache.join("models/imagenet_labels.tsv");
        classifier.ort_dylib = cache.join("onnxruntime/libonnxruntime.so.1.31.1");
        classifier.max_batch_size = 8;
        classifier.fetch_timeout_s = 10;
        // The photo server is on loopback, which the classifier refuses unless told otherwise.
        classifier.fetch_allow = vec!["127.0.0.1/32".into()];
        classifier.fetch_retry_base_ms = 50;
        classifier.kafka = kafka.clone();
        classifier.registry = registry.clone();

        let mut sink = reefline_sink::Settings::parse_from(["sink"]);
        sink.listen = "127.0.0.1:0".into();
        sink.database_url = database_url.to_owned();
        sink.results_topic = names.results.clone();
        sink.dead_letter_topic = names.dead_letter.clone();
        sink.topic_partitions = 3;
        sink.group_id = names.sink_group.clone();
        sink.requests_topic = names.requests.clone();
        sink.requests_group_id = format!("{}-requests", names.sink_group);
        sink.session_timeout_ms = SESSION_TIMEOUT_MS;
        sink.kafka = kafka;
        sink.registry = registry;
        Self { ingest, classifier, sink }
    }
}

/// The three services running in-process; stopped (gracefully) by [`Stack::stop`].
pub struct Stack {
    pub ingest: String,
    pub sink: String,
    pub classifier_ops: String,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

fn stopped(rx: &watch::Receiver<bool>) -> impl Future<Output = ()> + Send + 'static {
    let mut rx = rx.clone();
    async move {
        let _ = rx.wait_for(|s| *s).await;
    }
}

/// Wraps the classifier's inference engine.
pub type EngineWrap = Box<dyn FnOnce(Box<dyn Engine>) -> Box<dyn Engine> + Send>;

impl Stack {
    pub async fn start(settings: StackSettings) -> Self {
        Self::start_with(settings, Box::new(|engine| engine)).await
    }

    /// Starts the stack with the classifier's engine wrapped by `wrap`.
    pub async fn start_with(settings: StackSettings, wrap: EngineWrap) -> Self {
        Self::start_parts(settings, Some(wrap), true).await
    }

    /// Starts ingest and the sink only; the test runs classifiers as processes ([`ServiceProcess`]).
    pub async fn start_without_classifier(settings: StackSettings) -> Self {
        Self::start_parts(settings, None, true).await
    }

    /// Starts ingest and the classifier only; the test runs the sink as a process.
    pub async fn start_without_sink(settings: StackSettings) -> Self {
        Self::start_parts(settings, Some(Box::new(|engine| engine)), false).await
    }

    async fn start_parts(settings: StackSettings, classifier: Option<EngineWrap>, sink: bool) -> Self {
        let (stop, rx) = watch::channel(false);
        let mut tasks = Vec::new();
        let mut sink_url = String::new();
        if sink {
            let sink = reefline_sink::Application::build(settings.sink).await.expect("building the sink");
            sink_url = format!("http://{}", sink.local_addr());
            tasks.push(tokio::spawn(sink.run_until(stopped(&rx))));
        }
        let ingest = reefline_ingest::Application::build(settings.ingest).await.expect("building ingest");
        let ingest_url = format!("http://{}", ingest.local_addr());
        let mut classifier_ops = String::new();
        if let Some(wrap) = classifier {
            let classifier = reefline_classifier::Application::build(settings.classifier)
                .await
                .expect("building the classifier")
                .wrap_engine(wrap);
            classifier_ops = format!("http://{}", classifier.local_addr());
            tasks.push(tokio::spawn(classifier.run_until(stopped(&rx))));
        }
        tasks.push(tokio::spawn(async move { ingest.run_until(stopped(&rx)).await.map_err(Into::into) }));
        Self { ingest: ingest_url, sink: sink_url, classifier_ops, stop, tasks }
    }

    /// Stops every service and waits for each to finish cleanly.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        for task in self.tasks {
            task.await.expect("service task").expect("service ran cleanly");
        }
    }
}

/// Reads one sample's value from Prometheus text, e.g. `metric(&text, "classifier_consumer_pauses_total")`.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let (key, value) = line.rsplit_once(' ')?;
        (key == name).then(|| value.parse().ok()).flatten()
    })
}

/// GETs `url`: the status and the JSON body (`Null` if there is none).
pub async fn get_json(client: &reqwest::Client, url: &str) -> (u16, serde_json::Value) {
    let response = client.get(url).send().await.expect("GET");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(serde_json::Value::Null))
}

/// POSTs `body` as JSON to `url`: the status and the JSON body (`Null` if there is none).
pub async fn post_json(client: &reqwest::Client, url: &str, body: &serde_json::Value) -> (u16, serde_json::Value) {
    let response = client.post(url).json(body).send().await.expect("POST");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(serde_json::Value::Null))
}

/// GETs `url` as JSON once the status is 200, or returns `None`.
pub async fn get_json_ok(client: &reqwest::Client, url: &str) -> Option<serde_json::Value> {
    let response = client.get(url).send().await.ok()?;
    if response.status() != 200 {
        return None;
    }
    response.json().await.ok()
}

/// A service running as its own process, so that a test can kill it with SIGKILL or SIGTERM.
pub struct ServiceProcess {
    child: Child,
}

fn log_file(name: &str) -> std::fs::File {
    std::fs::File::create(std::env::temp_dir().join(format!("reefline-{name}.log"))).expect("log file")
}

impl ServiceProcess {
    /// Starts the classifier command `bin` (an integration test passes
    /// `env!("CARGO_BIN_EXE_classifier-under-test")`) with the settings' topics, group, model and broker.
    pub fn classifier(bin: &str, s: &reefline_classifier::Settings, name: &str) -> Self {
        let mut command = Command::new(bin);
        command
            .args(["--listen", "127.0.0.1:0"])
            .args(["--requests-topic", &s.requests_topic, "--results-topic", &s.results_topic])
            .args(["--dead-letter-topic", &s.dead_letter_topic, "--group-id", &s.group_id])
            .args(["--topic-partitions", &s.topic_partitions.to_string()])
            .args(["--session-timeout-ms", &s.session_timeout_ms.to_string()])
            .args(["--max-batch-size", &s.max_batch_size.to_string()])
            .arg("--model-path")
            .arg(&s.model_path)
            .arg("--labels-path")
            .arg(&s.labels_path)
            .arg("--ort-dylib")
            .arg(&s.ort_dylib)
            .args(["--fetch-allow", &s.fetch_allow.join(",")])
            .args(["--kafka-brokers", &s.kafka.brokers, "--schema-registry-url", &s.registry.url]);
        Self::spawn(command, name)
    }

    /// Starts the sink command `bin` (`env!("CARGO_BIN_EXE_sink-under-test")`) with the settings'
    /// database, topics, group and broker, listening on `s.listen` (give it a free port).
    pub fn sink(bin: &str, s: &reefline_sink::Settings, name: &str) -> Self {
        let mut command = Command::new(bin);
        command
            .args(["--listen", &s.listen, "--database-url", &s.database_url])
            .args(["--results-topic", &s.results_topic, "--dead-letter-topic", &s.dead_letter_topic])
            .args(["--topic-partitions", &s.topic_partitions.to_string(), "--group-id", &s.group_id])
            .args(["--requests-topic", &s.requests_topic, "--requests-group-id", &s.requests_group_id])
            .args(["--session-timeout-ms", &s.session_timeout_ms.to_string()])
            .args(["--kafka-brokers", &s.kafka.brokers, "--schema-registry-url", &s.registry.url]);
        Self::spawn(command, name)
    }

    fn spawn(mut command: Command, name: &str) -> Self {
        let log = log_file(name);
        let child = command
            .env("RUST_LOG", "info")
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .expect("starting a service process");
        Self { child }
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGKILL: no draining, no commit.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits for the process to exit; returns how long that took.
    pub fn terminate(mut self) -> Duration {
        let started = Instant::now();
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let _ = self.child.wait();
        started.elapsed()
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free `127.0.0.1` address for a service started as a process.
pub fn free_addr() -> String {
    format!("127.0.0.1:{}", free_port())
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
    let consumer: BaseConsumer = kafka.consumer_config(&group, 6000).create().expect("counting consumer");
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
