//! Bulk feeds in: a survey's list of URLs uploaded as a stream, each line accepted or rejected with
//! its reason, in bounded memory, and resumed after a broken upload under its Idempotency-Key.

use std::time::{Duration, Instant};

use reefline_e2e::feeds::{post_feed, text_lines, wait_for_ledger};
use reefline_e2e::{ServiceProcess, Stack, TestEnv, get_json, topic_counts, topic_size};
use serde_json::{Value, json};

/// Feeds the body in pieces of `piece` lines as the server reads them.
fn streamed(lines: usize, piece: usize, bad: std::collections::BTreeMap<usize, &'static str>) -> reqwest::Body {
    let pieces = (0..lines.div_ceil(piece)).map(move |i| {
        let (from, to) = (i * piece + 1, ((i + 1) * piece).min(lines));
        Ok::<_, std::io::Error>(text_lines(from, to, &bad))
    });
    reqwest::Body::wrap_stream(futures::stream::iter(pieces))
}

/// A plain-text feed uploaded under `key` as its pieces are sent on the channel returned (an error
/// breaks the upload off), with the task awaiting ingest's answer.
type Upload = tokio::task::JoinHandle<reqwest::Result<(u16, Value, reqwest::header::HeaderMap)>>;

fn upload_in_pieces(
    client: &reqwest::Client,
    ingest: &str,
    key: &'static str,
) -> (tokio::sync::mpsc::Sender<std::io::Result<String>>, Upload) {
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<String>>(4);
    let body =
        reqwest::Body::wrap_stream(futures::stream::unfold(
            rx,
            |mut rx| async move { rx.recv().await.map(|c| (c, rx)) },
        ));
    let (client, ingest) = (client.clone(), ingest.to_owned());
    (tx, tokio::spawn(async move { post_feed(&client, &ingest, "text/plain", Some(key), body).await }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_million_line_feed_is_read_in_bounded_memory_with_every_accepted_line_on_the_broker() {
    const LINES: usize = 1_000_000;
    let env = TestEnv::start().await;
    let settings = env.settings();
    // No classifier takes the feed's images here: no window holds the feed back for them.
    let no_window = [("FEED_WINDOW_IMAGES", "0")];
    let ingest = ServiceProcess::ingest_with_env(
        env!("CARGO_BIN_EXE_ingest-under-test"),
        &settings.ingest,
        "feed-ingest",
        &no_window,
    );
    let ingest_url = format!("http://{}", ingest.address("ingest listening").await);
    let client = reqwest::Client::new();
    wait_for_ledger(&client, &ingest_url).await;

    // Bad lines at seeded places: not URLs, a scheme that is not allowed, repeats of line 1.
    let mut rng = reefline_e2e::fault_rng("million_line_feed");
    let mut bad = std::collections::BTreeMap::new();
    while bad.len() < 300 {
        let kind = ["not a url", "ftp://survey.example.org/x.jpg", "https://survey.example.org/reef/0000001.jpg"];
        bad.insert(rng.usize(2..=LINES), kind[bad.len() % 3]);
    }
    let started = Instant::now();
    let (status, feed, _) = post_feed(&client, &ingest_url, "text/plain", None, streamed(LINES, 20_000, bad.clone()))
        .await
        .expect("upload");
    let seconds = started.elapsed().as_secs_f64();
    assert_eq!(status, 201, "{feed}");
    let accepted = (LINES - bad.len()) as i64;
    assert_eq!(
        (&feed["state"], &feed["lines_read"], &feed["accepted"], &feed["rejected"], &feed["resumed"]),
        (&json!("read"), &json!(LINES), &json!(accepted), &json!(bad.len()), &json!(false)),
        "{feed}"
    );
    assert_eq!(feed["batches"], json!(LINES.div_ceil(1000)), "a batch per 1,000 lines: {feed}");
    let peak = ingest.peak_rss();
    eprintln!(
        "1,000,000-line feed: {:.0} lines/s ({seconds:.1} s), ingest peak RSS {:.1} MiB",
        LINES as f64 / seconds,
        peak as f64 / 1048576.0
    );
    assert!(peak > 0 && peak < 100 * 1024 * 1024, "ingest's peak RSS was {peak} bytes");
    assert_eq!(topic_size(&env.broker.kafka(), &env.names.requests).await, accepted, "the requests topic");

    // A 1 MB gzip of 500,000,000 bad lines (`yes x | head -n 5e8 | gzip -9`, as 500 members of a
    // million lines each) is cut off at FEED_MAX_REJECTED_LINES within seconds, storing at most
    // FEED_MAX_STORED_REJECTS of them, in bounded memory.
    let member = {
        use std::io::Write;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        gz.write_all(&b"x\n".repeat(1_000_000)).unwrap();
        gz.finish().unwrap()
    };
    let bomb = member.repeat(500);
    assert!(bomb.len() < 1_500_000, "{} bytes", bomb.len());
    let started = Instant::now();
    let (status, cut, _) = post_feed(&client, &ingest_url, "application/gzip", None, bomb.into()).await.unwrap();
    let seconds = started.elapsed().as_secs_f64();
    assert_eq!((status, &cut["error"]["kind"]), (400, &json!("too_many_rejects")), "{cut}");
    let pool = env.db.pool().await;
    let (rejected, stored): (i64, i64) = sqlx::query_as(
        "SELECT f.rejected, (SELECT count(*) FROM feed_rejects r WHERE r.feed_id = f.feed_id)
         FROM feeds f ORDER BY created_at DESC LIMIT 1",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((rejected, stored), (100_000, 1_000), "the feed's rejected count and stored rejects");
    let peak = ingest.peak_rss();
    eprintln!("500 M-line gzip: cut off in {seconds:.1} s; ingest peak RSS {:.1} MiB", peak as f64 / 1048576.0);
    assert!(peak < 100 * 1024 * 1024, "ingest's peak RSS was {peak} bytes");

    // The rejects, from the sink, each with its line and reason, a page at a time.
    let sink = ServiceProcess::sink(env!("CARGO_BIN_EXE_sink-under-test"), &settings.sink, "feed-sink");
    let sink_url = format!("http://{}", sink.address("sink listening").await);
    let feed_id = feed["feed_id"].as_str().unwrap();
    let (mut listed, mut after) = (Vec::new(), 0);
    loop {
        let (status, page) =
            get_json(&client, &format!("{sink_url}/v1/feeds/{feed_id}/rejects?limit=250&after={after}")).await;
        assert_eq!(status, 200, "{page}");
        listed.extend(page["rejects"].as_array().unwrap().iter().cloned());
        match page["next_after"].as_i64() {
            Some(next) => after = next,
            None => break,
        }
    }
    let lines: Vec<i64> = listed.iter().map(|r| r["line"].as_i64().unwrap()).collect();
    assert_eq!(lines, bad.keys().map(|&l| l as i64).collect::<Vec<_>>());
    for reject in &listed {
        let expected = match bad[&(reject["line"].as_i64().unwrap() as usize)] {
            "not a url" => "not a usable URL: relative URL without a base",
            "ftp://survey.example.org/x.jpg" => {
                "not a usable URL: scheme `ftp` is not allowed; use http, https, s3 or az"
            }
            _ => "a duplicate of a URL earlier in the feed",
        };
        assert_eq!(reject["reason"], json!(expected), "{reject}");
    }
    let (status, progress) = get_json(&client, &format!("{sink_url}/v1/feeds/{feed_id}")).await;
    assert_eq!(status, 200, "{progress}");
    assert_eq!((&progress["accepted"], &progress["rejected"]), (&json!(accepted), &json!(bad.len())), "{progress}");
    drop(sink);
    drop(ingest);
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_upload_cut_half_way_resumes_after_its_last_settled_line_under_its_key() {
    let env = TestEnv::start().await;
    let mut settings = env.settings();
    // No classifier takes the feed's images here: no window holds the feed back for them.
    settings.ingest.feed_window_images = 0;
    let stack = Stack::start_without_classifier(settings).await;
    let client = reqwest::Client::new();
    wait_for_ledger(&client, &stack.ingest).await;
    let none = std::collections::BTreeMap::new();

    // The first upload sends 2,500 lines, waits until ingest has settled two chunks of 1,000,
    // then breaks off.
    let (tx, upload) = upload_in_pieces(&client, &stack.ingest, "survey-2026-cut");
    tx.send(Ok(text_lines(1, 2500, &none))).await.unwrap();
    reefline_e2e::wait_for_metric(
        &client,
        &stack.ingest,
        "ingest_feed_lines_total{outcome=\"accepted\"}",
        |n| n >= 2000.0,
        "two chunks settled",
        Duration::from_secs(60),
    )
    .await;
    tx.send(Err(std::io::Error::other("the connection broke"))).await.unwrap();
    drop(tx);
    assert!(upload.await.unwrap().is_err(), "the cut upload got no answer");

    // The whole file again, with the same key: resumed after line 2,000, nothing twice. The
    // first upload's reader may still be noticing the break: a 409 says to try again.
    let resend = || async {
        loop {
            let body = reqwest::Body::from(text_lines(1, 5000, &none));
            let (status, feed, headers) =
                post_feed(&client, &stack.ingest, "text/plain", Some("survey-2026-cut"), body).await.expect("resend");
            if status != 409 {
                return (status, feed, headers);
            }
            assert_eq!(
                (&feed["error"]["kind"], headers.get("retry-after").is_some()),
                (&json!("feed_in_progress"), true)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    let (status, feed, headers) = resend().await;
    assert_eq!(status, 201, "{feed}");
    assert_eq!(
        (&feed["state"], &feed["lines_read"], &feed["accepted"], &feed["resumed"]),
        (&json!("read"), &json!(5000), &json!(5000), &json!(true)),
        "{feed}"
    );
    assert!(headers.get("idempotent-replayed").is_none());
    assert_eq!(topic_counts(&env.broker.kafka(), &env.names.requests).await, (5000, 5000), "records, distinct ids");

    // Once more: the same feed, answered at once without producing anything.
    let (status, again, headers) = resend().await;
    assert_eq!((status, &again["feed_id"], &again["accepted"]), (201, &feed["feed_id"], &json!(5000)), "{again}");
    assert_eq!(headers.get("idempotent-replayed").map(|v| v.to_str().unwrap()), Some("true"));
    assert_eq!(topic_size(&env.broker.kafka(), &env.names.requests).await, 5000);
    // The same key with another file (or model) is refused, not taken for a resume of this feed.
    let other = reqwest::Body::from(text_lines(6001, 6100, &none));
    let (status, reused, _) =
        post_feed(&client, &stack.ingest, "text/plain", Some("survey-2026-cut"), other).await.unwrap();
    assert_eq!((status, &reused["error"]["kind"]), (422, &json!("idempotency_key_reused")), "{reused}");
    let response = client
        .post(format!("{}/v1/feeds?model=efficientnet-lite0", stack.ingest))
        .header("content-type", "text/plain")
        .header("idempotency-key", "survey-2026-cut")
        .body(text_lines(1, 5000, &none))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 422);
    assert_eq!(topic_size(&env.broker.kafka(), &env.names.requests).await, 5000);

    // Refusals name their problem.
    let refused =
        [("text/csv", "station,link\nA,https://a.example/1.jpg\n", "unreadable_feed"), ("text/plain", "", "created")];
    for (content_type, body, kind) in refused {
        let (status, answer, _) =
            post_feed(&client, &stack.ingest, content_type, None, body.to_owned().into()).await.unwrap();
        if kind == "created" {
            assert_eq!((status, &answer["lines_read"]), (201, &json!(0)), "an empty feed is read: {answer}");
        } else {
            assert_eq!((status, &answer["error"]["kind"]), (400, &json!(kind)), "{answer}");
        }
    }
    // A bad query names its field; a misspelt parameter is refused rather than ignored (the feed
    // would go uncalled-back).
    for (query, field, named) in
        [("format=xml", "format", "xml"), ("calback_url=https://h.example/", "query", "calback_url")]
    {
        let response = client
            .post(format!("{}/v1/feeds?{query}", stack.ingest))
            .header("content-type", "text/plain")
            .body("https://a.example/1.jpg\n")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{query}");
        let answer: Value = response.json().await.unwrap();
        assert_eq!((&answer["error"]["kind"], &answer["error"]["field"]), (&json!("invalid_field"), &json!(field)));
        assert!(answer["error"]["message"].as_str().is_some_and(|m| m.contains(named)), "{answer}");
    }
    stack.stop().await;
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_but_live_reader_keeps_its_feed_from_a_resend() {
    let env = TestEnv::start().await;
    let mut settings = env.settings();
    settings.ingest.feed_lease_s = 1;
    settings.ingest.feed_window_images = 0; // no classifier takes the feed's images here
    let stack = Stack::start_without_classifier(settings).await;
    let client = reqwest::Client::new();
    wait_for_ledger(&client, &stack.ingest).await;
    let none = std::collections::BTreeMap::new();
    let pool = env.db.pool().await;

    // An upload that sends 200 lines (more than the 4 KiB its fingerprint takes), then nothing for
    // a while: its reader is alive (waiting for the rest, as one waits for a slow broker), and far
    // longer than the lease.
    let (tx, upload) = upload_in_pieces(&client, &stack.ingest, "slow-reader");
    tx.send(Ok(text_lines(1, 200, &none))).await.unwrap();
    // Its lease is renewed on a timer, not only when a chunk is settled: three lease times on.
    reefline_e2e::wait_for("the lease renewed three lease times on", Duration::from_secs(30), || async {
        let renewed: Option<bool> = sqlx::query_scalar(
            "SELECT updated_at > created_at + interval '3 seconds' FROM feeds
             WHERE idempotency_key = 'slow-reader' AND state = 'reading'",
        )
        .fetch_optional(&pool)
        .await
        .unwrap();
        renewed.filter(|r| *r)
    })
    .await;
    let resend = reqwest::Body::from(text_lines(1, 300, &none));
    let (status, busy, _) = post_feed(&client, &stack.ingest, "text/plain", Some("slow-reader"), resend).await.unwrap();
    assert_eq!((status, &busy["error"]["kind"]), (409, &json!("feed_in_progress")), "{busy}");

    // The slow upload ends; every line is its, once.
    tx.send(Ok(text_lines(201, 300, &none))).await.unwrap();
    drop(tx);
    let (status, feed, _) = upload.await.unwrap().unwrap();
    assert_eq!((status, &feed["accepted"]), (201, &json!(300)), "{feed}");
    assert_eq!(topic_counts(&env.broker.kafka(), &env.names.requests).await.0, 300);
    stack.stop().await;
    env.finish().await;
}
