//! Traces: one image followed across ingest, the classifier and the sink, each a process exporting
//! its spans over OTLP/HTTP (protobuf) to a collector, here the test's own, which decodes them as
//! an OpenTelemetry collector does. The trace context travels in the records' Kafka headers, from
//! the caller's own `traceparent` on.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use reefline_e2e::{ServiceProcess, TestEnv, get_json_ok, serve, wait_for};
use serde_json::json;

/// Spans received, each with the `service.name` of the process that sent it.
type Received = Arc<Mutex<Vec<(String, Span)>>>;

fn collector(received: Received) -> axum::Router {
    axum::Router::new()
        .route(
            "/v1/traces",
            axum::routing::post(|State(received): State<Received>, body: Bytes| async move {
                let request = ExportTraceServiceRequest::decode(body).expect("an OTLP export request");
                let mut received = received.lock().unwrap();
                for resource_spans in request.resource_spans {
                    let attributes = resource_spans.resource.map(|r| r.attributes).unwrap_or_default();
                    let service = attributes
                        .iter()
                        .find(|a| a.key == "service.name")
                        .and_then(|a| match a.value.as_ref()?.value.as_ref()? {
                            Any::StringValue(s) => Some(s.clone()),
                            _ => None,
                        })
                        .unwrap_or_default();
                    for scope in resource_spans.scope_spans {
                        received.extend(scope.spans.into_iter().map(|span| (service.clone(), span)));
                    }
                }
                ([(axum::http::header::CONTENT_TYPE, "application/x-protobuf")], Vec::new())
            }),
        )
        .with_state(received)
}

/// An id as the trace context writes it.
fn hex(id: &[u8]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

/// A span's string attribute.
fn attribute<'a>(span: &'a Span, key: &str) -> Option<&'a str> {
    span.attributes.iter().find(|a| a.key == key).and_then(|a| match a.value.as_ref()?.value.as_ref()? {
        Any::StringValue(s) => Some(s.as_str()),
        _ => None,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_image_is_one_trace_across_ingest_the_classifier_and_the_sink() {
    let env = TestEnv::start().await;
    let settings = env.settings();
    let received: Received = Arc::default();
    let endpoint = format!("http://{}", serve(collector(received.clone())).await);
    let otel: &[(&str, &str)] = &[("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint), ("OTEL_BSP_SCHEDULE_DELAY", "200")];
    let sink =
        ServiceProcess::sink_with_env(env!("CARGO_BIN_EXE_sink-under-test"), &settings.sink, "traced-sink", otel);
    let classifier = ServiceProcess::classifier_with_env(
        env!("CARGO_BIN_EXE_classifier-under-test"),
        &settings.classifier,
        "traced-classifier",
        otel,
    );
    let ingest = ServiceProcess::ingest_with_env(
        env!("CARGO_BIN_EXE_ingest-under-test"),
        &settings.ingest,
        "traced-ingest",
        otel,
    );
    let (sink_url, ingest_url) = (
        format!("http://{}", sink.address("sink listening").await),
        format!("http://{}", ingest.address("ingest listening").await),
    );
    let client = reqwest::Client::new();

    // The caller's own trace (W3C trace context): the submission continues it.
    let (caller_trace, caller_span) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let body = json!({ "images": [format!("{}/photos/coffee.png", env.photos)] });
    let answer = client
        .post(format!("{ingest_url}/v1/classify"))
        .header("traceparent", format!("00-{caller_trace}-{caller_span}-01"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let (status, accepted) = (answer.status(), answer.json::<serde_json::Value>().await.unwrap());
    assert_eq!(status, 202, "{accepted}");
    let (batch_id, request_id) =
        (accepted["batch_id"].as_str().unwrap().to_owned(), accepted["request_ids"][0].as_str().unwrap().to_owned());
    let batch_url = format!("{sink_url}/v1/batches/{batch_id}");
    wait_for("the result", Duration::from_secs(120), || {
        let (client, url) = (client.clone(), batch_url.clone());
        async move { get_json_ok(&client, &url).await.filter(|b| b["done"] == true) }
    })
    .await;

    // A span of the request (or, for ingest's, of its submission) as the collector has it.
    let find = |spans: &[(String, Span)], service: &str, name: &str| {
        spans
            .iter()
            .find(|(s, span)| {
                s == service
                    && span.name == name
                    && [Some(request_id.as_str()), None].contains(&attribute(span, "request_id"))
                    && attribute(span, "batch_id") == Some(batch_id.as_str())
            })
            .map(|(_, span)| span.clone())
    };
    // Each process exports on its own timer: wait until every span is in.
    let stages = ["fetch", "decode", "infer", "produce"];
    let spans = wait_for("every span exported", Duration::from_secs(60), || {
        let spans = received.lock().unwrap().clone();
        // Ingest's request span ends after its submission span, perhaps in a later export.
        let all = find(&spans, "reefline-ingest", "submit").is_some_and(|submit| {
            spans.iter().any(|(service, span)| {
                service == "reefline-ingest" && span.name == "http" && span.span_id == submit.parent_span_id
            })
        }) && find(&spans, "reefline-sink", "store").is_some()
            && find(&spans, "reefline-classifier", "classify").is_some_and(|classify| {
                stages.iter().all(|stage| {
                    spans.iter().any(|(service, span)| {
                        service == "reefline-classifier"
                            && span.name == *stage
                            && span.parent_span_id == classify.span_id
                    })
                })
            });
        async move { all.then_some(spans) }
    })
    .await;
    let submit = find(&spans, "reefline-ingest", "submit").expect("ingest's submit span");
    let classify = find(&spans, "reefline-classifier", "classify").expect("the classifier's span of the request");
    let store = find(&spans, "reefline-sink", "store").expect("the sink's store span");
    assert_eq!(attribute(&classify, "request_id"), Some(request_id.as_str()));
    assert_eq!(attribute(&store, "request_id"), Some(request_id.as_str()));
    // One trace, the caller's: ingest's request under the caller's span, its submission under
    // that, the classifier's request under the submission, the sink's write under that.
    let http = spans
        .iter()
        .find(|(service, span)| {
            service == "reefline-ingest" && span.name == "http" && span.span_id == submit.parent_span_id
        })
        .map(|(_, span)| span.clone())
        .expect("ingest's span of the HTTP request, the submission's parent");
    assert_eq!(hex(&http.trace_id), caller_trace, "the submission is in the caller's trace");
    assert_eq!(hex(&http.parent_span_id), caller_span, "ingest's request span is the caller's span's child");
    assert_eq!(attribute(&http, "path"), Some("/v1/classify"));
    assert_eq!(submit.trace_id, http.trace_id);
    assert_eq!((&classify.trace_id, &classify.parent_span_id), (&submit.trace_id, &submit.span_id));
    assert_eq!((&store.trace_id, &store.parent_span_id), (&submit.trace_id, &classify.span_id));
    drop((ingest, classifier, sink));
    env.finish().await;
}
