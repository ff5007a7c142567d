//! Records that cannot be decoded go to the dead-letter topic with headers saying why and where
//! they came from, and the classifier moves past them.

use std::collections::HashMap;
use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::FutureRecord;
use reefline_common::producer::FutureProducer;
use reefline_e2e::{Stack, TestEnv, camera, get_json, metric, post_json, wait_for, wait_for_metric, wait_for_status};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn poison_records_are_dead_lettered_and_good_ones_still_flow() {
    let env = TestEnv::start().await;
    let stack = Stack::start(env.settings()).await;
    let (broker, names) = (&env.broker, &env.names);
    let client = reqwest::Client::new();

    let producer: FutureProducer = broker.kafka().producer_config().create().unwrap();
    let poison: [(&str, &[u8]); 2] =
        [("plain-text", b"not avro at all"), ("unknown-schema", &[0, 0, 0, 0x27, 0x0f, 2, 65])];
    for (key, payload) in poison {
        let record = FutureRecord::to(&names.requests).key(key).payload(payload);
        producer.send(record, Duration::from_secs(10)).await.map_err(|(e, _)| e).unwrap();
    }

    let coffee = format!("{}/photos/coffee.png", env.photos);
    let (_, accepted) =
        post_json(&client, &format!("{}/v1/classify", stack.ingest), &json!({ "images": [coffee] })).await;
    let url = format!("{}/v1/results/{}", stack.sink, accepted["request_ids"][0].as_str().unwrap());
    let result = wait_for_status(&client, &url, 200, "the good record's result", Duration::from_secs(60)).await;
    assert_eq!(result["predictions"][0]["label"], "espresso");

    let mut config = broker.kafka().consumer_config(&format!("{}-reader", names.classifier_group));
    config.set("enable.auto.commit", "false");
    let reader: StreamConsumer = config.create().unwrap();
    reader.subscribe(&[&names.dead_letter]).unwrap();
    let mut dead: HashMap<String, HashMap<String, String>> = HashMap::new();
    while dead.len() < 2 {
        let message =
            tokio::time::timeout(Duration::from_secs(60), reader.recv()).await.expect("dead letters").unwrap();
        let key = String::from_utf8_lossy(message.key().unwrap()).into_owned();
        let headers = message.headers().unwrap();
        let headers: HashMap<String, String> = headers
            .iter()
            .map(|h| (h.key.to_owned(), String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned()))
            .collect();
        if key == "plain-text" {
            assert_eq!(message.payload(), Some(&b"not avro at all"[..]), "the record is kept as it was");
        }
        dead.insert(key, headers);
    }
    assert_eq!(dead["plain-text"]["reefline-error-kind"], "undecodable");
    assert_eq!(dead["unknown-schema"]["reefline-error-kind"], "schema_registry");
    for headers in dead.values() {
        assert_eq!(headers["reefline-source-topic"], names.requests);
        assert!(headers["reefline-source-partition"].parse::<i32>().is_ok());
        assert!(headers["reefline-source-offset"].parse::<i64>().is_ok());
        assert!(headers["reefline-failed-at-ms"].parse::<i64>().unwrap() > 1_700_000_000_000);
        assert!(!headers["reefline-error"].is_empty());
    }

    let text = client.get(format!("{}/metrics", stack.classifier_ops)).send().await.unwrap().text().await.unwrap();
    assert_eq!(metric(&text, "classifier_dead_letters_total{kind=\"undecodable\"}"), Some(1.0));
    assert_eq!(metric(&text, "classifier_dead_letters_total{kind=\"schema_registry\"}"), Some(1.0));
    assert_eq!(metric(&text, "classifier_in_flight"), Some(0.0), "the consumer moved past them");

    stack.stop().await;
    env.finish().await;
}

/// The latest schema id in the registry, across subjects.
async fn latest_schema_id(client: &reqwest::Client, registry: &str) -> u64 {
    let subjects: Vec<String> = client.get(format!("{registry}/subjects")).send().await.unwrap().json().await.unwrap();
    let mut latest = 0;
    for subject in subjects {
        let url = format!("{registry}/subjects/{subject}/versions/latest");
        let version: serde_json::Value = client.get(url).send().await.unwrap().json().await.unwrap();
        latest = latest.max(version["id"].as_u64().unwrap());
    }
    latest
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dead_letters_are_replayed_after_the_fix() {
    use reefline_tools::replay::{ReplayOptions, replay};

    let env = TestEnv::start().await;
    let stack = Stack::start(env.settings()).await;
    let (broker, names) = (&env.broker, &env.names);
    let client = reqwest::Client::new();
    let coffee = format!("{}/photos/coffee.png", env.photos);

    // One image through first, so that both schemas are registered and the next id is known.
    let (_, accepted) =
        post_json(&client, &format!("{}/v1/classify", stack.ingest), &json!({ "images": [&coffee] })).await;
    let url = format!("{}/v1/results/{}", stack.sink, accepted["request_ids"][0].as_str().unwrap());
    wait_for_status(&client, &url, 200, "the first result", Duration::from_secs(60)).await;

    // A camera system produces with a new version of the request schema (an added optional
    // field) that it has not registered: the id in its records is unknown to the registry.
    let request = camera::request(&coffee);
    let request_id = request.request_id.clone();
    let next_id = latest_schema_id(&client, &env.registry.url).await + 1;
    let framed = camera::framed(next_id as u32, &request);
    let producer: FutureProducer = broker.kafka().producer_config().create().unwrap();
    for (key, payload) in [(request_id.as_str(), &framed[..]), ("plain-text", &b"not avro at all"[..])] {
        let record = FutureRecord::to(&names.requests).key(key).payload(payload);
        producer.send(record, Duration::from_secs(10)).await.map_err(|(e, _)| e).unwrap();
    }
    let kafka = broker.kafka();
    wait_for("two dead letters", Duration::from_secs(60), || {
        let kafka = kafka.clone();
        async move { (reefline_e2e::topic_counts(&kafka, &names.dead_letter).await.0 == 2).then_some(()) }
    })
    .await;

    let options = |kinds: &[&str], dry_run: bool| ReplayOptions {
        dead_letter_topic: names.dead_letter.clone(),
        group: format!("replay-{}", names.classifier_group),
        kinds: kinds.iter().map(|k| k.to_string()).collect(),
        dry_run,
    };
    let dry = replay(&kafka, &options(&[], true)).await.unwrap();
    assert_eq!(dry.read, 2);
    assert_eq!(dry.replayed.get("schema_registry"), Some(&1));
    assert_eq!(dry.replayed.get("undecodable"), Some(&1));

    // The fix: the new version is registered (BACKWARD-compatible) and gets the id the records carry.
    let registered =
        reefline_e2e::camera::register(&client, &env.registry.url, &names.requests, &reefline_e2e::camera::schema_v2())
            .await;
    assert_eq!(u64::from(registered), next_id, "the id the records carry");

    // Replaying only the schema failures sends the camera's record back, and it is classified.
    let summary = replay(&kafka, &options(&["schema_registry"], false)).await.unwrap();
    assert_eq!((summary.read, summary.filtered_out, summary.unroutable), (2, 1, 0), "{summary}");
    assert_eq!(summary.replayed.get("schema_registry"), Some(&1));
    let url = format!("{}/v1/results/{request_id}", stack.sink);
    let result = wait_for_status(&client, &url, 200, "the replayed record's result", Duration::from_secs(60)).await;
    assert_eq!(result["status"], "ok");
    assert_eq!(result["predictions"][0]["label"], "espresso");

    // The group remembers: a second replay finds nothing new.
    let again = replay(&kafka, &options(&[], false)).await.unwrap();
    assert_eq!(again.read, 0, "{again}");
    let text = client.get(format!("{}/metrics", stack.classifier_ops)).send().await.unwrap().text().await.unwrap();
    assert_eq!(metric(&text, "classifier_dead_letters_total{kind=\"schema_registry\"}"), Some(1.0));

    stack.stop().await;
    env.finish().await;
}

/// Reads the dead-letter topic until `count` records have arrived: (key, headers, payload) each.
async fn read_dead_letters(
    kafka: &reefline_common::kafka::KafkaSettings,
    topic: &str,
    count: usize,
) -> Vec<(String, HashMap<String, String>, Vec<u8>)> {
    let mut config = kafka.consumer_config(&format!("reader-{}", uuid::Uuid::now_v7().simple()));
    config.set("enable.auto.commit", "false");
    let reader: StreamConsumer = config.create().unwrap();
    reader.subscribe(&[topic]).unwrap();
    let mut dead = Vec::new();
    while dead.len() < count {
        let message = tokio::time::timeout(Duration::from_secs(60), reader.recv())
            .await
            .unwrap_or_else(|_| panic!("{} of {count} dead letters after 60 s", dead.len()))
            .unwrap();
        let key = String::from_utf8_lossy(message.key().unwrap_or_default()).into_owned();
        let headers: HashMap<String, String> = message
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| (h.key.to_owned(), String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned()))
                    .collect()
            })
            .unwrap_or_default();
        dead.push((key, headers, message.payload().unwrap_or_default().to_vec()));
    }
    dead
}

fn result(url: &str, status: reefline_schemas::Status, label: &str) -> reefline_schemas::ClassificationResult {
    let r = camera::request(url);
    let ok = status == reefline_schemas::Status::Ok;
    reefline_schemas::ClassificationResult {
        request_id: r.request_id,
        batch_id: r.batch_id,
        batch_index: 0,
        batch_size: 1,
        url: r.url,
        status,
        predictions: if ok {
            vec![reefline_schemas::Prediction {
                index: 1,
                wnid: "n01443537".into(),
                label: label.into(),
                scientific_name: None,
                score: 0.9,
            }]
        } else {
            Vec::new()
        },
        model_name: "efficientnet-lite0".into(),
        model_version: "test".into(),
        error_kind: (!ok).then(|| "timeout".into()),
        error_message: (!ok).then(|| "fetching the image timed out after 20 s".into()),
        submitted_at_ms: r.submitted_at_ms,
        completed_at_ms: r.submitted_at_ms + 100,
        ..Default::default()
    }
}

/// Encodes `item` for `topic` and produces it keyed by `key`.
async fn produce<T: reefline_schemas::Message>(
    producer: &FutureProducer,
    codec: &reefline_schemas::Codec,
    topic: &str,
    key: &str,
    item: &T,
) {
    let payload = codec.encode(topic, item).await.unwrap();
    let record = FutureRecord::to(topic).key(key).payload(&payload);
    producer.send(record, Duration::from_secs(10)).await.map_err(|(e, _)| e).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn records_that_break_the_rules_or_that_postgres_refuses_are_dead_lettered_and_the_rest_flows() {
    use reefline_schemas::Status;

    let env = TestEnv::start().await;
    let stack = Stack::start(env.settings()).await;
    let (broker, names) = (&env.broker, &env.names);
    let client = reqwest::Client::new();
    let codec = reefline_schemas::Codec::new(&env.registry).unwrap();
    let producer: FutureProducer = broker.kafka().producer_config().create().unwrap();
    let coffee = format!("{}/photos/coffee.png", env.photos);

    // Requests a camera system might produce straight to Kafka, each one a way to stop a partition
    // or the sink before: a NUL byte in the URL or the request id, a batch id that is not one.
    let mut nul_url = camera::request(&format!("{coffee}\0"));
    nul_url.request_id = uuid::Uuid::now_v7().to_string();
    let mut nul_id = camera::request(&coffee);
    nul_id.request_id = "camera-7\0frame-12".into();
    let mut bad_batch = camera::request(&coffee);
    bad_batch.batch_id = "survey 2026".into();
    let bad_requests = [("nul-url", &nul_url), ("nul-id", &nul_id), ("bad-batch", &bad_batch)];
    for (key, r) in bad_requests {
        produce(&producer, &codec, &names.requests, key, r).await;
    }
    // Results produced straight to the results topic: one breaks the rules (a NUL in its URL), one
    // passes them but Postgres refuses it (a NUL inside a label, which jsonb cannot hold), and one
    // good result beside them.
    let nul_result = result(&format!("{coffee}\0"), Status::Ok, "espresso");
    let refused = result(&coffee, Status::Ok, "gold\0fish");
    let good = result(&coffee, Status::Ok, "goldfish");
    for (key, r) in [("nul-result", &nul_result), ("refused", &refused), ("good", &good)] {
        produce(&producer, &codec, &names.results, key, r).await;
    }

    // Everything behind them keeps flowing: the direct good result and one submitted over HTTP.
    let url = format!("{}/v1/results/{}", stack.sink, good.request_id);
    let stored = wait_for_status(&client, &url, 200, "the good direct result", Duration::from_secs(60)).await;
    assert_eq!(stored["predictions"][0]["label"], "goldfish");
    let (_, accepted) =
        post_json(&client, &format!("{}/v1/classify", stack.ingest), &json!({ "images": [&coffee] })).await;
    let url = format!("{}/v1/results/{}", stack.sink, accepted["request_ids"][0].as_str().unwrap());
    let result = wait_for_status(&client, &url, 200, "the submitted image's result", Duration::from_secs(60)).await;
    assert_eq!(result["predictions"][0]["label"], "espresso");

    let dead = read_dead_letters(&broker.kafka(), &names.dead_letter, 5).await;
    let by_key: HashMap<&str, &HashMap<String, String>> = dead.iter().map(|(k, h, _)| (k.as_str(), h)).collect();
    assert_eq!(by_key.len(), 5, "{by_key:?}");
    for key in ["nul-url", "nul-id", "bad-batch"] {
        assert_eq!(by_key[key]["reefline-error-kind"], "invalid_request", "{key}");
        assert_eq!(by_key[key]["reefline-source-topic"], names.requests);
    }
    assert!(by_key["nul-url"]["reefline-error"].contains("U+0000"), "{:?}", by_key["nul-url"]);
    assert!(by_key["nul-id"]["reefline-error"].starts_with("`request_id` is not a UUID"));
    assert!(by_key["bad-batch"]["reefline-error"].starts_with("`batch_id` is not a UUID"));
    assert_eq!(by_key["nul-result"]["reefline-error-kind"], "invalid_result");
    assert_eq!(by_key["refused"]["reefline-error-kind"], "refused_by_database");
    let reason = &by_key["refused"]["reefline-error"];
    assert!(reason.contains("unsupported Unicode escape sequence (SQLSTATE 22P05)"), "{reason}");
    for key in ["nul-result", "refused"] {
        assert_eq!(by_key[key]["reefline-source-topic"], names.results);
    }
    let (status, _) = get_json(&client, &format!("{}/v1/results/{}", stack.sink, refused.request_id)).await;
    assert_eq!(status, 404, "the refused result is not stored");

    let text = client.get(format!("{}/metrics", stack.classifier_ops)).send().await.unwrap().text().await.unwrap();
    assert_eq!(metric(&text, "classifier_dead_letters_total{kind=\"invalid_request\"}"), Some(3.0));
    assert_eq!(metric(&text, "classifier_in_flight"), Some(0.0));
    let text = client.get(format!("{}/metrics", stack.sink)).send().await.unwrap().text().await.unwrap();
    assert_eq!(metric(&text, "sink_dead_letters_total{kind=\"invalid_result\"}"), Some(1.0));
    assert_eq!(metric(&text, "sink_dead_letters_total{kind=\"refused_by_database\"}"), Some(1.0));
    assert_eq!(metric(&text, "sink_requests_skipped_total"), Some(3.0), "the request log skipped the three too");

    stack.stop().await;
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redo_that_failed_never_replaces_a_good_result() {
    use reefline_schemas::Status;

    let env = TestEnv::start().await;
    let stack = Stack::start_without_classifier(env.settings()).await;
    let names = &env.names;
    let client = reqwest::Client::new();
    let codec = reefline_schemas::Codec::new(&env.registry).unwrap();
    let producer: FutureProducer = env.broker.kafka().producer_config().create().unwrap();
    let url = format!("{}/photos/coffee.png", env.photos);

    // A good result is stored; a redo of the same request then meets a timeout (later, so by
    // time alone it would win), and a second redo arrives in one batch with a third ok one.
    let first = result(&url, Status::Ok, "espresso");
    produce(&producer, &codec, &names.results, &first.request_id, &first).await;
    let lookup = format!("{}/v1/results/{}", stack.sink, first.request_id);
    wait_for_status(&client, &lookup, 200, "the good result", Duration::from_secs(60)).await;

    let mut redo = result(&url, Status::Error, "");
    redo.request_id.clone_from(&first.request_id);
    redo.batch_id.clone_from(&first.batch_id);
    redo.completed_at_ms = first.completed_at_ms + 60_000;
    produce(&producer, &codec, &names.results, &first.request_id, &redo).await;
    // An unrelated error result after it on the same partition (same key): once it is stored,
    // the redo has been read and written.
    let mut marker = result(&url, Status::Error, "");
    marker.completed_at_ms = redo.completed_at_ms;
    produce(&producer, &codec, &names.results, &first.request_id, &marker).await;
    let marker_url = format!("{}/v1/results/{}", stack.sink, marker.request_id);
    wait_for_status(&client, &marker_url, 200, "the marker", Duration::from_secs(60)).await;

    let (_, stored) = get_json(&client, &lookup).await;
    assert_eq!(stored["status"], "ok", "{stored}");
    assert_eq!(stored["predictions"][0]["label"], "espresso");

    // A later ok result does replace it (a redo that succeeded with a new model, say).
    let mut better = result(&url, Status::Ok, "cup");
    better.request_id.clone_from(&first.request_id);
    better.batch_id.clone_from(&first.batch_id);
    better.completed_at_ms = redo.completed_at_ms + 1;
    produce(&producer, &codec, &names.results, &first.request_id, &better).await;
    wait_for("the later good result", Duration::from_secs(60), || async {
        let (_, stored) = get_json(&client, &lookup).await;
        (stored["predictions"][0]["label"] == "cup").then_some(())
    })
    .await;

    stack.stop().await;
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_result_the_broker_cannot_take_is_dead_lettered_and_the_partition_moves_on() {
    let env = TestEnv::start().await;
    let mut settings = env.settings();
    // A broker limit below what an ok result with 200 classes takes (~8 KB), above an error result.
    settings.classifier.kafka.properties.push(reefline_common::kafka::Property::new("message.max.bytes", "4000"));
    settings.classifier.top_k = 200;
    let stack = Stack::start(settings).await;
    let client = reqwest::Client::new();
    let photos = &env.photos;
    let images = [
        format!("{photos}/photos/coffee.png"),
        format!("{photos}/no-such-photo.jpg"),
        format!("{photos}/photos/chelsea.png"),
    ];
    let (status, accepted) =
        post_json(&client, &format!("{}/v1/classify", stack.ingest), &json!({ "images": images })).await;
    assert_eq!(status, 202, "{accepted}");
    let ids: Vec<String> =
        accepted["request_ids"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_owned()).collect();

    let missing = format!("{}/v1/results/{}", stack.sink, ids[1]);
    let result = wait_for_status(&client, &missing, 200, "the small error result", Duration::from_secs(60)).await;
    assert_eq!(result["error"]["kind"], "not_found");

    let dead = read_dead_letters(&env.broker.kafka(), &env.names.dead_letter, 2).await;
    let codec = reefline_schemas::Codec::new(&env.registry).unwrap();
    let mut keys = Vec::new();
    for (key, headers, payload) in &dead {
        assert_eq!(headers["reefline-error-kind"], "result_too_large", "{headers:?}");
        // A small submission travels the interactive lane: a replay sends it back there.
        assert_eq!(headers["reefline-source-topic"], env.names.interactive, "a replay sends it back to be classified");
        let request: reefline_schemas::ImageRequest = codec.decode(Some(payload)).await.unwrap();
        assert_eq!(&request.request_id, key);
        keys.push(key.clone());
    }
    keys.sort();
    let mut expected = vec![ids[0].clone(), ids[2].clone()];
    expected.sort();
    assert_eq!(keys, expected);

    let ops = &stack.classifier_ops;
    wait_for_metric(
        &client,
        ops,
        "classifier_in_flight",
        |v| v == 0.0,
        "nothing left in flight",
        Duration::from_secs(30),
    )
    .await;
    let text = client.get(format!("{ops}/metrics")).send().await.unwrap().text().await.unwrap();
    assert_eq!(metric(&text, "classifier_dead_letters_total{kind=\"result_too_large\"}"), Some(2.0));
    // Nothing is left retrying, so the stop finishes.
    stack.stop().await;
    env.finish().await;
}
