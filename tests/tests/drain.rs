//! Stopping under load: ingest and the sink, sent SIGTERM (as Kubernetes and Compose stop them)
//! while work pours through, finish what they took, exit cleanly, and lose nothing.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use reefline_e2e::workload::rows;
use reefline_e2e::{ServiceProcess, Stack, TestEnv, metric, wait_for};
use serde_json::json;

const INGEST: &str = env!("CARGO_BIN_EXE_ingest-under-test");
const SINK: &str = env!("CARGO_BIN_EXE_sink-under-test");

/// Rows of these request ids.
async fn rows_of(pool: &sqlx::PgPool, ids: &[String]) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM results WHERE request_id = ANY($1)")
        .bind(ids)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Submits `images` photos (the coffee photo under distinct URLs) to `ingest`, `per` at a time;
/// the request ids, in order.
async fn submit(client: &reqwest::Client, ingest: &str, photos: &str, images: usize, per: usize) -> Vec<String> {
    let mut ids = Vec::with_capacity(images);
    for start in (0..images).step_by(per) {
        let urls: Vec<String> =
            (start..(start + per).min(images)).map(|i| format!("{photos}/photos/coffee.png?n={i}")).collect();
        let answer =
            client.post(format!("{ingest}/v1/classify")).json(&json!({ "images": urls })).send().await.unwrap();
        assert_eq!(answer.status(), 202);
        let accepted: serde_json::Value = answer.json().await.unwrap();
        ids.extend(accepted["request_ids"].as_array().unwrap().iter().map(|id| id.as_str().unwrap().to_owned()));
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_terminated_ingest_finishes_the_submissions_it_took_and_loses_none_it_accepted() {
    let env = TestEnv::start().await;
    let settings = env.settings();
    let ingest_settings = settings.ingest.clone();
    let stack = Stack::start_without_ingest(settings).await;
    let ingest = ServiceProcess::ingest(INGEST, &ingest_settings, "ingest-term");
    let url = format!("http://{}", ingest.address("ingest listening").await);
    let pool = env.db.pool().await;
    let client = reqwest::Client::new();

    // Four clients submit five photos at a time, each until ingest no longer takes connections.
    let accepted: Arc<Mutex<Vec<String>>> = Arc::default();
    let answered: Arc<Mutex<Vec<u16>>> = Arc::default();
    let clients: Vec<_> = (0..4)
        .map(|c| {
            let (client, url, photos) = (client.clone(), url.clone(), env.photos.clone());
            let (accepted, answered) = (accepted.clone(), answered.clone());
            tokio::spawn(async move {
                for n in 0.. {
                    let urls: Vec<String> =
                        (0..5).map(|i| format!("{photos}/photos/coffee.png?c={c}&n={n}&i={i}")).collect();
                    let Ok(answer) =
                        client.post(format!("{url}/v1/classify")).json(&json!({ "images": urls })).send().await
                    else {
                        return;
                    };
                    // An answer begun is an answer finished: a body cut off counts as status 0.
                    let status = answer.status().as_u16();
                    let body = answer.json::<serde_json::Value>().await;
                    answered.lock().unwrap().push(if body.is_ok() { status } else { 0 });
                    let Ok(body) = body else { return };
                    if status == 202 {
                        let ids =
                            body["request_ids"].as_array().unwrap().iter().map(|id| id.as_str().unwrap().to_owned());
                        accepted.lock().unwrap().extend(ids);
                    }
                }
            })
        })
        .collect();
    wait_for("200 images accepted before the stop", Duration::from_secs(120), || {
        let enough = accepted.lock().unwrap().len() >= 200;
        async move { enough.then_some(()) }
    })
    .await;
    let log = ingest.log.clone();
    let (took, clean) = ingest.terminate_with_status();
    for client in clients {
        client.await.unwrap();
    }
    eprintln!("drain: ingest stopped in {took:?}");
    let log = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(clean && log.contains("ingest stopped"), "ingest did not stop cleanly; see its log:\n{log}");
    // Its drain waits at most 10 s for the requests in progress; the rest is the broker's goodbye.
    assert!(took < Duration::from_secs(30), "stopping took {took:?}");
    // Every answer was whole: accepted, or refused while the broker was away (never a 5xx of its
    // own, never a body cut off); a request ingest never read was refused a connection instead.
    let answered = answered.lock().unwrap().clone();
    assert!(answered.iter().all(|s| [202, 503].contains(s)), "answers: {answered:?}");
    // Each image it accepted reaches its result.
    let accepted = accepted.lock().unwrap().clone();
    wait_for("a result for every image accepted", Duration::from_secs(300), || {
        let (pool, accepted) = (pool.clone(), accepted.clone());
        async move { (rows_of(&pool, &accepted).await == accepted.len() as i64).then_some(()) }
    })
    .await;
    eprintln!("drain: ingest accepted {} images before it stopped; every one has its result", accepted.len());

    stack.stop().await;
    pool.close().await;
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_terminated_sink_commits_what_it_wrote_and_its_successor_writes_the_rest_once() {
    const IMAGES: usize = 600;
    let env = TestEnv::start().await;
    let settings = env.settings();
    let sink_settings = settings.sink.clone();
    let stack = Stack::start_without_sink(settings).await;
    // Batches of 50: what the successor may read again is at most one of them.
    let batches: &[(&str, &str)] = &[("SINK_MAX_BATCH", "50")];
    let first = ServiceProcess::sink_with_env(SINK, &sink_settings, "sink-term", batches);
    first.address("sink listening").await;
    let pool = env.db.pool().await;
    let client = reqwest::Client::new();

    let ids = submit(&client, &stack.ingest, &env.photos, IMAGES, 50).await;
    wait_for("100 rows written before the stop", Duration::from_secs(300), || {
        let pool = pool.clone();
        async move { (rows(&pool).await >= 100).then_some(()) }
    })
    .await;
    let log = first.log.clone();
    let (took, clean) = first.terminate_with_status();
    let written = rows(&pool).await;
    eprintln!("drain: the sink stopped in {took:?} with {written} of {IMAGES} rows written");
    assert!(
        written < IMAGES as i64,
        "every row was written before the stop: nothing is left to test the handover with"
    );
    let log = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(clean && log.contains("sink stopped"), "the sink did not stop cleanly; see its log:\n{log}");
    assert!(took < Duration::from_secs(30), "stopping took {took:?}");

    let successor = ServiceProcess::sink_with_env(SINK, &sink_settings, "sink-successor", batches);
    let successor_url = format!("http://{}", successor.address("sink listening").await);
    wait_for("every row", Duration::from_secs(300), || {
        let (pool, ids) = (pool.clone(), ids.clone());
        async move { (rows_of(&pool, &ids).await == IMAGES as i64).then_some(()) }
    })
    .await;
    let distinct: i64 =
        sqlx::query_scalar("SELECT count(DISTINCT request_id) FROM results").fetch_one(&pool).await.unwrap();
    assert_eq!((rows(&pool).await, distinct), (IMAGES as i64, IMAGES as i64), "one row per image");
    // The first committed the offsets of what it wrote before it went: its successor reads only
    // what was left (what the first had read but not yet written included, at most a batch).
    let metrics = client.get(format!("{successor_url}/metrics")).send().await.unwrap().text().await.unwrap();
    let received = metric(&metrics, "sink_results_received_total").unwrap_or(0.0) as i64;
    let left = IMAGES as i64 - written;
    eprintln!("drain: the successor read {received} results, {left} were left to write");
    assert!(received <= left + 50, "the successor read {received}; {left} were left");

    drop(successor);
    stack.stop().await;
    pool.close().await;
    env.finish().await;
}
