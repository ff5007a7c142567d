//! `make bench`: the pipeline's end-to-end throughput against the project's own single-process
//! limit, measured in the same run on the same photos.
//!
//! 1. The limit: read bytes → decode → preprocess → batched inference, in one process, no network,
//!    no Kafka, with the classifier's own code and settings.
//! 2. The pipeline: the stack as separate processes (nisshi, registry, sink, classifier(s), ingest,
//!    release builds), N photo URLs served over local HTTP and submitted over HTTP; the clock stops
//!    when the last row is in Postgres.
//! 3. Latency at a steady half of the measured peak rate, batch fill, and RSS per service.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use axum::Router;
use axum::extract::{Path as UrlPath, State};
use clap::Parser;
use reefline_classifier::engine::{Engine, OrtEngine, OrtOptions};
use reefline_classifier::preprocess::Preprocess;
use reefline_e2e::{cache_dir, metric, serve};
use serde_json::json;

/// Benchmark settings.
#[derive(Parser, Debug)]
struct Args {
    /// Photos pushed through (the 22 test photos, repeated).
    #[arg(long, default_value_t = 1000)]
    images: usize,
    /// Repetitions; figures are the median with the spread.
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// Classifier instances to run, comma-separated (e.g. `1,2` for the scaling comparison).
    #[arg(long, value_delimiter = ',', default_value = "1")]
    classifiers: Vec<usize>,
    /// Seconds of steady load at half the peak rate, for the latency figures.
    #[arg(long, default_value_t = 10)]
    steady_seconds: u64,
    /// Classifier micro-batch size, used by the limit too.
    #[arg(long, default_value_t = 8)]
    max_batch: usize,
    /// ONNX Runtime intra-op threads, for the limit and the classifier alike (0: all cores).
    #[arg(long, default_value_t = 0)]
    intra_threads: usize,
    /// Requests left waiting in the topic at the end, to watch the classifier's memory (0: skip).
    #[arg(long, default_value_t = 0)]
    backlog: usize,
    /// Seconds the classifier's memory is watched with the backlog waiting.
    #[arg(long, default_value_t = 30)]
    backlog_seconds: u64,
    /// Extra environment for the classifier, `KEY=VALUE`, repeatable.
    #[arg(long = "classifier-env", value_parser = parse_env)]
    classifier_env: Vec<(String, String)>,
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    s.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())).ok_or_else(|| format!("`{s}` is not KEY=VALUE"))
}

fn load_photos() -> anyhow::Result<Vec<Vec<u8>>> {
    let dir = cache_dir().join("photos");
    let mut names: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("{} (run make setup)", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    names.sort();
    names.iter().map(|p| std::fs::read(p).map_err(Into::into)).collect()
}

/// The classifier's default ONNX Runtime options, with `intra_threads`.
fn ort_options(intra_threads: usize) -> OrtOptions {
    let cache = cache_dir();
    let mut options = OrtOptions::cpu(
        cache.join("onnxruntime/libonnxruntime.so.1.31.1"),
        cache.join("models/efficientnet-lite0.onnx"),
        224,
    );
    options.intra_threads = intra_threads;
    options
}

/// Images/s of decode + preprocess (one thread per core) feeding batched inference (its own thread).
fn measure_limit(photos: &[Vec<u8>], images: usize, max_batch: usize, intra: usize) -> anyhow::Result<f64> {
    let mut engine = OrtEngine::load(&ort_options(intra))?;
    let pre = Preprocess { size: 224, max_side: 10_000, max_pixels: 50_000_000 };
    let warm = pre.run(&photos[0]).map_err(|e| anyhow::anyhow!("{e}"))?;
    engine.infer(&warm.repeat(max_batch), max_batch).map_err(|e| anyhow::anyhow!(e))?;

    let cores = std::thread::available_parallelism().map_or(2, usize::from);
    let next = Arc::new(AtomicUsize::new(0));
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<f32>>(max_batch * 2);
    let started = Instant::now();
    let decoders: Vec<_> = (0..cores)
        .map(|_| {
            let (next, tx, photos) = (next.clone(), tx.clone(), photos.to_vec());
            std::thread::spawn(move || {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= images {
                        return;
                    }
                    let tensor = pre.run(&photos[i % photos.len()]).expect("test photos decode");
                    if tx.send(tensor).is_err() {
                        return;
                    }
                }
            })
        })
        .collect();
    drop(tx);
    let mut done = 0;
    let mut input = Vec::new();
    while let Ok(first) = rx.recv() {
        input.clear();
        input.extend_from_slice(&first);
        let mut n = 1;
        while n < max_batch {
            match rx.try_recv() {
                Ok(t) => {
                    input.extend_from_slice(&t);
                    n += 1;
                }
                Err(_) => break,
            }
        }
        engine.infer(&input, n).map_err(|e| anyhow::anyhow!(e))?;
        done += n;
    }
    for d in decoders {
        d.join().map_err(|_| anyhow::anyhow!("decoder panicked"))?;
    }
    anyhow::ensure!(done == images, "inferred {done} of {images}");
    Ok(images as f64 / started.elapsed().as_secs_f64())
}

fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    l.local_addr().expect("address").to_string()
}

/// A service process, killed when dropped.
struct Proc {
    name: String,
    child: Child,
}

impl Proc {
    fn spawn(name: &str, bin: &Path, args: &[&str], env: &[(String, String)]) -> anyhow::Result<Self> {
        let log = std::fs::File::create(std::env::temp_dir().join(format!("reefline-bench-{name}.log")))?;
        let child = Command::new(bin)
            .args(args)
            .envs(env.iter().cloned())
            .stdout(log.try_clone()?)
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        Ok(Self { name: name.to_owned(), child })
    }

    /// (current, peak) resident set size in MiB.
    fn rss_mib(&self) -> (f64, f64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        let field = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key)?.trim().strip_suffix("kB")?.trim().parse::<f64>().ok())
                .unwrap_or(0.0)
                / 1024.0
        };
        (field("VmRSS:"), field("VmHWM:"))
    }

    fn terminate(&mut self) {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        let _ = self.child.wait();
    }
}

/// CPU seconds (user + system) a process has used so far.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): utime and stime are the 12th and 13th.
    let fields: Vec<&str> =
        stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
    let ticks: f64 = fields.get(11..13).map(|f| f.iter().filter_map(|v| v.parse::<f64>().ok()).sum()).unwrap_or(0.0);
    ticks / 100.0
}

/// CPU seconds used so far by every process named `postgres` (the server and its backends).
fn postgres_cpu_seconds() -> f64 {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "postgres"))
        .map(cpu_seconds)
        .sum()
}

/// CPU seconds per component: each service, postgres, and this process (photo server, polling).
fn cpu_snapshot(procs: &[Proc]) -> BTreeMap<String, f64> {
    let mut cpu: BTreeMap<String, f64> = procs.iter().map(|p| (p.name.clone(), cpu_seconds(p.child.id()))).collect();
    cpu.insert("postgres".into(), postgres_cpu_seconds());
    cpu.insert("bench (photo server)".into(), cpu_seconds(std::process::id()));
    cpu
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn wait_http(client: &reqwest::Client, url: &str, what: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        if client.get(url).send().await.is_ok_and(|r| r.status().is_success()) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("{what} did not become ready")
}

async fn wait_tcp(addr: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("nothing listens on {addr}")
}

/// The figures of one pipeline run.
struct Run {
    e2e: f64,
    latency: [f64; 3],
    batch_fill: f64,
    rss: BTreeMap<String, (f64, f64)>,
    /// CPU milliseconds per image of each component during the peak phase.
    cpu_ms: BTreeMap<String, f64>,
    /// Classifier RSS (MiB) samples taken while a backlog waited in the topic.
    backlog_rss: Vec<f64>,
}

fn release_bin(name: &str) -> PathBuf {
    std::env::current_exe().ok().and_then(|p| p.parent().map(|d| d.join(name))).unwrap_or_else(|| PathBuf::from(name))
}

async fn run_pipeline(args: &Args, photos_url: &str, classifiers: usize) -> anyhow::Result<Run> {
    let client = reqwest::Client::new();
    let cache = cache_dir();
    let broker = free_addr();
    let registry = free_addr();
    let (ingest, sink) = (free_addr(), free_addr());
    let database = format!("postgres://postgres@127.0.0.1:5432/reefline_bench_{}", uuid::Uuid::now_v7().simple());
    let broker_url = format!("tcp://{broker}");
    let mut env: Vec<(String, String)> = vec![
        ("KAFKA_BROKERS".into(), broker.clone()),
        ("SCHEMA_REGISTRY_URL".into(), format!("http://{registry}")),
        ("DATABASE_URL".into(), database.clone()),
        ("KAFKA_SESSION_TIMEOUT_MS".into(), "6000".into()),
        ("MODEL_PATH".into(), cache.join("models/efficientnet-lite0.onnx").display().to_string()),
        ("LABELS_PATH".into(), cache.join("models/imagenet_labels.tsv").display().to_string()),
        ("ORT_DYLIB_PATH".into(), cache.join("onnxruntime/libonnxruntime.so.1.31.1").display().to_string()),
        ("MAX_BATCH_SIZE".into(), args.max_batch.to_string()),
        ("RUST_LOG".into(), "warn".into()),
        ("FETCH_ALLOW".into(), "127.0.0.1/32".into()),
        // Every photo comes from the one local server.
        ("FETCH_PER_HOST".into(), "64".into()),
        ("ORT_INTRA_THREADS".into(), args.intra_threads.to_string()),
    ];
    env.extend(args.classifier_env.iter().cloned());
    let nisshi = cache.join("tools/bin/nisshi");
    let mut procs = vec![Proc::spawn(
        "broker",
        &nisshi,
        &[
            "broker",
            "--listener-url",
            &broker_url,
            "--advertised-listener-url",
            &broker_url,
            "--storage-engine",
            "memory://bench/",
        ],
        &env,
    )?];
    wait_tcp(&broker).await?;
    procs.push(Proc::spawn("registry", &release_bin("reefline-registry"), &["--listen", &registry], &env)?);
    wait_tcp(&registry).await?;
    procs.push(Proc::spawn("sink", &release_bin("reefline-sink"), &["--listen", &sink], &env)?);
    wait_http(&client, &format!("http://{sink}/readyz"), "sink").await?;
    let mut classifier_ops = Vec::new();
    for i in 0..classifiers {
        let ops = free_addr();
        procs.push(Proc::spawn(
            &format!("classifier-{i}"),
            &release_bin("reefline-classifier"),
            &["--listen", &ops],
            &env,
        )?);
        classifier_ops.push(ops);
    }
    for ops in &classifier_ops {
        wait_http(&client, &format!("http://{ops}/readyz"), "classifier").await?;
    }
    procs.push(Proc::spawn("ingest", &release_bin("reefline-ingest"), &["--listen", &ingest], &env)?);
    wait_http(&client, &format!("http://{ingest}/readyz"), "ingest").await?;
    let pool = sqlx::PgPool::connect(&database).await?;

    let submit = |urls: Vec<String>| {
        let (client, ingest) = (client.clone(), ingest.clone());
        async move {
            let r = client.post(format!("http://{ingest}/v1/classify")).json(&json!({ "images": urls })).send().await?;
            anyhow::ensure!(r.status() == 202, "ingest answered {}", r.status());
            anyhow::Ok(())
        }
    };
    let count = || async { sqlx::query_scalar::<_, i64>("SELECT count(*) FROM results").fetch_one(&pool).await };
    let wait_rows = |target: i64| async move {
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            let n = count().await?;
            if n >= target {
                return anyhow::Ok(Instant::now());
            }
            anyhow::ensure!(Instant::now() < deadline, "only {n} of {target} rows after 10 minutes");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };

    // Warm-up: group joined, model loaded, connections open.
    let warm = 2 * args.max_batch * classifiers;
    submit((0..warm).map(|i| format!("{photos_url}/p/{i}")).collect()).await?;
    wait_rows(warm as i64).await?;

    // Peak: all N at once.
    let cpu_before = cpu_snapshot(&procs);
    let started = Instant::now();
    for chunk in (0..args.images).collect::<Vec<_>>().chunks(1000) {
        submit(chunk.iter().map(|i| format!("{photos_url}/p/{i}")).collect()).await?;
    }
    let finished = wait_rows((warm + args.images) as i64).await?;
    let e2e = args.images as f64 / finished.duration_since(started).as_secs_f64();
    let cpu: BTreeMap<String, f64> = cpu_snapshot(&procs)
        .into_iter()
        .map(|(k, v)| (k.clone(), (v - cpu_before.get(&k).unwrap_or(&0.0)) * 1000.0 / args.images as f64))
        .collect();

    // Steady load at half the peak, in ticks of 100 ms; latency is submission to row stored.
    let steady_started = chrono::Utc::now();
    let per_tick = ((e2e / 2.0) / 10.0).max(1.0);
    let ticks = args.steady_seconds * 10;
    let mut owed = 0.0;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut sent = 0usize;
    for _ in 0..ticks {
        tick.tick().await;
        owed += per_tick;
        let n = owed.floor() as usize;
        owed -= n as f64;
        if n > 0 {
            submit((sent..sent + n).map(|i| format!("{photos_url}/p/{i}")).collect()).await?;
            sent += n;
        }
    }
    wait_rows((warm + args.images + sent) as i64).await?;
    let latencies: Vec<f64> = sqlx::query_scalar(
        "SELECT extract(epoch FROM stored_at - submitted_at)::float8 FROM results WHERE submitted_at >= $1 ORDER BY 1",
    )
    .bind(steady_started)
    .fetch_all(&pool)
    .await?;
    let pct =
        |p: f64| latencies.get(((latencies.len() as f64 - 1.0) * p).round() as usize).copied().unwrap_or(f64::NAN);

    let mut fill = (0.0, 0.0);
    for ops in &classifier_ops {
        let text = client.get(format!("http://{ops}/metrics")).send().await?.text().await?;
        fill.0 += metric(&text, "classifier_batch_size_sum").unwrap_or(0.0);
        fill.1 += metric(&text, "classifier_batch_size_count").unwrap_or(0.0);
    }
    let rss = procs.iter().map(|p| (p.name.clone(), p.rss_mib())).collect();

    // Memory with a large backlog: the classifier must not buffer it.
    let mut backlog_rss = Vec::new();
    if args.backlog > 0 {
        let classifier = procs.iter().find(|p| p.name == "classifier-0").expect("a classifier");
        let urls: Vec<String> = (0..args.backlog).map(|i| format!("{photos_url}/p/{i}")).collect();
        for chunk in urls.chunks(1000) {
            submit(chunk.to_vec()).await?;
            backlog_rss.push(classifier.rss_mib().0);
        }
        for _ in 0..args.backlog_seconds {
            tokio::time::sleep(Duration::from_secs(1)).await;
            backlog_rss.push(classifier.rss_mib().0);
        }
        let text = client.get(format!("http://{}/metrics", classifier_ops[0])).send().await?.text().await?;
        let state: Vec<&str> = text
            .lines()
            .filter(|l| {
                l.starts_with("classifier_in_flight")
                    || l.starts_with("classifier_queue_depth")
                    || l.starts_with("classifier_consumer_pause")
            })
            .collect();
        println!("bench: classifier with backlog: {}", state.join(", "));
    }
    for p in procs.iter_mut().rev() {
        p.terminate();
    }
    pool.close().await;
    use sqlx::migrate::MigrateDatabase;
    let _ = sqlx::Postgres::force_drop_database(&database).await;
    Ok(Run {
        e2e,
        latency: [pct(0.5), pct(0.95), pct(0.99)],
        batch_fill: fill.0 / fill.1.max(1.0) / args.max_batch as f64,
        rss,
        cpu_ms: cpu,
        backlog_rss,
    })
}

fn median_spread(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let photos = Arc::new(load_photos()?);
    let router = Router::new()
        .route(
            "/p/{i}",
            axum::routing::get(|State(photos): State<Arc<Vec<Vec<u8>>>>, UrlPath(i): UrlPath<usize>| async move {
                photos[i % photos.len()].clone()
            }),
        )
        .with_state(photos.clone());
    let photos_url = format!("http://{}", serve(router).await);
    println!(
        "bench: {} images ({} distinct real photos), batch {}, {} run(s)",
        args.images,
        photos.len(),
        args.max_batch,
        args.runs
    );

    for &classifiers in &args.classifiers {
        let mut limits = Vec::new();
        let mut runs = Vec::new();
        for _ in 0..args.runs {
            let (p, n, b, t) = (photos.clone(), args.images, args.max_batch, args.intra_threads);
            limits.push(tokio::task::spawn_blocking(move || measure_limit(&p, n, b, t)).await??);
            runs.push(run_pipeline(&args, &photos_url, classifiers).await?);
        }
        let (limit, lmin, lmax) = median_spread(limits.clone());
        let (e2e, emin, emax) = median_spread(runs.iter().map(|r| r.e2e).collect());
        let ratios: Vec<f64> = runs.iter().zip(&limits).map(|(r, l)| r.e2e / l).collect();
        let (ratio, rmin, rmax) = median_spread(ratios);
        println!("classifiers                     {classifiers}");
        println!("single_process_limit_images_s   {limit:.1} (spread {lmin:.1}..{lmax:.1})");
        println!("end_to_end_images_s             {e2e:.1} (spread {emin:.1}..{emax:.1})");
        println!("end_to_end_to_limit_ratio       {ratio:.3} (spread {rmin:.3}..{rmax:.3})");
        println!("celery_style_reference_ratio    {:.2} (vs the issue's 70 images/s, not measured here)", e2e / 70.0);
        let lat = |i: usize| median_spread(runs.iter().map(|r| r.latency[i] * 1000.0).collect()).0;
        println!("latency_ms_at_half_peak         p50 {:.0}  p95 {:.0}  p99 {:.0}", lat(0), lat(1), lat(2));
        println!(
            "batch_fill                      {:.2} of {}",
            median_spread(runs.iter().map(|r| r.batch_fill).collect()).0,
            args.max_batch
        );
        for (name, (rss, peak)) in &runs[runs.len() / 2].rss {
            println!("rss_mib {name:24}{rss:.0} (peak {peak:.0})");
        }
        let middle = &runs[runs.len() / 2];
        let total: f64 = middle.cpu_ms.values().sum();
        for (name, ms) in &middle.cpu_ms {
            println!("cpu_ms_per_image {name:21}{ms:.2} ({:.0} %)", 100.0 * ms / total);
        }
        println!(
            "cpu_ms_per_image total                {total:.2} (2 cores give {:.0} images/s at most)",
            2000.0 / total
        );
        for run in runs.iter().filter(|r| !r.backlog_rss.is_empty()) {
            let s = &run.backlog_rss;
            let max = s.iter().copied().fold(0.0, f64::max);
            println!(
                "rss_mib_classifier_with_backlog  {:.0} at start, {:.0} at most, {:.0} after {} s ({} requests waiting)",
                s[0],
                max,
                s[s.len() - 1],
                args.backlog_seconds,
                args.backlog
            );
        }
    }
    Ok(())
}
