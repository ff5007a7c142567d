//! Object storage in: images named `s3://bucket/key` or `az://container/blob` in submissions, and
//! feeds from a bucket's or container's prefix, read from a real S3 API (moto's server on loopback)
//! and a real Azure Blob API (Azurite on loopback), each checking every request's signature. Every failure becomes its own error result: a missing key, an object that is not an
//! image, one over the size limit, a bucket whose credentials are wrong, a bucket nobody configured.

use std::time::Duration;

use reefline_e2e::feeds::post_feed;
use reefline_e2e::s3::S3Server;
use reefline_e2e::{ServiceProcess, Stack, TestEnv, cache_dir, get_json, post_json, topic_size};
use serde_json::{Value, json};

const ESPRESSO: i64 = 967;

fn photo(name: &str) -> Value {
    json!({"file": cache_dir().join("photos").join(name)})
}

/// Status and error kind of a result, or its top-1 class.
fn outcome(result: &Value) -> String {
    match result["status"].as_str() {
        Some("ok") => format!("top1 {}", result["predictions"][0]["index"]),
        _ => {
            format!("{} {}", result["status"].as_str().unwrap_or("?"), result["error"]["kind"].as_str().unwrap_or("?"))
        }
    }
}

/// Submits `images` to `/v1/classify` waiting for their answers: the answer, and each result's outcome.
async fn classify_waiting(client: &reqwest::Client, stack: &Stack, images: Value) -> (Value, Vec<String>) {
    let body = json!({"images": images, "wait": 60});
    let (status, answer) = post_json(client, &format!("{}/v1/classify", stack.ingest), &body).await;
    assert_eq!(status, 200, "{answer}");
    let outcomes = answer["results"].as_array().expect("results").iter().map(outcome).collect();
    (answer, outcomes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_bucket_is_classified_from_s3_urls_and_from_its_prefix_each_failure_its_own_kind() {
    let s3 = S3Server::start(json!({"objects": {
        "reef-survey": {
            "survey/site-a/coffee.png": photo("coffee.png"),
            "survey/site-a/day 2/IMG_0243.JPG": photo("imagenet_00_243.jpg"),
            "survey/site-b/notes.txt": {"text": "dive log, not a photo"},
            "survey/site-b/broken.jpg": {"text": "<html>not a photo</html>"},
            "survey/big/huge.jpg": {"zeros": 3_000_000},
        },
        "locked-survey": {"x.jpg": photo("coffee.png")},
    }}))
    .await;
    let env = TestEnv::start().await;
    let mut settings = env.settings();
    // The locked bucket is named in a stores file with a key the server does not know.
    let stores_file = std::env::temp_dir().join(format!("stores-{}.toml", uuid::Uuid::now_v7().simple()));
    let locked = format!(
        "[[store]]\nbuckets = [\"locked-survey\"]\nendpoint = \"{}\"\naccess_key_id = \"AKIAWRONGKEY00000000\"\nsecret_access_key = \"wrong\"\n",
        s3.endpoint
    );
    std::fs::write(&stores_file, locked).unwrap();
    for stores in [&mut settings.ingest.stores, &mut settings.classifier.stores] {
        *stores = s3.stores(&["reef-survey"]);
        stores.stores_file = Some(stores_file.clone());
    }
    settings.classifier.max_image_bytes = 2_000_000;
    let stack = Stack::start(settings).await;
    let client = reqwest::Client::new();

    // Submitted as s3:// URLs, waiting for the answers.
    let images = [
        "s3://reef-survey/survey/site-a/coffee.png",
        "s3://reef-survey/survey/site-a/day%202/IMG_0243.JPG",
        "s3://reef-survey/survey/missing.jpg",
        "s3://reef-survey/survey/site-b/broken.jpg",
        "s3://reef-survey/survey/big/huge.jpg",
        "s3://locked-survey/x.jpg",
    ];
    // The first with its metadata, which travels with it to its result.
    let mut submitted: Vec<Value> = images.iter().map(|u| json!(u)).collect();
    submitted[0] = json!({"url": images[0], "metadata": {"station": "Reef 4", "depth_m": 12.5}});
    let (answer, outcomes) = classify_waiting(&client, &stack, json!(submitted)).await;
    let results = answer["results"].as_array().expect("results");
    assert_eq!(
        outcomes,
        [
            format!("top1 {ESPRESSO}"),
            "top1 243".into(),
            "error not_found".into(),
            "error not_an_image".into(),
            "error too_large".into(),
            "error forbidden".into(),
        ],
        "{answer}"
    );
    let forbidden = results[5]["error"]["message"].as_str().unwrap();
    assert!(forbidden.contains("403") && forbidden.contains("InvalidAccessKeyId"), "{forbidden}");
    assert!(!forbidden.contains("wrong"), "no secret in an error: {forbidden}");
    assert_eq!(results[1]["url"], images[1]);
    assert_eq!(results[0]["metadata"], json!({"station": "Reef 4", "depth_m": "12.5"}), "{answer}");

    // A bucket nobody configured is refused before anything is produced, naming the field.
    let (status, refused) = post_json(
        &client,
        &format!("{}/v1/classify", stack.ingest),
        &json!({"images": ["s3://reef-survey/survey/site-a/coffee.png", "s3://elsewhere/x.jpg"]}),
    )
    .await;
    assert_eq!(status, 400, "{refused}");
    assert_eq!(
        refused["error"],
        json!({"kind": "unknown_bucket", "field": "images[1]",
               "message": "`images[1]`: bucket `elsewhere` is not one this service reads; it reads: locked-survey, reef-survey"})
    );

    // A camera system's records name objects too; a bucket nobody configured is an error result.
    let codec = reefline_schemas::Codec::new(&env.registry).unwrap();
    let producer: rdkafka::producer::FutureProducer = env.broker.kafka().producer_config().create().unwrap();
    let mut ids = Vec::new();
    for url in ["s3://reef-survey/survey/site-a/coffee.png", "s3://elsewhere/x.jpg"] {
        let request = reefline_e2e::camera::request(url);
        let payload = codec.encode(&env.names.requests, &request).await.unwrap();
        let record =
            rdkafka::producer::FutureRecord::to(&env.names.requests).key(&request.request_id).payload(&payload);
        producer.send(record, Duration::from_secs(10)).await.map_err(|(e, _)| e).unwrap();
        ids.push(request.request_id);
    }
    let mut camera = Vec::new();
    for id in &ids {
        let url = format!("{}/v1/results/{id}", stack.sink);
        camera.push(
            reefline_e2e::wait_for_status(&client, &url, 200, "a camera record's result", Duration::from_secs(60))
                .await,
        );
    }
    assert_eq!(outcome(&camera[0]), format!("top1 {ESPRESSO}"), "{}", camera[0]);
    assert_eq!(outcome(&camera[1]), "error unknown_bucket", "{}", camera[1]);

    // A feed from the prefix: every image object below it (not the notes), each with its key,
    // size and ETag.
    let (status, feed) =
        post_json(&client, &format!("{}/v1/feeds", stack.ingest), &json!({"source": "s3://reef-survey/survey/"})).await;
    assert_eq!(status, 201, "{feed}");
    assert_eq!(
        (&feed["lines_read"], &feed["accepted"], &feed["rejected"]),
        (&json!(4), &json!(4), &json!(0)),
        "{feed}"
    );
    let feed_id = feed["feed_id"].as_str().unwrap();
    let progress = reefline_e2e::wait_for("every result of the prefix feed", Duration::from_secs(120), || async {
        let (_, progress) = get_json(&client, &format!("{}/v1/feeds/{feed_id}", stack.sink)).await;
        (progress["done"] == json!(true)).then_some(progress)
    })
    .await;
    assert_eq!((&progress["ok"], &progress["error"]), (&json!(2), &json!(2)), "{progress}");
    assert_eq!(progress["source_url"], "s3://reef-survey/survey/", "{progress}");
    let export = client.get(format!("{}/v1/feeds/{feed_id}/results?format=ndjson", stack.sink)).send().await.unwrap();
    let rows: Vec<Value> =
        export.text().await.unwrap().lines().map(|l| serde_json::from_str(l).expect("an NDJSON row")).collect();
    // Listed in key order.
    let keys: Vec<&str> = rows.iter().map(|r| r["metadata"]["key"].as_str().unwrap_or("?")).collect();
    assert_eq!(
        keys,
        [
            "survey/big/huge.jpg",
            "survey/site-a/coffee.png",
            "survey/site-a/day 2/IMG_0243.JPG",
            "survey/site-b/broken.jpg"
        ]
    );
    let coffee = &rows[1];
    assert_eq!(outcome(coffee), format!("top1 {ESPRESSO}"), "{coffee}");
    let size = std::fs::metadata(cache_dir().join("photos/coffee.png")).unwrap().len();
    assert_eq!(coffee["metadata"]["size"], size.to_string(), "{coffee}");
    assert_eq!(coffee["metadata"]["etag"].as_str().map(str::len), Some(32), "an MD5 ETag: {coffee}");
    assert_eq!(outcome(&rows[0]), "error too_large");

    // As MegaDetector's batch format, its files relative to the prefix, as Timelapse reads them;
    // MegaDetector's own validator finds nothing wrong.
    let md: Value = client
        .get(format!(
            "{}/v1/feeds/{feed_id}/results?format=megadetector&relative_to=s3%3A%2F%2Freef-survey%2Fsurvey%2F",
            stack.sink
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let files: Vec<&str> = md["images"].as_array().unwrap().iter().map(|i| i["file"].as_str().unwrap()).collect();
    assert_eq!(files, ["big/huge.jpg", "site-a/coffee.png", "site-a/day 2/IMG_0243.JPG", "site-b/broken.jpg"]);
    let (errors, warnings) = reefline_e2e::feeds::megadetector_validator("batch", &md);
    assert!(errors.is_empty() && warnings.is_empty(), "validate_batch_results: {errors:?} {warnings:?}");
    let (status, refused) =
        get_json(&client, &format!("{}/v1/feeds/{feed_id}/results?format=csv&relative_to=s3://x/", stack.sink)).await;
    assert_eq!((status, &refused["error"]["field"]), (400, &json!("relative_to")), "{refused}");

    // A glob picks the objects; refusals name the field.
    let (status, feed) = post_json(
        &client,
        &format!("{}/v1/feeds", stack.ingest),
        &json!({"source": "s3://reef-survey/survey", "match": "site-a/**"}),
    )
    .await;
    assert_eq!((status, &feed["accepted"]), (201, &json!(2)), "{feed}");
    for (body, status, kind, field) in [
        (json!({"source": "s3://elsewhere/survey/"}), 400, "unknown_bucket", "source"),
        (json!({"source": "https://reef.example/survey/"}), 400, "invalid_url", "source"),
        (json!({"source": "s3://reef-survey/survey/", "match": "**/*.{jpg"}), 400, "invalid_field", "match"),
        (json!({"source_url": "https://reef.example/list.csv", "match": "*.jpg"}), 400, "invalid_field", "match"),
    ] {
        let (got, refused) = post_json(&client, &format!("{}/v1/feeds", stack.ingest), &body).await;
        assert_eq!(
            (got, &refused["error"]["kind"], &refused["error"]["field"]),
            (status, &json!(kind), &json!(field)),
            "{body}: {refused}"
        );
    }
    // The command line does the same: `reefline submit s3://bucket/prefix/`.
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_reefline-under-test"))
        .args(["--ingest-url", &stack.ingest, "--sink-url", &stack.sink])
        .args(["submit", "s3://reef-survey/survey/", "--match", "**/*.png", "--wait"])
        .output()
        .await
        .expect("running reefline");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "reefline submit failed: {}", String::from_utf8_lossy(&output.stderr));
    let documents: Vec<Value> = serde_json::Deserializer::from_str(&stdout).into_iter().map(Result::unwrap).collect();
    assert_eq!(documents[0]["accepted"], json!(1), "the one PNG: {stdout}");
    assert_eq!((&documents[1]["done"], &documents[1]["ok"]), (&json!(true), &json!(1)), "{stdout}");

    // Wrong credentials are found before the feed is opened.
    let (status, refused) =
        post_json(&client, &format!("{}/v1/feeds", stack.ingest), &json!({"source": "s3://locked-survey/"})).await;
    assert_eq!((status, &refused["error"]["kind"]), (400, &json!("unreadable_feed")), "{refused}");
    let message = refused["error"]["message"].as_str().unwrap();
    assert!(message.contains("listing s3://locked-survey/ failed") && message.contains("403"), "{message}");

    stack.stop().await;
    env.finish().await;
    let _ = std::fs::remove_file(stores_file);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_azure_container_is_classified_from_az_urls_and_from_its_prefix() {
    use object_store::ObjectStoreExt;
    let azure = reefline_e2e::azurite::AzureServer::start().await;
    for container in ["survey-photos", "locked-photos"] {
        azure.create_container(container).await;
    }
    let photos = azure.container("survey-photos");
    let read = |name: &str| std::fs::read(cache_dir().join("photos").join(name)).unwrap();
    for (blob, bytes) in [
        ("2026/site-a/coffee.png", read("coffee.png")),
        ("2026/site-a/day 2/IMG_0243.JPG", read("imagenet_00_243.jpg")),
        ("2026/site-b/notes.txt", b"dive log, not a photo".to_vec()),
        ("2026/site-b/broken.jpg", b"<html>not a photo</html>".to_vec()),
    ] {
        photos.put(&object_store::path::Path::from(blob), bytes.into()).await.expect("uploading a blob");
    }
    azure
        .container("locked-photos")
        .put(&object_store::path::Path::from("x.jpg"), read("coffee.png").into())
        .await
        .expect("uploading a blob");
    let env = TestEnv::start().await;
    let mut settings = env.settings();
    // The locked container is named in a stores file with a key that is not the account's.
    let stores_file = std::env::temp_dir().join(format!("stores-{}.toml", uuid::Uuid::now_v7().simple()));
    let locked = format!(
        "[[store]]\nkind = \"azure\"\ncontainers = [\"locked-photos\"]\naccount = \"{}\"\naccess_key = \"{}\"\nendpoint = \"{}\"\n",
        reefline_e2e::azurite::ACCOUNT,
        "d3Jvbmcga2V5IG9mIHRoZSByaWdodCBsZW5ndGggZm9yIGFuIGFjY291bnQga2V5IQ==",
        azure.endpoint
    );
    std::fs::write(&stores_file, locked).unwrap();
    for stores in [&mut settings.ingest.stores, &mut settings.classifier.stores] {
        *stores = azure.stores(&["survey-photos"]);
        stores.stores_file = Some(stores_file.clone());
    }
    let stack = Stack::start(settings).await;
    let client = reqwest::Client::new();

    let images = [
        "az://survey-photos/2026/site-a/coffee.png",
        "az://survey-photos/2026/site-a/day%202/IMG_0243.JPG",
        "az://survey-photos/2026/missing.jpg",
        "az://survey-photos/2026/site-b/broken.jpg",
        "az://locked-photos/x.jpg",
    ];
    let (answer, outcomes) = classify_waiting(&client, &stack, json!(images)).await;
    let results = answer["results"].as_array().expect("results");
    assert_eq!(
        outcomes,
        [
            format!("top1 {ESPRESSO}"),
            "top1 243".into(),
            "error not_found".into(),
            "error not_an_image".into(),
            "error forbidden".into()
        ],
        "{answer}"
    );
    let forbidden = results[4]["error"]["message"].as_str().unwrap();
    // Azurite's code; Azure's own is AuthenticationFailed, with the same message.
    let expected = "403 Forbidden (AuthorizationFailure: Server failed to authenticate the request.";
    assert!(forbidden.contains(expected) && !forbidden.contains("RequestId"), "{forbidden}");
    assert!(!forbidden.contains("127.0.0.1"), "no store address in an error: {forbidden}");

    // A container nobody configured is refused before anything is produced, naming the field.
    let (status, refused) =
        post_json(&client, &format!("{}/v1/classify", stack.ingest), &json!({"images": ["az://elsewhere/x.jpg"]}))
            .await;
    assert_eq!(status, 400, "{refused}");
    assert_eq!(
        refused["error"]["message"],
        json!(
            "`images[0]`: bucket `az://elsewhere` is not one this service reads; it reads: az://locked-photos, az://survey-photos"
        )
    );
    let (status, refused) =
        post_json(&client, &format!("{}/v1/classify", stack.ingest), &json!({"images": ["az://Survey_Photos/x.jpg"]}))
            .await;
    assert_eq!((status, &refused["error"]["kind"]), (400, &json!("invalid_url")), "{refused}");

    // A feed from the prefix: every image blob below it (not the notes), with its key, size and ETag.
    let (status, feed) =
        post_json(&client, &format!("{}/v1/feeds", stack.ingest), &json!({"source": "az://survey-photos/2026/"})).await;
    assert_eq!(status, 201, "{feed}");
    assert_eq!((&feed["accepted"], &feed["rejected"]), (&json!(3), &json!(0)), "{feed}");
    let feed_id = feed["feed_id"].as_str().unwrap();
    let progress = reefline_e2e::wait_for("every result of the container feed", Duration::from_secs(120), || async {
        let (_, progress) = get_json(&client, &format!("{}/v1/feeds/{feed_id}", stack.sink)).await;
        (progress["done"] == json!(true)).then_some(progress)
    })
    .await;
    assert_eq!((&progress["ok"], &progress["error"]), (&json!(2), &json!(1)), "{progress}");
    let export = client.get(format!("{}/v1/feeds/{feed_id}/results?format=ndjson", stack.sink)).send().await.unwrap();
    let rows: Vec<Value> =
        export.text().await.unwrap().lines().map(|l| serde_json::from_str(l).expect("an NDJSON row")).collect();
    let listed: Vec<(&str, String)> = rows.iter().map(|r| (r["url"].as_str().unwrap(), outcome(r))).collect();
    assert_eq!(
        listed,
        [
            ("az://survey-photos/2026/site-a/coffee.png", format!("top1 {ESPRESSO}")),
            ("az://survey-photos/2026/site-a/day%202/IMG_0243.JPG", "top1 243".into()),
            ("az://survey-photos/2026/site-b/broken.jpg", "error not_an_image".into()),
        ]
    );
    let size = std::fs::metadata(cache_dir().join("photos/coffee.png")).unwrap().len();
    assert_eq!(rows[0]["metadata"]["size"], size.to_string(), "{}", rows[0]);
    assert!(rows[0]["metadata"]["etag"].as_str().is_some_and(|e| !e.is_empty()), "{}", rows[0]);

    // Wrong credentials are found before the feed is opened.
    let (status, refused) =
        post_json(&client, &format!("{}/v1/feeds", stack.ingest), &json!({"source": "az://locked-photos/"})).await;
    assert_eq!((status, &refused["error"]["kind"]), (400, &json!("unreadable_feed")), "{refused}");
    let message = refused["error"]["message"].as_str().unwrap();
    assert!(message.contains("listing az://locked-photos/ failed") && message.contains("403"), "{message}");

    stack.stop().await;
    env.finish().await;
    let _ = std::fs::remove_file(stores_file);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_20000_key_prefix_is_listed_in_bounded_memory() {
    const KEYS: usize = 20_000;
    let s3 = S3Server::start(json!({"generated": [{"bucket": "many-keys", "prefix": "survey/", "count": KEYS}]})).await;
    let env = TestEnv::start().await;
    let settings = env.settings();
    let (key_id, secret) = (s3.access_key_id.clone(), s3.secret_access_key.clone());
    let store = [
        ("S3_BUCKETS", "many-keys"),
        ("AWS_ENDPOINT_URL", s3.endpoint.as_str()),
        ("AWS_ACCESS_KEY_ID", key_id.as_str()),
        ("AWS_SECRET_ACCESS_KEY", secret.as_str()),
        // No classifier takes the feed's images here: no window holds the feed back for them.
        ("FEED_WINDOW_IMAGES", "0"),
    ];
    let ingest =
        ServiceProcess::ingest_with_env(env!("CARGO_BIN_EXE_ingest-under-test"), &settings.ingest, "s3-ingest", &store);
    let ingest_url = format!("http://{}", ingest.address("ingest listening").await);
    let client = reqwest::Client::new();
    reefline_e2e::feeds::wait_for_ledger(&client, &ingest_url).await;

    let body = json!({"source": "s3://many-keys/survey/", "match": "*.jpg"}).to_string();
    let (status, feed, _) = post_feed(&client, &ingest_url, "application/json", None, body.into()).await.unwrap();
    assert_eq!(status, 201, "{feed}");
    assert_eq!(
        (&feed["lines_read"], &feed["accepted"], &feed["batches"]),
        (&json!(KEYS), &json!(KEYS), &json!(20)),
        "{feed}"
    );
    assert_eq!(topic_size(&env.broker.kafka(), &env.names.requests).await, KEYS as i64, "the requests topic");
    let peak = ingest.peak_rss();
    eprintln!("20,000-key prefix feed: ingest peak RSS {:.1} MiB", peak as f64 / 1048576.0);
    assert!(peak > 0 && peak < 100 * 1024 * 1024, "ingest's peak RSS was {peak} bytes");
    env.finish().await;
}
