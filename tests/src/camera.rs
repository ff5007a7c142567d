//! What a camera system's newer producer writes: requests with a newer version of the request
//! schema (an added optional `camera` field), framed with a registry id the test chooses.

use reefline_schemas::{ImageRequest, Message};
use serde_json::{Value, json};

/// The request schema with an added optional `camera` field: a BACKWARD-compatible version 2.
pub fn schema_v2() -> Value {
    let mut v2: Value = serde_json::from_str(ImageRequest::SCHEMA).expect("the request schema is JSON");
    v2["fields"].as_array_mut().expect("fields").push(json!({
        "name": "camera", "type": ["null", "string"], "default": null
    }));
    v2
}

/// A one-image request as a camera system produces it straight to the requests topic (source
/// `kafka`, submitted now, the default model).
pub fn request(url: &str) -> ImageRequest {
    ImageRequest {
        request_id: uuid::Uuid::now_v7().to_string(),
        batch_id: uuid::Uuid::now_v7().to_string(),
        batch_index: 0,
        batch_size: 1,
        url: url.to_owned(),
        submitted_at_ms: chrono::Utc::now().timestamp_millis(),
        source: "kafka".into(),
        ..Default::default()
    }
}

/// Registers `schema` under `topic`'s value subject; returns the id the registry gave it.
pub async fn register(client: &reqwest::Client, registry: &str, topic: &str, schema: &Value) -> u32 {
    let registered: Value = client
        .post(format!("{registry}/subjects/{topic}-value/versions"))
        .json(&json!({ "schema": schema.to_string() }))
        .send()
        .await
        .expect("registering")
        .json()
        .await
        .expect("the registry's answer");
    registered["id"].as_u64().unwrap_or_else(|| panic!("no id in {registered}")) as u32
}

/// `request` written with [`schema_v2`] (its camera `reef-cam-7`), in the Confluent wire format
/// with schema id `id`.
pub fn framed(id: u32, request: &ImageRequest) -> Vec<u8> {
    use apache_avro::types::Value as Avro;
    let schema = apache_avro::Schema::parse(&schema_v2()).expect("schema v2 is valid Avro");
    let record = Avro::Record(vec![
        ("request_id".into(), request.request_id.clone().into()),
        ("batch_id".into(), request.batch_id.clone().into()),
        ("batch_index".into(), request.batch_index.into()),
        ("batch_size".into(), request.batch_size.into()),
        ("url".into(), request.url.clone().into()),
        ("submitted_at_ms".into(), request.submitted_at_ms.into()),
        ("source".into(), request.source.clone().into()),
        ("model".into(), Avro::Union(0, Box::new(Avro::Null))),
        ("callback_url".into(), Avro::Union(0, Box::new(Avro::Null))),
        ("feed_id".into(), Avro::Union(0, Box::new(Avro::Null))),
        ("line".into(), Avro::Union(0, Box::new(Avro::Null))),
        ("metadata".into(), Avro::Union(0, Box::new(Avro::Null))),
        ("tenant".into(), Avro::Union(0, Box::new(Avro::Null))),
        ("camera".into(), Avro::Union(1, Box::new("reef-cam-7".into()))),
    ]);
    let mut framed = vec![0u8];
    framed.extend_from_slice(&id.to_be_bytes());
    let writer = apache_avro::writer::datum::GenericDatumWriter::builder(&schema).build().expect("writer");
    framed.extend(writer.write_value_to_vec(record).expect("encoding"));
    framed
}
