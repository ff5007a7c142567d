//! Reading a feed: bytes in (gzip-compressed or not) → one outcome per line (a URL accepted with
//! its metadata, or a line rejected with its reason), in chunks. It runs on a blocking thread over
//! the upload as it streams in; nothing holds more than one chunk and one line of it, and what it
//! remembers across lines (the URLs met, the metadata columns) is capped.

use std::collections::HashSet;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::io::{self, BufRead, BufReader, Read};

use reefline_schemas::Metadata;
use reefline_schemas::rules::{check_metadata, check_url, truncate};

mod line_limit;
use line_limit::{LineLimit, Overrun};

/// The longest line a feed may have; a longer one is not a list of URLs, and ends the read.
pub const MAX_LINE_BYTES: usize = 1 << 20;

/// How much of a rejected line is kept to show with its reason.
const REJECT_CONTENT_BYTES: usize = 200;

/// The most metadata columns a feed may have (a CSV's header, NDJSON keys across all lines): each
/// is remembered for the whole read, and exports give each one a column.
pub const MAX_COLUMNS: usize = 1000;

/// The formats a feed may come in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// A header row with a `url` column; every other column is metadata.
    Csv,
    /// One JSON object per line: `url` and metadata.
    Ndjson,
    /// One URL per line.
    Text,
}

impl Format {
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Csv => "csv",
            Format::Ndjson => "ndjson",
            Format::Text => "text",
        }
    }

    /// The format a media type names, if any.
    pub fn from_media_type(media_type: &str) -> Option<Self> {
        let essence = media_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
        match essence.as_str() {
            "text/csv" | "application/csv" => Some(Format::Csv),
            "application/x-ndjson"
            | "application/ndjson"
            | "application/jsonl"
            | "application/jsonlines"
            | "application/x-jsonlines" => Some(Format::Ndjson),
            "text/plain" | "text/uri-list" => Some(Format::Text),
            _ => None,
        }
    }

    /// The format a file name's extension names (`list.csv.gz`, `urls.txt`), if any.
    pub fn from_file_name(name: &str) -> Option<Self> {
        let name = name.to_ascii_lowercase();
        let name = name.strip_suffix(".gz").unwrap_or(&name);
        match name.rsplit_once('.')?.1 {
            "csv" => Some(Format::Csv),
            "ndjson" | "jsonl" => Some(Format::Ndjson),
            "txt" | "list" => Some(Format::Text),
            _ => None,
        }
    }

    /// Guesses from the first line: an object is NDJSON, a row with a `url` column a CSV header,
    /// anything else a URL.
    fn sniff(first_line: &[u8]) -> Self {
        let line = String::from_utf8_lossy(first_line);
        let line = line.trim_start_matches('\u{feff}').trim();
        if line.starts_with('{') {
            Format::Ndjson
        } else if line.split(',').any(|c| c.trim().trim_matches('"').eq_ignore_ascii_case("url")) {
            Format::Csv
        } else {
            Format::Text
        }
    }
}

/// What became of one line.
#[derive(Clone, Debug, PartialEq)]
pub enum Line {
    Accepted { line: u64, url: String, metadata: Metadata },
    Rejected { line: u64, reason: String, content: String },
}

impl Line {
    /// The line it was on, from 1.
    pub fn number(&self) -> u64 {
        match self {
            Line::Accepted { line, .. } | Line::Rejected { line, .. } => *line,
        }
    }
}

/// A run of consecutive lines, the format they were read in, and the metadata columns known so far.
#[derive(Debug)]
pub struct Chunk {
    pub format: Format,
    pub lines: Vec<Line>,
    pub columns: Vec<String>,
}

/// Why a feed could not be read to its end (a bad line never is a reason).
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("the feed is a CSV without a `url` column in its header (it has: {0})")]
    NoUrlColumn(String),
    #[error("line {line} is longer than {MAX_LINE_BYTES} bytes: this is not a list of URLs")]
    LineTooLong { line: u64 },
    #[error("the CSV header has {count} columns; the limit is {}", MAX_COLUMNS + 1)]
    TooManyColumns { count: usize },
    #[error("the upload could not be read: {0}")]
    Io(#[from] io::Error),
}

/// How lines are checked, and how much of a feed is read.
#[derive(Clone, Debug)]
pub struct Options {
    /// `None`: guess from the first line.
    pub format: Option<Format>,
    pub max_url_bytes: usize,
    pub chunk_lines: usize,
    /// The last line read (lines are numbered as the rejects name them: blank ones and a CSV's
    /// header count); a feed with more ends there.
    pub max_lines: u64,
    /// The most lines a feed may reject; the read ends before the one that would pass it.
    pub max_rejected: u64,
    /// The most distinct URLs remembered to tell duplicates by; past it, a URL is still checked
    /// against those remembered, but no more are remembered.
    pub dedup_entries: usize,
    /// The buckets and containers `s3://` and `az://` URLs may name (the uploader's tenant's, as
    /// [`reefline_common::objects::Stores::readable`] names them); a line naming another is rejected.
    pub buckets: std::sync::Arc<[String]>,
}

/// How a read ended: the format the feed was read in, and the limit that ended it early, if any.
#[derive(Debug)]
pub struct Outcome {
    pub format: Format,
    pub cut: Option<Cut>,
}

/// A limit a feed ran into: every line before `line` has been handed out (so can be settled), and
/// `line` and the rest are not read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cut {
    /// Line `line` is past [`Options::max_lines`] (`limit`).
    TooLong { limit: u64, line: u64 },
    /// Line `line` would have been rejected line `limit + 1`.
    TooManyRejects { limit: u64, line: u64 },
}

/// Reads `input` to its end (or to a limit of `options`), handing `emit` one chunk of up to
/// `chunk_lines` lines at a time; stops early when `emit` returns false (nobody listens any more).
pub fn read(input: impl Read, options: Options, mut emit: impl FnMut(Chunk) -> bool) -> Result<Outcome, ReadError> {
    let mut input = BufReader::with_capacity(64 * 1024, input);
    let gzip = input.fill_buf()?.starts_with(&[0x1f, 0x8b]);
    let input: Box<dyn BufRead> = if gzip {
        Box::new(BufReader::with_capacity(64 * 1024, flate2::bufread::MultiGzDecoder::new(input)))
    } else {
        Box::new(input)
    };
    let max_lines = options.max_lines.max(1);
    let mut input = BufReader::new(LineLimit::new(input, max_lines));
    let format = match options.format {
        Some(format) => format,
        None => Format::sniff(first_line(input.fill_buf()?)),
    };
    let chunk = Chunk { format, lines: Vec::new(), columns: Vec::new() };
    let mut out = Emitter {
        chunk,
        known: HashSet::new(),
        size: options.chunk_lines.max(1),
        emit: &mut emit,
        open: true,
        rejected: 0,
        max_rejected: options.max_rejected,
        cut: None,
    };
    let mut seen = Seen::new(options.dedup_entries);
    let result = match format {
        Format::Csv => read_csv(&mut input, &options, &mut seen, &mut out),
        Format::Ndjson | Format::Text => read_lines(&mut input, format, &options, &mut seen, &mut out),
    };
    match result {
        Ok(()) => {}
        Err(ReadError::Io(io)) => match io.get_ref().and_then(|e| e.downcast_ref::<Overrun>()) {
            Some(Overrun::LineTooLong(line)) => return Err(ReadError::LineTooLong { line: *line }),
            // Every line before the first one past the limit has been read.
            Some(Overrun::TooManyLines) => out.cut = Some(Cut::TooLong { limit: max_lines, line: max_lines + 1 }),
            None => return Err(ReadError::Io(io)),
        },
        Err(other) => return Err(other),
    }
    out.flush();
    Ok(Outcome { format, cut: out.cut })
}

fn first_line(buffered: &[u8]) -> &[u8] {
    buffered.split(|b| *b == b'\n').next().unwrap_or(buffered)
}

/// Hands out full chunks, and ends the read at the rejected line that would pass the limit.
struct Emitter<'a, F: FnMut(Chunk) -> bool> {
    chunk: Chunk,
    /// The chunk's columns, to look up.
    known: HashSet<String>,
    size: usize,
    emit: &'a mut F,
    open: bool,
    rejected: u64,
    max_rejected: u64,
    cut: Option<Cut>,
}

impl<F: FnMut(Chunk) -> bool> Emitter<'_, F> {
    /// Adds a line; false once nobody listens or a limit ended the read.
    fn push(&mut self, line: Line) -> bool {
        if let Line::Rejected { line, .. } = line {
            if self.rejected >= self.max_rejected {
                self.cut = Some(Cut::TooManyRejects { limit: self.max_rejected, line });
                return false;
            }
            self.rejected += 1;
        }
        self.chunk.lines.push(line);
        if self.chunk.lines.len() >= self.size {
            self.flush();
        }
        self.open
    }

    fn flush(&mut self) {
        if self.open && !self.chunk.lines.is_empty() {
            let next = Chunk {
                format: self.chunk.format,
                lines: Vec::with_capacity(self.size),
                columns: self.chunk.columns.clone(),
            };
            let full = std::mem::replace(&mut self.chunk, next);
            self.open = (self.emit)(full);
        }
    }

    /// Adds a line's metadata keys to the columns; refuses, adding none, when that would make
    /// more than [`MAX_COLUMNS`].
    fn add_columns<'k>(&mut self, names: impl Iterator<Item = &'k String> + Clone) -> Result<(), String> {
        let new = names.clone().filter(|n| !self.known.contains(*n)).count();
        if self.chunk.columns.len() + new > MAX_COLUMNS {
            let had = self.known.len();
            return Err(format!("the feed already has {had} metadata columns; the limit is {MAX_COLUMNS}"));
        }
        for name in names {
            self.add_column(name);
        }
        Ok(())
    }

    fn add_column(&mut self, name: &str) {
        if self.known.insert(name.to_owned()) {
            self.chunk.columns.push(name.to_owned());
        }
    }
}

/// The URLs met so far, as 64-bit hashes (about 18 bytes each in the set: a million take ~20 MB;
/// two URLs sharing a hash, about one chance in thirty million at that size, would be a false
/// duplicate). Once `capacity` are held no more are added: a later URL is still checked against
/// them, but a repeat of a URL met only past the cap is not noticed.
struct Seen {
    hashes: HashSet<u64>,
    capacity: usize,
}

impl Seen {
    fn new(capacity: usize) -> Self {
        Self { hashes: HashSet::new(), capacity }
    }

    /// False when `url` was met before (and remembered).
    fn insert(&mut self, url: &str) -> bool {
        let mut hasher = DefaultHasher::new();
        url.hash(&mut hasher);
        let hash = hasher.finish();
        if self.hashes.len() < self.capacity { self.hashes.insert(hash) } else { !self.hashes.contains(&hash) }
    }
}

/// Checks one URL and its metadata: the line's outcome.
fn judge(line: u64, raw_url: &str, metadata: Metadata, content: &str, options: &Options, seen: &mut Seen) -> Line {
    let reject =
        |reason: String| Line::Rejected { line, reason, content: truncate(content, REJECT_CONTENT_BYTES).into() };
    if raw_url.contains('\n') {
        return reject("the url field runs over several lines (an unbalanced quote?)".into());
    }
    let url = match check_url(raw_url, options.max_url_bytes) {
        Ok(url) => url,
        Err(reason) => return reject(format!("not a usable URL: {reason}")),
    };
    if let Some(object) = reefline_common::objects::object_ref(&url) {
        let bucket = object.bucket.as_str();
        if !options.buckets.iter().any(|b| b == bucket) {
            let readable = if options.buckets.is_empty() { "none".into() } else { options.buckets.join(", ") };
            return reject(format!("bucket `{bucket}` is not one this service reads (it reads: {readable})"));
        }
    }
    if let Err(reason) = check_metadata(&metadata) {
        return reject(reason);
    }
    if !seen.insert(url.as_str()) {
        return reject("a duplicate of a URL earlier in the feed".into());
    }
    Line::Accepted { line, url: url.into(), metadata }
}

/// Plain text (a URL a line) and NDJSON (an object a line). Blank lines are skipped.
fn read_lines<F: FnMut(Chunk) -> bool>(
    input: &mut impl BufRead,
    format: Format,
    options: &Options,
    seen: &mut Seen,
    out: &mut Emitter<'_, F>,
) -> Result<(), ReadError> {
    let mut buf = Vec::with_capacity(1024);
    let mut number = 0u64;
    loop {
        buf.clear();
        if input.read_until(b'\n', &mut buf)? == 0 {
            return Ok(());
        }
        number += 1;
        let bytes = if number == 1 { buf.strip_prefix(b"\xef\xbb\xbf").unwrap_or(&buf) } else { &buf[..] };
        let Ok(text) = std::str::from_utf8(bytes) else {
            let content = String::from_utf8_lossy(bytes);
            let line = Line::Rejected {
                line: number,
                reason: "not UTF-8 text".into(),
                content: truncate(content.trim_end(), REJECT_CONTENT_BYTES).into(),
            };
            if !out.push(line) {
                return Ok(());
            }
            continue;
        };
        let text = text.trim();
        if text.is_empty() {
            continue;
        }
        let outcome = match format {
            Format::Ndjson => match ndjson_line(text).and_then(|l| out.add_columns(l.1.keys()).map(|()| l)) {
                Ok((url, metadata)) => judge(number, &url, metadata, text, options, seen),
                Err(reason) => {
                    Line::Rejected { line: number, reason, content: truncate(text, REJECT_CONTENT_BYTES).into() }
                }
            },
            _ => judge(number, text, Metadata::new(), text, options, seen),
        };
        if !out.push(outcome) {
            return Ok(());
        }
    }
}

/// An NDJSON line's URL and metadata: strings as they are, numbers and booleans as their JSON
/// text, nulls left out.
fn ndjson_line(text: &str) -> Result<(String, Metadata), String> {
    let object: serde_json::Map<String, serde_json::Value> = match serde_json::from_str(text) {
        Ok(serde_json::Value::Object(object)) => object,
        Ok(_) => return Err("not a JSON object".into()),
        Err(e) => return Err(format!("not JSON: {e}")),
    };
    let mut url = None;
    let mut metadata = Metadata::new();
    for (key, value) in object {
        let value = match value {
            serde_json::Value::Null => continue,
            serde_json::Value::String(s) => s,
            serde_json::Value::Number(n) => n.to_string(),
            serde_json::Value::Bool(b) => b.to_string(),
            _ => return Err(format!("`{}` is not a string, number or boolean", truncate(&key, 64))),
        };
        if key == "url" {
            url = Some(value);
        } else {
            metadata.insert(key, value);
        }
    }
    url.map(|url| (url, metadata)).ok_or_else(|| "no `url` string".into())
}

/// A CSV with a header row: the `url` column (any case) is the URL, every other column metadata;
/// empty values are left out.
fn read_csv<F: FnMut(Chunk) -> bool>(
    input: &mut impl BufRead,
    options: &Options,
    seen: &mut Seen,
    out: &mut Emitter<'_, F>,
) -> Result<(), ReadError> {
    let mut reader = csv::ReaderBuilder::new().has_headers(true).flexible(false).from_reader(input);
    let header: Vec<String> = match reader.byte_headers() {
        Ok(header) => {
            header.iter().map(|h| String::from_utf8_lossy(h).trim_start_matches('\u{feff}').trim().to_owned()).collect()
        }
        Err(e) => return Err(csv_io(e).map_or_else(|| ReadError::NoUrlColumn(String::new()), ReadError::Io)),
    };
    let Some(url_column) = header.iter().position(|h| h.eq_ignore_ascii_case("url")) else {
        return Err(ReadError::NoUrlColumn(truncate(&header.join(", "), 200).into()));
    };
    if header.len() > MAX_COLUMNS + 1 {
        return Err(ReadError::TooManyColumns { count: header.len() });
    }
    let names = column_names(&header);
    for (i, name) in names.iter().enumerate() {
        if i != url_column {
            out.add_column(name);
        }
    }
    let mut record = csv::ByteRecord::new();
    loop {
        let outcome = match reader.read_byte_record(&mut record) {
            Ok(false) => return Ok(()),
            Ok(true) => {
                let line = record.position().map_or(0, |p| p.line());
                match csv_row(line, &record, url_column, &names, options, seen) {
                    Some(outcome) => outcome,
                    None => continue,
                }
            }
            Err(e) => {
                let line = e.position().map_or(0, |p| p.line());
                let reason = match e.kind() {
                    csv::ErrorKind::UnequalLengths { expected_len, len, .. } => {
                        format!("{len} fields where the header has {expected_len}")
                    }
                    _ => match csv_io(e) {
                        Some(io) => return Err(ReadError::Io(io)),
                        None => "not a CSV row".into(),
                    },
                };
                let content = record_text(&record);
                Line::Rejected { line, reason, content: truncate(&content, REJECT_CONTENT_BYTES).into() }
            }
        };
        if !out.push(outcome) {
            return Ok(());
        }
    }
}

/// One row's outcome; `None` for a blank row (nothing to say about it).
fn csv_row(
    line: u64,
    record: &csv::ByteRecord,
    url_column: usize,
    names: &[String],
    options: &Options,
    seen: &mut Seen,
) -> Option<Line> {
    if record.iter().all(|f| f.iter().all(u8::is_ascii_whitespace)) {
        return None;
    }
    let content = record_text(record);
    let mut fields = Vec::with_capacity(record.len());
    for field in record {
        match std::str::from_utf8(field) {
            Ok(text) => fields.push(text),
            Err(_) => {
                let content = truncate(&content, REJECT_CONTENT_BYTES).into();
                return Some(Line::Rejected { line, reason: "not UTF-8 text".into(), content });
            }
        }
    }
    let metadata: Metadata = fields
        .iter()
        .enumerate()
        .filter(|(i, value)| *i != url_column && !value.trim().is_empty())
        .map(|(i, value)| (names[i].clone(), value.trim().to_owned()))
        .collect();
    Some(judge(line, fields[url_column].trim(), metadata, &content, options, seen))
}

/// Header names made usable as keys: an empty one is `column_N`, a repeated one gets `_2`, `_3`.
fn column_names(header: &[String]) -> Vec<String> {
    let mut names: Vec<String> = Vec::with_capacity(header.len());
    for (i, h) in header.iter().enumerate() {
        let base = if h.is_empty() { format!("column_{}", i + 1) } else { h.clone() };
        let mut name = base.clone();
        let mut n = 2;
        while names.contains(&name) {
            name = format!("{base}_{n}");
            n += 1;
        }
        names.push(name);
    }
    names
}

fn record_text(record: &csv::ByteRecord) -> String {
    let fields: Vec<_> = record.iter().map(String::from_utf8_lossy).collect();
    fields.join(",")
}

fn csv_io(e: csv::Error) -> Option<io::Error> {
    match e.into_kind() {
        csv::ErrorKind::Io(io) => Some(io),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
