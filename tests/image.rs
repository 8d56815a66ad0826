//! The image front end (docs/MODEL.md §4.1): smart_resize, Pillow-compatible bicubic, patch layout,
//! decoding of every supported format, and the failure modes (bad bytes, limits, sizes).
//!
//! Every expected value here is derived in the test: from the spec's table, from arithmetic
//! written out in the comments, or from an independent straightforward implementation of the
//! formula. None is pasted from a run of the code under test.

use image::codecs::png::{CompressionType, FilterType, PngEncoder};
use image::{
    DynamicImage, ExtendedColorType, ImageBuffer, ImageEncoder, ImageFormat, Luma, LumaA, Rgb, Rgba,
};
use jv4::engine::image::{
    decode, decode_with_limits, preprocess, preprocess_bytes, preprocess_file, preprocess_many,
    resize_bicubic, resize_bicubic_ordered, smart_resize, AlphaMode, DecodeLimits, ImageConfig, PassOrder,
    RgbImage8, MAX_ASPECT_RATIO,
};
use jv4::Error;
use std::io::Cursor;
use std::time::Instant;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// A small deterministic generator (xorshift64*), so the tests need no extra crates.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn byte(&mut self) -> u8 {
        (self.next() >> 56) as u8
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn random_image(w: usize, h: usize, seed: u64) -> RgbImage8 {
    let mut r = Rng(seed | 1);
    RgbImage8::new(w, h, (0..w * h * 3).map(|_| r.byte()).collect()).unwrap()
}

fn encode(img: DynamicImage, format: ImageFormat) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, format).unwrap();
    out.into_inner()
}

fn rgb_dynamic(img: &RgbImage8) -> DynamicImage {
    DynamicImage::ImageRgb8(
        ImageBuffer::<Rgb<u8>, _>::from_raw(img.width as u32, img.height as u32, img.data.clone()).unwrap(),
    )
}

fn input_msg<T: std::fmt::Debug>(r: jv4::Result<T>) -> String {
    match r {
        Err(Error::Input(m)) => m,
        other => panic!("expected Error::Input, got {other:?}"),
    }
}

/// Round-half-up of `num / den` for non-negative integers.
fn round_div(num: u32, den: u32) -> u32 {
    (2 * num + den) / (2 * den)
}

fn crc32(data: &[u8]) -> u32 {
    let mut c = 0xffff_ffffu32;
    for &b in data {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 { 0xedb8_8320 ^ (c >> 1) } else { c >> 1 };
        }
    }
    !c
}

/// Splits a PNG into its chunks (type, data).
fn png_chunks(png: &[u8]) -> Vec<([u8; 4], Vec<u8>)> {
    let mut out = Vec::new();
    let mut i = 8;
    while i + 8 <= png.len() {
        let len = u32::from_be_bytes(png[i..i + 4].try_into().unwrap()) as usize;
        let ty: [u8; 4] = png[i + 4..i + 8].try_into().unwrap();
        out.push((ty, png[i + 8..i + 8 + len].to_vec()));
        i += 12 + len;
    }
    out
}

/// Builds a PNG from chunks, computing every CRC.
fn png_build(chunks: &[([u8; 4], Vec<u8>)]) -> Vec<u8> {
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    for (ty, data) in chunks {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let mut body = ty.to_vec();
        body.extend_from_slice(data);
        out.extend_from_slice(&body);
        out.extend_from_slice(&crc32(&body).to_be_bytes());
    }
    out
}

/// Resets the process's peak-RSS counter to the current RSS (Linux `clear_refs` value 5).
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Peak resident memory of this process so far (Linux), in MiB.
fn peak_rss_mib() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? / 1024)
}

// ---------------------------------------------------------------------------------------------
// smart_resize
// ---------------------------------------------------------------------------------------------

const MAX: usize = 602_112;
const MIN: usize = 3136;

#[test]
fn smart_resize_spec_table() {
    // Spec §4.1's table: (H, W) → (h, w), grid, image tokens.
    let cfg = ImageConfig::default();
    for ((h, w), (rh, rw), tokens) in [
        ((800, 1000), (672, 840), 720),
        ((224, 224), (224, 224), 64),
        ((70, 42), (56, 56), 4),
        ((2200, 1700), (868, 672), 744),
    ] {
        assert_eq!(smart_resize(h, w, 28, MIN, MAX).unwrap(), (rh, rw), "{h}x{w}");
        assert_eq!(cfg.resized_size(h, w).unwrap(), (rh, rw));
        assert_eq!((rh / 14) * (rw / 14) / 4, tokens);
    }
}

#[test]
fn smart_resize_rounds_half_to_even() {
    // 70/28 = 2.5 → 2 and 42/28 = 1.5 → 2 (both exact in binary): 56×56. Rounding half away
    // from zero would give 84×56.
    assert_eq!(smart_resize(70, 42, 28, MIN, MAX).unwrap(), (56, 56));
    // 126/28 = 4.5 → 4 (not 5): 112; 224/28 = 8. Area 25088 is within limits.
    assert_eq!(smart_resize(126, 224, 28, MIN, MAX).unwrap(), (112, 224));
    // 98/28 = 3.5 → 4: 112.
    assert_eq!(smart_resize(98, 224, 28, MIN, MAX).unwrap(), (112, 224));
}

#[test]
fn smart_resize_scales_small_images_up_to_min_pixels() {
    // 1×1: both round to 0, area 0 < 3136, β = √3136 = 56, ceil(56/28)·28 = 56.
    assert_eq!(smart_resize(1, 1, 28, MIN, MAX).unwrap(), (56, 56));
    // 10×10: round(0.357) = 0 → 0; β = √(3136/100) = 5.6; ceil(56/28) = 2 → 56.
    assert_eq!(smart_resize(10, 10, 28, MIN, MAX).unwrap(), (56, 56));
    // 20×30: 28×28 = 784 < 3136; β = √(3136/600) = 2.2862; ceil(45.72/28) = 2 → 56,
    // ceil(68.59/28) = 3 → 84.
    assert_eq!(smart_resize(20, 30, 28, MIN, MAX).unwrap(), (56, 84));
    // 1×200 (ratio exactly 200 is allowed): β = √(3136/200) = 3.9598; ceil(3.96/28) = 1 → 28,
    // ceil(791.96/28) = ceil(28.28) = 29 → 812.
    assert_eq!(smart_resize(1, 200, 28, MIN, MAX).unwrap(), (28, 812));
}

#[test]
fn smart_resize_shrinks_large_images_with_a_floor_of_factor() {
    // 10000² → β = √(1e8/602112) = 12.887; floor(10000/12.887/28) = floor(27.71) = 27 → 756.
    assert_eq!(smart_resize(10_000, 10_000, 28, MIN, MAX).unwrap(), (756, 756));
    // 30×6000 with max 7840: 28×5992 > 7840; β = √(180000/7840) = 4.7916;
    // floor(30/4.79/28) = 0 → max(28, 0) = 28; floor(6000/4.79/28) = floor(44.72) = 44 → 1232.
    assert_eq!(smart_resize(30, 6000, 28, MIN, 7840).unwrap(), (28, 1232));
}

#[test]
fn smart_resize_errors() {
    assert!(input_msg(smart_resize(0, 10, 28, MIN, MAX)).contains("zero size"));
    assert!(input_msg(smart_resize(10, 0, 28, MIN, MAX)).contains("zero size"));
    assert!(input_msg(smart_resize(201, 1, 28, MIN, MAX)).contains("aspect ratio"));
    assert!(input_msg(smart_resize(1, 201, 28, MIN, MAX)).contains("aspect ratio"));
    assert!(input_msg(smart_resize(100, 20_101, 28, MIN, MAX)).contains("aspect ratio"));
    assert!(smart_resize(100, 20_000, 28, MIN, MAX).is_ok(), "ratio exactly {MAX_ASPECT_RATIO} is allowed");
    assert!(smart_resize(10, 10, 0, MIN, MAX).is_err());
    // min_pixels = 0 lets a 10-pixel side round to 0: refused rather than returned.
    assert!(smart_resize(10, 300, 28, 0, MAX).is_err());
}

// ---------------------------------------------------------------------------------------------
// resize_bicubic
// ---------------------------------------------------------------------------------------------

/// Pillow's bicubic kernel (a = −0.5), in Pillow's evaluation order.
fn keys(x: f64) -> f64 {
    let a = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * a
    } else {
        0.0
    }
}

/// Straightforward fixed-point weights: for output sample `o`, every input sample whose kernel
/// value is non-zero. Pillow's window `[trunc(c − s + ½), trunc(c + s + ½))` holds all of those
/// and only adds zeros, so the sums are the same.
fn reference_weights(n_in: usize, n_out: usize) -> Vec<Vec<(usize, i32)>> {
    let scale = n_in as f64 / n_out as f64;
    let fs = scale.max(1.0);
    let ss = 1.0 / fs; // Pillow multiplies by the reciprocal.
    (0..n_out)
        .map(|o| {
            let center = (o as f64 + 0.5) * scale;
            let taps: Vec<(usize, f64)> = (0..n_in)
                .map(|i| (i, keys((i as f64 - center + 0.5) * ss)))
                .filter(|&(_, w)| w != 0.0)
                .collect();
            let sum: f64 = taps.iter().map(|t| t.1).sum();
            taps.into_iter()
                .map(|(i, w)| {
                    let w = w / sum * 4_194_304.0; // 2^22
                    (i, if w < 0.0 { (w - 0.5) as i32 } else { (w + 0.5) as i32 })
                })
                .collect()
        })
        .collect()
}

fn round_clip(acc: i64) -> u8 {
    ((acc + (1 << 21)) >> 22).clamp(0, 255) as u8
}

/// One independent separable pass along x over every row of a `w`-wide image.
fn reference_pass_x(data: &[u8], w: usize, h: usize, out_w: usize) -> Vec<u8> {
    let wt = reference_weights(w, out_w);
    let mut next = vec![0u8; h * out_w * 3];
    for y in 0..h {
        for (x, taps) in wt.iter().enumerate() {
            for c in 0..3 {
                let acc: i64 = taps.iter().map(|&(i, k)| data[(y * w + i) * 3 + c] as i64 * k as i64).sum();
                next[(y * out_w + x) * 3 + c] = round_clip(acc);
            }
        }
    }
    next
}

/// One independent separable pass along y.
fn reference_pass_y(data: &[u8], w: usize, h: usize, out_h: usize) -> Vec<u8> {
    let wt = reference_weights(h, out_h);
    let mut next = vec![0u8; out_h * w * 3];
    for (y, taps) in wt.iter().enumerate() {
        for x in 0..w * 3 {
            let acc: i64 = taps.iter().map(|&(i, k)| data[i * w * 3 + x] as i64 * k as i64).sum();
            next[y * w * 3 + x] = round_clip(acc);
        }
    }
    next
}

/// Independent two-pass resize, each pass over the whole image, in the given order; a pass whose
/// side is unchanged is skipped.
fn reference_resize(img: &RgbImage8, out_h: usize, out_w: usize, vertical_first: bool) -> RgbImage8 {
    let (w, h) = (img.width, img.height);
    let mut data = img.data.clone();
    if vertical_first {
        if out_h != h {
            data = reference_pass_y(&data, w, h, out_h);
        }
        if out_w != w {
            data = reference_pass_x(&data, w, out_h, out_w);
        }
    } else {
        if out_w != w {
            data = reference_pass_x(&data, w, h, out_w);
        }
        if out_h != h {
            data = reference_pass_y(&data, out_w, h, out_h);
        }
    }
    RgbImage8::new(out_w, out_h, data).unwrap()
}

/// The pass order of each Pillow release, from its source: 13.0 `ImagingResampleInner`
/// (`!((in_h - out_h) > 0 && (in_h - out_h) > (in_w - out_w) * 2)` means horizontal first),
/// 12.2 `Image.resize` (`size[1] > size[0] * 100 and size[1] < self.size[1]`), older: never.
fn reference_vertical_first(order: PassOrder, h: usize, w: usize, oh: usize, ow: usize) -> bool {
    let (h, w, oh, ow) = (h as i64, w as i64, oh as i64, ow as i64);
    match order {
        PassOrder::Pillow13 => (h - oh) > 0 && (h - oh) > (w - ow) * 2,
        PassOrder::Pillow12_2 => h > w * 100 && oh < h,
        PassOrder::HorizontalFirst => false,
    }
}

#[test]
fn resize_same_size_is_identity() {
    let img = random_image(31, 17, 7);
    assert_eq!(resize_bicubic(&img, 17, 31), img);
}

#[test]
fn resize_keeps_a_constant_image_constant() {
    for &(h, w, oh, ow) in
        &[(10, 10, 3, 7), (7, 5, 56, 84), (100, 37, 28, 28), (3, 300, 28, 56), (1, 1, 56, 56)]
    {
        for v in [0u8, 1, 77, 128, 254, 255] {
            let img = RgbImage8::new(w, h, vec![v; w * h * 3]).unwrap();
            let out = resize_bicubic(&img, oh, ow);
            assert_eq!((out.width, out.height), (ow, oh));
            assert!(out.data.iter().all(|&x| x == v), "{h}x{w} → {oh}x{ow} value {v}");
        }
    }
}

#[test]
fn resize_hand_computed_case() {
    // Row [0, 0, 255, 255] (1×4) → 1×2. scale = 2, so support = 2·2 = 4 and the kernel argument
    // is (x − center + ½)/2.
    // Output 0: center 1 → arguments −¼, ¼, ¾, 5/4 → Keys values 111/128, 111/128, 29/128,
    //   −9/128 (e.g. k(¼) = (1.5·¼ − 2.5)·¼² + 1 = 0.8671875); their sum is 242/128.
    //   Fixed point: 29·2²²/242 = 502623.2 → 502623 and −9·2²²/242 = −155986.5 → −155987.
    //   255·(502623 − 155987) + 2²¹ = 90489332, and 90489332 >> 22 = 21.
    // Output 1: mirror weights [−9, 29, 111, 111]/242; 111·2²²/242 = 1923833.7 → 1923834.
    //   255·2·1923834 + 2²¹ = 983252492, and 983252492 >> 22 = 234.
    let mut row = Vec::new();
    for v in [0u8, 0, 255, 255] {
        row.extend_from_slice(&[v, v, v]);
    }
    let img = RgbImage8::new(4, 1, row.clone()).unwrap();
    assert_eq!(resize_bicubic(&img, 1, 2).data, [21, 21, 21, 234, 234, 234]);
    // The same column, vertically.
    let col = RgbImage8::new(1, 4, row).unwrap();
    assert_eq!(resize_bicubic(&col, 2, 1).data, [21, 21, 21, 234, 234, 234]);
    // In 2-D, with rows that repeat: a constant vertical pass keeps them.
    let mut data = Vec::new();
    for _ in 0..4 {
        for v in [0u8, 0, 255, 255] {
            data.extend_from_slice(&[v, 0, 255 - v]);
        }
    }
    let sq = RgbImage8::new(4, 4, data).unwrap();
    let out = resize_bicubic(&sq, 2, 2);
    assert_eq!(out.data, [21, 0, 234, 234, 0, 21, 21, 0, 234, 234, 0, 21]);
}

#[test]
fn resize_matches_an_independent_implementation() {
    let cases = [
        (17, 13, 5, 7),    // down both ways, fractional scales
        (9, 5, 56, 28),    // up both ways
        (37, 100, 84, 56), // down in x, up in y
        (70, 42, 56, 56),  // down in y, up in x: Pillow 13 goes vertical first
        (90, 110, 84, 112),
        (60, 20, 20, 15), // height shrinks by more than twice the width: vertical first in 13
        (40, 40, 40, 12), // vertical pass skipped
        (40, 40, 12, 40), // horizontal pass skipped
        (3, 3, 1, 1),     // to a single pixel
        (1, 1, 5, 3),     // from a single pixel
        (300, 2, 28, 28), // very uneven; > 100× taller than wide: vertical first in 12.2 too
    ];
    for (i, &(h, w, oh, ow)) in cases.iter().enumerate() {
        let img = random_image(w, h, 100 + i as u64);
        for order in [PassOrder::Pillow13, PassOrder::Pillow12_2, PassOrder::HorizontalFirst] {
            let vfirst = reference_vertical_first(order, h, w, oh, ow);
            assert_eq!(order.vertical_first(h, w, oh, ow), vfirst);
            assert_eq!(
                resize_bicubic_ordered(&img, oh, ow, order),
                reference_resize(&img, oh, ow, vfirst),
                "{h}x{w} → {oh}x{ow} {order:?}"
            );
        }
        assert_eq!(
            resize_bicubic(&img, oh, ow),
            resize_bicubic_ordered(&img, oh, ow, PassOrder::HorizontalFirst)
        );
    }
}

#[test]
fn pass_order_matters_and_defaults_to_horizontal_first() {
    // Noise shows the intermediate u8 rounding: the two orders give different pixels.
    let img = random_image(42, 70, 11);
    let h_first = reference_resize(&img, 56, 56, false);
    let v_first = reference_resize(&img, 56, 56, true);
    assert_ne!(h_first, v_first);
    // The default is the reference's order (horizontal first; see PassOrder).
    assert_eq!(resize_bicubic(&img, 56, 56), h_first);
    assert_eq!(resize_bicubic_ordered(&img, 56, 56, PassOrder::Pillow13), v_first);
    // preprocess follows the configured order.
    let plain = ImageConfig { image_mean: [0.0; 3], image_std: [1.0; 3], ..ImageConfig::default() };
    let new = ImageConfig { resize_order: PassOrder::Pillow13, ..plain.clone() };
    let a = preprocess(&img, &plain).unwrap();
    let b = preprocess(&img, &new).unwrap();
    assert_eq!(a.pixel_values[0], h_first.data[0] as f32 / 255.0);
    assert_eq!(b.pixel_values[0], v_first.data[0] as f32 / 255.0);
    // A 1080×2400 phone screenshot resizes to 504×1148: the height shrinks by 1252 pixels, more
    // than twice the width's 576, so Pillow 13 runs the vertical pass first; a landscape photo
    // does not.
    assert_eq!(smart_resize(2400, 1080, 28, MIN, MAX).unwrap(), (1148, 504));
    assert!(PassOrder::Pillow13.vertical_first(2400, 1080, 1148, 504));
    assert!(!PassOrder::Pillow13.vertical_first(3000, 4000, 672, 896));
    assert!(!PassOrder::Pillow12_2.vertical_first(2400, 1080, 1148, 504));
}

#[test]
fn symmetric_image_stays_symmetric() {
    // Scales 4, 2.5 and 1.5 are exact in binary, so the mirrored taps are bit-identical.
    for &(n, m) in &[(64usize, 16usize), (40, 16), (48, 32), (30, 12)] {
        let mut r = Rng(n as u64 * 31 + m as u64);
        // Left-right and top-bottom mirror symmetric.
        let half: Vec<u8> = (0..(n / 2) * (n / 2) * 3).map(|_| r.byte()).collect();
        let mut data = vec![0u8; n * n * 3];
        for y in 0..n {
            for x in 0..n {
                let (sy, sx) = (y.min(n - 1 - y), x.min(n - 1 - x));
                for c in 0..3 {
                    data[(y * n + x) * 3 + c] = half[(sy * (n / 2) + sx) * 3 + c];
                }
            }
        }
        let img = RgbImage8::new(n, n, data).unwrap();
        let out = resize_bicubic(&img, m, m);
        for y in 0..m {
            for x in 0..m {
                assert_eq!(out.pixel(x, y), out.pixel(m - 1 - x, y), "{n}→{m} at ({x},{y})");
                assert_eq!(out.pixel(x, y), out.pixel(x, m - 1 - y), "{n}→{m} at ({x},{y})");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Normalise + patchify
// ---------------------------------------------------------------------------------------------

/// A byte that depends on (channel, row, column), so that misplaced elements show up.
fn code(c: usize, y: usize, x: usize) -> u8 {
    ((c * 101 + y * 7 + x * 13 + (y * x) % 5) % 256) as u8
}

fn coded_image(h: usize, w: usize) -> RgbImage8 {
    let mut data = vec![0u8; h * w * 3];
    for y in 0..h {
        for x in 0..w {
            for c in 0..3 {
                data[(y * w + x) * 3 + c] = code(c, y, x);
            }
        }
    }
    RgbImage8::new(w, h, data).unwrap()
}

/// Checks every element against docs/MODEL.md §4.1: row n = ((bh·(gw/m) + bw)·m + mh)·m + mw, element
/// e = c·T·p² + t·p² + ph·p + pw, value of pixel (pr·p + ph, pc·p + pw).
fn check_layout(h: usize, w: usize, cfg: &ImageConfig) {
    let img = coded_image(h, w);
    assert_eq!(cfg.resized_size(h, w).unwrap(), (h, w), "pick a size that is not resized");
    let out = preprocess(&img, cfg).unwrap();
    let (p, t, m) = (cfg.patch_size, cfg.temporal_patch_size, cfg.merge_size);
    let (gh, gw) = (h / p, w / p);
    assert_eq!(out.grid_thw, [1, gh, gw]);
    assert_eq!(out.resized, (h, w));
    let row_len = 3 * t * p * p;
    assert_eq!(out.pixel_values.len(), gh * gw * row_len);
    for bh in 0..gh / m {
        for bw in 0..gw / m {
            for mh in 0..m {
                for mw in 0..m {
                    let n = ((bh * (gw / m) + bw) * m + mh) * m + mw;
                    let (pr, pc) = (bh * m + mh, bw * m + mw);
                    for c in 0..3 {
                        for tt in 0..t {
                            for ph in 0..p {
                                for pw in 0..p {
                                    let e = c * t * p * p + tt * p * p + ph * p + pw;
                                    let u = code(c, pr * p + ph, pc * p + pw);
                                    let want = (u as f32 / 255.0 - cfg.image_mean[c]) / cfg.image_std[c];
                                    let got = out.pixel_values[n * row_len + e];
                                    assert_eq!(got.to_bits(), want.to_bits(), "n={n} e={e}");
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn patch_layout_matches_spec() {
    let plain = ImageConfig { image_mean: [0.0; 3], image_std: [1.0; 3], ..ImageConfig::default() };
    // 56×84: grid 4×6, 2×3 merge blocks; 112×140: grid 8×10.
    check_layout(56, 84, &plain);
    check_layout(112, 140, &plain);
    // Default normalisation (CLIP mean/std) in the same layout.
    check_layout(84, 56, &ImageConfig::default());
    // Other shapes of the same formula: p = 4, T = 3, m = 3 (factor 12).
    let odd = ImageConfig {
        patch_size: 4,
        temporal_patch_size: 3,
        merge_size: 3,
        min_pixels: 144,
        max_pixels: 10_000,
        ..plain.clone()
    };
    check_layout(36, 48, &odd);
    // With the defaults a row is 3·2·14·14 = 1176 long.
    assert_eq!(ImageConfig::default().row_len(), 1176);
}

#[test]
fn preprocess_resizes_then_patchifies() {
    let cfg = ImageConfig::default();
    let img = random_image(1000, 800, 5);
    let out = preprocess(&img, &cfg).unwrap();
    assert_eq!(out.resized, (672, 840));
    assert_eq!(out.grid_thw, [1, 48, 60]);
    assert_eq!(out.num_tokens(2), 720);
    let plain = ImageConfig { image_mean: [0.0; 3], image_std: [1.0; 3], ..cfg };
    let out = preprocess(&img, &plain).unwrap();
    let resized = resize_bicubic(&img, 672, 840);
    // Row 0 is patch (0, 0); row 1 is patch (0, 1); row 2 is patch (1, 0).
    for (n, (pr, pc)) in [(0usize, (0usize, 0usize)), (1, (0, 1)), (2, (1, 0)), (4, (0, 2))] {
        let row = &out.pixel_values[n * 1176..(n + 1) * 1176];
        for c in 0..3 {
            for t in 0..2 {
                for ph in 0..14 {
                    for pw in 0..14 {
                        let u = resized.pixel(pc * 14 + pw, pr * 14 + ph)[c];
                        assert_eq!(row[c * 392 + t * 196 + ph * 14 + pw], u as f32 / 255.0);
                    }
                }
            }
        }
    }
    // Deterministic.
    assert_eq!(preprocess(&img, &plain).unwrap(), out);
}

#[test]
fn preprocess_rejects_bad_rgb_images() {
    let cfg = ImageConfig::default();
    let empty = RgbImage8 { width: 0, height: 0, data: vec![] };
    assert!(input_msg(preprocess(&empty, &cfg)).contains("zero size"));
    let zero_w = RgbImage8 { width: 0, height: 5, data: vec![] };
    assert!(input_msg(preprocess(&zero_w, &cfg)).contains("zero size"));
    let short = RgbImage8 { width: 4, height: 4, data: vec![0; 47] };
    assert!(input_msg(preprocess(&short, &cfg)).contains("needs 48 bytes"));
    let wide = RgbImage8::new(201, 1, vec![0; 603]).unwrap();
    assert!(input_msg(preprocess(&wide, &cfg)).contains("aspect ratio"));
    // A configuration that would blow a small image up past the pixel limit.
    let huge = ImageConfig { min_pixels: 1 << 40, max_pixels: 1 << 41, ..ImageConfig::default() };
    assert!(input_msg(preprocess(&random_image(2, 2, 1), &huge)).contains("more than the limit"));
    let bad_cfg = ImageConfig { patch_size: 0, ..ImageConfig::default() };
    assert!(preprocess(&random_image(56, 56, 1), &bad_cfg).is_err());
}

#[test]
fn one_pixel_image_becomes_56_by_56() {
    let png = encode(
        DynamicImage::ImageRgb8(ImageBuffer::from_pixel(1, 1, Rgb([200u8, 100, 50]))),
        ImageFormat::Png,
    );
    let cfg = ImageConfig::default();
    let out = preprocess_bytes(&png, &cfg, AlphaMode::Drop).unwrap();
    assert_eq!(out.resized, (56, 56));
    assert_eq!(out.grid_thw, [1, 4, 4]);
    // A constant image stays constant through the resize.
    for (c, u) in [200u8, 100, 50].into_iter().enumerate() {
        let want = (u as f32 / 255.0 - cfg.image_mean[c]) / cfg.image_std[c];
        for n in 0..16 {
            assert!(out.pixel_values[n * 1176 + c * 392..n * 1176 + (c + 1) * 392]
                .iter()
                .all(|&v| v == want));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Decoding
// ---------------------------------------------------------------------------------------------

#[test]
fn lossless_formats_round_trip() {
    let img = random_image(23, 11, 3);
    for format in [ImageFormat::Png, ImageFormat::Bmp, ImageFormat::Tiff, ImageFormat::WebP] {
        let bytes = encode(rgb_dynamic(&img), format);
        assert_eq!(decode(&bytes, AlphaMode::Drop).unwrap(), img, "{format:?}");
    }
}

#[test]
fn gif_first_frame_with_a_small_palette() {
    // Four colours fit a GIF palette exactly.
    let colours = [[0u8, 0, 0], [255, 0, 0], [10, 200, 30], [255, 255, 255]];
    let mut data = Vec::new();
    for i in 0..12 * 7 {
        data.extend_from_slice(&colours[(i * 7 + i / 5) % 4]);
    }
    let img = RgbImage8::new(12, 7, data).unwrap();
    let gif = encode(rgb_dynamic(&img), ImageFormat::Gif);
    assert_eq!(&gif[..3], b"GIF");
    assert_eq!(decode(&gif, AlphaMode::Drop).unwrap(), img);
}

#[test]
fn jpeg_decodes_close_to_the_source() {
    // A smooth image survives JPEG at quality 100 within a few LSB.
    let mut data = Vec::new();
    for y in 0..48 {
        for x in 0..64 {
            data.extend_from_slice(&[(x * 4) as u8, (y * 5) as u8, ((x + y) * 2) as u8]);
        }
    }
    let img = RgbImage8::new(64, 48, data).unwrap();
    let mut jpg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpg, 100)
        .write_image(&img.data, 64, 48, ExtendedColorType::Rgb8)
        .unwrap();
    let out = decode(&jpg, AlphaMode::Drop).unwrap();
    assert_eq!((out.width, out.height), (64, 48));
    let max_err = out.data.iter().zip(&img.data).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
    assert!(max_err <= 8, "max error {max_err}");
}

#[test]
fn grayscale_is_copied_to_all_channels() {
    let gray = ImageBuffer::<Luma<u8>, _>::from_fn(9, 4, |x, y| Luma([(x * 25 + y) as u8]));
    let png = encode(DynamicImage::ImageLuma8(gray.clone()), ImageFormat::Png);
    let out = decode(&png, AlphaMode::Drop).unwrap();
    for (x, y, p) in gray.enumerate_pixels() {
        assert_eq!(out.pixel(x as usize, y as usize), [p[0]; 3]);
    }
    // A gray JPEG decodes to R = G = B too.
    let mut jpg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpg, 90)
        .write_image(gray.as_raw(), 9, 4, ExtendedColorType::L8)
        .unwrap();
    let out = decode(&jpg, AlphaMode::Drop).unwrap();
    assert!(out.data.chunks(3).all(|p| p[0] == p[1] && p[1] == p[2]));
}

#[test]
fn sixteen_bit_png_follows_pil() {
    // Gray 16-bit opens as PIL mode I;16, and convert("RGB") clamps at 255.
    let vals = [0u16, 100, 255, 256, 1000, 65535];
    let l16 = ImageBuffer::<Luma<u16>, _>::from_raw(6, 1, vals.to_vec()).unwrap();
    let out = decode(&encode(DynamicImage::ImageLuma16(l16), ImageFormat::Png), AlphaMode::Drop).unwrap();
    let want: Vec<u8> = vals.iter().flat_map(|&v| [v.min(255) as u8; 3]).collect();
    assert_eq!(out.data, want);

    // RGB 16-bit: PIL's RGB;16B keeps the high byte.
    let rgb = [0x1234u16, 0xabcd, 0x00ff, 0xff00, 0x8080, 0x7fff];
    let rgb16 = ImageBuffer::<Rgb<u16>, _>::from_raw(2, 1, rgb.to_vec()).unwrap();
    let out = decode(&encode(DynamicImage::ImageRgb16(rgb16), ImageFormat::Png), AlphaMode::Drop).unwrap();
    assert_eq!(out.data, rgb.iter().map(|&v| (v >> 8) as u8).collect::<Vec<_>>());

    // RGBA 16-bit: high bytes, then the alpha mode on the 8-bit values.
    let rgba = [0x6400u16, 0xc8ff, 0x3210, 0x8000];
    let rgba16 = ImageBuffer::<Rgba<u16>, _>::from_raw(1, 1, rgba.to_vec()).unwrap();
    let png = encode(DynamicImage::ImageRgba16(rgba16), ImageFormat::Png);
    assert_eq!(decode(&png, AlphaMode::Drop).unwrap().data, [0x64, 0xc8, 0x32]);
    // a = 0x80 = 128: round((v·128 + 255·127)/255) for v = 100, 200, 50.
    let want: Vec<u8> =
        [100u32, 200, 50].iter().map(|&v| round_div(v * 128 + 255 * 127, 255) as u8).collect();
    assert_eq!(decode(&png, AlphaMode::CompositeWhite).unwrap().data, want);

    // Gray+alpha 16-bit: PIL's LA;16B, high bytes.
    let la16 = ImageBuffer::<LumaA<u16>, _>::from_raw(1, 1, vec![0x9a00, 0xffff]).unwrap();
    let png = encode(DynamicImage::ImageLumaA16(la16), ImageFormat::Png);
    assert_eq!(decode(&png, AlphaMode::CompositeWhite).unwrap().data, [0x9a; 3]);
}

#[test]
fn rgba_drop_and_composite_white() {
    let px = [[10u8, 20, 30, 0], [40, 50, 60, 255], [200, 100, 0, 128], [255, 0, 77, 1], [1, 2, 3, 254]];
    let buf = ImageBuffer::<Rgba<u8>, _>::from_raw(5, 1, px.concat()).unwrap();
    let png = encode(DynamicImage::ImageRgba8(buf.clone()), ImageFormat::Png);
    let drop = decode(&png, AlphaMode::Drop).unwrap();
    assert_eq!(drop.data, px.iter().flat_map(|p| [p[0], p[1], p[2]]).collect::<Vec<_>>());
    // Over white: v·a/255 + 255·(1 − a/255), rounded half up (PIL's integer code gives exactly
    // this; the unit tests check every (v, a)).
    let over = |v: u8, a: u8| round_div(v as u32 * a as u32 + 255 * (255 - a as u32), 255) as u8;
    let want: Vec<u8> =
        px.iter().flat_map(|p| [over(p[0], p[3]), over(p[1], p[3]), over(p[2], p[3])]).collect();
    assert_eq!(decode(&png, AlphaMode::CompositeWhite).unwrap().data, want);
    assert_eq!(&want[..6], &[255, 255, 255, 40, 50, 60]);
    // WebP keeps alpha too.
    let webp = encode(DynamicImage::ImageRgba8(buf), ImageFormat::WebP);
    assert_eq!(decode(&webp, AlphaMode::CompositeWhite).unwrap().data, want);
    // Gray + alpha.
    let la = ImageBuffer::<LumaA<u8>, _>::from_raw(2, 1, vec![100, 128, 7, 0]).unwrap();
    let png = encode(DynamicImage::ImageLumaA8(la), ImageFormat::Png);
    assert_eq!(decode(&png, AlphaMode::Drop).unwrap().data, [100, 100, 100, 7, 7, 7]);
    let g = over(100, 128);
    assert_eq!(decode(&png, AlphaMode::CompositeWhite).unwrap().data, [g, g, g, 255, 255, 255]);
}

#[test]
fn png_trns_transparency_follows_pil_modes() {
    // Truecolour + tRNS: PIL opens mode "RGB", and transformers' convert_to_rgb returns "RGB"
    // images untouched, so even CompositeWhite keeps the colour.
    let rgb = ImageBuffer::<Rgb<u8>, _>::from_raw(2, 1, vec![10, 20, 30, 40, 50, 60]).unwrap();
    let mut chunks = png_chunks(&encode(DynamicImage::ImageRgb8(rgb), ImageFormat::Png));
    let idat = chunks.iter().position(|c| &c.0 == b"IDAT").unwrap();
    chunks.insert(idat, (*b"tRNS", vec![0, 10, 0, 20, 0, 30]));
    let png = png_build(&chunks);
    assert_eq!(decode(&png, AlphaMode::CompositeWhite).unwrap().data, [10, 20, 30, 40, 50, 60]);
    assert_eq!(decode(&png, AlphaMode::Drop).unwrap().data, [10, 20, 30, 40, 50, 60]);
    // Gray + tRNS: PIL mode "L" with transparency; convert("RGBA") makes gray 10 transparent,
    // and the composite turns it white.
    let gray = ImageBuffer::<Luma<u8>, _>::from_raw(2, 1, vec![10, 40]).unwrap();
    let mut chunks = png_chunks(&encode(DynamicImage::ImageLuma8(gray), ImageFormat::Png));
    let idat = chunks.iter().position(|c| &c.0 == b"IDAT").unwrap();
    chunks.insert(idat, (*b"tRNS", vec![0, 10]));
    let png = png_build(&chunks);
    assert_eq!(decode(&png, AlphaMode::CompositeWhite).unwrap().data, [255, 255, 255, 40, 40, 40]);
    assert_eq!(decode(&png, AlphaMode::Drop).unwrap().data, [10, 10, 10, 40, 40, 40]);
}

/// A minimal baseline JPEG with four 8-bit components (CMYK), 8 rows high and 8 columns per
/// entry of `blocks` wide, each 8×8 block flat. Every quantiser is 1, so a flat block with
/// sample value v has DC coefficient 8·(v − 128) and decodes back to v exactly.
fn cmyk_jpeg(blocks: &[[u8; 4]], adobe: bool) -> Vec<u8> {
    let mut out = vec![0xff, 0xd8];
    let mut segment = |marker: u8, body: &[u8]| {
        out.extend_from_slice(&[0xff, marker]);
        out.extend_from_slice(&((body.len() + 2) as u16).to_be_bytes());
        out.extend_from_slice(body);
    };
    if adobe {
        // APP14 "Adobe": version 100, flags 0, 0, transform 0 (CMYK, no colour transform).
        segment(0xee, &[b'A', b'd', b'o', b'b', b'e', 0, 100, 0, 0, 0, 0, 0]);
    }
    let mut dqt = vec![0u8];
    dqt.extend_from_slice(&[1u8; 64]);
    segment(0xdb, &dqt);
    let width = (8 * blocks.len()) as u16;
    let mut sof = vec![8, 0, 8];
    sof.extend_from_slice(&width.to_be_bytes());
    sof.push(4);
    for id in 1..=4u8 {
        sof.extend_from_slice(&[id, 0x11, 0]);
    }
    segment(0xc0, &sof);
    // DC table 0: the 12 categories 0..=11, each with a 4-bit code; canonical codes make the
    // code of category s the 4-bit number s. AC table 0: only EOB, code "0".
    let mut dht = vec![0x00, 0, 0, 0, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    dht.extend(0u8..12);
    dht.extend_from_slice(&[0x10, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x00]);
    segment(0xc4, &dht);
    let mut sos = vec![4];
    for id in 1..=4u8 {
        sos.extend_from_slice(&[id, 0x00]);
    }
    sos.extend_from_slice(&[0, 63, 0]);
    segment(0xda, &sos);
    // Entropy-coded data: per MCU, one block of each component.
    let mut bits: Vec<bool> = Vec::new();
    let put = |v: u32, n: u32, bits: &mut Vec<bool>| {
        for i in (0..n).rev() {
            bits.push((v >> i) & 1 == 1);
        }
    };
    let mut pred = [0i32; 4];
    for block in blocks {
        for c in 0..4 {
            let dc = 8 * (block[c] as i32 - 128);
            let diff = dc - pred[c];
            pred[c] = dc;
            let size = 32 - diff.unsigned_abs().leading_zeros();
            put(size, 4, &mut bits);
            let extra = if diff >= 0 { diff as u32 } else { (diff + (1 << size) - 1) as u32 };
            put(extra, size, &mut bits);
            put(0, 1, &mut bits); // EOB
        }
    }
    while bits.len() % 8 != 0 {
        bits.push(true);
    }
    for byte in bits.chunks(8) {
        let b = byte.iter().fold(0u8, |acc, &bit| (acc << 1) | bit as u8);
        out.push(b);
        if b == 0xff {
            out.push(0);
        }
    }
    out.extend_from_slice(&[0xff, 0xd9]);
    out
}

#[test]
fn cmyk_jpeg_matches_pil_conversion() {
    // PIL decodes a 4-component JPEG as CMYK;I (C = 255 − stored c', …), then cmyk2rgb gives
    // R = (255 − K) − round(C·(255 − K)/255) = k' − round((255 − c')·k'/255) = round(c'·k'/255)
    // (255 is odd, so there is never a tie).
    let pil = |stored: [u8; 4]| -> [u8; 3] {
        let (c, m, y, k) =
            (255 - stored[0] as u32, 255 - stored[1] as u32, 255 - stored[2] as u32, 255 - stored[3] as u32);
        let nk = 255 - k;
        let f = |v: u32| (nk - round_div(v * nk, 255)) as u8;
        [f(c), f(m), f(y)]
    };
    let blocks = [[200u8, 100, 30, 220], [0, 255, 128, 64], [255, 255, 255, 255], [17, 99, 180, 0]];
    for adobe in [true, false] {
        let jpg = cmyk_jpeg(&blocks, adobe);
        let out = decode(&jpg, AlphaMode::Drop).unwrap();
        assert_eq!((out.width, out.height), (32, 8));
        for (b, &stored) in blocks.iter().enumerate() {
            let want = pil(stored);
            for y in 0..8 {
                for x in 0..8 {
                    assert_eq!(out.pixel(b * 8 + x, y), want, "adobe={adobe} block {b} ({x},{y})");
                }
            }
        }
    }
    // One value worked by hand: c' = 200, k' = 220 → 200·220/255 = 172.5490… → 173.
    assert_eq!(pil([200, 100, 30, 220])[0], 173);
}

#[test]
fn unsupported_and_corrupt_bytes_are_input_errors() {
    assert!(input_msg(decode(b"", AlphaMode::Drop)).contains("empty"));
    for text in [
        &b"hello, world: this is a text file\n"[..],
        b"<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"10\" height=\"10\"><rect/></svg>",
        b"<?xml version=\"1.0\"?><svg/>",
        b"%PDF-1.7\n",
        &[0u8; 64],
    ] {
        let m = input_msg(decode(text, AlphaMode::Drop));
        assert!(m.contains("unrecognised image format"), "{m}");
    }
    // A format the image crate knows but we do not decode (ICO header).
    let ico = [0u8, 0, 1, 0, 1, 0, 16, 16, 0, 0, 1, 0, 32, 0, 0, 0, 0, 0, 22, 0, 0, 0];
    let m = input_msg(decode(&ico, AlphaMode::Drop));
    assert!(m.contains("unsupported image format") || m.contains("unrecognised"), "{m}");

    let png = encode(rgb_dynamic(&random_image(30, 20, 9)), ImageFormat::Png);
    let m = input_msg(decode(&png[..png.len() / 2], AlphaMode::Drop));
    assert!(m.contains("PNG"), "{m}");
    let m = input_msg(decode(&png[..20], AlphaMode::Drop));
    assert!(m.contains("PNG"), "{m}");
}

#[test]
fn zero_size_headers_are_refused() {
    // A PNG whose IHDR says width 0.
    let mut chunks = png_chunks(&encode(rgb_dynamic(&random_image(1, 1, 2)), ImageFormat::Png));
    chunks[0].1[0..4].copy_from_slice(&0u32.to_be_bytes());
    let m = input_msg(decode(&png_build(&chunks), AlphaMode::Drop));
    assert!(m.contains("PNG"), "{m}");
    // A BMP whose info header says width 0.
    let mut bmp = encode(rgb_dynamic(&random_image(2, 2, 2)), ImageFormat::Bmp);
    bmp[18..22].copy_from_slice(&0i32.to_le_bytes());
    let m = input_msg(decode(&bmp, AlphaMode::Drop));
    assert!(m.contains("BMP"), "{m}");
}

/// Fuzzing: every prefix and many random corruptions of small valid files decode to an image or
/// an `Error::Input`; nothing panics out of `decode`.
#[test]
fn fuzz_truncated_and_corrupted_inputs() {
    let img = random_image(13, 9, 4);
    let mut rgba = Vec::new();
    for p in img.data.chunks(3) {
        rgba.extend_from_slice(&[p[0], p[1], p[2], p[0] ^ p[2]]);
    }
    let rgba = DynamicImage::ImageRgba8(ImageBuffer::from_raw(13, 9, rgba).unwrap());
    let mut jpg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpg, 80)
        .write_image(&img.data, 13, 9, ExtendedColorType::Rgb8)
        .unwrap();
    let files = [
        ("png", encode(rgba.clone(), ImageFormat::Png)),
        ("jpeg", jpg),
        ("cmyk-jpeg", cmyk_jpeg(&[[1, 2, 3, 4], [250, 9, 80, 7]], true)),
        ("webp", encode(rgba.clone(), ImageFormat::WebP)),
        ("gif", encode(rgba.clone(), ImageFormat::Gif)),
        ("bmp", encode(rgb_dynamic(&img), ImageFormat::Bmp)),
        ("tiff", encode(rgba, ImageFormat::Tiff)),
    ];
    let mut rng = Rng(0x5eed);
    let mut outcomes = (0usize, 0usize);
    let mut check = |name: &str, bytes: &[u8]| match decode(bytes, AlphaMode::CompositeWhite) {
        Ok(img) => {
            assert_eq!(img.data.len(), img.width * img.height * 3, "{name}");
            outcomes.0 += 1;
        }
        Err(Error::Input(_)) => outcomes.1 += 1,
        Err(e) => panic!("{name}: unexpected error kind {e:?}"),
    };
    for (name, file) in &files {
        for len in 0..file.len() {
            check(name, &file[..len]);
        }
        for _ in 0..300 {
            let mut f = file.clone();
            for _ in 0..1 + rng.below(4) {
                let i = rng.below(f.len());
                f[i] = rng.byte();
            }
            check(name, &f);
        }
    }
    for _ in 0..300 {
        let n = rng.below(300);
        let mut g: Vec<u8> = (0..n).map(|_| rng.byte()).collect();
        // Give some of them a real signature so the decoders themselves see garbage.
        let sigs: [&[u8]; 6] =
            [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"BM", b"II*\0", b"RIFF\0\0\0\0WEBPVP8 "];
        let sig = sigs[rng.below(sigs.len())];
        if n > sig.len() && rng.below(2) == 0 {
            g[..sig.len()].copy_from_slice(sig);
        }
        check("garbage", &g);
    }
    eprintln!("fuzz: {} decoded, {} rejected", outcomes.0, outcomes.1);
}

#[test]
fn limits_refuse_before_decoding() {
    // A hostile header: a valid 1×1 PNG whose IHDR claims 60000×60000 (3.6 gigapixels).
    let mut chunks = png_chunks(&encode(rgb_dynamic(&random_image(1, 1, 2)), ImageFormat::Png));
    chunks[0].1[0..4].copy_from_slice(&60_000u32.to_be_bytes());
    chunks[0].1[4..8].copy_from_slice(&60_000u32.to_be_bytes());
    let t = Instant::now();
    let m = input_msg(decode(&png_build(&chunks), AlphaMode::Drop));
    assert!(m.contains("too large") || m.contains("limit"), "{m}");
    assert!(t.elapsed().as_secs_f64() < 1.0);

    let png = encode(rgb_dynamic(&random_image(100, 100, 2)), ImageFormat::Png);
    let few_pixels = DecodeLimits { max_pixels: 9_999, ..DecodeLimits::default() };
    let m = input_msg(decode_with_limits(&png, AlphaMode::Drop, &few_pixels));
    assert!(m.contains("10000 pixels") && m.contains("9999"), "{m}");
    let few_bytes = DecodeLimits { max_bytes: 29_999, ..DecodeLimits::default() };
    let m = input_msg(decode_with_limits(&png, AlphaMode::Drop, &few_bytes));
    assert!(m.contains("30000 bytes"), "{m}");
    assert!(decode_with_limits(
        &png,
        AlphaMode::Drop,
        &DecodeLimits { max_pixels: 10_000, max_bytes: 30_000 }
    )
    .is_ok());

    // The aspect ratio is checked from the header, before the pixels are decoded.
    let wide = encode(rgb_dynamic(&RgbImage8::new(201, 1, vec![9; 603]).unwrap()), ImageFormat::Png);
    let m = input_msg(preprocess_bytes(&wide, &ImageConfig::default(), AlphaMode::Drop));
    assert!(m.contains("aspect ratio"), "{m}");
    let ok = encode(rgb_dynamic(&RgbImage8::new(200, 1, vec![9; 600]).unwrap()), ImageFormat::Png);
    assert_eq!(preprocess_bytes(&ok, &ImageConfig::default(), AlphaMode::Drop).unwrap().resized, (28, 812));
}

/// A 10000×10000 (100-megapixel) RGB PNG is decoded (300 MB) and resized to 756×756.
#[test]
fn hundred_megapixel_png() {
    let (w, h) = (10_000usize, 10_000usize);
    let t = Instant::now();
    let png = {
        let mut raw = vec![0u8; w * h * 3];
        for (y, row) in raw.chunks_exact_mut(w * 3).enumerate() {
            for (x, p) in row.chunks_exact_mut(3).enumerate() {
                p.copy_from_slice(&[(x / 40) as u8, (y / 40) as u8, ((x + y) / 80) as u8]);
            }
        }
        let mut out = Vec::new();
        PngEncoder::new_with_quality(&mut out, CompressionType::Fast, FilterType::Sub)
            .write_image(&raw, w as u32, h as u32, ExtendedColorType::Rgb8)
            .unwrap();
        out
    };
    let encoded = t.elapsed();
    reset_peak_rss();
    let rss_before = peak_rss_mib();
    let t = Instant::now();
    let out = preprocess_bytes(&png, &ImageConfig::default(), AlphaMode::Drop).unwrap();
    let took = t.elapsed();
    assert_eq!(out.resized, (756, 756));
    assert_eq!(out.grid_thw, [1, 54, 54]);
    assert_eq!(out.pixel_values.len(), 54 * 54 * 1176);
    eprintln!(
        "100 MP PNG ({} KB): encode {:.2}s, preprocess {:.2}s; peak RSS {:?} MiB at the start, {:?} MiB \
         during preprocess (process-wide: run alone for a clean figure)",
        png.len() / 1024,
        encoded.as_secs_f64(),
        took.as_secs_f64(),
        rss_before,
        peak_rss_mib()
    );
}

/// The throughput figure: a 4000×3000 JPEG photo-like image, decode + resize + patchify.
#[test]
fn jpeg_4000x3000_timing() {
    let (w, h) = (4000usize, 3000usize);
    let mut rng = Rng(42);
    let mut raw = vec![0u8; w * h * 3];
    for (y, row) in raw.chunks_exact_mut(w * 3).enumerate() {
        for (x, p) in row.chunks_exact_mut(3).enumerate() {
            let n = rng.byte() / 16;
            p.copy_from_slice(&[(x / 16) as u8 ^ n, (y / 12) as u8 + n, ((x * y) / 5000) as u8]);
        }
    }
    let mut jpg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpg, 90)
        .write_image(&raw, w as u32, h as u32, ExtendedColorType::Rgb8)
        .unwrap();
    drop(raw);
    let cfg = ImageConfig::default();
    let mut best = f64::MAX;
    let mut first = None;
    for _ in 0..3 {
        let t = Instant::now();
        let out = preprocess_bytes(&jpg, &cfg, AlphaMode::Drop).unwrap();
        best = best.min(t.elapsed().as_secs_f64());
        // 3000×4000: β = √(12e6/602112) = 4.4643; 3000/β = 672.0, 4000/β = 896.0.
        assert_eq!(out.resized, (672, 896));
        // Deterministic across runs.
        match &first {
            None => first = Some(out),
            Some(f) => assert_eq!(f, &out),
        }
    }
    let t = Instant::now();
    let img = decode(&jpg, AlphaMode::Drop).unwrap();
    let dec = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let _ = preprocess(&img, &cfg).unwrap();
    let rest = t.elapsed().as_secs_f64();
    eprintln!(
        "4000x3000 JPEG ({} KB): preprocess_bytes best of 3 {:.3}s (decode {dec:.3}s, resize+patchify {rest:.3}s)",
        jpg.len() / 1024,
        best
    );
}

#[test]
fn preprocess_many_keeps_order_and_isolates_failures() {
    let cfg = ImageConfig::default();
    let inputs: Vec<Vec<u8>> = vec![
        encode(rgb_dynamic(&random_image(60, 40, 1)), ImageFormat::Png),
        b"not an image".to_vec(),
        encode(rgb_dynamic(&random_image(300, 20, 2)), ImageFormat::Bmp),
        encode(rgb_dynamic(&RgbImage8::new(201, 1, vec![0; 603]).unwrap()), ImageFormat::Png),
        encode(rgb_dynamic(&random_image(1, 1, 3)), ImageFormat::Tiff),
        Vec::new(),
        encode(rgb_dynamic(&random_image(90, 90, 4)), ImageFormat::WebP),
    ];
    let sequential: Vec<_> = inputs.iter().map(|b| preprocess_bytes(b, &cfg, AlphaMode::Drop)).collect();
    for threads in [0, 1, 2, 3, 16] {
        let got = preprocess_many(inputs.clone(), &cfg, AlphaMode::Drop, threads);
        assert_eq!(got.len(), inputs.len());
        for (i, (g, s)) in got.iter().zip(&sequential).enumerate() {
            match (g, s) {
                (Ok(a), Ok(b)) => assert_eq!(a, b, "input {i}"),
                (Err(Error::Input(a)), Err(Error::Input(b))) => assert_eq!(a, b),
                other => panic!("input {i} with {threads} threads: {other:?}"),
            }
        }
        let ok: Vec<bool> = got.iter().map(|r| r.is_ok()).collect();
        assert_eq!(ok, [true, false, true, false, true, false, true]);
    }
    assert!(preprocess_many(Vec::new(), &cfg, AlphaMode::Drop, 4).is_empty());
}

#[test]
fn preprocess_file_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.png");
    assert!(matches!(
        preprocess_file(&missing, &ImageConfig::default(), AlphaMode::Drop),
        Err(Error::Io { .. })
    ));
    let bad = dir.path().join("bad.jpg");
    std::fs::write(&bad, b"<svg/>").unwrap();
    let m = input_msg(preprocess_file(&bad, &ImageConfig::default(), AlphaMode::Drop));
    assert!(m.starts_with(&bad.display().to_string()), "{m}");
    let good = dir.path().join("good.png");
    std::fs::write(&good, encode(rgb_dynamic(&random_image(224, 224, 8)), ImageFormat::Png)).unwrap();
    let out = preprocess_file(&good, &ImageConfig::default(), AlphaMode::Drop).unwrap();
    assert_eq!(out.grid_thw, [1, 16, 16]);
    assert_eq!(out.resized, (224, 224));
}
