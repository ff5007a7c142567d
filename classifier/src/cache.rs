//! The result cache: a photo whose bytes (by SHA-256) were classified before by the same model and
//! version is not run through the model again; its stored predictions are reused. The store is the
//! sink's results table (every `ok` result carries its sha256), so the cache is shared by every
//! classifier and survives restarts: re-running a survey with a few new photos costs only those.
//! A tenant reuses only its own results (what another team photographed is not revealed by how
//! fast its answer comes), unless the operator shares the cache (`RESULT_CACHE_SHARED`).

use std::time::Duration;

use prometheus::IntCounterVec;
use reefline_store::classifier as store;
use sqlx::PgPool;

use crate::job::{Classified, ModelTag};

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
        let pool = url.map(|url| store::lazy_pool(url, 4, timeout)).transpose()?;
        Ok(Self { pool, shared, lookups })
    }

    /// The predictions stored for `sha256` from `model` for `tenant` (any tenant's when the cache
    /// is shared), if any. A database that does not answer is a miss: the image is classified as
    /// if it were new.
    pub async fn get(&self, sha256: &str, model: &ModelTag, tenant: Option<&str>) -> Option<Classified> {
        let pool = self.pool.as_ref()?;
        let tenant = tenant.filter(|_| !self.shared);
        let found = store::cached(pool, sha256, &model.name, &model.version, tenant).await;
        let (outcome, classified) = match found {
            Ok(Some(store::Cached { predictions, marine_group })) => {
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
