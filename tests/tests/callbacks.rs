//! Told when it is done: a submission's (and a feed's) signed callback, tried again after a failure
//! and delivered once, its attempts at the batch (or feed) lookup, and its `BatchCompleted` record on
//! the batches topic: one for the feed, none for the batches its chunks travel in.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use reefline_e2e::{Stack, TestEnv, get_json, post_json, serve, wait_for};
use reefline_schemas::{BatchCompleted, Codec};
use serde_json::{Value, json};

const SECRET: &str = "callback-test-secret";

/// Calls received: (hook name, signature if it verified, body). The first call of each hook is
/// answered 500.
type Calls = Arc<Mutex<Vec<(String, Option<String>, Value)>>>;

fn receiver(calls: Calls) -> Router {
    Router::new()
        .route(
            "/hooks/{name}",
            axum::routing::post(
                |State(calls): State<Calls>,
                 axum::extract::Path(name): axum::extract::Path<String>,
                 headers: HeaderMap,
                 body: axum::body::Bytes| async move {
                    let signature = headers.get("reefline-signature").map(|v| v.to_str().unwrap().to_owned());
                    let mut calls = calls.lock().unwrap();
                    let first = !calls.iter().any(|(n, _, _)| n == &name);
                    // The signature is checked on the bytes as sent, before they are parsed.
                    let verified = signature.as_deref().is_some_and(|s| verify(s, &body));
                    calls.push((
                        name,
                        signature.filter(|_| verified),
                        serde_json::from_slice(&body).unwrap_or(Value::Null),
                    ));
                    if first { StatusCode::INTERNAL_SERVER_ERROR } else { StatusCode::NO_CONTENT }
                },
            ),
        )
        .with_state(calls)
}

/// Checks `t=<unix>,v1=<hex>` against HMAC-SHA256 of "<t>.<body>", as a receiver would.
fn verify(header: &str, body: &[u8]) -> bool {
    use hmac::Mac;
    let parts: std::collections::HashMap<&str, &str> = header.split(',').filter_map(|p| p.split_once('=')).collect();
    let (Some(t), Some(v1)) = (parts.get("t"), parts.get("v1")) else { return false };
    let fresh = t.parse::<i64>().is_ok_and(|t| (chrono::Utc::now().timestamp() - t).abs() < 300);
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(format!("{t}.").as_bytes());
    mac.update(body);
    fresh && hex::decode(v1).is_ok_and(|tag| mac.verify_slice(&tag).is_ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_finished_submission_or_feed_is_announced_once_by_a_signed_callback_and_a_batch_completed_record() {
    let env = TestEnv::start().await;
    let mut settings = env.settings();
    settings.sink.callback_secret = Some(SECRET.into());
    // Two lines a chunk: the feed below travels in two batches.
    settings.ingest.feed_chunk_lines = 2;
    let stack = Stack::start(settings).await;
    let calls: Calls = Arc::default();
    let hooks = serve(receiver(calls.clone())).await;
    let client = reqwest::Client::new();
    let photo = |name: &str| format!("{}/photos/{name}", env.photos);

    let body = json!({
        "images": [photo("coffee.png"), photo("missing.jpg")],
        "callback_url": format!("http://{hooks}/hooks/survey"),
    });
    let (status, accepted) = post_json(&client, &format!("{}/v1/classify", stack.ingest), &body).await;
    assert_eq!(status, 202, "{accepted}");
    let batch_id = accepted["batch_id"].as_str().unwrap().to_owned();
    // A callback to an address the fetch rules refuse is given up at once, not tried for a day.
    let blocked = json!({ "images": [photo("coffee.png")], "callback_url": "http://169.254.169.254/hook" });
    let (_, blocked) = post_json(&client, &format!("{}/v1/classify", stack.ingest), &blocked).await;
    // A feed of four lines: two photos, one that is missing, one line that is no URL; sent again
    // while ingest has not reached its database yet (503).
    let csv = format!(
        "url,station\n{},A\n{},B\n{},C\nnot a url,D\n",
        photo("coffee.png?n=1"),
        photo("coffee.png?n=2"),
        photo("missing.jpg")
    );
    let feed_hook = format!("http://{hooks}/hooks/feed");
    let upload =
        reqwest::Url::parse_with_params(&format!("{}/v1/feeds", stack.ingest), [("callback_url", &feed_hook)]).unwrap();
    let (status, feed) = wait_for("ingest's feeds ledger", Duration::from_secs(60), || {
        let request = client.post(upload.clone()).header("content-type", "text/csv").body(csv.clone());
        async move {
            let response = request.send().await.ok()?;
            let status = response.status().as_u16();
            (status != 503).then_some((status, response.json::<Value>().await.ok()?))
        }
    })
    .await;
    assert_eq!(
        (status, &feed["accepted"], &feed["rejected"], &feed["batches"]),
        (201, &json!(3), &json!(1), &json!(2)),
        "{feed}"
    );
    let feed_id = feed["feed_id"].as_str().unwrap().to_owned();

    // The first call is answered 500, so it is tried again; the second is answered 204: delivered.
    let batch_url = format!("{}/v1/batches/{batch_id}", stack.sink);
    let batch = wait_for("the callback delivered", Duration::from_secs(120), || {
        let (client, url) = (client.clone(), batch_url.clone());
        async move { reefline_e2e::get_json_ok(&client, &url).await.filter(|b| b["callback"]["state"] == "delivered") }
    })
    .await;
    let attempts = batch["callback"]["attempts"].as_array().expect("attempts");
    let statuses: Vec<&Value> = attempts.iter().map(|a| &a["status"]).collect();
    assert_eq!(statuses, [&json!(500), &json!(204)], "{batch}");
    assert_eq!(
        batch["callback"]["next_attempt_at"],
        Value::Null,
        "nothing more is due: it is called once more at most"
    );
    let feed_url = format!("{}/v1/feeds/{feed_id}", stack.sink);
    let followed = wait_for("the feed's callback delivered", Duration::from_secs(120), || {
        let (client, url) = (client.clone(), feed_url.clone());
        async move { reefline_e2e::get_json_ok(&client, &url).await.filter(|f| f["callback"]["state"] == "delivered") }
    })
    .await;
    let statuses: Vec<&Value> =
        followed["callback"]["attempts"].as_array().unwrap().iter().map(|a| &a["status"]).collect();
    assert_eq!(statuses, [&json!(500), &json!(204)], "{followed}");
    assert_eq!((&followed["done"], &followed["callback"]["url"]), (&json!(true), &json!(feed_hook)), "{followed}");
    assert!(followed["completed_at"].is_string(), "{followed}");

    let calls = calls.lock().unwrap().clone();
    let (survey, feeds): (Vec<_>, Vec<_>) = calls.iter().partition(|(name, _, _)| name == "survey");
    assert_eq!((survey.len(), feeds.len()), (2, 2), "{calls:?}");
    for (_, signature, summary) in &feeds {
        assert!(signature.is_some(), "every call is signed with the configured secret");
        assert_eq!(
            (&summary["type"], &summary["feed_id"], &summary["total"], &summary["ok"], &summary["error"]),
            (&json!("feed.completed"), &json!(feed_id), &json!(3), &json!(2), &json!(1)),
            "{summary}"
        );
        assert_eq!(summary["links"]["feed"].as_str().map(|l| l.ends_with(&format!("/v1/feeds/{feed_id}"))), Some(true));
    }
    for (_, signature, summary) in &survey {
        assert!(signature.is_some(), "every call is signed with the configured secret");
        assert_eq!(
            (&summary["type"], &summary["batch_id"], &summary["total"], &summary["ok"], &summary["error"]),
            (&json!("batch.completed"), &json!(batch_id), &json!(2), &json!(1), &json!(1)),
            "{summary}"
        );
        assert_eq!(
            summary["links"]["batch"].as_str().map(|l| l.ends_with(&format!("/v1/batches/{batch_id}"))),
            Some(true)
        );
    }

    let blocked_url = format!("{}/v1/batches/{}", stack.sink, blocked["batch_id"].as_str().unwrap());
    let gave_up = wait_for("the blocked callback given up", Duration::from_secs(120), || {
        let (client, url) = (client.clone(), blocked_url.clone());
        async move { reefline_e2e::get_json_ok(&client, &url).await.filter(|b| b["callback"]["state"] == "gave_up") }
    })
    .await;
    let error = gave_up["callback"]["attempts"][0]["error"].as_str().unwrap_or_default();
    assert!(error.contains("not a public address"), "{gave_up}");
    assert_eq!(gave_up["callback"]["attempts"].as_array().map(Vec::len), Some(1));

    // One BatchCompleted record per batch on the batches topic, with the same counts; the feed's
    // under its feed id, and none for the batches of its chunks (which complete before it does).
    let mut config = env.broker.kafka().consumer_config(&format!("{}-batches-reader", env.names.sink_group));
    config.set("enable.auto.commit", "false");
    let reader: StreamConsumer = config.create().unwrap();
    reader.subscribe(&[&env.names.batches]).unwrap();
    let codec = Codec::new(&env.registry).unwrap();
    let mut seen: Vec<BatchCompleted> = Vec::new();
    while seen.len() < 3 {
        let message =
            tokio::time::timeout(Duration::from_secs(60), reader.recv()).await.expect("batch records").unwrap();
        let record: BatchCompleted = codec.decode(message.payload()).await.expect("a BatchCompleted record");
        assert_eq!(message.key(), Some(record.batch_id.as_bytes()), "keyed by batch id");
        seen.push(record);
    }
    let mut ids: Vec<&str> = seen.iter().map(|b| b.batch_id.as_str()).collect();
    ids.sort_unstable();
    let mut expected = [batch_id.as_str(), blocked["batch_id"].as_str().unwrap(), feed_id.as_str()];
    expected.sort_unstable();
    assert_eq!(ids, expected, "{seen:?}");
    let counts = |id: &str| seen.iter().find(|b| b.batch_id == id).map(|b| (b.total, b.ok, b.error, b.marine));
    assert_eq!(counts(&batch_id), Some((2, 1, 1, 0)));
    assert_eq!(counts(&feed_id), Some((3, 2, 1, 0)));
    // Nothing else was produced there, before or after: no record for a chunk, none twice.
    assert_eq!(reefline_e2e::topic_size(&env.broker.kafka(), &env.names.batches).await, 3);
    let (status, plain) = get_json(&client, &format!("{}/v1/batches/{batch_id}", stack.sink)).await;
    assert_eq!((status, &plain["done"]), (200, &json!(true)));

    // While a feed is still being read, its callback is shown waiting (its batches row is written
    // once the feed is read). This upload then breaks off, so the feed never completes.
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<String>>(2);
    let body = reqwest::Body::wrap_stream(futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|chunk| (chunk, rx))
    }));
    let later_hook = format!("http://{hooks}/hooks/later");
    let upload =
        reqwest::Url::parse_with_params(&format!("{}/v1/feeds", stack.ingest), [("callback_url", &later_hook)])
            .unwrap();
    let request = client.post(upload).header("content-type", "text/csv").body(body).send();
    let upload = tokio::spawn(request);
    // More than the 4 KiB a feed's fingerprint reads before the feed is opened.
    let rows: String = (3..100).map(|n| format!("{},E\n", photo(&format!("coffee.png?n={n}")))).collect();
    tx.send(Ok(format!("url,station\n{rows}"))).await.unwrap();
    let pool = env.db.pool().await;
    let reading: String = wait_for("the feed being read", Duration::from_secs(60), || {
        let (pool, hook) = (pool.clone(), later_hook.clone());
        async move {
            sqlx::query_scalar("SELECT feed_id FROM feeds WHERE callback_url = $1 AND state = 'reading'")
                .bind(hook)
                .fetch_optional(&pool)
                .await
                .ok()
                .flatten()
        }
    })
    .await;
    let (status, progress) = get_json(&client, &format!("{}/v1/feeds/{reading}", stack.sink)).await;
    tx.send(Err(std::io::Error::other("the connection broke"))).await.unwrap();
    drop(tx);
    assert!(upload.await.unwrap().is_err(), "the cut upload got no answer");
    pool.close().await;
    assert_eq!(
        (status, &progress["state"], &progress["callback"]),
        (
            200,
            &json!("reading"),
            &json!({ "url": later_hook, "state": "waiting", "next_attempt_at": null, "delivered_at": null,
                     "gave_up_at": null, "attempts": [] })
        ),
        "{progress}"
    );

    stack.stop().await;
    env.finish().await;
}
