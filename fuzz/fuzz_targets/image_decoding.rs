//! Any bytes a fetched URL may answer with: preprocessing yields a tensor of the model's shape or
//! an error, never a panic, and never allocates past the limits.

#![no_main]

use libfuzzer_sys::fuzz_target;
use reefline_classifier::preprocess::{InputSpec, Preprocess};

const PREPROCESS: Preprocess = Preprocess { size: 224, spec: InputSpec::EFFICIENTNET_LITE, max_side: 4096, max_pixels: 4096 * 4096, jpeg_scale_margin: 2 };

fuzz_target!(|bytes: &[u8]| {
    if let Ok(tensor) = PREPROCESS.run(bytes) {
        assert_eq!(tensor.len(), PREPROCESS.tensor_len());
        assert!(tensor.iter().all(|x| x.is_finite()));
    }
});
