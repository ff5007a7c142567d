//! The fault tests' workload: 2,000 mixed URLs, and the checks that each ended as exactly one
//! right row.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::json;

use crate::wait_for;

/// ImageNet's espresso: what the coffee photo must be labelled.
pub const ESPRESSO: i64 = 967;
/// Requests in one workload.
pub const REQUESTS: i64 = 2000;

/// What each request id should end as: (`ok` or the error kind, URL).
pub type Expected = HashMap<String, (&'static str, String)>;

/// 2,000 URLs: 1,700 real photos (cycling through the 22), 100 missing, 100 not images, 100 that
/// fail to decode; the first 1,000 submitted at once (the bulk lane), the rest ten at a time (the
/// interactive lane), so that the faults meet both lanes at work. Returns what each request id
/// should end as: (`ok` or error kind, URL).
pub async fn submit_mixed(client: &reqwest::Client, ingest: &str, photos: &str) -> Expected {
    let names: Vec<String> = crate::foolbox_photos()
        .into_iter()
        .map(|(n, _)| n)
        .chain(["chelsea.png".into(), "coffee.png".into()])
        .collect();
    let urls: Vec<(String, &str)> = (0..REQUESTS as usize)
        .map(|i| match i % 20 {
            7 => (format!("{photos}/photos/missing-{i}.jpg"), "not_found"),
            13 => (format!("{photos}/page.jpg?n={i}"), "not_an_image"),
            17 => (format!("{photos}/broken.png?n={i}"), "decode_failed"),
            _ => (format!("{photos}/photos/{}?n={i}", names[i % names.len()]), "ok"),
        })
        .collect();
    let mut expected = HashMap::new();
    let (bulk, interactive) = urls.split_at(1000);
    for chunk in std::iter::once(bulk).chain(interactive.chunks(10)) {
        let images: Vec<&str> = chunk.iter().map(|(u, _)| u.as_str()).collect();
        let response =
            client.post(format!("{ingest}/v1/classify")).json(&json!({ "images": images })).send().await.unwrap();
        assert_eq!(response.status(), 202);
        let accepted: serde_json::Value = response.json().await.unwrap();
        for ((url, kind), id) in chunk.iter().zip(accepted["request_ids"].as_array().unwrap()) {
            expected.insert(id.as_str().unwrap().to_owned(), (*kind, url.clone()));
        }
    }
    assert_eq!(expected.len(), REQUESTS as usize);
    expected
}

pub async fn rows(pool: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM results").fetch_one(pool).await.unwrap()
}

pub async fn wait_rows(pool: &sqlx::PgPool, at_least: i64, what: &str) {
    wait_for(what, Duration::from_secs(600), || {
        let pool = pool.clone();
        async move { (rows(&pool).await >= at_least).then_some(()) }
    })
    .await;
}

/// Every request has exactly one row, with the right outcome; the same photo always gets the
/// same label, whichever worker, attempt or batch it went through.
pub async fn check_rows(pool: &sqlx::PgPool, expected: &Expected) {
    /// request id, status, error kind, top-1 index, URL
    type Row = (String, String, Option<String>, Option<i64>, String);
    let stored: Vec<Row> =
        sqlx::query_as("SELECT request_id, status, error_kind, (predictions->0->>'index')::bigint, url FROM results")
            .fetch_all(pool)
            .await
            .unwrap();
    assert_eq!(stored.len(), expected.len(), "exactly one row per request");
    let mut top1_by_photo: HashMap<String, i64> = HashMap::new();
    for (id, status, kind, top1, url) in &stored {
        let (expected_kind, expected_url) = &expected[id];
        assert_eq!(url, expected_url);
        match *expected_kind {
            "ok" => {
                assert_eq!(status, "ok", "{url}");
                let photo = url.rsplit('/').next().unwrap().split('?').next().unwrap().to_owned();
                let top1 = top1.unwrap();
                assert_eq!(*top1_by_photo.entry(photo.clone()).or_insert(top1), top1, "{photo}");
                if photo == "coffee.png" {
                    assert_eq!(top1, ESPRESSO);
                }
            }
            kind_name => assert_eq!(kind.as_deref(), Some(kind_name), "{url}"),
        }
    }
    assert_eq!(top1_by_photo.len(), 22);
}
