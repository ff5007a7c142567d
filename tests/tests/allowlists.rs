//! Each kind of outbound fetch has its own allowlist: with the local stack's (images may come from
//! loopback, feed sources and callbacks may not), a `source_url` or `callback_url` at the services'
//! own loopback ports is refused while a photo on loopback is classified.

use std::time::Duration;

use reefline_e2e::{Stack, TestEnv, post_json, wait_for, wait_for_status};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn loopback_opened_for_images_stays_closed_to_feed_sources_and_callbacks() {
    let env = TestEnv::start().await;
    let mut settings = env.settings();
    // As `make up` runs them: FETCH_ALLOW for the classifier only.
    settings.ingest.source_allow.clear();
    settings.sink.callback_allow.clear();
    assert_eq!(settings.classifier.fetch_allow, ["127.0.0.1/32"]);
    let stack = Stack::start(settings).await;
    let client = reqwest::Client::new();
    reefline_e2e::feeds::wait_for_ledger(&client, &stack.ingest).await;

    // The sink's results, by address and by a name resolving to loopback, are no feed source.
    let port = stack.sink.rsplit(':').next().unwrap();
    for source_url in [format!("{}/v1/results", stack.sink), format!("http://localhost:{port}/v1/results")] {
        let source = json!({ "source_url": source_url });
        let (status, refused) = post_json(&client, &format!("{}/v1/feeds", stack.ingest), &source).await;
        assert_eq!((status, &refused["error"]["kind"]), (400, &json!("unreadable_feed")), "{refused}");
        assert!(refused["error"]["message"].as_str().unwrap().contains("source_url is refused"), "{refused}");
    }

    // A photo on loopback is classified; its callback to ingest's port on loopback is refused.
    let body = json!({
        "images": [format!("{}/photos/coffee.png", env.photos)],
        "callback_url": format!("{}/v1/classify", stack.ingest),
    });
    let (status, accepted) = post_json(&client, &format!("{}/v1/classify", stack.ingest), &body).await;
    assert_eq!(status, 202, "{accepted}");
    let result = format!("{}/v1/results/{}", stack.sink, accepted["request_ids"][0].as_str().unwrap());
    let result = wait_for_status(&client, &result, 200, "the coffee photo's result", Duration::from_secs(60)).await;
    assert_eq!(result["status"], "ok", "{result}");
    let batch = format!("{}/v1/batches/{}", stack.sink, accepted["batch_id"].as_str().unwrap());
    let gave_up = wait_for("the loopback callback given up", Duration::from_secs(60), || {
        let (client, batch) = (client.clone(), batch.clone());
        async move { reefline_e2e::get_json_ok(&client, &batch).await.filter(|b| b["callback"]["state"] == "gave_up") }
    })
    .await;
    let error = gave_up["callback"]["attempts"][0]["error"].as_str().unwrap_or_default();
    assert!(error.contains("not a public address"), "{gave_up}");
    stack.stop().await;
    env.finish().await;
}
