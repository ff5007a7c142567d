//! Any bytes a fetched URL may answer with: reading their EXIF and header (what the classifier
//! learns of every photo before decoding it) gives what it can read, never a panic, and keeps what
//! it gives within the bounds results and exports rely on.

#![no_main]

use libfuzzer_sys::fuzz_target;
use reefline_classifier::photo::learn;

fuzz_target!(|bytes: &[u8]| {
    let photo = learn(bytes);
    assert_eq!(photo.sha256.len(), 64);
    let exif = photo.exif;
    assert!(exif.gps_latitude.is_none_or(|l| l.is_finite() && l.abs() <= 90.0));
    assert!(exif.gps_longitude.is_none_or(|l| l.is_finite() && l.abs() <= 180.0));
    assert!(exif.gps_altitude.is_none_or(f64::is_finite));
    assert!(exif.width.is_none_or(|w| w >= 0) && exif.height.is_none_or(|h| h >= 0));
    for text in [&exif.camera_make, &exif.camera_model, &exif.taken_at].into_iter().flatten() {
        assert!(!text.is_empty() && text.len() <= 256 && !text.chars().any(char::is_control), "{text:?}");
    }
});
