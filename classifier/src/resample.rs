//! Pillow's antialiased bilinear resize (`Image.resize(size, Image.BILINEAR)`, its
//! `libImaging/Resample.c`) reproduced to the bit, so the model sees what the reference
//! preprocessing gives it: the same filter coefficients, rounded to the same 22-bit fixed point,
//! a horizontal pass into an 8-bit image, then a vertical pass. (fast_image_resize follows
//! Pillow-SIMD's 16-bit coefficients instead, one level off on a fifth of the values: enough to
//! change the top-1 of a photo between two close classes.)
//!
//! Only the window of the resized image that the centre crop keeps is computed: every output
//! pixel depends only on its own coefficients, which depend on the whole image's scale, so the
//! window equals the same pixels of the whole resized image, at a fraction of the work and
//! memory (a 1×10,000 image would resize to 256×2,560,000).

use std::ops::Range;

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// A sum's start: one half in fixed point, so that the shift in [`clip8`] rounds.
const HALF: i32 = 1 << (PRECISION_BITS - 1);

/// One axis of the resize: for each output pixel of the window, where its source span starts,
/// how long it is, and its weights (`ksize` slots each, the unused ones 0).
struct Axis {
    starts: Vec<usize>,
    counts: Vec<usize>,
    ksize: usize,
    weights: Vec<i32>,
}

/// Pillow's bilinear filter: a triangle of support 1, widened by the scale when shrinking.
fn bilinear(x: f64) -> f64 {
    let x = x.abs();
    if x < 1.0 { 1.0 - x } else { 0.0 }
}

impl Axis {
    /// Pillow's `precompute_coeffs` and `normalize_coeffs_8bpc` for the output pixels `window` of a
    /// resize from `in_size` to `out_size`.
    fn new(in_size: usize, out_size: usize, window: Range<usize>) -> Self {
        let scale = in_size as f32 as f64 / out_size as f64;
        let filterscale = scale.max(1.0);
        let support = filterscale;
        let ksize = support.ceil() as usize * 2 + 1;
        let mut axis = Axis { starts: Vec::new(), counts: Vec::new(), ksize, weights: Vec::new() };
        let mut k = vec![0f64; ksize];
        for xx in window {
            let center = (xx as f64 + 0.5) * scale;
            let ss = 1.0 / filterscale;
            // C's (int) conversions truncate toward zero, as `as` does.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let count = xmax.saturating_sub(xmin);
            let mut ww = 0.0;
            for (x, w) in k.iter_mut().enumerate().take(count) {
                *w = bilinear(((x + xmin) as f64 - center + 0.5) * ss);
                ww += *w;
            }
            for (x, &raw) in k.iter().enumerate() {
                let w = if x >= count {
                    0.0
                } else if ww != 0.0 {
                    raw / ww
                } else {
                    raw
                };
                let fixed = w * f64::from(1u32 << PRECISION_BITS);
                axis.weights.push(if w < 0.0 { (fixed - 0.5) as i32 } else { (fixed + 0.5) as i32 });
            }
            axis.starts.push(xmin);
            axis.counts.push(count);
        }
        axis
    }

    fn taps(&self, i: usize) -> (usize, &[i32]) {
        (self.starts[i], &self.weights[i * self.ksize..i * self.ksize + self.counts[i]])
    }
}

fn clip8(sum: i32) -> u8 {
    (sum >> PRECISION_BITS).clamp(0, 255) as u8
}

/// The horizontal pass into `temp` (rows of the window's width), from the rows of `rgb` on; with
/// SSE4.1 where the CPU has it (the same integer sums, so the same bytes, in a third less time).
fn horizontal_pass(rgb: &[u8], width: usize, horizontal: &Axis, temp: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("sse4.1") {
        // SAFETY: the CPU has SSE4.1, checked just above.
        return unsafe { horizontal_pass_sse41(rgb, width, horizontal, temp) };
    }
    let row_len = horizontal.starts.len() * 3;
    for (y, out) in temp.chunks_exact_mut(row_len).enumerate() {
        let row = &rgb[y * width * 3..];
        for (xx, px) in out.chunks_exact_mut(3).enumerate() {
            let (start, weights) = horizontal.taps(xx);
            px.copy_from_slice(&horizontal_sums(&row[start * 3..], weights));
        }
    }
}

/// One output pixel of the horizontal pass: the pixels from `span`'s start under `weights`.
fn horizontal_sums(span: &[u8], weights: &[i32]) -> [u8; 3] {
    let (mut r, mut g, mut b) = (HALF, HALF, HALF);
    for (src, &w) in span.chunks_exact(3).zip(weights) {
        r += i32::from(src[0]) * w;
        g += i32::from(src[1]) * w;
        b += i32::from(src[2]) * w;
    }
    [clip8(r), clip8(g), clip8(b)]
}

/// [`horizontal_pass`] with a pixel's three sums in the lanes of one vector: a tap is one load of
/// four bytes (the fourth, the next pixel's red, summed and thrown away), one multiply and one
/// add. A span ending at the image's last byte has no fourth byte to load and is summed in three.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "sse4.1")]
unsafe fn horizontal_pass_sse41(rgb: &[u8], width: usize, horizontal: &Axis, temp: &mut [u8]) {
    use std::arch::x86_64::{
        _mm_add_epi32, _mm_cvtepu8_epi32, _mm_cvtsi32_si128, _mm_extract_epi32, _mm_mullo_epi32, _mm_set1_epi32,
    };
    let row_len = horizontal.starts.len() * 3;
    for (y, out) in temp.chunks_exact_mut(row_len).enumerate() {
        let row = &rgb[y * width * 3..];
        for (xx, px) in out.chunks_exact_mut(3).enumerate() {
            let (start, weights) = horizontal.taps(xx);
            let span = &row[start * 3..];
            if span.len() <= weights.len() * 3 {
                px.copy_from_slice(&horizontal_sums(span, weights));
                continue;
            }
            let mut sums = _mm_set1_epi32(HALF);
            for (i, &w) in weights.iter().enumerate() {
                // SAFETY: bytes 3i to 3i + 3 lie within `span`: 3i + 4 <= 3 × weights.len() + 1,
                // which `span` exceeds (checked above); an unaligned read is allowed.
                let four = unsafe { span.as_ptr().add(i * 3).cast::<i32>().read_unaligned() };
                let pixel = _mm_cvtepu8_epi32(_mm_cvtsi32_si128(four));
                sums = _mm_add_epi32(sums, _mm_mullo_epi32(pixel, _mm_set1_epi32(w)));
            }
            px.copy_from_slice(&[
                clip8(_mm_extract_epi32::<0>(sums)),
                clip8(_mm_extract_epi32::<1>(sums)),
                clip8(_mm_extract_epi32::<2>(sums)),
            ]);
        }
    }
}

/// The `size`×`size` window at (`left`, `top`) of the interleaved RGB image `rgb` (`width`×`height`)
/// resized to `resized_width`×`resized_height`, as interleaved RGB.
pub fn resize_window(
    rgb: &[u8],
    (width, height): (usize, usize),
    (resized_width, resized_height): (usize, usize),
    (left, top): (usize, usize),
    size: usize,
) -> Vec<u8> {
    let horizontal = Axis::new(width, resized_width, left..left + size);
    let vertical = Axis::new(height, resized_height, top..top + size);
    // The source rows the vertical pass reads.
    let first_row = vertical.starts.iter().copied().min().unwrap_or(0);
    let end_row = (0..size).map(|i| vertical.starts[i] + vertical.counts[i]).max().unwrap_or(0);

    let row_len = size * 3;
    let mut temp = vec![0u8; (end_row - first_row) * row_len];
    horizontal_pass(&rgb[first_row * width * 3..], width, &horizontal, &mut temp);

    let mut out = vec![0u8; size * row_len];
    vertical_pass(&temp, first_row, &vertical, &mut out);
    out
}

/// The vertical pass from `temp` (rows from `first_row` on) into `out`, rows of the same width: a
/// loop over whole rows the compiler vectorises, with AVX2's eight lanes where the CPU has them.
fn vertical_pass(temp: &[u8], first_row: usize, vertical: &Axis, out: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2, checked just above.
        return unsafe { vertical_pass_avx2(temp, first_row, vertical, out) };
    }
    vertical_pass_any(temp, first_row, vertical, out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn vertical_pass_avx2(temp: &[u8], first_row: usize, vertical: &Axis, out: &mut [u8]) {
    vertical_pass_any(temp, first_row, vertical, out);
}

#[inline(always)]
fn vertical_pass_any(temp: &[u8], first_row: usize, vertical: &Axis, out: &mut [u8]) {
    let row_len = out.len() / vertical.starts.len().max(1);
    let mut sums = vec![0i32; row_len];
    for (yy, out_row) in out.chunks_exact_mut(row_len).enumerate() {
        let (start, weights) = vertical.taps(yy);
        sums.fill(HALF);
        for (y, &w) in weights.iter().enumerate() {
            let src = &temp[(start + y - first_row) * row_len..(start + y - first_row + 1) * row_len];
            for (sum, &v) in sums.iter_mut().zip(src) {
                *sum += i32::from(v) * w;
            }
        }
        for (o, &sum) in out_row.iter_mut().zip(&sums) {
            *o = clip8(sum);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_size_is_the_identity() {
        let rgb: Vec<u8> = (0..4 * 4 * 3).map(|v| (v * 5) as u8).collect();
        assert_eq!(resize_window(&rgb, (4, 4), (4, 4), (0, 0), 4), rgb);
    }

    #[test]
    fn shrinking_and_enlarging_give_pillows_values() {
        // Image.frombytes("RGB", (4, 1), bytes([0,0,0, 100,100,100, 200,200,200, 255,255,255]))
        //   .resize((2, 1), Image.BILINEAR) is (71, 71, 71), (209, 209, 209) in Pillow 13.
        let row = [0, 0, 0, 100, 100, 100, 200, 200, 200, 255, 255, 255];
        assert_eq!(resize_window(&row, (4, 1), (2, 1), (0, 0), 1), vec![71; 3]);
        assert_eq!(resize_window(&row, (4, 1), (2, 1), (1, 0), 1), vec![209; 3]);
        // (3, 1) [0, 100, 255] to (7, 1): 0, 14, 57, 100, 166, 233, 255.
        let row = [0, 0, 0, 100, 100, 100, 255, 255, 255];
        let wide: Vec<u8> = (0..7).map(|x| resize_window(&row, (3, 1), (7, 1), (x, 0), 1)[0]).collect();
        assert_eq!(wide, [0, 14, 57, 100, 166, 233, 255]);
    }

    #[test]
    fn the_vector_horizontal_pass_gives_the_portable_sums_to_the_byte() {
        // Shrinking (wide spans), enlarging and near 1:1, over rows whose last span ends at the
        // image's last byte: every output pixel against `horizontal_sums` alone.
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for (width, out_width) in [(37, 16), (500, 224), (4000, 256), (7, 19), (225, 224), (1, 3)] {
            let rgb: Vec<u8> = (0..width * 3 * 2)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed as u8
                })
                .collect();
            let axis = Axis::new(width, out_width, 0..out_width);
            let mut temp = vec![0u8; 2 * out_width * 3];
            horizontal_pass(&rgb, width, &axis, &mut temp);
            for y in 0..2 {
                for xx in 0..out_width {
                    let (start, weights) = axis.taps(xx);
                    let want = horizontal_sums(&rgb[y * width * 3 + start * 3..], weights);
                    let got = &temp[(y * out_width + xx) * 3..(y * out_width + xx + 1) * 3];
                    assert_eq!(got, want, "{width} -> {out_width}, row {y}, pixel {xx}");
                }
            }
        }
    }

    #[test]
    fn the_vertical_pass_gives_the_same_bytes_with_and_without_avx2() {
        for (height, out_height, width) in [(375, 224, 224), (23, 16, 5), (7, 19, 3)] {
            let temp: Vec<u8> = (0..height * width * 3).map(|v| ((v * 7919) % 251) as u8).collect();
            let axis = Axis::new(height, out_height, 0..out_height);
            let (mut fast, mut plain) = (vec![0u8; out_height * width * 3], vec![0u8; out_height * width * 3]);
            vertical_pass(&temp, 0, &axis, &mut fast);
            vertical_pass_any(&temp, 0, &axis, &mut plain);
            assert_eq!(fast, plain, "{height} -> {out_height} rows of {width}");
        }
    }

    #[test]
    fn a_window_is_the_same_as_resizing_whole_and_cropping() {
        let (w, h) = (37, 23);
        let rgb: Vec<u8> = (0..w * h * 3).map(|v| ((v * 7919) % 251) as u8).collect();
        let whole = resize_window(&rgb, (w, h), (16, 16), (0, 0), 16);
        let window = resize_window(&rgb, (w, h), (16, 16), (5, 3), 8);
        for y in 0..8 {
            assert_eq!(&window[y * 24..(y + 1) * 24], &whole[((y + 3) * 16 + 5) * 3..((y + 3) * 16 + 13) * 3]);
        }
    }
}
