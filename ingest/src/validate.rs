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
    /// 1 to `MAX_IMAGES_PER_REQUEST` (1,000) images: each an http(s) or `s3://bucket/key` URL of at
    /// most `MAX_URL_BYTES`, or an object with its `url` and `metadata` (at most 32 keys and 4 KB,
    /// strings, numbers or booleans), which travels with it to its result; no URL twice.
    #[schema(value_type = Option<Vec<ImageSchema>>)]
    pub images: Option<Vec<Image>>,
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

/// One image of a submission, as the contract shows it: a URL, or a URL with its metadata.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
#[allow(dead_code)] // the contract's shape; requests are read as [`Image`]
pub enum ImageSchema {
    Url(String),
    WithMetadata(ImageWithMetadata),
}

/// An image's URL and the metadata that travels with it to its result.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct ImageWithMetadata {
    url: String,
    /// At most 32 keys and 4 KB; strings (numbers and booleans are kept as their JSON text).
    #[schema(example = json!({"station": "Reef 4", "depth_m": "12.5"}))]
    metadata: Option<std::collections::BTreeMap<String, String>>,
}

/// One image of a submission: its URL, with or without metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct Image {
    pub url: String,
    pub metadata: Option<reefline_schemas::Metadata>,
}

impl From<&str> for Image {
    fn from(url: &str) -> Self {
        Image { url: url.to_owned(), metadata: None }
    }
}

impl<'de> Deserialize<'de> for Image {
    /// A URL string, or `{"url": ..., "metadata": {...}}` (values: strings, numbers or booleans,
    /// kept as their JSON text), naming what is wrong in either.
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        match serde_json::Value::deserialize(deserializer)? {
            serde_json::Value::String(url) => Ok(Image { url, metadata: None }),
            serde_json::Value::Object(mut fields) => {
                if let Some(other) = fields.keys().find(|k| !matches!(k.as_str(), "url" | "metadata")) {
                    return Err(D::Error::custom(format!("unknown field `{other}`, expected `url` or `metadata`")));
                }
                let url = match fields.remove("url") {
                    Some(serde_json::Value::String(url)) => url,
                    _ => return Err(D::Error::custom("an image object needs a `url` string")),
                };
                let metadata = match fields.remove("metadata") {
                    None | Some(serde_json::Value::Null) => None,
                    Some(serde_json::Value::Object(values)) => {
                        let mut metadata = reefline_schemas::Metadata::new();
                        for (key, value) in values {
                            let text = match value {
                                serde_json::Value::String(text) => text,
                                serde_json::Value::Number(_) | serde_json::Value::Bool(_) => value.to_string(),
                                _ => {
                                    return Err(D::Error::custom(format!(
                                        "`metadata.{key}` is not a string, number or boolean"
                                    )));
                                }
                            };
                            metadata.insert(key, text);
                        }
                        Some(metadata)
                    }
                    Some(_) => return Err(D::Error::custom("`metadata` is not an object")),
                };
                Ok(Image { url, metadata })
            }
            _ => Err(D::Error::custom("an image is a URL string or an object with a `url`")),
        }
    }
}

/// `POST /classify`: one image URL.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"image_url": "https://example.org/reef/turtle.jpg"}))]
pub struct SingleRequest {
    /// An http(s) or `s3://bucket/key` URL of at most `MAX_URL_BYTES`.
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
            reefline_schemas::rules::check_web_url(&raw, max_url_bytes)
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

/// Checks the list of images: 1..=max of them, each a valid http(s) or s3 URL, its metadata within
/// the feeds' limits; the URLs, and the metadata of each.
#[allow(clippy::type_complexity)]
pub fn check_images(
    images: Option<Vec<Image>>,
    limits: Limits,
) -> Result<(Vec<Url>, Vec<Option<reefline_schemas::Metadata>>), IngestError> {
    let images = images.ok_or_else(|| IngestError::MissingField { field: "images".into() })?;
    if images.is_empty() {
        return Err(IngestError::EmptyImages { limit: limits.max_images });
    }
    if images.len() > limits.max_images {
        return Err(IngestError::TooManyImages { count: images.len(), limit: limits.max_images });
    }
    let mut seen: HashMap<Url, usize> = HashMap::with_capacity(images.len());
    let mut urls = Vec::with_capacity(images.len());
    let mut metadata = Vec::with_capacity(images.len());
    for (i, Image { url: raw, metadata: given }) in images.into_iter().enumerate() {
        if let Some(given) = &given {
            reefline_schemas::rules::check_metadata(given)
                .map_err(|message| IngestError::InvalidField { field: format!("images[{i}].metadata"), message })?;
        }
        metadata.push(given.filter(|m| !m.is_empty()));
        let url = check_url(&raw, limits.max_url_bytes)
            .map_err(|reason| IngestError::InvalidUrl { field: format!("images[{i}]"), reason })?;
        if let Some(first) = seen.insert(url.clone(), i) {
            let reason = format!("it repeats `images[{first}]` ({url}); send each URL once");
            return Err(IngestError::InvalidUrl { field: format!("images[{i}]"), reason });
        }
        urls.push(url);
    }
    Ok((urls, metadata))
}

pub use reefline_schemas::rules::check_url;

/// Checks that `tenant` may read every bucket the `s3://` URLs among `urls` name; `field` names
/// the i-th URL in the error.
pub fn check_buckets(
    urls: &[Url],
    stores: &reefline_common::objects::Stores,
    tenant: &str,
    field: impl Fn(usize) -> String,
) -> Result<(), IngestError> {
    for (i, url) in urls.iter().enumerate() {
        stores.check(url, tenant).map_err(|e| IngestError::UnknownBucket { field: field(i), reason: e.to_string() })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits { max_images: 3, max_url_bytes: 64 };

    #[test]
    fn accepts_http_and_https() {
        let (urls, _) =
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
            "`images[1]` is not a usable image URL: scheme `file` is not allowed; use http, https, s3 or az"
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
        let images: Vec<Image> =
            vec!["http://a.example/x.jpg".into(), "http://b.example/".into(), "HTTP://A.example/x.jpg".into()];
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
        let four = vec![Image::from("http://a.example/x.jpg"); 4];
        assert_eq!(check_images(Some(four), LIMITS).unwrap_err().to_string(), "`images` holds 4 URLs; the limit is 3");
        assert_eq!(check_images(None, LIMITS).unwrap_err().to_string(), "`images` is required");
    }

    #[test]
    fn an_image_may_carry_its_metadata() {
        let body = br#"{"images": ["http://a.example/x.jpg", {"url": "s3://reef-survey/y.jpg", "metadata": {"station": "Reef 4", "depth_m": 12.5, "night": true}}]}"#;
        let request = parse_json::<ClassifyRequest>(body).unwrap();
        let (urls, metadata) = check_images(request.images, Limits { max_url_bytes: 2048, ..LIMITS }).unwrap();
        assert_eq!(urls[1].as_str(), "s3://reef-survey/y.jpg");
        assert_eq!(metadata[0], None);
        let given = metadata[1].as_ref().unwrap();
        assert_eq!(
            (given["station"].as_str(), given["depth_m"].as_str(), given["night"].as_str()),
            ("Reef 4", "12.5", "true")
        );

        for (body, message) in [
            (
                r#"{"images": [{"url": "http://a/x.jpg", "meta": {}}]}"#,
                "`images[0]`: unknown field `meta`, expected `url` or `metadata`",
            ),
            (r#"{"images": [{"metadata": {}}]}"#, "`images[0]`: an image object needs a `url` string"),
            (
                r#"{"images": [{"url": "http://a/x.jpg", "metadata": {"a": [1]}}]}"#,
                "`images[0]`: `metadata.a` is not a string, number or boolean",
            ),
            (r#"{"images": [7]}"#, "`images[0]`: an image is a URL string or an object with a `url`"),
        ] {
            assert_eq!(parse_json::<ClassifyRequest>(body.as_bytes()).unwrap_err().to_string(), message, "{body}");
        }
        let many: serde_json::Map<String, serde_json::Value> = (0..33).map(|i| (format!("k{i}"), "v".into())).collect();
        let body = serde_json::json!({"images": [{"url": "http://a.example/x.jpg", "metadata": many}]}).to_string();
        let request = parse_json::<ClassifyRequest>(body.as_bytes()).unwrap();
        let refused = check_images(request.images, LIMITS).unwrap_err();
        assert_eq!(refused.to_string(), "`images[0].metadata`: metadata has 33 keys; the limit is 32");
    }

    #[test]
    fn json_errors_name_the_field() {
        let err = parse_json::<ClassifyRequest>(br#"{"images": "http://a/x.jpg"}"#).unwrap_err();
        assert_eq!(err.kind(), "invalid_field");
        assert!(err.to_string().starts_with("`images`: invalid type: string"), "{err}");
        let err = parse_json::<ClassifyRequest>(br#"{"images": ["http://a/x.jpg", 7]}"#).unwrap_err();
        assert_eq!(err.to_string(), "`images[1]`: an image is a URL string or an object with a `url`");
        assert_eq!(parse_json::<ClassifyRequest>(b"{not json").unwrap_err().kind(), "invalid_json");
    }
}
