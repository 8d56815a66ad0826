//! The image front end (docs/MODEL.md §1.3, §4.1): bytes → RGB → smart resize → bicubic → normalise →
//! patch rows, all on the CPU.
//!
//! The reference opens a file with PIL, calls `convert("RGB")`, and hands it to the Qwen2-VL image
//! processor. Each step here copies what those libraries do, down to their integer rounding, so
//! `pixel_values` should match the reference to within the decoder's own differences (below).
//!
//! # Decoding ([`decode`])
//! The format is sniffed from the bytes. JPEG, PNG, WebP, GIF (first frame), BMP and TIFF are
//! supported. Everything else is an [`Error::Input`] that names the problem.
//!
//! The image is turned into 8-bit RGB the way PIL's `convert("RGB")` does it:
//! - **Gray** is copied to R, G and B.
//! - **Alpha** is dropped ([`AlphaMode::Drop`], which is what jina does for paths and URLs), or the
//!   image is laid over white ([`AlphaMode::CompositeWhite`], transformers' `convert_to_rgb` for PIL
//!   inputs). The composite uses PIL's `alpha_composite` rounding. That rounding equals
//!   round-half-up of `(v·a + 255·(255−a)) / 255` for every 8-bit `v` and `a`; a unit test checks
//!   all of them. transformers leaves PIL-mode "RGB" images alone, so a truecolour PNG whose
//!   transparency comes from a `tRNS` chunk is not composited either.
//! - **16-bit RGB and RGBA** (PNG, TIFF): PIL unpacks these with its `;16B`/`;16L` raw modes. Those
//!   keep the **high byte**, so `v >> 8`. Gray+alpha 16-bit PNG is read as RGBA the same way.
//! - **16-bit gray** (PNG, TIFF): PIL opens it as mode `I;16`. `convert("RGB")` then **clamps**
//!   each value to 255 (`I16_RGB` in Convert.c) rather than scaling it. Any value ≥ 255 becomes
//!   white. That is surprising, but it is what the reference sees, so it is copied here.
//! - **CMYK JPEG**: PIL decodes every 4-channel JPEG as inverted CMYK (`CMYK;I`, the Adobe
//!   convention), then `cmyk2rgb` gives `R = (255−K) − round(C·(255−K)/255)`. In terms of the
//!   stored samples `c' = 255−C` and `k' = 255−K`, that is `round(c'·k'/255)`. There are no
//!   ties, because 255 is odd. The `image` crate's JPEG decoder (zune-jpeg) converts CMYK
//!   (Adobe transform 0 or no Adobe marker) with exactly `round(c'·k'/255)`. It converts YCCK
//!   (transform 2) with `round((255−R')·k'/255)`, and libjpeg+PIL compute the same thing. So the
//!   `image` crate's output is used as is, and `tests/image.rs` checks it on a hand-built CMYK
//!   JPEG. Inverted CMYK JPEGs without an Adobe marker are treated the same way by both.
//! - **CMYK TIFF**: the `image` crate truncates `(255−c)·(1−k/255)` in f32, while PIL rounds.
//!   The result can be 1 LSB darker. This is rare and accepted.
//! - **32-bit float RGB(A) TIFF**: PIL cannot open these. We clamp to [0, 1] and round `v·255`.
//! - Other known differences from PIL, all within the decoder:
//!   - **JPEG** IDCT and chroma upsampling (zune-jpeg vs libjpeg-turbo) differ by ±1–2 LSB;
//!     the mean is about 0.4 LSB for 4:2:0 and 0.02 LSB for 4:4:4. When the height is not a
//!     multiple of the MCU, zune-jpeg upsamples the last row's chroma from the encoder's padding
//!     row, where libjpeg repeats the last real row, so that one row can be up to ~12 LSB off.
//!   - **Lossy WebP** YUV→RGB (image-webp vs libwebp) was identical on the test image.
//!   - **GIF**: when the first frame does not cover the whole canvas, `image` fills the rest
//!     with transparent black, while PIL fills it with the background index.
//!
//!   No EXIF rotation is applied, as in the reference. Against Pillow 13.0.0, PNG (8- and 16-bit,
//!   gray, gray+alpha, RGB, RGBA, palette+tRNS), BMP, TIFF (RGB and CMYK), lossless and lossy WebP
//!   and GIF gave bit-identical `pixel_values`, with both alpha modes.
//!
//! # Bounded decoding ([`DecodeLimits`])
//! The header is read first. An image larger than [`DEFAULT_MAX_INPUT_PIXELS`] is refused before
//! any pixel is decoded. That limit is 178,956,970 pixels, PIL's `DecompressionBombError` threshold
//! (2 × `Image.MAX_IMAGE_PIXELS`), so we accept exactly what the reference accepts. The decoded
//! buffer (`width·height·bytes-per-pixel` of the decoder's native format) must also fit in
//! [`DEFAULT_MAX_DECODE_BYTES`] (1 GiB). That limit is also passed to the `image` crate's
//! [`image::Limits::max_alloc`], so its decoders' internal buffers are capped too. Allocations are
//! fallible (`try_reserve`), so a hostile header gives an error rather than an abort. The peak
//! is about the decoded buffer, plus one RGB copy when the source has fewer than 3 bytes per pixel
//! (8-bit gray and gray+alpha). RGBA and 16-bit sources are converted in place. A 100-megapixel
//! RGB image takes ≈ 300 MB while it is decoded. A progressive JPEG also holds its DCT
//! coefficients inside zune-jpeg, about 2 bytes per sample.
//!
//! # smart_resize ([`smart_resize`])
//! This follows current transformers (≥ 4.52, which jina requires): no minimum side, an aspect
//! limit of 200, and `max(factor, …)` in the shrinking branch. transformers ≤ 4.50 also raised on
//! a side below 28, but that check is gone. A 1×1 image therefore grows to 56×56, as the spec's
//! §4.1 says. A zero side is an error here (Python would raise `ZeroDivisionError`).
//!
//! # Resize ([`resize_bicubic`])
//! This is Pillow's `ImagingResample` with the bicubic filter, reimplemented. The filter is Keys
//! with a = −0.5, its support is scaled by the downscale factor, and the coefficients are
//! normalised, then converted to 22-bit fixed point. The resize runs as two separable passes.
//! Each pass rounds and clamps to u8, and a pass whose size is unchanged is skipped. Because the
//! first pass is rounded to u8, the **order** of the passes changes some pixels, and Pillow has
//! changed it twice ([`PassOrder`]):
//! - Pillow ≤ 12.1 always ran the horizontal pass first.
//! - Pillow 12.2 and 12.3 (`Image.resize`, PR #9524) run the vertical pass first when the image
//!   is more than 100× taller than wide and its height shrinks.
//! - Pillow ≥ 13.0 (`ImagingResampleInner`, PR #9549) runs the vertical pass first when the
//!   height shrinks by more than twice as many pixels as the width. Portrait images more than
//!   twice as tall as wide, such as phone screenshots, are resized in this order.
//!
//! The default is horizontal first, because that is what the reference does: jina's fast processor
//! (torchvision) and the reference machine's Pillow both agree with it on the fixture images, and
//! Pillow 13's order does not (up to 14 LSB apart). [`ImageConfig::resize_order`] selects another.
//! The results are bit-exact with that release's `Image.resize(…, BICUBIC)` on RGB images,
//! checked against Pillow 13.0.0 while this was written. The fast (torchvision) processor
//! computes in float and rounds once at the end, so it differs by about 1 LSB at some pixels
//! whatever the order (docs/MODEL.md §4.1: exact bits are not required).
//!
//! Everything here is a pure function of its arguments with no global state, so any thread may
//! run it. [`preprocess_many`] spreads a batch over scoped threads.

use crate::{Error, Result};
use image::{ColorType, ImageDecoder, ImageFormat, ImageReader};
use std::io::Cursor;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The largest `max(h, w) / min(h, w)` the reference accepts (it raises `ValueError` above it).
pub const MAX_ASPECT_RATIO: f64 = 200.0;

/// The default pixel limit: PIL's `DecompressionBombError` threshold, 2 × 89,478,485.
pub const DEFAULT_MAX_INPUT_PIXELS: u64 = 178_956_970;

/// The default cap on the decoded buffer and on the decoder's own allocations: 1 GiB. That holds
/// a 16-bit RGB image at the pixel limit, or an 8-bit RGBA one.
pub const DEFAULT_MAX_DECODE_BYTES: u64 = 1 << 30;

/// How big an input may be. Checks run on the header, before any pixel is decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeLimits {
    /// The most pixels (width × height) an input may have.
    pub max_pixels: u64,
    /// The most bytes the decoded image (in the decoder's native format) and the decoder's
    /// internal buffers may take.
    pub max_bytes: u64,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        DecodeLimits { max_pixels: DEFAULT_MAX_INPUT_PIXELS, max_bytes: DEFAULT_MAX_DECODE_BYTES }
    }
}

/// OpenAI CLIP's normalisation mean, as published. The reference holds these as Python floats
/// (f64) and rounds them to f32 for the arithmetic, so we do the same.
const CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
/// OpenAI CLIP's normalisation standard deviation, as published.
const CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

/// The image processor's settings (docs/MODEL.md §1.3).
#[derive(Clone, Debug, PartialEq)]
pub struct ImageConfig {
    /// Fewer resized pixels than this are scaled up (`min_pixels`, 56² = 3136).
    pub min_pixels: usize,
    /// More resized pixels than this are scaled down (`max_pixels`, 768·28² = 602112).
    pub max_pixels: usize,
    /// The ViT patch side in pixels (14).
    pub patch_size: usize,
    /// Frames per patch. A still image is repeated to fill them (2).
    pub temporal_patch_size: usize,
    /// The side of the patch merger's block, in patches (2).
    pub merge_size: usize,
    /// Per-channel mean of the normalisation, on the 0..1 scale (OpenAI CLIP).
    pub image_mean: [f32; 3],
    /// Per-channel standard deviation of the normalisation (OpenAI CLIP).
    pub image_std: [f32; 3],
    /// Input size limits, checked before decoding.
    pub limits: DecodeLimits,
    /// Which Pillow release's resize pass order to reproduce.
    pub resize_order: PassOrder,
}

impl From<&crate::model::config::PreprocessorConfig> for ImageConfig {
    /// The checkpoint's preprocessor_config.json (its max_pixels is the one to use: docs/MODEL.md §1.3).
    fn from(p: &crate::model::config::PreprocessorConfig) -> Self {
        ImageConfig {
            min_pixels: p.min_pixels,
            max_pixels: p.max_pixels,
            patch_size: p.patch_size,
            temporal_patch_size: p.temporal_patch_size,
            merge_size: p.merge_size,
            image_mean: p.image_mean,
            image_std: p.image_std,
            ..ImageConfig::default()
        }
    }
}

impl Default for ImageConfig {
    /// jina-embeddings-v4's `preprocessor_config.json` (docs/MODEL.md §1.3).
    fn default() -> Self {
        ImageConfig {
            min_pixels: 56 * 56,
            max_pixels: 768 * 28 * 28,
            patch_size: 14,
            temporal_patch_size: 2,
            merge_size: 2,
            image_mean: CLIP_MEAN.map(|v| v as f32),
            image_std: CLIP_STD.map(|v| v as f32),
            limits: DecodeLimits::default(),
            resize_order: PassOrder::default(),
        }
    }
}

impl ImageConfig {
    /// The resized sides are multiples of this: `patch_size · merge_size` (28).
    pub fn factor(&self) -> usize {
        self.patch_size * self.merge_size
    }

    /// Length of one `pixel_values` row: `3 · temporal_patch_size · patch_size²` (1176).
    pub fn row_len(&self) -> usize {
        3 * self.temporal_patch_size * self.patch_size * self.patch_size
    }

    /// The (height, width) an image of this size is resized to.
    pub fn resized_size(&self, height: usize, width: usize) -> Result<(usize, usize)> {
        self.validate()?;
        smart_resize(height, width, self.factor(), self.min_pixels, self.max_pixels)
    }

    fn validate(&self) -> Result<()> {
        if self.patch_size == 0 || self.temporal_patch_size == 0 || self.merge_size == 0 {
            return Err(Error::Input(format!(
                "image config: patch_size ({}), temporal_patch_size ({}) and merge_size ({}) must be \
                 positive",
                self.patch_size, self.temporal_patch_size, self.merge_size
            )));
        }
        if let Some(c) = (0..3).find(|&c| !(self.image_std[c].is_finite() && self.image_std[c] != 0.0)) {
            return Err(Error::Input(format!(
                "image config: image_std[{c}] = {} must be finite and non-zero",
                self.image_std[c]
            )));
        }
        Ok(())
    }
}

/// What to do with an alpha channel when converting to RGB.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum AlphaMode {
    /// Drop it, like PIL's `convert("RGB")`. jina does this for file paths and URLs.
    #[default]
    Drop,
    /// Lay the image over opaque white, like transformers' `convert_to_rgb` for PIL inputs with
    /// alpha, with PIL's `alpha_composite` rounding.
    CompositeWhite,
}

/// An 8-bit RGB image, rows top to bottom, pixels interleaved (HWC).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RgbImage8 {
    /// Pixels per row.
    pub width: usize,
    /// Rows.
    pub height: usize,
    /// `height · width · 3` bytes: R, G, B of each pixel.
    pub data: Vec<u8>,
}

impl RgbImage8 {
    /// Wraps `data`, checking that it holds `height · width · 3` bytes.
    pub fn new(width: usize, height: usize, data: Vec<u8>) -> Result<Self> {
        let img = RgbImage8 { width, height, data };
        img.check()?;
        Ok(img)
    }

    /// The R, G, B of pixel (x, y).
    pub fn pixel(&self, x: usize, y: usize) -> [u8; 3] {
        let i = (y * self.width + x) * 3;
        [self.data[i], self.data[i + 1], self.data[i + 2]]
    }

    fn check(&self) -> Result<()> {
        let want = self.width.checked_mul(self.height).and_then(|n| n.checked_mul(3));
        if want != Some(self.data.len()) {
            return Err(Error::Input(format!(
                "RGB image of {}x{} pixels needs {} bytes, got {}",
                self.width,
                self.height,
                want.map_or_else(|| "more than usize::MAX".to_string(), |n| n.to_string()),
                self.data.len()
            )));
        }
        Ok(())
    }
}

/// One image, ready for the vision tower.
#[derive(Clone, Debug, PartialEq)]
pub struct Preprocessed {
    /// `[patches, row_len]` row-major (`row_len` = 1176 by default), rows in 2×2-merge-block
    /// order (docs/MODEL.md §4.1).
    pub pixel_values: Vec<f32>,
    /// `[1, grid_h, grid_w]`, counted in patches.
    pub grid_thw: [usize; 3],
    /// The resized (height, width) in pixels.
    pub resized: (usize, usize),
}

impl Preprocessed {
    /// Patch rows: `grid_h · grid_w`.
    pub fn num_patches(&self) -> usize {
        self.grid_thw.iter().product()
    }

    /// Tokens after the patch merger: `num_patches / merge_size²`.
    pub fn num_tokens(&self, merge_size: usize) -> usize {
        self.num_patches() / (merge_size * merge_size)
    }
}

/// Python's `round(a / b)` for positive integers: the f64 quotient rounded half to even.
fn py_round_div(a: usize, b: usize) -> f64 {
    (a as f64 / b as f64).round_ties_even()
}

/// The size the reference resizes an image to (docs/MODEL.md §4.1, transformers' `smart_resize`).
///
/// Both sides become multiples of `factor`, with the area brought into
/// `[min_pixels, max_pixels]` and the aspect ratio kept as well as possible. The steps are:
/// round each side to the nearest multiple (Python's half-to-even rounding). If the area is
/// then too large, shrink by `β = √(H·W/max)` and floor, at least `factor`. If it is too small,
/// grow by `β = √(min/(H·W))` and ceil. The arithmetic is in f64, like Python's floats.
///
/// Errors: a zero side, an aspect ratio above [`MAX_ASPECT_RATIO`], `factor == 0`, or a
/// configuration that rounds a side down to zero.
pub fn smart_resize(
    height: usize,
    width: usize,
    factor: usize,
    min_pixels: usize,
    max_pixels: usize,
) -> Result<(usize, usize)> {
    if factor == 0 {
        return Err(Error::Input("smart_resize: factor must be positive".into()));
    }
    if height == 0 || width == 0 {
        return Err(Error::Input(format!("image has zero size ({height}x{width} pixels)")));
    }
    let ratio = height.max(width) as f64 / height.min(width) as f64;
    if ratio > MAX_ASPECT_RATIO {
        return Err(Error::Input(format!(
            "image aspect ratio must be at most {MAX_ASPECT_RATIO}:1, got {ratio}:1 ({height}x{width} \
             pixels)"
        )));
    }
    let (h, w, f) = (height as f64, width as f64, factor as f64);
    let mut h_bar = py_round_div(height, factor) * f;
    let mut w_bar = py_round_div(width, factor) * f;
    if h_bar * w_bar > max_pixels as f64 {
        // Python: math.sqrt((height * width) / max_pixels); the product is exact in f64 below 2^53.
        let beta = ((height as u64 * width as u64) as f64 / max_pixels as f64).sqrt();
        h_bar = f.max((h / beta / f).floor() * f);
        w_bar = f.max((w / beta / f).floor() * f);
    } else if h_bar * w_bar < min_pixels as f64 {
        let beta = (min_pixels as f64 / (height as u64 * width as u64) as f64).sqrt();
        h_bar = (h * beta / f).ceil() * f;
        w_bar = (w * beta / f).ceil() * f;
    }
    if !(h_bar >= 1.0 && w_bar >= 1.0 && h_bar < 1e15 && w_bar < 1e15) {
        return Err(Error::Input(format!(
            "image of {height}x{width} pixels resizes to {h_bar}x{w_bar} with factor {factor}, \
             min_pixels {min_pixels}, max_pixels {max_pixels}"
        )));
    }
    Ok((h_bar as usize, w_bar as usize))
}

// ---------------------------------------------------------------------------------------------
// Decoding
// ---------------------------------------------------------------------------------------------

/// The formats we decode, as named in errors.
const SUPPORTED: &str = "JPEG, PNG, WebP, GIF, BMP, TIFF";

fn format_name(f: ImageFormat) -> String {
    format!("{f:?}").to_uppercase()
}

/// Maps an `image` crate error to an input error that says what is wrong.
fn decode_error(format: ImageFormat, e: image::ImageError) -> Error {
    use image::ImageError as E;
    let what = format_name(format);
    match e {
        E::Limits(l) => Error::Input(format!("{what} image exceeds the decoding limits: {l}")),
        E::Unsupported(u) => Error::Input(format!("unsupported {what} image: {u}")),
        E::Decoding(d) => Error::Input(format!("corrupt {what} image: {d}")),
        E::IoError(io) => Error::Input(format!("corrupt {what} image (truncated or unreadable): {io}")),
        other => Error::Input(format!("cannot decode {what} image: {other}")),
    }
}

/// Runs a decoder step, turning a decoder panic into an input error. Decoders should never panic,
/// but the bytes are untrusted, and one bad image must not take down a worker thread.
fn guarded<T>(format: ImageFormat, f: impl FnOnce() -> Result<T>) -> Result<T> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|p| {
        let msg = p
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        Err(Error::Input(format!("corrupt {} image: the decoder failed: {msg}", format_name(format))))
    })
}

/// A header that was read and checked, ready to decode.
struct Probe<'a> {
    format: ImageFormat,
    decoder: Box<dyn ImageDecoder + 'a>,
    width: usize,
    height: usize,
}

/// Sniffs the format, reads the header, and checks the size against `limits`.
fn probe<'a>(bytes: &'a [u8], limits: &DecodeLimits) -> Result<Probe<'a>> {
    if bytes.is_empty() {
        return Err(Error::Input("empty image data".into()));
    }
    // The message never echoes the bytes: they may be any file's contents.
    let format = image::guess_format(bytes).map_err(|_| {
        Error::Input(format!(
            "unrecognised image format ({} bytes that are not an image); supported formats: {SUPPORTED}",
            bytes.len()
        ))
    })?;
    if !matches!(
        format,
        ImageFormat::Jpeg
            | ImageFormat::Png
            | ImageFormat::WebP
            | ImageFormat::Gif
            | ImageFormat::Bmp
            | ImageFormat::Tiff
    ) {
        return Err(Error::Input(format!(
            "unsupported image format {}; supported formats: {SUPPORTED}",
            format_name(format)
        )));
    }
    if format == ImageFormat::Tiff {
        check_tiff_counts(bytes)?;
    }
    let mut il = image::Limits::default();
    il.max_alloc = Some(limits.max_bytes);
    let mut decoder = guarded(format, || {
        let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
        reader.limits(il.clone());
        reader.into_decoder().map_err(|e| decode_error(format, e))
    })?;
    let (w, h) = decoder.dimensions();
    let (width, height) = (w as usize, h as usize);
    let what = format_name(format);
    if width == 0 || height == 0 {
        return Err(Error::Input(format!("{what} image has zero size ({height}x{width} pixels)")));
    }
    let pixels = w as u64 * h as u64;
    if pixels > limits.max_pixels {
        return Err(Error::Input(format!(
            "{what} image is too large: {height}x{width} = {pixels} pixels, the limit is {} pixels",
            limits.max_pixels
        )));
    }
    let bytes_needed = decoder.total_bytes();
    if bytes_needed > limits.max_bytes {
        return Err(Error::Input(format!(
            "{what} image is too large to decode: {height}x{width} pixels as {:?} need {bytes_needed} \
             bytes, the limit is {} bytes",
            decoder.color_type(),
            limits.max_bytes
        )));
    }
    // Pin the decoder to the checked header: the JPEG decoder parses the headers again when it
    // decodes and sizes its own buffers from that parse, so it gets the header's sides as its
    // maximum (PNG, GIF and TIFF also honour `max_alloc`; WebP's buffers are bounded by its
    // canvas, which was checked above).
    il.max_image_width = Some(w);
    il.max_image_height = Some(h);
    decoder.set_limits(il).map_err(|e| decode_error(format, e))?;
    Ok(Probe { format, decoder: Box::new(decoder), width, height })
}

/// Checks that no entry of a TIFF's first directory claims more values than the file holds. The
/// TIFF decoder sizes a vector by an entry's count before reading it (up to 256 MiB by its
/// default limits, which the `image` crate does not let us lower before the header is read), so
/// a 12-kB file could make it allocate 140 MB (found by `tests/fuzz.rs`). Anything this refuses
/// is corrupt: the values could not be in the file.
fn check_tiff_counts(b: &[u8]) -> Result<()> {
    let corrupt = |what: String| Error::Input(format!("corrupt TIFF image: {what}"));
    let le = match b.get(..2) {
        Some(b"II") => true,
        Some(b"MM") => false,
        _ => return Ok(()), // the decoder reports it
    };
    let u = |at: usize, n: usize| -> Option<u64> {
        let s = b.get(at..at.checked_add(n)?)?;
        Some(if le {
            s.iter().rev().fold(0u64, |a, &x| a << 8 | x as u64)
        } else {
            s.iter().fold(0u64, |a, &x| a << 8 | x as u64)
        })
    };
    // Classic TIFF (42): u16 entry count, 12-byte entries with a u32 count at 4; BigTIFF (43):
    // u64 entry count, 20-byte entries with a u64 count at 4.
    let (big, first) = match u(2, 2) {
        Some(42) => (false, u(4, 4)),
        Some(43) => (true, u(8, 8)),
        _ => return Ok(()),
    };
    let Some(ifd) = first.and_then(|o| usize::try_from(o).ok()) else { return Ok(()) };
    let (n, entries, size, count_len) =
        if big { (u(ifd, 8), ifd + 8, 20, 8) } else { (u(ifd, 2), ifd.saturating_add(2), 12, 4) };
    let Some(n) = n else { return Ok(()) };
    if n.saturating_mul(size as u64) > b.len() as u64 {
        return Err(corrupt(format!("its directory claims {n} entries, more than the file holds")));
    }
    for e in 0..n as usize {
        let at = entries + e * size;
        let (Some(tag), Some(ty), Some(count)) = (u(at, 2), u(at + 2, 2), u(at + 4, count_len)) else {
            break; // truncated: the decoder reports it
        };
        let unit = match ty {
            1 | 2 | 6 | 7 => 1,
            3 | 8 => 2,
            4 | 9 | 11 | 13 => 4,
            5 | 10 | 12 | 16 | 17 | 18 => 8,
            _ => 1,
        };
        if count.saturating_mul(unit) > b.len() as u64 {
            return Err(corrupt(format!("tag {tag} claims {count} values, more than the file holds")));
        }
    }
    Ok(())
}

/// Whether PIL opens these bytes as an "RGB" image although the `image` crate reports alpha:
/// a truecolour PNG (IHDR colour type 2) whose alpha comes from a `tRNS` chunk. transformers'
/// `convert_to_rgb` returns such images untouched, so they are not composited.
fn pil_mode_is_rgb(bytes: &[u8]) -> bool {
    bytes.starts_with(b"\x89PNG\r\n\x1a\n") && bytes.get(12..16) == Some(b"IHDR") && bytes.get(25) == Some(&2)
}

/// Decodes an image of any supported format to 8-bit RGB, as PIL's `convert("RGB")` would (see
/// the module docs), with the default [`DecodeLimits`].
pub fn decode(bytes: &[u8], alpha: AlphaMode) -> Result<RgbImage8> {
    decode_with_limits(bytes, alpha, &DecodeLimits::default())
}

/// [`decode`] with explicit size limits.
pub fn decode_with_limits(bytes: &[u8], alpha: AlphaMode, limits: &DecodeLimits) -> Result<RgbImage8> {
    let p = probe(bytes, limits)?;
    let alpha = if pil_mode_is_rgb(bytes) { AlphaMode::Drop } else { alpha };
    decode_probed(p, alpha)
}

fn decode_probed(p: Probe<'_>, alpha: AlphaMode) -> Result<RgbImage8> {
    let Probe { format, decoder, width, height } = p;
    let color = decoder.color_type();
    let n = usize::try_from(decoder.total_bytes())
        .map_err(|_| Error::Input(format!("{} image is too large for this machine", format_name(format))))?;
    let mut buf = alloc_bytes(n, format)?;
    guarded(format, || decoder.read_image_boxed(&mut buf).map_err(|e| decode_error(format, e)))?;
    let data = to_rgb8(buf, color, width * height, alpha)
        .ok_or_else(|| Error::Input(format!("unsupported {} pixel format {color:?}", format_name(format))))?;
    RgbImage8::new(width, height, data)
}

/// A zeroed buffer of `n` bytes, or an error (never an abort) when memory is short.
fn alloc_bytes(n: usize, format: ImageFormat) -> Result<Vec<u8>> {
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|_| {
        Error::Input(format!("cannot allocate {n} bytes to decode a {} image", format_name(format)))
    })?;
    v.resize(n, 0);
    Ok(v)
}

/// White compositing with PIL's `alpha_composite` rounding, which equals round-half-up of
/// `(v·a + 255·(255−a)) / 255` (checked exhaustively in the unit tests).
#[inline]
fn over_white(v: u8, a: u8) -> u8 {
    let x = v as u32 * a as u32 + 255 * (255 - a as u32);
    ((2 * x + 255) / 510) as u8
}

/// Converts the decoder's native pixels to interleaved RGB8, in place where the output is no
/// larger than the input. Returns `None` for a pixel format we do not know.
fn to_rgb8(mut buf: Vec<u8>, color: ColorType, pixels: usize, alpha: AlphaMode) -> Option<Vec<u8>> {
    let composite = alpha == AlphaMode::CompositeWhite;
    // The bytes of 16-bit and float samples are native-endian.
    let u16_at = |b: &[u8], i: usize| u16::from_ne_bytes([b[2 * i], b[2 * i + 1]]);
    let f32_at =
        |b: &[u8], i: usize| f32::from_ne_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]]);
    // PIL's `I;16` → RGB clamps; everything else 16-bit keeps the high byte.
    let clamp16 = |v: u16| v.min(255) as u8;
    let high = |v: u16| (v >> 8) as u8;
    let unit = |v: f32| (v.clamp(0.0, 1.0) * 255.0).round() as u8;
    // `src_bpp >= 3`: compact forward in place; each write lands at or before the bytes it read.
    let in_place = |buf: &mut Vec<u8>, src_bpp: usize, f: &dyn Fn(&[u8]) -> [u8; 3]| {
        for i in 0..pixels {
            let rgb = f(&buf[i * src_bpp..(i + 1) * src_bpp]);
            buf[i * 3..i * 3 + 3].copy_from_slice(&rgb);
        }
        buf.truncate(pixels * 3);
        buf.shrink_to_fit();
    };
    let expand = |buf: &[u8], src_bpp: usize, f: &dyn Fn(&[u8]) -> [u8; 3]| -> Option<Vec<u8>> {
        let mut out = Vec::new();
        out.try_reserve_exact(pixels * 3).ok()?;
        for px in buf.chunks_exact(src_bpp).take(pixels) {
            out.extend_from_slice(&f(px));
        }
        Some(out)
    };
    let gray_alpha = |l: u8, a: u8| {
        let v = if composite { over_white(l, a) } else { l };
        [v, v, v]
    };
    let rgba = |r: u8, g: u8, b: u8, a: u8| {
        if composite {
            [over_white(r, a), over_white(g, a), over_white(b, a)]
        } else {
            [r, g, b]
        }
    };
    match color {
        ColorType::Rgb8 => {
            buf.truncate(pixels * 3);
            Some(buf)
        }
        ColorType::Rgba8 => {
            in_place(&mut buf, 4, &|p| rgba(p[0], p[1], p[2], p[3]));
            Some(buf)
        }
        ColorType::L8 => expand(&buf, 1, &|p| [p[0]; 3]),
        ColorType::La8 => expand(&buf, 2, &|p| gray_alpha(p[0], p[1])),
        ColorType::L16 => expand(&buf, 2, &|p| [clamp16(u16_at(p, 0)); 3]),
        ColorType::La16 => {
            in_place(&mut buf, 4, &|p| gray_alpha(high(u16_at(p, 0)), high(u16_at(p, 1))));
            Some(buf)
        }
        ColorType::Rgb16 => {
            in_place(&mut buf, 6, &|p| [high(u16_at(p, 0)), high(u16_at(p, 1)), high(u16_at(p, 2))]);
            Some(buf)
        }
        ColorType::Rgba16 => {
            in_place(&mut buf, 8, &|p| {
                rgba(high(u16_at(p, 0)), high(u16_at(p, 1)), high(u16_at(p, 2)), high(u16_at(p, 3)))
            });
            Some(buf)
        }
        ColorType::Rgb32F => {
            in_place(&mut buf, 12, &|p| [unit(f32_at(p, 0)), unit(f32_at(p, 1)), unit(f32_at(p, 2))]);
            Some(buf)
        }
        ColorType::Rgba32F => {
            in_place(&mut buf, 16, &|p| {
                rgba(unit(f32_at(p, 0)), unit(f32_at(p, 1)), unit(f32_at(p, 2)), unit(f32_at(p, 3)))
            });
            Some(buf)
        }
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// Resize: Pillow's separable antialiased bicubic, 8-bit fixed point
// ---------------------------------------------------------------------------------------------

/// Fractional bits of the fixed-point coefficients. This is Pillow's `32 − 8 − 2`: room for
/// 8-bit samples plus 2 bits for coefficient sums above 1 or below 0.
const PRECISION_BITS: u32 = 22;

/// The Keys cubic with a = −0.5 (Pillow's `bicubic_filter`). The evaluation order is Pillow's,
/// so the f64 results are identical.
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// The taps of one output sample: the first input index and the fixed-point weights.
struct Taps {
    /// `(first input index, number of taps)` per output sample.
    bounds: Vec<(usize, usize)>,
    /// `ksize` weights per output sample; the first `count` are used.
    weights: Vec<i32>,
    ksize: usize,
}

/// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for resampling `in_size` samples to
/// `out_size` over the whole input (box = 0..in_size).
fn precompute_taps(in_size: usize, out_size: usize) -> Taps {
    const SUPPORT: f64 = 2.0;
    // Pillow takes the box edges as C floats: `(double)(in1 - in0) / outSize`.
    let scale = (in_size as f32) as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = SUPPORT * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut weights = vec![0i32; out_size * ksize];
    let mut k = vec![0f64; ksize];
    let ss = 1.0 / filterscale;
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        // C's `(int)` truncates toward zero; negative values are clamped to 0 anyway.
        let xmin = ((center - support + 0.5) as i64).max(0);
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64);
        let count = (xmax - xmin).max(0) as usize;
        let mut ww = 0.0;
        for (x, kx) in k.iter_mut().enumerate().take(count) {
            let w = bicubic(((x as i64 + xmin) as f64 - center + 0.5) * ss);
            *kx = w;
            ww += w;
        }
        let row = &mut weights[xx * ksize..(xx + 1) * ksize];
        for (x, kx) in k.iter().enumerate().take(count) {
            let w = if ww != 0.0 { kx / ww } else { *kx };
            let scaled = w * (1u32 << PRECISION_BITS) as f64;
            // Round half away from zero, then truncate: `(int)(±0.5 + w · 2^22)`.
            row[x] = if w < 0.0 { (-0.5 + scaled) as i32 } else { (0.5 + scaled) as i32 };
        }
        bounds.push((xmin as usize, count));
    }
    Taps { bounds, weights, ksize }
}

/// Pillow's `clip8`: drop the fraction (arithmetic shift) and clamp to 0..=255.
#[inline]
fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

const HALF: i32 = 1 << (PRECISION_BITS - 1);

/// Horizontal pass over rows `y0..y1` of `src` (`in_w` wide) to `out_w` wide.
fn resample_horizontal(src: &[u8], in_w: usize, y0: usize, y1: usize, out_w: usize, taps: &Taps) -> Vec<u8> {
    let mut out = vec![0u8; (y1 - y0) * out_w * 3];
    for (orow, y) in out.chunks_exact_mut(out_w * 3).zip(y0..y1) {
        let row = &src[y * in_w * 3..(y + 1) * in_w * 3];
        for (xx, o) in orow.chunks_exact_mut(3).enumerate() {
            let (xmin, count) = taps.bounds[xx];
            let k = &taps.weights[xx * taps.ksize..xx * taps.ksize + count];
            let px = &row[xmin * 3..(xmin + count) * 3];
            let (mut r, mut g, mut b) = (HALF, HALF, HALF);
            for (p, &w) in px.chunks_exact(3).zip(k) {
                r += p[0] as i32 * w;
                g += p[1] as i32 * w;
                b += p[2] as i32 * w;
            }
            o[0] = clip8(r);
            o[1] = clip8(g);
            o[2] = clip8(b);
        }
    }
    out
}

/// Vertical pass: `src` is `width` pixels wide; output row `yy` reads rows
/// `offset + bounds[yy].0 ..` of it.
fn resample_vertical(src: &[u8], width: usize, offset: usize, out_h: usize, taps: &Taps) -> Vec<u8> {
    let stride = width * 3;
    let mut out = vec![0u8; out_h * stride];
    let mut acc = vec![0i32; stride];
    for (yy, orow) in out.chunks_exact_mut(stride).enumerate() {
        let (ymin, count) = taps.bounds[yy];
        let k = &taps.weights[yy * taps.ksize..yy * taps.ksize + count];
        acc.fill(HALF);
        for (i, &w) in k.iter().enumerate() {
            let y = ymin - offset + i;
            let row = &src[y * stride..(y + 1) * stride];
            for (a, &p) in acc.iter_mut().zip(row) {
                *a += p as i32 * w;
            }
        }
        for (o, &a) in orow.iter_mut().zip(&acc) {
            *o = clip8(a);
        }
    }
    out
}

/// The order of the two resize passes, following a given Pillow release. The passes differ only
/// when both sides change (see the module docs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum PassOrder {
    /// Pillow ≥ 13.0: vertical first when `in_h − out_h > 0` and
    /// `in_h − out_h > 2·(in_w − out_w)`, otherwise horizontal first.
    Pillow13,
    /// Pillow 12.2 and 12.3: vertical first when `in_h > 100·in_w` and `out_h < in_h`.
    Pillow12_2,
    /// Pillow ≤ 12.1: always horizontal first. The default: it is what the reference does (jina
    /// loads the fast processor, whose torchvision resize also runs horizontally first; measured
    /// on the fixture images: within 1 LSB of it, and bit-identical to the reference machine's
    /// Pillow, where Pillow 13's order differs by up to 14 LSB on a 70×42 → 56×56 resize).
    #[default]
    HorizontalFirst,
}

impl PassOrder {
    /// Whether the vertical pass runs first for this resize.
    pub fn vertical_first(self, in_h: usize, in_w: usize, out_h: usize, out_w: usize) -> bool {
        match self {
            PassOrder::Pillow13 => {
                // Pillow compares the signed shrinkages of the two sides.
                let dh = in_h as i64 - out_h as i64;
                let dw = in_w as i64 - out_w as i64;
                dh > 0 && dh > 2 * dw
            }
            PassOrder::Pillow12_2 => in_h > 100 * in_w && out_h < in_h,
            PassOrder::HorizontalFirst => false,
        }
    }
}

/// Resizes like `Image.resize((out_w, out_h), Image.BICUBIC)` of Pillow ≤ 12.1 (horizontal pass
/// first, the default [`PassOrder`]) on an RGB image, bit for bit. See [`resize_bicubic_ordered`]
/// for other Pillow releases.
///
/// # Panics
/// If `img.data` does not hold `width · height · 3` bytes, or one side of either size is zero
/// while the sizes differ.
pub fn resize_bicubic(img: &RgbImage8, out_h: usize, out_w: usize) -> RgbImage8 {
    resize_bicubic_ordered(img, out_h, out_w, PassOrder::default())
}

/// [`resize_bicubic`] with the pass order of a given Pillow release. A pass whose side is
/// unchanged is skipped. When the horizontal pass runs first, it only processes the rows that
/// the vertical pass reads, as Pillow does.
///
/// # Panics
/// As [`resize_bicubic`].
pub fn resize_bicubic_ordered(img: &RgbImage8, out_h: usize, out_w: usize, order: PassOrder) -> RgbImage8 {
    let (in_w, in_h) = (img.width, img.height);
    assert_eq!(img.data.len(), in_w * in_h * 3, "resize_bicubic: data does not match {in_h}x{in_w}");
    if in_w == out_w && in_h == out_h {
        return img.clone();
    }
    assert!(
        out_w > 0 && out_h > 0 && in_w > 0 && in_h > 0,
        "resize_bicubic: cannot resize {in_h}x{in_w} to {out_h}x{out_w}"
    );
    let need_h = out_w != in_w;
    let need_v = out_h != in_h;
    let data = if !need_v {
        let htaps = precompute_taps(in_w, out_w);
        resample_horizontal(&img.data, in_w, 0, in_h, out_w, &htaps)
    } else if !need_h {
        resample_vertical(&img.data, in_w, 0, out_h, &precompute_taps(in_h, out_h))
    } else if order.vertical_first(in_h, in_w, out_h, out_w) {
        let mid = resample_vertical(&img.data, in_w, 0, out_h, &precompute_taps(in_h, out_h));
        resample_horizontal(&mid, in_w, 0, out_h, out_w, &precompute_taps(in_w, out_w))
    } else {
        let vtaps = precompute_taps(in_h, out_h);
        // The rows the vertical pass will read.
        let y_first = vtaps.bounds[0].0;
        let (last_min, last_count) = vtaps.bounds[out_h - 1];
        let y_last = last_min + last_count;
        let htaps = precompute_taps(in_w, out_w);
        let mid = resample_horizontal(&img.data, in_w, y_first, y_last, out_w, &htaps);
        resample_vertical(&mid, out_w, y_first, out_h, &vtaps)
    };
    RgbImage8 { width: out_w, height: out_h, data }
}

// ---------------------------------------------------------------------------------------------
// Normalise + patchify
// ---------------------------------------------------------------------------------------------

/// Resizes, normalises and cuts an RGB image into patch rows (docs/MODEL.md §4.1 steps 2–5).
///
/// Row `n = ((bh·(gw/m) + bw)·m + mh)·m + mw` holds patch (`pr = bh·m + mh`, `pc = bw·m + mw`),
/// where `m` is `merge_size`. Element `e = c·T·p² + t·p² + ph·p + pw` of that row holds
/// `(u8/255 − mean[c]) / std[c]` of pixel (`pr·p + ph`, `pc·p + pw`), computed in f32, with the
/// same value for every frame `t < T`. By default `m` = 2, `p` = 14 and `T` = 2, so `e = c·392 +
/// t·196 + ph·14 + pw`.
pub fn preprocess(img: &RgbImage8, cfg: &ImageConfig) -> Result<Preprocessed> {
    img.check()?;
    let (rh, rw) = cfg.resized_size(img.height, img.width)?;
    // A per-request `min_pixels`/`max_pixels` could ask for an absurd output; keep it within the
    // same pixel limit as the inputs.
    if (rh as u64).saturating_mul(rw as u64) > cfg.limits.max_pixels {
        return Err(Error::Input(format!(
            "image of {}x{} pixels would be resized to {rh}x{rw}, more than the limit of {} pixels",
            img.height, img.width, cfg.limits.max_pixels
        )));
    }
    let resized = resize_bicubic_ordered(img, rh, rw, cfg.resize_order);
    Ok(patchify(&resized, cfg))
}

/// The normalised value of every byte, per channel: `(u/255 − mean) / std` in f32.
fn normalise_table(cfg: &ImageConfig) -> [[f32; 256]; 3] {
    let mut lut = [[0f32; 256]; 3];
    for (c, t) in lut.iter_mut().enumerate() {
        for (u, v) in t.iter_mut().enumerate() {
            *v = (u as f32 / 255.0 - cfg.image_mean[c]) / cfg.image_std[c];
        }
    }
    lut
}

/// Patch rows of an image whose sides are multiples of `patch_size · merge_size`.
fn patchify(img: &RgbImage8, cfg: &ImageConfig) -> Preprocessed {
    let (p, t, m) = (cfg.patch_size, cfg.temporal_patch_size, cfg.merge_size);
    let (h, w) = (img.height, img.width);
    debug_assert!(h % (p * m) == 0 && w % (p * m) == 0);
    let (gh, gw) = (h / p, w / p);
    let plane = p * p;
    let row_len = cfg.row_len();
    let lut = normalise_table(cfg);
    let mut out = vec![0f32; gh * gw * row_len];
    let mut rows = out.chunks_exact_mut(row_len);
    for bh in 0..gh / m {
        for bw in 0..gw / m {
            for mh in 0..m {
                for mw in 0..m {
                    let row = rows.next().expect("one row per patch");
                    let (pr, pc) = (bh * m + mh, bw * m + mw);
                    for (c, lut_c) in lut.iter().enumerate() {
                        let base = c * t * plane;
                        for ph in 0..p {
                            let y = pr * p + ph;
                            let src = &img.data[(y * w + pc * p) * 3..(y * w + pc * p + p) * 3];
                            let dst = &mut row[base + ph * p..base + ph * p + p];
                            for (d, px) in dst.iter_mut().zip(src.chunks_exact(3)) {
                                *d = lut_c[px[c] as usize];
                            }
                        }
                        for ti in 1..t {
                            row.copy_within(base..base + plane, base + ti * plane);
                        }
                    }
                }
            }
        }
    }
    Preprocessed { pixel_values: out, grid_thw: [1, gh, gw], resized: (h, w) }
}

/// Decodes (see [`decode`]) and preprocesses image bytes. The header is checked (limits, aspect
/// ratio) before any pixel is decoded.
pub fn preprocess_bytes(bytes: &[u8], cfg: &ImageConfig, alpha: AlphaMode) -> Result<Preprocessed> {
    cfg.validate()?;
    let p = probe(bytes, &cfg.limits)?;
    // Fail fast on a bad aspect ratio before paying for the pixels.
    cfg.resized_size(p.height, p.width)?;
    let alpha = if pil_mode_is_rgb(bytes) { AlphaMode::Drop } else { alpha };
    let img = decode_probed(p, alpha)?;
    preprocess(&img, cfg)
}

/// Reads an image file and preprocesses it. A read failure is an [`Error::Io`]. A bad image is
/// an [`Error::Input`] that starts with the path.
///
/// The file is read within the default [`Limits`](crate::engine::limits::Limits) (a regular file
/// of at most 32 MiB); [`preprocess_file_with`] takes other limits.
pub fn preprocess_file(path: &Path, cfg: &ImageConfig, alpha: AlphaMode) -> Result<Preprocessed> {
    preprocess_file_with(path, cfg, alpha, &crate::engine::limits::Limits::default())
}

/// [`preprocess_file`] with explicit file limits (size, regular files only, `image_root`).
pub fn preprocess_file_with(
    path: &Path,
    cfg: &ImageConfig,
    alpha: AlphaMode,
    limits: &crate::engine::limits::Limits,
) -> Result<Preprocessed> {
    let bytes = limits.read_image_file(path)?;
    preprocess_bytes(&bytes, cfg, alpha).map_err(|e| match e {
        Error::Input(msg) => Error::Input(format!("{}: {msg}", path.display())),
        other => other,
    })
}

/// Preprocesses many encoded images on up to `threads` scoped threads (0 means 1). The results
/// are in input order, and a bad image fails alone.
pub fn preprocess_many(
    inputs: Vec<Vec<u8>>,
    cfg: &ImageConfig,
    alpha: AlphaMode,
    threads: usize,
) -> Vec<Result<Preprocessed>> {
    let n = inputs.len();
    let threads = threads.clamp(1, n.max(1));
    if threads == 1 {
        return inputs.iter().map(|b| preprocess_bytes(b, cfg, alpha)).collect();
    }
    let next = AtomicUsize::new(0);
    let mut slots: Vec<Option<Result<Preprocessed>>> = (0..n).map(|_| None).collect();
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let mut done = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= n {
                            break done;
                        }
                        done.push((i, preprocess_bytes(&inputs[i], cfg, alpha)));
                    }
                })
            })
            .collect();
        for worker in workers {
            // Decoder panics are caught inside, so a worker only panics on a bug here; pass it on.
            for (i, r) in worker.join().unwrap_or_else(|p| std::panic::resume_unwind(p)) {
                slots[i] = Some(r);
            }
        }
    });
    slots.into_iter().map(|r| r.expect("every input was processed")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// PIL's `ImagingAlphaComposite` integer code, for an opaque white destination.
    fn pil_alpha_composite_white(v: u8, a: u8) -> u8 {
        const PB: u32 = 7;
        let (v, a) = (v as u32, a as u32);
        if a == 0 {
            return 255;
        }
        let blend = 255 * (255 - a);
        let outa255 = a * 255 + blend;
        let coef1 = a * 255 * 255 * (1 << PB) / outa255;
        let coef2 = 255 * (1 << PB) - coef1;
        let tmp = v * coef1 + 255 * coef2 + (0x80 << PB);
        ((((tmp >> 8) + tmp) >> 8) >> PB) as u8
    }

    #[test]
    fn white_composite_matches_pil_for_every_value() {
        for a in 0..=255u8 {
            for v in 0..=255u8 {
                assert_eq!(over_white(v, a), pil_alpha_composite_white(v, a), "v={v} a={a}");
            }
        }
    }

    #[test]
    fn types_can_cross_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<ImageConfig>();
        send_sync::<RgbImage8>();
        send_sync::<Preprocessed>();
        send_sync::<crate::Error>();
    }

    #[test]
    fn bicubic_kernel_shape() {
        assert_eq!(bicubic(0.0), 1.0);
        assert_eq!(bicubic(1.0), 0.0);
        assert_eq!(bicubic(2.0), 0.0);
        assert_eq!(bicubic(-1.5), bicubic(1.5));
        // Keys, a = -0.5, at 0.5: (1.5·0.5 − 2.5)·0.25 + 1 = 0.5625; at 1.5: −0.0625.
        assert_eq!(bicubic(0.5), 0.5625);
        assert_eq!(bicubic(1.5), -0.0625);
    }

    #[test]
    fn taps_sum_to_one_in_fixed_point() {
        for (i, o) in [(100, 37), (37, 100), (3000, 672), (5, 5), (1, 56), (56, 1)] {
            let t = precompute_taps(i, o);
            for (xx, &(xmin, count)) in t.bounds.iter().enumerate() {
                assert!(xmin + count <= i && count >= 1);
                let s: i32 = t.weights[xx * t.ksize..xx * t.ksize + count].iter().sum();
                // Each weight is rounded separately: off by at most half an LSB per tap.
                assert!((s - (1 << PRECISION_BITS)).abs() <= count as i32, "{i}->{o} xx={xx} sum={s}");
            }
        }
    }

    #[test]
    fn to_rgb8_formats() {
        let ne = |v: u16| v.to_ne_bytes();
        // L16 clamps (PIL I;16 → RGB); RGB16 keeps the high byte.
        let l16: Vec<u8> = [0u16, 200, 255, 256, 65535].iter().flat_map(|&v| ne(v)).collect();
        assert_eq!(
            to_rgb8(l16, ColorType::L16, 5, AlphaMode::Drop).unwrap(),
            [0, 200, 255, 255, 255].iter().flat_map(|&v| [v; 3]).collect::<Vec<u8>>()
        );
        let rgb16: Vec<u8> = [0x1234u16, 0xff00, 0x00ff].iter().flat_map(|&v| ne(v)).collect();
        assert_eq!(to_rgb8(rgb16, ColorType::Rgb16, 1, AlphaMode::Drop).unwrap(), [0x12, 0xff, 0x00]);
        let rgba = vec![10, 20, 30, 0, 40, 50, 60, 255, 100, 100, 100, 128];
        assert_eq!(
            to_rgb8(rgba.clone(), ColorType::Rgba8, 3, AlphaMode::Drop).unwrap(),
            [10, 20, 30, 40, 50, 60, 100, 100, 100]
        );
        // (100·128 + 255·127) / 255 = 177.19… → 177.
        assert_eq!(
            to_rgb8(rgba, ColorType::Rgba8, 3, AlphaMode::CompositeWhite).unwrap(),
            [255, 255, 255, 40, 50, 60, 177, 177, 177]
        );
        assert_eq!(to_rgb8(vec![7, 9], ColorType::La8, 1, AlphaMode::Drop).unwrap(), [7, 7, 7]);
    }

    #[test]
    fn png_truecolour_header_is_pil_rgb() {
        let mut png = b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR\0\0\0\x01\0\0\0\x01\x08\x02".to_vec();
        assert!(pil_mode_is_rgb(&png));
        png[25] = 6;
        assert!(!pil_mode_is_rgb(&png));
    }
}
