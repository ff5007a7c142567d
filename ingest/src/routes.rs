//! The HTTP routes: `/v1/classify`, and the seed-compatible `/api/infer` and `/classify`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use futures::future::join_all;
use reefline_schemas::view::{BatchView, ErrorBody, ResultView};
use reefline_schemas::{ClassificationResult, ImageRequest};
use serde::Serialize;
use url::Url;
use uuid::Uuid;

use reefline_common::auth::Caller;
use reefline_common::kafka::Lane;

use crate::AppState;
use crate::error::IngestError;
use crate::validate::{self, ClassifyRequest, Limits, SingleRequest};

/// Ingest's HTTP API.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(title = "Reefline ingest", description = "Submits image URLs for classification. Results are read from the sink's API (port 8081 locally), or waited for here."),
    paths(classify, infer, classify_one, crate::feeds::create, crate::feeds::retry::feed, crate::feeds::retry::batch),
    modifiers(&API_KEYS),
)]
pub(crate) struct ApiDoc;

const API_KEYS: reefline_common::docs::ApiKeys = reefline_common::docs::ApiKeys;

pub(crate) fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/classify", post(classify))
        .route("/api/infer", post(infer))
        .route("/classify", post(classify_one))
        .with_state(state)
}

/// The answer to an accepted submission whose results are not all in (it did not wait, or not
/// long enough); one that waited has the fields of a batch too, as in its `200`.
#[derive(Serialize, utoipa::ToSchema)]
struct Accepted {
    batch_id: String,
    /// One id per URL, in the order the URLs were given.
    request_ids: Vec<String>,
}

/// The answer to a submission that waited: the batch as the sink shows it, and its request ids.
#[derive(Serialize, utoipa::ToSchema)]
struct Waited {
    #[serde(flatten)]
    batch: BatchView,
    request_ids: Vec<String>,
}

/// The answer to an accepted single-image submission whose result is not in yet.
#[derive(Serialize, utoipa::ToSchema)]
struct AcceptedOne {
    batch_id: String,
    request_id: String,
}

/// The refusals of every submission route, for the contract (the answers are `IngestError`s).
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)]
enum Refused {
    #[response(
        status = 400,
        description = "Malformed: invalid_json, invalid_field, missing_field, empty_images, too_many_images, invalid_url, unknown_model"
    )]
    Malformed(ErrorBody),
    #[response(
        status = 401,
        description = "unauthorized: a key is required (API_KEYS) and none or a wrong one was sent"
    )]
    Unauthorized(ErrorBody),
    #[response(status = 403, description = "forbidden: the key's role is `read`")]
    Forbidden(ErrorBody),
    #[response(status = 413, description = "body_too_large")]
    TooLarge(ErrorBody),
    #[response(status = 415, description = "unsupported_media_type: not application/json")]
    MediaType(ErrorBody),
    #[response(
        status = 429,
        description = "overloaded: too many images wait for the broker; quota_exceeded: over the tenant's images a second (TENANT_IMAGES_PER_SECOND). Retry-After"
    )]
    Overloaded(ErrorBody),
    #[response(status = 503, description = "unavailable: the broker did not acknowledge in time; Retry-After")]
    Unavailable(ErrorBody),
}

type Body = Result<Bytes, BytesRejection>;

/// Submit image URLs; answers at once unless the request asks to `wait`.
#[utoipa::path(post, path = "/v1/classify", request_body = ClassifyRequest, responses(
    (status = 200, description = "It waited, and every result is in, in input order", body = Waited),
    (status = 202, description = "Accepted: every record is on the broker; the results are not all in", body = Accepted),
    Refused,
))]
async fn classify(State(state): State<Arc<AppState>>, caller: Caller, headers: HeaderMap, body: Body) -> Response {
    let result = handle_many(&state, &caller, "v1_classify", &headers, body, Duration::ZERO).await;
    respond(&state, "v1_classify", result)
}

/// Submit image URLs and get the results inline (seed-compatible): waits `INGEST_INFER_WAIT_SECONDS` by default.
#[utoipa::path(post, path = "/api/infer", request_body = ClassifyRequest, responses(
    (status = 200, description = "Every result, in input order", body = Waited),
    (status = 202, description = "Accepted; the results were not all in within the wait", body = Accepted),
    Refused,
))]
async fn infer(State(state): State<Arc<AppState>>, caller: Caller, headers: HeaderMap, body: Body) -> Response {
    let result = handle_many(&state, &caller, "api_infer", &headers, body, state.infer_wait()).await;
    respond(&state, "api_infer", result)
}

/// Submit one image URL (seed-compatible); its result inline when it is done in time.
#[utoipa::path(post, path = "/classify", request_body = SingleRequest, responses(
    (status = 200, description = "The result", body = ResultView),
    (status = 202, description = "Accepted; the result was not in within the wait", body = AcceptedOne),
    Refused,
))]
async fn classify_one(State(state): State<Arc<AppState>>, caller: Caller, headers: HeaderMap, body: Body) -> Response {
    let result = async {
        IngestError::unless_submitter(&caller)?;
        let body = json_body(&state, &headers, body)?;
        let request: SingleRequest = validate::parse_json(&body)?;
        let raw = request.image_url.ok_or_else(|| IngestError::MissingField { field: "image_url".into() })?;
        let url = validate::check_url(&raw, state.settings.max_url_bytes)
            .map_err(|reason| IngestError::InvalidUrl { field: "image_url".into(), reason })?;
        validate::check_buckets(std::slice::from_ref(&url), &state.stores, &caller.tenant, |_| "image_url".into())?;
        let model = validate::check_model(request.model, &state.models)?;
        let wait = wait_for(&state, request.wait, state.infer_wait())?;
        let lane = lane_of(&state, request.priority.unwrap_or(Lane::Interactive));
        let submission = Submission {
            urls: vec![url],
            metadata: vec![None],
            model,
            callback_url: None,
            tenant: caller.tenant.clone(),
            lane,
        };
        Ok(match submit_and_wait(&state, "classify", submission, wait).await? {
            Answer::Waited { mut results, .. } if !results.is_empty() => {
                (StatusCode::OK, Json(ResultView::from(results.remove(0)))).into_response()
            }
            Answer::Waited { batch_id, mut request_ids, .. } | Answer::Accepted { batch_id, mut request_ids } => {
                let request_id = request_ids.pop().unwrap_or_default();
                (StatusCode::ACCEPTED, Json(AcceptedOne { batch_id, request_id })).into_response()
            }
        })
    }
    .await;
    respond(&state, "classify", result)
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

async fn handle_many(
    state: &AppState,
    caller: &Caller,
    route: &str,
    headers: &HeaderMap,
    body: Body,
    default_wait: Duration,
) -> Result<Response, IngestError> {
    IngestError::unless_submitter(caller)?;
    let body = json_body(state, headers, body)?;
    let request: ClassifyRequest = validate::parse_json(&body)?;
    let limits = Limits { max_images: state.settings.max_images, max_url_bytes: state.settings.max_url_bytes };
    let (urls, metadata) = validate::check_images(request.images, limits)?;
    validate::check_buckets(&urls, &state.stores, &caller.tenant, |i| format!("images[{i}]"))?;
    let model = validate::check_model(request.model, &state.models)?;
    let callback_url = validate::check_callback(request.callback_url, state.settings.max_url_bytes)?;
    let wait = wait_for(state, request.wait, default_wait)?;
    let small = urls.len() <= state.settings.interactive_max_images;
    let lane = lane_of(
        state,
        request.priority.unwrap_or(if small || !wait.is_zero() { Lane::Interactive } else { Lane::Bulk }),
    );
    let submission = Submission { urls, metadata, model, callback_url, tenant: caller.tenant.clone(), lane };
    Ok(match submit_and_wait(state, route, submission, wait).await? {
        Answer::Accepted { batch_id, request_ids } => {
            (StatusCode::ACCEPTED, Json(Accepted { batch_id, request_ids })).into_response()
        }
        Answer::Waited { batch_id, request_ids, results } => {
            let batch = BatchView::new(batch_id, request_ids.len() as i64, results);
            let status = if batch.done { StatusCode::OK } else { StatusCode::ACCEPTED };
            (status, Json(Waited { batch, request_ids })).into_response()
        }
    })
}

/// How long a submission waits: what it asked for (checked), else the route's default, cut to
/// `INGEST_MAX_WAIT_SECONDS`.
fn wait_for(state: &AppState, asked: Option<f64>, default: Duration) -> Result<Duration, IngestError> {
    let wait = validate::check_wait(asked)?.unwrap_or(default);
    Ok(wait.min(Duration::from_secs_f64(state.settings.max_wait_seconds.max(0.0))))
}

/// The lane a submission travels: the one it chose, unless the interactive lane is off.
fn lane_of(state: &AppState, chosen: Lane) -> Lane {
    if state.settings.interactive_lane { chosen } else { Lane::Bulk }
}

/// What became of an accepted submission.
enum Answer {
    /// It did not wait.
    Accepted { batch_id: String, request_ids: Vec<String> },
    /// It waited; `results` are those that came in time, in submission order.
    Waited { batch_id: String, request_ids: Vec<String>, results: Vec<ClassificationResult> },
}

/// Produces the submission and, when it is to wait, waits for its results. It is registered
/// among the waiters before its first record is produced, so no result can come unseen.
async fn submit_and_wait(
    state: &AppState,
    route: &str,
    submission: Submission,
    wait: Duration,
) -> Result<Answer, IngestError> {
    let (lane, requests) = submission.plan();
    let batch_id = requests[0].batch_id.clone();
    let request_ids: Vec<String> = requests.iter().map(|r| r.request_id.clone()).collect();
    let registration = (!wait.is_zero()).then(|| state.waiters.register(&batch_id, request_ids.clone()));
    submit(state, route, lane, requests).await?;
    let Some(registration) = registration else { return Ok(Answer::Accepted { batch_id, request_ids }) };
    let results = registration.finish(wait).await;
    let outcome = if results.len() == request_ids.len() { "complete" } else { "timed_out" };
    state.metrics.waits.with_label_values(&[route, outcome]).inc();
    Ok(Answer::Waited { batch_id, request_ids, results })
}

/// A checked submission.
struct Submission {
    urls: Vec<Url>,
    /// Each URL's metadata, when it came with some.
    metadata: Vec<Option<reefline_schemas::Metadata>>,
    model: Option<String>,
    callback_url: Option<String>,
    /// The caller's tenant.
    tenant: String,
    /// The lane its records travel.
    lane: Lane,
}

impl Submission {
    /// One request record per URL, under a new batch id.
    fn plan(self) -> (Lane, Vec<ImageRequest>) {
        let batch_id = Uuid::now_v7().to_string();
        let submitted_at_ms = chrono::Utc::now().timestamp_millis();
        let batch_size = self.urls.len() as i32;
        let (model, callback_url, tenant) = (self.model, self.callback_url, self.tenant);
        let requests = self
            .urls
            .into_iter()
            .zip(self.metadata)
            .enumerate()
            .map(|(i, (url, metadata))| ImageRequest {
                request_id: Uuid::now_v7().to_string(),
                batch_id: batch_id.clone(),
                batch_index: i as i32,
                batch_size,
                url: url.into(),
                submitted_at_ms,
                source: "http".into(),
                model: model.clone(),
                callback_url: callback_url.clone(),
                tenant: Some(tenant.clone()),
                metadata,
                ..ImageRequest::default()
            })
            .collect();
        (self.lane, requests)
    }
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

/// Produces one record per request and returns only once the broker has acknowledged all of them.
async fn submit(state: &AppState, route: &str, lane: Lane, requests: Vec<ImageRequest>) -> Result<(), IngestError> {
    let started = Instant::now();
    let tenant = requests[0].tenant.as_deref().unwrap_or(state.tenants.kafka_tenant());
    let _tenants_room = state.quotas.admit_pending(tenant, requests.len()).map_err(|limit| {
        state.metrics.quota_refusals.with_label_values(&[tenant]).inc();
        IngestError::TenantOverloaded { limit }
    })?;
    let _admitted = Admission::try_new(state, requests.len())?;
    // The tenant's rate and day are charged last, once nothing else refuses the submission.
    if let Err(over) = state.quotas.admit(tenant, requests.len()) {
        state.metrics.quota_refusals.with_label_values(&[tenant]).inc();
        let retry_after_s = over.retry_after.as_secs_f64().ceil().max(1.0) as u64;
        return Err(IngestError::QuotaExceeded { per_second: over.per_second, retry_after_s });
    }
    let per_day = state.settings.tenant_images_per_day;
    if let Err(over) = crate::quota::take_daily(state.feeds.get(), tenant, requests.len(), per_day).await {
        state.metrics.quota_refusals.with_label_values(&[tenant]).inc();
        return Err(IngestError::over_day(over));
    }
    // The trace of the submission: each record carries its context to the classifier.
    let span = tracing::info_span!("submit", batch_id = %requests[0].batch_id, images = requests.len(), route, lane = lane.as_str());
    let topic = lane.topic(&state.settings.topics);
    let mut records = Vec::with_capacity(requests.len());
    for request in &requests {
        let payload = state.codec.encode(topic, request).await.map_err(|e| IngestError::Unavailable(e.to_string()))?;
        records.push((request, payload));
    }
    let deliveries = records.iter().map(|(request, payload)| {
        let record = crate::feeds::produce::request_record(state, topic, request, payload, &span);
        // No waiting for room in the producer's queue: it has room for every admitted image.
        let producer = if lane == Lane::Interactive { &state.interactive_producer } else { &state.producer };
        producer.send(record, Duration::ZERO)
    });
    // Every record is either acknowledged or failed within the delivery timeout. When some fail,
    // the submission is refused as a whole (the client resubmits, with new ids); the records
    // that did reach the broker are still classified under the refused batch's id.
    for delivery in join_all(deliveries).await {
        delivery.map_err(|(e, _)| IngestError::Unavailable(e.to_string()))?;
    }
    record_handed_out(state, &requests).await;
    state.metrics.images.with_label_values(&[route]).inc_by(records.len() as u64);
    state.metrics.tenant_images.with_label_values(&[tenant]).inc_by(records.len() as u64);
    state.metrics.produce_seconds.with_label_values(&[route]).observe(started.elapsed().as_secs_f64());
    state.metrics.lane_images.with_label_values(&[lane.as_str()]).inc_by(records.len() as u64);
    tracing::info!(batch_id = %requests[0].batch_id, images = records.len(), route, lane = lane.as_str(), "submission accepted");
    Ok(())
}

/// Records the submission's requests and batch as the sink records them from the requests topic,
/// before its ids are handed out: an id answered with is known from that moment (pending), never
/// unknown while the sink has yet to read its record. Without the database (not reached yet, or
/// away) the sink's own reading still records them, a moment later.
async fn record_handed_out(state: &AppState, requests: &[ImageRequest]) {
    let Some(pool) = state.feeds.get() else { return };
    if let Err(e) = reefline_store::submissions::record(pool, requests).await {
        tracing::warn!(error = %e, batch_id = %requests[0].batch_id, "could not record a submission's ids; the sink will");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_contract_describes_every_route_and_its_errors() {
        let spec = serde_json::to_value(<ApiDoc as utoipa::OpenApi>::openapi()).unwrap();
        if std::env::var_os("PRINT_SPEC").is_some() {
            println!("{}", serde_json::to_string_pretty(&spec).unwrap());
        }
        let paths: Vec<&String> = spec["paths"].as_object().unwrap().keys().collect();
        assert_eq!(
            paths,
            [
                "/api/infer",
                "/classify",
                "/v1/batches/{batch_id}/retry",
                "/v1/classify",
                "/v1/feeds",
                "/v1/feeds/{feed_id}/retry"
            ]
        );
        let classify = &spec["paths"]["/v1/classify"]["post"];
        let statuses: Vec<&String> = classify["responses"].as_object().unwrap().keys().collect();
        assert_eq!(statuses, ["200", "202", "400", "401", "403", "413", "415", "429", "503"]);
        assert!(spec["components"]["schemas"]["ClassifyRequest"]["properties"]["wait"].is_object(), "{spec}");
    }
}
