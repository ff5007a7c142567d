//! One submission of real photos through real Kafka, the real model and Postgres.

use std::time::Duration;

use reefline_e2e::{
    Broker, Names, Stack, StackSettings, TestDatabase, TestEnv, classify_coffee, foolbox_photos, get_json, post_json,
    start_registry, wait_for,
};
use serde_json::{Value, json};

const CAT_CLASSES: std::ops::RangeInclusive<i64> = 281..=285; // tabby, tiger cat, Persian, Siamese, Egyptian cat
const ESPRESSO: i64 = 967;

fn top_indices(result: &Value) -> Vec<i64> {
    result["predictions"].as_array().expect("predictions").iter().map(|p| p["index"].as_i64().unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn real_photos_are_classified_end_to_end() {
    let env = TestEnv::start().await;
    let mut settings = env.settings();
    // Each model's batch size as measured at start (the default), on its two engines.
    settings.classifier.max_batch_size = 0;
    let stack = Stack::start(settings).await;
    let photos_url = env.photos.clone();
    let client = reqwest::Client::new();

    let foolbox = foolbox_photos();
    assert_eq!(foolbox.len(), 20, "foolbox ships 20 labelled ImageNet photos");
    let mut urls: Vec<String> = foolbox.iter().map(|(name, _)| format!("{photos_url}/photos/{name}")).collect();
    urls.push(format!("{photos_url}/photos/chelsea.png"));
    urls.push(format!("{photos_url}/photos/coffee.png"));
    urls.push(format!("{photos_url}/photos/missing.jpg"));
    urls.push(format!("{photos_url}/page.jpg"));
    // Server-side request forgery attempts: the metadata address, directly, by redirect, and as
    // an IPv4-mapped IPv6 literal of a private address.
    urls.push("http://169.254.169.254/latest/meta-data/".into());
    urls.push(format!("{photos_url}/to-metadata.jpg"));
    urls.push("http://[::ffff:a00:1]/x.jpg".into()); // ::ffff:10.0.0.1, as URLs normalise it
    // Transient failures are retried: a 503 once, then the photo; and a 503 for ever.
    urls.push(format!("{photos_url}/flaky/coffee.png"));
    urls.push(format!("{photos_url}/always-503.jpg"));

    let (status, accepted) =
        post_json(&client, &format!("{}/v1/classify", stack.ingest), &json!({ "images": urls })).await;
    assert_eq!(status, 202, "{accepted}");
    let batch_id = accepted["batch_id"].as_str().expect("batch_id").to_owned();
    let request_ids: Vec<String> = accepted["request_ids"]
        .as_array()
        .expect("request_ids")
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(request_ids.len(), urls.len());

    let batch_url = format!("{}/v1/batches/{batch_id}", stack.sink);
    let batch = wait_for("all 29 results", Duration::from_secs(180), || {
        let (client, batch_url) = (client.clone(), batch_url.clone());
        async move {
            let (status, body) = get_json(&client, &batch_url).await;
            (status == 200 && body["done"] == json!(true)).then_some(body)
        }
    })
    .await;
    assert_eq!(
        (batch["total"].as_i64(), batch["completed"].as_i64(), batch["pending"].as_i64()),
        (Some(29), Some(29), Some(0))
    );
    assert_eq!((batch["ok"].as_i64(), batch["error"].as_i64()), (Some(23), Some(6)));

    // Exactly one row per request, and no others.
    let pool = env.db.pool().await;
    let rows: Vec<(String, i64)> =
        sqlx::query_as("SELECT request_id, count(*) OVER (PARTITION BY request_id) FROM results")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(rows.len(), 29);
    assert!(rows.iter().all(|(_, n)| *n == 1));
    let stored: std::collections::HashSet<&str> = rows.iter().map(|(id, _)| id.as_str()).collect();
    assert!(request_ids.iter().all(|id| stored.contains(id.as_str())));

    // Results come back in submission order, each under the id it was given.
    let results = batch["results"].as_array().unwrap();
    for (i, r) in results.iter().enumerate() {
        assert_eq!(r["request_id"].as_str(), Some(request_ids[i].as_str()));
        assert_eq!(r["url"].as_str(), Some(urls[i].as_str()));
    }

    let mut top1 = 0;
    let mut top5 = 0;
    for ((name, class), r) in foolbox.iter().zip(results) {
        assert_eq!(r["status"], "ok", "{name}: {r}");
        assert_eq!(r["predictions"].as_array().unwrap().len(), 5);
        assert_eq!(r["model"]["name"], "efficientnet-lite0");
        let top = top_indices(r);
        top1 += usize::from(top[0] == *class as i64);
        top5 += usize::from(top.contains(&(*class as i64)));
    }
    eprintln!("foolbox accuracy end to end: top-1 {top1}/20, top-5 {top5}/20");
    assert!(top1 >= 17, "top-1 matched {top1} of 20 foolbox labels");
    assert!(top5 >= 19, "top-5 matched {top5} of 20 foolbox labels");

    let chelsea = &results[20];
    assert!(CAT_CLASSES.contains(&top_indices(chelsea)[0]), "chelsea: {chelsea}");
    assert_eq!(chelsea["marine"], false);
    let coffee = &results[21];
    assert_eq!(top_indices(coffee)[0], ESPRESSO, "coffee: {coffee}");
    assert_eq!(coffee["predictions"][0]["label"], "espresso");
    let scores: Vec<f64> =
        coffee["predictions"].as_array().unwrap().iter().map(|p| p["score"].as_f64().unwrap()).collect();
    assert!(scores.windows(2).all(|w| w[0] >= w[1]) && scores.iter().sum::<f64>() <= 1.0 + 1e-6);

    let missing = &results[22];
    assert_eq!((missing["status"].as_str(), missing["error"]["kind"].as_str()), (Some("error"), Some("not_found")));
    let page = &results[23];
    assert_eq!((page["status"].as_str(), page["error"]["kind"].as_str()), (Some("error"), Some("not_an_image")));
    assert!(page["predictions"].as_array().unwrap().is_empty());
    assert_eq!(top_indices(&results[27])[0], ESPRESSO, "retried after a 503: {}", results[27]);
    assert_eq!(results[28]["error"]["kind"], "http_status", "{}", results[28]);
    assert!(results[28]["error"]["message"].as_str().unwrap().contains("503"));
    for ssrf in &results[24..27] {
        assert_eq!(
            (ssrf["status"].as_str(), ssrf["error"]["kind"].as_str()),
            (Some("error"), Some("blocked_address")),
            "{ssrf}"
        );
    }

    // A single result is looked up by its id; an unknown id is 404 with a JSON error.
    let (status, one) = get_json(&client, &format!("{}/v1/results/{}", stack.sink, request_ids[21])).await;
    assert_eq!((status, one["predictions"][0]["index"].as_i64()), (200, Some(ESPRESSO)));
    let (status, unknown) = get_json(&client, &format!("{}/v1/results/no-such-request", stack.sink)).await;
    assert_eq!((status, unknown["error"]["kind"].as_str()), (404, Some("not_found")));

    // None of these photos shows a marine animal (the marine table itself is unit-tested).
    for r in &results[..22] {
        assert_eq!((&r["marine"], &r["marine_group"]), (&json!(false), &Value::Null), "{r}");
    }

    // The seed-compatible routes, which answer inline, are tested in answers.rs.

    // Every service exposes Prometheus metrics.
    let text = client.get(format!("{}/metrics", stack.classifier_ops)).send().await.unwrap().text().await.unwrap();
    let retries = reefline_e2e::metric(&text, "classifier_fetch_retries_total{kind=\"http_status\"}");
    assert_eq!(retries, Some(4.0), "one retry for the flaky photo, three for the lasting 503");
    let lite0 = "{model=\"efficientnet-lite0\"}";
    assert_eq!(reefline_e2e::metric(&text, &format!("classifier_engines{lite0}")), Some(2.0));
    let measured = reefline_e2e::metric(&text, &format!("classifier_batch_size_limit{lite0}")).unwrap();
    assert!([1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0].contains(&measured), "one of the sizes measured: {measured}");
    for (base, metric) in [
        (&stack.ingest, "ingest_images_total"),
        (&stack.sink, "sink_rows_written_total"),
        (&stack.classifier_ops, "classifier_batch_size"),
    ] {
        let text = client.get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap();
        assert!(text.contains(metric), "{base}/metrics lacks {metric}");
        assert_eq!(client.get(format!("{base}/readyz")).send().await.unwrap().status(), 200);
    }

    // Lag per topic and partition, from librdkafka's statistics: once everything is done and
    // committed, each of the 3 partitions of each topic read shows 0.
    let names = &env.names;
    for (base, metric, topic) in [
        (&stack.classifier_ops, "classifier_consumer_lag", &names.requests),
        (&stack.sink, "sink_consumer_lag", &names.results),
        (&stack.sink, "sink_consumer_lag", &names.requests),
    ] {
        let what = format!("{metric} for {topic} to reach 0 on 3 partitions");
        wait_for(&what, Duration::from_secs(60), || {
            let (client, url) = (client.clone(), format!("{base}/metrics"));
            let prefix = format!("{metric}{{");
            let topic = format!("topic=\"{topic}\"");
            async move {
                let text = client.get(url).send().await.ok()?.text().await.ok()?;
                let lags: Vec<f64> = text
                    .lines()
                    .filter(|l| l.starts_with(&prefix) && l.contains(&topic))
                    .filter_map(|l| l.rsplit_once(' ')?.1.parse().ok())
                    .collect();
                (lags.len() == 3 && lags.iter().all(|lag| *lag == 0.0)).then_some(())
            }
        })
        .await;
    }

    stack.stop().await;
    drop(pool);
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_classifier_is_ready_only_while_the_broker_and_the_registry_answer() {
    let env = TestEnv::start().await;
    let proxy = reefline_e2e::TcpProxy::start(env.registry.url.trim_start_matches("http://")).await;
    let mut settings = env.settings();
    settings.classifier.registry = reefline_schemas::RegistrySettings::new(format!("http://{}", proxy.addr));
    let stack = Stack::start(settings).await;
    let client = reqwest::Client::new();
    let ready = format!("{}/readyz", stack.classifier_ops);
    let timeout = Duration::from_secs(30);
    reefline_e2e::wait_for_status(&client, &ready, 200, "the classifier to be ready", timeout).await;
    proxy.cut();
    reefline_e2e::wait_for_status(&client, &ready, 503, "not ready without the registry", timeout).await;
    proxy.restore();
    reefline_e2e::wait_for_status(&client, &ready, 200, "ready again with the registry", timeout).await;
    stack.stop().await;
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_submissions_get_a_400_naming_the_problem() {
    let broker = Broker::start().await;
    let registry = start_registry().await;
    let names = Names::new();
    let mut settings = StackSettings::new(broker.kafka(), registry.clone(), "", &names);
    settings.ingest.max_images = 3;
    let ingest = reefline_ingest::Application::build(settings.ingest).await.unwrap();
    let base = format!("http://{}", ingest.local_addr());
    tokio::spawn(ingest.run_until(std::future::pending()));
    let client = reqwest::Client::new();

    let cases = [
        ("/v1/classify", json!({"images": "http://a.example/x.jpg"}), "invalid_field", "images"),
        ("/v1/classify", json!({"images": []}), "empty_images", "images"),
        ("/v1/classify", json!({"pictures": ["http://a.example/x.jpg"]}), "invalid_field", "."),
        ("/v1/classify", json!({}), "missing_field", "images"),
        (
            "/v1/classify",
            json!({"images": ["http://a.example/1.jpg", "ftp://a.example/2.jpg"]}),
            "invalid_url",
            "images[1]",
        ),
        (
            "/v1/classify",
            json!({"images": ["http://a/1", "http://a/2", "http://a/3", "http://a/4"]}),
            "too_many_images",
            "images",
        ),
        ("/api/infer", json!({"images": [42]}), "invalid_field", "images[0]"),
        ("/classify", json!({"image_url": "not a url"}), "invalid_url", "image_url"),
        ("/classify", json!({}), "missing_field", "image_url"),
    ];
    for (route, body, kind, field) in cases {
        let (status, error) = post_json(&client, &format!("{base}{route}"), &body).await;
        assert_eq!(status, 400, "{route} {body}: {error}");
        assert_eq!(error["error"]["kind"], kind, "{route} {body}: {error}");
        if field != "." {
            assert_eq!(error["error"]["field"], field, "{route} {body}: {error}");
            assert!(error["error"]["message"].as_str().unwrap().contains(field), "{error}");
        }
    }
    let response = client
        .post(format!("{base}/v1/classify"))
        .header("content-type", "application/json")
        .body("{\"images\": [")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["kind"], "invalid_json");
    let response = client.post(format!("{base}/v1/classify")).body("images=x").send().await.unwrap();
    assert_eq!(response.status(), 415);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_guard_the_api_but_not_the_ops_endpoints() {
    let broker = Broker::start().await;
    let registry = start_registry().await;
    let db = TestDatabase::new();
    let names = Names::new();
    let mut settings = StackSettings::new(broker.kafka(), registry, &db.url, &names);
    settings.ingest.auth.api_keys = vec!["ingest-key".into()];
    settings.sink.auth.api_keys = vec!["lookup-key".into()];
    let ingest = reefline_ingest::Application::build(settings.ingest).await.unwrap();
    let sink = reefline_sink::Application::build(settings.sink).await.unwrap();
    let (ingest_url, sink_url) = (format!("http://{}", ingest.local_addr()), format!("http://{}", sink.local_addr()));
    tokio::spawn(ingest.run_until(std::future::pending()));
    tokio::spawn(sink.run_until(std::future::pending()));
    let client = reqwest::Client::new();
    let body = json!({"images": ["http://photos.example/a.jpg"]});

    let response = client.post(format!("{ingest_url}/v1/classify")).json(&body).send().await.unwrap();
    assert_eq!(response.status(), 401);
    assert_eq!(response.headers()["www-authenticate"], "Bearer");
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["kind"], "unauthorized");
    let wrong =
        client.post(format!("{ingest_url}/classify")).bearer_auth("lookup-key").json(&body).send().await.unwrap();
    assert_eq!(wrong.status(), 401, "a sink key does not open ingest");
    let ok =
        client.post(format!("{ingest_url}/v1/classify")).bearer_auth("ingest-key").json(&body).send().await.unwrap();
    assert_eq!(ok.status(), 202);
    let ok = client
        .post(format!("{ingest_url}/api/infer"))
        .header("x-api-key", "ingest-key")
        .json(&json!({"images": ["http://photos.example/a.jpg"], "wait": 0}))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 202);

    assert_eq!(client.get(format!("{sink_url}/v1/results/x")).send().await.unwrap().status(), 401);
    let lookup = client.get(format!("{sink_url}/v1/results/x")).header("x-api-key", "lookup-key").send().await.unwrap();
    assert_eq!(lookup.status(), 404, "authorised, and unknown");

    for base in [&ingest_url, &sink_url] {
        for open in ["/healthz", "/readyz", "/metrics"] {
            assert_eq!(client.get(format!("{base}{open}")).send().await.unwrap().status(), 200, "{base}{open}");
        }
    }
    db.drop_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_submission_is_pending_until_its_results_arrive() {
    let env = TestEnv::start().await;
    let mut settings = env.settings();
    let classifier = settings.classifier.clone();
    // The sink reads its requests from elsewhere, as if far behind: the ids ingest answers with
    // must be known from the moment they are handed out all the same.
    settings.sink.topics.requests = format!("{}-unread", settings.sink.topics.requests);
    let stack = Stack::start_without_classifier(settings).await;
    let client = reqwest::Client::new();
    reefline_e2e::feeds::wait_for_ledger(&client, &stack.ingest).await;
    let urls = [format!("{}/photos/coffee.png", env.photos), format!("{}/photos/missing.jpg", env.photos)];
    let (status, accepted) =
        post_json(&client, &format!("{}/v1/classify", stack.ingest), &json!({ "images": urls })).await;
    assert_eq!(status, 202);
    let batch_url = format!("{}/v1/batches/{}", stack.sink, accepted["batch_id"].as_str().unwrap());
    let coffee_url = format!("{}/v1/results/{}", stack.sink, accepted["request_ids"][0].as_str().unwrap());

    // No classifier runs yet: the batch is known at once, with nothing done.
    let (status, batch) = get_json(&client, &batch_url).await;
    assert_eq!(status, 200, "{batch}");
    assert_eq!(
        (&batch["total"], &batch["completed"], &batch["pending"], &batch["done"], &batch["results"]),
        (&json!(2), &json!(0), &json!(2), &json!(false), &json!([]))
    );
    let (status, pending) = get_json(&client, &coffee_url).await;
    assert_eq!(status, 202, "{pending}");
    assert_eq!(
        (&pending["status"], &pending["batch_index"], &pending["url"]),
        (&json!("pending"), &json!(0), &json!(urls[0]))
    );

    // A classifier starts; the batch completes.
    let worker =
        reefline_e2e::ServiceProcess::classifier(env!("CARGO_BIN_EXE_classifier-under-test"), &classifier, "pending");
    let batch = wait_for("the batch to be done", Duration::from_secs(120), || {
        let (client, url) = (client.clone(), batch_url.clone());
        async move { reefline_e2e::get_json_ok(&client, &url).await.filter(|b| b["done"] == true) }
    })
    .await;
    assert_eq!((&batch["completed"], &batch["ok"], &batch["error"]), (&json!(2), &json!(1), &json!(1)));
    let (status, done) = get_json(&client, &coffee_url).await;
    assert_eq!((status, &done["predictions"][0]["index"]), (200, &json!(ESPRESSO)));

    drop(worker);
    stack.stop().await;
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_configured_secret_reaches_a_log_line_or_help() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    let broker = Broker::start().await;
    let registry = start_registry().await;
    let db = TestDatabase::new();
    // Postgres here trusts local connections, so the password is carried but not needed.
    let database_url = db.url.replacen("postgres://postgres@", "postgres://postgres:Db-p%40ss-5ecret@", 1);
    assert_ne!(database_url, db.url);
    let secrets =
        ["Db-p%40ss-5ecret", "Db-p@ss-5ecret", "Kafka-5ecret", "Registry-5ecret", "Api-5ecret", "Hook-5ecret"];
    let manifest = reefline_e2e::model_settings().manifest;
    let env = [
        ("MODELS_MANIFEST", manifest.to_str().unwrap()),
        ("DATABASE_URL", database_url.as_str()),
        ("KAFKA_BROKERS", &broker.kafka().brokers),
        ("KAFKA_PROPERTIES", "client.id=reefline-sink,sasl.password=Kafka-5ecret"),
        ("SCHEMA_REGISTRY_URL", &registry.url),
        ("SCHEMA_REGISTRY_USER", "reef"),
        ("SCHEMA_REGISTRY_PASSWORD", "Registry-5ecret"),
        ("API_KEYS", "Api-5ecret"),
        ("CALLBACK_SECRET", "Hook-5ecret"),
        ("SINK_LISTEN", "127.0.0.1:0"),
        ("RUST_LOG", "debug"),
    ];
    let check = |what: &str, text: &str| {
        for secret in secrets {
            assert!(!text.contains(secret), "{what} shows `{secret}`:\n{text}");
        }
    };

    let help = Command::new(env!("CARGO_BIN_EXE_sink-under-test")).arg("--help").envs(env).output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout).into_owned();
    assert!(help.contains("KAFKA_PROPERTIES"), "{help}");
    check("--help", &help);

    // The sink logs its settings at start-up, at debug everything the libraries say as well.
    let mut sink = Command::new(env!("CARGO_BIN_EXE_sink-under-test"))
        .envs(env)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut log = String::new();
    let mut lines = BufReader::new(sink.stdout.take().unwrap()).lines();
    for line in lines.by_ref() {
        let line = line.unwrap();
        log.push_str(&line);
        log.push('\n');
        if line.contains("sink listening") {
            break;
        }
    }
    assert!(log.contains("sasl.password=<redacted>"), "the property is named, its value not:\n{log}");
    assert!(log.contains("postgres://postgres:***@"), "{log}");
    let _ = Command::new("kill").args(["-TERM", &sink.id().to_string()]).status();
    for line in lines {
        log.push_str(&line.unwrap());
        log.push('\n');
    }
    let output = sink.wait_with_output().unwrap();
    log.push_str(&String::from_utf8_lossy(&output.stderr));
    assert!(log.contains("sink stopped"), "{log}");
    check("the sink's log", &log);
    db.drop_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_pipeline_runs_over_tls_to_the_broker() {
    use rdkafka::producer::{BaseProducer, Producer};
    use reefline_common::kafka::Property;

    // A broker reached only through TLS, as a managed Kafka is: it tells clients to connect to the
    // TLS proxy in front of it.
    let proxy = reefline_e2e::TlsProxy::start().await;
    let broker = Broker::start_advertising(Some(&proxy.addr.to_string())).await;
    proxy.point_at(&broker.addr);
    let env = TestEnv {
        broker,
        registry: start_registry().await,
        photos: reefline_e2e::start_photo_server().await,
        db: TestDatabase::new(),
        names: Names::new(),
    };
    let mut tls = env.broker.kafka();
    tls.brokers = proxy.addr.to_string();
    tls.properties = vec![
        Property::new("security.protocol", "SSL"),
        Property::new("ssl.ca.location", proxy.ca.display().to_string()),
    ];

    // Without TLS the proxy's listener gets nowhere.
    let mut plain = env.broker.kafka();
    plain.brokers = proxy.addr.to_string();
    let plain: BaseProducer = plain.client_config().create().unwrap();
    assert!(plain.client().fetch_metadata(None, Duration::from_secs(3)).is_err(), "a plaintext client got metadata");

    let mut settings = env.settings();
    settings.ingest.kafka = tls.clone();
    settings.classifier.kafka = tls.clone();
    settings.sink.kafka = tls;
    let stack = Stack::start(settings).await;
    let client = reqwest::Client::new();
    let result = classify_coffee(&client, &stack, &env.photos).await;
    assert_eq!(top_indices(&result)[0], ESPRESSO, "{result}");
    stack.stop().await;
    env.finish().await;
}

/// Prometheus, killed when dropped.
struct Prometheus(std::process::Child);

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_real_prometheus_scrapes_every_service_loads_the_rules_and_sees_the_lag() {
    let env = TestEnv::start().await;
    let stack = Stack::start(env.settings()).await;
    let client = reqwest::Client::new();
    classify_coffee(&client, &stack, &env.photos).await;

    let folder = std::env::temp_dir().join(format!("reefline-prometheus-{}", uuid::Uuid::now_v7().simple()));
    std::fs::create_dir_all(&folder).unwrap();
    let rules = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../ops/prometheus/rules.yml");
    let target = |base: &str| base.trim_start_matches("http://").to_owned();
    let config = json!({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [rules.canonicalize().unwrap()],
        "scrape_configs": [
            {"job_name": "reefline-ingest", "static_configs": [{"targets": [target(&stack.ingest)]}]},
            {"job_name": "reefline-classifier", "static_configs": [{"targets": [target(&stack.classifier_ops)]}]},
            {"job_name": "reefline-sink", "static_configs": [{"targets": [target(&stack.sink)]}]},
        ],
    });
    // JSON is YAML.
    std::fs::write(folder.join("prometheus.yml"), config.to_string()).unwrap();
    let addr = format!("127.0.0.1:{}", reefline_e2e::free_port());
    let log = std::fs::File::create(folder.join("prometheus.log")).unwrap();
    let _prometheus = Prometheus(
        std::process::Command::new("prometheus")
            .arg(format!("--config.file={}", folder.join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", folder.join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting Debian's prometheus (make setup installs it)"),
    );
    let api = |path: &str| format!("http://{addr}/api/v1/{path}");

    let targets = wait_for("Prometheus to scrape all three services", Duration::from_secs(60), || async {
        let body: Value = client.get(api("targets")).send().await.ok()?.json().await.ok()?;
        let active = body["data"]["activeTargets"].as_array()?.clone();
        (active.len() == 3 && active.iter().all(|t| t["health"] == "up")).then_some(active)
    })
    .await;
    let mut jobs: Vec<&str> = targets.iter().filter_map(|t| t["labels"]["job"].as_str()).collect();
    jobs.sort();
    assert_eq!(jobs, ["reefline-classifier", "reefline-ingest", "reefline-sink"]);

    let query = |q: &'static str| {
        let mut url = reqwest::Url::parse(&api("query")).unwrap();
        url.query_pairs_mut().append_pair("query", q);
        let client = client.clone();
        async move {
            let body: Value = client.get(url).send().await.ok()?.json().await.ok()?;
            body["data"]["result"].as_array().cloned()
        }
    };
    let lag = wait_for("the classifier's lag in Prometheus", Duration::from_secs(60), || async {
        query("classifier_consumer_lag").await.filter(|r| r.len() == 6)
    })
    .await;
    // Three partitions of each lane's topic.
    let mut topics: Vec<&str> = lag.iter().filter_map(|s| s["metric"]["topic"].as_str()).collect();
    topics.sort();
    let (bulk, interactive) = (env.names.requests.as_str(), env.names.interactive.as_str());
    assert_eq!(topics, [bulk, bulk, bulk, interactive, interactive, interactive], "{lag:?}");
    let ready = wait_for("every service ready in Prometheus", Duration::from_secs(30), || async {
        query("reefline_ready == 1").await.filter(|r| r.len() == 3)
    })
    .await;
    assert_eq!(ready.len(), 3);
    let rules: Value = client.get(api("rules")).send().await.unwrap().json().await.unwrap();
    let mut groups: Vec<&str> =
        rules["data"]["groups"].as_array().unwrap().iter().filter_map(|g| g["name"].as_str()).collect();
    groups.sort();
    assert_eq!(groups, ["reefline-alerts", "reefline-recording"]);
    let firing = query("ALERTS{alertstate=\"firing\"}").await.unwrap();
    assert!(firing.is_empty(), "nothing is wrong, yet: {firing:?}");

    // Every query of the Grafana dashboard runs against what the services export.
    let dashboard: Value = serde_json::from_str(include_str!("../../ops/grafana/dashboards/reefline.json")).unwrap();
    for panel in dashboard["panels"].as_array().unwrap() {
        let expr = panel["targets"][0]["expr"].as_str().unwrap();
        let mut url = reqwest::Url::parse(&api("query")).unwrap();
        url.query_pairs_mut().append_pair("query", expr);
        let body: Value = client.get(url).send().await.unwrap().json().await.unwrap();
        assert_eq!(body["status"], "success", "panel {}: {expr}: {body}", panel["title"]);
    }

    stack.stop().await;
    env.finish().await;
    let _ = std::fs::remove_dir_all(&folder);
}
