//! The check pass: what each deployment is (from its images), the taxa and capture methods seen,
//! and what a package could not be written for.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, FixedOffset};
use reefline_schemas::{ClassificationResult, Status};

use super::{Lack, MAX_DEPLOYMENTS, Media, Options, Source, column};
use crate::export::classes::Classes;
use std::sync::Arc;

/// A deployment, gathered from its images.
#[derive(Default)]
pub(super) struct Deployment {
    pub(super) location_id: Option<String>,
    pub(super) location_name: Option<String>,
    pub(super) camera_id: Option<String>,
    pub(super) camera_model: Option<String>,
    /// Sums of the latitudes and longitudes given, and how many: the deployment is at their mean.
    pub(super) coordinates: (f64, f64, u32),
    pub(super) start: Option<DateTime<FixedOffset>>,
    pub(super) end: Option<DateTime<FixedOffset>>,
}

impl Deployment {
    pub(super) fn position(&self, options: &Options) -> Option<(f64, f64)> {
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
    pub(super) options: Options,
    /// Which classes are animals (only an animal's scientific name is an observation's).
    pub(super) classes: Arc<Classes>,
    /// `feed`, `batch` or `search`, and its id: the package's name.
    pub(super) what: &'static str,
    pub(super) id: String,
    /// The deployment of images that name none: the feed or batch exported; none in a search,
    /// where each such image's own feed or batch is its deployment.
    pub(super) deployment: Option<String>,
    pub(super) deployments: BTreeMap<String, Deployment>,
    /// Scientific names seen, with the ImageNet label of each.
    pub(super) taxa: BTreeMap<String, String>,
    pub(super) capture_methods: BTreeSet<String>,
    pub(super) classified: u64,
    /// Images left out because they could not be classified.
    pub(super) failed: u64,
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
    pub fn new(
        options: Options,
        classes: Arc<Classes>,
        what: &'static str,
        id: String,
        deployment: Option<String>,
    ) -> Self {
        Self {
            options,
            classes,
            what,
            id,
            deployment,
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

    /// The deployment of `r` if it names none.
    pub(super) fn default_deployment<'a>(&'a self, r: &'a ClassificationResult) -> &'a str {
        self.deployment.as_deref().unwrap_or_else(|| r.feed_id.as_deref().unwrap_or(&r.batch_id))
    }

    /// Takes in one result of the check pass.
    pub fn check(&mut self, r: &ClassificationResult) {
        if r.status != Status::Ok {
            self.failed += 1;
            return;
        }
        self.classified += 1;
        let example = || r.line.map_or_else(|| r.url.clone(), |line| format!("line {line}"));
        let media = match Media::of(r, &self.options, self.default_deployment(r)) {
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
            && let Some(name) =
                top.scientific_name.as_deref().filter(|_| self.classes.is_animal(&r.model_name, top.index))
        {
            self.taxa.entry(name.to_owned()).or_insert_with(|| top.label.clone());
        }
    }

    /// Whether the package can be written; if not, what is missing and how to supply it.
    pub fn refusal(&self) -> Option<Refusal> {
        let mut missing = Vec::new();
        let mut reasons = Vec::new();
        for (field, tally, what, how) in self.lacks() {
            if tally.count > 0 {
                if !missing.contains(&field) {
                    missing.push(field);
                }
                let first = tally.first.as_deref().unwrap_or("");
                reasons.push(format!("{} classified images {what} (the first: {first}); {how}", tally.count));
            }
        }
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

    /// What images may lack, each tallied: the field that would fill it, what the images lack,
    /// and how to supply it.
    fn lacks(&self) -> [(&'static str, &Tally, &'static str, &'static str); 6] {
        [
            (
                "timestamp",
                &self.no_time,
                "have no time taken",
                "add a `timestamp` column (ISO 8601 with its UTC offset) to the feed, or send photos whose EXIF gives DateTimeOriginal",
            ),
            (
                "utc_offset",
                &self.no_offset,
                "have a time taken without a UTC offset",
                "give the cameras' offset as `utc_offset` (e.g. utc_offset=+10:00)",
            ),
            (
                "timestamp",
                &self.unreadable_time,
                "have a `timestamp` that is not an ISO 8601 time",
                "write it as 2026-11-20T09:41:07+10:00",
            ),
            (
                "deploymentID",
                &self.missing_deployment,
                "name their deployment as the tables write a missing value (NA, NaN or nan)",
                "name it otherwise",
            ),
            (
                "filePath",
                &self.dotted_path,
                "have a URL holding `..`, which Camtrap DP's filePath may not",
                "rename those objects, or leave them out with the export's filters",
            ),
            (
                "latitude",
                &self.unreadable_coordinates,
                "have a latitude and longitude that are not degrees in range (or only one of them)",
                "write both as decimal degrees",
            ),
        ]
    }
}
