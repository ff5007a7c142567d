//! Fair to share: interactive work travels a lane of its own that every classifier reads first, so
//! a single photo is answered while a bulk backlog waits; and feeds being read share the
//! classifiers, so a second feed is not queued behind the whole of a first.

use std::time::Duration;

use reefline_e2e::feeds::{post_feed, wait_for_ledger};
use reefline_e2e::tenants::{client_with, key_file};
use reefline_e2e::{Stack, TestEnv, get_json, get_json_ok, metric, post_json, wait_for};
use serde_json::{Value, json};

const CAT_CLASSES: std::ops::RangeInclusive<i64> = 281..=285; // tabby, tiger cat, Persian, Siamese, Egyptian cat

/// The real engine, `per_image` slower an image.
fn slow(per_image: Duration) -> reefline_e2e::EngineWrap {
    reefline_e2e::slow_engine(Duration::ZERO, per_image)
}

async fn metrics(client: &reqwest::Client, url: &str) -> String {
    client.get(format!("{url}/metrics")).send().await.unwrap().text().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_interactive_request_is_answered_while_a_bulk_backlog_waits() {
    let env = TestEnv::start().await;
    let mut settings = env.settings();
    // Every copy of the photo goes through the (slow) engine, not the result cache.
    settings.classifier.result_cache = false;
    let stack = Stack::start_with(settings, slow(Duration::from_millis(40))).await;
    let client = reqwest::Client::new();
    let photo = |name: &str| format!("{}/photos/{name}", env.photos);

    // 600 images in one submission travel the bulk lane: 24 s of the engine at the least.
    let urls: Vec<String> = (0..600).map(|i| format!("{}?bulk={i}", photo("coffee.png"))).collect();
    let (status, bulk) = post_json(&client, &format!("{}/v1/classify", stack.ingest), &json!({ "images": urls })).await;
    assert_eq!(status, 202, "{bulk}");
    let batch_url = format!("{}/v1/batches/{}", stack.sink, bulk["batch_id"].as_str().unwrap());
    wait_for("the bulk work under way", Duration::from_secs(120), || {
        let (client, url) = (client.clone(), batch_url.clone());
        async move { get_json_ok(&client, &url).await.filter(|b| b["completed"].as_i64() >= Some(8)) }
    })
    .await;

    // A single photo, waiting for its answer, goes ahead of the backlog: answered while the bulk
    // submission is far from done (behind it, it would wait for all 600).
    let (status, single) = post_json(
        &client,
        &format!("{}/classify", stack.ingest),
        &json!({ "image_url": photo("chelsea.png"), "wait": 60 }),
    )
    .await;
    assert_eq!((status, &single["status"]), (200, &json!("ok")), "{single}");
    assert!(CAT_CLASSES.contains(&single["predictions"][0]["index"].as_i64().unwrap()), "{single}");
    let (_, batch) = get_json(&client, &batch_url).await;
    let completed = batch["completed"].as_i64().unwrap();
    assert!(completed < 300, "the single photo waited behind {completed} of the 600 bulk images");

    // A small submission that says so travels the bulk lane, where the classifier takes each
    // submission's (and feed's) requests in turn: it is done long before the 600 are, though it
    // was read behind them all. A lane that does not exist is refused.
    let urls: Vec<String> = (0..20).map(|i| format!("{}?second={i}", photo("coffee.png"))).collect();
    let body = json!({ "images": urls, "priority": "bulk" });
    let (status, second) = post_json(&client, &format!("{}/v1/classify", stack.ingest), &body).await;
    assert_eq!(status, 202, "{second}");
    let second_url = format!("{}/v1/batches/{}", stack.sink, second["batch_id"].as_str().unwrap());
    let second = wait_for("the second bulk submission done", Duration::from_secs(120), || {
        let (client, url) = (client.clone(), second_url.clone());
        async move { get_json_ok(&client, &url).await.filter(|b| b["done"] == true) }
    })
    .await;
    assert_eq!(second["ok"], 20, "{second}");
    let (_, batch) = get_json(&client, &batch_url).await;
    let completed = batch["completed"].as_i64().unwrap();
    assert!(completed < 450, "the second bulk submission waited behind {completed} of the first's 600 images");
    let body = json!({ "images": [photo("coffee.png")], "priority": "urgent" });
    let (status, refused) = post_json(&client, &format!("{}/v1/classify", stack.ingest), &body).await;
    assert_eq!(
        (status, &refused["error"]["kind"], &refused["error"]["field"]),
        (400, &json!("invalid_field"), &json!("priority")),
        "{refused}"
    );
    let ingest = metrics(&client, &stack.ingest).await;
    assert_eq!(metric(&ingest, "ingest_lane_images_total{lane=\"interactive\"}"), Some(1.0));
    assert_eq!(metric(&ingest, "ingest_lane_images_total{lane=\"bulk\"}"), Some(620.0));
    let classifier = metrics(&client, &stack.classifier_ops).await;
    let interactive = "classifier_stage_seconds_count{lane=\"interactive\",stage=\"infer\"}";
    assert_eq!(metric(&classifier, interactive), Some(1.0), "one interactive request went through the engine");

    // Everything still arrives, once.
    let batch = wait_for("the bulk submission done", Duration::from_secs(300), || {
        let (client, url) = (client.clone(), batch_url.clone());
        async move { get_json_ok(&client, &url).await.filter(|b| b["done"] == true) }
    })
    .await;
    assert_eq!((batch["completed"].as_i64(), batch["ok"].as_i64()), (Some(600), Some(600)), "{batch}");

    stack.stop().await;
    env.finish().await;
}

/// A feed's progress, as its tenant sees it.
async fn progress(client: &reqwest::Client, sink: &str, feed_id: &str) -> Value {
    get_json_ok(client, &format!("{sink}/v1/feeds/{feed_id}")).await.expect("the feed's progress")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_second_tenants_feed_is_served_beside_a_first_not_behind_it() {
    let env = TestEnv::start().await;
    let mut settings = env.settings();
    settings.classifier.result_cache = false;
    // A small window, so that the test's feeds are long beside it.
    settings.ingest.feed_window_images = 48;
    key_file(&mut settings, &[("reef-key", "reef", "submit"), ("kelp-key", "kelp", "submit")]);
    let stack = Stack::start_with(settings, slow(Duration::from_millis(20))).await;
    let (reef, kelp) = (client_with("reef-key"), client_with("kelp-key"));
    let (ingest, sink) = (stack.ingest.clone(), stack.sink.clone());
    wait_for_ledger(&reef, &ingest).await;
    let lines = |n: usize, tag: &str| -> String {
        (0..n).map(|i| format!("{}/photos/coffee.png?{tag}={i}\n", env.photos)).collect()
    };

    // reef's feed of 400 photos: its upload is read as its share of the classifiers frees, so
    // the answer comes only once its last lines are on the broker.
    let first = {
        let (reef, ingest, text) = (reef.clone(), ingest.clone(), lines(400, "reef"));
        tokio::spawn(async move { post_feed(&reef, &ingest, "text/plain", Some("reef-1"), text.into()).await })
    };
    let reef_feed: String = wait_for("reef's feed under way", Duration::from_secs(120), || {
        let (reef, sink) = (reef.clone(), sink.clone());
        async move {
            let (_, page) = get_json(&reef, &format!("{sink}/v1/results?limit=1")).await;
            page["results"][0]["feed_id"].as_str().map(str::to_owned)
        }
    })
    .await;

    // kelp's feed of 40, started while reef's has hundreds of lines to go, is done before it.
    let (status, kelp_feed, _) =
        post_feed(&kelp, &ingest, "text/plain", Some("kelp-1"), lines(40, "kelp").into()).await.unwrap();
    assert_eq!((status, &kelp_feed["accepted"]), (201, &json!(40)), "{kelp_feed}");
    let kelp_id = kelp_feed["feed_id"].as_str().unwrap().to_owned();
    let kelp_done = wait_for("kelp's feed done", Duration::from_secs(300), || {
        let (kelp, sink, id) = (kelp.clone(), sink.clone(), kelp_id.clone());
        async move { Some(progress(&kelp, &sink, &id).await).filter(|p| p["done"] == true) }
    })
    .await;
    let reef_then = progress(&reef, &sink, &reef_feed).await;
    assert_eq!((&kelp_done["completed"], &kelp_done["ok"]), (&json!(40), &json!(40)), "{kelp_done}");
    assert_eq!(reef_then["done"], false, "kelp's feed waited behind reef's: {reef_then}");
    let reef_left = 400 - reef_then["completed"].as_i64().unwrap();
    assert!(reef_left > 100, "kelp's feed finished with only {reef_left} of reef's lines left: {reef_then}");
    // Still being read, reef's feed has a share of the last minute's results and an estimated
    // finish, from its upload's size and the bytes read at its last checkpoint (a small upload
    // like this one is read ahead of its lines, so the estimate itself is rough).
    assert_eq!(reef_then["state"], "reading", "{reef_then}");
    let share = reef_then["share"].as_f64().unwrap();
    assert!(share > 0.0 && share < 1.0, "{reef_then}");
    assert!(reef_then["eta_seconds"].as_f64().is_some_and(|eta| eta >= 0.0), "{reef_then}");

    // reef's feed ends whole: its upload answered once its last chunk was on the broker.
    let (status, reef_accepted, _) = first.await.unwrap().unwrap();
    assert_eq!((status, &reef_accepted["accepted"]), (201, &json!(400)), "{reef_accepted}");
    let reef_done = wait_for("reef's feed done", Duration::from_secs(300), || {
        let (reef, sink, id) = (reef.clone(), sink.clone(), reef_feed.clone());
        async move { Some(progress(&reef, &sink, &id).await).filter(|p| p["done"] == true) }
    })
    .await;
    assert_eq!((&reef_done["completed"], &reef_done["ok"]), (&json!(400), &json!(400)), "{reef_done}");
    let text = metrics(&reef, &ingest).await;
    assert!(metric(&text, "ingest_feed_share_wait_seconds_count").unwrap() > 0.0, "the feeds waited for their share");

    stack.stop().await;
    env.finish().await;
}
