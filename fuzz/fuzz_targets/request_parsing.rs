//! Any body ingest may receive: parsing and checking either answers or refuses, never panics,
//! and what it accepts respects the limits.

#![no_main]

use libfuzzer_sys::fuzz_target;
use reefline_ingest::validate::{ClassifyRequest, Limits, SingleRequest, check_images, check_url, parse_json};

const LIMITS: Limits = Limits { max_images: 1000, max_url_bytes: 2048 };

fuzz_target!(|body: &[u8]| {
    if let Ok(request) = parse_json::<ClassifyRequest>(body)
        && let Ok(urls) = check_images(request.images, LIMITS)
    {
        assert!(!urls.is_empty() && urls.len() <= LIMITS.max_images);
        assert!(urls.iter().all(|u| matches!(u.scheme(), "http" | "https") && u.host_str().is_some()));
    }
    if let Ok(request) = parse_json::<SingleRequest>(body)
        && let Some(raw) = request.image_url
    {
        let _ = check_url(&raw, LIMITS.max_url_bytes);
    }
});
