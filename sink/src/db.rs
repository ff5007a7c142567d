//! The results table: migrations, the idempotent upsert, and the lookups.

use chrono::{DateTime, Utc};
use reefline_schemas::{ClassificationResult, ImageRequest, Prediction};
use sqlx::migrate::MigrateDatabase;
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::types::Json;

/// Connects (creating the database if it does not exist) and applies the migrations.
pub async fn connect(url: &str) -> anyhow::Result<PgPool> {
    if !sqlx::Postgres::database_exists(url).await? {
        sqlx::Postgres::create_database(url).await?;
    }
    let pool = PgPoolOptions::new().max_connections(8).connect(url).await?;
    sqlx::migrate!("./migrations").run(&pool).await?;
    Ok(pool)
}

/// Writes `results` in one transaction. Redelivered or repeated results are harmless: a row is
/// replaced only by a result completed no earlier than the one it holds.
pub async fn upsert(pool: &PgPool, results: &[ClassificationResult]) -> sqlx::Result<()> {
    let mut tx = pool.begin().await?;
    for r in results {
        sqlx::query(
            "INSERT INTO results (request_id, batch_id, batch_index, batch_size, url, status, predictions, marine_group,
                                  model_name, model_version, error_kind, error_message, submitted_at, completed_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, to_timestamp($13 / 1000.0), to_timestamp($14 / 1000.0))
             ON CONFLICT (request_id) DO UPDATE SET
                 status = EXCLUDED.status, predictions = EXCLUDED.predictions, marine_group = EXCLUDED.marine_group,
                 model_name = EXCLUDED.model_name, model_version = EXCLUDED.model_version, error_kind = EXCLUDED.error_kind,
                 error_message = EXCLUDED.error_message, completed_at = EXCLUDED.completed_at, stored_at = now()
             WHERE results.completed_at <= EXCLUDED.completed_at",
        )
        .bind(&r.request_id)
        .bind(&r.batch_id)
        .bind(r.batch_index)
        .bind(r.batch_size)
        .bind(&r.url)
        .bind(r.status.as_str())
        .bind(Json(&r.predictions))
        .bind(&r.marine_group)
        .bind(&r.model_name)
        .bind(&r.model_version)
        .bind(&r.error_kind)
        .bind(&r.error_message)
        .bind(r.submitted_at_ms as f64)
        .bind(r.completed_at_ms as f64)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await
}

/// Records `requests` as seen, in one transaction; a request seen before is left as it is.
pub async fn insert_requests(pool: &PgPool, requests: &[ImageRequest]) -> sqlx::Result<()> {
    let mut tx = pool.begin().await?;
    for r in requests {
        sqlx::query(
            "INSERT INTO requests (request_id, batch_id, batch_index, batch_size, url, submitted_at)
             VALUES ($1, $2, $3, $4, $5, to_timestamp($6 / 1000.0))
             ON CONFLICT (request_id) DO NOTHING",
        )
        .bind(&r.request_id)
        .bind(&r.batch_id)
        .bind(r.batch_index)
        .bind(r.batch_size)
        .bind(&r.url)
        .bind(r.submitted_at_ms as f64)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await
}

/// A request with no result yet.
#[derive(Debug, sqlx::FromRow)]
pub struct Pending {
    pub request_id: String,
    pub batch_id: String,
    pub batch_index: i32,
    pub url: String,
    pub submitted_at: DateTime<Utc>,
}

pub async fn pending(pool: &PgPool, request_id: &str) -> sqlx::Result<Option<Pending>> {
    sqlx::query_as("SELECT request_id, batch_id, batch_index, url, submitted_at FROM requests WHERE request_id = $1")
        .bind(request_id)
        .fetch_optional(pool)
        .await
}

/// The number of images in a batch, from any of its requests seen.
pub async fn batch_size(pool: &PgPool, batch_id: &str) -> sqlx::Result<Option<i32>> {
    sqlx::query_scalar("SELECT batch_size FROM requests WHERE batch_id = $1 LIMIT 1")
        .bind(batch_id)
        .fetch_optional(pool)
        .await
}

/// A stored result, as the lookup API returns it.
#[derive(Debug, sqlx::FromRow)]
pub struct Row {
    pub request_id: String,
    pub batch_id: String,
    pub batch_index: i32,
    pub batch_size: i32,
    pub url: String,
    pub status: String,
    pub predictions: Json<Vec<Prediction>>,
    pub marine_group: Option<String>,
    pub model_name: String,
    pub model_version: String,
    pub error_kind: Option<String>,
    pub error_message: Option<String>,
    pub submitted_at: DateTime<Utc>,
    pub completed_at: DateTime<Utc>,
}

const COLUMNS: &str =
    "request_id, batch_id, batch_index, batch_size, url, status, predictions, marine_group, model_name,
                       model_version, error_kind, error_message, submitted_at, completed_at";

pub async fn result(pool: &PgPool, request_id: &str) -> sqlx::Result<Option<Row>> {
    sqlx::query_as(&format!("SELECT {COLUMNS} FROM results WHERE request_id = $1"))
        .bind(request_id)
        .fetch_optional(pool)
        .await
}

pub async fn batch(pool: &PgPool, batch_id: &str) -> sqlx::Result<Vec<Row>> {
    sqlx::query_as(&format!("SELECT {COLUMNS} FROM results WHERE batch_id = $1 ORDER BY batch_index"))
        .bind(batch_id)
        .fetch_all(pool)
        .await
}
