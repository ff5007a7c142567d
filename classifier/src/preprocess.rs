//! Bytes to model input: sniff, decode within limits, resize and center-crop, normalise.

use std::io::Cursor;

use fast_image_resize::images::Image;
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::{ImageReader, Limits};

use crate::error::ImageError;

/// How images are turned into tensors.
#[derive(Clone, Copy, Debug)]
pub struct Preprocess {
    /// Side of the square model input (224 for Lite0).
    pub size: u32,
    /// Largest width or height accepted before decoding.
    pub max_side: u32,
    /// Most pixels (width × height) accepted before decoding; with `max_side` this bounds the
    /// memory one decode may take.
    pub max_pixels: u64,
}

/// Lowers the calling thread's scheduling priority to `nice` (Linux; elsewhere nothing), once per
/// thread. Decoding runs at a lower priority than inference: the engine is the pipeline's
/// bottleneck, so its threads should never wait for a core a decoder holds, while decoders only
/// need to stay a few batches ahead and fill the moments the engine leaves a core idle.
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

/// Fraction of the shorter side kept by the center crop (224 of 256).
const CROP_FRACTION: f64 = 0.875;

impl Preprocess {
    /// Floats per image: 3 × size × size.
    pub fn tensor_len(&self) -> usize {
        3 * (self.size as usize).pow(2)
    }

    /// Decodes `bytes` and returns the CHW float tensor the model takes.
    pub fn run(&self, bytes: &[u8]) -> Result<Vec<f32>, ImageError> {
        let rgb = self.decode(bytes)?;
        let (w, h) = (rgb.width(), rgb.height());
        let src = Image::from_vec_u8(w, h, rgb.into_raw(), PixelType::U8x3)
            .map_err(|e| ImageError::DecodeFailed(e.to_string()))?;
        let mut dst = Image::new(self.size, self.size, PixelType::U8x3);
        // Resizing the shorter side to size/0.875 and cropping the center size×size is the same as
        // resizing the center square of side 0.875·min(w, h) straight to size×size.
        let side = f64::from(w.min(h)) * CROP_FRACTION;
        let options = ResizeOptions::new()
            .crop((f64::from(w) - side) / 2.0, (f64::from(h) - side) / 2.0, side, side)
            .resize_alg(ResizeAlg::Convolution(FilterType::Bilinear));
        Resizer::new().resize(&src, &mut dst, &options).map_err(|e| ImageError::DecodeFailed(e.to_string()))?;
        Ok(to_chw(dst.buffer(), self.size as usize))
    }

    /// The image's pixel count, read from its header without decoding it; an error if the bytes
    /// are not an image or it is larger than the limits.
    pub fn pixels(&self, bytes: &[u8]) -> Result<u64, ImageError> {
        let reader = ImageReader::new(Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| ImageError::DecodeFailed(e.to_string()))?;
        if reader.format().is_none() {
            return Err(ImageError::NotAnImage);
        }
        let (width, height) = reader.into_dimensions().map_err(|e| ImageError::DecodeFailed(e.to_string()))?;
        if width.max(height) > self.max_side {
            let limit = format!("{} pixels per side", self.max_side);
            return Err(ImageError::DimensionsTooLarge { width, height, limit });
        }
        let pixels = u64::from(width) * u64::from(height);
        if pixels > self.max_pixels {
            let limit = format!("{} pixels in all", self.max_pixels);
            return Err(ImageError::DimensionsTooLarge { width, height, limit });
        }
        Ok(pixels)
    }

    fn decode(&self, bytes: &[u8]) -> Result<image::RgbImage, ImageError> {
        self.pixels(bytes)?;
        let mut reader = ImageReader::new(Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| ImageError::DecodeFailed(e.to_string()))?;
        let mut limits = Limits::default();
        limits.max_image_width = Some(self.max_side);
        limits.max_image_height = Some(self.max_side);
        // The largest decoded buffer: 16-bit RGBA, 8 bytes a pixel.
        limits.max_alloc = Some(self.max_pixels * 8);
        reader.limits(limits);
        let image = reader.decode().map_err(|e| ImageError::DecodeFailed(e.to_string()))?;
        Ok(image.into_rgb8())
    }
}

/// Interleaved RGB bytes to planar floats, x = (pixel − 127) / 128.
pub fn to_chw(rgb: &[u8], size: usize) -> Vec<f32> {
    let plane = size * size;
    let mut out = vec![0f32; 3 * plane];
    for (i, px) in rgb.chunks_exact(3).enumerate() {
        for c in 0..3 {
            out[c * plane + i] = (f32::from(px[c]) - 127.0) / 128.0;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: Preprocess = Preprocess { size: 224, max_side: 4096, max_pixels: 4096 * 4096 };

    fn png(width: u32, height: u32, pixel: [u8; 3]) -> Vec<u8> {
        let img = image::RgbImage::from_pixel(width, height, image::Rgb(pixel));
        let mut out = Vec::new();
        img.write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png).unwrap();
        out
    }

    #[test]
    fn known_pixels_map_to_known_values() {
        let t = to_chw(&[255, 127, 0, 255, 127, 0, 255, 127, 0, 255, 127, 0], 2);
        assert_eq!(t.len(), 12);
        assert_eq!(&t[0..4], &[1.0; 4]); // R 255 -> (255-127)/128
        assert_eq!(&t[4..8], &[0.0; 4]); // G 127 -> 0
        assert_eq!(&t[8..12], &[-127.0 / 128.0; 4]); // B 0
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

    #[test]
    fn non_images_and_oversized_images_are_refused() {
        assert_eq!(P.run(b"<html>not an image</html>").unwrap_err().kind(), "not_an_image");
        let mut truncated = png(64, 64, [1, 2, 3]);
        truncated.truncate(60);
        assert_eq!(P.run(&truncated).unwrap_err().kind(), "decode_failed");
        let small = Preprocess { size: 224, max_side: 100, max_pixels: 5000 };
        assert_eq!(small.run(&png(101, 50, [0, 0, 0])).unwrap_err().kind(), "dimensions_too_large");
        let err = small.run(&png(100, 51, [0, 0, 0])).unwrap_err();
        assert_eq!(err.to_string(), "the image is 100x51 pixels; the limit is 5000 pixels in all");
    }
}
