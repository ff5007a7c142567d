//! Working through a feed: retrying the images whose server was down, a slow host beside a fast
//! one, and the `reefline` command line.

use std::time::Duration;

use reefline_e2e::feeds::{csv_rows, post_feed, wait_for_ledger};
use reefline_e2e::{Stack, TestEnv, foolbox_photos, get_json};
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn images_that_failed_while_their_server_was_down_succeed_when_retried() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let env = TestEnv::start().await;
    let stack = Stack::start(env.settings()).await;
    let client = reqwest::Client::new();
    wait_for_ledger(&client, &stack.ingest).await;

    // A survey server that answers 503 until it recovers.
    let up = Arc::new(AtomicBool::new(false));
    let coffee = std::fs::read(reefline_e2e::cache_dir().join("photos/coffee.png")).unwrap();
    let server = reefline_e2e::serve(axum::Router::new().route(
        "/survey/{name}",
        axum::routing::get({
            let up = up.clone();
            move || {
                let (up, coffee) = (up.clone(), coffee.clone());
                async move {
                    use axum::response::IntoResponse;
                    if up.load(Ordering::SeqCst) {
                        coffee.into_response()
                    } else {
                        axum::http::StatusCode::SERVICE_UNAVAILABLE.into_response()
                    }
                }
            }
        }),
    ))
    .await;
    let lines = format!(
        "{photos}/photos/chelsea.png\nhttp://{server}/survey/a.jpg\nhttp://{server}/survey/b.jpg\n{photos}/photos/missing.jpg\n",
        photos = env.photos
    );
    let (status, feed, _) = post_feed(&client, &stack.ingest, "text/plain", None, lines.into()).await.unwrap();
    assert_eq!((status, &feed["accepted"]), (201, &json!(4)), "{feed}");
    let feed_id = feed["feed_id"].as_str().unwrap();
    let progress = |ok: i64, error: i64| {
        let (client, url) = (client.clone(), format!("{}/v1/feeds/{feed_id}", stack.sink));
        async move {
            reefline_e2e::wait_for(&format!("{ok} ok and {error} failed"), Duration::from_secs(120), || async {
                let (_, p) = get_json(&client, &url).await;
                (p["ok"] == json!(ok) && p["error"] == json!(error) && p["done"] == json!(true)).then_some(p)
            })
            .await
        }
    };
    progress(1, 3).await;

    // The server is back: only the two 503s are sent through again (a 404 is not transient).
    up.store(true, Ordering::SeqCst);
    let retry = client.post(format!("{}/v1/feeds/{feed_id}/retry", stack.ingest)).send().await.unwrap();
    assert_eq!(retry.status(), 202);
    let retried: Value = retry.json().await.unwrap();
    assert_eq!(retried, json!({ "id": feed_id, "retried": 2 }));
    progress(3, 1).await;
    let export = client.get(format!("{}/v1/feeds/{feed_id}/results?format=ndjson", stack.sink)).send().await.unwrap();
    let results: Vec<Value> = export.text().await.unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(results.len(), 4, "replaced, not added");
    for survey in &results[1..3] {
        assert_eq!(
            (&survey["status"], &survey["predictions"][0]["label"]),
            (&json!("ok"), &json!("espresso")),
            "{survey}"
        );
    }

    // Nothing transient is left in its batch; an unknown feed is named.
    let batch = results[0]["batch_id"].as_str().unwrap();
    let again = client.post(format!("{}/v1/batches/{batch}/retry", stack.ingest)).send().await.unwrap();
    assert_eq!(again.json::<Value>().await.unwrap(), json!({ "id": batch, "retried": 0 }));
    let unknown = client
        .post(format!("{}/v1/feeds/0193aaaa-0000-7000-8000-000000000000/retry", stack.ingest))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);

    // The command line: submit a small CSV, follow it to the end, export it, retry it.
    let dir = std::env::temp_dir().join(format!("reefline-cli-{}", env.names.classifier_group));
    std::fs::create_dir_all(&dir).unwrap();
    let survey = dir.join("survey.csv");
    let names = ["coffee.png", "chelsea.png", "missing.jpg"];
    let csv: String = std::iter::once("url,site\n".to_owned())
        .chain(names.iter().map(|n| format!("{}/photos/{n}?cli=1,Reef 2\n", env.photos)))
        .collect();
    std::fs::write(&survey, csv).unwrap();
    let cli = |args: &[&str]| {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_reefline-under-test"));
        command.args(["--ingest-url", &stack.ingest, "--sink-url", &stack.sink]).args(args);
        let args = args.join(" ");
        async move {
            let output = command.output().await.expect("running reefline");
            let (stdout, stderr) =
                (String::from_utf8_lossy(&output.stdout).into_owned(), String::from_utf8_lossy(&output.stderr));
            assert!(output.status.success(), "reefline {args} failed: {stderr}");
            stdout
        }
    };
    let submitted = cli(&["submit", survey.to_str().unwrap(), "--wait"]).await;
    let documents: Vec<Value> =
        serde_json::Deserializer::from_str(&submitted).into_iter().map(Result::unwrap).collect();
    assert_eq!(documents.len(), 2, "the feed, then its progress once done: {submitted}");
    assert_eq!((&documents[0]["accepted"], &documents[0]["state"]), (&json!(3), &json!("read")), "{submitted}");
    let done = &documents[1];
    assert_eq!((&done["done"], &done["ok"], &done["error"]), (&json!(true), &json!(2), &json!(1)), "{done}");
    let id = documents[0]["feed_id"].as_str().unwrap();
    let exported = dir.join("results.csv");
    assert!(cli(&["export", id, "--format", "csv", "-o", exported.to_str().unwrap()]).await.is_empty());
    let (header, rows) = csv_rows(&std::fs::read_to_string(&exported).unwrap());
    assert_eq!(&header[..3], ["url", "line", "site"]);
    let labels: Vec<&str> = rows.iter().map(|r| r["top1_label"].as_str()).collect();
    assert_eq!(labels[0], "espresso");
    assert_eq!(rows[2]["error_kind"], "not_found");
    let status: Value = serde_json::from_str(&cli(&["status", id]).await).unwrap();
    assert_eq!(status["completed"], json!(3));
    let retried: Value = serde_json::from_str(&cli(&["retry", id]).await).unwrap();
    assert_eq!(retried["retried"], json!(0), "a 404 is not retried");
    std::fs::remove_dir_all(&dir).unwrap();
    stack.stop().await;
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_host_never_holds_up_images_from_another_host() {
    use std::sync::Arc;
    let env = TestEnv::start().await;
    let mut settings = env.settings();
    settings.classifier.fetch_concurrency = 4;
    settings.classifier.fetch_per_host = 2;
    settings.classifier.fetch_timeout_s = 120;
    let stack = Stack::start(settings).await;
    let client = reqwest::Client::new();
    wait_for_ledger(&client, &stack.ingest).await;

    // A host that answers only when the test lets it, beside the photo server.
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let coffee = std::fs::read(reefline_e2e::cache_dir().join("photos/coffee.png")).unwrap();
    let slow = reefline_e2e::serve(axum::Router::new().route(
        "/slow/{name}",
        axum::routing::get({
            let gate = gate.clone();
            move || {
                let (gate, coffee) = (gate.clone(), coffee.clone());
                async move {
                    gate.acquire().await.unwrap().forget();
                    coffee
                }
            }
        }),
    ))
    .await;
    // Slow and fast images taking turns: more slow ones than there are fetch slots.
    let photos = foolbox_photos();
    let lines: String = (0..8)
        .map(|i| format!("http://{slow}/slow/{i}.jpg\n{}/photos/{}?fast={i}\n", env.photos, photos[i].0))
        .collect();
    let (status, feed, _) = post_feed(&client, &stack.ingest, "text/plain", None, lines.into()).await.unwrap();
    assert_eq!((status, &feed["accepted"]), (201, &json!(16)), "{feed}");

    let pool = env.db.pool().await;
    let count = |pattern: &'static str| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM results WHERE url LIKE $1 AND status = 'ok'")
                .bind(pattern)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    reefline_e2e::wait_for(
        "every fast image, while the slow host holds its answers",
        Duration::from_secs(120),
        || async { (count("%fast=%").await == 8).then_some(()) },
    )
    .await;
    assert_eq!(count("%/slow/%").await, 0, "the slow host has answered nothing yet");
    gate.add_permits(8);
    reefline_e2e::wait_for("the slow host's images", Duration::from_secs(120), || async {
        (count("%/slow/%").await == 8).then_some(())
    })
    .await;
    stack.stop().await;
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_retry_fits_the_pending_limit_and_runs_once_at_a_time() {
    let env = TestEnv::start().await;
    let mut settings = env.settings();
    // Fewer images may wait for the broker than a retry's chunk of 1,000.
    settings.ingest.max_pending_images = 10;
    settings.ingest.max_images = 10;
    let stack = Stack::start_without_classifier(settings).await;
    let client = reqwest::Client::new();
    wait_for_ledger(&client, &stack.ingest).await;
    let pool = env.db.pool().await;
    // A batch of 25 images that timed out.
    let batch_id = uuid::Uuid::now_v7().to_string();
    sqlx::query(
        "INSERT INTO results (request_id, batch_id, batch_index, batch_size, url, status, predictions, model_name,
                              model_version, error_kind, error_message, submitted_at, completed_at)
         SELECT $1 || '-' || i, $1, i, 25, 'https://photos.example/' || i || '.jpg', 'error', '[]',
                'efficientnet-lite0', 'v', 'timeout', 'the server did not answer within 20 s', now(), now()
         FROM generate_series(0, 24) AS i",
    )
    .bind(&batch_id)
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query("INSERT INTO batches (batch_id, total, submitted_at) VALUES ($1, 25, now())")
        .bind(&batch_id)
        .execute(&pool)
        .await
        .unwrap();
    let retry = format!("{}/v1/batches/{batch_id}/retry", stack.ingest);

    // While another retry of it runs (its lock held), a second is refused.
    let mut holder = pool.acquire().await.unwrap();
    sqlx::query("SELECT pg_advisory_lock(hashtextextended('retry ' || $1, 0))")
        .bind(&batch_id)
        .execute(&mut *holder)
        .await
        .unwrap();
    let refused = client.post(&retry).send().await.unwrap();
    assert_eq!((refused.status().as_u16(), refused.headers().contains_key("retry-after")), (409, true));
    let refused: Value = refused.json().await.unwrap();
    assert_eq!(refused["error"]["kind"], "retry_in_progress", "{refused}");
    sqlx::query("SELECT pg_advisory_unlock_all()").execute(&mut *holder).await.unwrap();
    drop(holder);

    // Then it runs, ten images at a time: all 25 are on the broker again.
    let response = tokio::time::timeout(Duration::from_secs(60), client.post(&retry).send())
        .await
        .expect("a retry larger than the pending limit finishes")
        .unwrap();
    assert_eq!(response.status(), 202);
    let retried: Value = response.json().await.unwrap();
    assert_eq!(retried["retried"], 25, "{retried}");
    assert_eq!(reefline_e2e::topic_size(&env.broker.kafka(), &env.names.requests).await, 25);
    stack.stop().await;
    env.finish().await;
}
