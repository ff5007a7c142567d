//! The HTTP routes: `/v1/classify`, and the seed-compatible `/api/infer` and `/classify`.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use futures::future::join_all;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use reefline_schemas::ImageRequest;
use serde::Serialize;
use url::Url;
use uuid::Uuid;

use crate::AppState;
use crate::error::IngestError;
use crate::validate::{self, ClassifyRequest, Limits, SingleRequest};

pub(crate) fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/classify", post(classify))
        .route("/api/infer", post(infer))
        .route("/classify", post(classify_one))
        .with_state(state)
}

/// The answer to an accepted submission.
#[derive(Serialize)]
struct Accepted {
    batch_id: String,
    /// One id per URL, in the order the URLs were given.
    request_ids: Vec<String>,
}

/// The answer to an accepted single-image submission.
#[derive(Serialize)]
struct AcceptedOne {
    batch_id: String,
    request_id: String,
}

type Body = Result<Bytes, BytesRejection>;

async fn classify(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    respond(
        &state,
        "v1_classify",
        handle_many(&state, "v1_classify", &headers, body).await.map(|a| (StatusCode::ACCEPTED, Json(a))),
    )
}

async fn infer(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    respond(
        &state,
        "api_infer",
        handle_many(&state, "api_infer", &headers, body).await.map(|a| (StatusCode::ACCEPTED, Json(a))),
    )
}

async fn classify_one(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    let result = async {
        let body = json_body(&state, &headers, body)?;
        let request: SingleRequest = validate::parse_json(&body)?;
        let raw = request.image_url.ok_or_else(|| IngestError::MissingField { field: "image_url".into() })?;
        let url = validate::check_url(&raw, state.settings.max_url_bytes)
            .map_err(|reason| IngestError::InvalidUrl { field: "image_url".into(), reason })?;
        let model = validate::check_model(request.model, &state.models)?;
        let accepted = submit(&state, "classify", vec![url], model).await?;
        Ok(AcceptedOne {
            batch_id: accepted.batch_id,
            request_id: accepted.request_ids.into_iter().next().unwrap_or_default(),
        })
    }
    .await;
    respond(&state, "classify", result.map(|a| (StatusCode::ACCEPTED, Json(a))))
}

fn respond(state: &AppState, route: &str, result: Result<impl IntoResponse, IngestError>) -> Response {
    match result {
        Ok(ok) => {
            state.metrics.submissions.with_label_values(&[route, "accepted"]).inc();
            ok.into_response()
        }
        Err(e) => {
            state.metrics.submissions.with_label_values(&[route, e.kind()]).inc();
            tracing::debug!(route, kind = e.kind(), error = %e, "submission refused");
            e.into_response()
        }
    }
}

fn json_body(state: &AppState, headers: &HeaderMap, body: Body) -> Result<Bytes, IngestError> {
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    if !content_type.starts_with("application/json") {
        return Err(IngestError::UnsupportedMediaType);
    }
    body.map_err(|rejection| match rejection.status() {
        StatusCode::PAYLOAD_TOO_LARGE => IngestError::BodyTooLarge { limit: state.settings.max_body_bytes },
        _ => IngestError::InvalidJson(rejection.body_text()),
    })
}

async fn handle_many(state: &AppState, route: &str, headers: &HeaderMap, body: Body) -> Result<Accepted, IngestError> {
    let body = json_body(state, headers, body)?;
    let request: ClassifyRequest = validate::parse_json(&body)?;
    let limits = Limits { max_images: state.settings.max_images, max_url_bytes: state.settings.max_url_bytes };
    let urls = validate::check_images(request.images, limits)?;
    let model = validate::check_model(request.model, &state.models)?;
    submit(state, route, urls, model).await
}

/// Room for a submission's images among those waiting for the broker, held until it is answered.
struct Admission<'a> {
    permit: Option<tokio::sync::SemaphorePermit<'a>>,
    state: &'a AppState,
}

impl<'a> Admission<'a> {
    fn try_new(state: &'a AppState, images: usize) -> Result<Self, IngestError> {
        let permit = state.pending.try_acquire_many(images as u32).map_err(|_| IngestError::Overloaded {
            pending: state.pending_images(),
            limit: state.settings.max_pending_images,
        })?;
        state.metrics.pending.set(state.pending_images() as i64);
        Ok(Self { permit: Some(permit), state })
    }
}

impl Drop for Admission<'_> {
    fn drop(&mut self) {
        drop(self.permit.take());
        self.state.metrics.pending.set(self.state.pending_images() as i64);
    }
}

/// Produces one record per URL and answers only once the broker has acknowledged all of them.
async fn submit(state: &AppState, route: &str, urls: Vec<Url>, model: Option<String>) -> Result<Accepted, IngestError> {
    let started = Instant::now();
    let batch_id = Uuid::now_v7().to_string();
    let submitted_at_ms = chrono::Utc::now().timestamp_millis();
    let batch_size = urls.len() as i32;
    let _admitted = Admission::try_new(state, urls.len())?;
    let topic = &state.settings.topics.requests;
    let mut records = Vec::with_capacity(urls.len());
    for (i, url) in urls.into_iter().enumerate() {
        let request = ImageRequest {
            request_id: Uuid::now_v7().to_string(),
            batch_id: batch_id.clone(),
            batch_index: i as i32,
            batch_size,
            url: url.into(),
            submitted_at_ms,
            source: "http".into(),
            model: model.clone(),
        };
        let payload = state.codec.encode(topic, &request).await.map_err(|e| IngestError::Unavailable(e.to_string()))?;
        records.push((request.request_id, payload));
    }
    let deliveries = records.iter().map(|(id, payload)| {
        let headers = OwnedHeaders::new().insert(Header { key: "reefline-request-id", value: Some(id.as_str()) });
        let record = FutureRecord::to(topic).key(id.as_str()).payload(payload).headers(headers);
        // No waiting for room in the producer's queue: it has room for every admitted image.
        state.producer.send(record, std::time::Duration::ZERO)
    });
    // Every record is either acknowledged or failed within the delivery timeout. When some fail,
    // the submission is refused as a whole (the client resubmits, with new ids); the records
    // that did reach the broker are still classified under the refused batch's id.
    for delivery in join_all(deliveries).await {
        delivery.map_err(|(e, _)| IngestError::Unavailable(e.to_string()))?;
    }
    state.metrics.images.with_label_values(&[route]).inc_by(records.len() as u64);
    state.metrics.produce_seconds.with_label_values(&[route]).observe(started.elapsed().as_secs_f64());
    tracing::info!(%batch_id, images = records.len(), route, "submission accepted");
    Ok(Accepted { batch_id, request_ids: records.into_iter().map(|(id, _)| id).collect() })
}
