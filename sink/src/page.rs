//! The web page at `/`, for people rather than programs: paste or load URLs and submit them to
//! ingest, follow the submission, browse its results as a grid, filter, open one, download CSV.
//! Plain HTML, CSS and JavaScript in `sink/web/`, compiled into the binary: nothing to build and
//! nothing loaded from anywhere but this sink, ingest and the photos' own URLs.

use axum::Router;
use axum::http::{HeaderValue, header};
use axum::response::{Html, IntoResponse};
use axum::routing::get;

const INDEX: &str = include_str!("../web/index.html");
const SCRIPT: &str = include_str!("../web/app.js");
const STYLE: &str = include_str!("../web/app.css");

/// The page, for a browser that reaches ingest at `ingest_url`.
pub fn router(ingest_url: &str) -> anyhow::Result<Router> {
    let ingest = url::Url::parse(ingest_url)?;
    let origin = ingest.origin().ascii_serialization();
    // The page may talk to this sink and to ingest, and show photos from anywhere.
    let policy = HeaderValue::from_str(&format!(
        "default-src 'self'; connect-src 'self' {origin}; img-src http: https: data: blob:; \
         object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
    ))?;
    let config = serde_json::json!({ "ingest_url": ingest_url.trim_end_matches('/') }).to_string();
    let index = move || {
        let policy = policy.clone();
        async move { ([(header::CONTENT_SECURITY_POLICY, policy)], Html(INDEX)) }
    };
    let asset = |kind: &'static str, body: &'static str| move || async move { ([(header::CONTENT_TYPE, kind)], body) };
    Ok(Router::new()
        .route("/", get(index))
        .route("/app.js", get(asset("text/javascript; charset=utf-8", SCRIPT)))
        .route("/app.css", get(asset("text/css; charset=utf-8", STYLE)))
        .route(
            "/config.json",
            get(move || async move { ([(header::CONTENT_TYPE, "application/json")], config).into_response() }),
        ))
}
