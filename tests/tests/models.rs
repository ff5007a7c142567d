//! The models and their input: the classifier's preprocessing against the reference (Pillow and
//! numpy in the project's pinned venv, `models/reference.py`), survey-camera-sized versions of the
//! test photos classified as the originals are, every model of the manifest on the labelled
//! photos; and, through the real stack, a model chosen per submission and a model file swapped in
//! while images are in flight.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use reefline_classifier::engine::{Engine, OrtEngine, OrtOptions};
use reefline_classifier::preprocess::{InputSpec, Preprocess};
use reefline_e2e::{Stack, TestEnv, cache_dir, classify_coffee, model_settings, post_json, wait_for};
use serde_json::json;

const ESPRESSO: i64 = 967;

const SIZE: u32 = 224;
const PRE: Preprocess = Preprocess {
    size: SIZE,
    spec: InputSpec::EFFICIENTNET_LITE,
    max_side: 10_000,
    max_pixels: 50_000_000,
    jpeg_scale_margin: 2,
};

/// The test photos, by path, sorted.
fn test_photos() -> Vec<PathBuf> {
    let mut photos: Vec<PathBuf> = std::fs::read_dir(cache_dir().join("photos"))
        .expect("photos folder")
        .map(|e| e.expect("entry").path())
        .collect();
    photos.sort();
    assert_eq!(photos.len(), 22, "the 20 foolbox photos, chelsea and coffee");
    photos
}

/// Runs one of `models/`'s scripts in the reference venv (made by `make setup-tests`).
fn reference_python(script: &str, args: &[&str], photos: &[PathBuf]) {
    let python = cache_dir().join("venv-reference/bin/python");
    assert!(python.exists(), "{} is missing: run `make setup-tests`", python.display());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models").join(script);
    let status = Command::new(python).arg(script).args(args).args(photos).status().expect("running Python");
    assert!(status.success(), "{args:?}: {status}");
}

fn engine() -> OrtEngine {
    let cache = cache_dir();
    let options = OrtOptions::cpu(
        cache.join("onnxruntime/libonnxruntime.so.1.31.1"),
        cache.join("models/efficientnet-lite0.onnx"),
        SIZE as usize,
    );
    OrtEngine::load(&options).expect("loading the model")
}

fn top1(engine: &mut OrtEngine, tensor: &[f32]) -> usize {
    top1_and_lead(engine, tensor).0
}

/// The top class and how far its logit leads the second's.
fn top1_and_lead(engine: &mut OrtEngine, tensor: &[f32]) -> (usize, f32) {
    let logits = engine.infer(tensor, 1).expect("inference").remove(0);
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    (order[0], logits[order[0]] - logits[order[1]])
}

/// A lead below this (in logits) is a tie the model cannot decide: any change to the pixels may
/// flip it (chelsea's 12 MP version: tiger cat over Egyptian cat by 0.004 at full size).
const UNDECIDED: f32 = 0.05;

fn name(path: &Path) -> String {
    path.file_name().expect("a file").to_string_lossy().into_owned()
}

/// The reference tensors `models/reference.py` writes for `photos` into a fresh folder, by name.
fn reference_tensors(photos: &[PathBuf]) -> impl Fn(&Path) -> Vec<f32> {
    static RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let run = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let out = std::env::temp_dir().join(format!("reefline-reference-{}-{run}", std::process::id()));
    reference_python("reference.py", &[&SIZE.to_string(), out.to_str().expect("utf-8")], photos);
    move |photo| {
        let bytes = std::fs::read(out.join(format!("{}.f32", name(photo)))).expect("the reference tensor");
        bytes.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes"))).collect()
    }
}

#[test]
fn the_classifiers_input_matches_pillows_and_gives_the_same_top1_on_every_photo() {
    let photos = test_photos();
    let reference = reference_tensors(&photos);
    let mut engine = engine();
    let mut identical = 0;
    for photo in &photos {
        let ours = PRE.run(&std::fs::read(photo).expect("photo")).expect("preprocessing");
        let theirs = reference(photo);
        assert_eq!(ours.len(), theirs.len(), "{}", name(photo));
        let mad = ours.iter().zip(&theirs).map(|(a, b)| f64::from((a - b).abs())).sum::<f64>() / ours.len() as f64;
        eprintln!("{:24} mean absolute difference from Pillow's {mad:.5}", name(photo));
        assert!(mad < 0.01, "{}: the input differs from Pillow's by {mad:.5} on average", name(photo));
        identical += usize::from(ours == theirs);
        assert_eq!(
            top1(&mut engine, &ours),
            top1(&mut engine, &theirs),
            "{}: top-1 differs from the reference's",
            name(photo)
        );
    }
    eprintln!("{identical} of {} inputs bit-identical to the reference's", photos.len());
}

#[test]
fn survey_camera_sized_photos_decoded_at_a_reduced_scale_keep_their_top1() {
    let photos = test_photos();
    let dir = cache_dir().join("camera-photos-12mp");
    reference_python("camera_photos.py", &["12", dir.to_str().expect("utf-8")], &photos);
    let large: Vec<PathBuf> =
        photos.iter().map(|p| dir.join(format!("{}.jpg", p.file_stem().expect("a stem").to_string_lossy()))).collect();
    // Pillow's full decode and resize of the same 12 MP files: what a reduced-scale decode must match
    // wherever the model can tell the top two classes apart.
    let reference = reference_tensors(&large);
    let mut engine = engine();
    // The labelled photos at their own size, preprocessed as the reference does.
    let mut right_small = 0;
    let labelled: Vec<Option<usize>> = photos
        .iter()
        .map(|photo| {
            let class = name(photo)
                .strip_prefix("imagenet_")
                .and_then(|s| s.split(['_', '.']).nth(1)?.parse::<usize>().ok())?;
            let small = top1(&mut engine, &PRE.run(&std::fs::read(photo).expect("photo")).expect("preprocessing"));
            right_small += usize::from(small == class);
            Some(class)
        })
        .collect();
    // The default margin decodes a 12 MP photo (a shorter side of 2,800 to 3,500) at 1/4, a margin
    // of 1 at 1/8.
    for (margin, denom) in [(2, 4), (1, 8)] {
        let pre = Preprocess { jpeg_scale_margin: margin, ..PRE };
        let mut right_large = 0;
        for (big, class) in large.iter().zip(&labelled) {
            let bytes = std::fs::read(big).expect("the large photo");
            let inspected = pre.inspect(&bytes).expect("a JPEG header");
            let (w, h) = image::image_dimensions(big).expect("the size");
            let scaled = u64::from(w.div_ceil(denom)) * u64::from(h.div_ceil(denom));
            assert_eq!(inspected.decoded_pixels(), scaled, "{}: {w}x{h} at 1/{denom}", name(big));
            let tensor = pre.run_inspected(&bytes, &inspected).expect("preprocessing");
            let theirs = reference(big);
            let mad =
                tensor.iter().zip(&theirs).map(|(a, b)| f64::from((a - b).abs())).sum::<f64>() / tensor.len() as f64;
            let ours = top1(&mut engine, &tensor);
            let (full, lead) = top1_and_lead(&mut engine, &theirs);
            eprintln!(
                "margin {margin} {:24} top-1 {ours}, full decode's {full} (lead {lead:.3}), input off by {mad:.4}",
                name(big)
            );
            if lead >= UNDECIDED {
                assert_eq!(ours, full, "{}: top-1 differs from a full decode's (which leads by {lead:.3})", name(big));
            }
            right_large += usize::from(Some(ours) == *class);
        }
        eprintln!(
            "margin {margin}: labelled photos right: {right_small} of 20 at their own size, {right_large} at 12 MP"
        );
        assert!(
            right_large >= right_small,
            "margin {margin}: top-1 dropped at 12 MP: {right_large} right, {right_small} at their own size"
        );
    }
}

#[test]
fn every_model_of_the_manifest_knows_the_labelled_photos() {
    let cache = cache_dir();
    let settings = model_settings();
    let labelled = reefline_e2e::foolbox_photos();
    let mut right = std::collections::BTreeMap::new();
    for model in settings.load().expect("the manifest") {
        let pre = Preprocess { size: model.image_size, spec: InputSpec::of(&model), ..PRE };
        let options = OrtOptions::cpu(
            cache.join("onnxruntime/libonnxruntime.so.1.31.1"),
            settings.path(&model),
            model.image_size as usize,
        );
        let mut engine = OrtEngine::load(&options).expect("loading the model");
        let (mut top1, mut top5) = (0, 0);
        for (name, class) in &labelled {
            let tensor =
                pre.run(&std::fs::read(cache.join("photos").join(name)).expect("photo")).expect("preprocessing");
            let logits = engine.infer(&tensor, 1).expect("inference").remove(0);
            let mut order: Vec<usize> = (0..logits.len()).collect();
            order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
            top1 += usize::from(order[0] == *class);
            top5 += usize::from(order[..5].contains(class));
        }
        eprintln!("{:24} top-1 {top1}/20, top-5 {top5}/20", model.name);
        right.insert(model.name, (top1, top5));
    }
    for (name, (top1, top5)) in &right {
        assert!(*top1 >= 16 && *top5 >= 19, "{name}: top-1 {top1}/20, top-5 {top5}/20");
    }
    let (fp32, int8) = (right["efficientnet-lite0"], right["efficientnet-lite0-int8"]);
    assert!(int8.0 + 1 >= fp32.0, "int8 Lite0 loses more than one photo of fp32's: {int8:?} against {fp32:?}");
    assert!(right["efficientnet-lite2"].0 >= fp32.0, "Lite2 knows fewer photos than Lite0: {right:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_submission_may_name_its_model_and_each_result_says_which_one_answered() {
    use rdkafka::producer::FutureRecord;

    let env = TestEnv::start().await;
    let settings = env.settings().serve_every_model();
    let manifest = settings.classifier.models.load().expect("the manifest");
    let stack = Stack::start(settings).await;
    let client = reqwest::Client::new();
    let coffee = format!("{}/photos/coffee.png", env.photos);
    let classify = format!("{}/v1/classify", stack.ingest);

    // Every model of the manifest by name, and none named (the default, Lite0): espresso from each.
    let mut asked = Vec::new();
    for model in manifest.iter().map(|m| Some(m.name.as_str())).chain([None]) {
        let body = match model {
            Some(name) => json!({ "images": [&coffee], "model": name }),
            None => json!({ "images": [&coffee] }),
        };
        let (status, accepted) = post_json(&client, &classify, &body).await;
        assert_eq!(status, 202, "{accepted}");
        asked.push((model.unwrap_or("efficientnet-lite0"), accepted["request_ids"][0].as_str().unwrap().to_owned()));
    }
    assert_eq!(asked.len(), 5);
    for (model, id) in &asked {
        let url = format!("{}/v1/results/{id}", stack.sink);
        let result = reefline_e2e::wait_for_status(&client, &url, 200, "a result", Duration::from_secs(120)).await;
        let version = &manifest.iter().find(|m| m.name == *model).expect("in the manifest").version;
        assert_eq!(result["model"], json!({ "name": model, "version": version }), "{result}");
        assert_eq!(result["predictions"][0]["index"], ESPRESSO, "{model}: {result}");
    }

    // A model nobody serves: a 400 at ingest naming the field, and nothing produced.
    let (status, body) =
        post_json(&client, &classify, &json!({ "images": [&coffee], "model": "efficientnet-b7" })).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(
        (body["error"]["kind"].as_str(), body["error"]["field"].as_str()),
        (Some("unknown_model"), Some("model"))
    );
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("`efficientnet-b7`") && message.contains("efficientnet-lite2"), "{message}");

    // The same produced straight to Kafka, as a camera would: an error result saying so.
    let request = reefline_schemas::ImageRequest {
        model: Some("efficientnet-b7".into()),
        ..reefline_e2e::camera::request(&coffee)
    };
    let codec = reefline_schemas::Codec::new(&env.registry).unwrap();
    let payload = codec.encode(&env.names.requests, &request).await.unwrap();
    let producer: reefline_common::producer::FutureProducer = env.broker.kafka().producer_config().create().unwrap();
    let record = FutureRecord::to(&env.names.requests).key(&request.request_id).payload(&payload);
    producer.send(record, Duration::from_secs(10)).await.map_err(|(e, _)| e).unwrap();
    let url = format!("{}/v1/results/{}", stack.sink, request.request_id);
    let result =
        reefline_e2e::wait_for_status(&client, &url, 200, "the unknown model's result", Duration::from_secs(60)).await;
    assert_eq!(result["status"], "error", "{result}");
    assert_eq!(result["error"]["kind"], "unknown_model", "{result}");
    assert_eq!(result["model"]["name"], "efficientnet-b7", "{result}");

    stack.stop().await;
    env.finish().await;
}

#[test]
fn a_model_file_that_is_not_what_its_manifest_entry_says_is_refused_naming_both() {
    // The dog-breed file declares its input, 160 pixels, and its 19 classes.
    let cache = cache_dir();
    let dylib = cache.join("onnxruntime/libonnxruntime.so.1.31.1");
    let file = cache.join("models/dog-breeds-mobilenetv2.onnx");
    let mut options = OrtOptions::cpu(dylib, file.clone(), 160);
    options.classes = Some(19);
    OrtEngine::load(&options).expect("as its manifest entry says");
    let error = OrtEngine::load(&OrtOptions { image_size: 224, ..options.clone() }).err().expect("a wrong size");
    assert_eq!(
        error.to_string(),
        format!("{} takes input [-1, 3, 160, 160], not [N, 3, 224, 224] as its `image_size` says", file.display())
    );
    let error = OrtEngine::load(&OrtOptions { classes: Some(1000), ..options }).err().expect("a wrong table");
    assert_eq!(error.to_string(), format!("{} outputs 19 classes; its class table has 1000", file.display()));
}

/// ImageNet's bull mastiff, and the dog-breed model's (its class 11, after ImageNet's 1,000 in the
/// exports' one numbering).
const BULL_MASTIFF: i64 = 243;
const DOG_BULL_MASTIFF: i64 = 11;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_model_of_another_family_is_served_from_its_manifest_entry_and_files_alone() {
    // The repository's manifest with the dog-breed classifier's entries (tests/models/) appended:
    // its own input (160 pixels, the whole shorter side, [-1, 1]), outputs (probabilities) and
    // class table (19 breeds, all animals), and nothing else changed.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = std::env::temp_dir().join(format!("reefline-second-family-{}", uuid::Uuid::now_v7().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let manifest = dir.join("manifest.toml");
    let text = std::fs::read_to_string(root.join("models/manifest.toml")).unwrap()
        + "\n"
        + &std::fs::read_to_string(root.join("tests/models/dog-breeds.toml")).unwrap();
    std::fs::write(&manifest, text).unwrap();
    // The manifest's marine table is read beside it.
    std::fs::copy(root.join("models/marine_groups.tsv"), dir.join("marine_groups.tsv")).unwrap();
    let models = reefline_common::models::ModelSettings {
        manifest,
        served: vec!["efficientnet-lite0".into(), "dog-breeds-mobilenetv2".into()],
        ..model_settings()
    };
    let dog = models.load().unwrap().remove(1);

    let env = TestEnv::start().await;
    let mut settings = env.settings();
    settings.ingest.models = models.clone();
    settings.classifier.models = models.clone();
    settings.sink.models = models;
    let stack = Stack::start(settings).await;
    let client = reqwest::Client::new();
    let photo = format!("{}/photos/imagenet_00_243.jpg", env.photos);
    let classify = format!("{}/v1/classify", stack.ingest);

    let mut batches = Vec::new();
    for model in ["dog-breeds-mobilenetv2", "efficientnet-lite0"] {
        let (status, accepted) = post_json(&client, &classify, &json!({ "images": [&photo], "model": model })).await;
        assert_eq!(status, 202, "{accepted}");
        let id = accepted["request_ids"][0].as_str().unwrap().to_owned();
        let url = format!("{}/v1/results/{id}", stack.sink);
        let result = reefline_e2e::wait_for_status(&client, &url, 200, "a result", Duration::from_secs(120)).await;
        batches.push((accepted["batch_id"].as_str().unwrap().to_owned(), result));
    }
    // The dog-breed model names the bull mastiff from its own table, its score as it gave it.
    let (dog_batch, result) = &batches[0];
    assert_eq!(result["status"], "ok", "{result}");
    assert_eq!(result["model"], json!({ "name": "dog-breeds-mobilenetv2", "version": dog.version }), "{result}");
    let top = &result["predictions"][0];
    assert_eq!(
        (&top["index"], &top["label"], &top["wnid"]),
        (&json!(DOG_BULL_MASTIFF), &json!("bull mastiff"), &json!("n02108422")),
        "{result}"
    );
    assert!(top["score"].as_f64().unwrap() > 0.9, "{result}");
    assert_eq!(result["predictions"].as_array().unwrap().len(), 5);
    assert_eq!(result["marine_group"], json!(null), "{result}");
    // Lite0 agrees, in ImageNet's numbering.
    let (lite_batch, result) = &batches[1];
    assert_eq!(result["predictions"][0]["index"], BULL_MASTIFF, "{result}");
    assert_eq!(result["predictions"][0]["label"], "Bullmastiff", "{result}");

    // The MegaDetector export names each model's classes by ids no other table's class shares:
    // the breed's after ImageNet's 1,000, its whole table listed; an animal either way.
    let export = |batch: &str| format!("{}/v1/batches/{batch}/results?format=megadetector", stack.sink);
    let (status, dogs) = reefline_e2e::get_json(&client, &export(dog_batch)).await;
    assert_eq!(status, 200, "{dogs}");
    let detection = &dogs["images"][0]["detections"][0];
    assert_eq!(detection["category"], "1", "{dogs}");
    assert_eq!(detection["classifications"][0][0], "1011", "{dogs}");
    let categories = dogs["classification_categories"].as_object().unwrap();
    assert_eq!(categories.len(), 19, "{dogs}");
    assert_eq!((categories["1000"].as_str(), categories["1011"].as_str()), (Some("Chihuahua"), Some("bull mastiff")));
    let (status, imagenet) = reefline_e2e::get_json(&client, &export(lite_batch)).await;
    assert_eq!(status, 200, "{imagenet}");
    assert_eq!(imagenet["images"][0]["detections"][0]["classifications"][0][0], "243", "{imagenet}");
    assert_eq!(imagenet["classification_categories"].as_object().unwrap().len(), 1000);

    stack.stop().await;
    env.finish().await;
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_model_file_replaced_on_disk_is_swapped_in_without_a_restart_or_a_lost_image() {
    let env = TestEnv::start().await;
    let mut settings = env.settings();
    // The classifier's model folder is the test's own, holding a copy of Lite0 and its class table.
    let cache = reefline_e2e::cache_dir();
    // 40 copies of one photo: each must go through an engine, not the result cache.
    settings.classifier.result_cache = false;
    let dir = std::env::temp_dir().join(format!("reefline-reload-{}", env.names.classifier_group));
    std::fs::create_dir_all(dir.join("models")).unwrap();
    let file = dir.join("models/efficientnet-lite0.onnx");
    std::fs::copy(cache.join("models/efficientnet-lite0.onnx"), &file).unwrap();
    std::fs::copy(cache.join("models/imagenet_labels.tsv"), dir.join("models/imagenet_labels.tsv")).unwrap();
    settings.classifier.models.dir = dir.clone();
    let manifest = settings.classifier.models.load().unwrap();
    let stack = Stack::start(settings).await;
    let client = reqwest::Client::new();

    let before = classify_coffee(&client, &stack, &env.photos).await;
    assert_eq!(before["model"]["version"], json!(manifest[0].version), "{before}");

    // 40 images in flight while the file is replaced, atomically, by another build (the int8 one).
    let urls: Vec<String> = (0..40).map(|i| format!("{}/photos/coffee.png?copy={i}", env.photos)).collect();
    let (status, accepted) =
        post_json(&client, &format!("{}/v1/classify", stack.ingest), &json!({ "images": urls })).await;
    assert_eq!(status, 202, "{accepted}");
    std::fs::copy(cache.join("models/efficientnet-lite0-int8.onnx"), dir.join("models/incoming.onnx")).unwrap();
    std::fs::rename(dir.join("models/incoming.onnx"), &file).unwrap();
    let batch_url = format!("{}/v1/batches/{}", stack.sink, accepted["batch_id"].as_str().unwrap());
    let batch = wait_for("40 results across the swap", Duration::from_secs(120), || {
        let (client, url) = (client.clone(), batch_url.clone());
        async move { reefline_e2e::get_json_ok(&client, &url).await.filter(|b| b["done"] == true) }
    })
    .await;
    assert_eq!((batch["ok"].as_i64(), batch["error"].as_i64()), (Some(40), Some(0)), "{batch}");
    let int8 = "0.1.0+e16d6291";
    for result in batch["results"].as_array().unwrap() {
        assert_eq!(result["predictions"][0]["index"], ESPRESSO, "{result}");
        let version = result["model"]["version"].as_str().unwrap();
        assert!(version == manifest[0].version || version == int8, "{result}");
    }

    // From the first batch on the new file, results name it.
    let after = classify_coffee(&client, &stack, &env.photos).await;
    assert_eq!(after["model"], json!({ "name": "efficientnet-lite0", "version": int8 }), "{after}");
    assert_eq!(after["predictions"][0]["index"], ESPRESSO, "{after}");

    stack.stop().await;
    env.finish().await;
    std::fs::remove_dir_all(&dir).ok();
}
