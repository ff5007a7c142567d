//! The package's contents: `datapackage.json` and the three tables' rows, as the check pass and
//! each result give them.

use chrono::{DateTime, FixedOffset, SecondsFormat, Utc};
use reefline_schemas::{ClassificationResult, Status};
use serde_json::{Value, json};

use super::{Archive, Media, PUBLISHED, Plan, Source, Table, column, file_name, format_time};

/// The columns of the three tables, as their 1.0.2 schemas order them.
pub(super) const DEPLOYMENT_HEADER: [&str; 24] = [
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
pub(super) const MEDIA_HEADER: [&str; 11] = [
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
pub(super) const OBSERVATION_HEADER: [&str; 28] = [
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

impl Plan {
    /// Each deployment's row, one at a time.
    pub(super) fn deployment_rows(&self) -> impl Iterator<Item = [String; DEPLOYMENT_HEADER.len()]> + '_ {
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

    /// `r`'s facts, when it was classified and they can be written.
    fn media(&self, r: &ClassificationResult) -> Option<Media> {
        if r.status != Status::Ok {
            return None;
        }
        Media::of(r, &self.options, self.default_deployment(r)).ok()
    }

    pub(super) fn media_row(&self, r: &ClassificationResult) -> Option<Vec<String>> {
        let media = self.media(r)?;
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
            // (A stored URL is canonical: its scheme is the text before the first `:`.)
            r.url
                .split_once(':')
                .is_some_and(|(scheme, _)| !reefline_schemas::rules::is_object_scheme(scheme))
                .to_string(),
            name,
            mediatype.to_owned(),
            exif.unwrap_or_default(),
            String::new(),
            String::new(),
        ])
    }

    pub(super) fn observation_row(&self, r: &ClassificationResult) -> Option<Vec<String>> {
        let media = self.media(r)?;
        let top = r.predictions.first();
        let animal = top.is_some_and(|t| self.classes.is_animal(&r.model_name, t.index));
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
            row[25] = crate::export::megadetector::round(top.score).to_string();
            let mut tags = vec![format!("imagenet:{}", top.label.replace('|', "/"))];
            if let Some(group) = &r.marine_group {
                tags.push(format!("marine_group:{group}"));
            }
            row[26] = tags.join(" | ");
        }
        Some(row)
    }

    pub(super) fn datapackage(&self) -> Value {
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
