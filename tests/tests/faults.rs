//! Delivery under faults: every request ends as exactly one row whatever happens to the workers.

use std::collections::HashMap;
use std::time::Duration;

use reefline_e2e::{
    Broker, ClassifierProcess, Names, Stack, StackSettings, TestDatabase, start_photo_server, start_registry, wait_for,
};
use serde_json::json;

const ESPRESSO: i64 = 967;
const CLASSIFIER: &str = env!("CARGO_BIN_EXE_classifier-under-test");

/// 2,000 URLs: 1,800 real photos (cycling through the 22), 100 missing, 100 not images.
fn mixed_urls(photos: &str) -> Vec<(String, &'static str)> {
    let names: Vec<String> = reefline_e2e::foolbox_photos()
        .into_iter()
        .map(|(n, _)| n)
        .chain(["chelsea.png".into(), "coffee.png".into()])
        .collect();
    (0..2000)
        .map(|i| match i % 20 {
            7 => (format!("{photos}/photos/missing-{i}.jpg"), "not_found"),
            13 => (format!("{photos}/page.jpg?n={i}"), "not_an_image"),
            _ => (format!("{photos}/photos/{}?n={i}", names[i % names.len()]), "ok"),
        })
        .collect()
}

async fn rows(pool: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM results").fetch_one(pool).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_a_classifier_three_times_loses_and_doubles_nothing() {
    let broker = Broker::start().await;
    let registry = start_registry().await;
    let photos = start_photo_server().await;
    let db = TestDatabase::new();
    let names = Names::new();
    let settings = StackSettings::new(broker.kafka(), registry, &db.url, &names);
    let classifier_settings = settings.classifier.clone();
    let stack = Stack::start_without_classifier(settings).await;
    let pool = db.pool().await;
    let client = reqwest::Client::new();

    let mut steady = ClassifierProcess::spawn(CLASSIFIER, &classifier_settings, "steady");
    let mut victim = ClassifierProcess::spawn(CLASSIFIER, &classifier_settings, "victim");

    let urls = mixed_urls(&photos);
    let mut expected: HashMap<String, (&str, String)> = HashMap::new();
    for chunk in urls.chunks(1000) {
        let images: Vec<&str> = chunk.iter().map(|(u, _)| u.as_str()).collect();
        let accepted: serde_json::Value = client
            .post(format!("{}/v1/classify", stack.ingest))
            .json(&json!({ "images": images }))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        for ((url, kind), id) in chunk.iter().zip(accepted["request_ids"].as_array().unwrap()) {
            expected.insert(id.as_str().unwrap().to_owned(), (*kind, url.clone()));
        }
    }
    assert_eq!(expected.len(), 2000);

    // Three kills at random points, each followed by a restart.
    for round in 0..3 {
        let at = 300 + round * 500 + fastrand::i64(0..200);
        wait_for("progress before the kill", Duration::from_secs(300), || {
            let pool = pool.clone();
            async move { (rows(&pool).await >= at).then_some(()) }
        })
        .await;
        assert!(
            steady.is_running() && victim.is_running(),
            "a classifier exited on its own; see its log in the temp dir"
        );
        victim.kill();
        eprintln!("faults: killed a classifier with {at}+ rows stored");
        victim = ClassifierProcess::spawn(CLASSIFIER, &classifier_settings, "victim");
    }

    wait_for("all 2,000 rows", Duration::from_secs(600), || {
        let pool = pool.clone();
        async move { (rows(&pool).await >= 2000).then_some(()) }
    })
    .await;
    /// request id, status, error kind, top-1 index, URL
    type Row = (String, String, Option<String>, Option<i64>, String);
    let stored: Vec<Row> =
        sqlx::query_as("SELECT request_id, status, error_kind, (predictions->0->>'index')::bigint, url FROM results")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(stored.len(), 2000, "exactly one row per request");
    let mut top1_by_photo: HashMap<String, i64> = HashMap::new();
    for (id, status, kind, top1, url) in &stored {
        let (expected_kind, expected_url) = &expected[id];
        assert_eq!(url, expected_url);
        match *expected_kind {
            "ok" => {
                assert_eq!(status, "ok", "{url}");
                let photo = url.rsplit('/').next().unwrap().split('?').next().unwrap().to_owned();
                let top1 = top1.unwrap();
                // The same photo gets the same label whichever worker, attempt or batch it was in.
                assert_eq!(*top1_by_photo.entry(photo.clone()).or_insert(top1), top1, "{photo}");
                if photo == "coffee.png" {
                    assert_eq!(top1, ESPRESSO);
                }
            }
            kind_name => assert_eq!(kind.as_deref(), Some(kind_name), "{url}"),
        }
    }
    assert_eq!(top1_by_photo.len(), 22);
    let text = client.get(format!("{}/metrics", stack.sink)).send().await.unwrap().text().await.unwrap();
    let received = reefline_e2e::metric(&text, "sink_results_received_total").unwrap();
    eprintln!(
        "faults: 2000 requests, 2000 rows, {} duplicate results on the topic (redone after the kills)",
        received - 2000.0
    );
    assert!(received >= 2000.0);

    drop(steady);
    drop(victim);
    stack.stop().await;
    drop(pool);
    db.drop_database().await;
}
