//! Bulk feeds out: a gzipped CSV with metadata classified end to end, what each photo says of
//! itself (EXIF, hash, the result cache), and the results exported as CSV, NDJSON and the
//! MegaDetector, COCO and Camtrap DP formats (camtrap.rs), filtered and searched.

use std::time::Duration;

use reefline_e2e::feeds::{csv_rows, post_feed, wait_for_ledger};
use reefline_e2e::{Stack, TestEnv, foolbox_photos, get_json};
use serde_json::{Value, json};

mod camtrap;

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
    // MegaDetector's own validator first, then what it does not check.
    let (errors, warnings) = reefline_e2e::feeds::megadetector_validator("batch", md);
    assert!(errors.is_empty() && warnings.is_empty(), "validate_batch_results: {errors:?} {warnings:?}");
    assert_eq!(md["info"]["format_version"], json!("1.6"), "{}", md["info"]);
    assert_eq!(md["info"]["detector_metadata"]["megadetector_version"], "none", "{}", md["info"]);
    let ids = |k: &str| md[k].as_object().unwrap().keys().cloned().collect::<Vec<_>>();
    assert_eq!(ids("classification_categories"), ids("classification_category_descriptions"));
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_gzipped_csv_feed_with_metadata_is_classified_and_exported() {
    use std::io::Write;
    const ROWS: usize = 2000;
    let env = TestEnv::start().await;
    let mut settings = env.settings();
    // A window wider than the feed: its chunks are 1,000 lines, as without one.
    settings.ingest.feed_window_images = 4000;
    let stack = Stack::start(settings).await;
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

    // COCO Camera Traps, as MegaDetector's integrity check reads it (a location for every image,
    // here the station): one image per line, one image-level annotation per classified image.
    let cct =
        client.get(format!("{}/v1/feeds/{feed_id}/results?format=coco-camera-traps", stack.sink)).send().await.unwrap();
    let cct: Value = cct.json().await.expect("COCO Camera Traps JSON");
    let (errors, _) = reefline_e2e::feeds::megadetector_validator("cct", &cct);
    assert!(errors.is_empty(), "integrity_check_json_db: {errors:?}");
    let cct_images = cct["images"].as_array().unwrap();
    assert_eq!((cct_images.len(), cct["annotations"].as_array().unwrap().len()), (ROWS, ROWS - missing));
    assert_eq!(cct["categories"][0], json!({"id": 0, "name": "empty"}));
    assert_eq!(cct["categories"][968], json!({"id": 968, "name": "espresso"}));
    let camera_cct = cct_images.iter().find(|i| i["file_name"] == json!(camera_url)).unwrap();
    assert_eq!(
        (&camera_cct["location"], &camera_cct["datetime"], &camera_cct["width"]),
        (&json!("Reef 0"), &json!("2026-11-20 09:41:07"), &json!(600)),
        "{camera_cct}"
    );
    let annotation = cct["annotations"].as_array().unwrap().iter().find(|a| a["image_id"] == camera_cct["id"]).unwrap();
    assert_eq!(annotation["category_id"], json!(968), "the espresso class, index + 1: {annotation}");
    assert_eq!(cct_images.iter().filter(|i| i["corrupt"] == json!(true)).count(), missing);

    // Camtrap DP needs when each image was taken: this feed gives no times, and only the camera
    // photo's EXIF does. The package is refused before anything is sent, naming what is missing.
    let (status, refused) =
        get_json(&client, &format!("{}/v1/feeds/{feed_id}/results?format=camtrap-dp", stack.sink)).await;
    assert_eq!(
        (status, &refused["error"]["kind"], &refused["error"]["missing"]),
        (422, &json!("missing_fields"), &json!(["timestamp"]))
    );
    let message = refused["error"]["message"].as_str().unwrap();
    let untimed = ROWS - missing - 1;
    assert!(
        message.contains(&format!("{untimed} classified images have no time taken (the first: line 3)")),
        "{message}"
    );
    camtrap::package_of_a_survey(&client, &env, &stack, &camera_url).await;

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
    // The same search, every result at once, in each export format.
    let search =
        |format: &str| format!("{}/v1/results/export?label=Espresso&feed={feed_id}&format={format}", stack.sink);
    let export = client.get(search("csv")).send().await.unwrap();
    assert_eq!(export.headers()["content-disposition"], "attachment; filename=\"reefline-search-results.csv\"");
    let (header, found_rows) = csv_rows(&export.text().await.unwrap());
    assert!(header.contains(&"station".to_owned()), "the results' metadata columns: {header:?}");
    let found_ids: std::collections::HashSet<&str> = found_rows.iter().map(|r| r["request_id"].as_str()).collect();
    assert_eq!(found_ids, distinct.iter().map(|id| id.as_str()).collect(), "the search's espressos, each once");
    let ndjson = client.get(search("ndjson")).send().await.unwrap().text().await.unwrap();
    let found_lines: Vec<Value> = ndjson.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(found_lines.len(), espressos);
    assert!(found_lines.iter().all(|r| r["predictions"][0]["label"] == json!("espresso")), "{ndjson}");
    let (status, md) = get_json(&client, &search("megadetector")).await;
    assert_eq!((status, md["images"].as_array().map(Vec::len)), (200, Some(espressos)), "{md}");
    check_megadetector(&md);
    let (status, cct) = get_json(&client, &search("coco-camera-traps")).await;
    assert_eq!((status, cct["images"].as_array().map(Vec::len)), (200, Some(espressos)), "{cct}");
    let (status, refused) = get_json(&client, &format!("{}&relative_to=http://x/", search("csv"))).await;
    assert_eq!((status, &refused["error"]["field"]), (400, &json!("relative_to")), "{refused}");
    let (status, refused) = get_json(&client, &format!("{}/v1/results?since=yesterday", stack.sink)).await;
    assert_eq!((status, &refused["error"]["field"]), (400, &json!("since")), "{refused}");
    // A misspelt filter is refused, naming it, rather than ignored (which would return everything).
    for path in [
        "/v1/results?lable=Espresso",
        "/v1/results/export?lable=Espresso",
        &format!("/v1/feeds/{feed_id}/results?marnie=true"),
    ] {
        let (status, refused) = get_json(&client, &format!("{}{path}", stack.sink)).await;
        assert_eq!((status, &refused["error"]["field"]), (400, &json!("query")), "{path}: {refused}");
        let named = path.split(['?', '=']).nth(1).unwrap();
        assert!(refused["error"]["message"].as_str().is_some_and(|m| m.contains(named)), "{refused}");
    }

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
            (2003, "not a usable URL: scheme `ftp` is not allowed; use http, https, s3 or az"),
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
    // A line with two results (its chunk produced twice: an upload cut off between produce and
    // checkpoint) counts once, exports once and is found once: its latest result.
    let first = &cached[0];
    let twice = reefline_schemas::ImageRequest {
        request_id: uuid::Uuid::now_v7().to_string(),
        batch_id: first["batch_id"].as_str().unwrap().to_owned(),
        batch_index: 0,
        batch_size: 3,
        url: first["url"].as_str().unwrap().to_owned(),
        submitted_at_ms: chrono::Utc::now().timestamp_millis(),
        source: "feed".into(),
        feed_id: Some(second_id.to_owned()),
        line: first["line"].as_i64(),
        ..Default::default()
    };
    let producer: reefline_common::producer::FutureProducer = env.broker.kafka().producer_config().create().unwrap();
    let codec = reefline_schemas::Codec::new(&env.registry).unwrap();
    let payload = codec.encode(&env.names.requests, &twice).await.unwrap();
    let record = rdkafka::producer::FutureRecord::to(&env.names.requests).key(&twice.request_id).payload(&payload);
    producer.send(record, Duration::from_secs(10)).await.map_err(|(e, _)| e).unwrap();
    let url = format!("{}/v1/results/{}", stack.sink, twice.request_id);
    reefline_e2e::wait_for_status(&client, &url, 200, "the line's second result", Duration::from_secs(60)).await;
    let (_, progress) = get_json(&client, &format!("{}/v1/feeds/{second_id}", stack.sink)).await;
    assert_eq!(
        (&progress["completed"], &progress["ok"], &progress["done"]),
        (&json!(3), &json!(3), &json!(true)),
        "{progress}"
    );
    let export = client.get(format!("{}/v1/feeds/{second_id}/results?format=ndjson", stack.sink)).send().await.unwrap();
    let lines: Vec<Value> = export.text().await.unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.iter().map(|r| r["line"].as_i64().unwrap()).collect::<Vec<_>>(), [1, 2, 3]);
    assert_eq!(lines[0]["request_id"], json!(twice.request_id), "the line's latest result");
    let (_, page) = get_json(&client, &format!("{}/v1/results?feed={second_id}", stack.sink)).await;
    assert_eq!(page["results"].as_array().unwrap().len(), 3, "{page}");

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

/// Exports still running: their queries as Postgres shows them.
async fn exports_running(pool: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity
         WHERE datname = current_database() AND pid <> pg_backend_pid() AND state <> 'idle'
           AND query LIKE '%FROM results WHERE batch_id = $1 AND%'",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_that_stops_reading_an_export_holds_neither_a_connection_nor_a_snapshot() {
    use tokio::io::AsyncWriteExt;
    let env = TestEnv::start().await;
    let mut settings = env.settings();
    settings.sink.export_idle_timeout_s = 2;
    settings.sink.exports_per_tenant = 1;
    let stack = Stack::start_without_classifier(settings).await;
    let client = reqwest::Client::new();
    // A batch of 20,000 results, some 20 MB of CSV: more than the sockets between a client that
    // stops reading and the sink can hold.
    let pool = env.db.pool().await;
    let batch_id = uuid::Uuid::now_v7().to_string();
    sqlx::query(
        "INSERT INTO results (request_id, batch_id, batch_index, batch_size, url, status, predictions, model_name,
                              model_version, submitted_at, completed_at)
         SELECT $1 || '-' || i, $1, i, 20000, 'https://photos.example/' || repeat('x', 900) || i || '.jpg', 'ok',
                '[]', 'm', 'v', now(), now()
         FROM generate_series(0, 19999) AS i",
    )
    .bind(&batch_id)
    .execute(&pool)
    .await
    .unwrap();
    let export = format!("{}/v1/batches/{batch_id}/results?format=csv", stack.sink);

    // A client asks for the export and never reads it (its receive buffer small, as the kernel
    // would otherwise take most of the export into it).
    let addr = stack.sink.trim_start_matches("http://").to_owned();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stalled = socket.connect(addr.parse().unwrap()).await.unwrap();
    let request = format!("GET /v1/batches/{batch_id}/results?format=csv HTTP/1.1\r\nhost: {addr}\r\n\r\n");
    stalled.write_all(request.as_bytes()).await.unwrap();
    reefline_e2e::wait_for("the stalled export's query", Duration::from_secs(30), || async {
        (exports_running(&pool).await == 1).then_some(())
    })
    .await;
    // Meanwhile the tenant may run no second export: the others' connections stay free.
    let refused = client.get(&export).send().await.unwrap();
    assert_eq!((refused.status().as_u16(), refused.headers().contains_key("retry-after")), (429, true));
    let refused: Value = refused.json().await.unwrap();
    assert_eq!(refused["error"]["kind"], "too_many_exports", "{refused}");
    // The stalled export is ended within its idle timeout: its query, and the snapshot that held
    // back VACUUM, are gone while its client still holds the socket.
    reefline_e2e::wait_for("the stalled export to end", Duration::from_secs(30), || async {
        (exports_running(&pool).await == 0).then_some(())
    })
    .await;
    let whole = reefline_e2e::wait_for("a whole export", Duration::from_secs(30), || async {
        let response = client.get(&export).send().await.ok()?;
        (response.status() == 200).then_some(())?;
        response.text().await.ok()
    })
    .await;
    assert_eq!(csv_rows(&whole).1.len(), 20_000);
    drop(stalled);
    stack.stop().await;
    env.finish().await;
}
