//! What the feed tests share: uploading a feed, a plain-text feed's lines, waiting until ingest can
//! take feeds, and reading a CSV export back.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use serde_json::Value;

/// POSTs `body` to `{ingest}/v1/feeds` with `content_type` (and an Idempotency-Key when given).
pub async fn post_feed(
    client: &reqwest::Client,
    ingest: &str,
    content_type: &str,
    key: Option<&str>,
    body: reqwest::Body,
) -> reqwest::Result<(u16, Value, reqwest::header::HeaderMap)> {
    let mut request = client.post(format!("{ingest}/v1/feeds")).header("content-type", content_type).body(body);
    if let Some(key) = key {
        request = request.header("idempotency-key", key);
    }
    let response = request.send().await?;
    let (status, headers) = (response.status().as_u16(), response.headers().clone());
    Ok((status, response.json().await.unwrap_or(Value::Null), headers))
}

/// Lines `from..=to` of a plain-text feed of distinct URLs, with the lines `bad` gives at its
/// positions instead.
pub fn text_lines(from: usize, to: usize, bad: &BTreeMap<usize, &'static str>) -> String {
    let mut text = String::with_capacity((to + 1 - from) * 48);
    for n in from..=to {
        match bad.get(&n) {
            Some(line) => text.push_str(line),
            None => text.push_str(&format!("https://survey.example.org/reef/{n:07}.jpg")),
        }
        text.push('\n');
    }
    text
}

/// Waits until ingest takes feeds: they answer 503 (feeds_unavailable) until it has reached its database.
pub async fn wait_for_ledger(client: &reqwest::Client, ingest: &str) {
    crate::wait_for("the feeds ledger", Duration::from_secs(60), || async {
        let response = client
            .post(format!("{ingest}/v1/feeds"))
            .header("content-type", "text/plain")
            .body("")
            .send()
            .await
            .ok()?;
        (response.status() == 201).then_some(())
    })
    .await;
}

/// Rows of a CSV export, as maps from column to value.
pub fn csv_rows(text: &str) -> (Vec<String>, Vec<HashMap<String, String>>) {
    let mut reader = csv::Reader::from_reader(text.as_bytes());
    let header: Vec<String> = reader.headers().unwrap().iter().map(String::from).collect();
    let rows =
        reader.records().map(|r| header.iter().cloned().zip(r.unwrap().iter().map(String::from)).collect()).collect();
    (header, rows)
}

/// What MegaDetector's own validator (`validate_batch_results` for `batch`, the COCO Camera Traps
/// `integrity_check_json_db` for `cct`; `tests/validate_megadetector.py`, in the venv `make setup-tests`
/// makes) finds wrong with `export`: its errors, and its warnings.
pub fn megadetector_validator(mode: &str, export: &Value) -> (Vec<String>, Vec<String>) {
    let found =
        run_validator("venv-megadetector", "validate_megadetector.py", &[mode], "json", export.to_string().as_bytes());
    let list = |k: &str| found[k].as_array().unwrap().iter().map(|e| e.as_str().unwrap_or("").to_owned()).collect();
    (list("errors"), list("warnings"))
}

/// Validates a Camtrap DP export (its ZIP's bytes) with frictionless against the vendored Camtrap DP
/// 1.0.2 profile and table schemas (tests/validate_camtrap_dp.py): the validator's JSON line, with
/// `valid`, `errors`, the package's `files`, its `package` descriptor and its `tables` as rows.
pub fn camtrap_validator(zip: &[u8]) -> Value {
    run_validator("venv-frictionless", "validate_camtrap_dp.py", &[], "zip", zip)
}

/// Runs `tests/<script>` with the python of the cache's `venv` on `args` and a temporary file of
/// `bytes` (named `*.<extension>`): the JSON line it prints.
fn run_validator(venv: &str, script: &str, args: &[&str], extension: &str, bytes: &[u8]) -> Value {
    let python = crate::cache_dir().join(venv).join("bin/python");
    assert!(python.exists(), "{} is missing: run `make setup-tests` first", python.display());
    let file = std::env::temp_dir().join(format!("export-{}.{extension}", uuid::Uuid::now_v7().simple()));
    std::fs::write(&file, bytes).expect("writing the export");
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(script);
    let output = std::process::Command::new(python).arg(script).args(args).arg(&file).output().expect("the validator");
    let _ = std::fs::remove_file(&file);
    assert!(output.status.success(), "the validator failed: {}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout).expect("the validator's JSON line")
}
