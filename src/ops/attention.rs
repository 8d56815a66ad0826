//! `flash_attn`: `softmax(scale · q·kᵀ + mask) · v` per segment of a packed batch, read straight
//! from the fused q|k|v projection output, FlashAttention-2 style (no L×L matrix anywhere).
//! Kernel: `kernels/attention.cu`; reference: [`crate::reference::attention`].

use std::ffi::c_void;

use half::bf16;

use super::check_aligned;
use crate::cuda::{DView, DViewMut, Gpu, KernelId, Launch};
use crate::{Error, Result};

/// Keys per k/v tile (`BN` in the kernel).
const BLOCK_N: usize = 64;
/// Threads per CTA (4 warps).
const THREADS: u32 = 128;

/// Query rows per CTA: the kernel's two tilings (`MT` = 1 or 2 m16 tiles per warp).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueryTile {
    /// 64 rows, 16 per warp, the warp's Q fragments held in registers (fewer registers: 3 CTAs
    /// per SM; no wasted rows for the ViT's 64-patch windows).
    M64,
    /// 128 rows, 32 per warp, Q re-read from shared memory (every K/V fragment serves twice the
    /// rows: half the shared-memory and L2 traffic per FLOP; 2 CTAs per SM).
    M128,
}

impl QueryTile {
    /// Both tilings, for tests and benchmarks.
    pub const ALL: [QueryTile; 2] = [QueryTile::M64, QueryTile::M128];

    /// Query rows per CTA.
    pub fn rows(self) -> usize {
        match self {
            QueryTile::M64 => 64,
            QueryTile::M128 => 128,
        }
    }

    /// The tiling [`flash_attn`] uses: 64 rows when no segment is longer (windows), else 128.
    pub fn for_max_seqlen(max_seqlen: usize) -> QueryTile {
        if max_seqlen <= 64 {
            QueryTile::M64
        } else {
            QueryTile::M128
        }
    }

    fn kernel(self, head_dim: usize) -> Option<KernelId> {
        Some(match (head_dim, self) {
            (128, QueryTile::M64) => KernelId::FlashAttnBf16D128M64,
            (128, QueryTile::M128) => KernelId::FlashAttnBf16D128M128,
            (80, QueryTile::M64) => KernelId::FlashAttnBf16D80M64,
            (80, QueryTile::M128) => KernelId::FlashAttnBf16D80M128,
            _ => return None,
        })
    }
}

/// One test/benchmark configuration: the model's two attention shapes over a segment mix.
#[derive(Clone, Copy, Debug)]
pub struct Case {
    /// Short name for messages.
    pub name: &'static str,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Head dim.
    pub head_dim: usize,
    /// Causal mask inside each segment.
    pub causal: bool,
    /// Segment lengths, packed in this order.
    pub segments: &'static [usize],
    /// Check only this many query rows (spread over the batch) against the CPU reference;
    /// `None`: every row.
    pub sample_rows: Option<usize>,
}

const fn text(name: &'static str, segments: &'static [usize], sample_rows: Option<usize>) -> Case {
    Case { name, heads: 16, kv_heads: 2, head_dim: 128, causal: true, segments, sample_rows }
}
const fn vision(name: &'static str, segments: &'static [usize], sample_rows: Option<usize>) -> Case {
    Case { name, heads: 16, kv_heads: 16, head_dim: 80, causal: false, segments, sample_rows }
}

/// The cases the GPU tests run: the LM (16:2 GQA, d 128, causal) on single tokens, mixed and
/// tile-unaligned lengths, an empty segment and one 32k document; the ViT (16:16, d 80,
/// non-causal) on 8×8-patch windows (64 patches, plus clipped edge windows) and one whole image.
pub const CASES: &[Case] = &[
    text("text [1]", &[1], None),
    text("text [7, 1, 130]", &[7, 1, 130], None),
    text("text [64, 64]", &[64, 64], None),
    text("text [3, 0, 66, 0]", &[3, 0, 66, 0], None),
    text("text [517, 3, 1000]", &[517, 3, 1000], None),
    text("text [32768]", &[32768], Some(64)),
    vision("vision 48 windows of 64", &[64; 48], None),
    vision("vision windows [64, 32, 16, 64, 8]", &[64, 32, 16, 64, 8], None),
    vision("vision image 3072", &[3072], None),
];

/// `cu_seqlens` (`[0, e₁, …, T]`) of a list of segment lengths.
pub fn cu_seqlens(segments: &[usize]) -> Vec<i32> {
    let mut cu = Vec::with_capacity(segments.len() + 1);
    let mut end = 0i32;
    cu.push(0);
    for &s in segments {
        end += i32::try_from(s).expect("segment length fits i32");
        cu.push(end);
    }
    cu
}

fn shape_err(msg: String) -> Error {
    Error::Shape { op: "flash_attn", msg }
}

/// Packed varlen attention, `out [T, heads·head_dim] = attention(q, k, v)` with q, k, v read
/// from `qkv [T, (heads + 2·kv_heads)·head_dim]`: q of head `h` at columns
/// `[h·d, (h+1)·d)`, k of kv head `g` at `[(heads + g)·d, …)`, v at `[(heads + kv_heads + g)·d, …)`.
///
/// - Segments: `cu_seqlens [S+1]` = `[0, e₁, …, T]`, non-decreasing; no token attends across a
///   segment boundary; empty segments are allowed. `max_seqlen` must be at least the longest
///   segment (rows past it are not written) and sizes the grid.
/// - `causal`: key index ≤ query index within the segment. GQA: query head `h` reads kv head
///   `h / (heads / kv_heads)`.
/// - `head_dim` 128 (the LM) or 80 (the ViT); `scale` > 0 (normally `1/√head_dim`).
///
/// The kernel trusts `cu_seqlens` (device data): values are clamped to `[0, T]`, so a bad table
/// gives wrong rows, never out-of-bounds accesses.
#[allow(clippy::too_many_arguments)]
pub fn flash_attn(
    gpu: &Gpu,
    qkv: &DView<'_, bf16>,
    out: &mut DViewMut<'_, bf16>,
    cu_seqlens: &DView<'_, i32>,
    max_seqlen: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    causal: bool,
    scale: f32,
) -> Result<()> {
    let tile = QueryTile::for_max_seqlen(max_seqlen);
    flash_attn_tiled(gpu, qkv, out, cu_seqlens, max_seqlen, heads, kv_heads, head_dim, causal, scale, tile)
}

/// [`flash_attn`] with the query tiling chosen by the caller (tests and benchmarks run both;
/// the results agree up to rounding).
#[allow(clippy::too_many_arguments)]
pub fn flash_attn_tiled(
    gpu: &Gpu,
    qkv: &DView<'_, bf16>,
    out: &mut DViewMut<'_, bf16>,
    cu_seqlens: &DView<'_, i32>,
    max_seqlen: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    causal: bool,
    scale: f32,
    tile: QueryTile,
) -> Result<()> {
    let Some(id) = tile.kernel(head_dim) else {
        return Err(shape_err(format!("head_dim {head_dim} is not supported (128 or 80)")));
    };
    if heads == 0 || kv_heads == 0 || heads % kv_heads != 0 || heads > 65535 {
        return Err(shape_err(format!(
            "{heads} heads, {kv_heads} kv heads: need heads a positive multiple of kv_heads, at most 65535"
        )));
    }
    let row = (heads + 2 * kv_heads) * head_dim;
    let &[tokens, qkv_cols] = qkv.shape() else {
        return Err(shape_err(format!("qkv must be 2-D [T, {row}], got {:?}", qkv.shape())));
    };
    if qkv_cols != row || out.shape() != [tokens, heads * head_dim] {
        return Err(shape_err(format!(
            "qkv {:?} -> out {:?}: expected qkv [T, (heads + 2·kv_heads)·head_dim = {row}] -> out [T, {}]",
            qkv.shape(),
            out.shape(),
            heads * head_dim
        )));
    }
    let &[n_cu] = cu_seqlens.shape() else {
        return Err(shape_err(format!("cu_seqlens must be 1-D [S+1], got {:?}", cu_seqlens.shape())));
    };
    let segments = n_cu.saturating_sub(1);
    if segments == 0 || segments > 65535 {
        return Err(shape_err(format!(
            "cu_seqlens has {n_cu} entries: need 2 to 65536 (1 to 65535 segments)"
        )));
    }
    if !(scale.is_finite() && scale > 0.0) {
        return Err(shape_err(format!("scale {scale} must be finite and positive")));
    }
    if tokens == 0 {
        return Ok(());
    }
    if max_seqlen == 0 || max_seqlen > tokens || max_seqlen > i32::MAX as usize {
        return Err(shape_err(format!("max_seqlen {max_seqlen} must be in 1..={tokens} (T)")));
    }
    check_aligned("flash_attn", "qkv", qkv.ptr(), 16)?;
    check_aligned("flash_attn", "out", out.ptr(), 16)?;
    check_aligned("flash_attn", "cu_seqlens", cu_seqlens.ptr(), 4)?;

    // Q, K and V tiles in smem, rows padded by 8 elements: (BM + 128)·(d + 8)·2 bytes, 52,224 /
    // 69,632 B for d 128 and 33,792 / 45,056 B for d 80 (BM 64 / 128).
    let smem = ((tile.rows() + 2 * BLOCK_N) * (head_dim + 8) * 2) as u32;
    gpu.set_max_dynamic_smem(id, smem)?;
    let launch = Launch {
        grid: (max_seqlen.div_ceil(tile.rows()) as u32, heads as u32, segments as u32),
        block: (THREADS, 1, 1),
        smem,
    };
    let (mut qp, mut op, mut cp) = (qkv.ptr(), out.ptr(), cu_seqlens.ptr());
    let (mut t, mut r) = (tokens as i64, row as i64);
    let (mut h, mut kvh, mut c) = (heads as i32, kv_heads as i32, causal as i32);
    let mut scale_log2 = scale * std::f32::consts::LOG2_E;
    let mut args = [
        &mut qp as *mut u64 as *mut c_void,
        &mut op as *mut u64 as *mut c_void,
        &mut cp as *mut u64 as *mut c_void,
        &mut t as *mut i64 as *mut c_void,
        &mut r as *mut i64 as *mut c_void,
        &mut h as *mut i32 as *mut c_void,
        &mut kvh as *mut i32 as *mut c_void,
        &mut c as *mut i32 as *mut c_void,
        &mut scale_log2 as *mut f32 as *mut c_void,
    ];
    // SAFETY: args match flash_attn_bf16_d{128,80}_m{64,128}(const bf16*, bf16*, const int*, int64, int64,
    // int, int, int, float). qkv holds T·row and out T·heads·head_dim elements, 16-byte aligned
    // (checked above); cu_seqlens holds S+1 ints and the kernel clamps its values to [0, T], so
    // every row it touches is < T; the dynamic shared memory limit was raised to `smem` above.
    unsafe { gpu.launch(id, launch, &mut args) }
}
