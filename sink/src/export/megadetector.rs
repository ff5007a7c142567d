//! The MegaDetector batch output format (1.6), which Timelapse, AddaxAI and the MegaDetector
//! tools read. Reefline detects nothing: each image gets one detection covering the whole image
//! (`bbox` `[0, 0, 1, 1]`), of category `1` ("animal") when its top class is an animal (the
//! manifest's `animals`: ImageNet's classes 0 to 397) and `4` ("other") otherwise, whose `conf` is
//! the top class's score and whose `classifications` are the top-5 `[class id, score]` (a class's
//! id is its index for ImageNet's models; see [`Classes`]). `classification_categories` names
//! every class of the tables the results' models use (ImageNet's 1,000 when none) by id and
//! `classification_category_descriptions` gives each its
//! scientific name where the marine table has one (else its label again); `file` is the image's
//! URL, or its path below `relative_to` when it starts with it, percent-decoded (Timelapse reads
//! paths relative to the image folder); an image that failed has `failure` (`<kind>: <message>`) and no detections. Each image also carries its `metadata` and `exif`, under
//! keys the format does not name (its readers and validator leave them alone).

use std::collections::BTreeSet;
use std::sync::Arc;

use axum::body::Bytes;
use reefline_schemas::{ClassificationResult, Status};
use serde_json::{Value, json};

use super::Encode;
use super::classes::Classes;

/// The format version written.
pub const FORMAT_VERSION: &str = "1.6";

/// A URL's text percent-decoded (lossily, as a path to show).
pub(super) fn decoded(text: &str) -> String {
    percent_encoding::percent_decode_str(text).decode_utf8_lossy().into_owned()
}

/// An export in the MegaDetector format, written as its results stream by: `images` first, the
/// categories and `info` (which names the models that gave the results) after the last image.
pub struct Batch {
    out: Vec<u8>,
    images: usize,
    classes: Arc<Classes>,
    /// The class tables the results' models use.
    tables: BTreeSet<usize>,
    /// Classes seen, by id: their labels (for classes the label table lacks) and scientific names.
    seen: std::collections::BTreeMap<i32, (String, Option<String>)>,
    /// A prefix of the URLs that `file` leaves out, decoded and ending with `/`.
    relative_to: Option<String>,
    models: BTreeSet<String>,
    last_completed_ms: i64,
}

impl Batch {
    /// An export naming the classes after `classes`, its files relative to `relative_to`.
    pub fn new(classes: Arc<Classes>, relative_to: Option<String>) -> Self {
        Self {
            out: br#"{"images":["#.to_vec(),
            images: 0,
            classes,
            tables: BTreeSet::new(),
            seen: Default::default(),
            relative_to: relative_to.map(|prefix| {
                let prefix = decoded(&prefix);
                if prefix.ends_with('/') { prefix } else { format!("{prefix}/") }
            }),
            models: BTreeSet::new(),
            last_completed_ms: 0,
        }
    }

    fn image(&mut self, r: ClassificationResult) -> Value {
        let mut image = self.detections(&r);
        // What the format does not name, under keys of their own (readers ignore them).
        if let Some(metadata) = r.metadata.filter(|m| !m.is_empty()) {
            image["metadata"] = json!(metadata);
        }
        if let Some(exif) = r.exif {
            image["exif"] = json!(exif);
        }
        image
    }

    /// The image's `file`: its URL, or its path below `relative_to` (both compared decoded, the
    /// prefix ending at a `/`).
    fn file(&self, url: &str) -> String {
        let Some(prefix) = self.relative_to.as_deref() else { return url.to_owned() };
        let decoded = decoded(url);
        match decoded.strip_prefix(prefix) {
            Some(rest) if !rest.is_empty() => rest.to_owned(),
            _ => url.to_owned(),
        }
    }

    fn detections(&mut self, r: &ClassificationResult) -> Value {
        self.last_completed_ms = self.last_completed_ms.max(r.completed_at_ms);
        let file = self.file(&r.url);
        if r.status == Status::Error {
            let (kind, message) = (r.error_kind.as_deref().unwrap_or(""), r.error_message.as_deref().unwrap_or(""));
            return json!({ "file": file, "failure": format!("{kind}: {message}"), "detections": null });
        }
        self.models.insert(format!("{} {}", r.model_name, r.model_version));
        let Some(top) = r.predictions.first() else { return json!({ "file": file, "detections": [] }) };
        let category = if self.classes.is_animal(&r.model_name, top.index) { "1" } else { "4" };
        self.tables.insert(self.classes.table(&r.model_name));
        let classifications: Vec<Value> = r
            .predictions
            .iter()
            .take(5)
            .map(|p| {
                let id = self.classes.id(&r.model_name, p.index);
                self.seen.entry(id).or_insert_with(|| (p.label.clone(), p.scientific_name.clone()));
                json!([id.to_string(), round(p.score)])
            })
            .collect();
        let detection = json!({
            "category": category,
            "conf": round(top.score),
            "bbox": [0.0, 0.0, 1.0, 1.0],
            "classifications": classifications,
        });
        json!({ "file": file, "detections": [detection] })
    }
}

/// Scores to four decimals, as MegaDetector writes them (and the COCO export too).
pub(super) fn round(score: f32) -> f64 {
    (f64::from(score) * 10_000.0).round() / 10_000.0
}

impl Encode for Batch {
    fn push(&mut self, result: ClassificationResult) {
        let image = self.image(result);
        if self.images > 0 {
            self.out.push(b',');
        }
        self.images += 1;
        let _ = serde_json::to_writer(&mut self.out, &image);
    }

    fn buffered(&self) -> usize {
        self.out.len()
    }

    fn take(&mut self) -> Bytes {
        Bytes::from(std::mem::take(&mut self.out))
    }

    fn finish(&mut self) {
        let mut categories: std::collections::BTreeMap<i32, (String, Option<String>)> =
            self.classes.named(&self.tables).into_iter().map(|(i, l)| (i, (l, None))).collect();
        for (index, (label, scientific)) in std::mem::take(&mut self.seen) {
            let entry = categories.entry(index).or_insert((label, None));
            entry.1 = entry.1.take().or(scientific);
        }
        // The same ids in both, as the format requires.
        let descriptions: serde_json::Map<String, Value> = categories
            .iter()
            .map(|(i, (label, scientific))| (i.to_string(), Value::String(scientific.clone().unwrap_or(label.clone()))))
            .collect();
        let categories: serde_json::Map<String, Value> =
            categories.into_iter().map(|(i, (l, _))| (i.to_string(), Value::String(l))).collect();
        let completed = chrono::DateTime::from_timestamp_millis(self.last_completed_ms)
            .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string());
        let info = json!({
            "format_version": FORMAT_VERSION,
            "detector": "none: one whole-image detection per image (Reefline)",
            "classifier": self.models.iter().cloned().collect::<Vec<_>>().join(", "),
            "classification_completion_time": completed,
            "classifier_metadata": { "typical_classification_threshold": 0.3 },
            // No detector ran: each detection is the whole image, its confidence the top class's.
            "detector_metadata": {
                "megadetector_version": "none",
                "typical_detection_threshold": 0.3,
                "conservative_detection_threshold": 0.1,
            },
        });
        let tail = json!({
            "detection_categories": { "1": "animal", "4": "other" },
            "classification_categories": categories,
            "classification_category_descriptions": descriptions,
            "info": info,
        });
        // The tail's members follow `images` in the same object.
        let tail = serde_json::to_string(&tail).unwrap_or_else(|_| "{}".into());
        self.out.extend_from_slice(b"],");
        self.out.extend_from_slice(&tail.as_bytes()[1..]);
    }
}
