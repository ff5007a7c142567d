//! Delivery under faults: every request ends as exactly one row whatever happens to the workers,
//! even a request whose image kills the worker that takes it.

use std::time::Duration;

use reefline_classifier::settings::BulkDecode;
use reefline_e2e::workload::{REQUESTS, check_rows, submit_mixed, wait_rows};
use reefline_e2e::{ServiceProcess, Stack, TestEnv, foolbox_photos, metric, post_json, serve, topic_counts, wait_for};
use serde_json::{Value, json};

const CLASSIFIER: &str = env!("CARGO_BIN_EXE_classifier-under-test");

/// What a classifier logs when it takes a partition whose last owner stopped mid-way.
const CAREFUL: &str = "taking its next requests one at a time";

/// Result records the sink read beyond one per request: work redone after a fault.
async fn duplicates(client: &reqwest::Client, sink: &str) -> f64 {
    let text = client.get(format!("{sink}/metrics")).send().await.unwrap().text().await.unwrap();
    metric(&text, "sink_results_received_total").unwrap() - REQUESTS as f64
}

struct Fixture {
    env: TestEnv,
    stack: Stack,
    pool: sqlx::PgPool,
    client: reqwest::Client,
    photos: String,
    classifier: reefline_classifier::Settings,
}

async fn fixture() -> Fixture {
    let env = TestEnv::start().await;
    let settings = env.settings();
    let mut classifier = settings.classifier.clone();
    // The workload repeats its photos under many URLs: every one must be classified, so that the
    // faults meet a pipeline at work rather than results reused from the cache.
    classifier.result_cache = false;
    let stack = Stack::start_without_classifier(settings).await;
    let pool = env.db.pool().await;
    let photos = env.photos.clone();
    Fixture { env, stack, pool, client: reqwest::Client::new(), photos, classifier }
}

impl Fixture {
    async fn finish(self) {
        self.stack.stop().await;
        self.pool.close().await;
        self.env.finish().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_a_classifier_three_times_loses_and_doubles_nothing() {
    let mut rng = reefline_e2e::fault_rng("killing_a_classifier_three_times_loses_and_doubles_nothing");
    let f = fixture().await;
    // The victim decodes its bulk images in its engines (the default on the CPU), the steady one on
    // threads beside them: the workload's broken images and the kills meet both.
    let decode_pool = reefline_classifier::Settings { bulk_decode: BulkDecode::Pool, ..f.classifier.clone() };
    let mut steady = ServiceProcess::classifier(CLASSIFIER, &decode_pool, "steady");
    let mut victim = ServiceProcess::classifier(CLASSIFIER, &f.classifier, "victim");
    let expected = submit_mixed(&f.client, &f.stack.ingest, &f.photos).await;

    // Three kills at random points, each followed by a restart.
    for round in 0..3 {
        let at = 300 + round * 500 + rng.i64(0..200);
        wait_rows(&f.pool, at, "progress before the kill").await;
        assert!(
            steady.is_running() && victim.is_running(),
            "a classifier exited on its own; see {} and {}",
            steady.log.display(),
            victim.log.display()
        );
        victim.kill();
        eprintln!("faults: SIGKILL to a classifier with {at}+ rows stored");
        victim = ServiceProcess::classifier(CLASSIFIER, &f.classifier, "victim");
    }
    wait_rows(&f.pool, REQUESTS, "all 2,000 rows").await;
    check_rows(&f.pool, &expected).await;
    let duplicates = duplicates(&f.client, &f.stack.sink).await;
    eprintln!("faults: kill -9 ×3: {REQUESTS} requests, {REQUESTS} rows, {duplicates} results redone after the kills");
    // A SIGKILL throws away what the victim had in flight and had not committed (its pipeline of
    // at most ~100 images and up to a second of commits): three kills redo a few hundred at most,
    // never the whole workload again.
    assert!(duplicates < 1000.0, "{duplicates} results redone after three kills");

    drop((steady, victim));
    f.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_terminated_classifier_finishes_its_work_and_hands_over_the_rest() {
    let mut rng = reefline_e2e::fault_rng("a_terminated_classifier_finishes_its_work_and_hands_over_the_rest");
    let f = fixture().await;
    let steady = ServiceProcess::classifier(CLASSIFIER, &f.classifier, "steady-term");
    let victim = ServiceProcess::classifier(CLASSIFIER, &f.classifier, "victim-term");
    let expected = submit_mixed(&f.client, &f.stack.ingest, &f.photos).await;

    wait_rows(&f.pool, 500 + rng.i64(0..300), "progress before SIGTERM").await;
    let took = victim.terminate();
    eprintln!("faults: SIGTERM: the classifier drained, committed and exited in {took:?}");
    // Draining takes the pipeline's depth over its rate: seconds alone, longer beside the other
    // tests on two cores. The bound only tells a slow drain from a hang.
    assert!(took < Duration::from_secs(120), "exit took {took:?}");

    wait_rows(&f.pool, REQUESTS, "all 2,000 rows").await;
    check_rows(&f.pool, &expected).await;
    let duplicates = duplicates(&f.client, &f.stack.sink).await;
    eprintln!("faults: SIGTERM: {REQUESTS} requests, {REQUESTS} rows, {duplicates} results redone");
    // What the stopped classifier started it finished and committed before its partitions were
    // handed over, so its successor redoes nothing.
    assert_eq!(duplicates, 0.0, "results redone after a graceful stop");
    // The handover was recorded as clean: its successor takes the partitions as usual, not one
    // request at a time as after a crash.
    assert!(!steady.log_text().contains(CAREFUL), "see {}", steady.log.display());

    drop(steady);
    f.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_classifier_joining_mid_stream_takes_partitions_over_without_redoing_work() {
    let mut rng = reefline_e2e::fault_rng("a_classifier_joining_mid_stream_takes_partitions_over_without_redoing_work");
    let f = fixture().await;
    let first = ServiceProcess::classifier(CLASSIFIER, &f.classifier, "first-scale");
    let expected = submit_mixed(&f.client, &f.stack.ingest, &f.photos).await;

    wait_rows(&f.pool, 300 + rng.i64(0..300), "progress before the second classifier joins").await;
    let second = ServiceProcess::classifier(CLASSIFIER, &f.classifier, "second-scale");
    wait_rows(&f.pool, REQUESTS, "all 2,000 rows").await;
    check_rows(&f.pool, &expected).await;
    let duplicates = duplicates(&f.client, &f.stack.sink).await;
    eprintln!("faults: scale-out: {REQUESTS} requests, {REQUESTS} rows, {duplicates} results redone");
    assert_eq!(duplicates, 0.0, "the partitions handed over were drained and committed first");
    // The handover may end after the last row (the first drains its pipeline first, tens of
    // seconds on a loaded machine): wait for it rather than for the workload.
    wait_for("the first classifier to give a partition up and the second to take it", Duration::from_secs(120), || {
        let handed = first.log_text().contains("partitions drained and handed over")
            && second.log_text().contains("partitions assigned partitions=1");
        async move { handed.then_some(()) }
    })
    .await;
    assert!(!second.log_text().contains(CAREFUL), "see {}", second.log.display());
    drop((first, second));
    f.finish().await;
}

/// The memory limit of the classifier the huge PNG kills.
const MEMORY: u64 = 1536 << 20;

/// A 30,000 × 30,000 one-bit greyscale PNG of about 100 KB: decoded, 900 MB of grey, then 2.7 GB of RGB.
fn huge_png() -> Vec<u8> {
    use std::io::Write;
    const SIDE: u32 = 30_000;
    let mut idat = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
    let row = vec![0u8; 1 + (SIDE as usize).div_ceil(8)]; // the filter byte, then a bit a pixel
    for _ in 0..SIDE {
        idat.write_all(&row).unwrap();
    }
    let mut header = [SIDE.to_be_bytes(), SIDE.to_be_bytes()].concat();
    header.extend([1, 0, 0, 0, 0]); // 1 bit a pixel, greyscale, deflate, no filter, no interlace
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    for (kind, data) in [(b"IHDR", header), (b"IDAT", idat.finish().unwrap()), (b"IEND", Vec::new())] {
        png.extend((data.len() as u32).to_be_bytes());
        png.extend(kind);
        png.extend(&data);
        let mut crc = flate2::Crc::new();
        crc.update(kind);
        crc.update(&data);
        png.extend(crc.sum().to_be_bytes());
    }
    png
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_image_that_kills_the_classifier_is_tried_alone_three_times_then_set_aside() {
    let f = fixture().await;
    // An operator raised the image limits beyond what the classifier's memory allows: the PNG below
    // decodes to 3.6 GB, and the classifier is killed once it holds 1.5 GiB, as a container's
    // memory limit kills it.
    let mut settings = f.classifier.clone();
    (settings.max_image_side, settings.max_image_pixels) = (100_000, 2_000_000_000);
    let png = huge_png();
    let killer = serve(axum::Router::new().route(
        "/huge.png",
        axum::routing::get(move || {
            let png = png.clone();
            async move { ([(axum::http::header::CONTENT_TYPE, "image/png")], png) }
        }),
    ))
    .await;
    let killer_url = format!("http://{killer}/huge.png");
    let mut images: Vec<String> =
        foolbox_photos().into_iter().map(|(name, _)| format!("{}/photos/{name}", f.photos)).collect();
    images.insert(images.len() / 2, killer_url.clone());
    let (status, accepted) =
        post_json(&f.client, &format!("{}/v1/classify", f.stack.ingest), &json!({ "images": images })).await;
    assert_eq!(status, 202, "{accepted}");
    let batch_url = format!("{}/v1/batches/{}", f.stack.sink, accepted["batch_id"].as_str().unwrap());

    // Restarted whenever it stops, as Kubernetes or Compose would.
    let (mut classifier, mut stops) =
        (ServiceProcess::classifier_with_memory_limit(CLASSIFIER, &settings, "crash-loop", MEMORY), 0);
    let batch = wait_for("the batch done", Duration::from_secs(600), || {
        if !classifier.is_running() {
            stops += 1;
            assert!(stops <= 6, "the classifier stopped {stops} times; see {}", classifier.log.display());
            classifier = ServiceProcess::classifier_with_memory_limit(CLASSIFIER, &settings, "crash-loop", MEMORY);
        }
        let (client, url) = (f.client.clone(), batch_url.clone());
        async move { reefline_e2e::get_json_ok(&client, &url).await.filter(|b| b["done"] == true) }
    })
    .await;
    // Once among the others, then three times alone; the fourth time alone it is set aside.
    assert_eq!(stops, 4, "see {}", classifier.log.display());
    let results = batch["results"].as_array().unwrap();
    assert_eq!(
        (results.len(), batch["ok"].as_i64(), batch["error"].as_i64()),
        (images.len(), Some(images.len() as i64 - 1), Some(1))
    );
    let failed: Vec<&Value> = results.iter().filter(|r| r["status"] == "error").collect();
    assert_eq!((&failed[0]["url"], &failed[0]["error"]["kind"]), (&json!(killer_url), &json!("crash_loop")), "{batch}");
    assert_eq!(
        topic_counts(&f.env.broker.kafka(), &f.env.names.dead_letter).await.0,
        1,
        "one dead letter, to replay once fixed"
    );
    assert!(classifier.log_text().contains(CAREFUL));

    drop(classifier);
    f.finish().await;
}
