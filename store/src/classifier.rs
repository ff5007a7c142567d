//! The classifier's queries: its delivery ledger (`classifier_partitions`, `classifier_attempts`:
//! where each partition was cleanly handed over, and the tries of requests taken alone after an
//! unclean one), which it alone writes, and its result cache's lookup in `results`.

use std::time::Duration;

use reefline_schemas::Prediction;
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::types::Json;

/// A pool of at most `connections` to the database at `url`, connected when first used, each
/// statement and each wait for a connection bounded by `timeout`: the classifier's uses of the
/// database (its cache, its delivery ledger) are worth no more than that. The classifier applies
/// no migrations: ingest and the sink do.
pub fn lazy_pool(url: &str, connections: u32, timeout: Duration) -> anyhow::Result<PgPool> {
    let options = url.parse::<PgConnectOptions>()?.options([("statement_timeout", timeout.as_millis().to_string())]);
    Ok(PgPoolOptions::new().max_connections(connections).acquire_timeout(timeout).connect_lazy_with(options))
}

/// A partition of `topic` read by consumer group `group`.
#[derive(Clone, Copy, Debug)]
pub struct Partition<'a> {
    pub group: &'a str,
    pub topic: &'a str,
    pub partition: i32,
}

/// Claims the partition (it is no longer cleanly handed over) and reads how it was left: the
/// offset of its last clean handover, if it had one, and whether it is new to the ledger.
pub async fn claim(pool: &PgPool, p: Partition<'_>) -> sqlx::Result<(Option<i64>, bool)> {
    let row = sqlx::query!(
        r#"WITH old AS (SELECT clean_offset FROM classifier_partitions
                        WHERE group_id = $1 AND topic = $2 AND partition = $3)
           INSERT INTO classifier_partitions (group_id, topic, partition) VALUES ($1, $2, $3)
           ON CONFLICT (group_id, topic, partition) DO UPDATE SET clean_offset = NULL
           RETURNING (SELECT clean_offset FROM old) AS "clean_offset?", NOT EXISTS (SELECT 1 FROM old) AS "new!""#,
        p.group,
        p.topic,
        p.partition,
    )
    .fetch_one(pool)
    .await?;
    Ok((row.clean_offset, row.new))
}

/// Counts a try of the request at `offset`: the tries so far, this one included.
pub async fn count_try(pool: &PgPool, p: Partition<'_>, offset: i64) -> sqlx::Result<i32> {
    sqlx::query_scalar!(
        r#"INSERT INTO classifier_attempts (group_id, topic, partition, "offset", attempts) VALUES ($1, $2, $3, $4, 1)
           ON CONFLICT (group_id, topic, partition, "offset")
           DO UPDATE SET attempts = classifier_attempts.attempts + 1
           RETURNING attempts"#,
        p.group,
        p.topic,
        p.partition,
        offset,
    )
    .fetch_one(pool)
    .await
}

/// Forgets the tries counted at `offset`, or (`below`) before it.
pub async fn forget_tries(pool: &PgPool, p: Partition<'_>, offset: i64, below: bool) -> sqlx::Result<()> {
    sqlx::query!(
        r#"DELETE FROM classifier_attempts WHERE group_id = $1 AND topic = $2 AND partition = $3
             AND CASE WHEN $5 THEN "offset" < $4 ELSE "offset" = $4 END"#,
        p.group,
        p.topic,
        p.partition,
        offset,
        below,
    )
    .execute(pool)
    .await?;
    Ok(())
}

/// Records clean handovers of `group`'s partitions of `topic`: `partitions[i]` left at `offsets[i]`.
pub async fn handed_over(
    pool: &PgPool,
    group: &str,
    topic: &str,
    partitions: &[i32],
    offsets: &[i64],
) -> sqlx::Result<()> {
    sqlx::query!(
        "UPDATE classifier_partitions c SET clean_offset = t.o
         FROM UNNEST($3::int[], $4::int8[]) AS t(p, o)
         WHERE c.group_id = $1 AND c.topic = $2 AND c.partition = t.p",
        group,
        topic,
        partitions as _,
        offsets as _,
    )
    .execute(pool)
    .await?;
    Ok(())
}

/// An `ok` result's predictions and marine group.
pub struct Cached {
    pub predictions: Json<Vec<Prediction>>,
    pub marine_group: Option<String>,
}

/// The predictions stored for the photo whose bytes hash to `sha256` by model `name` `version`,
/// of tenant `tenant` (any tenant's when `None`), if there are any.
pub async fn cached(
    pool: &PgPool,
    sha256: &str,
    name: &str,
    version: &str,
    tenant: Option<&str>,
) -> sqlx::Result<Option<Cached>> {
    sqlx::query_as!(
        Cached,
        r#"SELECT predictions AS "predictions: Json<Vec<Prediction>>", marine_group FROM results
           WHERE sha256 = $1 AND model_name = $2 AND model_version = $3 AND status = 'ok'
             AND ($4::text IS NULL OR tenant = $4) LIMIT 1"#,
        sha256,
        name,
        version,
        tenant,
    )
    .fetch_optional(pool)
    .await
}
