//! The end-to-end harness: a real broker process (nisshi), the local Schema Registry, a fresh
//! Postgres database, a local HTTP server for the photos, and the three services in-process, all
//! on ports chosen by the OS.

use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::Path as UrlPath;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use reefline_classifier::engine::Engine;
use reefline_common::kafka::KafkaSettings;
use reefline_schemas::RegistrySettings;
use tokio::sync::watch;

pub mod azurite;
mod broker;
pub mod camera;
pub mod feeds;
mod processes;
pub mod s3;
pub mod tenants;
pub mod workload;

pub use broker::Broker;
pub use processes::{ServiceProcess, TcpProxy, TlsProxy, committed_offsets, topic_counts, topic_size};

/// The workspace's cache folder (`REEFLINE_CACHE`, else `.cache/` at the workspace root).
pub fn cache_dir() -> PathBuf {
    std::env::var_os("REEFLINE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.cache"))
}

/// Every model of the project's manifest, with its files under the cache, Lite0 the default.
pub fn model_settings() -> reefline_common::models::ModelSettings {
    reefline_common::models::ModelSettings {
        manifest: Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/manifest.toml"),
        dir: cache_dir(),
        served: Vec::new(),
        default: "efficientnet-lite0".into(),
    }
}

/// A port free now, for a program that cannot bind port 0 and say which it got (the broker
/// advertises its address before it listens; Prometheus does not log the port it bound).
pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

/// The random source of a fault test: seeded from `FAULT_SEED` when set (to replay a run), else
/// from the clock; the seed is printed either way, so a failure can be replayed.
pub fn fault_rng(test: &str) -> fastrand::Rng {
    let seed = std::env::var("FAULT_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
    });
    eprintln!("{test}: FAULT_SEED={seed}");
    fastrand::Rng::with_seed(seed)
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

/// Serves `router` on a free port in the background; returns its address.
pub async fn serve(router: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("binding");
    let addr = listener.local_addr().expect("address");
    tokio::spawn(async move { axum::serve(listener, router).await });
    addr
}

/// Starts the local Schema Registry in memory; returns its settings.
pub async fn start_registry() -> RegistrySettings {
    let addr = serve(reefline_tools::registry::Registry::in_memory().router()).await;
    RegistrySettings::new(format!("http://{addr}"))
}

/// A PNG whose header reads (64×64 pixels) but whose pixel data does not: it fails in the
/// decode itself, after every check of its header.
pub fn broken_png() -> Vec<u8> {
    let img = image::RgbImage::from_fn(64, 64, |x, y| image::Rgb([x as u8, y as u8, (x * y) as u8]));
    let mut png = std::io::Cursor::new(Vec::new());
    img.write_to(&mut png, image::ImageFormat::Png).expect("encodes");
    let mut png = png.into_inner();
    let data = png.windows(4).position(|w| w == b"IDAT").expect("an IDAT chunk") + 6;
    png[data..data + 32].fill(0);
    png
}

/// Serves the cached photos at `/photos/{name}`, an HTML page at `/page.jpg`, a PNG that fails
/// to decode at `/broken.png` ([`broken_png`]), a redirect to the
/// cloud metadata address at `/to-metadata.jpg`, `/flaky/{name}` that answers 503 the first time,
/// `/always-503.jpg`, and 404 elsewhere.
pub async fn start_photo_server() -> String {
    let dir = cache_dir().join("photos");
    let flaky_dir = dir.clone();
    let broken = axum::body::Bytes::from(broken_png());
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
        .route("/broken.png", axum::routing::get(move || async move { broken }))
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
    /// An environment whose broker, like the local stack's, keeps its data on disk and can be restarted.
    pub async fn start() -> Self {
        let broker = Broker::start().await;
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
    /// The interactive lane's requests topic.
    pub interactive: String,
    pub results: String,
    pub dead_letter: String,
    pub batches: String,
    pub classifier_group: String,
    pub sink_group: String,
}

impl Names {
    pub fn new() -> Self {
        let id = uuid::Uuid::now_v7().simple().to_string();
        Self {
            requests: format!("requests-{id}"),
            interactive: format!("requests-{id}.interactive"),
            results: format!("results-{id}"),
            dead_letter: format!("dead-letter-{id}"),
            batches: format!("batches-{id}"),
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
    pub fn new(mut kafka: KafkaSettings, registry: RegistrySettings, database_url: &str, names: &Names) -> Self {
        use clap::Parser;
        let cache = cache_dir();
        kafka.session_timeout_ms = SESSION_TIMEOUT_MS;
        let topics = reefline_common::kafka::Topics {
            requests: names.requests.clone(),
            interactive: names.interactive.clone(),
            results: names.results.clone(),
            dead_letter: names.dead_letter.clone(),
            batches: names.batches.clone(),
            partitions: 3,
        };
        // One model unless a test asks for more (`serve_every_model`): each loads in a second or so.
        let models =
            reefline_common::models::ModelSettings { served: vec!["efficientnet-lite0".into()], ..model_settings() };
        // One secret for the three, as an operator sets it, so that tests may give keys to tenants.
        let tenants = reefline_common::tenant::TenantSettings {
            tenant_secret: Some(format!("tenant-secret-{}", uuid::Uuid::now_v7().simple()).into()),
            ..Default::default()
        };
        let mut ingest = reefline_ingest::Settings::parse_from(["ingest"]);
        ingest.tenants = tenants.clone();
        ingest.listen = "127.0.0.1:0".into();
        ingest.models = models.clone();
        ingest.topics = topics.clone();
        ingest.kafka = kafka.clone();
        ingest.registry = registry.clone();
        ingest.database = database_url.into();
        // Feeds fetched from the photo server (on loopback).
        ingest.source_allow = vec!["127.0.0.1/32".into()];

        let mut classifier = reefline_classifier::Settings::parse_from(["classifier"]);
        classifier.tenants = tenants.clone();
        classifier.listen = "127.0.0.1:0".into();
        classifier.topics = topics.clone();
        classifier.group_id = names.classifier_group.clone();
        classifier.models = models.clone();
        classifier.ort_dylib = cache.join("onnxruntime/libonnxruntime.so.1.31.1");
        classifier.max_batch_size = 8;
        // Two engines a model, whatever the machine's cores: the fault tests and hot reload cover
        // a pool of engines sharing one batching queue.
        classifier.engines = 2;
        classifier.fetch_timeout_s = 10;
        // The photo server is on loopback, which the classifier refuses unless told otherwise.
        classifier.fetch_allow = vec!["127.0.0.1/32".into()];
        classifier.fetch_retry_base_ms = 50;
        classifier.kafka = kafka.clone();
        classifier.registry = registry.clone();
        classifier.database = database_url.into();

        let mut sink = reefline_sink::Settings::parse_from(["sink"]);
        sink.tenants = tenants;
        sink.listen = "127.0.0.1:0".into();
        sink.database = database_url.into();
        sink.topics = topics;
        sink.group_id = names.sink_group.clone();
        sink.requests_group_id = format!("{}-requests", names.sink_group);
        sink.callback_allow = vec!["127.0.0.1/32".into()];
        sink.models = models;
        sink.callback_retry_base_ms = 100;
        sink.kafka = kafka;
        sink.registry = registry;
        Self { ingest, classifier, sink }
    }

    /// Ingest and the classifier with every model of the manifest, as `make up` runs them.
    pub fn serve_every_model(mut self) -> Self {
        self.ingest.models.served.clear();
        self.classifier.models.served.clear();
        self
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

/// Wraps each of the classifier's inference engines.
pub type EngineWrap = Box<dyn Fn(Box<dyn Engine>) -> Box<dyn Engine> + Send>;

/// Wraps each engine of a stack in [`SlowEngine`].
pub fn slow_engine(per_batch: Duration, per_image: Duration) -> EngineWrap {
    Box::new(move |engine| Box::new(SlowEngine { engine, per_batch, per_image }))
}

/// The real engine, made slow: `per_batch` for each batch and `per_image` for each of its images,
/// so that a pipeline stays full, or a backlog lasts, however fast the machine is.
pub struct SlowEngine {
    engine: Box<dyn Engine>,
    per_batch: Duration,
    per_image: Duration,
}

impl Engine for SlowEngine {
    fn infer(
        &mut self,
        input: &[f32],
        batch: usize,
    ) -> Result<Vec<Vec<f32>>, reefline_classifier::engine::EngineError> {
        std::thread::sleep(self.per_batch + self.per_image * batch as u32);
        self.engine.infer(input, batch)
    }
}

impl Stack {
    pub async fn start(settings: StackSettings) -> Self {
        Self::start_parts(settings, Some(None), true, true).await
    }

    /// Starts the stack with the classifier's engines wrapped by `wrap` (they are then not reloaded
    /// when their files change).
    pub async fn start_with(settings: StackSettings, wrap: EngineWrap) -> Self {
        Self::start_parts(settings, Some(Some(wrap)), true, true).await
    }

    /// Starts ingest and the sink only; the test runs classifiers as processes ([`ServiceProcess`]).
    pub async fn start_without_classifier(settings: StackSettings) -> Self {
        Self::start_parts(settings, None, true, true).await
    }

    /// Starts ingest and the classifier only; the test runs the sink as a process.
    pub async fn start_without_sink(settings: StackSettings) -> Self {
        Self::start_parts(settings, Some(None), false, true).await
    }

    /// Starts the classifier and the sink only; the test runs ingest as a process (`ingest` is
    /// then empty).
    pub async fn start_without_ingest(settings: StackSettings) -> Self {
        Self::start_parts(settings, Some(None), true, false).await
    }

    /// `classifier`: none, or one with its engines as they are (`Some(None)`) or wrapped.
    async fn start_parts(
        settings: StackSettings,
        classifier: Option<Option<EngineWrap>>,
        sink: bool,
        ingest: bool,
    ) -> Self {
        let (stop, rx) = watch::channel(false);
        let mut tasks = Vec::new();
        // Ingest first: the sink's web page is told where it is.
        let ingest = match ingest {
            true => Some(reefline_ingest::Application::build(settings.ingest).await.expect("building ingest")),
            false => None,
        };
        let ingest_url = ingest.as_ref().map(|i| format!("http://{}", i.local_addr())).unwrap_or_default();
        let mut sink_url = String::new();
        if sink {
            let mut sink_settings = settings.sink;
            if !ingest_url.is_empty() {
                sink_settings.ingest_url = ingest_url.clone();
            }
            let sink = reefline_sink::Application::build(sink_settings).await.expect("building the sink");
            sink_url = format!("http://{}", sink.local_addr());
            tasks.push(tokio::spawn(sink.run_until(stopped(&rx))));
        }
        let mut classifier_ops = String::new();
        if let Some(wrap) = classifier {
            let mut classifier =
                reefline_classifier::Application::build(settings.classifier).await.expect("building the classifier");
            if let Some(wrap) = wrap {
                classifier = classifier.wrap_engine(wrap);
            }
            classifier_ops = format!("http://{}", classifier.local_addr());
            tasks.push(tokio::spawn(classifier.run_until(stopped(&rx))));
        }
        if let Some(ingest) = ingest {
            tasks.push(tokio::spawn(async move { ingest.run_until(stopped(&rx)).await.map_err(Into::into) }));
        }
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

/// Submits the coffee photo through `stack` and waits for its result.
pub async fn classify_coffee(client: &reqwest::Client, stack: &Stack, photos: &str) -> serde_json::Value {
    let body = serde_json::json!({ "images": [format!("{photos}/photos/coffee.png")] });
    let (status, accepted) = post_json(client, &format!("{}/v1/classify", stack.ingest), &body).await;
    assert_eq!(status, 202, "{accepted}");
    let url = format!("{}/v1/results/{}", stack.sink, accepted["request_ids"][0].as_str().unwrap());
    wait_for_status(client, &url, 200, "the coffee photo's result", Duration::from_secs(60)).await
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

/// Polls `url` until it answers `status`; returns the JSON body. Panics after `timeout` naming `what`.
pub async fn wait_for_status(
    client: &reqwest::Client,
    url: &str,
    status: u16,
    what: &str,
    timeout: Duration,
) -> serde_json::Value {
    wait_for(what, timeout, || async {
        let response = client.get(url).send().await.ok()?;
        if response.status() != status {
            return None;
        }
        Some(response.json().await.unwrap_or(serde_json::Value::Null))
    })
    .await
}

/// Polls `{base}/metrics` until the sample `name` satisfies `check`. Panics after `timeout` naming `what`.
pub async fn wait_for_metric(
    client: &reqwest::Client,
    base: &str,
    name: &str,
    check: impl Fn(f64) -> bool,
    what: &str,
    timeout: Duration,
) {
    let url = format!("{base}/metrics");
    wait_for(what, timeout, || async {
        let text = client.get(&url).send().await.ok()?.text().await.ok()?;
        check(metric(&text, name)?).then_some(())
    })
    .await
}

/// GETs `url` as JSON once the status is 200, or returns `None`.
pub async fn get_json_ok(client: &reqwest::Client, url: &str) -> Option<serde_json::Value> {
    let response = client.get(url).send().await.ok()?;
    if response.status() != 200 {
        return None;
    }
    response.json().await.ok()
}
