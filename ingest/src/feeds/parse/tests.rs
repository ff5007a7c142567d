//! The feed reader's tests: formats, limits and rejects, on bytes in memory.

use super::*;

fn options(format: Option<Format>) -> Options {
    Options {
        format,
        max_url_bytes: 2048,
        chunk_lines: 3,
        max_lines: 10_000_000,
        max_rejected: 100_000,
        dedup_entries: 1_000_000,
        buckets: vec!["reef-survey".to_owned()].into(),
    }
}

fn read_all(input: &[u8], format: Option<Format>) -> (Result<Format, ReadError>, Vec<Chunk>) {
    let (result, chunks) = read_with(input, options(format));
    (result.map(|outcome| outcome.format), chunks)
}

fn read_with(input: &[u8], options: Options) -> (Result<Outcome, ReadError>, Vec<Chunk>) {
    let mut chunks = Vec::new();
    let result = read(input, options, |c| {
        chunks.push(c);
        true
    });
    (result, chunks)
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(bytes).unwrap();
    gz.finish().unwrap()
}

fn outcomes(chunks: &[Chunk]) -> Vec<(u64, String)> {
    chunks
        .iter()
        .flat_map(|c| &c.lines)
        .map(|l| match l {
            Line::Accepted { line, url, .. } => (*line, url.clone()),
            Line::Rejected { line, reason, .. } => (*line, format!("rejected: {reason}")),
        })
        .collect()
}

#[test]
fn text_lines_are_checked_deduplicated_and_chunked() {
    let input =
        b"https://a.example/1.jpg\r\n\nftp://a.example/2.jpg\nhttps://a.example/1.jpg\nhttps://a.example/3.jpg\n";
    let (format, chunks) = read_all(input, None);
    assert_eq!(format.unwrap(), Format::Text);
    assert_eq!(chunks.iter().map(|c| c.lines.len()).collect::<Vec<_>>(), [3, 1]);
    assert_eq!(
        outcomes(&chunks),
        [
            (1, "https://a.example/1.jpg".into()),
            (3, "rejected: not a usable URL: scheme `ftp` is not allowed; use http, https, s3 or az".into()),
            (4, "rejected: a duplicate of a URL earlier in the feed".into()),
            (5, "https://a.example/3.jpg".into()),
        ]
    );
}

#[test]
fn csv_columns_become_metadata_and_bad_rows_are_named_by_line() {
    let input = "\u{feff}station,URL,depth_m\nReef 4,https://a.example/1.jpg,12\n\"Reef, north\",https://a.example/2.jpg,\nReef 5,https://a.example/3.jpg\n,not a url,3\n";
    let (format, chunks) = read_all(input.as_bytes(), None);
    assert_eq!(format.unwrap(), Format::Csv);
    assert_eq!(chunks[0].columns, ["station", "depth_m"]);
    let Line::Accepted { metadata, .. } = &chunks[0].lines[0] else { panic!("{:?}", chunks[0].lines[0]) };
    assert_eq!(metadata, &Metadata::from([("station".into(), "Reef 4".into()), ("depth_m".into(), "12".into())]));
    let Line::Accepted { metadata, .. } = &chunks[0].lines[1] else { panic!() };
    assert_eq!(metadata, &Metadata::from([("station".into(), "Reef, north".into())]));
    let outcomes = outcomes(&chunks);
    assert_eq!(outcomes[2], (4, "rejected: 2 fields where the header has 3".into()));
    assert_eq!(outcomes[3].0, 5);
    assert!(outcomes[3].1.starts_with("rejected: not a usable URL"), "{:?}", outcomes[3]);
}

#[test]
fn a_csv_without_a_url_column_is_refused_whole() {
    let (result, chunks) = read_all(b"station,link\nA,https://a.example/1.jpg\n", Some(Format::Csv));
    assert_eq!(
        result.unwrap_err().to_string(),
        "the feed is a CSV without a `url` column in its header (it has: station, link)"
    );
    assert!(chunks.is_empty());
}

#[test]
fn ndjson_keeps_scalar_metadata_and_rejects_the_rest() {
    let input = b"{\"url\": \"https://a.example/1.jpg\", \"depth\": 12.5, \"night\": true, \"note\": null}\n[1]\n{\"url\": \"https://a.example/2.jpg\", \"gps\": {\"lat\": 1}}\n{\"id\": 3}\n";
    let (format, chunks) = read_all(input, None);
    assert_eq!(format.unwrap(), Format::Ndjson);
    let Line::Accepted { metadata, .. } = &chunks[0].lines[0] else { panic!() };
    assert_eq!(metadata, &Metadata::from([("depth".into(), "12.5".into()), ("night".into(), "true".into())]));
    let outcomes = outcomes(&chunks);
    assert_eq!(outcomes[1], (2, "rejected: not a JSON object".into()));
    assert_eq!(outcomes[2], (3, "rejected: `gps` is not a string, number or boolean".into()));
    assert_eq!(outcomes[3], (4, "rejected: no `url` string".into()));
}

#[test]
fn gzip_is_recognised_by_its_bytes() {
    use std::io::Write;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(b"url,site\nhttps://a.example/1.jpg,A\n").unwrap();
    let (format, chunks) = read_all(&gz.finish().unwrap(), None);
    assert_eq!(format.unwrap(), Format::Csv);
    assert_eq!(outcomes(&chunks), [(2, "https://a.example/1.jpg".into())]);
}

#[test]
fn a_line_of_a_megabyte_ends_the_read() {
    let mut input = b"https://a.example/1.jpg\n".to_vec();
    input.extend(std::iter::repeat_n(b'x', MAX_LINE_BYTES + 10));
    let (result, _) = read_all(&input, Some(Format::Text));
    assert!(matches!(result, Err(ReadError::LineTooLong { line: 2 })), "{result:?}");
}

#[test]
fn a_gzip_of_two_million_bad_lines_stops_at_the_rejects_limit() {
    let input = gzip(&b"x\n".repeat(2_000_000));
    let options = Options { chunk_lines: 1000, ..options(Some(Format::Text)) };
    let (outcome, chunks) = read_with(&input, options);
    let outcome = outcome.unwrap();
    assert_eq!(outcome.cut, Some(Cut::TooManyRejects { limit: 100_000, line: 100_001 }));
    let lines: Vec<u64> = chunks.iter().flat_map(|c| &c.lines).map(Line::number).collect();
    assert_eq!(lines.len(), 100_000);
    assert_eq!(lines.last(), Some(&100_000));
    assert!(chunks.iter().flat_map(|c| &c.lines).all(|l| matches!(l, Line::Rejected { .. })));
    // The ledger stores the first FEED_MAX_STORED_REJECTS of them, chunk by chunk.
    let mut rejected_before = 0;
    let mut stored = 0;
    for chunk in &chunks {
        stored += super::super::ledger::rejects_to_store(rejected_before, chunk.lines.len(), 1000);
        rejected_before += chunk.lines.len() as i64;
    }
    assert_eq!(stored, 1000);
}

#[test]
fn a_feed_ends_at_its_line_limit_with_every_line_before_read() {
    let text: String = (1..=10).map(|i| format!("https://a.example/{i}.jpg\n")).collect();
    let options = Options { max_lines: 4, ..options(Some(Format::Text)) };
    let (outcome, chunks) = read_with(text.as_bytes(), options.clone());
    assert_eq!(outcome.unwrap().cut, Some(Cut::TooLong { limit: 4, line: 5 }));
    assert_eq!(chunks.iter().map(|c| c.lines.len()).collect::<Vec<_>>(), [3, 1]);
    assert_eq!(outcomes(&chunks).last(), Some(&(4, "https://a.example/4.jpg".into())));

    // Gzipped, a line at a time, blank lines and a CSV header counted: the same place.
    let (outcome, chunks) = read_with(&gzip(&b"\n".repeat(1_000_000)), Options { max_lines: 100, ..options.clone() });
    assert_eq!(outcome.unwrap().cut, Some(Cut::TooLong { limit: 100, line: 101 }));
    assert!(chunks.is_empty());
    let csv = "url,site\nhttps://a.example/1.jpg,A\nhttps://a.example/2.jpg,B\nhttps://a.example/3.jpg,C\n";
    let (outcome, chunks) = read_with(csv.as_bytes(), Options { max_lines: 3, format: None, ..options.clone() });
    assert_eq!(outcome.unwrap().cut, Some(Cut::TooLong { limit: 3, line: 4 }));
    assert_eq!(outcomes(&chunks), [(2, "https://a.example/1.jpg".into()), (3, "https://a.example/2.jpg".into())]);

    // A feed of exactly the limit is read to its end.
    let four: String = (1..=4).map(|i| format!("https://a.example/{i}.jpg\n")).collect();
    let (outcome, chunks) = read_with(four.as_bytes(), options.clone());
    assert_eq!((outcome.unwrap().cut, outcomes(&chunks).len()), (None, 4));
    let (outcome, _) = read_with(text.as_bytes(), Options { max_lines: 10, ..options });
    assert_eq!(outcome.unwrap().cut, None);
}

#[test]
fn de_duplication_remembers_at_most_its_capacity() {
    let input = b"https://a.example/a\nhttps://a.example/b\nhttps://a.example/a\nhttps://a.example/c\nhttps://a.example/c\nhttps://a.example/b\n";
    let (_, chunks) = read_with(input, Options { dedup_entries: 2, ..options(Some(Format::Text)) });
    let duplicate = "rejected: a duplicate of a URL earlier in the feed";
    assert_eq!(
        outcomes(&chunks),
        [
            (1, "https://a.example/a".into()),
            (2, "https://a.example/b".into()),
            (3, duplicate.into()),
            // Past the capacity: checked against the URLs remembered, not remembered itself.
            (4, "https://a.example/c".into()),
            (5, "https://a.example/c".into()),
            (6, duplicate.into()),
        ]
    );
}

#[test]
fn metadata_columns_are_capped() {
    let ndjson: String =
        (0..=MAX_COLUMNS).map(|i| format!("{{\"url\": \"https://a.example/{i}\", \"k{i}\": \"v\"}}\n")).collect();
    let (_, chunks) = read_with(ndjson.as_bytes(), options(None));
    let outcomes = outcomes(&chunks);
    assert_eq!(outcomes.len(), MAX_COLUMNS + 1);
    assert!(outcomes[..MAX_COLUMNS].iter().all(|(_, o)| !o.starts_with("rejected")));
    assert_eq!(outcomes[MAX_COLUMNS].1, "rejected: the feed already has 1000 metadata columns; the limit is 1000");
    assert_eq!(chunks.last().unwrap().columns.len(), MAX_COLUMNS);

    let header = format!("url{}\n", ",c".repeat(MAX_COLUMNS + 1));
    let (result, _) = read_all(header.as_bytes(), Some(Format::Csv));
    assert!(matches!(result, Err(ReadError::TooManyColumns { count: 1002 })), "{result:?}");
}

#[test]
fn formats_are_named_by_media_type_and_file_name() {
    assert_eq!(Format::from_media_type("text/csv; charset=utf-8"), Some(Format::Csv));
    assert_eq!(Format::from_media_type("application/x-ndjson"), Some(Format::Ndjson));
    assert_eq!(Format::from_media_type("application/gzip"), None);
    assert_eq!(Format::from_file_name("survey/list.CSV.gz"), Some(Format::Csv));
    assert_eq!(Format::from_file_name("urls.txt"), Some(Format::Text));
    assert_eq!(Format::from_file_name("feed"), None);
}

#[test]
fn s3_lines_name_a_bucket_the_uploader_may_read() {
    let text = "s3://reef-survey/2026/a.jpg\ns3://other-bucket/b.jpg\ns3://reef-survey/\n";
    let (_, chunks) = read_all(text.as_bytes(), Some(Format::Text));
    let lines: Vec<&Line> = chunks.iter().flat_map(|c| &c.lines).collect();
    assert!(matches!(lines[0], Line::Accepted { url, .. } if url == "s3://reef-survey/2026/a.jpg"));
    let reasons: Vec<&str> = lines[1..]
        .iter()
        .map(|l| match l {
            Line::Rejected { reason, .. } => reason.as_str(),
            _ => "accepted",
        })
        .collect();
    assert_eq!(
        reasons,
        [
            "bucket `other-bucket` is not one this service reads (it reads: reef-survey)",
            "not a usable URL: it names a bucket but no object; write `s3://bucket/key`",
        ]
    );
}
