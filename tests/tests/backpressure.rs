//! A stalled stage downstream makes the classifier pause its partitions instead of buffering
//! without bound, and nothing is lost or doubled.

use std::time::Duration;

use reefline_e2e::{Stack, TestEnv, get_json_ok, metric, post_json, slow_engine, wait_for};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_engine_pauses_the_partitions_and_loses_nothing() {
    let env = TestEnv::start().await;
    let mut settings = env.settings();
    settings.classifier.max_batch_size = 4;
    // 16 bulk images in the pipeline, and with one fetch slot 32 waiting for their turn there
    // (and 16 handed over to wait with them): 80 fill it, and the rest wait on the broker.
    settings.classifier.bulk_in_flight = 16;
    settings.classifier.fetch_concurrency = 1;
    // 80 copies of one photo: each must go through the (slow) engine, not the result cache.
    settings.classifier.result_cache = false;
    // A second a batch, so the pipeline stays full longer than the classifier waits before it pauses.
    let stack = Stack::start_with(settings, slow_engine(Duration::from_secs(1), Duration::ZERO)).await;
    let client = reqwest::Client::new();

    let urls: Vec<String> = (0..80).map(|i| format!("{}/photos/coffee.png?copy={i}", env.photos)).collect();
    let (_, accepted) = post_json(&client, &format!("{}/v1/classify", stack.ingest), &json!({ "images": urls })).await;
    let batch_url = format!("{}/v1/batches/{}", stack.sink, accepted["batch_id"].as_str().unwrap());
    let batch = wait_for("80 results behind a slow engine", Duration::from_secs(180), || {
        let (client, url) = (client.clone(), batch_url.clone());
        async move { get_json_ok(&client, &url).await.filter(|b| b["done"] == true) }
    })
    .await;
    assert_eq!((batch["completed"].as_i64(), batch["ok"].as_i64()), (Some(80), Some(80)));

    let rows: i64 = sqlx::query_scalar("SELECT count(DISTINCT request_id) FROM results")
        .fetch_one(&env.db.pool().await)
        .await
        .unwrap();
    assert_eq!(rows, 80);

    let text = client.get(format!("{}/metrics", stack.classifier_ops)).send().await.unwrap().text().await.unwrap();
    let pauses = metric(&text, "classifier_consumer_pauses_total").unwrap();
    assert!(pauses >= 1.0, "the consumer never paused: {pauses}");
    assert_eq!(metric(&text, "classifier_consumer_paused"), Some(0.0), "resumed once drained");
    assert_eq!(metric(&text, "classifier_in_flight"), Some(0.0));
    let batches = metric(&text, "classifier_batch_size_count{model=\"efficientnet-lite0\"}").unwrap();
    let images = metric(&text, "classifier_batch_size_sum{model=\"efficientnet-lite0\"}").unwrap();
    assert_eq!(images, 80.0);
    assert!(batches >= 20.0, "batches hold at most 4 images: {batches}");

    stack.stop().await;
    env.finish().await;
}
