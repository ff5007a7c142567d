//! `reefline`: a survey operator's command line over the HTTP API. `submit` uploads a feed (CSV,
//! NDJSON or a URL a line, gzipped or not) and, with `--wait`, follows it with a progress bar until
//! every image has a result; `status`, `export` and `retry` take a feed's (or a batch's) id.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;

/// Where the services are, and the key to show them.
#[derive(Args, Debug)]
struct Api {
    /// Ingest's base URL (submissions and retries).
    #[arg(long, env = "REEFLINE_INGEST_URL", default_value = "http://127.0.0.1:8080", global = true)]
    ingest_url: String,

    /// The sink's base URL (progress and exports).
    #[arg(long, env = "REEFLINE_SINK_URL", default_value = "http://127.0.0.1:8081", global = true)]
    sink_url: String,

    /// API key, when the services require one.
    #[arg(long, env = "REEFLINE_API_KEY", hide_env_values = true, global = true)]
    api_key: Option<SecretString>,
}

#[derive(Parser, Debug)]
#[command(name = "reefline", version, about = "Classify a survey's photos with Reefline, over its HTTP API")]
struct Cli {
    #[command(flatten)]
    api: Api,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Upload a feed of image URLs (a file, or - for standard input) and print its id and counts.
    Submit {
        /// The feed: a CSV with a `url` column, NDJSON, or a URL a line; `.gz` or not.
        file: String,
        /// csv, ndjson or text; else from the file name, else guessed from the first line.
        #[arg(long)]
        format: Option<String>,
        /// The model for every image (a name of the manifest).
        #[arg(long)]
        model: Option<String>,
        /// Names the feed: sending again with the same key resumes it, never duplicating. A file's
        /// upload that breaks off is resent with one on its own.
        #[arg(long)]
        idempotency_key: Option<String>,
        /// Where the sink POSTs the feed's signed summary once every image has a result.
        #[arg(long)]
        callback_url: Option<String>,
        /// Follow the feed with a progress bar until every image has a result.
        #[arg(long)]
        wait: bool,
    },
    /// Show a feed's (or a batch's) progress.
    Status { id: String },
    /// Write every result of a feed (or a batch).
    Export {
        id: String,
        /// csv, ndjson or megadetector.
        #[arg(long, default_value = "csv")]
        format: String,
        /// Where to write it; standard output when absent.
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// Only `ok` or `error` results.
        #[arg(long)]
        status: Option<String>,
        /// Only images whose top class is (true) or is not (false) a marine animal.
        #[arg(long)]
        marine: Option<bool>,
        /// Only this marine group (shark, ray, ...).
        #[arg(long)]
        group: Option<String>,
        /// Only images whose top score is at least this.
        #[arg(long)]
        min_score: Option<f64>,
    },
    /// Send the images that failed transiently (timeouts, 429, 5xx) through again.
    Retry { id: String },
}

/// Parses the command line and runs the command.
pub async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let client = Client::new(cli.api)?;
    match cli.command {
        Command::Submit { file, format, model, idempotency_key, callback_url, wait } => {
            let feed = client.submit(&file, format, model, callback_url, idempotency_key).await?;
            let id = feed["feed_id"].as_str().context("no feed_id in the answer")?.to_owned();
            print_json(&feed)?;
            if wait {
                let progress = client.follow(&id).await?;
                print_json(&progress)?;
            }
        }
        Command::Status { id } => print_json(&client.status(&id).await?)?,
        Command::Export { id, format, output, status, marine, group, min_score } => {
            let mut query = vec![("format", format)];
            query.extend(status.map(|s| ("status", s)));
            query.extend(marine.map(|m| ("marine", m.to_string())));
            query.extend(group.map(|g| ("group", g)));
            query.extend(min_score.map(|s| ("min_score", s.to_string())));
            client.export(&id, &query, output).await?;
        }
        Command::Retry { id } => print_json(&client.retry(&id).await?)?,
    }
    Ok(())
}

fn print_json(value: &Value) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, value)?;
    writeln!(out)?;
    Ok(())
}

/// The HTTP API, with the key on every call.
struct Client {
    http: reqwest::Client,
    api: Api,
}

/// How many times an upload of a file is sent again after its connection broke.
const UPLOAD_TRIES: u32 = 5;

impl Client {
    fn new(api: Api) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder().connect_timeout(Duration::from_secs(10)).build()?;
        Ok(Self { http, api })
    }

    fn request(&self, method: reqwest::Method, url: String) -> reqwest::RequestBuilder {
        let request = self.http.request(method, url);
        match &self.api.api_key {
            Some(key) => request.bearer_auth(key.expose_secret()),
            None => request,
        }
    }

    /// Uploads the feed; a file's upload that breaks off (or meets a 503 or 409) is sent again,
    /// under the same idempotency key, so that it resumes.
    async fn submit(
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
        let mut tries = 0;
        loop {
            tries += 1;
            let body = if from_stdin {
                reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(tokio::io::stdin()))
            } else {
                let opened = tokio::fs::File::open(file).await.with_context(|| format!("opening {file}"))?;
                reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(opened))
            };
            let sent = self
                .request(reqwest::Method::POST, url.clone())
                .header("content-type", "application/octet-stream")
                .header("idempotency-key", &key)
                .body(body)
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
            if from_stdin || tries >= UPLOAD_TRIES {
                bail!("{}", again.1);
            }
            eprintln!("{}; sending it again in {} s (idempotency key {key})", again.1, again.0.as_secs());
            tokio::time::sleep(again.0).await;
        }
    }

    /// A feed's progress, or a batch's when no feed has the id.
    async fn status(&self, id: &str) -> anyhow::Result<Value> {
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
    async fn follow(&self, id: &str) -> anyhow::Result<Value> {
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

    /// Streams an export to `output` (or standard output).
    async fn export(&self, id: &str, query: &[(&str, String)], output: Option<PathBuf>) -> anyhow::Result<()> {
        use futures::StreamExt;
        let sink = self.api.sink_url.trim_end_matches('/');
        let mut found = None;
        for url in [format!("{sink}/v1/feeds/{id}/results"), format!("{sink}/v1/batches/{id}/results")] {
            let response = self.request(reqwest::Method::GET, with_query(&url, query)?).send().await?;
            if response.status() != 404 {
                found = Some(response);
                break;
            }
        }
        let response = found.with_context(|| format!("no feed or batch `{id}` is known"))?;
        if !response.status().is_success() {
            bail!("{}: {}", response.status(), response.text().await.unwrap_or_default());
        }
        let mut out: Box<dyn Write> = match &output {
            Some(path) => Box::new(std::io::BufWriter::new(
                std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
            )),
            None => Box::new(std::io::stdout().lock()),
        };
        let mut body = response.bytes_stream();
        while let Some(chunk) = body.next().await {
            let chunk = chunk?;
            out.write_all(&chunk)?;
        }
        out.flush()?;
        Ok(())
    }

    /// Sends a feed's (or a batch's) transient failures through again.
    async fn retry(&self, id: &str) -> anyhow::Result<Value> {
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
fn format_of(file: &str) -> Option<String> {
    let name = file.to_ascii_lowercase();
    let name = name.strip_suffix(".gz").unwrap_or(&name);
    match name.rsplit_once('.')?.1 {
        "csv" => Some("csv".into()),
        "ndjson" | "jsonl" => Some("ndjson".into()),
        "txt" => Some("text".into()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_say_their_format() {
        assert_eq!(format_of("survey/photos.CSV.gz").as_deref(), Some("csv"));
        assert_eq!(format_of("urls.txt").as_deref(), Some("text"));
        assert_eq!(format_of("-"), None);
    }

    #[test]
    fn the_command_line_parses() {
        let cli =
            Cli::try_parse_from(["reefline", "export", "abc", "--format", "megadetector", "-o", "out.json"]).unwrap();
        assert!(matches!(cli.command, Command::Export { ref format, .. } if format == "megadetector"));
        assert!(Cli::try_parse_from(["reefline", "frobnicate"]).is_err());
    }
}
