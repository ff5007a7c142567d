//! `POST /v1/feeds`: a survey's list of image URLs, uploaded (CSV, NDJSON or plain text, gzipped
//! or not) or fetched from a URL, read as a stream. Each line is accepted (one request record, its
//! other columns as metadata) or rejected with its reason; chunks of accepted lines are produced
//! as batches, and each chunk is settled in the ledger once the broker has it, so an upload that
//! broke off resumes, under the same `Idempotency-Key`, after the last settled line.

mod bucket;
mod ledger;
mod pace;
pub mod parse;
pub(crate) mod produce;
mod reader;
pub(crate) mod retry;
mod share;
mod source;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::{Stream, StreamExt};
use serde::{Deserialize, Serialize};

use parse::Format;
use reader::Reader;
pub(crate) use source::client as source_client;

use reefline_common::auth::Caller;

use crate::AppState;
use crate::error::IngestError;

/// The feed routes (served without the overall request timeout and body limit).
pub(crate) fn router(state: Arc<AppState>) -> axum::Router {
    axum::Router::new()
        .route("/v1/feeds", axum::routing::post(create))
        .route("/v1/feeds/{feed_id}/retry", axum::routing::post(retry::feed))
        .route("/v1/batches/{batch_id}/retry", axum::routing::post(retry::batch))
        .with_state(state)
}

/// Reaches the database and migrates it, trying again every few seconds until it answers; feeds
/// answer 503 until then.
pub(crate) async fn connect_in_background(state: Arc<AppState>) {
    let url = state.settings.database.url().to_owned();
    let mut backoff = reefline_common::Backoff::OUTAGE.waits();
    loop {
        match ledger::connect(&url).await {
            Ok(pool) => {
                let _ = state.feeds.set(pool);
                tracing::info!("feeds ledger ready");
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "the feeds database is unreachable; feeds answer 503 until it is reached");
                backoff.wait().await;
            }
        }
    }
}

/// The query of an upload.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)] // a misspelt `callback_url` or `model` is refused, not ignored
pub(crate) struct FeedQuery {
    /// `csv`, `ndjson` or `text`; absent: from the Content-Type, else guessed from the first line.
    format: Option<String>,
    /// A model of the manifest for every image of the feed; absent: the default.
    model: Option<String>,
    /// Where the sink POSTs the feed's signed summary once every accepted line has a result.
    callback_url: Option<String>,
}

/// A feed ingest fetches itself (`Content-Type: application/json`).
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"source_url": "https://data.example.org/survey-2026/photos.csv.gz"}))]
pub(crate) struct FeedSource {
    /// An http(s) URL of the list, fetched under the address rules of images (`SOURCE_ALLOW` opens private ones).
    source_url: Option<String>,
    /// Instead of a list: a bucket's prefix, `s3://bucket/survey-2026/`, whose objects are the feed's
    /// images (each with its `key`, `size` and `etag` as metadata), listed as the feed is read.
    source: Option<String>,
    /// With `source`: a glob the objects' keys below the prefix must match, without regard to case
    /// (`**/*.jpg`); absent: `**/*.{jpg,jpeg,png,gif,webp,bmp}`.
    #[serde(rename = "match")]
    #[schema(rename = "match")]
    pattern: Option<String>,
    /// `csv`, `ndjson` or `text`; absent: from the response's Content-Type or the file name.
    format: Option<String>,
    /// A model of the manifest; absent: the default.
    model: Option<String>,
    /// Where the sink POSTs the feed's signed summary once every accepted line has a result.
    callback_url: Option<String>,
}

/// A feed read to its end (or to where it stood when it was read before, for a repeated key).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct FeedAccepted {
    feed_id: String,
    /// `read`: every line is accepted (on the broker) or rejected.
    #[schema(example = "read")]
    state: String,
    /// Lines that were not blank, the header not counted.
    lines_read: i64,
    accepted: i64,
    rejected: i64,
    /// Batches its accepted lines travel in.
    batches: i32,
    /// Whether this upload resumed one that had broken off (same `Idempotency-Key`).
    resumed: bool,
    /// Where to follow it, on the sink's API (port 8081 locally).
    links: FeedLinks,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct FeedLinks {
    progress: String,
    rejects: String,
    results: String,
}

impl FeedAccepted {
    fn new(feed: ledger::Feed, resumed: bool) -> Self {
        let id = &feed.feed_id;
        let links = FeedLinks {
            progress: format!("/v1/feeds/{id}"),
            rejects: format!("/v1/feeds/{id}/rejects"),
            results: format!("/v1/feeds/{id}/results?format=csv"),
        };
        Self {
            links,
            feed_id: feed.feed_id,
            state: feed.state,
            lines_read: feed.lines_read,
            accepted: feed.accepted,
            rejected: feed.rejected,
            batches: feed.chunks,
            resumed,
        }
    }
}

/// The feed settings the reader needs.
#[derive(Clone, Copy, Debug)]
struct Limits {
    chunk_lines: usize,
    idle: Duration,
    lease: Duration,
    stall: Duration,
    max_url_bytes: usize,
    max_stored_rejects: u64,
    /// What a fetched list must keep to.
    source: pace::Pace,
}

/// Submit a bulk feed of image URLs (an upload, or `{"source_url": …}`); answers once it is read.
#[utoipa::path(post, path = "/v1/feeds", params(FeedQuery,
    ("Idempotency-Key" = Option<String>, Header, description = "Names the feed: resending with the same key resumes after the last line accepted, never duplicating, and answers with the same feed_id"),
), request_body(content(
    (String = "text/csv", example = "url,station,depth_m\nhttps://photos.example/reef/0001.jpg,Reef 4,12\n"),
    (String = "application/x-ndjson"),
    (String = "text/plain"),
    (FeedSource = "application/json"),
), description = "CSV with a `url` column (the others are metadata), NDJSON with a `url` key, or a URL a line; gzip-compressed or not. Or, as JSON, a `source_url` to fetch the list from."),
responses(
    (status = 201, description = "Read to its end: every line accepted (on the broker) or rejected", body = FeedAccepted,
        headers(("Idempotent-Replayed" = String, description = "`true` when the key named a feed already read"))),
    (status = 400, description = "invalid_field, unknown_model, invalid_url (source_url), unreadable_feed (no url column, a line over 1 MiB, broken gzip, a source that failed, or was too slow), feed_too_long (past FEED_MAX_LINES lines), too_many_rejects (past FEED_MAX_REJECTED_LINES rejected lines): the last two close the feed where it was cut", body = reefline_schemas::view::ErrorBody),
    (status = 401, description = "unauthorized", body = reefline_schemas::view::ErrorBody),
    (status = 413, description = "body_too_large: a `source_url` request over 64 KiB (uploads have no size limit)", body = reefline_schemas::view::ErrorBody),
    (status = 409, description = "feed_in_progress: another upload with this key is being read; Retry-After", body = reefline_schemas::view::ErrorBody),
    (status = 422, description = "idempotency_key_reused: the key names a feed of another file, source_url, model or format", body = reefline_schemas::view::ErrorBody),
    (status = 503, description = "unavailable: the broker or the database stayed away; resend with the same key to resume", body = reefline_schemas::view::ErrorBody),
))]
pub(crate) async fn create(
    State(state): State<Arc<AppState>>,
    caller: Caller,
    headers: HeaderMap,
    query: Result<Query<FeedQuery>, axum::extract::rejection::QueryRejection>,
    body: Body,
) -> Response {
    let outcome = match query {
        Ok(Query(query)) => accept(state.clone(), caller, headers, query, body).await,
        Err(e) => Err(IngestError::InvalidField { field: "query".into(), message: e.body_text() }),
    };
    let label = match &outcome {
        Ok(_) => "accepted",
        Err(e) => e.kind(),
    };
    state.metrics.submissions.with_label_values(&["feeds", label]).inc();
    match outcome {
        Ok((accepted, replayed)) => {
            let mut response = (StatusCode::CREATED, Json(accepted)).into_response();
            if replayed {
                response.headers_mut().insert("idempotent-replayed", HeaderValue::from_static("true"));
            }
            response
        }
        Err(e) => e.into_response(),
    }
}

/// The body of an upload, or of a fetched list, as it streams in.
type ByteStream = std::pin::Pin<Box<dyn Stream<Item = std::io::Result<Bytes>> + Send>>;

async fn accept(
    state: Arc<AppState>,
    caller: Caller,
    headers: HeaderMap,
    query: FeedQuery,
    body: Body,
) -> Result<(FeedAccepted, bool), IngestError> {
    IngestError::unless_submitter(&caller)?;
    let pool = state.feeds.get().cloned().ok_or(IngestError::FeedsUnavailable)?;
    let limits = Limits::of(&state.settings);
    let key = idempotency_key(&headers)?;
    let source = Source::open(&state, &caller, &headers, query, body, limits).await?;
    let read_bytes = Arc::new(AtomicU64::new(0));
    let stream = counted(source.stream, read_bytes.clone());
    // What the key is used for: a resend with another file, source or model is refused rather
    // than "resumed" (the new file's first lines would never be classified).
    let (first_bytes, stream) = match source.first {
        None => peek(stream, FINGERPRINT_BYTES).await?,
        Some(first) => (first, stream),
    };
    let (format, model) = (source.format, source.model);
    let fingerprint =
        ledger::fingerprint(format.map(Format::as_str), source.url.as_deref(), model.as_deref(), &first_bytes);
    let new = ledger::NewFeed {
        tenant: &caller.tenant,
        idempotency_key: key.as_deref(),
        format: format.map(Format::as_str),
        source_url: source.url.as_deref(),
        model: model.as_deref(),
        callback_url: source.callback_url.as_deref(),
        fingerprint: &fingerprint,
    };
    let (feed, lease, resumed) = match ledger::open(&pool, &new, limits.lease).await.map_err(database)? {
        ledger::Opened::Read { feed, lease, resumed } => (feed, lease, resumed),
        ledger::Opened::Done(feed) => return Ok((FeedAccepted::new(feed, false), true)),
        ledger::Opened::Busy(feed) => return Err(IngestError::FeedInProgress { feed_id: feed.feed_id }),
        ledger::Opened::Reused(feed) => return Err(IngestError::IdempotencyKeyReused { feed_id: feed.feed_id }),
    };
    if resumed {
        tracing::info!(feed_id = %feed.feed_id, after_line = feed.last_line, "resuming a feed");
    }
    // The reading goes on in a task of its own: a client that hangs up drops this handler, and the
    // feed must still be marked interrupted (its reader gone) for a resend to take it over at once.
    let (feed_id, since, size) = (feed.feed_id.clone(), chrono::Utc::now(), source.size);
    let tenant = caller.tenant;
    let reader = Reader { state: state.clone(), pool, lease, feed_id, model, tenant, limits, since, size, read_bytes };
    let options = parse::Options {
        format,
        max_url_bytes: limits.max_url_bytes,
        chunk_lines: limits.chunk_lines,
        max_lines: state.settings.feed_max_lines,
        max_rejected: state.settings.feed_max_rejected_lines,
        dedup_entries: state.settings.feed_dedup_entries,
        buckets: state.stores.readable(&reader.tenant).into(),
    };
    let outcome = tokio::spawn(reader.run(stream, options, feed.last_line)).await;
    match outcome.map_err(|e| IngestError::Unavailable(format!("the feed's reader failed: {e}")))? {
        Ok(feed) => Ok((FeedAccepted::new(feed, resumed), false)),
        Err(e) => Err(e),
    }
}

impl Limits {
    fn of(settings: &crate::Settings) -> Self {
        // With a window, a chunk is at most a quarter of it: each is settled (and so counted in the
        // feed's progress) as soon as the feed's share lets it on the broker.
        let chunk_lines = settings.feed_chunk_lines.clamp(1, settings.max_pending_images);
        let window = settings.feed_window_images;
        let chunk_lines = if window > 0 { chunk_lines.min((window / 4).max(1) as usize) } else { chunk_lines };
        let idle = Duration::from_secs(settings.feed_idle_timeout_s.max(1));
        Limits {
            chunk_lines,
            idle,
            lease: Duration::from_secs(settings.feed_lease_s.max(1)),
            stall: Duration::from_secs(settings.feed_stall_timeout_s.max(1)),
            max_url_bytes: settings.max_url_bytes,
            max_stored_rejects: settings.feed_max_stored_rejects,
            source: pace::Pace {
                idle,
                deadline: Duration::from_secs(settings.feed_source_deadline_s.max(1)),
                min_bytes_per_s: settings.feed_source_min_bytes_per_s,
            },
        }
    }
}

/// Where a feed's lines come from, and what the request says of them.
struct Source {
    stream: ByteStream,
    format: Option<Format>,
    model: Option<String>,
    /// The list's URL or the bucket's prefix; `None` for an upload.
    url: Option<String>,
    callback_url: Option<String>,
    /// Its size in bytes, when known.
    size: Option<u64>,
    /// What the fingerprint covers besides the source: a prefix's pattern, nothing for a list (it
    /// may change between fetches); `None` for an upload, whose first bytes it covers.
    first: Option<Bytes>,
}

impl Source {
    /// The upload itself, or (a JSON body) the list at `source_url` or the objects under `source`.
    async fn open(
        state: &AppState,
        caller: &Caller,
        headers: &HeaderMap,
        query: FeedQuery,
        body: Body,
        limits: Limits,
    ) -> Result<Self, IngestError> {
        let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
        if content_type.starts_with("application/json") {
            return Self::fetched(state, caller, body, limits).await;
        }
        let max_url_bytes = state.settings.max_url_bytes;
        Ok(Self {
            stream: idle_limited(body.into_data_stream().map(|r| r.map_err(std::io::Error::other)), limits.idle),
            format: parse_format(query.format.as_deref())?.or_else(|| Format::from_media_type(content_type)),
            model: crate::validate::check_model(query.model, &state.models)?,
            url: None,
            callback_url: crate::validate::check_callback(query.callback_url, max_url_bytes)?,
            size: headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse().ok()),
            first: None,
        })
    }

    /// The list at a JSON body's `source_url`, or the objects under its `source` prefix.
    async fn fetched(state: &AppState, caller: &Caller, body: Body, limits: Limits) -> Result<Self, IngestError> {
        let max_url_bytes = state.settings.max_url_bytes;
        let source = source::parse_request(body).await?;
        let format = parse_format(source.format.as_deref())?;
        let model = crate::validate::check_model(source.model, &state.models)?;
        let callback_url = crate::validate::check_callback(source.callback_url, max_url_bytes)?;
        match (source.source_url, source.source) {
            (Some(_), Some(_)) => Err(IngestError::InvalidField {
                field: "source".into(),
                message: "give `source_url` (a list of image URLs) or `source` (a bucket's prefix), not both".into(),
            }),
            (None, Some(prefix)) => {
                let listing = bucket::open(&state.stores, &caller.tenant, &prefix, source.pattern.as_deref()).await?;
                let first = Some(Bytes::from(listing.pattern.into_bytes()));
                let (stream, url) = (listing.stream, Some(listing.source));
                Ok(Self { stream, format: Some(Format::Ndjson), model, url, callback_url, size: None, first })
            }
            (_, None) if source.pattern.is_some() => Err(IngestError::InvalidField {
                field: "match".into(),
                message: "`match` selects the objects of a `source` prefix; a `source_url` list has none".into(),
            }),
            (url, None) => {
                let url = url.ok_or_else(|| IngestError::MissingField { field: "source_url".into() })?;
                let url = reefline_schemas::rules::check_web_url(&url, max_url_bytes)
                    .map_err(|reason| IngestError::InvalidUrl { field: "source_url".into(), reason })?;
                let (stream, found, size) =
                    source::open(&state.source_client, &state.source_policy, &url, limits.source).await?;
                let (format, url, first) = (format.or(found), Some(url.to_string()), Some(Bytes::new()));
                Ok(Self { stream, format, model, url, callback_url, size, first })
            }
        }
    }
}

/// How much of an upload's start its fingerprint covers.
const FINGERPRINT_BYTES: usize = 4096;

/// The first `n` bytes of `stream` (fewer when it is shorter), and the stream as it was.
async fn peek(mut stream: ByteStream, n: usize) -> Result<(Bytes, ByteStream), IngestError> {
    let (mut first, mut ended) = (Vec::new(), false);
    while first.len() < n && !ended {
        match stream.next().await {
            Some(Ok(piece)) => first.extend_from_slice(&piece),
            Some(Err(e)) => {
                return Err(IngestError::UnreadableFeed {
                    feed_id: String::new(),
                    reason: format!("the upload broke off: {e}"),
                });
            }
            None => ended = true,
        }
    }
    let first = Bytes::from(first);
    let head = first.slice(..first.len().min(n));
    let start = futures::stream::iter([Ok(first)]);
    // A stream that has ended must not be asked again.
    let stream: ByteStream = if ended { Box::pin(start) } else { Box::pin(start.chain(stream)) };
    Ok((head, stream))
}

fn parse_format(format: Option<&str>) -> Result<Option<Format>, IngestError> {
    format
        .map(|f| match f.to_ascii_lowercase().as_str() {
            "csv" => Ok(Format::Csv),
            "ndjson" | "jsonl" => Ok(Format::Ndjson),
            "text" | "txt" => Ok(Format::Text),
            other => Err(IngestError::InvalidField {
                field: "format".into(),
                message: format!("`{}` is not one of csv, ndjson, text", reefline_schemas::rules::truncate(other, 32)),
            }),
        })
        .transpose()
}

/// The `Idempotency-Key` header, when sent: 1 to 255 visible ASCII characters.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, IngestError> {
    let Some(value) = headers.get("idempotency-key") else { return Ok(None) };
    match value.to_str() {
        Ok(key) if (1..=255).contains(&key.len()) && key.bytes().all(|b| b.is_ascii_graphic()) => {
            Ok(Some(key.to_owned()))
        }
        _ => Err(IngestError::InvalidField {
            field: "Idempotency-Key".into(),
            message: "must be 1 to 255 visible ASCII characters (a UUID, say)".into(),
        }),
    }
}

pub(super) fn database(e: sqlx::Error) -> IngestError {
    tracing::warn!(error = %e, "the feeds ledger is unavailable");
    IngestError::Unavailable(format!("the database did not answer: {e}"))
}

/// `stream`, adding the bytes it yields to `read`.
fn counted(stream: ByteStream, read: Arc<AtomicU64>) -> ByteStream {
    Box::pin(stream.inspect(move |item| {
        if let Ok(bytes) = item {
            read.fetch_add(bytes.len() as u64, Ordering::Relaxed);
        }
    }))
}

/// Ends the stream with an error when no bytes come for `idle`: a client that stops sending
/// without closing holds nothing for long.
fn idle_limited(stream: impl Stream<Item = std::io::Result<Bytes>> + Send + 'static, idle: Duration) -> ByteStream {
    Box::pin(futures::stream::unfold(Box::pin(stream), move |mut stream| async move {
        match tokio::time::timeout(idle, stream.next()).await {
            Ok(Some(item)) => Some((item, stream)),
            Ok(None) => None,
            Err(_) => {
                let message = format!("no bytes came for {} s", idle.as_secs());
                Some((Err(std::io::Error::new(std::io::ErrorKind::TimedOut, message)), stream))
            }
        }
    }))
}
