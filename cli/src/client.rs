//! The HTTP API as the command line calls it: feeds sent (and sent again to resume), progress
//! followed, exports streamed to a file whole or not at all.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;

use crate::Api;
use crate::partial::Partial;

/// The HTTP API, with the key on every call.
pub struct Client {
    http: reqwest::Client,
    api: Api,
    key: Option<SecretString>,
}

/// How many times an upload of a file is sent again after its connection broke.
const UPLOAD_TRIES: u32 = 5;

impl Client {
    pub fn new(api: Api, key: Option<SecretString>) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder().connect_timeout(Duration::from_secs(10)).build()?;
        Ok(Self { http, api, key })
    }

    fn request(&self, method: reqwest::Method, url: String) -> reqwest::RequestBuilder {
        let request = self.http.request(method, url);
        match &self.key {
            Some(key) => request.bearer_auth(key.expose_secret()),
            None => request,
        }
    }

    /// Uploads the feed; a file's upload that breaks off (or meets a 503 or 409) is sent again,
    /// under the same idempotency key, so that it resumes.
    pub async fn submit(
        &self,
        file: &str,
        format: Option<String>,
        model: Option<String>,
        callback_url: Option<String>,
        key: Option<String>,
    ) -> anyhow::Result<Value> {
        let from_stdin = file == "-";
        let key = key.unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
        let format = format.or_else(|| format_of(file));
        let mut query: Vec<(&str, String)> = format.iter().map(|f| ("format", f.clone())).collect();
        query.extend(model.map(|m| ("model", m)));
        query.extend(callback_url.map(|c| ("callback_url", c)));
        let url = with_query(&format!("{}/v1/feeds", self.api.ingest_url.trim_end_matches('/')), &query)?;
        let body = || async {
            Ok(if from_stdin {
                reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(tokio::io::stdin()))
            } else {
                let opened = tokio::fs::File::open(file).await.with_context(|| format!("opening {file}"))?;
                reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(opened))
            })
        };
        let tries = if from_stdin { 1 } else { UPLOAD_TRIES };
        self.send_feed(url, &key, "application/octet-stream", body, tries).await
    }

    /// POSTs a feed made by `body` to `url` under `key`; sends it again (made anew), up to `tries`
    /// times in all, when it meets a 503 or 409 or breaks off, so that it resumes.
    async fn send_feed<F, B>(
        &self,
        url: String,
        key: &str,
        content_type: &str,
        body: F,
        tries: u32,
    ) -> anyhow::Result<Value>
    where
        F: Fn() -> B,
        B: Future<Output = anyhow::Result<reqwest::Body>>,
    {
        let mut tried = 0;
        loop {
            tried += 1;
            let sent = self
                .request(reqwest::Method::POST, url.clone())
                .header("content-type", content_type)
                .header("idempotency-key", key)
                .body(body().await?)
                .send()
                .await;
            let again = match sent {
                Ok(response) if response.status().is_success() => return Ok(response.json().await?),
                Ok(response) if matches!(response.status().as_u16(), 409 | 503) => {
                    let wait = retry_after(&response).unwrap_or(Duration::from_secs(2));
                    let answer = response.text().await.unwrap_or_default();
                    (wait, format!("the feed is not read yet: {answer}"))
                }
                Ok(response) => bail!("{}: {}", response.status(), response.text().await.unwrap_or_default()),
                Err(e) => (Duration::from_secs(2), format!("the upload broke off: {e}")),
            };
            if tried >= tries {
                bail!("{}", again.1);
            }
            eprintln!("{}; sending it again in {} s (idempotency key {key})", again.1, again.0.as_secs());
            tokio::time::sleep(again.0).await;
        }
    }

    /// Feeds a bucket's prefix: ingest lists it. Sent again under the same key when it meets a
    /// 503 or 409, or the connection breaks: the feed resumes after its last settled object.
    pub async fn submit_prefix(
        &self,
        source: &str,
        pattern: Option<String>,
        model: Option<String>,
        callback_url: Option<String>,
        key: Option<String>,
    ) -> anyhow::Result<Value> {
        let key = key.unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
        let mut body = serde_json::json!({"source": source});
        for (field, value) in [("match", pattern), ("model", model), ("callback_url", callback_url)] {
            if let Some(value) = value {
                body[field] = Value::String(value);
            }
        }
        let url = format!("{}/v1/feeds", self.api.ingest_url.trim_end_matches('/'));
        let body = body.to_string();
        self.send_feed(url, &key, "application/json", || async { Ok(reqwest::Body::from(body.clone())) }, UPLOAD_TRIES)
            .await
    }

    /// A feed's progress, or a batch's when no feed has the id.
    pub async fn status(&self, id: &str) -> anyhow::Result<Value> {
        let sink = self.api.sink_url.trim_end_matches('/');
        self.feed_or_batch(
            reqwest::Method::GET,
            id,
            [format!("{sink}/v1/feeds/{id}"), format!("{sink}/v1/batches/{id}")],
        )
        .await
    }

    /// The answer of the first of `urls` (a feed's, then a batch's) that knows `id`.
    async fn feed_or_batch(&self, method: reqwest::Method, id: &str, urls: [String; 2]) -> anyhow::Result<Value> {
        for url in urls {
            let response = self.request(method.clone(), url).send().await?;
            if response.status() != 404 {
                return answer(response).await;
            }
        }
        bail!("no feed or batch `{id}` is known")
    }

    /// Follows a feed with a progress bar (on standard error) until every image has a result.
    pub async fn follow(&self, id: &str) -> anyhow::Result<Value> {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(indicatif::ProgressStyle::with_template(
            "{bar:40} {pos}/{len} images  {msg}  [{elapsed_precise}, eta {eta}]",
        )?);
        loop {
            let progress = self.status(id).await?;
            let count = |k: &str| progress[k].as_u64().unwrap_or(0);
            bar.set_length(count("accepted"));
            bar.set_position(count("completed"));
            bar.set_message(format!(
                "{} ok, {} failed, {:.1} images/s",
                count("ok"),
                count("error"),
                progress["images_per_second"].as_f64().unwrap_or(0.0)
            ));
            if progress["done"] == Value::Bool(true) {
                bar.finish();
                return Ok(progress);
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// Streams an export of a feed or a batch (`id`), or of a search (none), to `output` (whole or
    /// not at all), or to standard output.
    pub async fn export(
        &self,
        id: Option<&str>,
        query: &[(&str, String)],
        output: Option<PathBuf>,
    ) -> anyhow::Result<()> {
        use futures::StreamExt;
        let sink = self.api.sink_url.trim_end_matches('/');
        let response = match id {
            Some(id) => {
                let mut found = None;
                for url in [format!("{sink}/v1/feeds/{id}/results"), format!("{sink}/v1/batches/{id}/results")] {
                    let response = self.request(reqwest::Method::GET, with_query(&url, query)?).send().await?;
                    if response.status() != 404 {
                        found = Some(response);
                        break;
                    }
                }
                found.with_context(|| format!("no feed or batch `{id}` is known"))?
            }
            None => {
                let url = with_query(&format!("{sink}/v1/results/export"), query)?;
                self.request(reqwest::Method::GET, url).send().await?
            }
        };
        if !response.status().is_success() {
            bail!("{}: {}", response.status(), response.text().await.unwrap_or_default());
        }
        let mut body = response.bytes_stream();
        let Some(path) = output else {
            let mut out = std::io::stdout().lock();
            while let Some(chunk) = body.next().await {
                out.write_all(&chunk?)?;
            }
            return Ok(out.flush()?);
        };
        let mut out = Partial::create(&path)?;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.with_context(|| format!("the export broke off; {} is unchanged", path.display()))?;
            out.write_all(&chunk)?;
        }
        out.commit()
    }

    /// Sends a feed's (or a batch's) transient failures through again.
    pub async fn retry(&self, id: &str) -> anyhow::Result<Value> {
        let ingest = self.api.ingest_url.trim_end_matches('/');
        let urls = [format!("{ingest}/v1/feeds/{id}/retry"), format!("{ingest}/v1/batches/{id}/retry")];
        self.feed_or_batch(reqwest::Method::POST, id, urls).await
    }
}

/// `url` with `query` appended.
fn with_query(url: &str, query: &[(&str, String)]) -> anyhow::Result<String> {
    Ok(url::Url::parse_with_params(url, query).with_context(|| format!("`{url}` is not a URL"))?.into())
}

/// The JSON of a successful answer, or the API's error.
async fn answer(response: reqwest::Response) -> anyhow::Result<Value> {
    let status = response.status();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        bail!("{status}: {body}");
    }
    Ok(body)
}

fn retry_after(response: &reqwest::Response) -> Option<Duration> {
    let seconds = response.headers().get("retry-after")?.to_str().ok()?.trim().parse().ok()?;
    Some(Duration::from_secs(seconds))
}

/// The format a file name says, if any (`survey.csv.gz` is CSV).
pub fn format_of(file: &str) -> Option<String> {
    let name = file.to_ascii_lowercase();
    let name = name.strip_suffix(".gz").unwrap_or(&name);
    match name.rsplit_once('.')?.1 {
        "csv" => Some("csv".into()),
        "ndjson" | "jsonl" => Some("ndjson".into()),
        "txt" => Some("text".into()),
        _ => None,
    }
}
