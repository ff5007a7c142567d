//! The HTTP contract: `/openapi.json` and `/docs` are served, and a property-based API tester
//! (schemathesis, from the pinned venv `make setup` makes) run against each live spec on the real
//! stack finds no server error and no response that breaks the spec.

use std::time::Duration;

use reefline_e2e::{Stack, TestEnv, cache_dir, get_json};
use serde_json::json;

/// Runs schemathesis against the spec at `base/openapi.json`; its output if it found a problem.
async fn schemathesis(base: &str) -> Result<String, String> {
    let tester = cache_dir().join("venv-schemathesis/bin/schemathesis");
    assert!(tester.exists(), "{} is missing: run `make setup`", tester.display());
    let output = tokio::process::Command::new(tester)
        .args(["run", &format!("{base}/openapi.json"), "--url", base])
        // No 5xx, and every status, content type, header and body as the spec says. Not
        // `positive_data_acceptance`: a string the spec allows is not always a usable image URL.
        .args(["--checks", "not_a_server_error,status_code_conformance,content_type_conformance"])
        .args(["--checks", "response_headers_conformance,response_schema_conformance,negative_data_rejection"])
        .args(["--phases", "examples,coverage,fuzzing", "--max-examples", "30", "--seed", "20261202"])
        .args(["--workers", "2", "--request-timeout", "20", "--no-color"])
        .env("SCHEMATHESIS_HOOKS", "")
        .current_dir(std::env::temp_dir())
        .output()
        .await
        .expect("running schemathesis");
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    if output.status.success() { Ok(text) } else { Err(text) }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn both_apis_serve_their_contract_and_keep_to_it() {
    let env = TestEnv::start().await;
    let mut settings = env.settings();
    // Generated submissions that wait are answered within a second.
    settings.ingest.max_wait_seconds = 1.0;
    settings.ingest.infer_wait_seconds = 0.5;
    let stack = Stack::start(settings).await;
    let client = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
    // Feeds answer 503 until ingest has reached its database (a moment after it starts).
    reefline_e2e::feeds::wait_for_ledger(&client, &stack.ingest).await;

    for (base, paths) in [
        (
            &stack.ingest,
            vec![
                "/api/infer",
                "/classify",
                "/v1/batches/{batch_id}/retry",
                "/v1/classify",
                "/v1/feeds",
                "/v1/feeds/{feed_id}/retry",
            ],
        ),
        (
            &stack.sink,
            vec![
                "/v1/batches/{batch_id}",
                "/v1/batches/{batch_id}/results",
                "/v1/feeds/{feed_id}",
                "/v1/feeds/{feed_id}/rejects",
                "/v1/feeds/{feed_id}/results",
                "/v1/results",
                "/v1/results/export",
                "/v1/results/{request_id}",
            ],
        ),
    ] {
        let (status, spec) = get_json(&client, &format!("{base}/openapi.json")).await;
        assert_eq!((status, spec["openapi"].as_str()), (200, Some("3.1.0")), "{spec}");
        let served: Vec<&String> = spec["paths"].as_object().unwrap().keys().collect();
        assert_eq!(served, paths);
        // Swagger UI, from the binary.
        let docs = client.get(format!("{base}/docs/")).send().await.unwrap();
        assert_eq!(docs.status(), 200);
        assert!(docs.text().await.unwrap().contains("swagger-ui"), "the Swagger UI page");
        let bundle = client.get(format!("{base}/docs/swagger-ui-bundle.js")).send().await.unwrap();
        assert_eq!(bundle.status(), 200, "its script is served too, not fetched from a CDN");
    }

    // A NUL character, which Postgres cannot hold as text, is the request's fault: a 400 naming
    // the filter when it is one, a 400 all the same when it is an id (schemathesis found the 503).
    let (status, body) = get_json(&client, &format!("{}/v1/results?batch=%00b&marine=false", stack.sink)).await;
    assert_eq!(
        (status, &body["error"]["kind"], &body["error"]["field"]),
        (400, &json!("invalid_field"), &json!("batch"))
    );
    let (status, body) = get_json(&client, &format!("{}/v1/results/r%00", stack.sink)).await;
    assert_eq!((status, &body["error"]["kind"]), (400, &json!("invalid_field")), "{body}");

    for base in [&stack.ingest, &stack.sink] {
        match schemathesis(base).await {
            Ok(report) => {
                eprintln!("schemathesis on {base}:\n{}", report.lines().rev().take(12).collect::<Vec<_>>().join("\n"))
            }
            Err(report) => panic!("schemathesis found problems on {base}:\n{report}"),
        }
    }
    stack.stop().await;
    env.finish().await;
}
