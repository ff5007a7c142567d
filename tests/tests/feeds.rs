//! Bulk feeds: a survey's list of URLs uploaded as a stream (or fetched from a URL), each line
//! accepted or rejected with its reason, resumed after a broken upload under its
//! Idempotency-Key, its metadata carried to every result, and its results exported.

use std::time::{Duration, Instant};

use reefline_e2e::{ServiceProcess, Stack, TestEnv, foolbox_photos, get_json, topic_counts, topic_size};
use serde_json::{Value, json};

/// POSTs `body` to `{ingest}/v1/feeds` with `content_type` (and an Idempotency-Key when given).
async fn post_feed(
    client: &reqwest::Client,
    ingest: &str,
    content_type: &str,
    key: Option<&str>,
    body: reqwest::Body,
) -> reqwest::Result<(u16, Value, reqwest::header::HeaderMap)> {
    let mut request = client.post(format!("{ingest}/v1/feeds")).header("content-type", content_type).body(body);
    if let Some(key) = key {
        request = request.header("idempotency-key", key);
    }
    let response = request.send().await?;
    let (status, headers) = (response.status().as_u16(), response.headers().clone());
    Ok((status, response.json().await.unwrap_or(Value::Null), headers))
}

/// Lines `from..=to` of a plain-text feed of distinct URLs, except at `bad` positions: every
/// seventh of those is not a URL, others an ftp URL or a repeat of line 1.
fn text_lines(from: usize, to: usize, bad: &std::collections::BTreeMap<usize, &'static str>) -> String {
    let mut text = String::with_capacity((to + 1 - from) * 48);
    for n in from..=to {
        match bad.get(&n) {
            Some(line) => text.push_str(line),
            None => text.push_str(&format!("https://survey.example.org/reef/{n:07}.jpg")),
        }
        text.push('\n');
    }
    text
}

/// Feeds the body in pieces of `piece` lines as the server reads them.
fn streamed(lines: usize, piece: usize, bad: std::collections::BTreeMap<usize, &'static str>) -> reqwest::Body {
    let pieces = (0..lines.div_ceil(piece)).map(move |i| {
        let (from, to) = (i * piece + 1, ((i + 1) * piece).min(lines));
        Ok::<_, std::io::Error>(text_lines(from, to, &bad))
    });
    reqwest::Body::wrap_stream(futures::stream::iter(pieces))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_million_line_feed_is_read_in_bounded_memory_with_every_accepted_line_on_the_broker() {
    const LINES: usize = 1_000_000;
    let env = TestEnv::start().await;
    let settings = env.settings();
    let ingest = ServiceProcess::ingest(env!("CARGO_BIN_EXE_ingest-under-test"), &settings.ingest, "feed-ingest");
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
            "ftp://survey.example.org/x.jpg" => "not a usable URL: scheme `ftp` is not allowed; use http or https",
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
    let stack = Stack::start_without_classifier(env.settings()).await;
    let client = reqwest::Client::new();
    wait_for_ledger(&client, &stack.ingest).await;
    let none = std::collections::BTreeMap::new();

    // The first upload sends 2,500 lines, waits until ingest has settled two chunks of 1,000,
    // then breaks off.
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<String>>(4);
    let body =
        reqwest::Body::wrap_stream(futures::stream::unfold(
            rx,
            |mut rx| async move { rx.recv().await.map(|c| (c, rx)) },
        ));
    let upload = tokio::spawn({
        let (client, ingest) = (client.clone(), stack.ingest.clone());
        async move { post_feed(&client, &ingest, "text/plain", Some("survey-2026-cut"), body).await }
    });
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
    let response = client
        .post(format!("{}/v1/feeds?format=xml", stack.ingest))
        .header("content-type", "text/plain")
        .body("https://a.example/1.jpg\n")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let answer: Value = response.json().await.unwrap();
    assert_eq!((&answer["error"]["kind"], &answer["error"]["field"]), (&json!("invalid_field"), &json!("format")));
    stack.stop().await;
    env.finish().await;
}

async fn wait_for_ledger(client: &reqwest::Client, ingest: &str) {
    // Feeds answer 503 (feeds_unavailable) until ingest has reached its database.
    reefline_e2e::wait_for("the feeds ledger", Duration::from_secs(60), || async {
        let response = client
            .post(format!("{ingest}/v1/feeds"))
            .header("content-type", "text/plain")
            .body("")
            .send()
            .await
            .ok()?;
        (response.status() == 201).then_some(())
    })
    .await;
}

/// The coffee photo as a camera would write it: a JPEG whose EXIF gives when, where (GPS) and
/// with what it was taken.
fn photo_with_exif() -> Vec<u8> {
    use exif::{Field, In, Rational, Tag, Value};
    let rgb = image::open(reefline_e2e::cache_dir().join("photos/coffee.png")).unwrap().to_rgb8();
    let ascii =
        |tag, text: &str| Field { tag, ifd_num: In::PRIMARY, value: Value::Ascii(vec![text.as_bytes().to_vec()]) };
    let rational = |tag, parts: &[(u32, u32)]| Field {
        tag,
        ifd_num: In::PRIMARY,
        value: Value::Rational(parts.iter().map(|&(num, denom)| Rational { num, denom }).collect()),
    };
    let fields = [
        ascii(Tag::Make, "Reefline"),
        ascii(Tag::Model, "TestCam 1"),
        ascii(Tag::DateTimeOriginal, "2026:11:20 09:41:07"),
        ascii(Tag::OffsetTimeOriginal, "+10:00"),
        ascii(Tag::GPSLatitudeRef, "S"),
        rational(Tag::GPSLatitude, &[(16, 1), (55, 1), (156, 10)]),
        ascii(Tag::GPSLongitudeRef, "E"),
        rational(Tag::GPSLongitude, &[(145, 1), (46, 1), (412, 10)]),
        Field { tag: Tag::GPSAltitudeRef, ifd_num: In::PRIMARY, value: Value::Byte(vec![1]) },
        rational(Tag::GPSAltitude, &[(12, 1)]),
    ];
    let mut writer = exif::experimental::Writer::new();
    for field in &fields {
        writer.push_field(field);
    }
    let mut tiff = std::io::Cursor::new(Vec::new());
    writer.write(&mut tiff, false).unwrap();
    let mut segment = b"Exif\0\0".to_vec();
    segment.extend(tiff.into_inner());
    let mut jpeg = Vec::new();
    let mut encoder = jpeg_encoder::Encoder::new(&mut jpeg, 90);
    encoder.add_app_segment(1, &segment).unwrap();
    encoder.encode(rgb.as_raw(), rgb.width() as u16, rgb.height() as u16, jpeg_encoder::ColorType::Rgb).unwrap();
    jpeg
}

/// Checks an export against the MegaDetector output format's documented rules: `info` with a
/// string-formatted float `format_version`, string-int category ids with non-blank names, each
/// image a `file`, processed images a `detections` list (relative `bbox` of 4 numbers, `conf` in
/// 0..1, classifications in descending confidence naming listed categories), failed ones a
/// `failure` string and no detection list.
fn check_megadetector(md: &Value) {
    assert_eq!(md["info"]["format_version"], json!("1.6"), "{}", md["info"]);
    assert!(md["info"]["format_version"].as_str().unwrap().parse::<f64>().is_ok());
    for categories in ["detection_categories", "classification_categories"] {
        for (id, name) in md[categories].as_object().unwrap() {
            assert!(
                id.parse::<u32>().is_ok() && !name.as_str().unwrap().trim().is_empty(),
                "{categories}: {id} {name}"
            );
        }
    }
    for image in md["images"].as_array().unwrap() {
        assert!(image["file"].is_string(), "{image}");
        if let Some(failure) = image["failure"].as_str() {
            assert!(!failure.is_empty() && (image["detections"].is_null()), "{image}");
            continue;
        }
        for d in image["detections"].as_array().expect("detections of a processed image") {
            assert!(md["detection_categories"][d["category"].as_str().unwrap()].is_string(), "{d}");
            assert!(d["conf"].is_f64(), "a float, as the format's validator asks: {d}");
            let conf = d["conf"].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&conf), "{d}");
            let bbox: Vec<f64> = d["bbox"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
            assert!(bbox.len() == 4 && bbox.iter().all(|v| (0.0..=1.0).contains(v)), "{d}");
            let scores: Vec<f64> = d["classifications"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| {
                    assert!(md["classification_categories"][c[0].as_str().unwrap()].is_string(), "{c}");
                    c[1].as_f64().unwrap()
                })
                .collect();
            assert!(scores.windows(2).all(|w| w[0] >= w[1]), "descending: {d}");
        }
    }
}

/// Rows of a CSV export, as maps from column to value.
fn csv_rows(text: &str) -> (Vec<String>, Vec<std::collections::HashMap<String, String>>) {
    let mut reader = csv::Reader::from_reader(text.as_bytes());
    let header: Vec<String> = reader.headers().unwrap().iter().map(String::from).collect();
    let rows =
        reader.records().map(|r| header.iter().cloned().zip(r.unwrap().iter().map(String::from)).collect()).collect();
    (header, rows)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_gzipped_csv_feed_with_metadata_is_classified_and_exported() {
    use std::io::Write;
    const ROWS: usize = 2000;
    let env = TestEnv::start().await;
    let stack = Stack::start(env.settings()).await;
    let client = reqwest::Client::new();
    wait_for_ledger(&client, &stack.ingest).await;

    // Every photo under many URLs, a missing photo every 100th row, and 20 bad lines.
    let mut photos: Vec<(String, Option<i64>)> =
        foolbox_photos().into_iter().map(|(name, class)| (name, Some(class as i64))).collect();
    photos.push(("coffee.png".into(), Some(967)));
    // A camera photo with EXIF, served under any name.
    let camera = photo_with_exif();
    let cameras = reefline_e2e::serve(axum::Router::new().route(
        "/camera/{name}",
        axum::routing::get(move || {
            let camera = camera.clone();
            async move { ([("content-type", "image/jpeg")], camera) }
        }),
    ))
    .await;
    let camera_url = format!("http://{cameras}/camera/DSC0001.JPG");
    let mut csv = String::from("station,transect,url,depth_m,latitude,longitude\n");
    let mut expected = std::collections::HashMap::new();
    for i in 0..ROWS {
        let (station, depth) = (format!("Reef {}", i % 7), format!("{}.5", i % 40));
        let (name, class) =
            if i % 100 == 99 { ("missing.jpg".to_owned(), None) } else { photos[i % photos.len()].clone() };
        let (url, class) = match i {
            0 => (camera_url.clone(), Some(967)),
            _ => (format!("{}/photos/{name}?n={i}", env.photos), class),
        };
        csv.push_str(&format!("{station},T{},{url},{depth},-16.{i:04},145.{i:04}\n", i % 3));
        expected.insert(url, (station, depth, class));
    }
    let bad_lines = [
        "Reef 9,T1,not a url,3,0,0",
        "Reef 9,T1,ftp://photos.example/x.jpg,3,0,0",
        "Reef 9,T1,https://photos.example/short-row.jpg",
    ];
    for n in 0..20 {
        csv.push_str(bad_lines[n % bad_lines.len()]);
        csv.push('\n');
    }
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(csv.as_bytes()).unwrap();
    let (status, feed, _) =
        post_feed(&client, &stack.ingest, "application/gzip", None, gz.finish().unwrap().into()).await.unwrap();
    assert_eq!(status, 201, "{feed}");
    assert_eq!((&feed["accepted"], &feed["rejected"]), (&json!(ROWS), &json!(20)), "{feed}");
    let feed_id = feed["feed_id"].as_str().unwrap();

    let progress = reefline_e2e::wait_for("every result of the feed", Duration::from_secs(600), || async {
        let (_, progress) = get_json(&client, &format!("{}/v1/feeds/{feed_id}", stack.sink)).await;
        (progress["done"] == json!(true)).then_some(progress)
    })
    .await;
    let missing = ROWS / 100;
    assert_eq!(
        (&progress["format"], &progress["completed"], &progress["ok"], &progress["error"], &progress["pending"]),
        (&json!("csv"), &json!(ROWS), &json!(ROWS - missing), &json!(missing), &json!(0)),
        "{progress}"
    );
    assert_eq!(progress["columns"], json!(["station", "transect", "depth_m", "latitude", "longitude"]));

    // CSV: every row, in line order, with its metadata and its label.
    let export = client.get(format!("{}/v1/feeds/{feed_id}/results?format=csv", stack.sink)).send().await.unwrap();
    assert_eq!(export.headers()["content-type"], "text/csv; charset=utf-8");
    let (header, rows) = csv_rows(&export.text().await.unwrap());
    assert_eq!(&header[..7], ["url", "line", "station", "transect", "depth_m", "latitude", "longitude"]);
    assert_eq!(rows.len(), ROWS);
    let mut right = 0;
    for (n, row) in rows.iter().enumerate() {
        assert_eq!(row["line"], (n + 2).to_string(), "line order");
        let (station, depth, class) = &expected[&row["url"]];
        assert_eq!((&row["station"], &row["depth_m"]), (station, depth), "{row:?}");
        match class {
            Some(class) => {
                assert_eq!(row["status"], "ok", "{row:?}");
                right += usize::from(row["top1_index"] == class.to_string());
            }
            None => assert_eq!((row["status"].as_str(), row["error_kind"].as_str()), ("error", "not_found")),
        }
    }
    // The foolbox photos are labelled (ImageNet's validation labels): the model gets most right.
    assert!(right >= (ROWS - missing) * 8 / 10, "{right} of {} top-1 right", ROWS - missing);

    // The camera photo's row has what its EXIF says, its size and its hash.
    let camera = rows.iter().find(|r| r["url"] == camera_url).expect("the camera photo's row");
    let exif_columns = ["taken_at", "gps_latitude", "gps_longitude", "gps_altitude", "camera_make", "camera_model"];
    assert_eq!(
        exif_columns.map(|c| camera[c].as_str()),
        ["2026-11-20T09:41:07+10:00", "-16.921", "145.7781111", "-12", "Reefline", "TestCam 1"],
        "{camera:?}"
    );
    assert_eq!((camera["width"].as_str(), camera["height"].as_str(), camera["sha256"].len()), ("600", "400", 64));
    assert!(rows.iter().all(|r| r["sha256"].len() == 64 || r["status"] == "error"), "every fetched photo is hashed");

    // The MegaDetector batch format (1.6), as Timelapse and AddaxAI read it, checked against the
    // format's documented structure.
    let md = client.get(format!("{}/v1/feeds/{feed_id}/results?format=megadetector", stack.sink)).send().await.unwrap();
    let md: Value = md.json().await.expect("MegaDetector JSON");
    check_megadetector(&md);
    assert_eq!(md["classification_categories"].as_object().unwrap().len(), 1000, "the 1,000 classes");
    assert_eq!(md["classification_categories"]["967"], json!("espresso"));
    let images = md["images"].as_array().unwrap();
    assert_eq!(images.len(), ROWS);
    assert_eq!(images.iter().filter(|i| i["failure"].is_string()).count(), missing);
    let camera_image = images.iter().find(|i| i["file"] == json!(camera_url)).unwrap();
    assert_eq!(
        (&camera_image["exif"]["gps_latitude"], &camera_image["metadata"]["station"]),
        (&json!(-16.921), &json!("Reef 0"))
    );
    let detection = &camera_image["detections"][0];
    assert_eq!(
        (&detection["category"], &detection["classifications"][0][0]),
        (&json!("4"), &json!("967")),
        "{camera_image}"
    );

    // NDJSON, filtered: the errors only, each with its metadata.
    let errors = client
        .get(format!("{}/v1/feeds/{feed_id}/results?format=ndjson&status=error", stack.sink))
        .send()
        .await
        .unwrap();
    let errors: Vec<Value> = errors.text().await.unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(errors.len(), missing);
    assert!(errors.iter().all(|e| e["metadata"]["transect"].is_string() && e["feed_id"] == json!(feed_id)));
    let (status, refused) = get_json(&client, &format!("{}/v1/feeds/{feed_id}/results?min_score=2", stack.sink)).await;
    assert_eq!((status, &refused["error"]["field"]), (400, &json!("min_score")), "{refused}");

    // Results across feeds and batches, by label, a page at a time: every espresso of the feed.
    let espressos = rows.iter().filter(|r| r["top1_label"] == "espresso").count();
    assert!(espressos >= 2, "{espressos}");
    let (mut found, mut after) = (Vec::new(), String::new());
    loop {
        let url = format!("{}/v1/results?label=Espresso&feed={feed_id}&limit=7&after={after}", stack.sink);
        let (status, page) = get_json(&client, &url).await;
        assert_eq!(status, 200, "{page}");
        found.extend(page["results"].as_array().unwrap().iter().map(|r| r["request_id"].as_str().unwrap().to_owned()));
        match page["next"].as_str() {
            Some(next) => after = next.to_owned(),
            None => break,
        }
    }
    let distinct: std::collections::HashSet<&String> = found.iter().collect();
    assert_eq!((found.len(), distinct.len()), (espressos, espressos), "every espresso once");
    let (status, refused) = get_json(&client, &format!("{}/v1/results?since=yesterday", stack.sink)).await;
    assert_eq!((status, &refused["error"]["field"]), (400, &json!("since")), "{refused}");

    // A batch (one chunk of the feed) exports the same way.
    let first = &errors[0];
    let batch = client
        .get(format!("{}/v1/batches/{}/results?format=csv", stack.sink, first["batch_id"].as_str().unwrap()))
        .send()
        .await
        .unwrap();
    let (header, rows) = csv_rows(&batch.text().await.unwrap());
    assert!(header.contains(&"station".to_owned()), "{header:?}");
    assert_eq!(rows.len(), 1000);

    // The rejects, by line.
    let (_, rejects) = get_json(&client, &format!("{}/v1/feeds/{feed_id}/rejects", stack.sink)).await;
    let reasons: Vec<(i64, &str)> = rejects["rejects"]
        .as_array()
        .unwrap()
        .iter()
        .take(3)
        .map(|r| (r["line"].as_i64().unwrap(), r["reason"].as_str().unwrap()))
        .collect();
    assert_eq!(
        reasons,
        [
            (2002, "not a usable URL: relative URL without a base"),
            (2003, "not a usable URL: scheme `ftp` is not allowed; use http or https"),
            (2004, "3 fields where the header has 6"),
        ]
    );

    // The same photos under new URLs, as NDJSON: the same bytes by the same model, so the model
    // does not run again; the results say so, with the predictions stored before.
    let again = [
        format!("http://{cameras}/camera/DSC0002.JPG"),
        format!("{}/photos/coffee.png?again=1", env.photos),
        format!("{}/photos/{}?again=1", env.photos, photos[0].0),
    ];
    let ndjson: String = again.iter().map(|url| format!("{}\n", json!({"url": url, "station": "Reef 1"}))).collect();
    let (status, second, _) =
        post_feed(&client, &stack.ingest, "application/x-ndjson", None, ndjson.into()).await.unwrap();
    assert_eq!((status, &second["accepted"]), (201, &json!(3)), "{second}");
    let second_id = second["feed_id"].as_str().unwrap();
    reefline_e2e::wait_for("the second feed", Duration::from_secs(120), || async {
        let (_, progress) = get_json(&client, &format!("{}/v1/feeds/{second_id}", stack.sink)).await;
        (progress["done"] == json!(true)).then_some(())
    })
    .await;
    let export = client.get(format!("{}/v1/feeds/{second_id}/results?format=ndjson", stack.sink)).send().await.unwrap();
    let cached: Vec<Value> = export.text().await.unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(cached.iter().map(|r| &r["cached"]).collect::<Vec<_>>(), [&json!(true); 3], "{cached:?}");
    assert_eq!(cached[0]["exif"]["camera_model"], json!("TestCam 1"), "{}", cached[0]);
    assert_eq!(cached[0]["metadata"], json!({"station": "Reef 1"}));
    let first_camera = &rows.iter().find(|r| r["url"] == camera_url).unwrap();
    assert_eq!(cached[0]["sha256"].as_str(), Some(first_camera["sha256"].as_str()));
    assert_eq!(cached[0]["predictions"][0]["index"].to_string(), first_camera["top1_index"]);
    let hits = client.get(format!("{}/metrics", stack.classifier_ops)).send().await.unwrap().text().await.unwrap();
    let hits = reefline_e2e::metric(&hits, "classifier_cache_lookups_total{outcome=\"hit\"}").unwrap_or(0.0);
    assert!(hits >= 3.0, "{hits} cache hits");

    // A list fetched by ingest from a URL (its first ten rows and two bad lines); an address the
    // fetch rules refuse is named.
    let list: String = csv.lines().take(11).chain(bad_lines[..2].iter().copied()).map(|l| format!("{l}\n")).collect();
    let lists = reefline_e2e::serve(axum::Router::new().route(
        "/survey/photos.csv",
        axum::routing::get(move || {
            let list = list.clone();
            async move { ([("content-type", "text/csv")], list) }
        }),
    ))
    .await;
    let source = json!({ "source_url": format!("http://{lists}/survey/photos.csv") });
    let (status, fetched) = reefline_e2e::post_json(&client, &format!("{}/v1/feeds", stack.ingest), &source).await;
    assert_eq!((status, &fetched["accepted"], &fetched["rejected"]), (201, &json!(10), &json!(2)), "{fetched}");
    let metadata = json!({ "source_url": "http://169.254.169.254/latest/list.csv" });
    let (status, refused) = reefline_e2e::post_json(&client, &format!("{}/v1/feeds", stack.ingest), &metadata).await;
    assert_eq!((status, &refused["error"]["kind"]), (400, &json!("unreadable_feed")), "{refused}");
    assert!(refused["error"]["message"].as_str().unwrap().contains("refused"), "{refused}");
    stack.stop().await;
    env.finish().await;
}

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
