//! Avro in the Confluent wire format through the local registry, with the same REST calls a real
//! registry answers.

use reefline_schemas::{ClassificationResult, Codec, ImageRequest, Prediction, RegistrySettings, Status};
use reefline_tools::registry::Registry;
use serde_json::{Value, json};

async fn serve(registry: Registry) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, registry.router()).await });
    format!("http://{addr}")
}

fn request() -> ImageRequest {
    ImageRequest {
        request_id: "r-1".into(),
        batch_id: "b-1".into(),
        batch_index: 0,
        batch_size: 1,
        url: "http://photos.example/shark.jpg".into(),
        submitted_at_ms: 1_763_700_000_000,
        source: "http".into(),
        model: None,
        ..Default::default()
    }
}

fn result() -> ClassificationResult {
    ClassificationResult {
        request_id: "r-1".into(),
        batch_id: "b-1".into(),
        batch_index: 0,
        batch_size: 1,
        url: "http://photos.example/shark.jpg".into(),
        status: Status::Ok,
        predictions: vec![Prediction {
            index: 2,
            wnid: "n01484850".into(),
            label: "great white shark".into(),
            scientific_name: Some("Carcharodon carcharias".into()),
            score: 0.93,
        }],
        marine_group: Some("shark".into()),
        model_name: "efficientnet-lite0".into(),
        model_version: "0.1.0".into(),
        submitted_at_ms: 1_763_700_000_000,
        completed_at_ms: 1_763_700_000_250,
        ..Default::default()
    }
}

#[tokio::test]
async fn records_round_trip_in_the_confluent_wire_format() {
    let url = serve(Registry::in_memory()).await;
    let codec = Codec::new(&RegistrySettings::new(&url)).unwrap();

    let bytes = codec.encode("requests", &request()).await.unwrap();
    assert_eq!(bytes[0], 0, "magic byte");
    assert_eq!(u32::from_be_bytes(bytes[1..5].try_into().unwrap()), 1, "first schema id");
    assert_eq!(codec.decode::<ImageRequest>(Some(&bytes)).await.unwrap(), request());

    let bytes = codec.encode("results", &result()).await.unwrap();
    assert_eq!(u32::from_be_bytes(bytes[1..5].try_into().unwrap()), 2);
    assert_eq!(codec.decode::<ClassificationResult>(Some(&bytes)).await.unwrap(), result());

    let mut failed = result();
    failed.status = Status::Error;
    failed.predictions.clear();
    failed.marine_group = None;
    failed.error_kind = Some("not_found".into());
    failed.error_message = Some("the server answered 404 Not Found".into());
    let bytes = codec.encode("results", &failed).await.unwrap();
    assert_eq!(codec.decode::<ClassificationResult>(Some(&bytes)).await.unwrap(), failed);

    let subjects: Value = reqwest::get(format!("{url}/subjects")).await.unwrap().json().await.unwrap();
    assert_eq!(subjects, json!(["requests-value", "results-value"]));
}

#[tokio::test]
async fn bad_bytes_and_unknown_ids_are_told_apart() {
    let url = serve(Registry::in_memory()).await;
    let codec = Codec::new(&RegistrySettings::new(&url)).unwrap();
    let err = codec.decode::<ImageRequest>(Some(b"plain text")).await.unwrap_err();
    assert_eq!(err.kind(), "undecodable", "{err}");
    let err = codec.decode::<ImageRequest>(Some(&[0, 0, 0, 0, 42, 2, 65])).await.unwrap_err();
    assert_eq!(err.kind(), "schema_registry", "{err}");
    assert!(!err.is_transient());
    // A record of another type does not pass for a request.
    let bytes = codec.encode("results", &result()).await.unwrap();
    let err = codec.decode::<ImageRequest>(Some(&bytes)).await.unwrap_err();
    assert_eq!(err.kind(), "schema_mismatch", "{err}");
    // Once the id exists, the earlier 404 is not remembered.
    let ok = codec.encode("requests", &request()).await.unwrap();
    assert_eq!(codec.decode::<ImageRequest>(Some(&ok)).await.unwrap(), request());
}

#[tokio::test]
async fn an_unreachable_registry_is_transient() {
    let codec = Codec::new(&RegistrySettings::new("http://127.0.0.1:9")).unwrap();
    let err = codec.decode::<ImageRequest>(Some(&[0, 0, 0, 0, 1, 2, 65])).await.unwrap_err();
    assert!(err.is_transient(), "{err}");
}

async fn register(url: &str, subject: &str, schema: &Value) -> (u16, Value) {
    let response = reqwest::Client::new()
        .post(format!("{url}/subjects/{subject}/versions"))
        .json(&json!({"schema": schema.to_string()}))
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

#[tokio::test]
async fn backward_compatibility_is_enforced_and_ids_survive_a_restart() {
    let dir = std::env::temp_dir().join(format!("reefline-registry-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("registry.json");
    let _ = std::fs::remove_file(&file);
    let url = serve(Registry::open(file.clone()).unwrap()).await;

    let v1 = json!({"type": "record", "name": "T", "fields": [{"name": "a", "type": "string"}]});
    assert_eq!(register(&url, "t-value", &v1).await, (200, json!({"id": 1})));
    assert_eq!(register(&url, "t-value", &v1).await, (200, json!({"id": 1})), "registering again is idempotent");

    // A new field without a default cannot read old data: refused with 409.
    let breaking = json!({"type": "record", "name": "T", "fields": [{"name": "a", "type": "string"}, {"name": "b", "type": "int"}]});
    let (status, body) = register(&url, "t-value", &breaking).await;
    assert_eq!((status, body["error_code"].as_u64()), (409, Some(409)), "{body}");

    // With a default it can.
    let compatible = json!({"type": "record", "name": "T", "fields": [{"name": "a", "type": "string"}, {"name": "b", "type": "int", "default": 0}]});
    assert_eq!(register(&url, "t-value", &compatible).await, (200, json!({"id": 2})));
    let versions: Value = reqwest::get(format!("{url}/subjects/t-value/versions")).await.unwrap().json().await.unwrap();
    assert_eq!(versions, json!([1, 2]));
    let latest: Value =
        reqwest::get(format!("{url}/subjects/t-value/versions/latest")).await.unwrap().json().await.unwrap();
    assert_eq!((latest["version"].as_u64(), latest["id"].as_u64()), (Some(2), Some(2)));

    // A restarted registry keeps its ids.
    let url = serve(Registry::open(file).unwrap()).await;
    let by_id: Value = reqwest::get(format!("{url}/schemas/ids/2")).await.unwrap().json().await.unwrap();
    assert!(by_id["schema"].as_str().unwrap().contains("\"b\""));
    let missing = reqwest::get(format!("{url}/schemas/ids/3")).await.unwrap();
    assert_eq!(missing.status(), 404);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `T`'s schema as it was before the fields named `added` (all optional) came.
fn schema_without<T: reefline_schemas::Message>(added: &[&str]) -> Value {
    let mut schema: Value = serde_json::from_str(T::SCHEMA).unwrap();
    schema["fields"].as_array_mut().unwrap().retain(|f| !added.contains(&f["name"].as_str().unwrap()));
    schema
}

/// `item` written with `schema` (which lacks `added`), framed with registry id `id`.
fn written_with<T: serde::Serialize>(schema: &Value, id: u32, item: &T, added: &[&str]) -> Vec<u8> {
    let schema = apache_avro::Schema::parse(schema).unwrap();
    let apache_avro::types::Value::Record(fields) = apache_avro::to_value(item).unwrap() else { panic!("a record") };
    let old =
        apache_avro::types::Value::Record(fields.into_iter().filter(|(n, _)| !added.contains(&n.as_str())).collect());
    let mut framed = vec![0];
    framed.extend(id.to_be_bytes());
    let writer = apache_avro::writer::datum::GenericDatumWriter::builder(&schema).build().unwrap();
    framed.extend(writer.write_value_to_vec(old).unwrap());
    framed
}

#[tokio::test]
async fn records_written_before_feeds_still_decode_and_the_new_versions_are_backward_compatible() {
    let url = serve(Registry::in_memory()).await;
    let codec = Codec::new(&RegistrySettings::new(&url)).unwrap();
    let feed_fields = ["feed_id", "line", "metadata", "tenant"];
    let result_fields = ["feed_id", "line", "metadata", "sha256", "cached", "exif", "tenant"];

    // The versions before feeds are registered, and records written with them.
    let old_request = schema_without::<ImageRequest>(&feed_fields);
    let old_result = schema_without::<ClassificationResult>(&result_fields);
    assert_eq!(register(&url, "requests-value", &old_request).await, (200, json!({"id": 1})));
    assert_eq!(register(&url, "results-value", &old_result).await, (200, json!({"id": 2})));
    let request_bytes = written_with(&old_request, 1, &request(), &feed_fields);
    let result_bytes = written_with(&old_result, 2, &result(), &result_fields);

    // Today's types read them, the new fields at their defaults.
    assert_eq!(codec.decode::<ImageRequest>(Some(&request_bytes)).await.unwrap(), request());
    let decoded = codec.decode::<ClassificationResult>(Some(&result_bytes)).await.unwrap();
    assert_eq!((decoded.sha256, decoded.cached, decoded.exif, decoded.metadata), (None, false, None, None));

    // Today's versions register over them: the registry checks they can read the old records.
    let mut fed = request();
    fed.feed_id = Some("0191b3c4-7d2e-7c1a-9f3b-2a6c0e4d5b21".into());
    fed.line = Some(17);
    fed.metadata = Some([("station".to_owned(), "Reef 4".to_owned())].into());
    let bytes = codec.encode("requests", &fed).await.unwrap();
    assert_eq!(codec.decode::<ImageRequest>(Some(&bytes)).await.unwrap(), fed);
    codec.encode("results", &result()).await.unwrap();
    for subject in ["requests-value", "results-value"] {
        let versions: Value =
            reqwest::get(format!("{url}/subjects/{subject}/versions")).await.unwrap().json().await.unwrap();
        assert_eq!(versions, json!([1, 2]), "{subject}");
    }
}
