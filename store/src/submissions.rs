//! Submissions as the `requests` and `batches` tables record them. Ingest records a submission
//! before it hands out its ids; the sink records every request it reads from the requests topic
//! (a camera may produce there without ingest). Both write the same rows, so either may be first.

use reefline_schemas::ImageRequest;
use sqlx::PgPool;

use crate::tenant_or_default;

/// Records `requests` and their batches (a submission's, or a feed chunk's for a request of a
/// feed) in one transaction; a request or batch seen before is left as it is.
pub async fn record(pool: &PgPool, requests: &[ImageRequest]) -> sqlx::Result<()> {
    let text = |f: fn(&ImageRequest) -> &str| requests.iter().map(|r| f(r).to_owned()).collect::<Vec<String>>();
    let optional =
        |f: fn(&ImageRequest) -> Option<&str>| requests.iter().map(|r| f(r).map(str::to_owned)).collect::<Vec<_>>();
    let batch_index: Vec<i32> = requests.iter().map(|r| r.batch_index).collect();
    let batch_size: Vec<i32> = requests.iter().map(|r| r.batch_size).collect();
    let submitted_ms: Vec<f64> = requests.iter().map(|r| r.submitted_at_ms as f64).collect();
    let tenant = text(|r| tenant_or_default(r.tenant.as_deref()));
    let mut tx = pool.begin().await?;
    sqlx::query!(
        "INSERT INTO requests (request_id, batch_id, batch_index, batch_size, url, submitted_at, tenant)
         SELECT request_id, batch_id, batch_index, batch_size, url, to_timestamp(submitted_ms / 1000.0), tenant
         FROM UNNEST($1::text[], $2::text[], $3::int[], $4::int[], $5::text[], $6::float8[], $7::text[])
              AS t(request_id, batch_id, batch_index, batch_size, url, submitted_ms, tenant)
         ON CONFLICT (request_id) DO NOTHING",
        &text(|r| &r.request_id),
        &text(|r| &r.batch_id),
        &batch_index,
        &batch_size,
        &text(|r| &r.url),
        &submitted_ms,
        &tenant,
    )
    .execute(&mut *tx)
    .await?;
    sqlx::query!(
        "INSERT INTO batches (batch_id, total, callback_url, submitted_at, kind, feed_id, tenant)
         SELECT batch_id, total, callback_url, to_timestamp(submitted_ms / 1000.0),
                CASE WHEN feed_id IS NULL THEN 'submission' ELSE 'feed_chunk' END, feed_id, tenant
         FROM UNNEST($1::text[], $2::int[], $3::text[], $4::float8[], $5::text[], $6::text[])
              AS t(batch_id, total, callback_url, submitted_ms, feed_id, tenant)
         ON CONFLICT (batch_id) DO NOTHING",
        &text(|r| &r.batch_id),
        &batch_size,
        &optional(|r| r.callback_url.as_deref()) as _,
        &submitted_ms,
        &optional(|r| r.feed_id.as_deref()) as _,
        &tenant,
    )
    .execute(&mut *tx)
    .await?;
    tx.commit().await
}
