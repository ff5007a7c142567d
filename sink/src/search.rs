//! `GET /v1/results`: results across batches and feeds, filtered by label, marine group, score,
//! status, time, batch or feed, newest last, a page at a time (keyset pagination: a page is found
//! through the index whatever its depth); a key sees its own tenant's results only.

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use chrono::{DateTime, Utc};
use reefline_schemas::view::ResultView;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

use crate::api::ApiError;
use crate::db::{COLUMNS, Row};

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
    let q = crate::api::query(query)?;
    let limit = crate::api::page_limit(q.limit)?;
    if let Some(status) = q.status.as_deref().filter(|s| !matches!(*s, "ok" | "error")) {
        return Err(invalid(
            "status",
            format!("`{}` is neither ok nor error", reefline_schemas::rules::truncate(status, 32)),
        ));
    }
    if let Some(score) = q.min_score.filter(|s| !(0.0..=1.0).contains(s)) {
        return Err(invalid("min_score", format!("{score} is not from 0 to 1")));
    }
    let (since, until) = (time("since", q.since.as_deref())?, time("until", q.until.as_deref())?);
    let after = cursor(q.after.as_deref().filter(|a| !a.is_empty()))?;
    let rows: Vec<Row> = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM results
         WHERE ($1::text IS NULL OR lower(predictions->0->>'label') = lower($1))
           AND ($2::text IS NULL OR marine_group = $2)
           AND ($3::bool IS NULL OR (marine_group IS NOT NULL) = $3)
           AND ($4::float8 IS NULL OR (predictions->0->>'score')::float8 >= $4)
           AND ($5::text IS NULL OR status = $5)
           AND ($6::timestamptz IS NULL OR completed_at >= $6)
           AND ($7::timestamptz IS NULL OR completed_at < $7)
           AND ($8::text IS NULL OR batch_id = $8)
           AND ($9::text IS NULL OR feed_id = $9)
           AND ($10::timestamptz IS NULL OR (completed_at, request_id) > ($10, $11))
           AND ($13::text IS NULL OR tenant = $13)
           -- A feed's line once: its latest result.
           AND (feed_id IS NULL OR NOT EXISTS (
                SELECT 1 FROM results newer
                WHERE newer.feed_id = results.feed_id AND newer.line = results.line AND newer.tenant = results.tenant
                  AND (newer.completed_at, newer.request_id) > (results.completed_at, results.request_id)))
         ORDER BY completed_at, request_id
         LIMIT $12"
    ))
    .bind(&q.label)
    .bind(&q.group)
    .bind(q.marine)
    .bind(q.min_score)
    .bind(&q.status)
    .bind(since)
    .bind(until)
    .bind(&q.batch)
    .bind(&q.feed)
    .bind(after.as_ref().map(|(at, _)| *at))
    .bind(after.as_ref().map_or("", |(_, id)| id.as_str()))
    .bind(limit + 1)
    .bind(caller.scope())
    .fetch_all(&pool)
    .await?;
    let mut rows = rows;
    let next = (rows.len() as i64 > limit).then(|| {
        rows.truncate(limit as usize);
        rows.last().map(|r| format!("{}_{}", r.completed_at.timestamp_micros(), r.request_id)).unwrap_or_default()
    });
    Ok(Json(ResultsPage { results: rows.into_iter().map(|r| ResultView::from(r.into_result())).collect(), next }))
}
