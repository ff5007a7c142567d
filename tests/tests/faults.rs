//! Delivery under faults: every request ends as exactly one row whatever happens to the workers.

use std::time::Duration;

use reefline_e2e::workload::{REQUESTS, check_rows, submit_mixed, wait_rows};
use reefline_e2e::{ServiceProcess, Stack, TestEnv, metric};

const CLASSIFIER: &str = env!("CARGO_BIN_EXE_classifier-under-test");

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
    let mut steady = ServiceProcess::classifier(CLASSIFIER, &f.classifier, "steady");
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
    assert!(first.log_text().contains("partitions drained and handed over"), "the first gave partitions up");
    assert!(second.log_text().contains("partitions assigned partitions=1"), "the second took one of the 3");
    drop((first, second));
    f.finish().await;
}
