//! Rotary position embeddings in place on the fused qkv GEMM output: [`mrope`] (the language
//! model's M-RoPE, docs/MODEL.md §7.2) and [`vision_rope`] (the vision tower's 2-D rotary, §5.2).
//! Kernels: `kernels/rope.cu`; references: [`crate::reference::mrope`] and
//! [`crate::reference::vision_rope`].

use half::bf16;

use super::{arg, check_aligned, threads_for_row, MAX_ROW_BLOCKS};
use crate::cuda::{DView, DViewMut, Gpu, KernelId, Launch};
use crate::{Error, Result};

/// M-RoPE shapes the tests run: (tokens, q_heads, kv_heads, head_dim, section). The model
/// (16 + 2 heads of 128, section [16, 24, 24], vector path) at one token, odd counts and 4097
/// tokens; a small vector-path case and a scalar-path one (half = 6).
pub const CASES: &[(usize, usize, usize, usize, [u32; 3])] = &[
    (1, 16, 2, 128, [16, 24, 24]),
    (7, 16, 2, 128, [16, 24, 24]),
    (333, 16, 2, 128, [16, 24, 24]),
    (4097, 16, 2, 128, [16, 24, 24]),
    (5, 4, 2, 16, [2, 3, 3]),
    (9, 2, 1, 12, [2, 2, 2]),
];

/// Vision rotary shapes the tests run: (patches, heads, head_dim). The tower (16 heads of 80) at
/// one patch, odd counts and 4097 patches; a scalar-path case (half = 6).
pub const VISION_CASES: &[(usize, usize, usize)] = &[(1, 16, 80), (257, 16, 80), (4097, 16, 80), (11, 3, 12)];

/// The language model's rotary base (docs/MODEL.md §7.2).
pub const THETA: f64 = 1e6;

/// The language model's M-RoPE sections (frequencies per t, h, w component).
pub const SECTION: [u32; 3] = [16, 24, 24];

/// Largest head_dim the kernels take (cos/sin of half of it sit in shared memory).
const MAX_HEAD_DIM: usize = 4096;

/// `inv_freq[j] = theta^(−2j/head_dim)` for `j < head_dim/2`, computed in f64 and rounded to f32:
/// the table [`mrope`] takes.
pub fn inv_freq(theta: f64, head_dim: usize) -> Vec<f32> {
    (0..head_dim / 2).map(|j| theta.powf(-2.0 * j as f64 / head_dim as f64) as f32).collect()
}

fn shape_err(op: &'static str, msg: String) -> Error {
    Error::Shape { op, msg }
}

/// Validates a rotary launch: `qkv [T, row]` with `row = heads_in_row · head_dim`, and returns
/// (tokens, threads, shared bytes).
fn check_rows(
    op: &'static str,
    qkv: &DViewMut<'_, bf16>,
    heads_in_row: usize,
    rotated_heads: usize,
    head_dim: usize,
) -> Result<(usize, u32, u32)> {
    let &[tokens, row] = qkv.shape() else {
        return Err(shape_err(op, format!("qkv must be 2-D [T, row], got {:?}", qkv.shape())));
    };
    if head_dim == 0 || head_dim % 2 != 0 || head_dim > MAX_HEAD_DIM {
        return Err(shape_err(op, format!("head_dim must be even, in 2..={MAX_HEAD_DIM}, got {head_dim}")));
    }
    if tokens == 0 || rotated_heads == 0 || row != heads_in_row * head_dim {
        return Err(shape_err(
            op,
            format!(
                "qkv {:?}: expected [T, {heads_in_row}·{head_dim} = {}] with T > 0 and heads > 0",
                qkv.shape(),
                heads_in_row * head_dim
            ),
        ));
    }
    if row > i32::MAX as usize {
        return Err(shape_err(op, format!("qkv rows of {row} elements exceed the kernel's int range")));
    }
    let half = head_dim / 2;
    if half % 8 == 0 {
        check_aligned(op, "qkv", qkv.ptr(), 16)?;
    }
    let work = if half % 8 == 0 { rotated_heads * half / 8 } else { rotated_heads * half };
    let threads = threads_for_row(work.max(half));
    Ok((tokens, threads, (2 * half * std::mem::size_of::<f32>()) as u32))
}

/// M-RoPE in place on `qkv [T, (q_heads + 2·kv_heads)·head_dim]` (`[q | k | v]` heads): rotates
/// the q and k heads by `φ_j = pos[sec(j)][t] · inv_freq[j]`, with `pos [3, T]` (planes t, h, w)
/// and `inv_freq [head_dim/2]`; `sec(j)` follows the cumulative `section` (which must sum to
/// head_dim/2). v is not touched. Positions must satisfy |p| < 2^24 (exact in f32); the model's
/// stay below 2^15.
#[allow(clippy::too_many_arguments)]
pub fn mrope(
    gpu: &Gpu,
    qkv: &mut DViewMut<'_, bf16>,
    q_heads: usize,
    kv_heads: usize,
    head_dim: usize,
    pos: &DView<'_, i32>,
    inv_freq: &DView<'_, f32>,
    section: [u32; 3],
) -> Result<()> {
    let (tokens, threads, smem) =
        check_rows("mrope", qkv, q_heads + 2 * kv_heads, q_heads + kv_heads, head_dim)?;
    if q_heads == 0 || kv_heads == 0 {
        return Err(shape_err("mrope", format!("q_heads {q_heads} and kv_heads {kv_heads} must be > 0")));
    }
    if pos.shape() != [3, tokens] || inv_freq.shape() != [head_dim / 2] {
        return Err(shape_err(
            "mrope",
            format!(
                "pos {:?}, inv_freq {:?}: expected pos [3, {tokens}] and inv_freq [{}]",
                pos.shape(),
                inv_freq.shape(),
                head_dim / 2
            ),
        ));
    }
    if section.iter().map(|&s| s as usize).sum::<usize>() != head_dim / 2 {
        return Err(shape_err(
            "mrope",
            format!("section {section:?} does not sum to head_dim/2 = {}", head_dim / 2),
        ));
    }
    let (mut qp, mut pp, mut fp) = (qkv.ptr(), pos.ptr(), inv_freq.ptr());
    let (mut t, mut hq, mut hkv, mut hd) = (tokens as i64, q_heads as i64, kv_heads as i64, head_dim as i64);
    let (mut s0, mut s1) = (section[0] as i64, section[1] as i64);
    let mut args = [
        arg(&mut qp),
        arg(&mut pp),
        arg(&mut fp),
        arg(&mut t),
        arg(&mut hq),
        arg(&mut hkv),
        arg(&mut hd),
        arg(&mut s0),
        arg(&mut s1),
    ];
    let cfg = Launch { smem, ..Launch::linear(tokens.min(MAX_ROW_BLOCKS) as u32, threads) };
    // SAFETY: args match mrope_bf16(bf16*, const i32*, const f32*, int64 × 6); qkv holds
    // T·(Hq+2Hkv)·hd, pos 3·T and inv_freq hd/2 elements (checked above), qkv is aligned for the
    // vector path, and the dynamic shared memory holds the 2·(hd/2) floats the kernel uses.
    unsafe { gpu.launch(KernelId::MropeBf16, cfg, &mut args) }
}

/// The vision tower's rotary in place on `qkv [P, 3·heads·head_dim]` (`[q | k | v]`): rotates
/// the q and k heads by the per-patch `angles [P, head_dim/2]` (from
/// [`crate::reference::vision_rope_angles`], window-permuted like the patches). v is not touched.
pub fn vision_rope(
    gpu: &Gpu,
    qkv: &mut DViewMut<'_, bf16>,
    heads: usize,
    head_dim: usize,
    angles: &DView<'_, f32>,
) -> Result<()> {
    let (tokens, threads, smem) = check_rows("vision_rope", qkv, 3 * heads, 2 * heads, head_dim)?;
    if angles.shape() != [tokens, head_dim / 2] {
        return Err(shape_err(
            "vision_rope",
            format!("angles {:?}: expected [{tokens}, {}]", angles.shape(), head_dim / 2),
        ));
    }
    let (mut qp, mut ap) = (qkv.ptr(), angles.ptr());
    let (mut t, mut h, mut hd) = (tokens as i64, heads as i64, head_dim as i64);
    let mut args = [arg(&mut qp), arg(&mut ap), arg(&mut t), arg(&mut h), arg(&mut hd)];
    let cfg = Launch { smem, ..Launch::linear(tokens.min(MAX_ROW_BLOCKS) as u32, threads) };
    // SAFETY: args match vision_rope_bf16(bf16*, const f32*, int64 × 3); qkv holds T·3H·hd and
    // angles T·hd/2 elements (checked above), qkv is aligned for the vector path, and the dynamic
    // shared memory holds the 2·(hd/2) floats the kernel uses.
    unsafe { gpu.launch(KernelId::VisionRopeBf16, cfg, &mut args) }
}
