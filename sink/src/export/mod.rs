//! Exports: every result of a feed (`GET /v1/feeds/{id}/results`) or a batch
//! (`GET /v1/batches/{id}/results`) as CSV or NDJSON, filtered, streamed from Postgres row by row
//! as the client reads (constant memory whatever the size).

use axum::body::{Body, Bytes};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use futures::{FutureExt, StreamExt};
use reefline_schemas::ClassificationResult;
use reefline_schemas::view::ResultView;
use serde::Deserialize;
use sqlx::PgPool;
use sqlx::postgres::PgArguments;

use reefline_common::auth::Caller;

use crate::api::ApiError;
use crate::db::{COLUMNS, Row};

mod camtrap;
mod coco;
mod megadetector;
mod table;

/// Turns results into an export's bytes, a piece at a time.
trait Encode: Send {
    fn push(&mut self, result: ClassificationResult);
    /// Bytes encoded and not yet taken.
    fn buffered(&self) -> usize;
    /// What is encoded so far.
    fn take(&mut self) -> Bytes;
    /// Ends the export (what comes after the last result).
    fn finish(&mut self) {}
    /// How many times the results are read (from one snapshot), each pass after a `next_pass`.
    fn passes(&self) -> usize {
        1
    }
    fn next_pass(&mut self) {}
}

/// One result object per line.
#[derive(Default)]
struct Lines(Vec<u8>);

impl Encode for Lines {
    fn push(&mut self, result: ClassificationResult) {
        let _ = serde_json::to_writer(&mut self.0, &ResultView::from(result));
        self.0.push(b'\n');
    }

    fn buffered(&self) -> usize {
        self.0.len()
    }

    fn take(&mut self) -> Bytes {
        Bytes::from(std::mem::take(&mut self.0))
    }
}

/// The label table's (index, label) pairs; none when it cannot be read (the MegaDetector export
/// then names the classes its results hold).
pub fn read_labels(path: &std::path::Path) -> Vec<(i32, String)> {
    match std::fs::read_to_string(path) {
        Ok(text) => text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let mut fields = l.split('\t');
                let index = fields.next()?.trim().parse().ok()?;
                Some((index, fields.nth(1)?.trim().to_owned()))
            })
            .collect(),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "no label table; MegaDetector exports name only the classes seen");
            Vec::new()
        }
    }
}

/// What the exports need: their connections, the class names the MegaDetector format lists, and
/// the limits that keep idle or greedy clients from holding every connection.
#[derive(Clone)]
pub struct Exports {
    pub pool: PgPool,
    pub labels: std::sync::Arc<Vec<(i32, String)>>,
    /// Exports running, by tenant.
    pub running: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, u32>>>,
    /// Most exports one tenant may run at once.
    pub per_tenant: u32,
    /// Longest an export waits for its client to read.
    pub idle: std::time::Duration,
}

/// A caller's running export, counted against its tenant until dropped.
pub(crate) struct Running {
    running: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, u32>>>,
    pub(crate) caller: Caller,
}

impl Exports {
    /// Counts an export of `caller`'s tenant, before it uses any connection.
    pub(crate) fn start(&self, caller: Caller) -> Result<Running, ApiError> {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        let count = running.entry(caller.tenant.clone()).or_default();
        if *count >= self.per_tenant {
            return Err(ApiError::TooManyExports { limit: self.per_tenant });
        }
        *count += 1;
        Ok(Running { running: self.running.clone(), caller })
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = running.get_mut(&self.caller.tenant) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                running.remove(&self.caller.tenant);
            }
        }
    }
}

/// What to export, and which results.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)] // a misspelt filter is refused, not silently left out
pub struct ExportQuery {
    /// `csv` (the default), `ndjson`, `megadetector` (the MegaDetector batch output format 1.6, as
    /// Timelapse and AddaxAI read it: one whole-image detection per image holding the top-5), or
    /// `coco-camera-traps` (images with location and time, image-level annotations of the top class),
    /// or `camtrap-dp` (a ZIP of a Camtrap DP 1.0.2 package: deployments, media and media-level
    /// observations of the classified images; 422 `missing_fields` when a field it requires
    /// cannot be filled).
    format: Option<String>,
    /// `ok` or `error`.
    status: Option<String>,
    /// Only images whose top class is (`true`) or is not (`false`) a marine animal.
    marine: Option<bool>,
    /// Only this marine group (`shark`, `ray`, `bony_fish`, ...).
    group: Option<String>,
    /// Only images whose top score is at least this, 0 to 1.
    #[param(minimum = 0.0, maximum = 1.0)]
    min_score: Option<f64>,
    /// `megadetector`: a prefix of the image URLs that `file` leaves out (e.g.
    /// `s3://reef-survey/survey-2026/`), so that Timelapse finds the images below its folder.
    relative_to: Option<String>,
    /// `camtrap-dp`: the UTC offset of times given without one (EXIF times), e.g. `+10:00`.
    utc_offset: Option<String>,
    /// `camtrap-dp`: the latitude of deployments whose images give none.
    #[param(minimum = -90.0, maximum = 90.0)]
    latitude: Option<f64>,
    /// `camtrap-dp`: the longitude of deployments whose images give none.
    #[param(minimum = -180.0, maximum = 180.0)]
    longitude: Option<f64>,
    /// `camtrap-dp`: `project.samplingDesign` (`opportunistic` unless given): simpleRandom,
    /// systematicRandom, clusteredRandom, experimental, targeted or opportunistic.
    sampling_design: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    Csv,
    Ndjson,
    MegaDetector,
    Coco,
    CamtrapDp,
}

/// The checked query.
pub(crate) struct Filters {
    format: Format,
    status: Option<String>,
    marine: Option<bool>,
    group: Option<String>,
    min_score: Option<f64>,
    relative_to: Option<String>,
    /// The Camtrap DP options, for that format.
    camtrap: Option<camtrap::Options>,
}

impl ExportQuery {
    /// A format and its options, with no filters of its own (a search's export filters in its query).
    /// `status` is given only to refuse errors in a Camtrap DP package.
    pub(crate) fn format_only(
        format: Option<String>,
        status: Option<String>,
        relative_to: Option<String>,
        utc_offset: Option<String>,
        (latitude, longitude): (Option<f64>, Option<f64>),
        sampling_design: Option<String>,
    ) -> Self {
        Self { format, status, relative_to, utc_offset, latitude, longitude, sampling_design, ..Self::default() }
    }

    pub(crate) fn check(self) -> Result<Filters, ApiError> {
        let format = match self.format.as_deref().unwrap_or("csv") {
            "csv" => Format::Csv,
            "ndjson" => Format::Ndjson,
            "megadetector" => Format::MegaDetector,
            "coco-camera-traps" => Format::Coco,
            "camtrap-dp" => Format::CamtrapDp,
            other => {
                let message = format!(
                    "`{}` is not one of csv, ndjson, megadetector, coco-camera-traps, camtrap-dp",
                    reefline_schemas::rules::truncate(other, 32)
                );
                return Err(ApiError::InvalidField { field: "format", message });
            }
        };
        if let Some(status) = self.status.as_deref().filter(|s| !matches!(*s, "ok" | "error")) {
            let message = format!("`{}` is neither ok nor error", reefline_schemas::rules::truncate(status, 32));
            return Err(ApiError::InvalidField { field: "status", message });
        }
        if let Some(score) = self.min_score.filter(|s| !(0.0..=1.0).contains(s)) {
            return Err(ApiError::InvalidField { field: "min_score", message: format!("{score} is not from 0 to 1") });
        }
        if self.relative_to.is_some() && format != Format::MegaDetector {
            let message = "applies to format=megadetector only".to_owned();
            return Err(ApiError::InvalidField { field: "relative_to", message });
        }
        let camtrap = self.camtrap_options(format)?;
        if format == Format::CamtrapDp && self.status.as_deref() == Some("error") {
            let message = "a Camtrap DP package holds classified images only".to_owned();
            return Err(ApiError::InvalidField { field: "status", message });
        }
        Ok(Filters {
            format,
            camtrap,
            status: self.status,
            marine: self.marine,
            group: self.group,
            min_score: self.min_score,
            relative_to: self.relative_to,
        })
    }

    fn camtrap_options(&self, format: Format) -> Result<Option<camtrap::Options>, ApiError> {
        let given = [
            ("utc_offset", self.utc_offset.is_some()),
            ("latitude", self.latitude.is_some()),
            ("longitude", self.longitude.is_some()),
            ("sampling_design", self.sampling_design.is_some()),
        ];
        if format != Format::CamtrapDp {
            return match given.iter().find(|(_, given)| *given) {
                Some((field, _)) => {
                    Err(ApiError::InvalidField { field, message: "applies to format=camtrap-dp only".to_owned() })
                }
                None => Ok(None),
            };
        }
        let invalid = |field, message: String| ApiError::InvalidField { field, message };
        let utc_offset = match self.utc_offset.as_deref() {
            Some(text) => Some(camtrap::parse_offset(text).ok_or_else(|| {
                let text = reefline_schemas::rules::truncate(text, 32);
                invalid("utc_offset", format!("`{text}` is not a UTC offset such as +10:00, -05:30 or Z"))
            })?),
            None => None,
        };
        let coordinates = match (self.latitude, self.longitude) {
            (None, None) => None,
            (Some(lat), Some(lon)) if (-90.0..=90.0).contains(&lat) && (-180.0..=180.0).contains(&lon) => {
                Some((lat, lon))
            }
            (Some(_), Some(_)) => {
                return Err(invalid("latitude", "latitude is from -90 to 90 and longitude from -180 to 180".into()));
            }
            (None, Some(_)) => return Err(invalid("latitude", "is needed with longitude".into())),
            (Some(_), None) => return Err(invalid("longitude", "is needed with latitude".into())),
        };
        let sampling_design = self.sampling_design.clone().unwrap_or_else(|| "opportunistic".to_owned());
        if !camtrap::SAMPLING_DESIGNS.contains(&sampling_design.as_str()) {
            let text = reefline_schemas::rules::truncate(&sampling_design, 32);
            let message = format!("`{text}` is not one of {}", camtrap::SAMPLING_DESIGNS.join(", "));
            return Err(invalid("sampling_design", message));
        }
        Ok(Some(camtrap::Options { utc_offset, coordinates, sampling_design }))
    }
}

/// The filters as SQL over `results`, binding `$2` to `$6` (`$6`: the caller's tenant, or none for
/// an admin: a record produced straight to Kafka under another tenant's batch id is not theirs).
const FILTERS: &str = "($2::text IS NULL OR status = $2)
    AND ($3::bool IS NULL OR (marine_group IS NOT NULL) = $3)
    AND ($4::text IS NULL OR marine_group = $4)
    AND ($5::float8 IS NULL OR (predictions->0->>'score')::float8 >= $5)
    AND ($6::text IS NULL OR tenant = $6)";

/// Every result of a feed, in line order.
#[utoipa::path(get, path = "/v1/feeds/{feed_id}/results", params(("feed_id" = String, Path, description = "A feed id"), ExportQuery), responses(
    (status = 200, description = "The results, streamed: CSV (one row per image: url, line, the feed's metadata columns, status, error, top-5 labels, indices and scores, marine group, model, times), NDJSON (one result per line), the MegaDetector or COCO Camera Traps JSON, or a Camtrap DP ZIP",
        content((String = "text/csv"), (String = "application/x-ndjson"), (String = "application/json"), (String = "application/zip"))),
    (status = 400, description = "invalid_field: a filter or format that is not one", body = reefline_schemas::view::ErrorBody),
    (status = 401, description = "A key is required and none or a wrong one was sent", body = reefline_schemas::view::ErrorBody),
    (status = 404, description = "not_found: no such feed", body = reefline_schemas::view::ErrorBody),
    (status = 422, description = "missing_fields: format=camtrap-dp, and a field the package requires cannot be filled; `missing` names the columns or options that would fill it", body = reefline_schemas::view::ErrorBody),
    (status = 429, description = "too_many_exports: the tenant runs EXPORTS_PER_TENANT exports already; Retry-After", body = reefline_schemas::view::ErrorBody),
    (status = 503, description = "database_unavailable", body = reefline_schemas::view::ErrorBody),
))]
pub async fn feed_results(
    State(exports): State<Exports>,
    caller: Caller,
    Path(feed_id): Path<String>,
    query: Result<Query<ExportQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let filters = crate::api::query(query)?.check()?;
    let running = exports.start(caller)?;
    let scope = running.caller.scope().map(str::to_owned);
    // Another tenant's feed answers as an unknown one; a feed's results are its tenant's.
    let columns = crate::feeds::columns(&exports.pool, &feed_id, scope.as_deref())
        .await?
        .ok_or_else(|| ApiError::UnknownFeed(feed_id.clone()))?;
    // Each line once, its latest result; the filters apply to that result.
    let latest = crate::feeds::latest_per_line("$1", "(SELECT tenant FROM feeds WHERE feed_id = $1)");
    let selection = Selection {
        sql: format!("SELECT {COLUMNS} FROM ({latest}) latest WHERE {FILTERS} ORDER BY line"),
        arguments: filters.arguments(&feed_id, scope)?,
        what: "feed",
        deployment: Some(feed_id.clone()),
        id: feed_id,
        columns,
    };
    stream(exports.clone(), selection, filters, running).await
}

/// Every result of a batch, in submission order.
#[utoipa::path(get, path = "/v1/batches/{batch_id}/results", params(("batch_id" = String, Path, description = "A batch id"), ExportQuery), responses(
    (status = 200, description = "The results, streamed in the format asked for (as for a feed)",
        content((String = "text/csv"), (String = "application/x-ndjson"), (String = "application/json"), (String = "application/zip"))),
    (status = 400, description = "invalid_field: a filter or format that is not one", body = reefline_schemas::view::ErrorBody),
    (status = 401, description = "A key is required and none or a wrong one was sent", body = reefline_schemas::view::ErrorBody),
    (status = 404, description = "not_found: no such batch", body = reefline_schemas::view::ErrorBody),
    (status = 422, description = "missing_fields: format=camtrap-dp, and a field the package requires cannot be filled", body = reefline_schemas::view::ErrorBody),
    (status = 429, description = "too_many_exports: the tenant runs EXPORTS_PER_TENANT exports already; Retry-After", body = reefline_schemas::view::ErrorBody),
    (status = 503, description = "database_unavailable", body = reefline_schemas::view::ErrorBody),
))]
pub async fn batch_results(
    State(exports): State<Exports>,
    caller: Caller,
    Path(batch_id): Path<String>,
    query: Result<Query<ExportQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let filters = crate::api::query(query)?.check()?;
    let running = exports.start(caller)?;
    let scope = running.caller.scope().map(str::to_owned);
    // Another tenant's batch answers as an unknown one; a batch's results are its tenant's.
    let known: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM batches WHERE batch_id = $1 AND kind <> 'feed' AND ($2::text IS NULL OR tenant = $2))
             OR EXISTS (SELECT 1 FROM results WHERE batch_id = $1 AND ($2::text IS NULL OR tenant = $2))",
    )
    .bind(&batch_id)
    .bind(&scope)
    .fetch_one(&exports.pool)
    .await?;
    if !known {
        return Err(ApiError::UnknownBatch(batch_id));
    }
    let columns: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT k FROM results, jsonb_object_keys(COALESCE(metadata, '{}')) AS k
         WHERE batch_id = $1 AND ($2::text IS NULL OR tenant = $2) ORDER BY k",
    )
    .bind(&batch_id)
    .bind(&scope)
    .fetch_all(&exports.pool)
    .await?;
    let selection = Selection {
        sql: format!("SELECT {COLUMNS} FROM results WHERE batch_id = $1 AND {FILTERS} ORDER BY batch_index"),
        arguments: filters.arguments(&batch_id, scope)?,
        what: "batch",
        deployment: Some(batch_id.clone()),
        id: batch_id,
        columns,
    };
    stream(exports.clone(), selection, filters, running).await
}

/// Which results an export reads, and what they are of.
pub(crate) struct Selection {
    /// The query, and what it binds.
    pub sql: String,
    pub arguments: PgArguments,
    /// `feed`, `batch` or `search`, and its id (a search's: `results`).
    pub what: &'static str,
    pub id: String,
    /// The Camtrap DP deployment of images that name none: the feed's or batch's id; none in a
    /// search, where each image's own feed or batch is.
    pub deployment: Option<String>,
    /// The metadata keys, the CSV's columns.
    pub columns: Vec<String>,
}

/// Adds `value` to `arguments`.
pub(crate) fn bind<'q, T>(arguments: &mut PgArguments, value: T) -> Result<(), ApiError>
where
    T: 'q + sqlx::Encode<'q, sqlx::Postgres> + sqlx::Type<sqlx::Postgres>,
{
    use sqlx::Arguments as _;
    arguments.add(value).map_err(|e| ApiError::Database(sqlx::Error::Encode(e)))
}

impl Filters {
    /// Whether the export is a CSV, whose columns are the results' metadata keys.
    pub(crate) fn has_columns(&self) -> bool {
        self.format == Format::Csv
    }

    /// `$1` (the feed's or batch's id) to `$6` of [`FILTERS`].
    fn arguments(&self, id: &str, scope: Option<String>) -> Result<PgArguments, ApiError> {
        let mut arguments = PgArguments::default();
        bind(&mut arguments, id.to_owned())?;
        bind(&mut arguments, self.status.clone())?;
        bind(&mut arguments, self.marine)?;
        bind(&mut arguments, self.group.clone())?;
        bind(&mut arguments, self.min_score)?;
        bind(&mut arguments, scope)?;
        Ok(arguments)
    }
}

/// How many encoded bytes are sent to the client at a time.
const PIECE: usize = 64 * 1024;

/// An export under way: its query on a connection of its own, and the channel to its client.
struct Export {
    connection: sqlx::pool::PoolConnection<sqlx::Postgres>,
    /// The query, and what it binds (each pass binds the same).
    sql: String,
    arguments: PgArguments,
    tx: tokio::sync::mpsc::Sender<std::io::Result<Bytes>>,
    /// Longest the client may take to read a piece.
    idle: std::time::Duration,
}

/// Sends a piece; false when the client went away or did not take it within `idle`, which ends
/// the export: its connection and snapshot are released rather than held by a client that
/// stopped reading.
async fn send(
    tx: &tokio::sync::mpsc::Sender<std::io::Result<Bytes>>,
    idle: std::time::Duration,
    piece: std::io::Result<Bytes>,
) -> bool {
    let sent = matches!(tokio::time::timeout(idle, tx.send(piece)).await, Ok(Ok(())));
    if !sent {
        tracing::info!(idle_s = idle.as_secs(), "an export's client went away or stopped reading; ended");
    }
    sent
}

impl Export {
    /// Reads every result once, in order, giving each to `each`, which answers with a piece to
    /// send now, if any. False when the client went away or stopped reading; an error when the
    /// read or `each` failed.
    async fn pass(
        &mut self,
        mut each: impl FnMut(ClassificationResult) -> std::io::Result<Option<Bytes>>,
    ) -> std::io::Result<bool> {
        let mut rows = sqlx::query_as_with::<_, Row, _>(&self.sql, self.arguments.clone()).fetch(&mut *self.connection);
        loop {
            // A client that hangs up ends the export at once, not at its next piece (a selective
            // filter may read long between pieces).
            let row = tokio::select! {
                row = rows.next() => row,
                () = self.tx.closed() => return Ok(false),
            };
            let Some(row) = row else { return Ok(true) };
            if let Some(piece) = each(row.map_err(std::io::Error::other)?.into_result())?
                && !send(&self.tx, self.idle, Ok(piece)).await
            {
                return Ok(false);
            }
        }
    }

    /// A pass while the response is under way: a failure is sent to the client (which sees the
    /// body cut off) and ends the export.
    async fn read(&mut self, each: impl FnMut(ClassificationResult) -> std::io::Result<Option<Bytes>>) -> bool {
        match self.pass(each).await {
            Ok(read) => read,
            Err(e) => self.fail(e).await,
        }
    }

    async fn fail(&self, e: std::io::Error) -> bool {
        tracing::warn!(error = %e, "an export failed half-way");
        send(&self.tx, self.idle, Err(e)).await;
        false
    }

    /// Runs `sql` inside a transaction; false (the error sent) if it failed.
    async fn execute(&mut self, sql: &str) -> bool {
        match sqlx::query(sql).execute(&mut *self.connection).await {
            Ok(_) => true,
            Err(e) => self.fail(std::io::Error::other(e)).await,
        }
    }

    /// Every pass of `encoder`, then its end.
    async fn encode(&mut self, mut encoder: Box<dyn Encode>) -> bool {
        let passes = encoder.passes();
        for pass in 0..passes {
            if pass > 0 {
                encoder.next_pass();
            }
            let each = |result| {
                encoder.push(result);
                Ok((encoder.buffered() >= PIECE).then(|| encoder.take()))
            };
            if !self.read(each).await {
                return false;
            }
        }
        if passes > 1 && !self.execute("COMMIT").await {
            return false;
        }
        encoder.finish();
        send(&self.tx, self.idle, Ok(encoder.take())).await
    }

    /// The Camtrap DP package whose check pass gave `plan`: its head, the media and the
    /// observations, each read in a pass of its own.
    async fn camtrap(&mut self, plan: camtrap::Plan) -> bool {
        let out = camtrap::Shared::default();
        let mut archive = camtrap::Archive::new(out.clone());
        if let Err(e) = archive.write_head(&plan) {
            return self.fail(e).await;
        }
        for part in [camtrap::Part::Media, camtrap::Part::Observations] {
            let mut table = match archive.open(part) {
                Ok(table) => table,
                Err(e) => return self.fail(e).await,
            };
            let each = |r: ClassificationResult| {
                plan.write(part, &mut table, &r)?;
                Ok(out.take_at(PIECE))
            };
            if !self.read(each).await {
                return false;
            }
            if let Err(e) = camtrap::Archive::end_table(table) {
                return self.fail(e).await;
            }
        }
        if let Err(e) = archive.finish() {
            return self.fail(e).await;
        }
        if !self.execute("COMMIT").await {
            return false;
        }
        send(&self.tx, self.idle, Ok(out.take_at(0).unwrap_or_default())).await
    }
}

/// What an export writes: an encoder's format, or a Camtrap DP package (checked before it is answered).
enum Output {
    Encoded(Box<dyn Encode>),
    Camtrap(camtrap::Options),
}

/// Starts the query on a connection of its own and answers with its rows as they come.
pub(crate) async fn stream(
    exports: Exports,
    selection: Selection,
    filters: Filters,
    running: Running,
) -> Result<Response, ApiError> {
    let connection = exports.pool.acquire().await?;
    let format = filters.format;
    let Selection { sql, arguments, what, id, deployment, columns } = selection;
    let output = match filters.camtrap.clone() {
        Some(options) => Output::Camtrap(options),
        None => Output::Encoded(match format {
            Format::Csv => Box::new(table::Table::new(columns)),
            Format::Ndjson => Box::new(Lines::default()),
            Format::MegaDetector => {
                Box::new(megadetector::Batch::new(exports.labels.clone(), filters.relative_to.clone()))
            }
            Format::Coco => Box::new(coco::Coco::new(exports.labels.clone(), format!("{what} {id}"))),
            Format::CamtrapDp => unreachable!("camtrap-dp's options are checked with its format"),
        }),
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(4);
    let mut export = Export { connection, sql, arguments, tx, idle: exports.idle };
    // A Camtrap DP package is checked whole before anything is answered (a field it requires that
    // cannot be filled is a 422 naming it, never an invalid package): the task says when.
    let (decided, decision) = tokio::sync::oneshot::channel::<Result<(), ApiError>>();
    let waits = matches!(output, Output::Camtrap(_));
    tokio::spawn(async move {
        // Counted against its tenant until the task ends.
        let _running = running;
        let mut decided = Some(decided);
        let mut decide = |result| {
            if let Some(decided) = decided.take() {
                let _ = decided.send(result);
            }
        };
        let work = async {
            // Every pass reads the same results: one snapshot for them all.
            let passes = match &output {
                Output::Encoded(encoder) => encoder.passes(),
                Output::Camtrap(_) => 3,
            };
            if passes > 1
                && let Err(e) = sqlx::query("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                    .execute(&mut *export.connection)
                    .await
            {
                decide(Err(ApiError::Database(e)));
                return false;
            }
            let options = match output {
                Output::Encoded(encoder) => return export.encode(encoder).await,
                Output::Camtrap(options) => options,
            };
            let mut plan = camtrap::Plan::new(options, what, id, deployment);
            let read = export.pass(|r| {
                plan.check(&r);
                Ok(None)
            });
            match read.await {
                Ok(true) => {}
                // The client went away while the results were checked.
                Ok(false) => return false,
                Err(e) => {
                    decide(Err(ApiError::Database(sqlx::Error::Io(e))));
                    return false;
                }
            }
            if let Some(refusal) = plan.refusal() {
                decide(Err(ApiError::Unexportable { missing: refusal.missing, message: refusal.message }));
                return sqlx::query("ROLLBACK").execute(&mut *export.connection).await.is_ok();
            }
            decide(Ok(()));
            export.camtrap(plan).await
        };
        let finished = std::panic::AssertUnwindSafe(work)
            .catch_unwind()
            .await
            // A panic mid-way must not hand the connection back inside its read-only snapshot.
            .unwrap_or(false);
        if !finished {
            // Closing the socket of a query cut off mid-way ends it in Postgres at once, with its
            // snapshot; returned to the pool, it would go on until its rows were drained (or sit
            // inside its transaction).
            drop(export.connection.detach());
        }
    });
    if waits {
        // A client that hangs up meanwhile drops this wait, and the task sees the body's channel close.
        decision.await.map_err(|_| ApiError::Database(sqlx::Error::PoolClosed))??;
    }
    let body = Body::from_stream(futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|c| (c, rx)) }));
    let (content_type, extension) = match format {
        Format::Csv => ("text/csv; charset=utf-8", "csv"),
        Format::Ndjson => ("application/x-ndjson", "ndjson"),
        Format::MegaDetector | Format::Coco => ("application/json", "json"),
        Format::CamtrapDp => ("application/zip", "zip"),
    };
    let disposition = format!("attachment; filename=\"reefline-{what}-results.{extension}\"");
    Ok(([(header::CONTENT_TYPE, content_type.to_owned()), (header::CONTENT_DISPOSITION, disposition)], body)
        .into_response())
}
