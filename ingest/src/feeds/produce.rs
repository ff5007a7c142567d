//! Producing a chunk of requests with backpressure: room among the images waiting for the broker
//! is waited for (so an upload is read no faster than the broker takes it), and records the broker
//! did not take are sent again, with a pause between tries, until it has been away too long.

use std::time::{Duration, Instant};

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use reefline_schemas::{ImageRequest, REQUEST_ID_HEADER};

use crate::AppState;
use crate::error::IngestError;

/// A request's record, keyed by its id: its id in a header too, the trace context of `span`, and the
/// seal of its tenant.
pub(crate) fn request_record<'a>(
    state: &'a AppState,
    topic: &'a str,
    request: &'a ImageRequest,
    payload: &'a [u8],
    span: &tracing::Span,
) -> FutureRecord<'a, str, [u8]> {
    let request_id = request.request_id.as_str();
    let headers = OwnedHeaders::new().insert(Header { key: REQUEST_ID_HEADER, value: Some(request_id) });
    let headers = reefline_common::telemetry::inject(span, headers);
    let tenant = request.tenant.as_deref().unwrap_or(state.tenants.kafka_tenant());
    let headers = state.tenants.add_to(headers, tenant, request_id);
    FutureRecord::to(topic).key(request_id).payload(payload).headers(headers)
}

/// Produces `requests` for `route` and returns once the broker has acknowledged every one; fails
/// once the registry or the broker has been away for `stall`. `pause` is awaited between tries.
pub async fn produce_chunk<P>(
    state: &AppState,
    route: &str,
    requests: &[ImageRequest],
    stall: Duration,
    pause: impl Fn() -> P,
) -> Result<(), IngestError>
where
    P: Future<Output = ()>,
{
    let started = Instant::now();
    let topic = &state.settings.topics.requests;
    let batch_id = requests.first().map_or("", |r| r.batch_id.as_str());
    let span = tracing::info_span!("produce_chunk", batch_id, images = requests.len(), route);
    // Bulk work waits for its tenant's rate rather than being refused: nothing accepted is lost.
    let tenant = requests.first().and_then(|r| r.tenant.as_deref()).unwrap_or(state.tenants.kafka_tenant());
    state.quotas.wait(tenant, requests.len()).await;
    let _tenants_room = state.quotas.wait_pending(tenant, requests.len()).await;
    let permits = state
        .pending
        .acquire_many(requests.len() as u32)
        .await
        .map_err(|_| IngestError::Unavailable("ingest is stopping".into()))?;
    state.metrics.pending.set(state.pending_images() as i64);
    let patience = Patience { started, stall, pause: &pause };
    let produced = async {
        let payloads = encode(state, topic, requests, &patience).await?;
        send(state, topic, requests, &payloads, &span, &patience).await
    }
    .await;
    drop(permits);
    state.metrics.pending.set(state.pending_images() as i64);
    produced?;
    state.metrics.images.with_label_values(&[route]).inc_by(requests.len() as u64);
    state.metrics.tenant_images.with_label_values(&[tenant]).inc_by(requests.len() as u64);
    state.metrics.produce_seconds.with_label_values(&[route]).observe(started.elapsed().as_secs_f64());
    Ok(())
}

/// How long a chunk waits for the registry and the broker: until `stall` after `started`, with
/// `pause` awaited between tries.
struct Patience<'a, F> {
    started: Instant,
    stall: Duration,
    pause: &'a F,
}

/// Every request encoded, retried while the registry is away.
async fn encode<F, P>(
    state: &AppState,
    topic: &str,
    requests: &[ImageRequest],
    patience: &Patience<'_, F>,
) -> Result<Vec<Vec<u8>>, IngestError>
where
    F: Fn() -> P,
    P: Future<Output = ()>,
{
    let mut payloads = Vec::with_capacity(requests.len());
    for request in requests {
        let payload = loop {
            match state.codec.encode(topic, request).await {
                Ok(payload) => break payload,
                Err(e) if patience.started.elapsed() > patience.stall => {
                    return Err(IngestError::Unavailable(e.to_string()));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "the registry did not answer; retrying");
                    (patience.pause)().await;
                }
            }
        };
        payloads.push(payload);
    }
    Ok(payloads)
}

/// Every record sent, those the broker did not take sent again, until it has taken them all.
async fn send<F, P>(
    state: &AppState,
    topic: &str,
    requests: &[ImageRequest],
    payloads: &[Vec<u8>],
    span: &tracing::Span,
    patience: &Patience<'_, F>,
) -> Result<(), IngestError>
where
    F: Fn() -> P,
    P: Future<Output = ()>,
{
    let mut unsent: Vec<usize> = (0..requests.len()).collect();
    while !unsent.is_empty() {
        let deliveries = unsent.iter().map(|&i| {
            let record = request_record(state, topic, &requests[i], &payloads[i], span);
            state.producer.send(record, Duration::ZERO)
        });
        let outcomes = futures::future::join_all(deliveries).await;
        let mut failed = Vec::new();
        let mut last_error = None;
        for (&i, outcome) in unsent.iter().zip(outcomes) {
            if let Err((e, _)) = outcome {
                failed.push(i);
                last_error = Some(e);
            }
        }
        unsent = failed;
        if let Some(e) = last_error {
            if patience.started.elapsed() > patience.stall {
                return Err(IngestError::Unavailable(format!("the broker did not take the records: {e}")));
            }
            tracing::warn!(error = %e, records = unsent.len(), "the broker did not take a chunk; retrying");
            (patience.pause)().await;
        }
    }
    Ok(())
}
