//! The result cache: a photo whose bytes (by SHA-256) were classified before by the same model and
//! version is not run through the model again; its stored predictions are reused. The store is the
//! sink's results table (every `ok` result carries its sha256), so the cache is shared by every
//! classifier and survives restarts: re-running a survey with a few new photos costs only those.
//! A tenant reuses only its own results (what another team photographed is not revealed by how
//! fast its answer comes), unless the operator shares the cache (`RESULT_CACHE_SHARED`).

use std::time::Duration;

use prometheus::IntCounterVec;
use reefline_schemas::Prediction;
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use crate::job::{Classified, ModelTag};

/// A pool of at most `connections` to the sink's database at `url`, connected when first used,
/// each statement and each wait for a connection bounded by `timeout`: the classifier's uses of the
/// database (this cache, the delivery ledger) are worth no more than that.
pub(crate) fn lazy_pool(url: &str, connections: u32, timeout: Duration) -> anyhow::Result<PgPool> {
    let options = url.parse::<PgConnectOptions>()?.options([("statement_timeout", timeout.as_millis().to_string())]);
    Ok(PgPoolOptions::new().max_connections(connections).acquire_timeout(timeout).connect_lazy_with(options))
}

/// Predictions as the results table holds them, and the marine group.
type Stored = (sqlx::types::Json<Vec<Prediction>>, Option<String>);

/// Looks predictions up by the bytes' hash and the model.
pub struct ResultCache {
    /// `None`: the cache is off.
    pool: Option<PgPool>,
    /// Every tenant reuses every tenant's results.
    shared: bool,
    /// Lookups by outcome: hit, miss, or error (the database did not answer: a miss).
    lookups: IntCounterVec,
}

impl ResultCache {
    /// A cache over the database at `url` (connected when first used; each lookup bounded by
    /// `timeout`), or none.
    pub fn new(url: Option<&str>, shared: bool, timeout: Duration, lookups: IntCounterVec) -> anyhow::Result<Self> {
        let pool = url.map(|url| lazy_pool(url, 4, timeout)).transpose()?;
        Ok(Self { pool, shared, lookups })
    }

    /// The predictions stored for `sha256` from `model` for `tenant` (any tenant's when the cache
    /// is shared), if any. A database that does not answer is a miss: the image is classified as
    /// if it were new.
    pub async fn get(&self, sha256: &str, model: &ModelTag, tenant: Option<&str>) -> Option<Classified> {
        let pool = self.pool.as_ref()?;
        let tenant = tenant.filter(|_| !self.shared);
        let found: sqlx::Result<Option<Stored>> = sqlx::query_as(
            "SELECT predictions, marine_group FROM results
             WHERE sha256 = $1 AND model_name = $2 AND model_version = $3 AND status = 'ok'
               AND ($4::text IS NULL OR tenant = $4) LIMIT 1",
        )
        .bind(sha256)
        .bind(&model.name)
        .bind(&model.version)
        .bind(tenant)
        .fetch_optional(pool)
        .await;
        let (outcome, classified) = match found {
            Ok(Some((predictions, marine_group))) => {
                ("hit", Some(Classified { predictions: predictions.0, marine_group }))
            }
            Ok(None) => ("miss", None),
            Err(e) => {
                tracing::debug!(error = %e, "result cache lookup failed; classifying");
                ("error", None)
            }
        };
        self.lookups.with_label_values(&[outcome]).inc();
        classified
    }
}
