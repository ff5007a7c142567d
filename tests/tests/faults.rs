//! Delivery under faults: every request ends as exactly one row whatever happens to the workers.

use std::collections::HashMap;
use std::time::Duration;

use reefline_e2e::{ClassifierProcess, Stack, TestEnv, metric, wait_for};
use serde_json::json;

const ESPRESSO: i64 = 967;
const CLASSIFIER: &str = env!("CARGO_BIN_EXE_classifier-under-test");
const REQUESTS: i64 = 2000;

/// 2,000 URLs: 1,800 real photos (cycling through the 22), 100 missing, 100 not images; submitted
/// in two requests. Returns what each request id should end as: (`ok` or error kind, URL).
async fn submit_mixed(client: &reqwest::Client, ingest: &str, photos: &str) -> HashMap<String, (&'static str, String)> {
    let names: Vec<String> = reefline_e2e::foolbox_photos()
        .into_iter()
        .map(|(n, _)| n)
        .chain(["chelsea.png".into(), "coffee.png".into()])
        .collect();
    let urls: Vec<(String, &str)> = (0..REQUESTS as usize)
        .map(|i| match i % 20 {
            7 => (format!("{photos}/photos/missing-{i}.jpg"), "not_found"),
            13 => (format!("{photos}/page.jpg?n={i}"), "not_an_image"),
            _ => (format!("{photos}/photos/{}?n={i}", names[i % names.len()]), "ok"),
        })
        .collect();
    let mut expected = HashMap::new();
    for chunk in urls.chunks(1000) {
        let images: Vec<&str> = chunk.iter().map(|(u, _)| u.as_str()).collect();
        let response =
            client.post(format!("{ingest}/v1/classify")).json(&json!({ "images": images })).send().await.unwrap();
        assert_eq!(response.status(), 202);
        let accepted: serde_json::Value = response.json().await.unwrap();
        for ((url, kind), id) in chunk.iter().zip(accepted["request_ids"].as_array().unwrap()) {
            expected.insert(id.as_str().unwrap().to_owned(), (*kind, url.clone()));
        }
    }
    assert_eq!(expected.len(), REQUESTS as usize);
    expected
}

async fn rows(pool: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM results").fetch_one(pool).await.unwrap()
}

async fn wait_rows(pool: &sqlx::PgPool, at_least: i64, what: &str) {
    wait_for(what, Duration::from_secs(600), || {
        let pool = pool.clone();
        async move { (rows(&pool).await >= at_least).then_some(()) }
    })
    .await;
}

/// Every request has exactly one row, with the right outcome; the same photo always gets the
/// same label, whichever worker, attempt or batch it went through.
async fn check_rows(pool: &sqlx::PgPool, expected: &HashMap<String, (&'static str, String)>) {
    /// request id, status, error kind, top-1 index, URL
    type Row = (String, String, Option<String>, Option<i64>, String);
    let stored: Vec<Row> =
        sqlx::query_as("SELECT request_id, status, error_kind, (predictions->0->>'index')::bigint, url FROM results")
            .fetch_all(pool)
            .await
            .unwrap();
    assert_eq!(stored.len(), expected.len(), "exactly one row per request");
    let mut top1_by_photo: HashMap<String, i64> = HashMap::new();
    for (id, status, kind, top1, url) in &stored {
        let (expected_kind, expected_url) = &expected[id];
        assert_eq!(url, expected_url);
        match *expected_kind {
            "ok" => {
                assert_eq!(status, "ok", "{url}");
                let photo = url.rsplit('/').next().unwrap().split('?').next().unwrap().to_owned();
                let top1 = top1.unwrap();
                assert_eq!(*top1_by_photo.entry(photo.clone()).or_insert(top1), top1, "{photo}");
                if photo == "coffee.png" {
                    assert_eq!(top1, ESPRESSO);
                }
            }
            kind_name => assert_eq!(kind.as_deref(), Some(kind_name), "{url}"),
        }
    }
    assert_eq!(top1_by_photo.len(), 22);
}

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
    let classifier = settings.classifier.clone();
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
    let f = fixture().await;
    let mut steady = ClassifierProcess::spawn(CLASSIFIER, &f.classifier, "steady");
    let mut victim = ClassifierProcess::spawn(CLASSIFIER, &f.classifier, "victim");
    let expected = submit_mixed(&f.client, &f.stack.ingest, &f.photos).await;

    // Three kills at random points, each followed by a restart.
    for round in 0..3 {
        let at = 300 + round * 500 + fastrand::i64(0..200);
        wait_rows(&f.pool, at, "progress before the kill").await;
        assert!(
            steady.is_running() && victim.is_running(),
            "a classifier exited on its own; see its log in the temp dir"
        );
        victim.kill();
        eprintln!("faults: SIGKILL to a classifier with {at}+ rows stored");
        victim = ClassifierProcess::spawn(CLASSIFIER, &f.classifier, "victim");
    }
    wait_rows(&f.pool, REQUESTS, "all 2,000 rows").await;
    check_rows(&f.pool, &expected).await;
    let duplicates = duplicates(&f.client, &f.stack.sink).await;
    eprintln!("faults: kill -9 ×3: {REQUESTS} requests, {REQUESTS} rows, {duplicates} results redone after the kills");
    assert!(duplicates >= 0.0);

    drop((steady, victim));
    f.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_terminated_classifier_finishes_its_work_and_hands_over_the_rest() {
    let f = fixture().await;
    let steady = ClassifierProcess::spawn(CLASSIFIER, &f.classifier, "steady-term");
    let victim = ClassifierProcess::spawn(CLASSIFIER, &f.classifier, "victim-term");
    let expected = submit_mixed(&f.client, &f.stack.ingest, &f.photos).await;

    wait_rows(&f.pool, 500 + fastrand::i64(0..300), "progress before SIGTERM").await;
    let took = victim.terminate();
    eprintln!("faults: SIGTERM: the classifier drained, committed and exited in {took:?}");
    assert!(took < Duration::from_secs(30), "exit took {took:?}");

    wait_rows(&f.pool, REQUESTS, "all 2,000 rows").await;
    check_rows(&f.pool, &expected).await;
    let duplicates = duplicates(&f.client, &f.stack.sink).await;
    eprintln!("faults: SIGTERM: {REQUESTS} requests, {REQUESTS} rows, {duplicates} results redone");
    // What the stopped classifier started it finished and committed, so its successor redoes
    // nothing (0 in every run so far). The bound leaves room for a final commit lost to a
    // concurrent rebalance, which would redo at most about a second of work; it stays far below
    // the in-flight window a SIGKILL throws away.
    assert!(duplicates <= 50.0, "{duplicates} results redone after a graceful stop");

    drop(steady);
    f.finish().await;
}
