//! The local registry answers a change only once it is on disk, and a registry answer that is not
//! a definite "not found" never turns a good record into a dead letter.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use reefline_schemas::{Codec, ImageRequest, RegistrySettings};
use reefline_tools::registry::Registry;
use serde_json::{Value, json};

/// Starts `reefline-registry` on a port of its choosing, keeping its state in `file`; returns the
/// process and its base URL, read from its start-up line.
fn start(file: &std::path::Path) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_reefline-registry"))
        .args(["--listen", "127.0.0.1:0", "--file"])
        .arg(file)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .spawn()
        .expect("starting reefline-registry");
    let stdout = BufReader::new(child.stdout.take().expect("stdout"));
    for line in stdout.lines() {
        let line = line.expect("reading the registry's output");
        if let Some(addr) = line.split_whitespace().find_map(|word| word.strip_prefix("addr=")) {
            return (child, format!("http://{addr}"));
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("reefline-registry exited without saying where it listens");
}

fn schema(name: &str) -> Value {
    json!({ "schema": json!({"type": "record", "name": name, "fields": [{"name": "a", "type": "string"}]}).to_string() })
}

#[tokio::test]
async fn a_registration_is_answered_only_once_it_would_survive_a_kill() {
    let folder = std::env::temp_dir().join(format!("reefline-registry-{}", std::process::id()));
    std::fs::create_dir_all(&folder).unwrap();
    let file = folder.join("registry.json");
    let _ = std::fs::remove_file(&file);
    let (mut registry, url) = start(&file);
    let client = reqwest::Client::new();

    // The registry cannot save (its temporary file's name is taken by a folder): the registration
    // fails, and the registry does not act as if it had happened.
    std::fs::create_dir_all(file.with_extension("tmp")).unwrap();
    let response = client.post(format!("{url}/subjects/a-value/versions")).json(&schema("A")).send().await.unwrap();
    assert_eq!(response.status(), 500);
    let subjects: Vec<String> = client.get(format!("{url}/subjects")).send().await.unwrap().json().await.unwrap();
    assert!(subjects.is_empty(), "a registration that was not saved is not served: {subjects:?}");

    std::fs::remove_dir(file.with_extension("tmp")).unwrap();
    let response = client.post(format!("{url}/subjects/b-value/versions")).json(&schema("B")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let id = response.json::<Value>().await.unwrap()["id"].as_u64().unwrap();
    assert_eq!(id, 1, "the failed registration took no id");

    registry.kill().unwrap(); // SIGKILL: no chance to flush anything
    registry.wait().unwrap();
    let (mut registry, url) = start(&file);
    let found: Value =
        client.get(format!("{url}/subjects/b-value/versions/1")).send().await.unwrap().json().await.unwrap();
    assert_eq!(found["id"], 1);
    assert!(found["schema"].as_str().unwrap().contains("\"B\""), "{found}");
    registry.kill().unwrap();
    registry.wait().unwrap();
    std::fs::remove_dir_all(&folder).unwrap();
}

fn request() -> ImageRequest {
    ImageRequest {
        request_id: "0191b3c4-7d2e-7c1a-9f3b-2a6c0e4d5b1f".into(),
        batch_id: "0191b3c4-7d2e-7c1a-9f3b-2a6c0e4d5b20".into(),
        batch_index: 0,
        batch_size: 1,
        url: "http://photos.example/shark.jpg".into(),
        submitted_at_ms: 1_763_700_000_000,
        source: "kafka".into(),
        model: None,
        ..Default::default()
    }
}

#[tokio::test]
async fn a_registry_that_answers_500_504_or_429_is_waited_for_not_blamed_on_the_record() {
    use axum::http::StatusCode;
    use std::sync::{Arc, Mutex};

    let registry = Registry::in_memory().router();
    // The first three lookups meet a sick registry, as behind a load balancer during a deploy.
    let failures = Arc::new(Mutex::new(vec![
        StatusCode::TOO_MANY_REQUESTS,
        StatusCode::GATEWAY_TIMEOUT,
        StatusCode::INTERNAL_SERVER_ERROR,
    ]));
    let seen = failures.clone();
    let front =
        registry.layer(axum::middleware::from_fn(move |req: axum::extract::Request, next: axum::middleware::Next| {
            let failures = failures.clone();
            async move {
                let failure =
                    if req.method() == axum::http::Method::GET { failures.lock().unwrap().pop() } else { None };
                match failure {
                    Some(status) => axum::response::IntoResponse::into_response((status, "{\"error_code\":50001}")),
                    None => next.run(req).await,
                }
            }
        }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, front).await });

    let bytes = Codec::new(&RegistrySettings::new(&url)).unwrap().encode("requests", &request()).await.unwrap();
    // A reader that has not seen the schema yet (an empty cache) must look it up.
    let reader = Codec::new(&RegistrySettings::new(&url)).unwrap();
    let first = reader.decode::<ImageRequest>(Some(&bytes)).await.unwrap_err();
    assert!(first.is_transient(), "{first}");
    let waited = reefline_common::retry_transient("registry", reefline_schemas::CodecError::is_transient, || {
        reader.decode::<ImageRequest>(Some(&bytes))
    });
    assert_eq!(waited.await.unwrap(), request());
    assert!(seen.lock().unwrap().is_empty(), "every failure was met");

    // An id the registry does not have is the record's fault: not waited for.
    let mut unknown = bytes.clone();
    unknown[1..5].copy_from_slice(&77u32.to_be_bytes());
    let e = reefline_common::retry_transient("registry", reefline_schemas::CodecError::is_transient, || {
        reader.decode::<ImageRequest>(Some(&unknown))
    })
    .await
    .unwrap_err();
    assert_eq!(e.kind(), "schema_registry");
}
