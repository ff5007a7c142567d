//! What a record must hold to enter the pipeline, whoever wrote it. Ingest applies these rules to
//! every submission; the classifier and the sink apply them again to what they read from Kafka,
//! because a camera system (or anything else with write access) may produce straight to the
//! topics, and one record that Postgres or the broker refuses must not stop a partition.

use url::Url;

use crate::{ClassificationResult, ImageRequest, Metadata};

/// The longest URL any service accepts, whatever `MAX_URL_BYTES` says.
pub const URL_CEILING_BYTES: usize = 8192;

/// The longest error message a result carries; longer ones are cut (see [`truncate`]).
pub const ERROR_MESSAGE_BYTES: usize = 1024;

/// The longest any other string a record carries may be (ids, labels, model names, sources).
pub const SHORT_TEXT_BYTES: usize = 256;

/// Most keys an image's metadata may have.
pub const METADATA_MAX_KEYS: usize = 32;

/// Most bytes an image's metadata may hold, its keys and values together.
pub const METADATA_MAX_BYTES: usize = 4096;

/// Characters that change how a URL looks without being visible: controls, bidirectional
/// overrides and isolates, zero-width characters, the soft hyphen and the byte-order mark.
fn is_invisible(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{00AD}' | '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{2064}')
        || matches!(c, '\u{2066}'..='\u{2069}' | '\u{FEFF}')
}

/// Checks one image URL (http, https, `s3://bucket/key` or `az://container/blob`); the error says
/// what is wrong with it.
pub fn check_url(raw: &str, max_bytes: usize) -> Result<Url, String> {
    let url = parse_url(raw, max_bytes)?;
    match url.scheme() {
        "http" | "https" => check_web_parts(url),
        "s3" => check_s3_parts(&url).map(|()| url),
        "az" => check_az_parts(&url).map(|()| url),
        other => Err(format!("scheme `{other}` is not allowed; use http, https, s3 or az")),
    }
}

/// Whether URLs of `scheme` name an object in a store (S3's `s3://`, Azure Blob's `az://`).
pub fn is_object_scheme(scheme: &str) -> bool {
    matches!(scheme, "s3" | "az")
}

/// Checks a URL the services call back or fetch a listing from: http or https only.
pub fn check_web_url(raw: &str, max_bytes: usize) -> Result<Url, String> {
    let url = parse_url(raw, max_bytes)?;
    match url.scheme() {
        "http" | "https" => check_web_parts(url),
        other => Err(format!("scheme `{other}` is not allowed; use http or https")),
    }
}

fn parse_url(raw: &str, max_bytes: usize) -> Result<Url, String> {
    let max_bytes = max_bytes.min(URL_CEILING_BYTES);
    if raw.len() > max_bytes {
        return Err(format!("it is {} bytes long; the limit is {max_bytes}", raw.len()));
    }
    if let Some((at, c)) = raw.char_indices().find(|(_, c)| is_invisible(*c)) {
        return Err(format!("it holds the invisible or control character U+{:04X} at byte {at}", u32::from(c)));
    }
    Url::parse(raw.trim()).map_err(|e| e.to_string())
}

fn check_web_parts(url: Url) -> Result<Url, String> {
    if url.host_str().is_none_or(str::is_empty) {
        return Err("it has no host".into());
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("credentials in URLs are not accepted".into());
    }
    Ok(url)
}

/// An `s3://` URL: a bucket by S3's naming rules, then a key whose `/`-separated parts are neither
/// empty nor `.` or `..`, and nothing else (no credentials, port, query or fragment).
pub fn check_s3_parts(url: &Url) -> Result<(), String> {
    let rule = "3 to 63 of a-z, 0-9, `.` and `-`, starting and ending with a letter or digit";
    check_object_parts(url, ("bucket", "object", "key"), is_bucket_name, rule)
}

/// An `az://` URL: a container by Azure's naming rules, then a blob name as for an S3 key.
pub fn check_az_parts(url: &Url) -> Result<(), String> {
    let rule = "3 to 63 of a-z, 0-9 and single `-`, starting and ending with a letter or digit";
    check_object_parts(url, ("container", "blob", "blob"), is_container_name, rule)
}

/// An object URL, `scheme://<container>/<key>`, its container's name checked by `is_name`.
fn check_object_parts(
    url: &Url,
    (container, object, key): (&str, &str, &str),
    is_name: fn(&str) -> bool,
    rule: &str,
) -> Result<(), String> {
    let (scheme, name) = (url.scheme(), url.host_str().unwrap_or_default());
    if !is_name(name) {
        return Err(format!("`{name}` is not a {container} name ({rule})"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("credentials in URLs are not accepted".into());
    }
    if url.port().is_some() || url.query().is_some() || url.fragment().is_some() {
        return Err(format!("an {scheme} URL is `{scheme}://{container}/{key}`, with no port, query or fragment"));
    }
    let path = url.path().strip_prefix('/').unwrap_or(url.path());
    if path.is_empty() {
        return Err(format!("it names a {container} but no {object}; write `{scheme}://{container}/{key}`"));
    }
    check_key_parts(path)
}

/// Azure Blob Storage's rules for a container's name.
pub fn is_container_name(name: &str) -> bool {
    let edge = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    (3..=63).contains(&name.len())
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.contains("--")
        && edge(name.chars().next())
        && edge(name.chars().last())
}

/// A key or prefix (percent-encoded, as in a URL) as the object store reads it, decoded: UTF-8,
/// no control character, and no empty, `.` or `..` part between slashes (a prefix may end with one
/// slash).
pub fn check_key_parts(key: &str) -> Result<(), String> {
    let decoded = percent_encoding::percent_decode_str(key)
        .decode_utf8()
        .map_err(|_| "its key is not UTF-8 once decoded".to_owned())?;
    if decoded.chars().any(char::is_control) {
        return Err("its key holds a control character once decoded".into());
    }
    let key = decoded.strip_suffix('/').unwrap_or(&decoded);
    if key.split('/').any(|part| part.is_empty() || part == "." || part == "..") {
        return Err("its key has an empty, `.` or `..` part between slashes".into());
    }
    Ok(())
}

/// S3's rules for a bucket's name.
pub fn is_bucket_name(name: &str) -> bool {
    let edge = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    (3..=63).contains(&name.len())
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '-')
        && edge(name.chars().next())
        && edge(name.chars().last())
}

fn check_id(field: &str, value: &str) -> Result<(), String> {
    uuid::Uuid::try_parse(value).map(|_| ()).map_err(|_| format!("`{field}` is not a UUID: {:?}", preview(value)))
}

fn check_text(field: &str, value: &str, max_bytes: usize) -> Result<(), String> {
    if value.len() > max_bytes {
        return Err(format!("`{field}` is {} bytes long; the limit is {max_bytes}", value.len()));
    }
    match value.char_indices().find(|(_, c)| c.is_control() && !matches!(c, '\n' | '\t')) {
        Some((at, c)) => Err(format!("`{field}` holds the control character U+{:04X} at byte {at}", u32::from(c))),
        None => Ok(()),
    }
}

/// Checks an image's metadata: at most [`METADATA_MAX_KEYS`] keys, [`METADATA_MAX_BYTES`] in
/// all, non-empty keys, and no control characters but tabs and line breaks (Postgres refuses NUL).
pub fn check_metadata(metadata: &Metadata) -> Result<(), String> {
    if metadata.len() > METADATA_MAX_KEYS {
        return Err(format!("metadata has {} keys; the limit is {METADATA_MAX_KEYS}", metadata.len()));
    }
    let bytes: usize = metadata.iter().map(|(k, v)| k.len() + v.len()).sum();
    if bytes > METADATA_MAX_BYTES {
        return Err(format!("metadata holds {bytes} bytes; the limit is {METADATA_MAX_BYTES}"));
    }
    for (key, value) in metadata {
        if key.trim().is_empty() {
            return Err("metadata has an empty key".into());
        }
        check_text("metadata key", key, METADATA_MAX_BYTES)?;
        check_text(&format!("metadata.{}", preview(key)), value, METADATA_MAX_BYTES)?;
    }
    Ok(())
}

/// Checks the fields a feed adds to a request or result: a UUID feed id, a line from 1, metadata
/// within its limits.
fn check_feed_fields(feed_id: Option<&str>, line: Option<i64>, metadata: Option<&Metadata>) -> Result<(), String> {
    if let Some(feed_id) = feed_id {
        check_id("feed_id", feed_id)?;
    }
    if let Some(line) = line.filter(|l| *l < 1) {
        return Err(format!("`line` {line} is not a line number (they start at 1)"));
    }
    metadata.map_or(Ok(()), check_metadata)
}

fn check_position(index: i32, size: i32) -> Result<(), String> {
    if size < 1 || !(0..size).contains(&index) {
        return Err(format!("`batch_index` {index} is not within a batch of `batch_size` {size}"));
    }
    Ok(())
}

/// Between 2001 and 2286: anything else is not a time this pipeline wrote (and Postgres refuses
/// timestamps far enough out).
fn check_time(field: &str, unix_ms: i64) -> Result<(), String> {
    if !(1_000_000_000_000..10_000_000_000_000).contains(&unix_ms) {
        return Err(format!("`{field}` {unix_ms} is not a plausible time"));
    }
    Ok(())
}

/// A bounded, printable preview of a value for an error message.
fn preview(value: &str) -> String {
    truncate(value, 64).to_owned()
}

/// `text` cut to at most `max_bytes` on a character boundary.
pub fn truncate(text: &str, max_bytes: usize) -> &str {
    if text.len() <= max_bytes {
        return text;
    }
    let mut end = max_bytes;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

impl ImageRequest {
    /// Whether this request may enter the pipeline: UUID ids, a usable URL of at most
    /// `max_url_bytes`, a position inside its batch, a plausible time, no control characters.
    pub fn check(&self, max_url_bytes: usize) -> Result<(), String> {
        check_id("request_id", &self.request_id)?;
        check_id("batch_id", &self.batch_id)?;
        check_url(&self.url, max_url_bytes).map_err(|reason| format!("`url` is not a usable image URL: {reason}"))?;
        check_position(self.batch_index, self.batch_size)?;
        check_time("submitted_at_ms", self.submitted_at_ms)?;
        check_text("source", &self.source, SHORT_TEXT_BYTES)?;
        check_text("model", self.model.as_deref().unwrap_or(""), SHORT_TEXT_BYTES)?;
        if let Some(url) = &self.callback_url {
            check_web_url(url, max_url_bytes).map_err(|reason| format!("`callback_url` is not usable: {reason}"))?;
        }
        check_feed_fields(self.feed_id.as_deref(), self.line, self.metadata.as_ref())
    }
}

/// Strings bounded and printable, coordinates on the globe.
fn check_exif(exif: &crate::Exif) -> Result<(), String> {
    for (field, value) in [
        ("exif.taken_at", &exif.taken_at),
        ("exif.camera_make", &exif.camera_make),
        ("exif.camera_model", &exif.camera_model),
    ] {
        check_text(field, value.as_deref().unwrap_or(""), SHORT_TEXT_BYTES)?;
    }
    for (field, value, limit) in [
        ("exif.gps_latitude", exif.gps_latitude, 90.0),
        ("exif.gps_longitude", exif.gps_longitude, 180.0),
        ("exif.gps_altitude", exif.gps_altitude, 1e6),
    ] {
        if let Some(v) = value.filter(|v| !v.is_finite() || v.abs() > limit) {
            return Err(format!("`{field}` {v} is out of range"));
        }
    }
    Ok(())
}

impl ClassificationResult {
    /// Whether this result may be stored: the request's rules, plus bounded text in every field.
    pub fn check(&self) -> Result<(), String> {
        check_id("request_id", &self.request_id)?;
        check_id("batch_id", &self.batch_id)?;
        check_url(&self.url, URL_CEILING_BYTES)
            .map_err(|reason| format!("`url` is not a usable image URL: {reason}"))?;
        check_position(self.batch_index, self.batch_size)?;
        check_time("submitted_at_ms", self.submitted_at_ms)?;
        check_time("completed_at_ms", self.completed_at_ms)?;
        for (field, value) in [
            ("model_name", Some(&self.model_name)),
            ("model_version", Some(&self.model_version)),
            ("marine_group", self.marine_group.as_ref()),
            ("error_kind", self.error_kind.as_ref()),
        ] {
            check_text(field, value.map_or("", String::as_str), SHORT_TEXT_BYTES)?;
        }
        check_text("error_message", self.error_message.as_deref().unwrap_or(""), ERROR_MESSAGE_BYTES)?;
        if self.predictions.len() > 1000 {
            return Err(format!("{} predictions; at most 1000", self.predictions.len()));
        }
        check_feed_fields(self.feed_id.as_deref(), self.line, self.metadata.as_ref())?;
        if let Some(sha256) =
            self.sha256.as_deref().filter(|h| h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            return Err(format!("`sha256` is not 64 hexadecimal digits: {:?}", preview(sha256)));
        }
        self.exif.as_ref().map_or(Ok(()), check_exif)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Prediction, Status};

    fn request() -> ImageRequest {
        ImageRequest {
            request_id: "0191b3c4-7d2e-7c1a-9f3b-2a6c0e4d5b1f".into(),
            batch_id: "0191b3c4-7d2e-7c1a-9f3b-2a6c0e4d5b20".into(),
            batch_index: 0,
            batch_size: 1,
            url: "https://a.example/x.jpg".into(),
            submitted_at_ms: 1_790_000_000_000,
            source: "kafka".into(),
            ..ImageRequest::default()
        }
    }

    fn result() -> ClassificationResult {
        let r = request();
        ClassificationResult {
            request_id: r.request_id,
            batch_id: r.batch_id,
            batch_index: 0,
            batch_size: 1,
            url: r.url,
            status: Status::Ok,
            predictions: vec![Prediction {
                index: 1,
                wnid: "n1".into(),
                label: "goldfish".into(),
                scientific_name: None,
                score: 0.9,
            }],
            marine_group: Some("bony_fish".into()),
            model_name: "m".into(),
            model_version: "v".into(),
            submitted_at_ms: r.submitted_at_ms,
            completed_at_ms: r.submitted_at_ms + 5,
            ..Default::default()
        }
    }

    #[test]
    fn a_request_as_ingest_writes_it_passes() {
        request().check(2048).unwrap();
        result().check().unwrap();
    }

    #[test]
    fn ids_must_be_uuids_and_say_which() {
        let mut r = request();
        r.request_id = "abc\0def".into();
        assert_eq!(r.check(2048).unwrap_err(), "`request_id` is not a UUID: \"abc\\0def\"");
        let mut r = request();
        r.batch_id = String::new();
        assert!(r.check(2048).unwrap_err().starts_with("`batch_id` is not a UUID"));
    }

    #[test]
    fn urls_follow_ingest_rules() {
        let mut r = request();
        r.url = "http://a.example/x.jpg\0".into();
        assert_eq!(
            r.check(2048).unwrap_err(),
            "`url` is not a usable image URL: it holds the invisible or control character U+0000 at byte 22"
        );
        r.url = format!("http://a.example/{}", "x".repeat(3000));
        assert!(r.check(2048).unwrap_err().ends_with("the limit is 2048"));
        r.url = "file:///etc/passwd".into();
        assert!(r.check(2048).unwrap_err().contains("scheme `file`"));
    }

    #[test]
    fn positions_and_times_must_make_sense() {
        let mut r = request();
        r.batch_index = 3;
        assert_eq!(r.check(2048).unwrap_err(), "`batch_index` 3 is not within a batch of `batch_size` 1");
        let mut r = request();
        r.submitted_at_ms = i64::MAX;
        assert!(r.check(2048).unwrap_err().contains("not a plausible time"));
    }

    #[test]
    fn result_text_is_bounded_and_printable() {
        let mut r = result();
        r.error_message = Some("x".repeat(ERROR_MESSAGE_BYTES + 1));
        assert_eq!(r.check().unwrap_err(), "`error_message` is 1025 bytes long; the limit is 1024");
        let mut r = result();
        r.model_name = "lite\0".into();
        assert_eq!(r.check().unwrap_err(), "`model_name` holds the control character U+0000 at byte 4");
    }

    #[test]
    fn feed_fields_are_checked_on_requests_and_results() {
        let mut r = request();
        r.feed_id = Some("0191b3c4-7d2e-7c1a-9f3b-2a6c0e4d5b21".into());
        r.line = Some(2);
        r.metadata = Some(Metadata::from([("station".into(), "Reef 4".into()), ("depth_m".into(), "12.5".into())]));
        r.check(2048).unwrap();
        r.line = Some(0);
        assert_eq!(r.check(2048).unwrap_err(), "`line` 0 is not a line number (they start at 1)");
        r.line = Some(2);
        r.metadata = Some((0..33).map(|i| (format!("k{i}"), "v".into())).collect());
        assert_eq!(r.check(2048).unwrap_err(), "metadata has 33 keys; the limit is 32");
        r.metadata = Some(Metadata::from([("notes".into(), "x".repeat(4096))]));
        assert_eq!(r.check(2048).unwrap_err(), "metadata holds 4101 bytes; the limit is 4096");
        let mut result = result();
        result.feed_id = Some("not a uuid".into());
        assert_eq!(result.check().unwrap_err(), "`feed_id` is not a UUID: \"not a uuid\"");
        result.feed_id = None;
        result.metadata = Some(Metadata::from([("station".into(), "a\0b".into())]));
        assert_eq!(result.check().unwrap_err(), "`metadata.station` holds the control character U+0000 at byte 1");
    }

    #[test]
    fn truncate_keeps_whole_characters() {
        assert_eq!(truncate("größe", 3), "gr");
        assert_eq!(truncate("abc", 8), "abc");
    }
}
