//! Camtrap DP 1.0.2, TDWG's camera-trap data package (what GBIF, Agouti, TRAPPER and the camtrapdp
//! R package read): a ZIP of `datapackage.json`, `deployments.csv`, `media.csv` and
//! `observations.csv`, each table with every column of its 1.0.2 schema, in order.
//!
//! The results are read three times from one snapshot, so the export streams in constant memory:
//! first a check (before anything is answered) that gathers each deployment (its coordinates, first
//! and last time) and the taxa seen, and refuses with 422 when a required field cannot be filled;
//! then the media rows; then the observations. The check's findings give `deployments.csv` and
//! `datapackage.json`.
//!
//! Only classified images are exported: an image that failed has no observation to give (the
//! package's description counts them). Each image is one media row and one media-level
//! observation of its top class: `animal` when that class is one of ImageNet's animals, else
//! `unclassified`; `scientificName` where the marine table knows it; `classificationMethod`
//! `machine`, `classifiedBy` the model and its version, `classificationProbability` the top score;
//! `observationTags` the ImageNet label and marine group. Where the columns come from: [`Source`].

use chrono::{DateTime, FixedOffset, NaiveDateTime, SecondsFormat};
use reefline_schemas::ClassificationResult;

mod archive;
mod plan;
mod tables;

pub use archive::{Archive, Shared, Table};
pub use plan::Plan;
pub use tables::Part;

/// Where the published profile and table schemas of this version live.
const PUBLISHED: &str = "https://raw.githubusercontent.com/tdwg/camtrap-dp/1.0.2/";

/// Most deployments one export gathers (each is held in memory until the end).
const MAX_DEPLOYMENTS: usize = 100_000;

/// Metadata columns each Camtrap DP field is read from, the first present (and not empty) winning;
/// the README lists them.
pub struct Source;

impl Source {
    pub const DEPLOYMENT: [&str; 5] = ["deploymentID", "deployment_id", "deployment", "station", "site"];
    pub const LOCATION_ID: [&str; 2] = ["locationID", "location_id"];
    pub const LOCATION_NAME: [&str; 3] = ["locationName", "location_name", "location"];
    pub const LATITUDE: [&str; 3] = ["latitude", "lat", "decimalLatitude"];
    pub const LONGITUDE: [&str; 5] = ["longitude", "lon", "lng", "long", "decimalLongitude"];
    pub const TIMESTAMP: [&str; 5] = ["timestamp", "datetime", "dateTime", "eventDate", "taken_at"];
    pub const CAMERA_ID: [&str; 2] = ["cameraID", "camera_id"];
    pub const CAPTURE_METHOD: [&str; 1] = ["captureMethod"];
}

/// `project.samplingDesign`'s values.
pub const SAMPLING_DESIGNS: [&str; 6] =
    ["simpleRandom", "systematicRandom", "clusteredRandom", "experimental", "targeted", "opportunistic"];

/// What the request says beyond the results.
#[derive(Clone, Debug)]
pub struct Options {
    /// The offset of times given without one (EXIF times, most camera clocks).
    pub utc_offset: Option<FixedOffset>,
    /// Coordinates of deployments whose images give none.
    pub coordinates: Option<(f64, f64)>,
    pub sampling_design: String,
}

/// Reads a UTC offset as `+10:00`, `-0330`, `+10` or `Z`.
pub fn parse_offset(text: &str) -> Option<FixedOffset> {
    if matches!(text, "Z" | "z") {
        return FixedOffset::east_opt(0);
    }
    let (sign, rest) = match text.as_bytes().first()? {
        b'+' => (1, &text[1..]),
        b'-' => (-1, &text[1..]),
        _ => return None,
    };
    let digits: String = rest.chars().filter(|c| *c != ':').collect();
    if !digits.chars().all(|c| c.is_ascii_digit()) || !matches!(digits.len(), 2 | 4) || rest.len() > 5 {
        return None;
    }
    let hours: i32 = digits[..2].parse().ok()?;
    let minutes: i32 = if digits.len() == 4 { digits[2..].parse().ok()? } else { 0 };
    if hours > 14 || minutes > 59 {
        return None;
    }
    FixedOffset::east_opt(sign * (hours * 3600 + minutes * 60))
}

/// One image's media-level facts.
struct Media {
    deployment: String,
    timestamp: DateTime<FixedOffset>,
    coordinates: Option<(f64, f64)>,
}

/// Why an image's media row cannot be written.
enum Lack {
    /// No time at all.
    Time,
    /// A time without an offset, and no `utc_offset`.
    Offset(String),
    /// A time that is not one.
    UnreadableTime(String),
    /// Coordinates that are not numbers in range.
    Coordinates(String),
    /// A deployment named as the tables write a missing value.
    Deployment(String),
    /// A URL holding `..`, which `filePath` may not.
    Path,
}

/// What the three tables read as a missing value (their schemas' `missingValues`).
const MISSING_VALUES: [&str; 4] = ["", "NA", "NaN", "nan"];

fn column<'m>(r: &'m ClassificationResult, names: &[&str]) -> Option<&'m str> {
    let metadata = r.metadata.as_ref()?;
    names.iter().find_map(|n| metadata.get(*n).map(|v| v.trim()).filter(|v| !v.is_empty()))
}

/// A time as ISO 8601 with its offset, or a naive one (ISO 8601, or EXIF's `2026:11:20 09:41:07`)
/// at `offset`.
fn timestamp(text: &str, offset: Option<FixedOffset>) -> Result<DateTime<FixedOffset>, Lack> {
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Ok(t);
    }
    let naive = ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f", "%Y:%m:%d %H:%M:%S"]
        .iter()
        .find_map(|f| NaiveDateTime::parse_from_str(text, f).ok())
        .ok_or_else(|| Lack::UnreadableTime(text.to_owned()))?;
    let offset = offset.ok_or_else(|| Lack::Offset(text.to_owned()))?;
    naive.and_local_timezone(offset).single().ok_or_else(|| Lack::UnreadableTime(text.to_owned()))
}

fn coordinate(text: &str, limit: f64) -> Option<f64> {
    text.parse::<f64>().ok().filter(|v| v.is_finite() && v.abs() <= limit)
}

impl Media {
    /// `r`'s facts; `default_deployment` for an image that names none.
    fn of(r: &ClassificationResult, options: &Options, default_deployment: &str) -> Result<Self, Lack> {
        let exif = r.exif.as_ref();
        let time = column(r, &Source::TIMESTAMP).or(exif.and_then(|e| e.taken_at.as_deref())).ok_or(Lack::Time)?;
        let timestamp = timestamp(time, options.utc_offset)?;
        let coordinates = match (column(r, &Source::LATITUDE), column(r, &Source::LONGITUDE)) {
            (None, None) => exif.and_then(|e| Some((e.gps_latitude?, e.gps_longitude?))),
            (Some(lat), Some(lon)) => match (coordinate(lat, 90.0), coordinate(lon, 180.0)) {
                (Some(lat), Some(lon)) => Some((lat, lon)),
                _ => return Err(Lack::Coordinates(format!("{lat}, {lon}"))),
            },
            (lat, lon) => return Err(Lack::Coordinates(format!("{}, {}", lat.unwrap_or(""), lon.unwrap_or("")))),
        };
        let deployment = column(r, &Source::DEPLOYMENT).unwrap_or(default_deployment);
        // The tables read these as missing values: a required field would be empty.
        if MISSING_VALUES.contains(&deployment) {
            return Err(Lack::Deployment(deployment.to_owned()));
        }
        // Camtrap DP's filePath may hold no `..`.
        if r.url.contains("..") {
            return Err(Lack::Path);
        }
        Ok(Self { deployment: deployment.to_owned(), timestamp, coordinates })
    }
}

/// A time as the tables write it: ISO 8601 to the second, with its offset (`Z` for UTC).
fn format_time(t: DateTime<FixedOffset>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// The file's name (the URL's last segment, decoded) and its media type, from its extension.
fn file_name(url: &str) -> (String, &'static str) {
    let path = url.split(['?', '#']).next().unwrap_or(url);
    let last = path.rsplit('/').next().unwrap_or("");
    let name = super::megadetector::decoded(last);
    let extension = name.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase()).unwrap_or_default();
    let mediatype = match extension.as_str() {
        "jpg" | "jpeg" => "image/jpeg",
        "png" => "image/png",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "bmp" => "image/bmp",
        "tif" | "tiff" => "image/tiff",
        _ => "image/*",
    };
    (name, mediatype)
}

#[cfg(test)]
mod tests;
