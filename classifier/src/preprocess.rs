//! Bytes to model input: sniff, decode within limits, resize and centre-crop as the reference
//! preprocessing (Pillow, torchvision's Resize and CenterCrop) does, normalise.

use std::io::Cursor;

use image::{ImageFormat, ImageReader, Limits};

use crate::error::ImageError;
use crate::{jpeg, resample};

/// How images are turned into tensors.
#[derive(Clone, Copy, Debug)]
pub struct Preprocess {
    /// Side of the square model input (224 for Lite0).
    pub size: u32,
    /// How the model wants that square framed and its pixels scaled (its manifest entry's).
    pub spec: InputSpec,
    /// Largest width or height accepted before decoding.
    pub max_side: u32,
    /// Most pixels (width × height) accepted before decoding; with `max_side` this bounds the
    /// memory one decode may take.
    pub max_pixels: u64,
    /// A JPEG is shrunk in the IDCT (1/2, 1/4, 1/8) while its shorter side stays at least this
    /// many times the resize target. 2 leaves at least the last halving to Pillow's antialiased
    /// filter, so a photo up to twice the target (ImageNet's, the test photos) decodes in full and
    /// matches the reference to the bit, and a 12-megapixel one decodes at 1/4; 1 decodes least
    /// (the 12-megapixel one at 1/8, a 512-pixel one at 1/2) and gives up that parity.
    pub jpeg_scale_margin: u32,
}

/// Lowers the calling thread's scheduling priority to `nice` (Linux; elsewhere nothing), once per
/// thread (an unprivileged thread cannot raise it again). Bulk decoding runs at a lower priority
/// than inference: the engines are the pipeline's bottleneck, so they should never wait for a core
/// a decoder holds, while decoders only need to stay a few batches ahead and fill the moments the
/// engines leave a core idle. The engines in turn run below the default, under the short tasks
/// that move records and interactive images.
pub fn lower_thread_priority(nice: i32) {
    thread_local! {
        static LOWERED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }
    if nice <= 0 || LOWERED.with(|done| done.replace(true)) {
        return;
    }
    #[cfg(target_os = "linux")]
    // SAFETY: setpriority on this thread's own id (PRIO_PROCESS with a tid is per thread on Linux).
    unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice);
    }
}

/// What a model's manifest entry says of its input, beyond its size: the fraction of the resized
/// shorter side the centre crop keeps, and each channel's normalisation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct InputSpec {
    pub crop_fraction: f64,
    /// Per channel R, G, B, in pixel units: the input is `(pixel − mean) / std`.
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl InputSpec {
    /// EfficientNet-Lite's, as the manifest gives it: 224 of 256, `(pixel − 127) / 128`.
    pub const EFFICIENTNET_LITE: Self = Self { crop_fraction: 0.875, mean: [127.0; 3], std: [128.0; 3] };

    pub fn of(model: &reefline_common::models::Model) -> Self {
        Self { crop_fraction: model.crop_fraction, mean: model.mean, std: model.std }
    }
}

/// What is known of an image before it is decoded: its size and how it will be decoded, read
/// from its header and within the limits.
#[derive(Clone, Copy, Debug)]
pub struct Inspected {
    width: u32,
    height: u32,
    decoder: Decoder,
}

#[derive(Clone, Copy, Debug)]
enum Decoder {
    /// libjpeg-turbo, at 1/`denom` of the full size.
    Jpeg { header: jpeg::Header, denom: u32 },
    /// The `image` crate: PNG, GIF, WebP, BMP, and the JPEGs libjpeg-turbo cannot give as RGB (CMYK,
    /// YCCK) or cannot read.
    Generic,
}

impl Inspected {
    /// Pixels of the decoded image (after any scaling in the IDCT): what decoding it holds in memory.
    pub fn decoded_pixels(&self) -> u64 {
        let denom = match self.decoder {
            Decoder::Jpeg { denom, .. } => denom,
            Decoder::Generic => 1,
        };
        u64::from(jpeg::scaled(self.width, denom)) * u64::from(jpeg::scaled(self.height, denom))
    }
}

/// Where the model's input comes from in a decoded image, as torchvision's `Resize(target)` then
/// `CenterCrop(size)` place it: the image resized so its shorter side is `target` and its longer
/// side in proportion (truncated), then the `size`×`size` square at (`left`, `top`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Geometry {
    pub resized_width: u32,
    pub resized_height: u32,
    pub left: u32,
    pub top: u32,
}

impl Geometry {
    pub fn new(width: u32, height: u32, target: u32, size: u32) -> Self {
        let (w, h, t) = (f64::from(width), f64::from(height), f64::from(target));
        let (resized_width, resized_height) =
            if width <= height { (target, (t * h / w) as u32) } else { ((t * w / h) as u32, target) };
        // CenterCrop's offsets: int(round((resized - size) / 2.0)), Python rounding half to even.
        let offset = |resized: u32| (f64::from(resized.saturating_sub(size)) / 2.0).round_ties_even() as u32;
        Self { resized_width, resized_height, left: offset(resized_width), top: offset(resized_height) }
    }
}

impl Preprocess {
    /// Floats per image: 3 × size × size.
    pub fn tensor_len(&self) -> usize {
        3 * (self.size as usize).pow(2)
    }

    /// The shorter side the image is resized to before the centre crop: round(size / crop
    /// fraction), 256 for a 224 input cropped at 0.875.
    pub fn resize_target(&self) -> u32 {
        (f64::from(self.size) / self.spec.crop_fraction).round() as u32
    }

    /// Decodes `bytes` and returns the CHW float tensor the model takes.
    pub fn run(&self, bytes: &[u8]) -> Result<Vec<f32>, ImageError> {
        let inspected = self.inspect(bytes)?;
        self.run_inspected(bytes, &inspected)
    }

    /// [`Preprocess::run`] for an image already inspected.
    pub fn run_inspected(&self, bytes: &[u8], inspected: &Inspected) -> Result<Vec<f32>, ImageError> {
        let mut tensor = Vec::with_capacity(self.tensor_len());
        self.run_inspected_into(bytes, inspected, &mut tensor)?;
        Ok(tensor)
    }

    /// [`Preprocess::run_inspected`], appending the tensor to `out` (a batch's input); on an
    /// error `out` is as it was.
    pub fn run_inspected_into(
        &self,
        bytes: &[u8],
        inspected: &Inspected,
        out: &mut Vec<f32>,
    ) -> Result<(), ImageError> {
        thread_local! {
            static PIXELS: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        PIXELS.with_borrow_mut(|pixels| {
            let decoded = self.decode_into(bytes, inspected, pixels);
            if let Ok((width, height)) = decoded {
                self.tensor_from_rgb_into(pixels, width, height, out);
            }
            if pixels.capacity() > KEPT_PIXEL_BYTES {
                *pixels = Vec::new();
            }
            decoded.map(drop)
        })
    }

    /// The model input from decoded interleaved RGB pixels: resized, centre-cropped, normalised.
    pub fn tensor_from_rgb(&self, rgb: &[u8], width: u32, height: u32) -> Vec<f32> {
        let mut tensor = Vec::with_capacity(self.tensor_len());
        self.tensor_from_rgb_into(rgb, width, height, &mut tensor);
        tensor
    }

    fn tensor_from_rgb_into(&self, rgb: &[u8], width: u32, height: u32, out: &mut Vec<f32>) {
        let g = Geometry::new(width, height, self.resize_target(), self.size);
        let window = resample::resize_window(
            rgb,
            (width as usize, height as usize),
            (g.resized_width as usize, g.resized_height as usize),
            (g.left as usize, g.top as usize),
            self.size as usize,
        );
        to_chw_into(&window, &self.spec, out);
    }

    /// Reads the image's header without decoding it: its size, and how it will be decoded; an
    /// error if the bytes are not an image or it is larger than the limits.
    pub fn inspect(&self, bytes: &[u8]) -> Result<Inspected, ImageError> {
        let reader = ImageReader::new(Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| ImageError::DecodeFailed(e.to_string()))?;
        let inspected = match (reader.format(), jpeg_header(bytes)) {
            (None, _) => return Err(ImageError::NotAnImage),
            (Some(ImageFormat::Jpeg), Some(header)) => {
                let (width, height) = (header.width, header.height);
                let min_short = self.jpeg_scale_margin.max(1) * self.resize_target();
                let denom = if header.scalable { jpeg::reduction_for(width, height, min_short) } else { 1 };
                let decoder = if header.rgb_decodable { Decoder::Jpeg { header, denom } } else { Decoder::Generic };
                Inspected { width, height, decoder }
            }
            (Some(_), _) => {
                let (width, height) = reader.into_dimensions().map_err(|e| ImageError::DecodeFailed(e.to_string()))?;
                Inspected { width, height, decoder: Decoder::Generic }
            }
        };
        let (width, height) = (inspected.width, inspected.height);
        if width.max(height) > self.max_side {
            let limit = format!("{} pixels per side", self.max_side);
            return Err(ImageError::DimensionsTooLarge { width, height, limit });
        }
        if u64::from(width) * u64::from(height) > self.max_pixels {
            let limit = format!("{} pixels in all", self.max_pixels);
            return Err(ImageError::DimensionsTooLarge { width, height, limit });
        }
        if width == 0 || height == 0 {
            return Err(ImageError::DecodeFailed(format!("the image is {width}x{height} pixels")));
        }
        Ok(inspected)
    }

    /// The decoded image as interleaved RGB bytes, with its width and height (a JPEG at the scale
    /// [`Preprocess::inspect`] chose).
    pub fn decode(&self, bytes: &[u8], inspected: &Inspected) -> Result<(Vec<u8>, u32, u32), ImageError> {
        let mut pixels = Vec::new();
        let (width, height) = self.decode_into(bytes, inspected, &mut pixels)?;
        Ok((pixels, width, height))
    }

    /// [`Preprocess::decode`] into `pixels`, reusing its memory (a JPEG's; another format's
    /// decoder allocates its own), with the width and height.
    pub fn decode_into(
        &self,
        bytes: &[u8],
        inspected: &Inspected,
        pixels: &mut Vec<u8>,
    ) -> Result<(u32, u32), ImageError> {
        // The largest decoded buffer: 16-bit RGBA, 8 bytes a pixel.
        let max_bytes = self.max_pixels.saturating_mul(8);
        let mut jpeg_error = None;
        if let Decoder::Jpeg { header, denom } = inspected.decoder {
            let max_memory_mb = u32::try_from(max_bytes >> 20).unwrap_or(u32::MAX).max(1);
            match jpeg::decode_rgb(bytes, &header, denom, max_memory_mb, pixels) {
                Ok(size) => return Ok(size),
                // A JPEG libjpeg-turbo refuses or warns about may still be one the `image` crate
                // reads (its encoder's grayscale files; a truncated photo, as far as it goes); if
                // neither can, libjpeg-turbo's reason is given.
                Err(e) => jpeg_error = Some(e.to_string()),
            }
        }
        let mut reader = ImageReader::new(Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| ImageError::DecodeFailed(e.to_string()))?;
        let mut limits = Limits::default();
        limits.max_image_width = Some(self.max_side);
        limits.max_image_height = Some(self.max_side);
        limits.max_alloc = Some(max_bytes);
        reader.limits(limits);
        let image =
            reader.decode().map_err(|e| ImageError::DecodeFailed(jpeg_error.unwrap_or_else(|| e.to_string())))?;
        let image = image.into_rgb8();
        let (width, height) = image.dimensions();
        *pixels = image.into_raw();
        Ok((width, height))
    }
}

/// The most decoded pixel memory a thread keeps for its next image: a 12-megapixel photo decoded
/// at a quarter of its sides takes 2.25 MB, the bench photos about 0.6 MB.
const KEPT_PIXEL_BYTES: usize = 8 << 20;

/// The header of a JPEG libjpeg-turbo can read; `None` for anything else (the `image` crate reads those).
fn jpeg_header(bytes: &[u8]) -> Option<jpeg::Header> {
    bytes.starts_with(&[0xff, 0xd8]).then(|| jpeg::header(bytes).ok()).flatten()
}

/// Interleaved RGB bytes (a `size`×`size` square) to planar floats, x = (pixel − mean) / std per
/// channel: each channel's 256 values are computed once, so the result is the division's to the bit.
pub fn to_chw(rgb: &[u8], size: usize, spec: &InputSpec) -> Vec<f32> {
    let mut out = Vec::with_capacity(3 * size * size);
    to_chw_into(rgb, spec, &mut out);
    out
}

/// [`to_chw`], appending to `out` one plane after another (nothing is written twice).
fn to_chw_into(rgb: &[u8], spec: &InputSpec, out: &mut Vec<f32>) {
    let table: [[f32; 256]; 3] =
        std::array::from_fn(|c| std::array::from_fn(|v| (v as f32 - spec.mean[c]) / spec.std[c]));
    out.reserve(rgb.len());
    for (c, table) in table.iter().enumerate() {
        out.extend(rgb.chunks_exact(3).map(|px| table[usize::from(px[c])]));
    }
}

/// Lite0's preprocessing within generous limits, for the tests.
#[cfg(test)]
pub(crate) const TEST_LITE0: Preprocess = Preprocess {
    size: 224,
    spec: InputSpec::EFFICIENTNET_LITE,
    max_side: 4096,
    max_pixels: 4096 * 4096,
    jpeg_scale_margin: 2,
};

#[cfg(test)]
mod tests {
    use super::TEST_LITE0 as P;
    use super::*;

    fn png(width: u32, height: u32, pixel: [u8; 3]) -> Vec<u8> {
        let img = image::RgbImage::from_pixel(width, height, image::Rgb(pixel));
        let mut out = Vec::new();
        img.write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png).unwrap();
        out
    }

    #[test]
    fn known_pixels_map_to_known_values() {
        let t = to_chw(&[255, 127, 0, 255, 127, 0, 255, 127, 0, 255, 127, 0], 2, &InputSpec::EFFICIENTNET_LITE);
        assert_eq!(t.len(), 12);
        assert_eq!(&t[0..4], &[1.0; 4]); // R 255 -> (255-127)/128
        assert_eq!(&t[4..8], &[0.0; 4]); // G 127 -> 0
        assert_eq!(&t[8..12], &[-127.0 / 128.0; 4]); // B 0
    }

    #[test]
    fn another_models_framing_and_normalisation_come_from_its_spec() {
        // torchvision's ImageNet normalisation in pixel units, and the whole shorter side kept.
        let spec = InputSpec { crop_fraction: 1.0, mean: [123.675, 116.28, 103.53], std: [58.395, 57.12, 57.375] };
        let t = to_chw(&[255, 0, 128], 1, &spec);
        assert_eq!(t, [(255.0 - 123.675) / 58.395, (0.0 - 116.28) / 57.12, (128.0 - 103.53) / 57.375]);
        let p = Preprocess { size: 96, spec, ..P };
        assert_eq!(p.resize_target(), 96);
        // A 200×100 image: resized to 192×96, the centre 96 square kept; left red, right blue.
        let mut img = image::RgbImage::new(200, 100);
        for (x, _, px) in img.enumerate_pixels_mut() {
            *px = if x < 100 { image::Rgb([255, 0, 0]) } else { image::Rgb([0, 0, 255]) };
        }
        let mut bytes = Vec::new();
        img.write_to(&mut Cursor::new(&mut bytes), image::ImageFormat::Png).unwrap();
        let t = p.run(&bytes).unwrap();
        assert_eq!(t.len(), 3 * 96 * 96);
        let red = |x: usize| t[40 * 96 + x];
        assert_eq!((red(0), red(95)), (t[0], (0.0 - 123.675) / 58.395));
        assert_eq!(red(0), (255.0 - 123.675) / 58.395);
    }

    #[test]
    fn a_uniform_image_of_any_shape_becomes_a_uniform_tensor() {
        let t = P.run(&png(640, 300, [200, 100, 50])).unwrap();
        assert_eq!(t.len(), P.tensor_len());
        let plane = 224 * 224;
        assert!(t[..plane].iter().all(|&v| (v - 73.0 / 128.0).abs() < 1e-6));
        assert!(t[plane..2 * plane].iter().all(|&v| (v - (-27.0 / 128.0)).abs() < 1e-6));
        assert!(t[2 * plane..].iter().all(|&v| (v - (-77.0 / 128.0)).abs() < 1e-6));
    }

    #[test]
    fn the_center_is_kept() {
        // Left half black, right half white: the crop keeps both halves, split down the middle.
        let mut img = image::RgbImage::new(512, 256);
        for (x, _, p) in img.enumerate_pixels_mut() {
            *p = if x < 256 { image::Rgb([0, 0, 0]) } else { image::Rgb([255, 255, 255]) };
        }
        let mut bytes = Vec::new();
        img.write_to(&mut Cursor::new(&mut bytes), image::ImageFormat::Png).unwrap();
        let t = P.run(&bytes).unwrap();
        assert_eq!(t[100 * 224 + 10], -127.0 / 128.0);
        assert_eq!(t[100 * 224 + 213], 1.0);
    }

    fn jpeg(width: u32, height: u32) -> Vec<u8> {
        let img = image::RgbImage::from_fn(width, height, |x, y| image::Rgb([(x % 256) as u8, (y % 256) as u8, 90]));
        let mut out = Vec::new();
        img.write_to(&mut Cursor::new(&mut out), image::ImageFormat::Jpeg).unwrap();
        out
    }

    #[test]
    fn the_geometry_is_torchvisions_resize_then_center_crop() {
        // 500×375: 341×256 (256·500/375 = 341.3, truncated), offsets round((341−224)/2 = 58.5) = 58
        // (half to even, as Python rounds) and 16.
        let g = Geometry::new(500, 375, 256, 224);
        assert_eq!(g, Geometry { resized_width: 341, resized_height: 256, left: 58, top: 16 });
        let g = Geometry::new(375, 500, 256, 224);
        assert_eq!(g, Geometry { resized_width: 256, resized_height: 341, left: 16, top: 58 });
        // 683/2.5: 256·640/425 = 385.5 → 385, (385−224)/2 = 80.5 → 80.
        assert_eq!(Geometry::new(640, 425, 256, 224).left, 80);
        assert_eq!(
            Geometry::new(300, 300, 256, 224),
            Geometry { resized_width: 256, resized_height: 256, left: 16, top: 16 }
        );
        assert_eq!(P.resize_target(), 256);
        assert_eq!(Preprocess { size: 240, ..P }.resize_target(), 274);
        assert_eq!(Preprocess { size: 260, ..P }.resize_target(), 297);
    }

    #[test]
    fn an_image_of_extreme_aspect_ratio_is_resized_without_a_huge_buffer() {
        let t = P.run(&png(4000, 1, [10, 20, 30])).unwrap();
        assert_eq!(t.len(), P.tensor_len());
        assert!((t[0] - (10.0 - 127.0) / 128.0).abs() < 1e-6);
    }

    #[test]
    fn large_jpegs_are_decoded_scaled_and_others_in_full() {
        let p = Preprocess { max_side: 10_000, max_pixels: 50_000_000, ..P };
        let large = p.inspect(&jpeg(4000, 3000)).unwrap();
        assert_eq!(large.decoded_pixels(), 1000 * 750, "1/4 leaves 750 ≥ 2 × 256; 1/8 would leave 375");
        assert_eq!(p.inspect(&jpeg(2048, 1536)).unwrap().decoded_pixels(), 1024 * 768);
        assert_eq!(p.inspect(&jpeg(1024, 682)).unwrap().decoded_pixels(), 1024 * 682);
        assert_eq!(p.inspect(&jpeg(512, 512)).unwrap().decoded_pixels(), 512 * 512);
        assert_eq!(p.inspect(&png(4000, 3000, [1, 2, 3])).unwrap().decoded_pixels(), 4000 * 3000);
        let t = p.run(&jpeg(4000, 3000)).unwrap();
        assert_eq!(t.len(), p.tensor_len());

        // A margin of 1: shrunk as long as the shorter side keeps the resize target (256).
        let least = Preprocess { jpeg_scale_margin: 1, ..p };
        assert_eq!(least.inspect(&jpeg(4000, 3000)).unwrap().decoded_pixels(), 500 * 375);
        assert_eq!(least.inspect(&jpeg(1024, 682)).unwrap().decoded_pixels(), 512 * 341);
        assert_eq!(least.inspect(&jpeg(512, 512)).unwrap().decoded_pixels(), 256 * 256);
        assert_eq!(least.inspect(&jpeg(500, 375)).unwrap().decoded_pixels(), 500 * 375);
        assert_eq!(least.run(&jpeg(4000, 3000)).unwrap().len(), p.tensor_len());
    }

    #[test]
    fn jpegs_libjpeg_turbo_refuses_are_read_by_the_image_crate() {
        // The image crate's own grayscale JPEGs carry a DQT libjpeg-turbo calls bogus.
        let gray = image::GrayImage::from_fn(37, 23, |x, y| image::Luma([(x ^ y) as u8]));
        let mut bytes = Vec::new();
        gray.write_to(&mut Cursor::new(&mut bytes), image::ImageFormat::Jpeg).unwrap();
        assert_eq!(P.run(&bytes).unwrap().len(), P.tensor_len());
    }

    /// Photo-like JPEGs as cameras and encoders write them: baseline and progressive, 4:2:0 and
    /// 4:4:4, with and without restart markers, in sizes decoded in full and scaled in the IDCT.
    fn camera_jpegs(rng: &mut fastrand::Rng) -> Vec<Vec<u8>> {
        use jpeg_encoder::{ColorType, Encoder, SamplingFactor};
        let mut out = Vec::new();
        for (i, (w, h)) in [(500u16, 375u16), (375, 500), (1024, 683), (2100, 1400), (61, 47)].into_iter().enumerate() {
            let pixels: Vec<u8> = (0..usize::from(w) * usize::from(h))
                .flat_map(|p| {
                    let (x, y) = (p % usize::from(w), p / usize::from(w));
                    [(x * 255 / usize::from(w)) as u8, (y * 255 / usize::from(h)) as u8, rng.u8(..)]
                })
                .collect();
            let mut jpeg = Vec::new();
            let mut encoder = Encoder::new(&mut jpeg, 85);
            encoder.set_progressive(i % 2 == 1);
            encoder.set_sampling_factor(if i % 3 == 0 { SamplingFactor::R_4_2_0 } else { SamplingFactor::R_4_4_4 });
            if i == 2 {
                encoder.set_restart_interval(4);
            }
            encoder.encode(&pixels, w, h, ColorType::Rgb).expect("encoding a JPEG");
            out.push(jpeg);
        }
        out
    }

    #[test]
    fn damaged_jpegs_are_decoded_as_far_as_they_go_or_refused_and_never_crash() {
        // As the hostile end-to-end test damages photos, seeded: cut short, or bytes changed
        // (markers, tables, sizes and scan data alike). Under valgrind this is the memory check
        // of the libjpeg-turbo layer.
        let mut rng = fastrand::Rng::with_seed(21);
        let photos = camera_jpegs(&mut rng);
        let p = Preprocess { max_side: 10_000, max_pixels: 50_000_000, ..P };
        let (mut decoded, mut refused) = (0, 0);
        for n in 0..400 {
            let photo = &photos[n % photos.len()];
            let damaged = if n % 2 == 0 {
                photo[..rng.usize(0..photo.len())].to_vec()
            } else {
                let mut bytes = photo.clone();
                for _ in 0..rng.usize(1..50) {
                    let i = rng.usize(2..bytes.len());
                    bytes[i] = rng.u8(..);
                }
                bytes
            };
            match p.run(&damaged) {
                Ok(tensor) => {
                    assert_eq!(tensor.len(), p.tensor_len());
                    decoded += 1;
                }
                Err(_) => refused += 1,
            }
        }
        assert!(decoded > 0 && refused > 0, "{decoded} decoded, {refused} refused");
    }

    #[test]
    fn non_images_and_oversized_images_are_refused() {
        assert_eq!(P.run(b"<html>not an image</html>").unwrap_err().kind(), "not_an_image");
        let mut truncated = png(64, 64, [1, 2, 3]);
        truncated.truncate(60);
        assert_eq!(P.run(&truncated).unwrap_err().kind(), "decode_failed");
        let small = Preprocess { max_side: 100, max_pixels: 5000, ..P };
        assert_eq!(small.run(&png(101, 50, [0, 0, 0])).unwrap_err().kind(), "dimensions_too_large");
        let err = small.run(&png(100, 51, [0, 0, 0])).unwrap_err();
        assert_eq!(err.to_string(), "the image is 100x51 pixels; the limit is 5000 pixels in all");
    }
}
