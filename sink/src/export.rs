//! Exports: every result of a feed (`GET /v1/feeds/{id}/results`) or a batch
//! (`GET /v1/batches/{id}/results`) as CSV or NDJSON, filtered, streamed from Postgres row by row
//! as the client reads (constant memory whatever the size).

use axum::body::{Body, Bytes};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use reefline_schemas::ClassificationResult;
use reefline_schemas::view::{ResultView, rfc3339};
use serde::Deserialize;
use sqlx::PgPool;

use crate::api::ApiError;
use crate::db::{COLUMNS, Row};

/// How many predictions the CSV gives columns to.
const TOP: usize = 5;

/// What to export, and which results.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ExportQuery {
    /// `csv` (the default) or `ndjson`.
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
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    Csv,
    Ndjson,
}

/// The checked query.
struct Filters {
    format: Format,
    status: Option<String>,
    marine: Option<bool>,
    group: Option<String>,
    min_score: Option<f64>,
}

impl ExportQuery {
    fn check(self) -> Result<Filters, ApiError> {
        let format = match self.format.as_deref().unwrap_or("csv") {
            "csv" => Format::Csv,
            "ndjson" => Format::Ndjson,
            other => {
                let message = format!("`{}` is not one of csv, ndjson", reefline_schemas::rules::truncate(other, 32));
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
        Ok(Filters { format, status: self.status, marine: self.marine, group: self.group, min_score: self.min_score })
    }
}

/// The filters as SQL over `results`, binding `$2` to `$5`.
const FILTERS: &str = "($2::text IS NULL OR status = $2)
    AND ($3::bool IS NULL OR (marine_group IS NOT NULL) = $3)
    AND ($4::text IS NULL OR marine_group = $4)
    AND ($5::float8 IS NULL OR (predictions->0->>'score')::float8 >= $5)";

/// Every result of a feed, in line order.
#[utoipa::path(get, path = "/v1/feeds/{feed_id}/results", params(("feed_id" = String, Path, description = "A feed id"), ExportQuery), responses(
    (status = 200, description = "The results, streamed: CSV (one row per image: url, line, the feed's metadata columns, status, error, top-5 labels, indices and scores, marine group, model, times) or NDJSON (one result per line)",
        content((String = "text/csv"), (String = "application/x-ndjson"))),
    (status = 400, description = "invalid_field: a filter or format that is not one", body = reefline_schemas::view::ErrorBody),
    (status = 401, description = "A key is required and none or a wrong one was sent", body = reefline_schemas::view::ErrorBody),
    (status = 404, description = "not_found: no such feed", body = reefline_schemas::view::ErrorBody),
    (status = 503, description = "database_unavailable", body = reefline_schemas::view::ErrorBody),
))]
pub async fn feed_results(
    State(pool): State<PgPool>,
    Path(feed_id): Path<String>,
    query: Result<Query<ExportQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let filters = crate::api::query(query)?.check()?;
    let columns =
        crate::feeds::columns(&pool, &feed_id).await?.ok_or_else(|| ApiError::UnknownFeed(feed_id.clone()))?;
    let sql = format!("SELECT {COLUMNS} FROM results WHERE feed_id = $1 AND {FILTERS} ORDER BY line");
    stream(pool, sql, feed_id, filters, columns, "feed").await
}

/// Every result of a batch, in submission order.
#[utoipa::path(get, path = "/v1/batches/{batch_id}/results", params(("batch_id" = String, Path, description = "A batch id"), ExportQuery), responses(
    (status = 200, description = "The results, streamed as CSV or NDJSON (as for a feed)",
        content((String = "text/csv"), (String = "application/x-ndjson"))),
    (status = 400, description = "invalid_field: a filter or format that is not one", body = reefline_schemas::view::ErrorBody),
    (status = 401, description = "A key is required and none or a wrong one was sent", body = reefline_schemas::view::ErrorBody),
    (status = 404, description = "not_found: no such batch", body = reefline_schemas::view::ErrorBody),
    (status = 503, description = "database_unavailable", body = reefline_schemas::view::ErrorBody),
))]
pub async fn batch_results(
    State(pool): State<PgPool>,
    Path(batch_id): Path<String>,
    query: Result<Query<ExportQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let filters = crate::api::query(query)?.check()?;
    let known: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM batches WHERE batch_id = $1) OR EXISTS (SELECT 1 FROM results WHERE batch_id = $1)",
    )
    .bind(&batch_id)
    .fetch_one(&pool)
    .await?;
    if !known {
        return Err(ApiError::UnknownBatch(batch_id));
    }
    let columns: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT k FROM results, jsonb_object_keys(COALESCE(metadata, '{}')) AS k WHERE batch_id = $1 ORDER BY k",
    )
    .bind(&batch_id)
    .fetch_all(&pool)
    .await?;
    let sql = format!("SELECT {COLUMNS} FROM results WHERE batch_id = $1 AND {FILTERS} ORDER BY batch_index");
    stream(pool, sql, batch_id, filters, columns, "batch").await
}

/// Starts the query on a connection of its own and answers with its rows as they come.
async fn stream(
    pool: PgPool,
    sql: String,
    id: String,
    filters: Filters,
    columns: Vec<String>,
    what: &str,
) -> Result<Response, ApiError> {
    let mut connection = pool.acquire().await?;
    let format = filters.format;
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(4);
    tokio::spawn(async move {
        let mut encoder = Encoder::new(format, columns);
        let mut rows = sqlx::query_as::<_, Row>(&sql)
            .bind(&id)
            .bind(&filters.status)
            .bind(filters.marine)
            .bind(&filters.group)
            .bind(filters.min_score)
            .fetch(&mut *connection);
        while let Some(row) = rows.next().await {
            let row = match row {
                Ok(row) => row,
                Err(e) => {
                    tracing::warn!(error = %e, "an export failed half-way");
                    let _ = tx.send(Err(std::io::Error::other(e))).await;
                    return;
                }
            };
            encoder.push(row.into_result());
            if encoder.buffered() >= 64 * 1024 && tx.send(Ok(encoder.take())).await.is_err() {
                return; // The client went away.
            }
        }
        let _ = tx.send(Ok(encoder.take())).await;
    });
    let body = Body::from_stream(futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|c| (c, rx)) }));
    let (content_type, extension) = match format {
        Format::Csv => ("text/csv; charset=utf-8", "csv"),
        Format::Ndjson => ("application/x-ndjson", "ndjson"),
    };
    let disposition = format!("attachment; filename=\"reefline-{what}-results.{extension}\"");
    Ok(([(header::CONTENT_TYPE, content_type.to_owned()), (header::CONTENT_DISPOSITION, disposition)], body)
        .into_response())
}

/// Turns results into the export's bytes.
struct Encoder {
    format: Format,
    csv: csv::Writer<Vec<u8>>,
    ndjson: Vec<u8>,
    /// The metadata columns, by their keys.
    columns: Vec<String>,
}

/// What the photo says of itself, as CSV columns.
const EXIF: [&str; 8] =
    ["taken_at", "gps_latitude", "gps_longitude", "gps_altitude", "camera_make", "camera_model", "width", "height"];

/// The CSV's columns before the metadata, and after it.
const LEADING: [&str; 2] = ["url", "line"];

fn trailing() -> Vec<String> {
    let mut names: Vec<String> = ["status", "error_kind", "error_message"].map(String::from).to_vec();
    for n in 1..=TOP {
        names.extend([format!("top{n}_label"), format!("top{n}_index"), format!("top{n}_score")]);
        if n == 1 {
            names.extend(["marine", "marine_group", "scientific_name"].map(String::from));
        }
    }
    names.extend(EXIF.map(String::from));
    names.extend(
        [
            "sha256",
            "cached",
            "model",
            "model_version",
            "submitted_at",
            "completed_at",
            "request_id",
            "batch_id",
            "feed_id",
        ]
        .map(String::from),
    );
    names
}

impl Encoder {
    fn new(format: Format, columns: Vec<String>) -> Self {
        let mut encoder = Self { format, csv: csv::Writer::from_writer(Vec::new()), ndjson: Vec::new(), columns };
        if format == Format::Csv {
            let fixed = trailing();
            // A metadata column named like one of ours is shown as `meta_<name>`.
            let shown = encoder.columns.iter().map(|c| {
                if LEADING.contains(&c.as_str()) || fixed.contains(c) { format!("meta_{c}") } else { c.clone() }
            });
            let shown: Vec<String> = shown.collect();
            let header: Vec<String> = LEADING.map(String::from).into_iter().chain(shown).chain(fixed).collect();
            let _ = encoder.csv.write_record(&header);
        }
        encoder
    }

    fn push(&mut self, result: ClassificationResult) {
        match self.format {
            Format::Ndjson => {
                let _ = serde_json::to_writer(&mut self.ndjson, &ResultView::from(result));
                self.ndjson.push(b'\n');
            }
            Format::Csv => {
                let _ = self.csv.write_record(self.row(result));
            }
        }
    }

    fn row(&self, r: ClassificationResult) -> Vec<String> {
        let metadata = r.metadata.unwrap_or_default();
        let mut row = vec![r.url, r.line.map(|l| l.to_string()).unwrap_or_default()];
        row.extend(self.columns.iter().map(|c| metadata.get(c).cloned().unwrap_or_default()));
        row.extend([
            r.status.as_str().to_owned(),
            r.error_kind.unwrap_or_default(),
            r.error_message.unwrap_or_default(),
        ]);
        for n in 0..TOP {
            let p = r.predictions.get(n);
            row.extend([
                p.map(|p| p.label.clone()).unwrap_or_default(),
                p.map(|p| p.index.to_string()).unwrap_or_default(),
                p.map(|p| format!("{:.6}", p.score)).unwrap_or_default(),
            ]);
            if n == 0 {
                let marine = if r.status == reefline_schemas::Status::Ok {
                    r.marine_group.is_some().to_string()
                } else {
                    String::new()
                };
                let scientific = p.and_then(|p| p.scientific_name.clone()).unwrap_or_default();
                row.extend([marine, r.marine_group.clone().unwrap_or_default(), scientific]);
            }
        }
        let exif = r.exif.unwrap_or_default();
        let number = |v: Option<f64>| v.map(|v| v.to_string()).unwrap_or_default();
        row.extend([
            exif.taken_at.unwrap_or_default(),
            number(exif.gps_latitude),
            number(exif.gps_longitude),
            number(exif.gps_altitude),
            exif.camera_make.unwrap_or_default(),
            exif.camera_model.unwrap_or_default(),
            exif.width.map(|v| v.to_string()).unwrap_or_default(),
            exif.height.map(|v| v.to_string()).unwrap_or_default(),
            r.sha256.unwrap_or_default(),
            r.cached.to_string(),
            r.model_name,
            r.model_version,
            rfc3339(r.submitted_at_ms),
            rfc3339(r.completed_at_ms),
            r.request_id,
            r.batch_id,
            r.feed_id.unwrap_or_default(),
        ]);
        row
    }

    fn buffered(&self) -> usize {
        self.ndjson.len() + self.csv.get_ref().len()
    }

    /// What is encoded so far.
    fn take(&mut self) -> Bytes {
        match self.format {
            Format::Ndjson => Bytes::from(std::mem::take(&mut self.ndjson)),
            Format::Csv => {
                let full = std::mem::replace(&mut self.csv, csv::Writer::from_writer(Vec::new()));
                Bytes::from(full.into_inner().unwrap_or_default())
            }
        }
    }
}
