//! Telling the world a submission is done: its `BatchCompleted` record on the batches topic and
//! its callback, each from the batches table as an outbox, so that a sink that stops half-way
//! leaves the work to the next one (several sinks share it: rows are claimed with SKIP LOCKED).
//!
//! The callback is a POST of the batch's summary, signed as Stripe signs webhooks:
//! `Reefline-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">`. It is sent through
//! the same server-side request forgery rules as image fetches, follows no redirect, and is tried
//! again with exponential backoff until it is answered 2xx or `CALLBACK_GIVE_UP_AFTER_S` has
//! passed since the batch completed; a destination the rules refuse is given up at once.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use hmac::{Hmac, Mac};
use prometheus::IntCounterVec;
use rdkafka::producer::FutureRecord;
use reefline_common::guard::{AddressPolicy, Blocked, GuardedResolver, error_text, redact};
use reefline_common::producer::FutureProducer;
use reefline_schemas::{BatchCompleted, Codec};
use secrecy::{ExposeSecret, SecretString};
use serde_json::json;
use sqlx::PgPool;
use tokio::sync::Notify;

use reefline_store::sink::batches::{self, Attempt, Summary};

/// How long a claimed callback is kept from other sinks: longer than any one call can take.
const CALLBACK_LEASE: Duration = Duration::from_secs(300);

/// How failed callbacks are tried again: with backoff, until `give_up_after` has passed since the
/// batch completed.
#[derive(Clone, Copy, Debug)]
pub struct Retry {
    pub backoff: reefline_common::Backoff,
    pub give_up_after: Duration,
}

/// What the notifier needs.
pub struct Notifier {
    pub pool: PgPool,
    pub producer: FutureProducer,
    pub codec: Codec,
    pub topic: String,
    pub client: reqwest::Client,
    pub policy: Arc<AddressPolicy>,
    pub secret: Option<SecretString>,
    pub public_url: String,
    pub retry: Retry,
    /// Woken when batches complete, so that nothing waits for the next tick.
    pub wake: Arc<Notify>,
    /// `sink_batch_notices_total{kind="event"|"callback", outcome}`.
    pub notices: IntCounterVec,
}

/// A client for callbacks: the guarded resolver, no redirects, no proxy.
pub fn callback_client(policy: Arc<AddressPolicy>, timeout: Duration) -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder()
        .timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
        .dns_resolver(Arc::new(GuardedResolver { policy }))
        .user_agent(concat!("reefline-sink/", env!("CARGO_PKG_VERSION")))
        .no_proxy()
        .build()
}

/// The `Reefline-Signature` header value for `body` sent at `t` (Unix seconds).
pub fn signature(secret: &str, t: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes a key of any length");
    mac.update(format!("{t}.").as_bytes());
    mac.update(body);
    format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()))
}

impl Notifier {
    /// Works the outbox until `shutdown` fires: at once when woken, else every second.
    pub async fn run(&self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            match batches::complete_feeds(&self.pool).await {
                Ok(n) if n > 0 => tracing::info!(feeds = n, "feeds complete"),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "completing feeds; trying again"),
            }
            if let Err(e) = self.produce_events().await {
                tracing::warn!(error = %e, "producing BatchCompleted records; trying again");
            }
            if let Err(e) = self.deliver_callbacks().await {
                tracing::warn!(error = %e, "delivering callbacks; trying again");
            }
            tokio::select! {
                () = &mut shutdown => return,
                () = self.wake.notified() => {}
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    /// Produces a `BatchCompleted` record for every completed batch that has none yet.
    async fn produce_events(&self) -> anyhow::Result<()> {
        loop {
            let mut tx = self.pool.begin().await?;
            let claimed = batches::claim_completed(&mut tx).await?;
            if claimed.is_empty() {
                return Ok(());
            }
            let summaries = batches::summaries(&mut tx, claimed).await?;
            for summary in &summaries {
                let record = BatchCompleted {
                    batch_id: summary.batch_id.clone(),
                    total: summary.total,
                    ok: summary.ok,
                    error: summary.error,
                    marine: summary.marine,
                    marine_groups: summary.marine_groups.clone(),
                    submitted_at_ms: summary.submitted_at.timestamp_millis(),
                    completed_at_ms: summary.completed_at.timestamp_millis(),
                };
                let payload = self.codec.encode(&self.topic, &record).await?;
                let kafka = FutureRecord::to(&self.topic).key(record.batch_id.as_str()).payload(&payload);
                self.producer.send(kafka, Duration::from_secs(5)).await.map_err(|(e, _)| e)?;
            }
            let ids: Vec<String> = summaries.iter().map(|s| s.batch_id.clone()).collect();
            batches::mark_produced(&mut tx, &ids).await?;
            tx.commit().await?;
            self.notices.with_label_values(&["event", "produced"]).inc_by(ids.len() as u64);
        }
    }

    /// Tries every callback that is due, side by side. Each is claimed for a while first, so that
    /// no other sink tries it meanwhile.
    async fn deliver_callbacks(&self) -> anyhow::Result<()> {
        let claimed = batches::claim_callbacks(&self.pool, CALLBACK_LEASE).await?;
        if claimed.is_empty() {
            return Ok(());
        }
        let mut conn = self.pool.acquire().await?;
        let summaries = batches::summaries(&mut conn, claimed.iter().map(|c| c.batch.clone()).collect()).await?;
        drop(conn);
        let attempts = claimed.iter().map(|c| (c.callback_url.as_str(), c.attempts as i32 + 1));
        let calls = summaries.iter().zip(attempts).map(|(summary, (url, attempt))| self.call(summary, url, attempt));
        futures::future::join_all(calls).await.into_iter().collect::<sqlx::Result<Vec<()>>>()?;
        Ok(())
    }

    /// One attempt at one callback, recorded with its outcome and the next step.
    async fn call(&self, summary: &Summary, url: &str, attempt: i32) -> sqlx::Result<()> {
        let body = serde_json::to_vec(&self.body(summary)).expect("a summary serialises");
        let (status, error, permanent) = match self.post(url, body).await {
            Ok(status) => (Some(i32::from(status.as_u16())), None, false),
            Err((error, permanent)) => (None, Some(error), permanent),
        };
        let delivered = status.is_some_and(|s| (200..300).contains(&s));
        let now = Utc::now();
        let next = now + self.retry.backoff.delay(attempt as u32);
        let deadline = summary.completed_at + self.retry.give_up_after;
        let gave_up = !delivered && (permanent || next > deadline);
        let outcome = if delivered {
            "delivered"
        } else if gave_up {
            "gave_up"
        } else {
            "failed"
        };
        tracing::info!(batch_id = %summary.batch_id, url = %redact(url), attempt, ?status, error = error.as_deref().unwrap_or(""), outcome, "callback");
        let recorded = Attempt {
            batch_id: &summary.batch_id,
            attempt,
            at: now,
            status,
            error: error.as_deref(),
            due: (!delivered && !gave_up).then_some(next),
            delivered: delivered.then_some(now),
            gave_up: gave_up.then_some(now),
        };
        batches::record_attempt(&self.pool, &recorded).await?;
        self.notices.with_label_values(&["callback", outcome]).inc();
        Ok(())
    }

    /// POSTs `body` to `url`: the status, or why there is none and whether that is for good (an
    /// address the rules refuse, a URL that does not parse).
    async fn post(&self, url: &str, body: Vec<u8>) -> Result<reqwest::StatusCode, (String, bool)> {
        let parsed = reqwest::Url::parse(url).map_err(|e| (format!("invalid URL: {e}"), true))?;
        self.policy.check_url(&parsed).map_err(|reason| (reason, true))?;
        let mut request = self.client.post(parsed).header(reqwest::header::CONTENT_TYPE, "application/json");
        if let Some(secret) = &self.secret {
            let signed = signature(secret.expose_secret(), Utc::now().timestamp(), &body);
            request = request.header("Reefline-Signature", signed);
        }
        let response = request.body(body).send().await.map_err(|e| explain(&e))?;
        Ok(response.status())
    }

    /// The callback's JSON: the batch's (or the feed's) counts and where to read its results.
    fn body(&self, s: &Summary) -> serde_json::Value {
        let base = self.public_url.trim_end_matches('/');
        let (kind, id_key, links) = if s.feed {
            let feed = format!("{base}/v1/feeds/{}", s.batch_id);
            let links = json!({ "feed": feed, "results": format!("{feed}/results?format=csv"), "rejects": format!("{feed}/rejects") });
            ("feed.completed", "feed_id", links)
        } else {
            ("batch.completed", "batch_id", json!({ "batch": format!("{base}/v1/batches/{}", s.batch_id) }))
        };
        let mut body = json!({
            "type": kind,
            "total": s.total,
            "ok": s.ok,
            "error": s.error,
            "marine": s.marine,
            "marine_groups": s.marine_groups,
            "submitted_at": s.submitted_at.to_rfc3339(),
            "completed_at": s.completed_at.to_rfc3339(),
            "links": links,
        });
        body[id_key] = json!(s.batch_id);
        body
    }
}

/// A failed call's message with its causes (the URL redacted: the message is logged), and whether
/// it failed for good (the address rules).
fn explain(e: &reqwest::Error) -> (String, bool) {
    let mut blocked = false;
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        blocked |= s.is::<Blocked>();
        source = s.source();
    }
    (error_text(e), blocked)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_stripes_scheme() {
        // HMAC-SHA256("secret", "1700000000.{}"), computed independently with Python's hmac module.
        assert_eq!(
            signature("secret", 1_700_000_000, b"{}"),
            "t=1700000000,v1=b8569b78799ff9e3cbff0fc2d63a33a2b57f3282abd07c37ae5e8e7d79a5f163"
        );
    }

    #[tokio::test]
    async fn a_failed_callback_names_no_resolved_address_and_no_token() {
        let guarded = callback_client(Arc::new(AddressPolicy::default()), Duration::from_secs(5)).unwrap();
        let e = guarded.post("http://localhost/hook?token=s3cret").send().await.unwrap_err();
        let (message, permanent) = explain(&e);
        assert!(permanent, "{message}");
        assert!(message.contains("`localhost`"), "{message}");
        assert!(!message.contains("127.0.0.1") && !message.contains("::1") && !message.contains("s3cret"), "{message}");

        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let policy = Arc::new(AddressPolicy::from_allowlist(&["127.0.0.1/32".into()]));
        let open = callback_client(policy, Duration::from_secs(5)).unwrap();
        let e = open.post(format!("http://user:pw@127.0.0.1:{port}/hook?token=s3cret")).send().await.unwrap_err();
        let (message, permanent) = explain(&e);
        assert!(!permanent, "{message}");
        assert!(!message.contains("s3cret") && !message.contains("pw@"), "{message}");
    }
}
