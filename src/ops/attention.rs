//! `flash_attn`: `softmax(scale · q·kᵀ + mask) · v` per segment of a packed batch, read straight
//! from the fused q|k|v projection output (no L×L matrix anywhere). Two kernels, one contract:
//! `kernels/attention.cu` (FlashAttention-2 on `mma.sync`, every target) and
//! `kernels/attention_sm90.cu` (FlashAttention-3 structure: TMA, mbarriers, wgmma, warp
//! specialisation; sm_90a builds only). Reference: [`crate::reference::attention`].

use std::ffi::c_void;

use half::bf16;

use cudarc::driver::sys;

use super::check_aligned;
use crate::cuda::{DView, DViewMut, Gpu, KernelId, Launch, CUDA_ARCH};
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

/// Which kernel computes [`flash_attn`]. Both give the same results up to rounding (each is
/// checked against the CPU reference); each is bitwise batch-invariant on its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttnKernel {
    /// FlashAttention-2 on `mma.sync` (`kernels/attention.cu`), with its query tiling: every
    /// target (sm_80, sm_89, sm_90a).
    Fa2(QueryTile),
    /// The Hopper kernel (`kernels/attention_sm90.cu`): only in sm_90a builds. Its schedule is
    /// [`Sm90Schedule::for_shape`] unless given ([`flash_attn_sm90`]); the schedule never
    /// changes a result.
    Sm90,
}

/// How the Hopper kernel's tiles are laid over the GPU (the results are the same bits for every
/// schedule: each tile is computed alone).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sm90Schedule {
    /// One CTA per SM walking the tiles (snake order), else one CTA per tile (the hardware
    /// schedules them).
    pub persistent: bool,
    /// Tile order: (segment, head) outermost, the query blocks of a head next to each other;
    /// else the query block outermost (the heaviest tiles of all heads first).
    pub heads_outer: bool,
    /// The two consumer warpgroups take turns issuing their GEMMs (FA3's ping-pong).
    pub pingpong: bool,
}

impl Sm90Schedule {
    /// Every schedule, for the benchmark.
    pub const ALL: [Sm90Schedule; 8] = {
        let mut all = [Sm90Schedule { persistent: false, heads_outer: false, pingpong: false }; 8];
        let mut i = 0;
        while i < 8 {
            all[i] = Sm90Schedule { persistent: i & 1 == 0, heads_outer: i & 2 != 0, pingpong: i & 4 != 0 };
            i += 1;
        }
        all
    };

    /// The schedule [`flash_attn`] uses: persistent, query blocks outermost, ping-pong: the best
    /// or within noise of the best of the eight on every bench shape (benches/NOTES.md, 2026-12-01).
    pub fn for_shape(_max_seqlen: usize) -> Sm90Schedule {
        Sm90Schedule { persistent: true, heads_outer: false, pingpong: true }
    }

    /// Short name for reports: `p` persistent or `g` grid, then `q` query blocks or `h` heads
    /// outermost, then `+` with ping-pong.
    pub fn name(self) -> String {
        format!(
            "{}{}{}",
            if self.persistent { "p" } else { "g" },
            if self.heads_outer { "h" } else { "q" },
            if self.pingpong { "+" } else { "" }
        )
    }
}

/// Head dims for which [`flash_attn`] uses the Hopper kernel by default in sm_90a builds (else
/// FA2): only where it is correct and at least as fast on every bench shape (benches/NOTES.md).
/// Chosen by head dim (which part of the model calls), never by the batch: the two kernels round
/// differently, so a choice that followed the batch (max_seqlen) would break batch invariance.
/// d 80 stays on FA2: the Hopper kernel is 1.5–2× FA2 on the ViT's full-attention layers but
/// 3–5% slower on its 64-patch windows (adding 80 here is the one change to make it the default).
const SM90_DEFAULT_HEAD_DIMS: &[usize] = &[128];

impl AttnKernel {
    /// Whether this build has the Hopper kernel (the kernels were compiled for sm_90a; such a
    /// build only starts on a compute capability 9.0 device, see `cuda::arch_runs_on`).
    pub fn sm90_built() -> bool {
        CUDA_ARCH == "sm_90a"
    }

    /// Every kernel this build can run, for tests and benchmarks.
    pub fn available() -> Vec<AttnKernel> {
        let mut v: Vec<AttnKernel> = QueryTile::ALL.iter().map(|&t| AttnKernel::Fa2(t)).collect();
        if Self::sm90_built() {
            v.push(AttnKernel::Sm90);
        }
        v
    }

    /// What [`flash_attn`] runs: decided by the build target and the head dim. The FA2 tiling
    /// follows `max_seqlen` (both tilings give the same bits: the same per-row operations).
    pub fn default_for(max_seqlen: usize, head_dim: usize) -> AttnKernel {
        if Self::sm90_built() && SM90_DEFAULT_HEAD_DIMS.contains(&head_dim) {
            AttnKernel::Sm90
        } else {
            AttnKernel::Fa2(QueryTile::for_max_seqlen(max_seqlen))
        }
    }

    /// Short name for reports: `fa2-m64`, `fa2-m128`, `sm90`.
    pub fn name(self) -> &'static str {
        match self {
            AttnKernel::Fa2(QueryTile::M64) => "fa2-m64",
            AttnKernel::Fa2(QueryTile::M128) => "fa2-m128",
            AttnKernel::Sm90 => "sm90",
        }
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

/// 5000 segment lengths, mixed: a tenth empty, a fifth single tokens, a tenth 65–195 tokens
/// (one or two query tiles, unaligned), the rest 0–32.
pub static MIXED_5000: [usize; 5000] = mixed_lengths();

const fn mixed_lengths<const N: usize>() -> [usize; N] {
    let mut v = [0usize; N];
    let mut i = 0;
    while i < N {
        v[i] = match i % 10 {
            0 => 0,
            1 | 2 => 1,
            3 => 65 + (i * 13) % 131,
            _ => (i * 7919) % 33,
        };
        i += 1;
    }
    v
}

/// The cases the GPU tests run: the LM (16:2 GQA, d 128, causal) on single tokens, mixed and
/// tile-unaligned lengths, empty segments, 5000 mixed segments and one 32k document; the ViT
/// (16:16, d 80, non-causal) on 8×8-patch windows (64 patches, plus clipped edge windows) and
/// one whole image; and the two other combinations (d 128 non-causal, d 80 causal) once each.
pub const CASES: &[Case] = &[
    text("text [1]", &[1], None),
    text("text [7, 1, 130]", &[7, 1, 130], None),
    text("text [64, 64]", &[64, 64], None),
    text("text [3, 0, 66, 0]", &[3, 0, 66, 0], None),
    text("text [517, 3, 1000]", &[517, 3, 1000], None),
    text("text [0, 255, 129, 127, 0]", &[0, 255, 129, 127, 0], None),
    text("text [0, 5, 0, 0, 64, 1, 33]", &[0, 5, 0, 0, 64, 1, 33], None),
    text("text 5000 mixed segments", &MIXED_5000, Some(400)),
    text("text [32768]", &[32768], Some(64)),
    vision("vision 48 windows of 64", &[64; 48], None),
    vision("vision windows [64, 32, 16, 64, 8]", &[64, 32, 16, 64, 8], None),
    vision("vision image 3072", &[3072], None),
    Case {
        name: "d128 non-causal [300, 1, 77]",
        heads: 16,
        kv_heads: 2,
        head_dim: 128,
        causal: false,
        segments: &[300, 1, 77],
        sample_rows: None,
    },
    Case {
        name: "d80 causal 4:2 [200, 1, 0, 64]",
        heads: 4,
        kv_heads: 2,
        head_dim: 80,
        causal: true,
        segments: &[200, 1, 0, 64],
        sample_rows: None,
    },
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
///
/// Kernel: [`AttnKernel::default_for`] (the Hopper kernel for d 128 in sm_90a builds, FA2
/// otherwise), with its default schedule; no choice depends on the batch in a way that changes
/// a row's bits.
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
    let kernel = AttnKernel::default_for(max_seqlen, head_dim);
    flash_attn_with(gpu, qkv, out, cu_seqlens, max_seqlen, heads, kv_heads, head_dim, causal, scale, kernel)
}

/// [`flash_attn`] with the kernel chosen by the caller (tests and benchmarks run each of
/// [`AttnKernel::available`]; the results agree up to rounding). The Hopper kernel in a build
/// without it is a shape error, not a silent fallback.
#[allow(clippy::too_many_arguments)]
pub fn flash_attn_with(
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
    kernel: AttnKernel,
) -> Result<()> {
    let shape = (max_seqlen, heads, kv_heads, head_dim, causal, scale);
    run(gpu, qkv, out, cu_seqlens, shape, kernel, None)
}

/// [`flash_attn`] on the Hopper kernel with a given schedule (the benchmark compares them).
#[allow(clippy::too_many_arguments)]
pub fn flash_attn_sm90(
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
    schedule: Sm90Schedule,
) -> Result<()> {
    let shape = (max_seqlen, heads, kv_heads, head_dim, causal, scale);
    run(gpu, qkv, out, cu_seqlens, shape, AttnKernel::Sm90, Some(schedule))
}

/// (max_seqlen, heads, kv_heads, head_dim, causal, scale) of one call.
type Shape = (usize, usize, usize, usize, bool, f32);

fn run(
    gpu: &Gpu,
    qkv: &DView<'_, bf16>,
    out: &mut DViewMut<'_, bf16>,
    cu_seqlens: &DView<'_, i32>,
    (max_seqlen, heads, kv_heads, head_dim, causal, scale): Shape,
    kernel: AttnKernel,
    schedule: Option<Sm90Schedule>,
) -> Result<()> {
    let id = match kernel {
        AttnKernel::Fa2(tile) => tile.kernel(head_dim),
        AttnKernel::Sm90 => sm90_kernel(head_dim),
    };
    let Some(id) = id else {
        return Err(shape_err(format!("head_dim {head_dim} is not supported (128 or 80)")));
    };
    if kernel == AttnKernel::Sm90 && !AttnKernel::sm90_built() {
        return Err(shape_err(format!("the sm90 kernel needs an sm_90a build (this one is {CUDA_ARCH})")));
    }
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

    let AttnKernel::Fa2(tile) = kernel else {
        let sched = schedule.unwrap_or(Sm90Schedule::for_shape(max_seqlen));
        #[rustfmt::skip]
        return launch_sm90(
            gpu, id, qkv, out, cu_seqlens, max_seqlen, heads, kv_heads, head_dim, causal, scale, sched,
        );
    };
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

fn sm90_kernel(head_dim: usize) -> Option<KernelId> {
    match head_dim {
        128 => Some(KernelId::FlashAttnSm90Bf16D128),
        80 => Some(KernelId::FlashAttnSm90Bf16D80),
        _ => None,
    }
}

/// Query rows per tile and keys per K/V tile of the Hopper kernel (`BM`, `BN`), and the rows
/// of one TMA box (a consumer warpgroup's half of a tile).
const SM90_TILE: usize = 128;
const SM90_BOX_ROWS: usize = 64;
/// Threads per CTA of the Hopper kernel: a producer and two consumer warpgroups.
const SM90_THREADS: u32 = 384;

/// Columns per TMA box and the swizzle that goes with them: 64 (128-byte rows) for d 128, 16
/// (32-byte rows) for d 80 (see the kernel's header); K/V ring stages.
fn sm90_layout(head_dim: usize) -> (usize, sys::CUtensorMapSwizzle, usize) {
    if head_dim == 128 {
        (64, sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B, 2)
    } else {
        (16, sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_32B, 3)
    }
}

/// The Hopper kernel's dynamic shared memory: two Q stages, the K and V rings, the mbarriers,
/// 1 KB of alignment slack (197,728 B for d 128, 164,992 B for d 80; the kernel asserts the same).
fn sm90_smem(head_dim: usize) -> usize {
    let (_, _, stages) = sm90_layout(head_dim);
    let tile = SM90_TILE * head_dim * 2;
    tile * (2 + 2 * stages) + 8 * (4 + 4 * stages) + 1024
}

/// Launches the Hopper kernel on arguments `flash_attn_with` has validated.
#[allow(clippy::too_many_arguments)]
fn launch_sm90(
    gpu: &Gpu,
    id: KernelId,
    qkv: &DView<'_, bf16>,
    out: &mut DViewMut<'_, bf16>,
    cu_seqlens: &DView<'_, i32>,
    max_seqlen: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    causal: bool,
    scale: f32,
    sched: Sm90Schedule,
) -> Result<()> {
    let &[tokens, row] = qkv.shape() else { unreachable!("checked by flash_attn_with") };
    // TMA coordinates and the kernel's row indices are 32-bit.
    if tokens > i32::MAX as usize || row > i32::MAX as usize {
        return Err(shape_err(format!("qkv {:?}: over 2^31 rows or columns", qkv.shape())));
    }
    // Work units of the persistent grid. Short mode (every segment ≤ 64 tokens): two segments
    // per tile, one per consumer warpgroup; it gives the same bits per segment as the normal
    // mode (the kernel's header says why), so the choice, made from the batch, changes no row.
    let segments = cu_seqlens.numel() - 1;
    let short_mode = max_seqlen <= SM90_BOX_ROWS;
    let nq = max_seqlen.div_ceil(SM90_TILE);
    let n_tiles = if short_mode { segments.div_ceil(2) * heads } else { nq * heads * segments };
    if n_tiles > i32::MAX as usize {
        return Err(shape_err(format!("{n_tiles} tiles (query blocks × heads × segments): over 2^31")));
    }
    let (box_cols, swizzle, _) = sm90_layout(head_dim);
    // qkv as a 2-D [T, row] bf16 tensor, boxes of 64 rows × box_cols; rows past T read as zeros.
    let mut map = crate::cuda::tma::tma_map_bf16(
        id.symbol(),
        qkv.ptr(),
        row,
        tokens,
        row * 2,
        (box_cols as u32, SM90_BOX_ROWS as u32),
        swizzle,
    )?;

    let smem = sm90_smem(head_dim) as u32;
    gpu.set_max_dynamic_smem(id, smem)?;
    // Persistent: at most one CTA per SM (each needs most of an SM's registers and shared memory).
    let ctas = if sched.persistent { n_tiles.min(gpu.info().sm_count.max(1) as usize) } else { n_tiles };
    let launch = Launch { grid: (ctas as u32, 1, 1), block: (SM90_THREADS, 1, 1), smem };
    let (mut op, mut cp) = (out.ptr(), cu_seqlens.ptr());
    let ints = [
        tokens,
        segments,
        heads,
        kv_heads,
        causal as usize,
        short_mode as usize,
        sched.heads_outer as usize,
        sched.pingpong as usize,
        nq,
        n_tiles,
    ];
    // Each fits i32: tokens and n_tiles checked above, the rest by flash_attn_with's limits.
    let mut ints: Vec<i32> = ints.iter().map(|&x| x as i32).collect();
    let mut scale_log2 = scale * std::f32::consts::LOG2_E;
    let mut args: Vec<*mut c_void> = vec![
        &mut map as *mut sys::CUtensorMap as *mut c_void,
        &mut op as *mut u64 as *mut c_void,
        &mut cp as *mut u64 as *mut c_void,
    ];
    args.extend(ints.iter_mut().map(|x| x as *mut i32 as *mut c_void));
    args.push(&mut scale_log2 as *mut f32 as *mut c_void);
    // SAFETY: args match flash_attn_sm90_bf16_d{128,80}(const TmaMap (128 bytes, by value), bf16*,
    // const int*, int tokens, int segments, int heads, int kv_heads, int causal, int short_mode,
    // int heads_outer, int pingpong, int nq, int n_tiles, float). The tensor map covers exactly qkv (T·row elements); out holds
    // T·heads·head_dim elements, 16-byte aligned; cu_seqlens holds S+1 ints, clamped to [0, T] by
    // the kernel, so every row it stores is < T (loads past T are the TMA's zero fill); the
    // dynamic shared memory limit was raised to `smem` above.
    unsafe { gpu.launch(id, launch, &mut args) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sm90_shared_memory_matches_the_kernel() {
        // The static_assert in kernels/attention_sm90.cu holds the same numbers.
        assert_eq!(sm90_smem(128), 197_728);
        assert_eq!(sm90_smem(80), 164_992);
        // Both fit the 227 KB a Hopper CTA may have.
        assert!(sm90_smem(128) <= 232_448);
    }

    #[test]
    fn kernel_choice_follows_build_and_head_dim_only() {
        for max_seqlen in [1, 64, 65, 4096, 32768] {
            let (d128, d80) =
                (AttnKernel::default_for(max_seqlen, 128), AttnKernel::default_for(max_seqlen, 80));
            assert_eq!(d128 == AttnKernel::Sm90, AttnKernel::sm90_built());
            assert!(matches!(d80, AttnKernel::Fa2(_)));
        }
        assert_eq!(AttnKernel::available().contains(&AttnKernel::Sm90), AttnKernel::sm90_built());
    }

    #[test]
    fn schedules_are_distinct() {
        let names: std::collections::BTreeSet<String> = Sm90Schedule::ALL.iter().map(|s| s.name()).collect();
        assert_eq!(names.len(), Sm90Schedule::ALL.len());
        assert!(Sm90Schedule::ALL.contains(&Sm90Schedule::for_shape(4096)));
    }

    #[test]
    fn mixed_lengths_have_every_kind() {
        let m = &MIXED_5000;
        assert!(m.contains(&0) && m.contains(&1));
        assert!(m.iter().any(|&l| l > SM90_TILE) && m.iter().any(|&l| l > 64 && l < SM90_TILE));
        assert!(m.iter().all(|&l| l < 2 * SM90_TILE));
    }
}
