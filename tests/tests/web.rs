//! The web page in a real headless Chromium (Debian's, driven by Playwright from npm with the
//! system browser) against the real stack: `tests/web/page.mjs` submits three photos, sees them
//! complete with the right labels, filters, opens one, downloads the CSV and sees an API error.
//! REEFLINE_SCREENSHOTS=DIR keeps its screenshots (the README's come from here).

use std::path::PathBuf;

use reefline_e2e::{Stack, TestEnv};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_web_page_submits_follows_filters_and_exports_in_a_real_browser() {
    let env = TestEnv::start().await;
    let stack = Stack::start(env.settings()).await;
    let web = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("web");
    assert!(
        web.join("node_modules/playwright-core").exists(),
        "the browser test's driver is missing: run `make setup`"
    );
    let shots = std::env::var_os("REEFLINE_SCREENSHOTS").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
    let output = tokio::process::Command::new("node")
        .arg("page.mjs")
        .args([&stack.sink, &env.photos])
        .arg(&shots)
        .current_dir(&web)
        .output()
        .await
        .expect("running node");
    let (stdout, stderr) = (String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success() && stdout.contains(r#""ok":true"#), "the browser test failed:\n{stdout}\n{stderr}");
    stack.stop().await;
    env.finish().await;
}
