//! `GET /v1/results`: results across batches and feeds, filtered by label, marine group, score,
//! status, time, batch or feed, newest last, a page at a time (keyset pagination: a page is found
//! through the index whatever its depth); `GET /v1/results/export`: every result the same filters
//! find, streamed in any export format. A key sees its own tenant's results only.

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use chrono::{DateTime, Utc};
use reefline_schemas::view::ResultView;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use sqlx::postgres::PgArguments;

use crate::error::ApiError;
use crate::export::{Exports, bind};
use reefline_store::sink::{COLUMNS, Row};

/// Which results, and which page.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)] // a misspelt filter is refused, not silently left out
pub struct SearchQuery {
    /// The top class's label, any case (`great white shark`).
    label: Option<String>,
    /// The marine group of the top class (`shark`, `ray`, `bony_fish`, ...).
    group: Option<String>,
    /// Only images whose top class is (`true`) or is not (`false`) a marine animal.
    marine: Option<bool>,
    /// The top class's score at least this, 0 to 1.
    #[param(minimum = 0.0, maximum = 1.0)]
    min_score: Option<f64>,
    /// `ok` or `error`.
    status: Option<String>,
    /// Completed at or after this time (RFC 3339).
    since: Option<String>,
    /// Completed before this time (RFC 3339).
    until: Option<String>,
    /// Only this batch's results.
    batch: Option<String>,
    /// Only this feed's results.
    feed: Option<String>,
    /// Results per page, 1 to 1,000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<i64>,
    /// The `next` of the page before.
    after: Option<String>,
}

/// A page of results, in completion order.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ResultsPage {
    pub results: Vec<ResultView>,
    /// Pass as `after` for the next page; `null` on the last.
    pub next: Option<String>,
}

/// The filters, checked: `$1` to `$9` of [`WHERE`].
struct Filters {
    label: Option<String>,
    group: Option<String>,
    marine: Option<bool>,
    min_score: Option<f64>,
    status: Option<String>,
    since: Option<DateTime<Utc>>,
    until: Option<DateTime<Utc>>,
    batch: Option<String>,
    feed: Option<String>,
}

/// The results the filters find, `$10` the caller's tenant (none for an admin).
const WHERE: &str = "($1::text IS NULL OR lower(predictions->0->>'label') = lower($1))
    AND ($2::text IS NULL OR marine_group = $2)
    AND ($3::bool IS NULL OR (marine_group IS NOT NULL) = $3)
    AND ($4::float8 IS NULL OR (predictions->0->>'score')::float8 >= $4)
    AND ($5::text IS NULL OR status = $5)
    AND ($6::timestamptz IS NULL OR completed_at >= $6)
    AND ($7::timestamptz IS NULL OR completed_at < $7)
    AND ($8::text IS NULL OR batch_id = $8)
    AND ($9::text IS NULL OR feed_id = $9)
    AND ($10::text IS NULL OR tenant = $10)
    -- A feed's line once: its latest result.
    AND (feed_id IS NULL OR NOT EXISTS (
         SELECT 1 FROM results newer
         WHERE newer.feed_id = results.feed_id AND newer.line = results.line AND newer.tenant = results.tenant
           AND (newer.completed_at, newer.request_id) > (results.completed_at, results.request_id)))";

impl SearchQuery {
    fn filters(self) -> Result<Filters, ApiError> {
        crate::export::check_status_and_score(self.status.as_deref(), self.min_score)?;
        let texts = [("label", &self.label), ("group", &self.group), ("batch", &self.batch), ("feed", &self.feed)];
        if let Some((field, _)) = texts.iter().find(|(_, v)| v.as_deref().is_some_and(|v| v.contains('\0'))) {
            return Err(invalid(field, "holds a NUL character, which no stored value has".into()));
        }
        Ok(Filters {
            since: time("since", self.since.as_deref())?,
            until: time("until", self.until.as_deref())?,
            label: self.label,
            group: self.group,
            marine: self.marine,
            min_score: self.min_score,
            status: self.status,
            batch: self.batch,
            feed: self.feed,
        })
    }
}

impl Filters {
    /// `$1` to `$10` of [`WHERE`].
    fn arguments(self, scope: Option<&str>) -> Result<PgArguments, ApiError> {
        let mut arguments = PgArguments::default();
        bind(&mut arguments, self.label)?;
        bind(&mut arguments, self.group)?;
        bind(&mut arguments, self.marine)?;
        bind(&mut arguments, self.min_score)?;
        bind(&mut arguments, self.status)?;
        bind(&mut arguments, self.since)?;
        bind(&mut arguments, self.until)?;
        bind(&mut arguments, self.batch)?;
        bind(&mut arguments, self.feed)?;
        bind(&mut arguments, scope.map(str::to_owned))?;
        Ok(arguments)
    }
}

fn invalid(field: &'static str, message: String) -> ApiError {
    ApiError::InvalidField { field, message }
}

fn time(field: &'static str, value: Option<&str>) -> Result<Option<DateTime<Utc>>, ApiError> {
    value
        .map(|v| {
            DateTime::parse_from_rfc3339(v)
                .map(|t| t.with_timezone(&Utc))
                .map_err(|e| invalid(field, format!("not an RFC 3339 time: {e}")))
        })
        .transpose()
}

/// The position a page ends at: the last result's completion (to the microsecond, as Postgres
/// keeps it) and request id.
fn cursor(after: Option<&str>) -> Result<Option<(DateTime<Utc>, String)>, ApiError> {
    let bad = || invalid("after", "not a page token (use the `next` of the page before)".into());
    after
        .map(|token| {
            let (micros, id) = token.split_once('_').ok_or_else(bad)?;
            let at = micros.parse().ok().and_then(DateTime::from_timestamp_micros).ok_or_else(bad)?;
            Ok((at, id.to_owned()))
        })
        .transpose()
}

/// Results across batches and feeds, filtered, in completion order, a page at a time.
#[utoipa::path(get, path = "/v1/results", params(SearchQuery), responses(
    (status = 200, description = "A page of results", body = ResultsPage),
    (status = 400, description = "invalid_field: a filter, limit or page token that is not one", body = reefline_schemas::view::ErrorBody),
    (status = 401, description = "A key is required and none or a wrong one was sent", body = reefline_schemas::view::ErrorBody),
    (status = 503, description = "database_unavailable", body = reefline_schemas::view::ErrorBody),
))]
pub async fn search(
    State(pool): State<PgPool>,
    caller: reefline_common::auth::Caller,
    query: Result<Query<SearchQuery>, QueryRejection>,
) -> Result<Json<ResultsPage>, ApiError> {
    let mut q = crate::error::query(query)?;
    let limit = crate::error::page_limit(q.limit)?;
    let after = cursor(q.after.take().as_deref().filter(|a| !a.is_empty()))?;
    let mut arguments = q.filters()?.arguments(caller.scope())?;
    bind(&mut arguments, after.as_ref().map(|(at, _)| *at))?;
    bind(&mut arguments, after.map_or_else(String::new, |(_, id)| id))?;
    bind(&mut arguments, limit + 1)?;
    let sql = format!(
        "SELECT {COLUMNS} FROM results
         WHERE {WHERE} AND ($11::timestamptz IS NULL OR (completed_at, request_id) > ($11, $12))
         ORDER BY completed_at, request_id
         LIMIT $13"
    );
    let mut rows: Vec<Row> = sqlx::query_as_with(&sql, arguments).fetch_all(&pool).await?;
    let next = (rows.len() as i64 > limit).then(|| {
        rows.truncate(limit as usize);
        rows.last().map(|r| format!("{}_{}", r.completed_at.timestamp_micros(), r.request_id)).unwrap_or_default()
    });
    Ok(Json(ResultsPage { results: rows.into_iter().map(|r| ResultView::from(r.into_result())).collect(), next }))
}

/// The search's filters and an export's format: every result a search finds, in one file.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)] // a misspelt filter is refused, not silently left out
pub struct SearchExportQuery {
    /// The top class's label, any case (`great white shark`).
    label: Option<String>,
    /// The marine group of the top class (`shark`, `ray`, `bony_fish`, ...).
    group: Option<String>,
    /// Only images whose top class is (`true`) or is not (`false`) a marine animal.
    marine: Option<bool>,
    /// The top class's score at least this, 0 to 1.
    #[param(minimum = 0.0, maximum = 1.0)]
    min_score: Option<f64>,
    /// `ok` or `error`.
    status: Option<String>,
    /// Completed at or after this time (RFC 3339).
    since: Option<String>,
    /// Completed before this time (RFC 3339).
    until: Option<String>,
    /// Only this batch's results.
    batch: Option<String>,
    /// Only this feed's results.
    feed: Option<String>,
    /// `csv` (the default), `ndjson`, `megadetector`, `coco-camera-traps` or `camtrap-dp`, as for
    /// a feed's export.
    format: Option<String>,
    /// `megadetector`: a prefix of the image URLs that `file` leaves out.
    relative_to: Option<String>,
    /// `camtrap-dp`: the UTC offset of times given without one (EXIF times), e.g. `+10:00`.
    utc_offset: Option<String>,
    /// `camtrap-dp`: the latitude of deployments whose images give none.
    #[param(minimum = -90.0, maximum = 90.0)]
    latitude: Option<f64>,
    /// `camtrap-dp`: the longitude of deployments whose images give none.
    #[param(minimum = -180.0, maximum = 180.0)]
    longitude: Option<f64>,
    /// `camtrap-dp`: `project.samplingDesign` (`opportunistic` unless given).
    sampling_design: Option<String>,
}

/// Every result a search finds, in completion order, streamed in the format asked for. An image
/// that names no Camtrap DP deployment is in its feed's (or batch's).
#[utoipa::path(get, path = "/v1/results/export", params(SearchExportQuery), responses(
    (status = 200, description = "The results, streamed as for a feed's export",
        content((String = "text/csv"), (String = "application/x-ndjson"), (String = "application/json"), (String = "application/zip"))),
    (status = 400, description = "invalid_field: a filter, format or option that is not one", body = reefline_schemas::view::ErrorBody),
    (status = 401, description = "A key is required and none or a wrong one was sent", body = reefline_schemas::view::ErrorBody),
    (status = 422, description = "missing_fields: format=camtrap-dp, and a field the package requires cannot be filled", body = reefline_schemas::view::ErrorBody),
    (status = 429, description = "too_many_exports: the tenant runs EXPORTS_PER_TENANT exports already; Retry-After", body = reefline_schemas::view::ErrorBody),
    (status = 503, description = "database_unavailable", body = reefline_schemas::view::ErrorBody),
))]
pub async fn export(
    State(exports): State<Exports>,
    caller: reefline_common::auth::Caller,
    query: Result<Query<SearchExportQuery>, QueryRejection>,
) -> Result<axum::response::Response, ApiError> {
    let q = crate::error::query(query)?;
    let format = crate::export::ExportQuery::format_only(
        q.format,
        q.status.clone(),
        q.relative_to,
        q.utc_offset,
        (q.latitude, q.longitude),
        q.sampling_design,
    )
    .check()?;
    let search = SearchQuery {
        label: q.label,
        group: q.group,
        marine: q.marine,
        min_score: q.min_score,
        status: q.status,
        since: q.since,
        until: q.until,
        batch: q.batch,
        feed: q.feed,
        limit: None,
        after: None,
    };
    let arguments = search.filters()?.arguments(caller.scope())?;
    let running = exports.start(caller)?;
    let columns = crate::export::metadata_keys(&exports.pool, &format, WHERE, arguments.clone()).await?;
    let selection = crate::export::Selection {
        sql: format!("SELECT {COLUMNS} FROM results WHERE {WHERE} ORDER BY completed_at, request_id"),
        arguments,
        what: "search",
        id: "results".to_owned(),
        deployment: None,
        columns,
    };
    crate::export::stream(exports, selection, format, running).await
}
