//! Parsing and checking submissions before anything is produced.

use std::collections::HashMap;

use serde::Deserialize;
use serde::de::DeserializeOwned;
use url::Url;

use reefline_schemas::rules::truncate;

use crate::error::IngestError;

/// `POST /v1/classify` and `POST /api/infer`: a list of image URLs.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"images": ["https://example.org/reef/turtle.jpg"], "wait": 30}))]
pub struct ClassifyRequest {
    /// 1 to `MAX_IMAGES_PER_REQUEST` (1,000) http(s) URLs, each at most `MAX_URL_BYTES`, none twice.
    pub images: Option<Vec<String>>,
    /// A model of the manifest (e.g. `efficientnet-lite2`); absent: the default.
    pub model: Option<String>,
    /// Seconds to wait for the results before answering (0 to 60, cut to `INGEST_MAX_WAIT_SECONDS`).
    #[schema(minimum = 0, maximum = 60)]
    pub wait: Option<f64>,
    /// Where the sink POSTs the submission's signed summary once every image has a result.
    pub callback_url: Option<String>,
    /// The lane it travels. Absent: `interactive` when it waits or has at most
    /// `INTERACTIVE_MAX_IMAGES` (16) images, else `bulk`. Bulk work is read only once no
    /// interactive work waits.
    pub priority: Option<reefline_common::kafka::Lane>,
}

/// `POST /classify`: one image URL.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"image_url": "https://example.org/reef/turtle.jpg"}))]
pub struct SingleRequest {
    /// An http(s) URL of at most `MAX_URL_BYTES`.
    pub image_url: Option<String>,
    /// A model of the manifest; absent: the default.
    pub model: Option<String>,
    /// Seconds to wait for the result before answering (0 to 60); absent: `INGEST_INFER_WAIT_SECONDS`.
    #[schema(minimum = 0, maximum = 60)]
    pub wait: Option<f64>,
    /// The lane it travels; absent: `interactive`.
    pub priority: Option<reefline_common::kafka::Lane>,
}

/// Checks `callback_url`, when given, by the rules of an image URL (where it points is checked
/// when it is called, as image fetches are).
pub fn check_callback(callback_url: Option<String>, max_url_bytes: usize) -> Result<Option<String>, IngestError> {
    callback_url
        .map(|raw| {
            check_url(&raw, max_url_bytes)
                .map(String::from)
                .map_err(|reason| IngestError::InvalidUrl { field: "callback_url".into(), reason })
        })
        .transpose()
}

/// Most seconds a request may ask to wait for its results.
pub const MAX_WAIT_SECONDS: f64 = 60.0;

/// Checks `wait`, when given: 0 to [`MAX_WAIT_SECONDS`] seconds.
pub fn check_wait(wait: Option<f64>) -> Result<Option<std::time::Duration>, IngestError> {
    match wait {
        None => Ok(None),
        Some(seconds) if (0.0..=MAX_WAIT_SECONDS).contains(&seconds) => {
            Ok(Some(std::time::Duration::from_secs_f64(seconds)))
        }
        Some(seconds) => Err(IngestError::InvalidField {
            field: "wait".into(),
            message: format!("{seconds} is not a number of seconds from 0 to {MAX_WAIT_SECONDS}"),
        }),
    }
}

/// Checks that `model`, when given, is one of those served.
pub fn check_model(model: Option<String>, served: &[String]) -> Result<Option<String>, IngestError> {
    match model {
        Some(name) if !served.contains(&name) => {
            Err(IngestError::UnknownModel { name: truncate(&name, 64).into(), served: served.join(", ") })
        }
        model => Ok(model),
    }
}

/// Parses a JSON body, naming the path of the offending field in the error.
pub fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, IngestError> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() || path == "." {
            IngestError::InvalidJson(inner.to_string())
        } else {
            IngestError::InvalidField { field: path, message: strip_position(&inner.to_string()) }
        }
    })
}

fn strip_position(message: &str) -> String {
    message.split(" at line ").next().unwrap_or(message).to_owned()
}

/// The limits a submission must respect.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_images: usize,
    pub max_url_bytes: usize,
}

/// Checks the list of URLs: 1..=max of them, each a valid http(s) URL with a host.
pub fn check_images(images: Option<Vec<String>>, limits: Limits) -> Result<Vec<Url>, IngestError> {
    let images = images.ok_or_else(|| IngestError::MissingField { field: "images".into() })?;
    if images.is_empty() {
        return Err(IngestError::EmptyImages { limit: limits.max_images });
    }
    if images.len() > limits.max_images {
        return Err(IngestError::TooManyImages { count: images.len(), limit: limits.max_images });
    }
    let mut seen: HashMap<Url, usize> = HashMap::with_capacity(images.len());
    let mut urls = Vec::with_capacity(images.len());
    for (i, raw) in images.iter().enumerate() {
        let url = check_url(raw, limits.max_url_bytes)
            .map_err(|reason| IngestError::InvalidUrl { field: format!("images[{i}]"), reason })?;
        if let Some(first) = seen.insert(url.clone(), i) {
            let reason = format!("it repeats `images[{first}]` ({url}); send each URL once");
            return Err(IngestError::InvalidUrl { field: format!("images[{i}]"), reason });
        }
        urls.push(url);
    }
    Ok(urls)
}

pub use reefline_schemas::rules::check_url;

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits { max_images: 3, max_url_bytes: 64 };

    #[test]
    fn accepts_http_and_https() {
        let urls =
            check_images(Some(vec!["http://a.example/x.jpg".into(), "https://b.example/y.png?s=1".into()]), LIMITS)
                .unwrap();
        assert_eq!(urls[1].as_str(), "https://b.example/y.png?s=1");
    }

    #[test]
    fn rejects_other_schemes_naming_the_index() {
        let err =
            check_images(Some(vec!["http://a.example/x.jpg".into(), "file:///etc/passwd".into()]), LIMITS).unwrap_err();
        assert_eq!(err.kind(), "invalid_url");
        assert_eq!(
            err.to_string(),
            "`images[1]` is not a usable image URL: scheme `file` is not allowed; use http or https"
        );
    }

    #[test]
    fn rejects_relative_long_and_credentialed_urls() {
        assert_eq!(check_url("/x.jpg", 64).unwrap_err(), "relative URL without a base");
        assert!(
            check_url(&format!("http://a.example/{}", "x".repeat(64)), 64).unwrap_err().contains("the limit is 64")
        );
        assert!(check_url("http://user:pw@a.example/x.jpg", 64).unwrap_err().contains("credentials"));
    }

    #[test]
    fn repeated_urls_are_refused_naming_both() {
        let images = vec!["http://a.example/x.jpg".into(), "http://b.example/".into(), "HTTP://A.example/x.jpg".into()];
        let err = check_images(Some(images), LIMITS).unwrap_err();
        assert_eq!(
            err.to_string(),
            "`images[2]` is not a usable image URL: it repeats `images[0]` (http://a.example/x.jpg); send each URL once"
        );
    }

    #[test]
    fn invisible_and_control_characters_are_refused() {
        for raw in ["http://a.example/\u{202E}gpj.exe", "http://a\u{200B}.example/x.jpg", "http://a.example/x\n.jpg"] {
            let err = check_url(raw, 64).unwrap_err();
            assert!(err.starts_with("it holds the invisible or control character U+"), "{raw:?}: {err}");
        }
        assert!(check_url("http://a.example/x.jpg\u{0}", 64).unwrap_err().contains("U+0000 at byte 22"));
        // Non-ASCII that is visible is fine: the host becomes punycode, the path percent-encoded.
        let url = check_url("https://bücher.example/größe.jpg", 64).unwrap();
        assert_eq!(url.as_str(), "https://xn--bcher-kva.example/gr%C3%B6%C3%9Fe.jpg");
    }

    #[test]
    fn counts_are_limited() {
        assert_eq!(check_images(Some(vec![]), LIMITS).unwrap_err().kind(), "empty_images");
        let four = vec!["http://a.example/x.jpg".to_string(); 4];
        assert_eq!(check_images(Some(four), LIMITS).unwrap_err().to_string(), "`images` holds 4 URLs; the limit is 3");
        assert_eq!(check_images(None, LIMITS).unwrap_err().to_string(), "`images` is required");
    }

    #[test]
    fn json_errors_name_the_field() {
        let err = parse_json::<ClassifyRequest>(br#"{"images": "http://a/x.jpg"}"#).unwrap_err();
        assert_eq!(err.kind(), "invalid_field");
        assert!(err.to_string().starts_with("`images`: invalid type: string"), "{err}");
        let err = parse_json::<ClassifyRequest>(br#"{"images": ["http://a/x.jpg", 7]}"#).unwrap_err();
        assert!(err.to_string().starts_with("`images[1]`: invalid type: integer"), "{err}");
        assert_eq!(parse_json::<ClassifyRequest>(b"{not json").unwrap_err().kind(), "invalid_json");
    }
}
