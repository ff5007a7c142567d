//! Delivery when the parts around the classifier fail: the broker restarts, Postgres goes away,
//! the sink is killed, ingest cannot reach the broker. Every request still ends as exactly one row.

use std::time::{Duration, Instant};

use reefline_e2e::workload::{REQUESTS, check_rows, rows, submit_mixed, wait_rows};
use reefline_e2e::{ServiceProcess, Stack, TcpProxy, TestEnv, metric, topic_counts, wait_for_metric, wait_for_status};
use serde_json::json;

const SINK: &str = env!("CARGO_BIN_EXE_sink-under-test");

/// Reads the results topic and reports what the classifier redid: records beyond one per request.
async fn results_on_topic(env: &TestEnv, what: &str) -> usize {
    let (records, requests) = topic_counts(&env.broker.kafka(), &env.names.results).await;
    assert_eq!(requests, REQUESTS as usize, "every request has a result on the topic");
    let duplicates = records - requests;
    eprintln!("outages: {what}: {REQUESTS} requests, {records} result records on the topic ({duplicates} repeated)");
    duplicates
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restarting_the_broker_mid_stream_loses_and_doubles_nothing() {
    let mut rng = reefline_e2e::fault_rng("restarting_the_broker_mid_stream_loses_and_doubles_nothing");
    let mut env = TestEnv::start().await;
    let stack = Stack::start(env.settings()).await;
    let pool = env.db.pool().await;
    let client = reqwest::Client::new();
    let expected = submit_mixed(&client, &stack.ingest, &env.photos).await;

    wait_rows(&pool, 400 + rng.i64(0..400), "progress before the restart").await;
    let before = rows(&pool).await;
    // Both lanes' offsets: the small submissions travel the interactive lane and are read first,
    // so the rows before the restart may all be theirs.
    let group = &env.names.classifier_group;
    let lanes =
        [(group.clone(), env.names.requests.clone()), (format!("{group}.interactive"), env.names.interactive.clone())];
    let committed_now = |kafka: reefline_common::kafka::KafkaSettings| {
        let lanes = lanes.clone();
        async move {
            let mut committed = 0;
            for (group, topic) in &lanes {
                committed += reefline_e2e::committed_offsets(&kafka, group, topic).await;
            }
            committed
        }
    };
    let committed = committed_now(env.broker.kafka()).await;
    let restarted = Instant::now();
    env.broker.restart(Duration::from_secs(2)).await;
    wait_rows(&pool, before + 100, "progress after the restart").await;
    let recovered = restarted.elapsed();
    let kept = committed_now(env.broker.kafka()).await;
    assert!(committed > 0 && kept >= committed, "committed offsets {committed} before the restart, {kept} after");
    wait_rows(&pool, REQUESTS, "all 2,000 rows").await;
    check_rows(&pool, &expected).await;
    let duplicates = results_on_topic(&env, "broker kill -9 and restart").await;
    eprintln!(
        "outages: broker restart at {before} rows, {committed} requests committed; 100 more rows {recovered:?} after \
         the kill (2 s down)"
    );
    // The broker keeps what it acknowledged and the committed offsets (checked above); when the
    // group is formed again the classifier redoes only what lies past them: what was in flight,
    // what it finished since its last commit and what it did while it could not commit (0 and 52
    // in two runs here, 670 once on a loaded machine whose group took 8 s to form again). A
    // record below the offsets committed before the kill is never redone.
    let redoable = REQUESTS as usize - committed as usize;
    assert!(
        duplicates <= redoable,
        "{duplicates} results repeated after a broker restart; at most {redoable} could be"
    );

    // Ingest takes submissions again.
    let (status, _) = reefline_e2e::post_json(
        &client,
        &format!("{}/v1/classify", stack.ingest),
        &json!({ "images": [format!("{}/photos/coffee.png", env.photos)] }),
    )
    .await;
    assert_eq!(status, 202);
    wait_rows(&pool, REQUESTS + 1, "the row submitted after the restart").await;

    stack.stop().await;
    pool.close().await;
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_database_outage_of_10_s_is_waited_out() {
    let mut rng = reefline_e2e::fault_rng("a_database_outage_of_10_s_is_waited_out");
    let env = TestEnv::start().await;
    let proxy = TcpProxy::start(&env.db.server()).await;
    let mut settings = env.settings();
    settings.sink.database = env.db.url_via(proxy.addr).into();
    let stack = Stack::start(settings).await;
    let pool = env.db.pool().await;
    let client = reqwest::Client::new();
    let expected = submit_mixed(&client, &stack.ingest, &env.photos).await;

    wait_rows(&pool, 300 + rng.i64(0..300), "progress before the outage").await;
    proxy.cut();
    let cut = Instant::now();
    let failures = "sink_write_failures_total";
    let what = "the sink to see the database fail";
    wait_for_metric(&client, &stack.sink, failures, |n| n > 0.0, what, Duration::from_secs(30)).await;
    let (readyz, _) = reefline_e2e::get_json(&client, &format!("{}/readyz", stack.sink)).await;
    assert_eq!(readyz, 503, "the sink is not ready while its database is down");
    let during = rows(&pool).await;
    // The outage itself.
    tokio::time::sleep(Duration::from_secs(10).saturating_sub(cut.elapsed())).await;
    assert_eq!(rows(&pool).await, during, "nothing is written while the database is unreachable");
    proxy.restore();
    let restored = Instant::now();
    wait_rows(&pool, during + 1, "the first write after the outage").await;
    let resumed = restored.elapsed();

    wait_rows(&pool, REQUESTS, "all 2,000 rows").await;
    let caught_up = restored.elapsed();
    check_rows(&pool, &expected).await;
    let (readyz, _) = reefline_e2e::get_json(&client, &format!("{}/readyz", stack.sink)).await;
    assert_eq!(readyz, 200);
    let text = client.get(format!("{}/metrics", stack.sink)).send().await.unwrap().text().await.unwrap();
    let failures = metric(&text, "sink_write_failures_total").unwrap();
    let duplicates = results_on_topic(&env, "Postgres cut for 10 s").await;
    eprintln!(
        "outages: Postgres cut for 10 s at {during} rows: {failures} failed writes retried; \
         writing again {resumed:?} after it came back, all rows after {caught_up:?}"
    );
    assert_eq!(duplicates, 0, "the classifier never noticed the database");

    stack.stop().await;
    pool.close().await;
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_the_sink_mid_batch_loses_and_doubles_nothing() {
    let mut rng = reefline_e2e::fault_rng("killing_the_sink_mid_batch_loses_and_doubles_nothing");
    let env = TestEnv::start().await;
    let settings = env.settings();
    let sink_settings = settings.sink.clone();
    let stack = Stack::start_without_sink(settings).await;
    let mut sink = ServiceProcess::sink(SINK, &sink_settings, "sink");
    let client = reqwest::Client::new();
    // The sink creates the database: wait until it has, then submit.
    let sink_ready = format!("http://{}/readyz", sink.address("sink listening").await);
    wait_for_status(&client, &sink_ready, 200, "the sink to be ready", Duration::from_secs(60)).await;
    let pool = env.db.pool().await;
    let expected = submit_mixed(&client, &stack.ingest, &env.photos).await;

    for round in 0..2 {
        let at = 400 + round * 700 + rng.i64(0..300);
        wait_rows(&pool, at, "progress before the kill").await;
        assert!(sink.is_running(), "the sink exited on its own; see {}", sink.log.display());
        sink.kill();
        eprintln!("outages: SIGKILL to the sink with {at}+ rows stored");
        sink = ServiceProcess::sink(SINK, &sink_settings, "sink");
    }
    wait_rows(&pool, REQUESTS, "all 2,000 rows").await;
    check_rows(&pool, &expected).await;
    let duplicates = results_on_topic(&env, "sink kill -9 ×2").await;
    assert_eq!(duplicates, 0, "the classifier never noticed the sink");

    drop(sink);
    stack.stop().await;
    pool.close().await;
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ingest_refuses_quickly_when_the_broker_is_down_or_too_much_is_pending() {
    let mut env = TestEnv::start().await;
    let mut settings = env.settings();
    settings.ingest.delivery_timeout_ms = 2000;
    settings.ingest.max_pending_images = 1000;
    let stack = Stack::start(settings).await;
    let pool = env.db.pool().await;
    let client = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
    let classify = format!("{}/v1/classify", stack.ingest);
    let photo = |i: usize| format!("{}/photos/coffee.png?n={i}", env.photos);

    let (status, before) =
        reefline_e2e::post_json(&client, &classify, &json!({ "images": [photo(0), photo(1)] })).await;
    assert_eq!(status, 202);
    wait_rows(&pool, 2, "the first two rows").await;

    env.broker.stop();
    // 1,000 images fill the pending limit and wait for a broker that is not there...
    let big = {
        let (client, classify) = (client.clone(), classify.clone());
        let images: Vec<String> = (0..1000).map(|i| photo(100 + i)).collect();
        tokio::spawn(async move {
            let started = Instant::now();
            let response = client.post(classify).json(&json!({ "images": images })).send().await.unwrap();
            (
                response.status(),
                response.headers().get("retry-after").cloned(),
                started.elapsed(),
                response.json::<serde_json::Value>().await.unwrap(),
            )
        })
    };
    let pending = "ingest_pending_images";
    wait_for_metric(&client, &stack.ingest, pending, |n| n == 1000.0, "1,000 images pending", Duration::from_secs(10))
        .await;
    // ...so one more is refused at once with 429,
    let response = client.post(&classify).json(&json!({ "images": [photo(2)] })).send().await.unwrap();
    assert_eq!(response.status(), 429);
    assert_eq!(response.headers()["retry-after"], "1");
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"]["kind"], "overloaded");
    assert!(body["error"]["message"].as_str().unwrap().contains("limit 1000"), "{body}");
    // and the 1,000 are refused with 503 once the delivery timeout (2 s) has passed: never a hang.
    let (status, retry_after, took, body) = big.await.unwrap();
    assert_eq!(status, 503, "{body}");
    assert_eq!(retry_after.unwrap(), "5");
    assert_eq!(body["error"]["kind"], "unavailable");
    eprintln!("outages: ingest with the broker down answered 503 in {took:?}");
    assert!(took < Duration::from_secs(15), "the refusal took {took:?}");

    let ready = format!("{}/readyz", stack.ingest);
    wait_for_status(&client, &ready, 503, "ingest to report the broker down", Duration::from_secs(30)).await;
    env.broker.restart(Duration::ZERO).await;
    wait_for_status(&client, &ready, 200, "ingest to see the broker again", Duration::from_secs(30)).await;
    let (status, after) =
        reefline_e2e::post_json(&client, &classify, &json!({ "images": [photo(3), photo(4), photo(5)] })).await;
    assert_eq!(status, 202, "the first submission once the broker is back: {after}");
    wait_rows(&pool, 5, "the rows submitted after the broker came back").await;
    // Only the accepted requests went anywhere: nothing of the refused submissions reached the broker.
    let (bulk, _) = topic_counts(&env.broker.kafka(), &env.names.requests).await;
    let (interactive, _) = topic_counts(&env.broker.kafka(), &env.names.interactive).await;
    assert_eq!((bulk, interactive), (0, 5), "small submissions travel the interactive lane");
    let mut accepted: Vec<String> = [&before, &after]
        .iter()
        .flat_map(|a| a["request_ids"].as_array().unwrap().iter().map(|id| id.as_str().unwrap().to_owned()))
        .collect();
    accepted.sort();
    let mut stored: Vec<String> =
        sqlx::query_scalar("SELECT request_id FROM results ORDER BY request_id").fetch_all(&pool).await.unwrap();
    stored.sort();
    assert_eq!(stored, accepted);

    stack.stop().await;
    pool.close().await;
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_registry_outage_of_20_s_is_waited_out_and_dead_letters_nothing() {
    use rdkafka::producer::FutureRecord;
    use reefline_common::producer::FutureProducer;

    let env = TestEnv::start().await;
    let proxy = TcpProxy::start(env.registry.url.trim_start_matches("http://")).await;
    let mut settings = env.settings();
    let proxied = reefline_schemas::RegistrySettings::new(format!("http://{}", proxy.addr));
    settings.ingest.registry = proxied.clone();
    settings.classifier.registry = proxied.clone();
    settings.sink.registry = proxied;
    let stack = Stack::start(settings).await;
    let pool = env.db.pool().await;
    let client = reqwest::Client::new();
    let classify = format!("{}/v1/classify", stack.ingest);
    let photo = |i: usize| format!("{}/photos/coffee.png?n={i}", env.photos);

    let images: Vec<String> = (0..10).map(photo).collect();
    let (status, _) = reefline_e2e::post_json(&client, &classify, &json!({ "images": images })).await;
    assert_eq!(status, 202);
    wait_rows(&pool, 10, "the rows before the outage").await;

    // A camera system registers a newer request schema (an added optional field) that no
    // service has seen yet, and keeps producing while the registry is down.
    let v2_id = reefline_e2e::camera::register(
        &client,
        &env.registry.url,
        &env.names.requests,
        &reefline_e2e::camera::schema_v2(),
    )
    .await;

    proxy.cut();
    let cut = Instant::now();
    let producer: FutureProducer = env.broker.kafka().producer_config().create().unwrap();
    let batch_id = uuid::Uuid::now_v7().to_string();
    let mut camera_ids = Vec::new();
    for i in 0..10 {
        let request = reefline_schemas::ImageRequest {
            request_id: uuid::Uuid::now_v7().to_string(),
            batch_id: batch_id.clone(),
            batch_index: i,
            batch_size: 10,
            url: photo(100 + i as usize),
            submitted_at_ms: chrono::Utc::now().timestamp_millis(),
            source: "kafka".into(),
            model: None,
            ..Default::default()
        };
        let payload = reefline_e2e::camera::framed(v2_id, &request);
        let record = FutureRecord::to(&env.names.requests).key(&request.request_id).payload(&payload);
        producer.send(record, Duration::from_secs(10)).await.map_err(|(e, _)| e).unwrap();
        camera_ids.push(request.request_id);
    }
    // Ingest still takes submissions: it has the request schema's id from before the outage.
    let images: Vec<String> = (20..30).map(photo).collect();
    let (status, body) = reefline_e2e::post_json(&client, &classify, &json!({ "images": images })).await;
    assert_eq!(status, 202, "{body}");
    // The outage itself.
    tokio::time::sleep(Duration::from_secs(20).saturating_sub(cut.elapsed())).await;
    proxy.restore();

    wait_rows(&pool, 30, "all 30 rows after the outage").await;
    let ok: i64 =
        sqlx::query_scalar("SELECT count(*) FROM results WHERE status = 'ok' AND predictions->0->>'index' = '967'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(ok, 30, "every image classified as espresso");
    let camera: i64 = sqlx::query_scalar("SELECT count(*) FROM results WHERE request_id = ANY($1)")
        .bind(&camera_ids)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(camera, 10);
    assert_eq!(topic_counts(&env.broker.kafka(), &env.names.dead_letter).await.0, 0, "nothing dead-lettered");
    let text = client.get(format!("{}/metrics", stack.classifier_ops)).send().await.unwrap().text().await.unwrap();
    assert!(!text.contains("classifier_dead_letters_total{"), "no dead-letter counted");

    stack.stop().await;
    pool.close().await;
    env.finish().await;
}
