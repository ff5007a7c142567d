//! The CSV export: one row per image.

use axum::body::Bytes;
use reefline_schemas::ClassificationResult;
use reefline_schemas::view::rfc3339;

use super::Encode;

/// How many predictions the CSV gives columns to.
const TOP: usize = 5;

/// Results as CSV rows: one per image, the metadata columns given, the top-5 as columns.
pub struct Table {
    csv: csv::Writer<Vec<u8>>,
    /// The metadata columns, by their keys.
    columns: Vec<String>,
}

/// What the photo says of itself, as CSV columns.
const EXIF: [&str; 8] =
    ["taken_at", "gps_latitude", "gps_longitude", "gps_altitude", "camera_make", "camera_model", "width", "height"];

/// The CSV's columns before the metadata, and after it.
const LEADING: [&str; 2] = ["url", "line"];

fn trailing() -> Vec<String> {
    let mut names: Vec<String> = ["status", "error_kind", "error_message"].map(String::from).to_vec();
    for n in 1..=TOP {
        names.extend([format!("top{n}_label"), format!("top{n}_index"), format!("top{n}_score")]);
        if n == 1 {
            names.extend(["marine", "marine_group", "scientific_name"].map(String::from));
        }
    }
    names.extend(EXIF.map(String::from));
    names.extend(
        [
            "sha256",
            "cached",
            "model",
            "model_version",
            "submitted_at",
            "completed_at",
            "request_id",
            "batch_id",
            "feed_id",
        ]
        .map(String::from),
    );
    names
}

impl Table {
    /// A table with `columns` of metadata, its header written.
    pub fn new(columns: Vec<String>) -> Self {
        let mut table = Self { csv: csv::Writer::from_writer(Vec::new()), columns };
        let fixed = trailing();
        // A metadata column named like one of ours is shown as `meta_<name>`.
        let shown = table
            .columns
            .iter()
            .map(|c| if LEADING.contains(&c.as_str()) || fixed.contains(c) { format!("meta_{c}") } else { c.clone() });
        let shown: Vec<String> = shown.collect();
        let header: Vec<String> = LEADING.map(String::from).into_iter().chain(shown).chain(fixed).collect();
        let _ = table.csv.write_record(&header);
        table
    }
}

impl Encode for Table {
    fn push(&mut self, result: ClassificationResult) {
        let _ = self.csv.write_record(self.row(result));
    }

    fn buffered(&self) -> usize {
        self.csv.get_ref().len()
    }

    fn take(&mut self) -> Bytes {
        let full = std::mem::replace(&mut self.csv, csv::Writer::from_writer(Vec::new()));
        Bytes::from(full.into_inner().unwrap_or_default())
    }
}

impl Table {
    fn row(&self, r: ClassificationResult) -> Vec<String> {
        let metadata = r.metadata.unwrap_or_default();
        let mut row = vec![r.url, r.line.map(|l| l.to_string()).unwrap_or_default()];
        row.extend(self.columns.iter().map(|c| metadata.get(c).cloned().unwrap_or_default()));
        row.extend([
            r.status.as_str().to_owned(),
            r.error_kind.unwrap_or_default(),
            r.error_message.unwrap_or_default(),
        ]);
        for n in 0..TOP {
            let p = r.predictions.get(n);
            row.extend([
                p.map(|p| p.label.clone()).unwrap_or_default(),
                p.map(|p| p.index.to_string()).unwrap_or_default(),
                p.map(|p| format!("{:.6}", p.score)).unwrap_or_default(),
            ]);
            if n == 0 {
                let marine = if r.status == reefline_schemas::Status::Ok {
                    r.marine_group.is_some().to_string()
                } else {
                    String::new()
                };
                let scientific = p.and_then(|p| p.scientific_name.clone()).unwrap_or_default();
                row.extend([marine, r.marine_group.clone().unwrap_or_default(), scientific]);
            }
        }
        let exif = r.exif.unwrap_or_default();
        let number = |v: Option<f64>| v.map(|v| v.to_string()).unwrap_or_default();
        row.extend([
            exif.taken_at.unwrap_or_default(),
            number(exif.gps_latitude),
            number(exif.gps_longitude),
            number(exif.gps_altitude),
            exif.camera_make.unwrap_or_default(),
            exif.camera_model.unwrap_or_default(),
            exif.width.map(|v| v.to_string()).unwrap_or_default(),
            exif.height.map(|v| v.to_string()).unwrap_or_default(),
            r.sha256.unwrap_or_default(),
            r.cached.to_string(),
            r.model_name,
            r.model_version,
            rfc3339(r.submitted_at_ms),
            rfc3339(r.completed_at_ms),
            r.request_id,
            r.batch_id,
            r.feed_id.unwrap_or_default(),
        ]);
        row
    }
}
