//! Two survey teams share one stack: each key sees only its own tenant's work, another tenant's
//! ids answer exactly as unknown ones, a `read` key cannot submit, an admin sees everything, and a
//! record produced straight to Kafka cannot claim a tenant.

use std::time::Duration;

use rdkafka::producer::FutureRecord;
use reefline_common::producer::FutureProducer;
use reefline_e2e::feeds::{csv_rows, post_feed, wait_for_ledger};
use reefline_e2e::tenants::{client_with, key_file};
use reefline_e2e::{Stack, TestEnv, get_json, post_json, wait_for, wait_for_status};
use reefline_schemas::ImageRequest;
use serde_json::{Value, json};

fn ids(page: &Value) -> Vec<String> {
    page["results"].as_array().unwrap().iter().map(|r| r["request_id"].as_str().unwrap().to_owned()).collect()
}

/// The whole of `GET {url}`: status, content type and body.
async fn get_text(client: &reqwest::Client, url: &str) -> (u16, String) {
    let response = client.get(url).send().await.unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_key_sees_only_its_own_tenants_work() {
    let env = TestEnv::start().await;
    let mut settings = env.settings();
    let keys = key_file(
        &mut settings,
        &[
            ("reef-key", "reef", "submit"),
            ("kelp-key", "kelp", "submit"),
            ("kelp-reader", "kelp", "read"),
            ("ops-key", "ops", "admin"),
        ],
    );
    let stack = Stack::start(settings).await;
    let (reef, kelp, reader, ops) =
        (client_with("reef-key"), client_with("kelp-key"), client_with("kelp-reader"), client_with("ops-key"));
    let (ingest, sink) = (stack.ingest.clone(), stack.sink.clone());
    let photo = |name: &str| format!("{}/photos/{name}", env.photos);

    // reef submits a photo and a feed; kelp a photo.
    let (status, reef_batch) =
        post_json(&reef, &format!("{ingest}/v1/classify"), &json!({"images": [photo("coffee.png")]})).await;
    assert_eq!(status, 202, "{reef_batch}");
    let reef_batch_id = reef_batch["batch_id"].as_str().unwrap().to_owned();
    let reef_request = reef_batch["request_ids"][0].as_str().unwrap().to_owned();
    let feed_text = format!("{}\nnot a url\n{}\n", photo("chelsea.png"), photo("coffee.png"));
    wait_for_ledger(&reef, &ingest).await;
    let (status, feed, _) =
        post_feed(&reef, &ingest, "text/plain", Some("reef-feed-1"), feed_text.into()).await.unwrap();
    assert_eq!(status, 201, "{feed}");
    assert_eq!((feed["accepted"].as_i64(), feed["rejected"].as_i64()), (Some(2), Some(1)), "{feed}");
    let feed_id = feed["feed_id"].as_str().unwrap().to_owned();
    let reef_result = wait_for_status(
        &reef,
        &format!("{sink}/v1/results/{reef_request}"),
        200,
        "reef's result",
        Duration::from_secs(90),
    )
    .await;
    assert_eq!(reef_result["predictions"][0]["label"], "espresso");

    // kelp sends the same photo: it is classified again, not taken from reef's results.
    let (status, kelp_batch) =
        post_json(&kelp, &format!("{ingest}/v1/classify"), &json!({"images": [photo("coffee.png")]})).await;
    assert_eq!(status, 202, "{kelp_batch}");
    let kelp_batch_id = kelp_batch["batch_id"].as_str().unwrap().to_owned();
    let kelp_request = kelp_batch["request_ids"][0].as_str().unwrap().to_owned();
    let kelp_result = wait_for_status(
        &kelp,
        &format!("{sink}/v1/results/{kelp_request}"),
        200,
        "kelp's result",
        Duration::from_secs(90),
    )
    .await;
    assert_eq!(
        (kelp_result["predictions"][0]["label"].as_str(), kelp_result["cached"].as_bool()),
        (Some("espresso"), Some(false))
    );
    wait_for("reef's feed to be done", Duration::from_secs(90), || {
        let (reef, url) = (reef.clone(), format!("{sink}/v1/feeds/{feed_id}"));
        async move { (get_json(&reef, &url).await.1["done"] == json!(true)).then_some(()) }
    })
    .await;

    // Every route, asked by the other tenant, answers as for an id nobody knows.
    let unknown = uuid::Uuid::now_v7().to_string();
    let probes = [
        format!("{sink}/v1/results/{{}}"),
        format!("{sink}/v1/batches/{{}}"),
        format!("{sink}/v1/batches/{{}}/results"),
        format!("{sink}/v1/feeds/{{}}"),
        format!("{sink}/v1/feeds/{{}}/rejects"),
        format!("{sink}/v1/feeds/{{}}/results?format=ndjson"),
    ];
    let theirs = [&reef_request, &reef_batch_id, &reef_batch_id, &feed_id, &feed_id, &feed_id];
    for (probe, id) in probes.iter().zip(theirs) {
        let (status, body) = get_text(&kelp, &probe.replace("{}", id)).await;
        let (unknown_status, unknown_body) = get_text(&kelp, &probe.replace("{}", &unknown)).await;
        assert_eq!((status, unknown_status), (404, 404), "{probe} of another tenant: {body}");
        assert_eq!(
            body.replace(id.as_str(), "ID"),
            unknown_body.replace(&unknown, "ID"),
            "{probe}: no existence oracle"
        );
        let (status, _) = get_text(&reef, &probe.replace("{}", id)).await;
        assert_eq!(status, 200, "{probe} of its own tenant");
    }
    for retry in [format!("{ingest}/v1/feeds/{feed_id}/retry"), format!("{ingest}/v1/batches/{reef_batch_id}/retry")] {
        let (status, body) = post_json(&kelp, &retry, &json!({})).await;
        assert_eq!((status, body["error"]["kind"].as_str()), (404, Some("not_found")), "{retry}: {body}");
    }

    // Search and exports hold only the caller's rows; an admin's hold everyone's.
    let (_, kelp_page) = get_json(&kelp, &format!("{sink}/v1/results?limit=1000")).await;
    assert_eq!(ids(&kelp_page), [kelp_request.as_str()], "{kelp_page}");
    let (_, reef_page) = get_json(&reef, &format!("{sink}/v1/results?limit=1000")).await;
    assert_eq!(ids(&reef_page).len(), 3, "reef's photo and its feed's two lines: {reef_page}");
    assert!(!ids(&reef_page).contains(&kelp_request));
    let (_, all) = get_json(&ops, &format!("{sink}/v1/results?limit=1000")).await;
    assert_eq!(ids(&all).len(), 4, "{all}");
    let (status, csv) = get_text(&reef, &format!("{sink}/v1/feeds/{feed_id}/results?format=csv")).await;
    assert_eq!(status, 200);
    let (_, rows) = csv_rows(&csv);
    assert_eq!(rows.iter().map(|r| r["line"].as_str()).collect::<Vec<_>>(), ["1", "3"], "{csv}");
    let (status, kelp_csv) = get_text(&kelp, &format!("{sink}/v1/batches/{kelp_batch_id}/results?format=csv")).await;
    assert_eq!((status, csv_rows(&kelp_csv).1.len()), (200, 1), "{kelp_csv}");
    // A search's export, likewise.
    let request_ids = |ndjson: &str| -> Vec<String> {
        ndjson
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap()["request_id"].as_str().unwrap().to_owned())
            .collect()
    };
    let (status, kelp_found) = get_text(&kelp, &format!("{sink}/v1/results/export?format=ndjson")).await;
    assert_eq!((status, request_ids(&kelp_found)), (200, vec![kelp_request.clone()]), "{kelp_found}");
    let (_, reef_found) = get_text(&reef, &format!("{sink}/v1/results/export?format=ndjson")).await;
    assert_eq!(request_ids(&reef_found).len(), 3, "{reef_found}");
    assert!(!request_ids(&reef_found).contains(&kelp_request));
    let (_, all_found) = get_text(&ops, &format!("{sink}/v1/results/export?format=ndjson")).await;
    assert_eq!(request_ids(&all_found).len(), 4, "{all_found}");
    let (status, _) = get_text(&ops, &format!("{sink}/v1/feeds/{feed_id}/rejects")).await;
    assert_eq!(status, 200, "an admin reads every tenant's feeds");

    // A read key reads its tenant's work and submits nothing.
    let (status, _) = get_json(&reader, &format!("{sink}/v1/batches/{kelp_batch_id}")).await;
    assert_eq!(status, 200);
    let (status, refused) =
        post_json(&reader, &format!("{ingest}/v1/classify"), &json!({"images": [photo("coffee.png")]})).await;
    assert_eq!((status, refused["error"]["kind"].as_str()), (403, Some("forbidden")), "{refused}");
    let (status, refused, _) =
        post_feed(&reader, &ingest, "text/plain", None, photo("coffee.png").into()).await.unwrap();
    assert_eq!((status, refused["error"]["kind"].as_str()), (403, Some("forbidden")), "{refused}");
    let (status, _) = post_json(&reader, &format!("{ingest}/v1/batches/{kelp_batch_id}/retry"), &json!({})).await;
    assert_eq!(status, 403);

    // Records produced straight to the requests topic: one that claims no tenant belongs to the
    // topic's (the default); one that claims reef's without ingest's seal is dead-lettered, never
    // reef's (nor anyone's).
    let producer: FutureProducer = env.broker.kafka().producer_config().create().unwrap();
    let codec = reefline_schemas::Codec::new(&env.registry).unwrap();
    let request = |tenant: Option<&str>| ImageRequest {
        request_id: uuid::Uuid::now_v7().to_string(),
        batch_id: uuid::Uuid::now_v7().to_string(),
        batch_index: 0,
        batch_size: 1,
        url: photo("chelsea.png"),
        submitted_at_ms: chrono::Utc::now().timestamp_millis(),
        source: "kafka".into(),
        tenant: tenant.map(Into::into),
        ..ImageRequest::default()
    };
    let (camera, forged) = (request(None), request(Some("reef")));
    for record in [&camera, &forged] {
        let payload = codec.encode(&env.names.requests, record).await.unwrap();
        let message = FutureRecord::to(&env.names.requests).key(&record.request_id).payload(&payload);
        producer.send(message, Duration::from_secs(10)).await.map_err(|(e, _)| e).unwrap();
    }
    let camera_url = format!("{sink}/v1/results/{}", camera.request_id);
    wait_for_status(&ops, &camera_url, 200, "the camera's result", Duration::from_secs(90)).await;
    assert_eq!(get_json(&reef, &camera_url).await.0, 404);
    let metric = "classifier_dead_letters_total{kind=\"unsealed_tenant\"}";
    let what = "the forged record dead-lettered";
    reefline_e2e::wait_for_metric(&ops, &stack.classifier_ops, metric, |n| n == 1.0, what, Duration::from_secs(60))
        .await;
    let forged_url = format!("{sink}/v1/results/{}", forged.request_id);
    assert_eq!(get_json(&ops, &forged_url).await.0, 404, "no result, no pending request");
    let tenant: String = sqlx::query_scalar("SELECT tenant FROM results WHERE request_id = $1")
        .bind(&camera.request_id)
        .fetch_one(&env.db.pool().await)
        .await
        .unwrap();
    assert_eq!(tenant, "default");

    stack.stop().await;
    std::fs::remove_file(keys).unwrap();
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tenant_over_its_quota_gets_429_and_loses_nothing() {
    let env = TestEnv::start().await;
    let mut settings = env.settings();
    // One image a second, two at once.
    settings.ingest.tenant_images_per_second = 1;
    settings.ingest.max_images = 2;
    let keys = key_file(&mut settings, &[("reef-key", "reef", "submit"), ("kelp-key", "kelp", "submit")]);
    let stack = Stack::start(settings).await;
    let (reef, kelp) = (client_with("reef-key"), client_with("kelp-key"));
    let (ingest, sink) = (stack.ingest.clone(), stack.sink.clone());
    let photo = |name: &str| format!("{}/photos/{name}", env.photos);
    let classify = format!("{ingest}/v1/classify");

    let (status, accepted) =
        post_json(&reef, &classify, &json!({"images": [photo("coffee.png"), photo("chelsea.png")]})).await;
    assert_eq!(status, 202, "{accepted}");
    let response = reef.post(&classify).json(&json!({"images": [photo("coffee.png")]})).send().await.unwrap();
    assert_eq!(response.status(), 429);
    let retry_after: u64 = response.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=2).contains(&retry_after), "{retry_after}");
    let refused: Value = response.json().await.unwrap();
    assert_eq!(refused["error"]["kind"], "quota_exceeded");
    assert!(refused["error"]["message"].as_str().unwrap().contains("1 images a second"), "{refused}");
    // Another tenant is not slowed by reef's use.
    let (status, _) =
        post_json(&kelp, &classify, &json!({"images": [photo("coffee.png"), photo("chelsea.png")]})).await;
    assert_eq!(status, 202);
    // A feed waits for its tenant's turn instead of being refused: every line is accepted.
    let text = format!("{}\n{}\n{}\n", photo("coffee.png"), photo("chelsea.png"), photo("coffee.png?again=1"));
    wait_for_ledger(&reef, &ingest).await;
    let (status, feed, _) = post_feed(&reef, &ingest, "text/plain", Some("quota-feed"), text.into()).await.unwrap();
    assert_eq!((status, feed["accepted"].as_i64()), (201, Some(3)), "{feed}");

    // Nothing accepted is lost: the batch and the feed complete.
    let batch = format!("{sink}/v1/batches/{}", accepted["batch_id"].as_str().unwrap());
    wait_for("reef's batch", Duration::from_secs(90), || {
        let (reef, batch) = (reef.clone(), batch.clone());
        async move { (get_json(&reef, &batch).await.1["done"] == json!(true)).then_some(()) }
    })
    .await;
    let feed_url = format!("{sink}/v1/feeds/{}", feed["feed_id"].as_str().unwrap());
    let done = wait_for("reef's feed", Duration::from_secs(90), || {
        let (reef, feed_url) = (reef.clone(), feed_url.clone());
        async move { Some(get_json(&reef, &feed_url).await.1).filter(|f| f["done"] == json!(true)) }
    })
    .await;
    assert_eq!(done["ok"], 3, "{done}");
    let metrics = reqwest::get(format!("{ingest}/metrics")).await.unwrap().text().await.unwrap();
    assert_eq!(reefline_e2e::metric(&metrics, "ingest_quota_refusals_total{tenant=\"reef\"}"), Some(1.0), "{metrics}");

    stack.stop().await;
    std::fs::remove_file(keys).unwrap();
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tenants_images_of_the_day_are_counted_across_submissions_and_feeds() {
    let env = TestEnv::start().await;
    let mut settings = env.settings();
    settings.ingest.tenant_images_per_day = 3;
    let keys = key_file(&mut settings, &[("reef-key", "reef", "submit"), ("kelp-key", "kelp", "submit")]);
    let stack = Stack::start_without_classifier(settings).await;
    let (reef, kelp) = (client_with("reef-key"), client_with("kelp-key"));
    let ingest = stack.ingest.clone();
    let classify = format!("{ingest}/v1/classify");
    let urls = |n: usize| (0..n).map(|i| format!("https://photos.example/{i}.jpg")).collect::<Vec<_>>();
    // Ingest counts the day in the database it reaches with the feeds ledger.
    wait_for_ledger(&reef, &ingest).await;

    let (status, _) = post_json(&reef, &classify, &json!({"images": urls(2)})).await;
    assert_eq!(status, 202);
    let response = reef.post(&classify).json(&json!({"images": urls(2)})).send().await.unwrap();
    assert_eq!(response.status(), 429);
    assert!(response.headers()["retry-after"].to_str().unwrap().parse::<u64>().unwrap() <= 86_400);
    let refused: Value = response.json().await.unwrap();
    assert_eq!(refused["error"]["kind"], "quota_exceeded");
    assert!(refused["error"]["message"].as_str().unwrap().contains("3 images a day"), "{refused}");
    // A feed stops before the chunk that would go over; what it settled stays.
    let lines: String = urls(2).iter().map(|u| format!("{u}?feed\n")).collect();
    let (status, refused, _) = post_feed(&reef, &ingest, "text/plain", Some("day-feed"), lines.into()).await.unwrap();
    assert_eq!((status, &refused["error"]["kind"]), (429, &json!("quota_exceeded")), "{refused}");
    // The last image of the day fits; another tenant has a day of its own.
    let (status, _) = post_json(&reef, &classify, &json!({"images": urls(1)})).await;
    assert_eq!(status, 202);
    let (status, _) = post_json(&kelp, &classify, &json!({"images": urls(3)})).await;
    assert_eq!(status, 202);
    // Small submissions travel the interactive lane; the feed put nothing on the broker.
    let kafka = env.broker.kafka();
    let sizes = (
        reefline_e2e::topic_size(&kafka, &env.names.requests).await,
        reefline_e2e::topic_size(&kafka, &env.names.interactive).await,
    );
    assert_eq!(sizes, (0, 6));

    stack.stop().await;
    std::fs::remove_file(keys).unwrap();
    env.finish().await;
}
