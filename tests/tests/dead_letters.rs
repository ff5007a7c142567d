//! Records that cannot be decoded go to the dead-letter topic with headers saying why and where
//! they came from, and the classifier moves past them.

use std::collections::HashMap;
use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use reefline_e2e::{Stack, TestEnv, get_json_ok, metric, post_json, wait_for};
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
    let result = wait_for("the good record's result", Duration::from_secs(60), || {
        let (client, url) = (client.clone(), url.clone());
        async move { get_json_ok(&client, &url).await }
    })
    .await;
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
