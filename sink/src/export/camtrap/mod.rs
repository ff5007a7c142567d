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

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, FixedOffset, NaiveDateTime, SecondsFormat, Utc};
use reefline_schemas::{ClassificationResult, Status};
use serde_json::{Value, json};

mod archive;

pub use archive::{Archive, Shared, Table};

/// Where the published profile and table schemas of this version live.
const PUBLISHED: &str = "https://raw.githubusercontent.com/tdwg/camtrap-dp/1.0.2/";

/// ImageNet's animal classes are its first 398 (tench to puffer).
const LAST_ANIMAL_CLASS: i32 = 397;

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

/// The columns of the three tables, as their 1.0.2 schemas order them.
const DEPLOYMENT_HEADER: [&str; 24] = [
    "deploymentID",
    "locationID",
    "locationName",
    "latitude",
    "longitude",
    "coordinateUncertainty",
    "deploymentStart",
    "deploymentEnd",
    "setupBy",
    "cameraID",
    "cameraModel",
    "cameraDelay",
    "cameraHeight",
    "cameraDepth",
    "cameraTilt",
    "cameraHeading",
    "detectionDistance",
    "timestampIssues",
    "baitUse",
    "featureType",
    "habitat",
    "deploymentGroups",
    "deploymentTags",
    "deploymentComments",
];
const MEDIA_HEADER: [&str; 11] = [
    "mediaID",
    "deploymentID",
    "captureMethod",
    "timestamp",
    "filePath",
    "filePublic",
    "fileName",
    "fileMediatype",
    "exifData",
    "favorite",
    "mediaComments",
];
const OBSERVATION_HEADER: [&str; 28] = [
    "observationID",
    "deploymentID",
    "mediaID",
    "eventID",
    "eventStart",
    "eventEnd",
    "observationLevel",
    "observationType",
    "cameraSetupType",
    "scientificName",
    "count",
    "lifeStage",
    "sex",
    "behavior",
    "individualID",
    "individualPositionRadius",
    "individualPositionAngle",
    "individualSpeed",
    "bboxX",
    "bboxY",
    "bboxWidth",
    "bboxHeight",
    "classificationMethod",
    "classifiedBy",
    "classificationTimestamp",
    "classificationProbability",
    "observationTags",
    "observationComments",
];

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

/// A deployment, gathered from its images.
#[derive(Default)]
struct Deployment {
    location_id: Option<String>,
    location_name: Option<String>,
    camera_id: Option<String>,
    camera_model: Option<String>,
    /// Sums of the latitudes and longitudes given, and how many: the deployment is at their mean.
    coordinates: (f64, f64, u32),
    start: Option<DateTime<FixedOffset>>,
    end: Option<DateTime<FixedOffset>>,
}

impl Deployment {
    fn position(&self, options: &Options) -> Option<(f64, f64)> {
        let (lat, lon, n) = self.coordinates;
        let round = |v: f64| (v * 1e6).round() / 1e6;
        if n > 0 { Some((round(lat / f64::from(n)), round(lon / f64::from(n)))) } else { options.coordinates }
    }
}

/// How many images lack something, with the first of them.
#[derive(Default)]
struct Tally {
    count: u64,
    first: Option<String>,
}

impl Tally {
    fn add(&mut self, example: impl FnOnce() -> String) {
        self.count += 1;
        if self.first.is_none() {
            self.first = Some(example());
        }
    }
}

/// What the check finds: everything but the media and observation rows.
pub struct Plan {
    options: Options,
    /// `feed` or `batch`, and its id: the package's name, and the deployment of images that name none.
    what: &'static str,
    id: String,
    deployments: BTreeMap<String, Deployment>,
    /// Scientific names seen, with the ImageNet label of each.
    taxa: BTreeMap<String, String>,
    capture_methods: BTreeSet<String>,
    classified: u64,
    /// Images left out because they could not be classified.
    failed: u64,
    no_time: Tally,
    no_offset: Tally,
    unreadable_time: Tally,
    unreadable_coordinates: Tally,
    missing_deployment: Tally,
    dotted_path: Tally,
    too_many_deployments: bool,
}

/// Why a package cannot be written: what is missing, each with how to supply it.
pub struct Refusal {
    pub missing: Vec<&'static str>,
    pub message: String,
}

impl Plan {
    pub fn new(options: Options, what: &'static str, id: String) -> Self {
        Self {
            options,
            what,
            id,
            deployments: BTreeMap::new(),
            taxa: BTreeMap::new(),
            capture_methods: BTreeSet::new(),
            classified: 0,
            failed: 0,
            no_time: Tally::default(),
            no_offset: Tally::default(),
            unreadable_time: Tally::default(),
            unreadable_coordinates: Tally::default(),
            missing_deployment: Tally::default(),
            dotted_path: Tally::default(),
            too_many_deployments: false,
        }
    }

    /// Takes in one result of the check pass.
    pub fn check(&mut self, r: &ClassificationResult) {
        if r.status != Status::Ok {
            self.failed += 1;
            return;
        }
        self.classified += 1;
        let example = || r.line.map_or_else(|| r.url.clone(), |line| format!("line {line}"));
        let media = match Media::of(r, &self.options, &self.id) {
            Ok(media) => media,
            Err(Lack::Time) => return self.no_time.add(example),
            Err(Lack::Offset(t)) => return self.no_offset.add(|| format!("{} ({t})", example())),
            Err(Lack::UnreadableTime(t)) => return self.unreadable_time.add(|| format!("{} ({t})", example())),
            Err(Lack::Coordinates(c)) => return self.unreadable_coordinates.add(|| format!("{} ({c})", example())),
            Err(Lack::Deployment(d)) => return self.missing_deployment.add(|| format!("{} ({d})", example())),
            Err(Lack::Path) => return self.dotted_path.add(example),
        };
        if !self.deployments.contains_key(&media.deployment) && self.deployments.len() >= MAX_DEPLOYMENTS {
            self.too_many_deployments = true;
            return;
        }
        let deployment = self.deployments.entry(media.deployment).or_default();
        let first = |slot: &mut Option<String>, value: Option<&str>| {
            if slot.is_none() {
                *slot = value.map(str::to_owned);
            }
        };
        first(&mut deployment.location_id, column(r, &Source::LOCATION_ID));
        first(&mut deployment.location_name, column(r, &Source::LOCATION_NAME));
        first(&mut deployment.camera_id, column(r, &Source::CAMERA_ID));
        let model = r.exif.as_ref().and_then(|e| match (e.camera_make.as_deref(), e.camera_model.as_deref()) {
            (Some(make), Some(model)) if !model.starts_with(make) => Some(format!("{make}-{model}")),
            (_, Some(model)) => Some(model.to_owned()),
            _ => None,
        });
        first(&mut deployment.camera_model, model.as_deref());
        if let Some((lat, lon)) = media.coordinates {
            deployment.coordinates.0 += lat;
            deployment.coordinates.1 += lon;
            deployment.coordinates.2 += 1;
        }
        deployment.start = Some(deployment.start.map_or(media.timestamp, |t| t.min(media.timestamp)));
        deployment.end = Some(deployment.end.map_or(media.timestamp, |t| t.max(media.timestamp)));
        if let Some(method) =
            column(r, &Source::CAPTURE_METHOD).filter(|m| matches!(*m, "activityDetection" | "timeLapse"))
        {
            self.capture_methods.insert(method.to_owned());
        }
        if let Some(top) = r.predictions.first()
            && let Some(name) = top.scientific_name.as_deref().filter(|_| is_animal(top.index))
        {
            self.taxa.entry(name.to_owned()).or_insert_with(|| top.label.clone());
        }
    }

    /// Whether the package can be written; if not, what is missing and how to supply it.
    pub fn refusal(&self) -> Option<Refusal> {
        let mut missing = Vec::new();
        let mut reasons = Vec::new();
        let mut say = |field: &'static str, tally: &Tally, what: &str, how: &str| {
            if tally.count > 0 {
                if !missing.contains(&field) {
                    missing.push(field);
                }
                let first = tally.first.as_deref().unwrap_or("");
                reasons.push(format!("{} classified images {what} (the first: {first}); {how}", tally.count));
            }
        };
        say(
            "timestamp",
            &self.no_time,
            "have no time taken",
            "add a `timestamp` column (ISO 8601 with its UTC offset) to the feed, or send photos whose EXIF gives DateTimeOriginal",
        );
        say(
            "utc_offset",
            &self.no_offset,
            "have a time taken without a UTC offset",
            "give the cameras' offset as `utc_offset` (e.g. utc_offset=+10:00)",
        );
        say(
            "timestamp",
            &self.unreadable_time,
            "have a `timestamp` that is not an ISO 8601 time",
            "write it as 2026-11-20T09:41:07+10:00",
        );
        say(
            "deploymentID",
            &self.missing_deployment,
            "name their deployment as the tables write a missing value (NA, NaN or nan)",
            "name it otherwise",
        );
        say(
            "filePath",
            &self.dotted_path,
            "have a URL holding `..`, which Camtrap DP's filePath may not",
            "rename those objects, or leave them out with the export's filters",
        );
        say(
            "latitude",
            &self.unreadable_coordinates,
            "have a latitude and longitude that are not degrees in range (or only one of them)",
            "write both as decimal degrees",
        );
        let unplaced: Vec<&String> =
            self.deployments.iter().filter(|(_, d)| d.position(&self.options).is_none()).map(|(id, _)| id).collect();
        if let Some(first) = unplaced.first() {
            for field in ["latitude", "longitude"] {
                if !missing.contains(&field) {
                    missing.push(field);
                }
            }
            reasons.push(format!(
                "{} deployments have no coordinates (the first: `{first}`); add `latitude` and `longitude` columns to the feed, send photos whose EXIF gives GPS, or give `latitude` and `longitude` for them",
                unplaced.len()
            ));
        }
        if self.too_many_deployments {
            missing.push("deploymentID");
            reasons.push(format!(
                "more than {MAX_DEPLOYMENTS} deployments; `deploymentID` names the camera placement an image came from, not the image"
            ));
        }
        if reasons.is_empty() && self.deployments.is_empty() {
            reasons.push("no classified image matches: a package needs at least one".to_owned());
        }
        (!reasons.is_empty()).then(|| Refusal {
            missing,
            message: format!("a Camtrap DP package cannot be written: {}", reasons.join("; ")),
        })
    }

    /// Each deployment's row, one at a time.
    fn deployment_rows(&self) -> impl Iterator<Item = [String; DEPLOYMENT_HEADER.len()]> + '_ {
        self.deployments.iter().map(|(id, d)| {
            let (lat, lon) = d.position(&self.options).unwrap_or_default();
            let mut row: [String; DEPLOYMENT_HEADER.len()] = Default::default();
            row[0] = id.clone();
            row[1] = d.location_id.clone().unwrap_or_default();
            row[2] = d.location_name.clone().unwrap_or_default();
            row[3] = lat.to_string();
            row[4] = lon.to_string();
            row[6] = d.start.map(format_time).unwrap_or_default();
            row[7] = d.end.map(format_time).unwrap_or_default();
            row[9] = d.camera_id.clone().unwrap_or_default();
            row[10] = d.camera_model.clone().unwrap_or_default();
            row
        })
    }

    fn media_row(&self, r: &ClassificationResult) -> Option<Vec<String>> {
        let media = Media::of(r, &self.options, &self.id).ok().filter(|_| r.status == Status::Ok)?;
        let exif = r.exif.as_ref().and_then(|e| {
            let Value::Object(fields) = serde_json::to_value(e).ok()? else { return None };
            let fields: serde_json::Map<String, Value> = fields.into_iter().filter(|(_, v)| !v.is_null()).collect();
            (!fields.is_empty()).then(|| Value::Object(fields).to_string())
        });
        let (name, mediatype) = file_name(&r.url);
        Some(vec![
            r.request_id.clone(),
            media.deployment,
            column(r, &Source::CAPTURE_METHOD)
                .filter(|m| matches!(*m, "activityDetection" | "timeLapse"))
                .unwrap_or("")
                .to_owned(),
            format_time(media.timestamp),
            r.url.clone(),
            // An object in a store is the operator's to share; a URL was fetched as it is.
            url::Url::parse(&r.url).is_ok_and(|u| !reefline_schemas::rules::is_object_scheme(u.scheme())).to_string(),
            name,
            mediatype.to_owned(),
            exif.unwrap_or_default(),
            String::new(),
            String::new(),
        ])
    }

    fn observation_row(&self, r: &ClassificationResult) -> Option<Vec<String>> {
        let media = Media::of(r, &self.options, &self.id).ok().filter(|_| r.status == Status::Ok)?;
        let top = r.predictions.first();
        let animal = top.is_some_and(|t| is_animal(t.index));
        let mut row = vec![String::new(); OBSERVATION_HEADER.len()];
        let time = format_time(media.timestamp);
        row[0] = r.request_id.clone();
        row[1] = media.deployment;
        row[2] = r.request_id.clone();
        row[4] = time.clone();
        row[5] = time;
        row[6] = "media".into();
        row[7] = if animal { "animal" } else { "unclassified" }.into();
        if let Some(top) = top {
            if animal {
                row[9] = top.scientific_name.clone().unwrap_or_default();
            }
            row[22] = "machine".into();
            row[23] = format!("{} {}", r.model_name, r.model_version);
            row[24] = DateTime::<Utc>::from_timestamp_millis(r.completed_at_ms)
                .map(|t| t.to_rfc3339_opts(SecondsFormat::Secs, true))
                .unwrap_or_default();
            row[25] = super::megadetector::round(top.score).to_string();
            let mut tags = vec![format!("imagenet:{}", top.label.replace('|', "/"))];
            if let Some(group) = &r.marine_group {
                tags.push(format!("marine_group:{group}"));
            }
            row[26] = tags.join(" | ");
        }
        Some(row)
    }

    fn datapackage(&self) -> Value {
        let resource = |name: &str| {
            json!({
                "name": name,
                "path": format!("{name}.csv"),
                "profile": "tabular-data-resource",
                "format": "csv",
                "mediatype": "text/csv",
                "encoding": "utf-8",
                "schema": format!("{PUBLISHED}{name}-table-schema.json"),
            })
        };
        let positions: Vec<(f64, f64)> = self.deployments.values().filter_map(|d| d.position(&self.options)).collect();
        let (lats, lons) = (positions.iter().map(|p| p.0), positions.iter().map(|p| p.1));
        let (south, north) = (lats.clone().fold(f64::INFINITY, f64::min), lats.fold(f64::NEG_INFINITY, f64::max));
        let (west, east) = (lons.clone().fold(f64::INFINITY, f64::min), lons.fold(f64::NEG_INFINITY, f64::max));
        let spatial = if south == north && west == east {
            json!({"type": "Point", "coordinates": [west, south]})
        } else {
            json!({"type": "Polygon", "coordinates": [[[west, south], [east, south], [east, north], [west, north], [west, south]]]})
        };
        let day = |t: &DateTime<FixedOffset>| t.format("%Y-%m-%d").to_string();
        let start = self.deployments.values().filter_map(|d| d.start).min();
        let end = self.deployments.values().filter_map(|d| d.end).max();
        let capture: Vec<&str> = if self.capture_methods.is_empty() {
            vec!["activityDetection"]
        } else {
            self.capture_methods.iter().map(String::as_str).collect()
        };
        let taxonomic: Vec<Value> = self
            .taxa
            .iter()
            .map(|(name, label)| json!({"scientificName": name, "vernacularNames": {"eng": label}}))
            .collect();
        let (what, id) = (self.what, &self.id);
        let name: String =
            format!("reefline-{what}-{id}")
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_') { c.to_ascii_lowercase() } else { '-' }
                })
                .collect();
        let mut description =
            format!("Machine classifications by Reefline of the {} classified images of {what} {id}.", self.classified);
        if self.failed > 0 {
            let images = if self.failed == 1 { "image" } else { "images" };
            description.push_str(&format!(" Left out: {} {images} that could not be classified.", self.failed));
        }
        json!({
            "resources": [resource("deployments"), resource("media"), resource("observations")],
            "profile": format!("{PUBLISHED}camtrap-dp-profile.json"),
            "name": name,
            "id": id,
            "created": Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true),
            "title": format!("Reefline classifications of {what} {id}"),
            "description": description,
            "contributors": [{"title": "Reefline", "role": "contributor"}],
            "sources": [{"title": "Reefline", "version": env!("CARGO_PKG_VERSION")}],
            "project": {
                "title": format!("{what} {id}"),
                "samplingDesign": self.options.sampling_design,
                "captureMethod": capture,
                "individualAnimals": false,
                "observationLevel": ["media"],
            },
            "spatial": spatial,
            "temporal": {"start": start.as_ref().map(day), "end": end.as_ref().map(day)},
            "taxonomic": taxonomic,
        })
    }
}

fn is_animal(index: i32) -> bool {
    (0..=LAST_ANIMAL_CLASS).contains(&index)
}

/// A time as the tables write it: ISO 8601 to the second, with its offset (`Z` for UTC).
fn format_time(t: DateTime<FixedOffset>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// The file's name (the URL's last segment, decoded) and its media type, from its extension.
fn file_name(url: &str) -> (String, &'static str) {
    let path = url.split(['?', '#']).next().unwrap_or(url);
    let last = path.rsplit('/').next().unwrap_or("");
    let name = percent_encoding::percent_decode_str(last).decode_utf8_lossy().into_owned();
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

impl Archive {
    /// Writes `datapackage.json` and `deployments.csv`, which the check pass gave.
    pub fn write_head(&mut self, plan: &Plan) -> std::io::Result<()> {
        let mut package = self.entry("datapackage.json")?;
        serde_json::to_writer_pretty(&mut package, &plan.datapackage())?;
        Self::close(package)?;
        let mut deployments = self.table("deployments.csv", &DEPLOYMENT_HEADER)?;
        for row in plan.deployment_rows() {
            deployments.write_record(&row)?;
        }
        Self::end_table(deployments)
    }

    /// Starts the table of `part`, its header written.
    pub fn open(&mut self, part: Part) -> std::io::Result<Table<'_>> {
        match part {
            Part::Media => self.table("media.csv", &MEDIA_HEADER),
            Part::Observations => self.table("observations.csv", &OBSERVATION_HEADER),
        }
    }
}

/// The tables written a pass each, as the results are read.
#[derive(Clone, Copy, Debug)]
pub enum Part {
    Media,
    Observations,
}

impl Plan {
    /// Writes `r`'s row of `part` to `table`, if it has one.
    pub fn write(&self, part: Part, table: &mut Table<'_>, r: &ClassificationResult) -> std::io::Result<()> {
        let row = match part {
            Part::Media => self.media_row(r),
            Part::Observations => self.observation_row(r),
        };
        match row {
            Some(row) => table.write_record(&row).map_err(Into::into),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_are_read_in_the_forms_people_write() {
        let hours = |h: i32| FixedOffset::east_opt(h * 3600);
        assert_eq!(parse_offset("+10:00"), hours(10));
        assert_eq!(parse_offset("+1000"), hours(10));
        assert_eq!(parse_offset("-05"), hours(-5));
        assert_eq!(parse_offset("Z"), hours(0));
        assert_eq!(parse_offset("+05:30"), FixedOffset::east_opt(5 * 3600 + 1800));
        for bad in ["10:00", "+1", "+25:00", "+10:0", "+10:00:00", "UTC", ""] {
            assert_eq!(parse_offset(bad), None, "{bad}");
        }
    }

    #[test]
    fn times_keep_their_offset_and_naive_ones_need_one() {
        let ten = FixedOffset::east_opt(36000);
        let written = |text: &str, offset| timestamp(text, offset).map(format_time).map_err(|_| ());
        assert_eq!(written("2026-11-20T09:41:07+10:00", None), Ok("2026-11-20T09:41:07+10:00".into()));
        assert_eq!(written("2026-11-20T09:41:07.250Z", None), Ok("2026-11-20T09:41:07Z".into()));
        assert_eq!(written("2026:11:20 09:41:07", ten), Ok("2026-11-20T09:41:07+10:00".into()));
        assert_eq!(written("2026-11-20 09:41:07", ten), Ok("2026-11-20T09:41:07+10:00".into()));
        assert!(matches!(timestamp("2026-11-20 09:41:07", None), Err(Lack::Offset(_))));
        assert!(matches!(timestamp("yesterday", ten), Err(Lack::UnreadableTime(_))));
    }

    /// A classified photo, its top class `index` (with `scientific` name), with `metadata`.
    fn result(line: i64, index: i32, scientific: Option<&str>, metadata: &[(&str, &str)]) -> ClassificationResult {
        let metadata: reefline_schemas::Metadata =
            metadata.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        serde_json::from_value(json!({
            "request_id": format!("r{line}"), "batch_id": "b", "batch_index": 0, "batch_size": 1,
            "url": format!("s3://reef/survey/{line}.jpg"), "status": "ok",
            "predictions": [{"index": index, "wnid": "n0", "label": format!("class {index}"), "scientific_name": scientific, "score": 0.81234}],
            "marine_group": scientific.map(|_| "shark"),
            "model_name": "efficientnet-lite0", "model_version": "1",
            "submitted_at_ms": 1_764_000_000_000_i64, "completed_at_ms": 1_764_000_001_000_i64,
            "feed_id": "f", "line": line, "metadata": metadata,
        }))
        .expect("a result")
    }

    fn options() -> Options {
        Options { utc_offset: None, coordinates: None, sampling_design: "opportunistic".into() }
    }

    #[test]
    fn a_marine_animal_is_observed_by_its_scientific_name_and_other_classes_are_unclassified() {
        let place = [("station", "S1"), ("lat", "-16.5"), ("lon", "145.5"), ("timestamp", "2026-11-20T06:00:00+10:00")];
        let shark = result(2, 2, Some("Carcharodon carcharias"), &place);
        let coffee = result(3, 967, None, &place);
        let mut plan = Plan::new(options(), "feed", "F1".into());
        plan.check(&shark);
        plan.check(&coffee);
        assert!(plan.refusal().is_none());
        let row = plan.observation_row(&shark).unwrap();
        let cell =
            |row: &[String], name: &str| row[OBSERVATION_HEADER.iter().position(|h| *h == name).unwrap()].clone();
        assert_eq!(
            [
                "deploymentID",
                "observationType",
                "scientificName",
                "classifiedBy",
                "classificationProbability",
                "observationTags"
            ]
            .map(|n| cell(&row, n)),
            [
                "S1",
                "animal",
                "Carcharodon carcharias",
                "efficientnet-lite0 1",
                "0.8123",
                "imagenet:class 2 | marine_group:shark"
            ]
        );
        let row = plan.observation_row(&coffee).unwrap();
        assert_eq!(
            (cell(&row, "observationType"), cell(&row, "scientificName")),
            ("unclassified".into(), String::new())
        );
        let media = plan.media_row(&shark).unwrap();
        assert_eq!((media[5].as_str(), media[7].as_str()), ("false", "image/jpeg"), "an s3:// object is not public");
        let mut blob = shark.clone();
        blob.url = "az://reef/survey/2.jpg".into();
        assert_eq!(plan.media_row(&blob).unwrap()[5], "false", "nor is an az:// blob");
        let mut web = shark.clone();
        web.url = "https://photos.example/2.jpg".into();
        assert_eq!(plan.media_row(&web).unwrap()[5], "true");
        let package = plan.datapackage();
        assert_eq!(
            package["taxonomic"],
            json!([{"scientificName": "Carcharodon carcharias", "vernacularNames": {"eng": "class 2"}}])
        );
        assert_eq!(package["spatial"], json!({"type": "Point", "coordinates": [145.5, -16.5]}));
        assert_eq!(package["name"], json!("reefline-feed-f1"));
    }

    #[test]
    fn what_cannot_be_filled_is_named_with_how_to_fill_it() {
        let mut plan = Plan::new(options(), "feed", "F1".into());
        plan.check(&result(2, 1, None, &[("deploymentID", "A"), ("timestamp", "2026-11-20T06:00:00Z")]));
        plan.check(&result(3, 1, None, &[("deploymentID", "B")]));
        plan.check(&result(4, 1, None, &[("deploymentID", "B"), ("timestamp", "2026-11-20 06:00:00")]));
        plan.check(&result(5, 1, None, &[("deploymentID", "B"), ("timestamp", "noon")]));
        plan.check(&result(
            6,
            1,
            None,
            &[("timestamp", "2026-11-20T06:00:00Z"), ("latitude", "95"), ("longitude", "1")],
        ));
        let refusal = plan.refusal().expect("refused");
        assert_eq!(refusal.missing, ["timestamp", "utc_offset", "latitude", "longitude"]);
        for part in [
            "1 classified images have no time taken (the first: line 3)",
            "1 classified images have a time taken without a UTC offset (the first: line 4 (2026-11-20 06:00:00))",
            "1 classified images have a `timestamp` that is not an ISO 8601 time (the first: line 5 (noon))",
            "(the first: line 6 (95, 1))",
            "1 deployments have no coordinates (the first: `A`)",
        ] {
            assert!(refusal.message.contains(part), "{part}: {}", refusal.message);
        }
        // Coordinates given for the deployments that have none place them.
        let mut plan = Plan::new(Options { coordinates: Some((-16.0, 145.0)), ..options() }, "feed", "F1".into());
        plan.check(&result(2, 1, None, &[("timestamp", "2026-11-20T06:00:00Z")]));
        assert!(plan.refusal().is_none());
        assert_eq!(plan.deployment_rows().next().unwrap()[..5], ["F1", "", "", "-16", "145"].map(String::from));
        // What the tables would read as missing, and URLs a filePath may not hold.
        let mut plan = Plan::new(options(), "feed", "F1".into());
        let time = ("timestamp", "2026-11-20T06:00:00Z");
        plan.check(&result(2, 1, None, &[("station", "NA"), time]));
        let mut dotted = result(3, 1, None, &[time]);
        dotted.url = "https://photos.example/a..b.jpg".into();
        plan.check(&dotted);
        let refusal = plan.refusal().expect("refused");
        assert_eq!(refusal.missing, ["deploymentID", "filePath"], "{}", refusal.message);
        // Nothing to export is refused too (the package needs a deployment).
        assert!(
            Plan::new(options(), "feed", "F1".into())
                .refusal()
                .unwrap()
                .message
                .contains("no classified image matches")
        );
    }

    #[test]
    fn file_names_and_media_types_come_from_the_url() {
        assert_eq!(file_name("s3://reef/survey/A%201/IMG_0001.JPG"), ("IMG_0001.JPG".into(), "image/jpeg"));
        assert_eq!(file_name("https://x.example/p/fish.png?sig=1"), ("fish.png".into(), "image/png"));
        assert_eq!(file_name("https://x.example/photo"), ("photo".into(), "image/*"));
    }
}
