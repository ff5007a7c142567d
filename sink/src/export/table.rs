//! The CSV export: one row per image. Every text cell is made inert for spreadsheets (OWASP's
//! CSV-injection rule, [`text`]); the numbers we write ourselves stay numbers.

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
        // A metadata column named like one of ours is shown as `meta_<name>`; the names are a client's.
        let shown = table.columns.iter().map(|c| {
            if LEADING.contains(&c.as_str()) || fixed.contains(c) { format!("meta_{c}") } else { text(c.clone()) }
        });
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
        let mut row = vec![text(r.url), r.line.map(|l| l.to_string()).unwrap_or_default()];
        row.extend(self.columns.iter().map(|c| text(metadata.get(c).cloned().unwrap_or_default())));
        row.extend([
            r.status.as_str().to_owned(),
            text(r.error_kind.unwrap_or_default()),
            text(r.error_message.unwrap_or_default()),
        ]);
        for n in 0..TOP {
            let p = r.predictions.get(n);
            row.extend([
                text(p.map(|p| p.label.clone()).unwrap_or_default()),
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
                row.extend([marine, text(r.marine_group.clone().unwrap_or_default()), text(scientific)]);
            }
        }
        let exif = r.exif.unwrap_or_default();
        let number = |v: Option<f64>| v.map(|v| v.to_string()).unwrap_or_default();
        row.extend([
            text(exif.taken_at.unwrap_or_default()),
            number(exif.gps_latitude),
            number(exif.gps_longitude),
            number(exif.gps_altitude),
            text(exif.camera_make.unwrap_or_default()),
            text(exif.camera_model.unwrap_or_default()),
            exif.width.map(|v| v.to_string()).unwrap_or_default(),
            exif.height.map(|v| v.to_string()).unwrap_or_default(),
            text(r.sha256.unwrap_or_default()),
            r.cached.to_string(),
            text(r.model_name),
            text(r.model_version),
            rfc3339(r.submitted_at_ms),
            rfc3339(r.completed_at_ms),
            text(r.request_id),
            text(r.batch_id),
            text(r.feed_id.unwrap_or_default()),
        ]);
        row
    }
}

/// A text cell as a spreadsheet reads it as text: one starting with `=`, `+`, `-`, `@`, a tab or a
/// carriage return would run as a formula (`=HYPERLINK(...)` in a photo's camera model), so it gets a
/// leading `'` (OWASP's CSV-injection rule). Only for text: a number we write, like a latitude of
/// -12.5, must stay a number.
fn text(cell: String) -> String {
    if cell.starts_with(['=', '+', '-', '@', '\t', '\r']) { format!("'{cell}") } else { cell }
}

#[cfg(test)]
mod tests {
    use reefline_schemas::Exif;

    use super::*;

    /// A result of one photo with `metadata` and `exif`; from JSON, so that fields added later
    /// take their defaults.
    fn result(metadata: &[(&str, &str)], exif: Exif) -> ClassificationResult {
        let metadata: reefline_schemas::Metadata =
            metadata.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        serde_json::from_value(serde_json::json!({
            "request_id": "r0", "batch_id": "b", "batch_index": 0, "batch_size": 1,
            "url": "https://photos.example.org/reef4/0001.jpg", "status": "ok", "predictions": [],
            "model_name": "m", "model_version": "v",
            "submitted_at_ms": 1_764_000_000_123_i64, "completed_at_ms": 1_764_000_001_000_i64,
            "feed_id": "f", "line": 7, "metadata": metadata, "exif": exif,
        }))
        .expect("a result")
    }

    /// The export of `results` with `columns` of metadata, as the header and rows of cells.
    fn export(columns: &[&str], results: Vec<ClassificationResult>) -> Vec<Vec<String>> {
        let mut table = Table::new(columns.iter().map(|c| c.to_string()).collect());
        for r in results {
            table.push(r);
        }
        let bytes = table.take();
        let mut reader = csv::ReaderBuilder::new().has_headers(false).from_reader(bytes.as_ref());
        reader.records().map(|r| r.unwrap().iter().map(String::from).collect()).collect()
    }

    #[test]
    fn client_and_photo_text_cannot_run_as_a_formula_and_our_numbers_stay_numbers() {
        let exif = Exif {
            gps_latitude: Some(-12.5),
            gps_altitude: Some(-3.0),
            camera_make: Some("-1+1".into()),
            camera_model: Some("@SUM(1)".into()),
            ..Exif::default()
        };
        let metadata = [("site", r#"=HYPERLINK("http://evil","x")"#), ("+note", "\tx"), ("depth_m", "12.5")];
        let rows = export(&["site", "+note", "depth_m"], vec![result(&metadata, exif)]);
        let cell = |name: &str| {
            let at = rows[0].iter().position(|c| c == name).unwrap_or_else(|| panic!("no column {name}"));
            rows[1][at].as_str()
        };
        assert_eq!(cell("site"), r#"'=HYPERLINK("http://evil","x")"#);
        assert_eq!(cell("'+note"), "'\tx", "a client's column name is text too");
        assert_eq!(cell("depth_m"), "12.5");
        assert_eq!(cell("camera_model"), "'@SUM(1)");
        assert_eq!(cell("camera_make"), "'-1+1");
        assert_eq!(cell("gps_latitude"), "-12.5");
        assert_eq!(cell("gps_altitude"), "-3");
        assert_eq!(cell("url"), "https://photos.example.org/reef4/0001.jpg");
        assert_eq!(cell("line"), "7");
    }
}
