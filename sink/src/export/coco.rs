//! The COCO Camera Traps format, as MegaDetector's `data_management` documents it and its
//! `integrity_check_json_db` checks it: `images` (one per result, its id the request id), then
//! image-level `annotations` (one per classified image, of its top class), then `categories` and
//! `info`. The results are read twice, images first and annotations second, from one snapshot of
//! the database, so the export streams in constant memory.
//!
//! A category's id is its class id plus one (id 0 is `empty`, as the format reserves it; Reefline
//! never answers empty): an ImageNet model's class index, a later class table's after ImageNet's
//! (see [`Classes`]); a label used twice (ImageNet's two cranes) carries its id. An image's `location` is its metadata's `location`,
//! `deploymentID`, `station` or `site` (the first present); its `datetime` is its metadata's
//! `timestamp` or `datetime`, else when its EXIF says it was taken; `seq_id`, `seq_num_frames` and
//! `frame_num` come from metadata columns of those names; `width` and `height` from its header. An
//! image that could not be classified has `corrupt: true`, its error under `error`, and no
//! annotation. Each annotation carries the top class's `score`, a key the format does not name.

use std::sync::Arc;

use axum::body::Bytes;
use reefline_schemas::{ClassificationResult, Status};
use serde_json::{Value, json};

use super::Encode;
use super::classes::Classes;

/// Metadata columns that name an image's location, in the order they are looked for.
pub const LOCATION_COLUMNS: [&str; 4] = ["location", "deploymentID", "station", "site"];

/// Metadata columns that give when an image was taken.
pub const DATETIME_COLUMNS: [&str; 2] = ["timestamp", "datetime"];

/// A COCO Camera Traps export, written as its results stream by, twice.
pub struct Coco {
    out: Vec<u8>,
    classes: Arc<Classes>,
    /// The class tables the results' models use.
    tables: std::collections::BTreeSet<usize>,
    /// The pass being written: 0 the images, 1 the annotations.
    pass: usize,
    /// Items written in this pass (for the commas).
    written: usize,
    /// Classes seen in the annotations, by id, named from the results where the label table lacks them.
    seen: std::collections::BTreeMap<i32, String>,
    what: String,
}

impl Coco {
    /// An export naming the classes after `classes`; `what` (a feed's or batch's id) goes in `info`.
    pub fn new(classes: Arc<Classes>, what: String) -> Self {
        let out = br#"{"images":["#.to_vec();
        Self { out, classes, tables: Default::default(), pass: 0, written: 0, seen: Default::default(), what }
    }

    fn image(r: &ClassificationResult) -> Value {
        let mut image = json!({ "id": r.request_id, "file_name": r.url });
        let metadata = r.metadata.as_ref();
        let column =
            |names: &[&str]| metadata.and_then(|m| names.iter().find_map(|n| m.get(*n).filter(|v| !v.is_empty())));
        if let Some(location) = column(&LOCATION_COLUMNS) {
            image["location"] = json!(location);
        }
        let taken = r.exif.as_ref().and_then(|e| e.taken_at.as_deref());
        if let Some(datetime) = column(&DATETIME_COLUMNS).map(String::as_str).or(taken).and_then(coco_datetime) {
            image["datetime"] = json!(datetime);
        }
        if let Some(seq) = column(&["seq_id"]) {
            image["seq_id"] = json!(seq);
        }
        for field in ["seq_num_frames", "frame_num"] {
            if let Some(n) = column(&[field]).and_then(|v| v.parse::<u32>().ok()) {
                image[field] = json!(n);
            }
        }
        if let Some(exif) = &r.exif
            && let (Some(width), Some(height)) = (exif.width, exif.height)
        {
            image["width"] = json!(width);
            image["height"] = json!(height);
        }
        if r.status == Status::Error {
            image["corrupt"] = json!(true);
            let (kind, message) = (r.error_kind.as_deref().unwrap_or(""), r.error_message.as_deref().unwrap_or(""));
            image["error"] = json!(format!("{kind}: {message}"));
        }
        if let Some(metadata) = metadata.filter(|m| !m.is_empty()) {
            image["metadata"] = json!(metadata);
        }
        image
    }

    fn annotation(&mut self, r: &ClassificationResult) -> Option<Value> {
        let top = r.predictions.first().filter(|_| r.status == Status::Ok)?;
        let id = self.classes.id(&r.model_name, top.index);
        self.tables.insert(self.classes.table(&r.model_name));
        self.seen.entry(id).or_insert_with(|| top.label.clone());
        Some(json!({
            "id": r.request_id,
            "image_id": r.request_id,
            "category_id": id + 1,
            "sequence_level_annotation": false,
            "score": super::megadetector::round(top.score),
        }))
    }

    fn write(&mut self, item: &Value) {
        if self.written > 0 {
            self.out.push(b',');
        }
        self.written += 1;
        let _ = serde_json::to_writer(&mut self.out, item);
    }
}

/// A time as the format writes it, `2026-11-20 09:41:07`, from ISO 8601 (its offset dropped: the
/// camera's local time, as camera-trap data keeps it) or from that form already.
fn coco_datetime(text: &str) -> Option<String> {
    let text = text.trim();
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(text) {
        return Some(t.naive_local().format("%Y-%m-%d %H:%M:%S").to_string());
    }
    ["%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S", "%Y:%m:%d %H:%M:%S"]
        .iter()
        .find_map(|f| chrono::NaiveDateTime::parse_from_str(text, f).ok())
        .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
}

impl Encode for Coco {
    fn passes(&self) -> usize {
        2
    }

    fn next_pass(&mut self) {
        self.pass += 1;
        self.written = 0;
        self.out.extend_from_slice(br#"],"annotations":["#);
    }

    fn push(&mut self, result: ClassificationResult) {
        match self.pass {
            0 => self.write(&Self::image(&result)),
            _ => {
                if let Some(annotation) = self.annotation(&result) {
                    self.write(&annotation);
                }
            }
        }
    }

    fn buffered(&self) -> usize {
        self.out.len()
    }

    fn take(&mut self) -> Bytes {
        Bytes::from(std::mem::take(&mut self.out))
    }

    fn finish(&mut self) {
        let mut names: std::collections::BTreeMap<i32, String> = self.classes.named(&self.tables).into_iter().collect();
        for (index, label) in std::mem::take(&mut self.seen) {
            names.entry(index).or_insert(label);
        }
        // Names must be unique, and ImageNet has a few twice (crane the bird and the machine, two
        // missiles, two maillots): those carry their class index.
        let mut uses = std::collections::HashMap::<&str, usize>::new();
        for name in names.values() {
            *uses.entry(name.as_str()).or_default() += 1;
        }
        let mut categories = vec![json!({"id": 0, "name": "empty"})];
        categories.extend(names.iter().map(|(i, name)| {
            let name = if uses[name.as_str()] > 1 { format!("{name} ({i})") } else { name.clone() };
            json!({"id": i + 1, "name": name})
        }));
        let tail = json!({
            "categories": categories,
            "info": {
                "version": "1.0",
                "description": format!("Reefline classifications of {}", self.what),
                "contributor": "Reefline",
                "date_created": chrono::Utc::now().format("%Y-%m-%d").to_string(),
            },
        });
        let tail = serde_json::to_string(&tail).unwrap_or_else(|_| "{}".into());
        self.out.extend_from_slice(b"],");
        self.out.extend_from_slice(&tail.as_bytes()[1..]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_written_as_the_format_writes_them() {
        assert_eq!(coco_datetime("2026-11-20T09:41:07+10:00").as_deref(), Some("2026-11-20 09:41:07"));
        assert_eq!(coco_datetime("2026:11:20 09:41:07").as_deref(), Some("2026-11-20 09:41:07"));
        assert_eq!(coco_datetime("2026-11-20 09:41:07").as_deref(), Some("2026-11-20 09:41:07"));
        assert_eq!(coco_datetime("yesterday"), None);
    }
}
