//! Logs, and traces an operator can follow one image by: each service's spans carry `request_id`
//! and `batch_id`, and the W3C trace context (`traceparent`, `tracestate`) travels in the Kafka
//! headers of request and result records, so that ingest's, the classifier's and the sink's spans
//! of one submission make one trace; an HTTP request that carries a caller's trace context continues
//! that trace (each request is a span, `http`, the handler's spans under it). Spans are exported to an OpenTelemetry collector over
//! OTLP/HTTP (protobuf) when `OTEL_EXPORTER_OTLP_ENDPOINT` is set (the other `OTEL_EXPORTER_OTLP_*`
//! and `OTEL_BSP_*` variables apply); without it nothing is exported and no context is sent.

use std::collections::HashMap;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use rdkafka::message::{Header, Headers, OwnedHeaders};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::Layer;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// The trace context's Kafka headers.
const CONTEXT_HEADERS: [&str; 2] = ["traceparent", "tracestate"];

/// What [`init`] installed; dropping it exports the spans still buffered.
#[must_use = "dropping it stops the export of spans"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(e) = provider.shutdown()
        {
            tracing::warn!(error = %e, "exporting the last spans failed");
        }
    }
}

/// Installs the `tracing` subscriber: logs filtered by `RUST_LOG` (default `info`), and, when
/// `OTEL_EXPORTER_OTLP_ENDPOINT` is set, spans exported under `service` as `service.name`.
pub fn init(service: &'static str) -> Telemetry {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rdkafka=warn"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let logs = tracing_subscriber::fmt::layer().with_target(false).with_ansi(ansi);
    let endpoint = std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").ok().filter(|e| !e.trim().is_empty());
    let provider = endpoint.as_ref().and_then(|_| match exporting(service) {
        Ok(provider) => Some(provider),
        Err(e) => {
            eprintln!(
                "OTEL_EXPORTER_OTLP_ENDPOINT is set, but its exporter could not be built: {e}; exporting no spans"
            );
            None
        }
    });
    // `RUST_LOG` filters the logs only: spans (and the context records carry) stay at `info`.
    let spans = provider
        .as_ref()
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer(service)).with_filter(LevelFilter::INFO));
    let installed = tracing_subscriber::registry().with(logs.with_filter(filter)).with(spans).try_init().is_ok();
    if installed && let Some(endpoint) = endpoint.filter(|_| provider.is_some()) {
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        tracing::info!(%endpoint, "exporting spans over OTLP/HTTP");
    }
    Telemetry { provider: provider.filter(|_| installed) }
}

fn exporting(service: &'static str) -> anyhow::Result<SdkTracerProvider> {
    let exporter = opentelemetry_otlp::SpanExporter::builder().with_http().build()?;
    let resource = opentelemetry_sdk::Resource::builder().with_service_name(service).build();
    Ok(SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource).build())
}

/// `headers` with the trace context of `span` added (nothing when no spans are exported).
pub fn inject(span: &tracing::Span, headers: OwnedHeaders) -> OwnedHeaders {
    let mut carrier = HashMap::new();
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&span.context(), &mut carrier));
    CONTEXT_HEADERS.iter().fold(headers, |headers, key| match carrier.get(*key) {
        Some(value) => headers.insert(Header { key, value: Some(value.as_bytes()) }),
        None => headers,
    })
}

/// Makes `span` a child of the trace context in `headers` (a record's), when they carry one.
pub fn continue_from<H: Headers>(span: &tracing::Span, headers: Option<&H>) {
    let Some(headers) = headers else { return };
    let carrier: HashMap<String, String> = headers
        .iter()
        .filter(|h| CONTEXT_HEADERS.contains(&h.key))
        .filter_map(|h| Some((h.key.to_owned(), String::from_utf8(h.value?.to_vec()).ok()?)))
        .collect();
    adopt(span, &carrier);
}

/// Makes `span` a child of the trace context an HTTP request's `headers` carry (a caller's own
/// trace: `traceparent`, `tracestate`), when they carry one. Any caller may send one, and so
/// choose whether its own requests are sampled (its trace flags); it reaches no one else's.
pub fn continue_from_http(span: &tracing::Span, headers: &axum::http::HeaderMap) {
    let carrier: HashMap<String, String> = CONTEXT_HEADERS
        .iter()
        .filter_map(|key| Some((key.to_string(), headers.get(*key)?.to_str().ok()?.to_owned())))
        .collect();
    adopt(span, &carrier);
}

fn adopt(span: &tracing::Span, carrier: &HashMap<String, String>) {
    if carrier.is_empty() {
        return;
    }
    let parent = TraceContextPropagator::new().extract(carrier);
    let _ = span.set_parent(parent);
}
