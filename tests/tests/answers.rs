//! Answers in the same call: a submission that asks to `wait` (and the seed-compatible routes, by
//! default) gets its results in the response, from whichever ingest instance it reached.

use std::time::Duration;

use reefline_e2e::{Stack, TestEnv, metric, post_json, wait_for_status};
use serde_json::{Value, json};

const CAT_CLASSES: std::ops::RangeInclusive<i64> = 281..=285; // tabby, tiger cat, Persian, Siamese, Egyptian cat
const ESPRESSO: i64 = 967;

fn top_index(result: &Value) -> i64 {
    result["predictions"][0]["index"].as_i64().unwrap_or_else(|| panic!("no predictions: {result}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_submission_that_waits_gets_its_results_in_the_same_call_from_any_ingest_instance() {
    let env = TestEnv::start().await;
    let settings = env.settings();
    // A second ingest instance, as behind a load balancer: it answers from the same results topic.
    let second = reefline_ingest::Application::build(settings.ingest.clone()).await.expect("a second ingest");
    let second_url = format!("http://{}", second.local_addr());
    tokio::spawn(second.run_until(std::future::pending()));
    let stack = Stack::start(settings).await;
    let client = reqwest::Client::new();
    let photo = |name: &str| format!("{}/photos/{name}", env.photos);

    // Before anything is submitted, the services have registered the contract, so that a camera
    // configured not to register schemas (it looks the latest version up) works on a fresh stack.
    for topic in [&env.names.requests, &env.names.results] {
        let latest = format!("{}/subjects/{topic}-value/versions/latest", env.registry.url);
        let schema =
            wait_for_status(&client, &latest, 200, "the schema registered at start", Duration::from_secs(60)).await;
        assert!(schema["id"].as_u64().is_some(), "{schema}");
    }

    let urls = [photo("coffee.png"), photo("missing.jpg"), photo("chelsea.png")];
    let (status, answer) =
        post_json(&client, &format!("{}/v1/classify", stack.ingest), &json!({ "images": urls, "wait": 60 })).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        (&answer["total"], &answer["completed"], &answer["pending"], &answer["ok"], &answer["error"], &answer["done"]),
        (&json!(3), &json!(3), &json!(0), &json!(2), &json!(1), &json!(true)),
        "{answer}"
    );
    let results = answer["results"].as_array().expect("results");
    let in_order: Vec<&Value> = results.iter().map(|r| &r["request_id"]).collect();
    assert_eq!(in_order, answer["request_ids"].as_array().unwrap().iter().collect::<Vec<_>>(), "in input order");
    assert_eq!((top_index(&results[0]), &results[0]["url"]), (ESPRESSO, &json!(urls[0])));
    assert_eq!((&results[1]["status"], &results[1]["error"]["kind"]), (&json!("error"), &json!("not_found")));
    assert!(CAT_CLASSES.contains(&top_index(&results[2])), "{}", results[2]);
    // The same result as the sink's lookup shows, once the sink has written it (the answer can
    // come first: ingest and the sink read the results topic side by side).
    let lookup = format!("{}/v1/results/{}", stack.sink, results[0]["request_id"].as_str().unwrap());
    let looked_up = wait_for_status(&client, &lookup, 200, "the sink's row", Duration::from_secs(60)).await;
    assert_eq!((&looked_up["predictions"], &looked_up["model"]), (&results[0]["predictions"], &results[0]["model"]));

    // The seed-compatible routes answer inline by default, here through the second instance.
    let (status, infer) =
        post_json(&client, &format!("{second_url}/api/infer"), &json!({ "images": [photo("coffee.png")] })).await;
    assert_eq!((status, &infer["done"]), (200, &json!(true)), "{infer}");
    assert_eq!(top_index(&infer["results"][0]), ESPRESSO);
    let (status, single) =
        post_json(&client, &format!("{second_url}/classify"), &json!({ "image_url": photo("chelsea.png") })).await;
    assert_eq!((status, &single["status"], &single["batch_index"]), (200, &json!("ok"), &json!(0)), "{single}");
    assert!(CAT_CLASSES.contains(&top_index(&single)), "{single}");
    assert!(single["request_id"].is_string() && single["batch_id"].is_string(), "{single}");
    // Without `wait`, /v1/classify answers at once, as before.
    let (status, accepted) =
        post_json(&client, &format!("{}/v1/classify", stack.ingest), &json!({ "images": [photo("coffee.png")] })).await;
    assert_eq!((status, accepted.get("results")), (202, None), "{accepted}");

    // A wait out of range is refused, naming the field.
    for wait in [json!(61), json!(-1), json!("soon")] {
        let body = json!({ "images": [photo("coffee.png")], "wait": wait });
        let (status, refused) = post_json(&client, &format!("{}/v1/classify", stack.ingest), &body).await;
        assert_eq!(
            (status, &refused["error"]["kind"], &refused["error"]["field"]),
            (400, &json!("invalid_field"), &json!("wait")),
            "{refused}"
        );
    }

    let text = client.get(format!("{}/metrics", stack.ingest)).send().await.unwrap().text().await.unwrap();
    assert_eq!(metric(&text, "ingest_waits_total{outcome=\"complete\",route=\"v1_classify\"}"), Some(1.0), "{text}");
    assert_eq!(metric(&text, "ingest_waiting_submissions"), Some(0.0));
    stack.stop().await;
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submission_not_done_in_time_gets_202_with_its_ids_and_what_is_done() {
    let env = TestEnv::start().await;
    let stack = Stack::start_without_classifier(env.settings()).await;
    let client = reqwest::Client::new();
    let urls = [format!("{}/photos/coffee.png", env.photos), format!("{}/photos/chelsea.png", env.photos)];
    let (status, answer) =
        post_json(&client, &format!("{}/v1/classify", stack.ingest), &json!({ "images": urls, "wait": 1 })).await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(
        (&answer["total"], &answer["completed"], &answer["pending"], &answer["done"], &answer["results"]),
        (&json!(2), &json!(0), &json!(2), &json!(false), &json!([]))
    );
    assert_eq!(answer["request_ids"].as_array().map(Vec::len), Some(2), "{answer}");
    let (status, single) =
        post_json(&client, &format!("{}/classify", stack.ingest), &json!({ "image_url": urls[0], "wait": 0.5 })).await;
    assert_eq!(status, 202, "{single}");
    assert!(single["request_id"].is_string() && single["batch_id"].is_string(), "{single}");

    let text = client.get(format!("{}/metrics", stack.ingest)).send().await.unwrap().text().await.unwrap();
    assert_eq!(metric(&text, "ingest_waits_total{outcome=\"timed_out\",route=\"v1_classify\"}"), Some(1.0), "{text}");
    assert_eq!(metric(&text, "ingest_waiting_submissions"), Some(0.0), "a submission that timed out leaves no entry");
    stack.stop().await;
    env.finish().await;
}
