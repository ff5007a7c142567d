//! The operator endpoints every service serves: `/metrics`, `/healthz`, `/readyz`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus::{Encoder, Registry, TextEncoder};

/// Whether the service is ready for traffic; flipped once its dependencies answer.
#[derive(Clone, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::Release);
    }

    pub fn get(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

#[derive(Clone)]
struct OpsState {
    registry: Registry,
    readiness: Readiness,
}

/// Routes for `/metrics` (Prometheus text), `/healthz` (alive) and `/readyz` (ready for traffic).
pub fn router(registry: Registry, readiness: Readiness) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .with_state(OpsState { registry, readiness })
}

async fn metrics(State(state): State<OpsState>) -> impl IntoResponse {
    let mut body = Vec::new();
    let encoder = TextEncoder::new();
    if let Err(e) = encoder.encode(&state.registry.gather(), &mut body) {
        return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response();
    }
    // What /readyz says, for alerting (the scrape job tells which service it is).
    let ready = u8::from(state.readiness.get());
    body.extend_from_slice(
        format!(
            "# HELP reefline_ready 1 while /readyz answers 200\n# TYPE reefline_ready gauge\nreefline_ready {ready}\n"
        )
        .as_bytes(),
    );
    ([(header::CONTENT_TYPE, encoder.format_type().to_owned())], body).into_response()
}

async fn ready(State(state): State<OpsState>) -> impl IntoResponse {
    if state.readiness.get() { (StatusCode::OK, "ready") } else { (StatusCode::SERVICE_UNAVAILABLE, "not ready") }
}

/// Buckets for durations from a millisecond to a minute.
pub fn duration_buckets() -> Vec<f64> {
    vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
}
