use serde_json::json;

use super::tables::OBSERVATION_HEADER;
use super::*;
use crate::export::classes::Classes;

/// The repository manifest's classes (ImageNet's first 398 are animals); the tables' files are
/// not needed for that.
fn imagenet() -> std::sync::Arc<Classes> {
    std::sync::Arc::new(Classes::for_tests())
}

#[test]
fn offsets_are_read_in_the_forms_people_write() {
    let hours = |h: i32| FixedOffset::east_opt(h * 3600);
    assert_eq!(parse_offset("+10:00"), hours(10));
    assert_eq!(parse_offset("+1000"), hours(10));
    assert_eq!(parse_offset("-05"), hours(-5));
    assert_eq!(parse_offset("Z"), hours(0));
    assert_eq!(parse_offset("+05:30"), FixedOffset::east_opt(5 * 3600 + 1800));
    for bad in ["10:00", "+1", "+25:00", "+10:0", "+10:00:00", "UTC", ""] {
        assert_eq!(parse_offset(bad), None, "{bad}");
    }
}

#[test]
fn times_keep_their_offset_and_naive_ones_need_one() {
    let ten = FixedOffset::east_opt(36000);
    let written = |text: &str, offset| timestamp(text, offset).map(format_time).map_err(|_| ());
    assert_eq!(written("2026-11-20T09:41:07+10:00", None), Ok("2026-11-20T09:41:07+10:00".into()));
    assert_eq!(written("2026-11-20T09:41:07.250Z", None), Ok("2026-11-20T09:41:07Z".into()));
    assert_eq!(written("2026:11:20 09:41:07", ten), Ok("2026-11-20T09:41:07+10:00".into()));
    assert_eq!(written("2026-11-20 09:41:07", ten), Ok("2026-11-20T09:41:07+10:00".into()));
    assert!(matches!(timestamp("2026-11-20 09:41:07", None), Err(Lack::Offset(_))));
    assert!(matches!(timestamp("yesterday", ten), Err(Lack::UnreadableTime(_))));
}

/// A classified photo, its top class `index` (with `scientific` name), with `metadata`.
fn result(line: i64, index: i32, scientific: Option<&str>, metadata: &[(&str, &str)]) -> ClassificationResult {
    let metadata: reefline_schemas::Metadata = metadata.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    serde_json::from_value(json!({
        "request_id": format!("r{line}"), "batch_id": "b", "batch_index": 0, "batch_size": 1,
        "url": format!("s3://reef/survey/{line}.jpg"), "status": "ok",
        "predictions": [{"index": index, "wnid": "n0", "label": format!("class {index}"), "scientific_name": scientific, "score": 0.81234}],
        "marine_group": scientific.map(|_| "shark"),
        "model_name": "efficientnet-lite0", "model_version": "1",
        "submitted_at_ms": 1_764_000_000_000_i64, "completed_at_ms": 1_764_000_001_000_i64,
        "feed_id": "f", "line": line, "metadata": metadata,
    }))
    .expect("a result")
}

fn options() -> Options {
    Options { utc_offset: None, coordinates: None, sampling_design: "opportunistic".into() }
}

#[test]
fn a_marine_animal_is_observed_by_its_scientific_name_and_other_classes_are_unclassified() {
    let place = [("station", "S1"), ("lat", "-16.5"), ("lon", "145.5"), ("timestamp", "2026-11-20T06:00:00+10:00")];
    let shark = result(2, 2, Some("Carcharodon carcharias"), &place);
    let coffee = result(3, 967, None, &place);
    let mut plan = Plan::new(options(), imagenet(), "feed", "F1".into(), Some("F1".into()));
    plan.check(&shark);
    plan.check(&coffee);
    assert!(plan.refusal().is_none());
    let row = plan.observation_row(&shark).unwrap();
    let cell = |row: &[String], name: &str| row[OBSERVATION_HEADER.iter().position(|h| *h == name).unwrap()].clone();
    assert_eq!(
        [
            "deploymentID",
            "observationType",
            "scientificName",
            "classifiedBy",
            "classificationProbability",
            "observationTags"
        ]
        .map(|n| cell(&row, n)),
        [
            "S1",
            "animal",
            "Carcharodon carcharias",
            "efficientnet-lite0 1",
            "0.8123",
            "imagenet:class 2 | marine_group:shark"
        ]
    );
    let row = plan.observation_row(&coffee).unwrap();
    assert_eq!((cell(&row, "observationType"), cell(&row, "scientificName")), ("unclassified".into(), String::new()));
    let media = plan.media_row(&shark).unwrap();
    assert_eq!((media[5].as_str(), media[7].as_str()), ("false", "image/jpeg"), "an s3:// object is not public");
    let mut blob = shark.clone();
    blob.url = "az://reef/survey/2.jpg".into();
    assert_eq!(plan.media_row(&blob).unwrap()[5], "false", "nor is an az:// blob");
    let mut web = shark.clone();
    web.url = "https://photos.example/2.jpg".into();
    assert_eq!(plan.media_row(&web).unwrap()[5], "true");
    let package = plan.datapackage();
    assert_eq!(
        package["taxonomic"],
        json!([{"scientificName": "Carcharodon carcharias", "vernacularNames": {"eng": "class 2"}}])
    );
    assert_eq!(package["spatial"], json!({"type": "Point", "coordinates": [145.5, -16.5]}));
    assert_eq!(package["name"], json!("reefline-feed-f1"));
}

#[test]
fn what_cannot_be_filled_is_named_with_how_to_fill_it() {
    let mut plan = Plan::new(options(), imagenet(), "feed", "F1".into(), Some("F1".into()));
    plan.check(&result(2, 1, None, &[("deploymentID", "A"), ("timestamp", "2026-11-20T06:00:00Z")]));
    plan.check(&result(3, 1, None, &[("deploymentID", "B")]));
    plan.check(&result(4, 1, None, &[("deploymentID", "B"), ("timestamp", "2026-11-20 06:00:00")]));
    plan.check(&result(5, 1, None, &[("deploymentID", "B"), ("timestamp", "noon")]));
    plan.check(&result(6, 1, None, &[("timestamp", "2026-11-20T06:00:00Z"), ("latitude", "95"), ("longitude", "1")]));
    let refusal = plan.refusal().expect("refused");
    assert_eq!(refusal.missing, ["timestamp", "utc_offset", "latitude", "longitude"]);
    for part in [
        "1 classified images have no time taken (the first: line 3)",
        "1 classified images have a time taken without a UTC offset (the first: line 4 (2026-11-20 06:00:00))",
        "1 classified images have a `timestamp` that is not an ISO 8601 time (the first: line 5 (noon))",
        "(the first: line 6 (95, 1))",
        "1 deployments have no coordinates (the first: `A`)",
    ] {
        assert!(refusal.message.contains(part), "{part}: {}", refusal.message);
    }
    // Coordinates given for the deployments that have none place them.
    let mut plan = Plan::new(
        Options { coordinates: Some((-16.0, 145.0)), ..options() },
        imagenet(),
        "feed",
        "F1".into(),
        Some("F1".into()),
    );
    plan.check(&result(2, 1, None, &[("timestamp", "2026-11-20T06:00:00Z")]));
    assert!(plan.refusal().is_none());
    assert_eq!(plan.deployment_rows().next().unwrap()[..5], ["F1", "", "", "-16", "145"].map(String::from));
    // What the tables would read as missing, and URLs a filePath may not hold.
    let mut plan = Plan::new(options(), imagenet(), "feed", "F1".into(), Some("F1".into()));
    let time = ("timestamp", "2026-11-20T06:00:00Z");
    plan.check(&result(2, 1, None, &[("station", "NA"), time]));
    let mut dotted = result(3, 1, None, &[time]);
    dotted.url = "https://photos.example/a..b.jpg".into();
    plan.check(&dotted);
    let refusal = plan.refusal().expect("refused");
    assert_eq!(refusal.missing, ["deploymentID", "filePath"], "{}", refusal.message);
    // Nothing to export is refused too (the package needs a deployment).
    assert!(
        Plan::new(options(), imagenet(), "feed", "F1".into(), Some("F1".into()))
            .refusal()
            .unwrap()
            .message
            .contains("no classified image matches")
    );
}

#[test]
fn in_a_search_an_image_naming_no_deployment_is_in_its_feeds_or_batchs() {
    let mut plan = Plan::new(options(), imagenet(), "search", "results".into(), None);
    let time = ("timestamp", "2026-11-20T06:00:00Z");
    let place = [time, ("latitude", "-16"), ("longitude", "145")];
    let in_feed = result(2, 1, None, &place);
    let mut in_batch = result(3, 1, None, &place);
    in_batch.feed_id = None;
    in_batch.batch_id = "B7".into();
    let named = result(4, 1, None, &[time, ("latitude", "-16"), ("longitude", "145"), ("deploymentID", "CAM-1")]);
    for r in [&in_feed, &in_batch, &named] {
        plan.check(r);
    }
    assert!(plan.refusal().is_none());
    let deployments: Vec<String> = plan.deployment_rows().map(|row| row[0].clone()).collect();
    assert_eq!(deployments, ["B7", "CAM-1", "f"]);
    assert_eq!(plan.media_row(&in_batch).unwrap()[1], "B7");
}

#[test]
fn file_names_and_media_types_come_from_the_url() {
    assert_eq!(file_name("s3://reef/survey/A%201/IMG_0001.JPG"), ("IMG_0001.JPG".into(), "image/jpeg"));
    assert_eq!(file_name("https://x.example/p/fish.png?sig=1"), ("fish.png".into(), "image/png"));
    assert_eq!(file_name("https://x.example/photo"), ("photo".into(), "image/*"));
}
