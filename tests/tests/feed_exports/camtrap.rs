//! A survey feed exported as Camtrap DP, and validated by `frictionless` against the 1.0.2
//! profile and table schemas; the package of a search.

use std::time::Duration;

use reefline_e2e::feeds::post_feed;
use reefline_e2e::{Stack, TestEnv, foolbox_photos, get_json};
use serde_json::{Value, json};

/// A survey feed as Camtrap DP: three cameras (deployments), one with times in ISO 8601 with their
/// offset, one with camera-clock times (no offset), one whose coordinates are only in a photo's
/// EXIF, and one photo that is missing.
pub(super) async fn package_of_a_survey(client: &reqwest::Client, env: &TestEnv, stack: &Stack, camera_url: &str) {
    let photos = foolbox_photos();
    let base = &env.photos;
    // Camtrap DP's deploymentID is read from `station` here, one of its aliases.
    let mut csv = String::from("station,lat,longitude,timestamp,captureMethod,url\n");
    for (i, (name, _)) in photos.iter().enumerate().take(10) {
        csv.push_str(&format!(
            "CAM-A,-16.5,145.5,2026-11-20T06:00:{i:02}+10:00,activityDetection,{base}/photos/{name}\n"
        ));
    }
    csv.push_str(&format!("CAM-A,-16.5,145.5,2026-11-20T06:01:00+10:00,activityDetection,{base}/photos/missing.jpg\n"));
    for (i, (name, _)) in photos.iter().enumerate().skip(10).take(10) {
        csv.push_str(&format!("CAM-B,-18.25,147.75,2026-11-21 07:00:{i:02},timeLapse,{base}/photos/{name}?b={i}\n"));
    }
    csv.push_str(&format!("CAM-C,,,,,{camera_url}\n"));
    csv.push_str(&format!("CAM-C,,,2026-11-20T13:41:07Z,,{base}/photos/coffee.png\n"));
    let (status, feed, _) = post_feed(client, &stack.ingest, "text/csv", None, csv.into()).await.unwrap();
    assert_eq!((status, &feed["accepted"]), (201, &json!(23)), "{feed}");
    let feed_id = feed["feed_id"].as_str().unwrap();
    reefline_e2e::wait_for("every result of the survey", Duration::from_secs(300), || async {
        let (_, progress) = get_json(client, &format!("{}/v1/feeds/{feed_id}", stack.sink)).await;
        (progress["done"] == json!(true)).then_some(())
    })
    .await;
    let url = format!("{}/v1/feeds/{feed_id}/results?format=camtrap-dp", stack.sink);

    // CAM-B's camera clock gives no offset: the export asks for it.
    let (status, refused) = get_json(client, &url).await;
    assert_eq!((status, &refused["error"]["missing"]), (422, &json!(["utc_offset"])), "{refused}");
    let message = refused["error"]["message"].as_str().unwrap();
    let expected =
        "10 classified images have a time taken without a UTC offset (the first: line 13 (2026-11-21 07:00:10))";
    assert!(message.contains(expected), "{message}");
    for (query, field) in
        [("utc_offset=10", "utc_offset"), ("latitude=-16", "longitude"), ("sampling_design=random", "sampling_design")]
    {
        let (status, refused) = get_json(client, &format!("{url}&{query}")).await;
        assert_eq!((status, &refused["error"]["field"]), (400, &json!(field)), "{query}: {refused}");
    }
    for query in ["format=csv&utc_offset=%2B10:00", "format=camtrap-dp&status=error"] {
        let (status, refused) = get_json(client, &format!("{}/v1/feeds/{feed_id}/results?{query}", stack.sink)).await;
        assert_eq!(status, 400, "{query}: {refused}");
    }

    // At the cameras' offset: a package that frictionless finds valid against the Camtrap DP
    // 1.0.2 profile and table schemas.
    let export = client.get(format!("{url}&utc_offset=%2B10:00&sampling_design=targeted")).send().await.unwrap();
    assert_eq!(export.status(), 200);
    assert_eq!(export.headers()["content-type"], "application/zip");
    let package = reefline_e2e::feeds::camtrap_validator(&export.bytes().await.unwrap());
    assert_eq!(package["valid"], json!(true), "{}", package["errors"]);
    assert_eq!(package["files"], json!(["datapackage.json", "deployments.csv", "media.csv", "observations.csv"]));
    let table = |name: &str| package["tables"][name].as_array().unwrap().clone();
    let (deployments, media, observations) = (table("deployments"), table("media"), table("observations"));
    // The missing photo is left out; every other image is one media row and one observation.
    assert_eq!((deployments.len(), media.len(), observations.len()), (3, 22, 22));
    let deployment = |id: &str| deployments.iter().find(|d| d["deploymentID"] == json!(id)).unwrap().clone();
    let fields =
        |row: &Value, names: &[&str]| names.iter().map(|n| row[*n].as_str().unwrap().to_owned()).collect::<Vec<_>>();
    let columns = ["latitude", "longitude", "deploymentStart", "deploymentEnd", "cameraModel"];
    assert_eq!(
        fields(&deployment("CAM-A"), &columns),
        ["-16.5", "145.5", "2026-11-20T06:00:00+10:00", "2026-11-20T06:00:09+10:00", ""]
    );
    assert_eq!(
        fields(&deployment("CAM-B"), &columns),
        ["-18.25", "147.75", "2026-11-21T07:00:10+10:00", "2026-11-21T07:00:19+10:00", ""]
    );
    // CAM-C is where its camera photo's EXIF GPS says, from its EXIF time to the coffee photo's.
    assert_eq!(
        fields(&deployment("CAM-C"), &columns),
        ["-16.921", "145.778111", "2026-11-20T09:41:07+10:00", "2026-11-20T13:41:07Z", "Reefline-TestCam 1"]
    );
    let camera = media.iter().find(|m| m["filePath"] == json!(camera_url)).unwrap();
    assert_eq!(
        fields(camera, &["deploymentID", "timestamp", "fileName", "fileMediatype", "filePublic"]),
        ["CAM-C", "2026-11-20T09:41:07+10:00", "DSC0001.JPG", "image/jpeg", "true"]
    );
    let exif: Value = serde_json::from_str(camera["exifData"].as_str().unwrap()).unwrap();
    assert_eq!(exif["camera_model"], json!("TestCam 1"), "{exif}");
    assert_eq!(media.iter().filter(|m| m["captureMethod"] == json!("timeLapse")).count(), 10);
    // Each observation is its image's top class, by the model: ImageNet's animals are `animal`.
    for observation in &observations {
        let image = media.iter().find(|m| m["mediaID"] == observation["mediaID"]).unwrap();
        assert_eq!((&observation["eventStart"], &observation["eventEnd"]), (&image["timestamp"], &image["timestamp"]));
        assert_eq!(
            fields(observation, &["observationLevel", "classificationMethod"]),
            ["media", "machine"],
            "{observation}"
        );
        assert!(observation["classifiedBy"].as_str().unwrap().starts_with("efficientnet-lite0 "), "{observation}");
        let probability: f64 = observation["classificationProbability"].as_str().unwrap().parse().unwrap();
        assert!((0.0..=1.0).contains(&probability));
    }
    let coffee = observations.iter().find(|o| o["observationTags"] == json!("imagenet:espresso")).unwrap();
    assert_eq!(coffee["observationType"], json!("unclassified"), "espresso is no animal: {coffee}");
    let animals = observations.iter().filter(|o| o["observationType"] == json!("animal")).count();
    assert!(animals >= 5, "{animals} of the foolbox photos are animals");
    let descriptor = &package["package"];
    assert_eq!(
        descriptor["profile"],
        json!("https://raw.githubusercontent.com/tdwg/camtrap-dp/1.0.2/camtrap-dp-profile.json")
    );
    assert_eq!(descriptor["temporal"], json!({"start": "2026-11-20", "end": "2026-11-21"}));
    assert_eq!(descriptor["spatial"]["type"], json!("Polygon"));
    assert_eq!(descriptor["project"]["samplingDesign"], json!("targeted"));
    assert_eq!(descriptor["project"]["captureMethod"], json!(["activityDetection", "timeLapse"]));
    let description = descriptor["description"].as_str().unwrap();
    assert!(description.contains("Left out: 1 image that could not be classified."), "{description}");

    // A search's package: the espressos of every feed. The first feed's give no time, so it is
    // refused, counting them; those of this survey make a package of their own.
    let search = format!("{}/v1/results/export?label=espresso&format=camtrap-dp", stack.sink);
    let (status, refused) = get_json(client, &search).await;
    assert_eq!((status, &refused["error"]["missing"]), (422, &json!(["timestamp"])), "{refused}");
    let export = client.get(format!("{search}&feed={feed_id}")).send().await.unwrap();
    assert_eq!(export.status(), 200);
    let package = reefline_e2e::feeds::camtrap_validator(&export.bytes().await.unwrap());
    assert_eq!(package["valid"], json!(true), "{}", package["errors"]);
    // The camera photo and the coffee photo, both espresso.
    let media = package["tables"]["media"].as_array().unwrap();
    assert_eq!(media.iter().map(|m| m["deploymentID"].as_str().unwrap()).collect::<Vec<_>>(), ["CAM-C", "CAM-C"]);
    assert_eq!(package["tables"]["deployments"].as_array().unwrap().len(), 1);
    assert_eq!(package["package"]["name"], json!("reefline-search-results"));
}
