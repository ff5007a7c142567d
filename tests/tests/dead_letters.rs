//! Records that cannot be decoded go to the dead-letter topic with headers saying why and where
//! they came from, and the classifier moves past them.

use std::collections::HashMap;
use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::FutureRecord;
use reefline_common::producer::FutureProducer;
use reefline_e2e::{Stack, TestEnv, metric, post_json, wait_for, wait_for_status};
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

    let mut config = broker.kafka().consumer_config(&format!("{}-reader", names.classifier_group), 6000);
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
    use reefline_common::replay::{ReplayOptions, replay};

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
    let mut v2: serde_json::Value =
        serde_json::from_str(<reefline_schemas::ImageRequest as reefline_schemas::Message>::SCHEMA).unwrap();
    v2["fields"].as_array_mut().unwrap().push(json!({ "name": "camera", "type": ["null", "string"], "default": null }));
    let schema = apache_avro::Schema::parse(&v2).unwrap();
    let request_id = uuid::Uuid::now_v7().to_string();
    let record = apache_avro::types::Value::Record(vec![
        ("request_id".into(), request_id.clone().into()),
        ("batch_id".into(), uuid::Uuid::now_v7().to_string().into()),
        ("batch_index".into(), 0i32.into()),
        ("batch_size".into(), 1i32.into()),
        ("url".into(), coffee.clone().into()),
        ("submitted_at_ms".into(), chrono::Utc::now().timestamp_millis().into()),
        ("source".into(), "kafka".into()),
        ("camera".into(), apache_avro::types::Value::Union(1, Box::new("reef-cam-7".into()))),
    ]);
    let next_id = latest_schema_id(&client, &env.registry.url).await + 1;
    let mut framed = vec![0u8];
    framed.extend_from_slice(&(next_id as u32).to_be_bytes());
    framed.extend(
        apache_avro::writer::datum::GenericDatumWriter::builder(&schema)
            .build()
            .unwrap()
            .write_value_to_vec(record)
            .unwrap(),
    );
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
    let registered: serde_json::Value = client
        .post(format!("{}/subjects/{}-value/versions", env.registry.url, names.requests))
        .json(&json!({ "schema": v2.to_string() }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(registered["id"].as_u64(), Some(next_id), "{registered}");

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
