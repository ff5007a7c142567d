//! JPEG decoding with libjpeg-turbo, the decoder Pillow uses (its default integer IDCT and smooth
//! chroma upsampling), so the classifier sees the pixels the reference preprocessing sees; and
//! scaled inside the IDCT (1/2, 1/4, 1/8) when a photo is far larger than the model needs, so a
//! 12-megapixel survey photo is never decoded in full only to be shrunk to 256 pixels.
//!
//! A thin safe layer over `turbojpeg-sys` (the `turbojpeg` crate would bring a second `thiserror`
//! and hides the memory limit): a header read, and a decode into RGB at a scale.

use std::cell::RefCell;
use std::ffi::CStr;

use turbojpeg_sys as tj;

/// What a JPEG's header says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub width: u32,
    pub height: u32,
    /// Whether libjpeg-turbo can give RGB at 8 bits a sample (not CMYK or YCCK, not 12 or 16 bits).
    pub rgb_decodable: bool,
    /// Whether the DCT may scale it (a lossless JPEG has no DCT).
    pub scalable: bool,
}

/// The side of an image scaled by 1/`denom` in the IDCT, rounded up as libjpeg-turbo does.
pub fn scaled(side: u32, denom: u32) -> u32 {
    side.div_ceil(denom)
}

/// The largest reduction (8, 4, 2, else 1) that keeps the shorter side at least `min_short`.
pub fn reduction_for(width: u32, height: u32, min_short: u32) -> u32 {
    let short = width.min(height);
    [8, 4, 2].into_iter().find(|&denom| scaled(short, denom) >= min_short).unwrap_or(1)
}

/// Why libjpeg-turbo did not read a JPEG.
#[derive(Debug, thiserror::Error)]
pub enum JpegError {
    /// libjpeg-turbo's own reason (a corrupt stream, a warning taken as an error, memory).
    #[error("{0}")]
    Library(String),
    /// The header gives a side that is no size.
    #[error("a {side} of {value}")]
    Side { side: &'static str, value: i32 },
    /// The bytes decoded are not the JPEG whose header was inspected.
    #[error("the header says {read_width}x{read_height}, not the {width}x{height} inspected")]
    HeaderChanged { read_width: u32, read_height: u32, width: u32, height: u32 },
    #[error("libjpeg-turbo could not make a decompressor")]
    NoDecompressor,
}

/// Reads the header without decoding.
pub fn header(bytes: &[u8]) -> Result<Header, JpegError> {
    with_decompressor(|d| read_header(d, bytes))
}

/// This decompressor's reading of a JPEG's header.
fn read_header(d: &Decompressor, bytes: &[u8]) -> Result<Header, JpegError> {
    // SAFETY: the handle is valid, the buffer is borrowed for the call only.
    if unsafe { tj::tj3DecompressHeader(d.0, bytes.as_ptr(), bytes.len() as tj::size_t) } != 0 {
        return Err(d.error());
    }
    let get = |param| unsafe { tj::tj3Get(d.0, param as libc::c_int) };
    let (width, height) = (get(tj::TJPARAM_TJPARAM_JPEGWIDTH), get(tj::TJPARAM_TJPARAM_JPEGHEIGHT));
    let colorspace = get(tj::TJPARAM_TJPARAM_COLORSPACE) as tj::TJCS;
    let precision = get(tj::TJPARAM_TJPARAM_PRECISION);
    let lossless = get(tj::TJPARAM_TJPARAM_LOSSLESS) == 1;
    Ok(Header {
        width: u32::try_from(width).map_err(|_| JpegError::Side { side: "width", value: width })?,
        height: u32::try_from(height).map_err(|_| JpegError::Side { side: "height", value: height })?,
        rgb_decodable: precision == 8 && !matches!(colorspace, tj::TJCS_TJCS_CMYK | tj::TJCS_TJCS_YCCK),
        scalable: !lossless,
    })
}

/// Decodes into `pixels` interleaved 8-bit RGB at 1/`denom` of the full size, and gives their width
/// and height. `max_memory_mb` bounds what libjpeg-turbo may allocate besides the output (a
/// progressive JPEG keeps every coefficient of the image). A stream libjpeg-turbo only warns about
/// (truncated, corrupt data, random bytes after a JPEG marker) is an error here too: it would decode
/// to whatever the garbage says, so the caller gives it to a stricter decoder instead.
///
/// `pixels`' memory is reused: resized to the image (zeroing only what it grows by) and
/// overwritten, so that a thread decoding one photo after another neither allocates nor zeroes
/// nor faults in fresh pages for each.
pub fn decode_rgb(
    bytes: &[u8],
    header: &Header,
    denom: u32,
    max_memory_mb: u32,
    pixels: &mut Vec<u8>,
) -> Result<(u32, u32), JpegError> {
    let (width, height) = (scaled(header.width, denom), scaled(header.height, denom));
    pixels.resize(width as usize * height as usize * 3, 0);
    with_decompressor(|d| {
        // The buffer is sized from `header`: this decompressor must read the same size from these
        // bytes, or it would write past the buffer's end.
        let read = read_header(d, bytes)?;
        if (read.width, read.height) != (header.width, header.height) {
            return Err(JpegError::HeaderChanged {
                read_width: read.width,
                read_height: read.height,
                width: header.width,
                height: header.height,
            });
        }
        let factor = tj::tjscalingfactor { num: 1, denom: denom as libc::c_int };
        // SAFETY: the handle is valid; `pixels` holds `height` rows of `3 × width` bytes, the size
        // libjpeg-turbo computes for this scaling factor (checked above with the same rounding).
        unsafe {
            tj::tj3Set(d.0, tj::TJPARAM_TJPARAM_MAXMEMORY as libc::c_int, max_memory_mb.min(i32::MAX as u32) as i32);
            if tj::tj3SetScalingFactor(d.0, factor) != 0 {
                return Err(d.error());
            }
            let done = tj::tj3Decompress8(
                d.0,
                bytes.as_ptr(),
                bytes.len() as tj::size_t,
                pixels.as_mut_ptr(),
                (width * 3) as libc::c_int,
                tj::TJPF_TJPF_RGB as libc::c_int,
            );
            if done != 0 {
                return Err(d.error());
            }
        }
        Ok(())
    })?;
    Ok((width, height))
}

/// A libjpeg-turbo decompressor; one per thread, made on first use and made again after an error.
struct Decompressor(tj::tjhandle);

impl Decompressor {
    fn error(&self) -> JpegError {
        // SAFETY: tj3GetErrorStr returns a NUL-terminated string owned by the handle.
        JpegError::Library(unsafe { CStr::from_ptr(tj::tj3GetErrorStr(self.0)) }.to_string_lossy().into_owned())
    }
}

impl Drop for Decompressor {
    fn drop(&mut self) {
        // SAFETY: made by tj3Init and destroyed once.
        unsafe { tj::tj3Destroy(self.0) }
    }
}

fn with_decompressor<T>(f: impl FnOnce(&Decompressor) -> Result<T, JpegError>) -> Result<T, JpegError> {
    thread_local! {
        static DECOMPRESSOR: RefCell<Option<Decompressor>> = const { RefCell::new(None) };
    }
    DECOMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            // SAFETY: tj3Init has no preconditions; a null handle is checked.
            let handle = unsafe { tj::tj3Init(tj::TJINIT_TJINIT_DECOMPRESS as libc::c_int) };
            if handle.is_null() {
                return Err(JpegError::NoDecompressor);
            }
            *slot = Some(Decompressor(handle));
        }
        let result = f(slot.as_ref().expect("made above"));
        if result.is_err() {
            // A header that fails half-way leaves the decompressor inside it (tj3DecompressHeader
            // does not reset it on an error), and the thread's next image would be read as its
            // continuation: refused, or read with another image's dimensions. The next call gets
            // a new one. (A tokio worker thread that ran `header` may later run decodes as a
            // blocking thread: `block_in_place` trades threads between the two.)
            *slot = None;
        }
        result
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reduction_keeps_the_shorter_side_at_least_the_target() {
        assert_eq!(reduction_for(500, 375, 256), 1);
        assert_eq!(reduction_for(1024, 682, 256), 2);
        assert_eq!(reduction_for(4000, 3000, 256), 8); // 375 ≥ 256
        assert_eq!(reduction_for(3000, 2000, 256), 4); // 500; 1/8 would give 250
        assert_eq!(reduction_for(2048, 2048, 256), 8);
        assert_eq!(reduction_for(2041, 4000, 256), 8); // 2041/8 rounds up to 256
        assert_eq!(reduction_for(2040, 4000, 256), 4); // 2040/8 is 255
        assert_eq!(scaled(2041, 8), 256);
        assert_eq!(reduction_for(100, 100, 256), 1);
    }

    fn jpeg(width: u32, height: u32) -> Vec<u8> {
        let pixels = image::RgbImage::from_fn(width, height, |x, y| image::Rgb([x as u8, y as u8, 90]));
        let mut out = std::io::Cursor::new(Vec::new());
        image::DynamicImage::ImageRgb8(pixels).write_to(&mut out, image::ImageFormat::Jpeg).unwrap();
        out.into_inner()
    }

    #[test]
    fn a_header_that_fails_half_way_leaves_nothing_behind_for_the_next_image() {
        // A JPEG cut inside its Huffman tables: libjpeg-turbo fails with the frame already read,
        // and its decompressor stays inside that header unless it is reset. Every later image on
        // the thread would be read as that header's continuation: refused (SOI twice), or worse,
        // read with dimensions that are not its own.
        let good = jpeg(320, 200);
        let dht = good.windows(2).position(|w| w == [0xff, 0xc4]).expect("a DHT marker");
        let cut = &good[..dht + 8];
        for _ in 0..3 {
            assert!(header(cut).is_err());
            let h = header(&good).expect("the next image's header");
            assert_eq!((h.width, h.height), (320, 200));
            assert!(header(cut).is_err());
            let mut pixels = vec![7; 5];
            let (width, height) = decode_rgb(&good, &h, 2, 64, &mut pixels).expect("the next image decodes");
            assert_eq!((pixels.len(), width, height), (160 * 100 * 3, 160, 100));
        }
    }
}
