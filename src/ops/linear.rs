//! `linear`: `y = x·wᵀ (+ bias) (+ y)`, every projection of the model. Reference:
//! [`crate::reference::linear`]. Two implementations behind one contract:
//!
//! - cuBLASLt ([`crate::cuda::Blas::linear`]), every shape;
//! - `linear_stream` (`kernels/linear_stream.cu`), a weight-streaming kernel for small batches
//!   (1 ≤ m ≤ [`STREAM_MAX_M`] tokens, sm_90a builds): each CTA owns a slice of output features
//!   and all of k behind a TMA-fed ring of long slots, on wgmma with both operands in shared
//!   memory. It gives cuBLASLt's bits (`linear_stream_equals_cublas_bitwise`: 0 of 71 million
//!   elements differ over every model shape and form, H200). It is **slower than cuBLASLt on
//!   every model shape** when both are timed as graphs of back-to-back launches (H200,
//!   2026-12-02: qkv 1,329 against 1,741 GB/s at m = 16, down 1,457 against 2,497; the seventh
//!   session's wins came from timing single launches, which measured cuBLASLt's host cost), so it
//!   is **off by default** (`JV4_LINEAR_STREAM=1` for the main projections,
//!   `JV4_LORA_SHRINK_STREAM=1` for the LoRA shrinks with their mask fused, [`shrink_stream`]).
//!
//! Batch invariance: the kernel never splits K (one f32 accumulator per output, wgmma k16 steps
//! from k = 0 upward), the reduction order of cuBLASLt's unsplit algorithms, which the plans keep
//! to, and it rounds in its epilogue as cuBLASLt does; so the op may pick either by m and a
//! request's vectors do not change with its batch. The choice depends only on the problem's
//! shape and alignment ([`stream_qualifies`], [`stream_pays`]) and on `$JV4_LINEAR_STREAM`
//! ([`stream_enabled`]).

use std::ffi::c_void;
use std::sync::OnceLock;

use cudarc::driver::sys;
use half::bf16;

use super::arg;
use crate::cuda::tma::tma_map_bf16;
use crate::cuda::{DView, DViewMut, Gpu, KernelId, Launch};
use crate::{Error, Result};

/// Every GEMM shape the model runs, as (name, n, k) of `w [n, k]` (jina-v4 full size: the
/// config's widths, LoRA rank 32 and 3 tasks stacked as `GpuModel::load` prepares them; checked
/// against the full preset's config by `tests/op_cases.rs`). Each shape is listed once, under the
/// first projection that has it.
pub const CASES: &[(&str, usize, usize)] = &[
    // Decoder layer: q+k+v fused (16 + 2·2 heads of 128), o, gate+up fused, down.
    ("qkv", 2560, 2048),
    ("o", 2048, 2048),
    ("gate_up", 22016, 2048),
    ("down", 2048, 11008),
    // Batched LoRA: shrink `x·A_allᵀ` (tasks · fused parts · r rows) and expand `t·B_allᵀ`.
    ("qkv_lora_a", 288, 2048),
    ("qkv_lora_b", 2560, 288),
    ("o_lora_a", 96, 2048), // also the multi-vector projector's
    ("o_lora_b", 2048, 96), // also down's
    ("gate_up_lora_a", 192, 2048),
    ("gate_up_lora_b", 22016, 192),
    ("down_lora_a", 96, 11008),
    // The folded LoRA (`model::gpu::weights`, the default): `[W | B_all]` over `[x | t]`.
    ("qkv_folded", 2560, 2336),
    ("gate_up_folded", 22016, 2240),
    ("down_folded", 2048, 11104),
    // Multi-vector projector (its shrink is o_lora_a's shape).
    ("multi", 128, 2048),
    ("multi_lora_b", 128, 96),
    // Vision tower: patch embedding (3·2·14·14 pixels per patch), block qkv, proj, gate+up
    // fused, down; the merger's two layers over groups of 4 patches.
    ("vision_patch_embed", 1280, 1176),
    ("vision_qkv", 3840, 1280),
    ("vision_proj", 1280, 1280),
    ("vision_gate_up", 6912, 1280), // 2 × 3456: the MLP padded (model::constants::vision_mlp_width)
    ("vision_down", 1280, 3456),
    ("merger_0", 5120, 5120),
    ("merger_2", 2048, 5120),
];

/// Token counts the GEMM tests run each case at: one token, odd sizes, a full batch.
pub const TOKENS: &[usize] = &[1, 7, 129, 1000, 4096];

/// Token counts `jv4-bench ops` times each case at: a short query, a document, a full batch and
/// the largest forward.
pub const BENCH_TOKENS: &[usize] = &[16, 512, 4096, 16384];

/// Token counts `jv4-bench ops` times `linear_stream` at, beside cuBLASLt at the same m.
pub const STREAM_BENCH_TOKENS: &[usize] = &[1, 16, 64];
/// The shapes (`CASES` names) it times them on: the decoder's, plain and folded.
pub const STREAM_BENCH_SHAPES: &[&str] =
    &["qkv", "o", "gate_up", "down", "qkv_folded", "gate_up_folded", "down_folded"];

/// `y [m, n] = x [m, k] · w [n, k]ᵀ (+ bias [n]) (+ y when accumulate)`: `linear_stream` where
/// the shape qualifies, the kernel is the faster one ([`stream_pays`]) and the stream path is
/// on, cuBLASLt otherwise (module documentation).
pub fn linear(
    gpu: &Gpu,
    x: &DView<'_, bf16>,
    w: &DView<'_, bf16>,
    bias: Option<&DView<'_, bf16>>,
    y: &mut DViewMut<'_, bf16>,
    accumulate: bool,
) -> Result<()> {
    if stream_enabled() && dense(x, w, y.ptr(), y.shape()).is_some_and(|o| o.qualifies() && o.pays()) {
        return linear_stream(gpu, x, w, bias, y, accumulate);
    }
    gpu.blas().linear(x, w, bias, y, accumulate)
}

/// [`linear`] into an f32 output with an f32 bias: `y [m, n] (f32) = x·wᵀ (+ bias [n]) (+ y when
/// accumulate)`, the residual adds of the decoder and the vision tower (their residual streams
/// are f32). The bias is f32 because cuBLASLt documents the bias in the output's type
/// ([`crate::cuda::Blas`]). `linear_stream` takes no f32 bias: with one, cuBLASLt runs it.
pub fn linear_f32(
    gpu: &Gpu,
    x: &DView<'_, bf16>,
    w: &DView<'_, bf16>,
    bias: Option<&DView<'_, f32>>,
    y: &mut DViewMut<'_, f32>,
    accumulate: bool,
) -> Result<()> {
    if bias.is_none()
        && stream_enabled()
        && dense(x, w, y.ptr(), y.shape()).is_some_and(|o| o.qualifies() && o.pays())
    {
        return linear_stream_f32(gpu, x, w, y, accumulate);
    }
    gpu.blas().linear_f32(x, w, bias, y, accumulate)
}

/// [`linear`] within one buffer: `xt[:, y_col..y_col + n] = xt[:, ..k] · w [n, k]ᵀ` (`y_col ≥ k`,
/// the other columns untouched). The folded LoRA writes its shrink `t` beside the `x` it reads
/// (`model::gpu::weights`).
pub fn linear_cols(
    gpu: &Gpu,
    xt: &mut DViewMut<'_, bf16>,
    k: usize,
    w: &DView<'_, bf16>,
    y_col: usize,
) -> Result<()> {
    if stream_enabled() && cols(xt, k, w, y_col).is_some_and(|o| o.qualifies() && o.pays()) {
        return linear_stream_cols(gpu, xt, k, w, y_col);
    }
    gpu.blas().linear_cols(xt, k, w, y_col)
}

/// Most tokens `linear_stream` takes. Each CTA reads all of x (from L2) beside its slice of
/// the weights, so x costs `m / F` of the weight traffic (F = 16 to 64 features per CTA): at
/// m = 64 up to 4× the weight bytes on the smallest grids, still under L2's bandwidth; above 64
/// the GEMM is no longer a pure weight read and cuBLAS's large tiles take over.
pub const STREAM_MAX_M: usize = 64;

/// Whether the stream path is on when `$JV4_LINEAR_STREAM` is unset (the one place to flip it).
/// Off: it gives cuBLASLt's bits but is slower on every shape (graph-timed op bench; the
/// 16-token query 4.96 ms with it against 4.09-4.12 without, H200, 2026-12-02, one call;
/// benches/NOTES.md, eighth session).
const STREAM_DEFAULT: bool = false;

/// Which shapes `linear_stream` takes when `$JV4_LINEAR_STREAM=1`: m ≤ 16, n ≥ 2048, k ≤ 4096
/// (qkv, o, gate_up). The rule came from the seventh session's op bench, which timed single
/// launches and so measured cuBLASLt's host cost: timed as graphs, cuBLASLt is faster on these
/// shapes too (H200, 2026-12-02, m = 16: qkv 1,741 against 1,329 GB/s, o 1,444 against 1,220,
/// gate_up 3,638 against 3,462), which is why the path is off by default. The rule reads the
/// shape alone, never the data or what else runs, and either side gives the same bits, so the
/// engine stays batch-invariant whichever it picks.
pub fn stream_pays(m: usize, n: usize, k: usize) -> bool {
    m <= STREAM_PAYS_MAX_M && n >= 2048 && k <= 4096
}

/// Most tokens at which [`stream_pays`] picks the kernel (measured at 1, 16 and 64).
pub const STREAM_PAYS_MAX_M: usize = 16;

/// k of one W sub-tile, most sub-tiles per ring slot, most ring stages and threads per CTA:
/// `SUB_K`, `MAX_SUBS`, `MAX_STAGES` and `THREADS` of `kernels/linear_stream.cu` (a test checks).
const STREAM_SUB_K: usize = 64;
const STREAM_MAX_SUBS: usize = 8;
const STREAM_MAX_STAGES: usize = 16;
const STREAM_THREADS: u32 = 128;

/// Shared memory the tiling plans with: per SM (an H100/H200 SM has 228 KB, 1 KB of it reserved
/// per CTA) and at most per CTA (the per-block limit is 227 KB).
const STREAM_SMEM_PER_SM: usize = 220 << 10;
const STREAM_SMEM_PER_CTA: usize = 200 << 10;

/// The switch's value for `$JV4_LINEAR_STREAM`: `0` off, `1` on, unset (or anything else) the
/// default.
fn stream_switch(var: Option<&str>) -> bool {
    match var.map(str::trim) {
        Some("0") => false,
        Some("1") => true,
        _ => STREAM_DEFAULT,
    }
}

/// Whether [`linear`], [`linear_f32`] and [`linear_cols`] run `linear_stream` where the shape
/// qualifies and pays: only with `$JV4_LINEAR_STREAM=1` (read once per process; see
/// `STREAM_DEFAULT`), on sm_90a builds.
pub fn stream_enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| stream_built() && stream_switch(std::env::var("JV4_LINEAR_STREAM").ok().as_deref()))
}

/// Whether this build has the kernel's body: it is wgmma, sm_90a only (elsewhere it traps).
pub fn stream_built() -> bool {
    crate::cuda::CUDA_ARCH == "sm_90a"
}

/// The dispatch rule: whether `linear_stream` takes `y [m, ·] = x [m, ·] · w [n, k]ᵀ` with x's
/// rows `ldx` and y's `ldy` elements apart and x, w, y at addresses `ptrs`. 1 ≤ m ≤
/// [`STREAM_MAX_M`], k a positive multiple of 16 (the kernel's k16 steps), 16-byte aligned
/// pointers and row strides a multiple of 8 elements (its 16-byte copies). Nothing else
/// decides: not the data, not the device, not what else runs.
pub fn stream_qualifies(m: usize, n: usize, k: usize, ldx: usize, ldy: usize, ptrs: [u64; 3]) -> bool {
    let int = i32::MAX as usize;
    (1..=STREAM_MAX_M).contains(&m)
        && (1..=int).contains(&n)
        && (16..=int).contains(&k)
        && k % 16 == 0
        && ldx >= k
        && ldy >= n
        && ldx % 8 == 0
        && ldy % 8 == 0
        && ptrs.iter().all(|p| p % 16 == 0)
}

/// How `linear_stream` runs one problem: output features per CTA (`rows`, the kernel's F: 16,
/// 32 or 64), ring stages, 64-column sub-tiles per stage, and the dynamic shared memory they
/// take. The tiling changes only the speed, never the bits (each output is one accumulator over
/// k in order, whatever the tile).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamTile {
    /// Output features per CTA: 16, 32 or 64.
    pub rows: usize,
    /// Slots of the ring, 2 to 16.
    pub stages: usize,
    /// 64-column sub-tiles per slot, 1 to 8 (k per slot: 64·subs).
    pub subs: usize,
    /// Dynamic shared memory per CTA, bytes.
    pub smem: usize,
}

/// The tiling for `m` tokens, `w [n, k]`, on a device of `sms` SMs. Features per CTA: the
/// largest of 64, 32, 16 that still gives two CTAs per SM (fewer x re-reads, same coverage),
/// else 16 (n = 2048: 128 CTAs). Then the longest slot (k per slot: 512, 256, 128, 64) that
/// leaves a ring of three within the shared memory of the CTAs an SM holds when the whole grid
/// is resident, and as many stages as fit (at most 16, no more than k has slots): long runs
/// along each weight row matter more than depth (tools/stream_bw.cu, H200: 1 KB runs with 3
/// in flight stream at 1.7 TB/s, 128-byte runs with 15 in flight at 0.6).
pub fn stream_tile(m: usize, n: usize, k: usize, sms: usize) -> StreamTile {
    let sms = sms.max(1);
    let rows = [64, 32, 16].into_iter().find(|&r| n.div_ceil(r) >= 2 * sms).unwrap_or(16);
    // CTAs an SM holds at once: the whole grid where it is small (every decoder shape), at most
    // 4 (a wider n runs in waves; 4 leaves every tiling a ring).
    let per_sm = n.div_ceil(rows).div_ceil(sms).min(4);
    let budget = (STREAM_SMEM_PER_SM / per_sm).min(STREAM_SMEM_PER_CTA);
    let tile = |subs: usize| {
        let slot = stream_slot(m, rows, subs);
        let fixed = STREAM_SMEM_ALIGN + stream_slack(m) + STREAM_BAR_BYTES;
        let stages = (budget.saturating_sub(fixed) / slot)
            .min(STREAM_MAX_STAGES)
            .min(k.div_ceil(subs * STREAM_SUB_K).max(2));
        StreamTile { rows, stages, subs, smem: stages * slot + fixed }
    };
    // Longest slot first: the first with two slots in flight while one is read, else the first
    // with a ring at all. subs = 1 always has one: a slot is at most 2·64·128 bytes, the slack
    // and alignment 8 KB, the budget at least 55 KB.
    let subs = [8, 4, 2, 1];
    debug_assert_eq!(subs[0], STREAM_MAX_SUBS);
    let fits = |min: usize| subs.into_iter().map(tile).find(|t| t.stages >= min);
    fits(3).or_else(|| fits(2)).expect("a one-sub-tile ring fits every budget")
}

/// The tiling a launch takes: [`stream_tile`], or `$JV4_STREAM_TILE`'s where set and valid.
pub fn stream_launch_tile(m: usize, n: usize, k: usize, sms: usize) -> StreamTile {
    stream_tile_env(m).unwrap_or_else(|| stream_tile(m, n, k, sms))
}

/// `$JV4_STREAM_TILE=rows,subs,stages` (research: a tiling sweep in one process, e.g.
/// `jv4-bench ops --only linear_stream`): that tiling for every problem, where it is a valid
/// one (rows 16, 32 or 64, subs 1, 2, 4 or 8, 2 to 16 stages, within one CTA's shared memory);
/// read once per process. The tiling never changes the bits, only the speed.
fn stream_tile_env(m: usize) -> Option<StreamTile> {
    static TILE: OnceLock<Option<[usize; 3]>> = OnceLock::new();
    let [rows, subs, stages] = (*TILE.get_or_init(|| {
        let v = std::env::var("JV4_STREAM_TILE").ok()?;
        let p: Vec<usize> = v.split(',').map(|x| x.trim().parse().ok()).collect::<Option<_>>()?;
        p.try_into().ok()
    }))?;
    let smem = stages * stream_slot(m, rows, subs) + STREAM_SMEM_ALIGN + stream_slack(m) + STREAM_BAR_BYTES;
    let valid = [16, 32, 64].contains(&rows)
        && [1, 2, 4, 8].contains(&subs)
        && (2..=STREAM_MAX_STAGES).contains(&stages)
        && smem <= STREAM_SMEM_PER_CTA;
    valid.then_some(StreamTile { rows, stages, subs, smem })
}

/// The kernel aligns its shared-memory base to 1 KB (the 128-byte swizzle's atoms): the tiling
/// adds that much to the ring.
const STREAM_SMEM_ALIGN: usize = 1024;

/// The kernel's mbarriers (one per slot, 8 bytes, room for `STREAM_MAX_STAGES`) after the ring
/// and the slack: `BAR_BYTES` of `kernels/linear_stream.cu`.
const STREAM_BAR_BYTES: usize = 128;

/// Bytes of one ring slot of the kernel: the W tile (`subs` sub-tiles of `rows` rows of 128
/// bytes) and the x tile (`subs` sub-tiles of 8·ceil(m / 8) rows of 128 bytes), both swizzled.
fn stream_slot(m: usize, rows: usize, subs: usize) -> usize {
    subs * (rows + m.div_ceil(8) * 8) * STREAM_SUB_K * 2
}

/// Bytes past the ring the kernel may read: wgmma's A descriptor spans 64 token rows of an x
/// sub-tile, of which only 8·ceil(m / 8) are x (the rest only reach accumulator rows that are
/// never stored, but the reads must stay inside the allocation).
fn stream_slack(m: usize) -> usize {
    (64 - m.div_ceil(8) * 8) * STREAM_SUB_K * 2
}

/// One `linear_stream` problem: x `[m, ·]` (k columns read, rows `ldx` apart), w `[n, k]`, y
/// `[m, ·]` (n columns written, rows `ldy` apart), as device addresses.
#[derive(Clone, Copy, Debug)]
struct Stream {
    x: u64,
    ldx: usize,
    w: u64,
    y: u64,
    ldy: usize,
    m: usize,
    n: usize,
    k: usize,
}

impl Stream {
    fn qualifies(&self) -> bool {
        stream_qualifies(self.m, self.n, self.k, self.ldx, self.ldy, [self.x, self.w, self.y])
    }

    fn pays(&self) -> bool {
        stream_pays(self.m, self.n, self.k)
    }
}

/// The problem of a dense `x [m, k] · w [n, k]ᵀ -> y [m, n]`, if the shapes agree.
fn dense(x: &DView<'_, bf16>, w: &DView<'_, bf16>, y: u64, y_shape: &[usize]) -> Option<Stream> {
    let (&[m, k], &[n, k2]) = (x.shape(), w.shape()) else { return None };
    (k == k2 && y_shape == [m, n]).then_some(Stream { x: x.ptr(), ldx: k, w: w.ptr(), y, ldy: n, m, n, k })
}

/// The problem of [`linear_cols`], if the shapes agree (`y_col ≥ k`, `y_col + n ≤ ld`).
fn cols(xt: &DViewMut<'_, bf16>, k: usize, w: &DView<'_, bf16>, y_col: usize) -> Option<Stream> {
    let (&[m, ld], &[n, kw]) = (xt.shape(), w.shape()) else { return None };
    let y = xt.ptr() + (y_col * std::mem::size_of::<bf16>()) as u64;
    (k == kw && y_col >= k && y_col + n <= ld).then_some(Stream {
        x: xt.ptr(),
        ldx: ld,
        w: w.ptr(),
        y,
        ldy: ld,
        m,
        n,
        k,
    })
}

fn stream_shape_err(msg: String) -> Error {
    Error::Shape { op: "linear_stream", msg }
}

/// [`dense`], or the shape error that names what was given.
fn dense_problem(x: &DView<'_, bf16>, w: &DView<'_, bf16>, y: u64, y_shape: &[usize]) -> Result<Stream> {
    dense(x, w, y, y_shape).ok_or_else(|| {
        stream_shape_err(format!(
            "x {:?} · w {:?}ᵀ -> y {y_shape:?}: expected x [m, k], w [n, k], y [m, n]",
            x.shape(),
            w.shape()
        ))
    })
}

/// [`cols`], or the shape error that names what was given.
fn cols_problem(xt: &DViewMut<'_, bf16>, k: usize, w: &DView<'_, bf16>, y_col: usize) -> Result<Stream> {
    cols(xt, k, w, y_col).ok_or_else(|| {
        stream_shape_err(format!(
            "xt {:?}: columns ..{k} · w {:?}ᵀ -> columns {y_col}..: expected w [n, k], k ≤ y_col, \
             y_col + n ≤ xt's row",
            xt.shape(),
            w.shape()
        ))
    })
}

/// [`linear`] through the weight-streaming kernel alone (no cuBLAS fallback): an
/// [`Error::Shape`] when the problem does not qualify ([`stream_qualifies`]).
pub fn linear_stream(
    gpu: &Gpu,
    x: &DView<'_, bf16>,
    w: &DView<'_, bf16>,
    bias: Option<&DView<'_, bf16>>,
    y: &mut DViewMut<'_, bf16>,
    accumulate: bool,
) -> Result<()> {
    let o = dense_problem(x, w, y.ptr(), y.shape())?;
    if let Some(b) = bias {
        if b.shape() != [o.n] {
            return Err(stream_shape_err(format!("bias {:?}, expected [{}]", b.shape(), o.n)));
        }
    }
    launch_stream(gpu, o, bias.map(|b| b.ptr()), false, accumulate, None)
}

/// [`linear_f32`] through the weight-streaming kernel alone: an [`Error::Shape`] when the
/// problem does not qualify.
pub fn linear_stream_f32(
    gpu: &Gpu,
    x: &DView<'_, bf16>,
    w: &DView<'_, bf16>,
    y: &mut DViewMut<'_, f32>,
    accumulate: bool,
) -> Result<()> {
    let o = dense_problem(x, w, y.ptr(), y.shape())?;
    launch_stream(gpu, o, None, true, accumulate, None)
}

/// [`linear_cols`] through the weight-streaming kernel alone: an [`Error::Shape`] when the
/// problem does not qualify.
pub fn linear_stream_cols(
    gpu: &Gpu,
    xt: &mut DViewMut<'_, bf16>,
    k: usize,
    w: &DView<'_, bf16>,
    y_col: usize,
) -> Result<()> {
    let o = cols_problem(xt, k, w, y_col)?;
    launch_stream(gpu, o, None, false, false, None)
}

/// The LoRA shrink's mask in the kernel's epilogue (`lora_mask`'s rule): of row i only the
/// columns `c` with `c / group == row_task[i]` keep the product, the others are written +0.0.
#[derive(Clone, Copy, Debug)]
struct Mask {
    row_task: u64,
    group: usize,
    /// Columns the mask covers (the first ones; those past it, a padded shrink's zero columns,
    /// keep the product as `lora_mask_cols` leaves them).
    cols: usize,
}

fn mask_of(row_task: &DView<'_, u8>, m: usize, n: usize, group: usize, cols: usize) -> Result<Mask> {
    if row_task.shape() != [m] || group == 0 || cols == 0 || cols > n || cols % group != 0 {
        return Err(stream_shape_err(format!(
            "row_task {:?} for {m} rows, a mask of {cols} of {n} columns in groups of {group}: \
             expected row_task [m] and whole groups within the output",
            row_task.shape()
        )));
    }
    Ok(Mask { row_task: row_task.ptr(), group, cols })
}

/// `t [m, n] = mask(x [m, k] · a [n, k]ᵀ)` through the weight-streaming kernel alone, the mask
/// (`ops::lora_mask`'s, by `row_task [m]` and `group` columns per task) applied in its epilogue:
/// the same bits as [`linear`] then [`super::lora_mask`] (`lora_shrink_equals_unfused_bitwise`).
/// An [`Error::Shape`] when the problem does not qualify.
pub fn linear_stream_masked(
    gpu: &Gpu,
    x: &DView<'_, bf16>,
    a: &DView<'_, bf16>,
    t: &mut DViewMut<'_, bf16>,
    row_task: &DView<'_, u8>,
    group: usize,
) -> Result<()> {
    let o = dense_problem(x, a, t.ptr(), t.shape())?;
    let mask = mask_of(row_task, o.m, o.n, group, o.n)?;
    launch_stream(gpu, o, None, false, false, Some(mask))
}

/// [`linear_stream_masked`] within one buffer, as [`linear_cols`]: `xt[:, y_col..y_col + n] =
/// mask(xt[:, ..k] · a [n, k]ᵀ)` (the folded LoRA's shrink beside its x), the mask on the first
/// `mask_cols` of the n columns (a's padding rows give the others, zeros, untouched).
#[allow(clippy::too_many_arguments)]
pub fn linear_stream_cols_masked(
    gpu: &Gpu,
    xt: &mut DViewMut<'_, bf16>,
    k: usize,
    a: &DView<'_, bf16>,
    y_col: usize,
    row_task: &DView<'_, u8>,
    group: usize,
    mask_cols: usize,
) -> Result<()> {
    let o = cols_problem(xt, k, a, y_col)?;
    let mask = mask_of(row_task, o.m, o.n, group, mask_cols)?;
    launch_stream(gpu, o, None, false, false, Some(mask))
}

/// Whether the LoRA shrink `x [m, k] · a [n, k]ᵀ` (with its mask) runs on `linear_stream`, one
/// launch instead of cuBLASLt's GEMM and `lora_mask`'s: only with `$JV4_LORA_SHRINK_STREAM=1`
/// (research; read once per process), where it qualifies, at m ≤ [`SHRINK_STREAM_MAX_M`] and
/// n ≤ 512 (the shrinks' widths, 96 to 288). **Off by default: it is slower.** H200, 2026-12-02,
/// graph-timed, m = 16: qkv's shrink 7.7 µs against 6.4 for the pair, down's 31.5 against 17.6;
/// the 16-token query 4.67-4.69 ms against 4.09-4.12 (benches/NOTES.md, eighth session). The
/// kernel's one wgmma chain over k runs at ≈ 46 ns per k16 step, cuBLASLt's at ≈ 25-28. Either
/// path gives the same bits (the kernel's are cuBLASLt's, the mask is exact).
pub fn shrink_stream(m: usize, n: usize, k: usize, ldx: usize, ldy: usize, ptrs: [u64; 3]) -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    let on = *ON.get_or_init(|| {
        stream_built() && std::env::var("JV4_LORA_SHRINK_STREAM").is_ok_and(|v| v.trim() == "1")
    });
    on && m <= SHRINK_STREAM_MAX_M && n <= 512 && stream_qualifies(m, n, k, ldx, ldy, ptrs)
}

/// Most tokens at which [`shrink_stream`] takes the shrink.
pub const SHRINK_STREAM_MAX_M: usize = 16;

/// Whether [`shrink_stream`] takes the problem of [`linear_stream_masked`] (false when its shapes
/// do not agree).
pub fn shrink_stream_dense(x: &DView<'_, bf16>, a: &DView<'_, bf16>, t: &DViewMut<'_, bf16>) -> bool {
    dense(x, a, t.ptr(), t.shape())
        .is_some_and(|o| shrink_stream(o.m, o.n, o.k, o.ldx, o.ldy, [o.x, o.w, o.y]))
}

/// Whether [`shrink_stream`] takes the problem of [`linear_stream_cols_masked`] (false when its
/// shapes do not agree).
pub fn shrink_stream_cols(xt: &DViewMut<'_, bf16>, k: usize, a: &DView<'_, bf16>, y_col: usize) -> bool {
    cols(xt, k, a, y_col).is_some_and(|o| shrink_stream(o.m, o.n, o.k, o.ldx, o.ldy, [o.x, o.w, o.y]))
}

/// The kernel for `rows` features per CTA and the output type.
fn stream_kernel(rows: usize, out_f32: bool) -> KernelId {
    match (rows, out_f32) {
        (16, false) => KernelId::LinearStreamR16Bf16,
        (32, false) => KernelId::LinearStreamR32Bf16,
        (64, false) => KernelId::LinearStreamR64Bf16,
        (16, true) => KernelId::LinearStreamR16F32,
        (32, true) => KernelId::LinearStreamR32F32,
        _ => KernelId::LinearStreamR64F32,
    }
}

/// Launches `linear_stream_r{rows}_{bf16,f32}` on a problem whose shapes agree; checks the rest
/// of the contract ([`stream_qualifies`]) first.
fn launch_stream(
    gpu: &Gpu,
    o: Stream,
    bias: Option<u64>,
    out_f32: bool,
    accumulate: bool,
    mask: Option<Mask>,
) -> Result<()> {
    if let Some(mk) = mask {
        if mk.group == 0 || mk.group > i32::MAX as usize || bias.is_some() || accumulate || out_f32 {
            return Err(stream_shape_err(format!(
                "a masked shrink (group {}) takes a plain bf16 output: no bias, no accumulation",
                mk.group
            )));
        }
    }
    if !o.qualifies() {
        return Err(stream_shape_err(format!(
            "m={} n={} k={} ldx={} ldy={} (x {:#x}, w {:#x}, y {:#x}): needs 1 ≤ m ≤ {STREAM_MAX_M}, \
             k a positive multiple of 16, row strides a multiple of 8 and 16-byte aligned operands",
            o.m, o.n, o.k, o.ldx, o.ldy, o.x, o.w, o.y
        )));
    }
    if !stream_built() {
        return Err(stream_shape_err(format!(
            "linear_stream is wgmma, for sm_90a builds (this one is {})",
            crate::cuda::CUDA_ARCH
        )));
    }
    let tile = stream_launch_tile(o.m, o.n, o.k, gpu.info().sm_count.max(1) as usize);
    let id = stream_kernel(tile.rows, out_f32);
    // x's first k columns in boxes of 8·ceil(m / 8) rows × 64, w's in boxes of the tile's rows ×
    // 64, both with the 128-byte swizzle the kernel's descriptors read.
    let sw = sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B;
    let sub = STREAM_SUB_K as u32;
    let mut xmap =
        tma_map_bf16(id.symbol(), o.x, o.k, o.m, o.ldx * 2, (sub, o.m.div_ceil(8) as u32 * 8), sw)?;
    let mut wmap = tma_map_bf16(id.symbol(), o.w, o.k, o.n, o.k * 2, (sub, tile.rows as u32), sw)?;
    gpu.set_max_dynamic_smem(id, tile.smem as u32)?;
    let launch = Launch {
        grid: (o.n.div_ceil(tile.rows) as u32, 1, 1),
        block: (STREAM_THREADS, 1, 1),
        smem: tile.smem as u32,
    };
    let (mut bp, mut yp) = (bias.unwrap_or(0), o.y);
    let mut ldy = o.ldy as i64;
    let (mut m, mut n, mut k) = (o.m as i32, o.n as i32, o.k as i32);
    let (mut acc, mut stages, mut subs) = (accumulate as i32, tile.stages as i32, tile.subs as i32);
    let (mut rt, mut group, mut mask_cols) =
        mask.map_or((0, 1, 0), |mk| (mk.row_task, mk.group as i32, mk.cols as i32));
    let mut args = [
        &mut xmap as *mut sys::CUtensorMap as *mut c_void,
        &mut wmap as *mut sys::CUtensorMap as *mut c_void,
        arg(&mut bp),
        arg(&mut yp),
        arg(&mut ldy),
        arg(&mut m),
        arg(&mut n),
        arg(&mut k),
        arg(&mut acc),
        arg(&mut stages),
        arg(&mut subs),
        arg(&mut rt),
        arg(&mut group),
        arg(&mut mask_cols),
    ];
    // SAFETY: args match linear_stream_r*(TmaMap, TmaMap (128 bytes each, by value), const bf16*,
    // void*, int64, int, int, int, int, int, int, const u8*, int, int). The callers checked the
    // shapes: the maps describe x's m rows of k elements (ldx apart) and w's n·k, which they hold;
    // bias (or null) holds n, y m rows of ldy ≥ n elements of the output type (an f32 y only with
    // out_f32), row_task (or null) m bytes; m, n, k fit i32 and the alignment TMA needs holds
    // (stream_qualifies). The kernel reads rows < m of x, < n of w, columns < k, and writes only
    // y[t, f] for t < m, f < n. The dynamic shared memory limit was raised to `smem` above.
    unsafe { gpu.launch(id, launch, &mut args) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_dispatch_rule() {
        let a = [0x1000u64, 0x2000, 0x3000];
        // The decoder's shapes, dense and folded, at every m up to the limit.
        for &(name, n, k) in CASES {
            for m in [1, 7, 16, 33, 64] {
                let want = k % 16 == 0;
                assert_eq!(stream_qualifies(m, n, k, k, n, a), want, "{name} m={m}");
            }
            assert!(!stream_qualifies(0, n, k, k, n, a), "{name}: m = 0");
            assert!(!stream_qualifies(STREAM_MAX_M + 1, n, k, k, n, a), "{name}: m past the limit");
        }
        // linear_cols: x in the first k columns of [x | t], t written at column k.
        assert!(stream_qualifies(16, 288, 2048, 2336, 2336, [0x1000, 0x2000, 0x1000 + 2048 * 2]));
        // k not a multiple of 16 (the vision patch embedding, 1176), odd strides, misalignment.
        assert!(!stream_qualifies(4, 1280, 1176, 1176, 1280, a));
        assert!(!stream_qualifies(4, 128, 96, 100, 128, a));
        assert!(!stream_qualifies(4, 12, 96, 96, 12, a));
        assert!(!stream_qualifies(4, 128, 96, 96, 128, [0x1008, 0x2000, 0x3000]));
        assert!(!stream_qualifies(4, 128, 96, 96, 128, [0x1000, 0x2002, 0x3000]));
        assert!(!stream_qualifies(4, 128, 96, 96, 128, [0x1000, 0x2000, 0x3004]));
        assert!(!stream_qualifies(4, 128, 96, 64, 128, a), "ldx < k");
        assert!(!stream_qualifies(4, 128, 0, 0, 128, a), "k = 0");
    }

    #[test]
    fn stream_pays_on_the_measured_winners_only() {
        let shape = |name: &str| CASES.iter().find(|c| c.0 == name).map(|c| (c.1, c.2)).unwrap();
        for name in ["qkv", "o", "gate_up", "qkv_folded", "gate_up_folded"] {
            let (n, k) = shape(name);
            for m in [1, 7, 16] {
                assert!(stream_pays(m, n, k), "{name} m={m}");
            }
            assert!(!stream_pays(17, n, k), "{name} m=17");
            assert!(!stream_pays(64, n, k), "{name} m=64");
        }
        for name in ["down", "down_folded", "qkv_lora_a", "o_lora_a", "gate_up_lora_a", "multi"] {
            let (n, k) = shape(name);
            assert!(!stream_pays(16, n, k), "{name}");
        }
    }

    #[test]
    fn stream_switch_reads_zero_and_one() {
        assert!(!stream_switch(Some("0")));
        assert!(!stream_switch(Some(" 0 ")));
        assert!(stream_switch(Some("1")));
        assert_eq!(stream_switch(None), STREAM_DEFAULT);
        assert_eq!(stream_switch(Some("yes")), STREAM_DEFAULT);
    }

    #[test]
    fn stream_tiles_fit_and_cover_the_sms() {
        let sms = 132;
        for &(name, n, k) in CASES {
            for m in 1..=STREAM_MAX_M {
                let t = stream_tile(m, n, k, sms);
                assert!([16, 32, 64].contains(&t.rows), "{name} m={m}: {t:?}");
                assert!((2..=STREAM_MAX_STAGES).contains(&t.stages), "{name} m={m}: {t:?}");
                assert!([1, 2, 4, 8].contains(&t.subs), "{name} m={m}: {t:?}");
                assert!(t.smem <= STREAM_SMEM_PER_CTA, "{name} m={m}: {t:?}");
                let per_sm = n.div_ceil(t.rows).div_ceil(sms).min(4);
                assert!(t.smem * per_sm <= STREAM_SMEM_PER_SM, "{name} m={m}: {per_sm} CTAs per SM of {t:?}");
                let x_tile = t.subs * m.div_ceil(8) * 8 * 128;
                let slack = (64 - m.div_ceil(8) * 8) * 128;
                assert_eq!(
                    t.smem,
                    t.stages * (t.subs * t.rows * 128 + x_tile) + 1024 + slack + 128,
                    "{name} m={m}"
                );
            }
        }
        // A very wide n (a vocabulary head: many waves) still gets a ring, at every m.
        for m in 1..=STREAM_MAX_M {
            let t = stream_tile(m, 151_936, 2048, sms);
            assert!(t.stages >= 2 && t.smem <= STREAM_SMEM_PER_CTA, "m={m}: {t:?}");
        }
        // The decoder's narrowest projections still fill the card; gate_up takes wide tiles.
        assert!(2048usize.div_ceil(stream_tile(16, 2048, 2048, sms).rows) >= 128);
        assert!(2048usize.div_ceil(stream_tile(64, 2048, 11008, sms).rows) >= 128);
        assert_eq!(stream_tile(16, 22016, 2048, sms).rows, 64);
        // Where the grid leaves room, long slots: o and down at m = 16 take 512 columns per slot
        // and keep several in flight.
        for k in [2048, 11008] {
            let t = stream_tile(16, 2048, k, sms);
            assert_eq!(t.subs, 8, "k={k}: {t:?}");
            assert!(t.stages >= 4, "k={k}: {t:?}");
        }
    }

    #[test]
    fn stream_constants_match_the_kernel() {
        let src = include_str!("../../kernels/linear_stream.cu");
        for line in [
            format!("constexpr int SUB_K = {STREAM_SUB_K};"),
            format!("constexpr int MAX_SUBS = {STREAM_MAX_SUBS};"),
            format!("constexpr int MAX_STAGES = {STREAM_MAX_STAGES};"),
            format!("constexpr int THREADS = {STREAM_THREADS};"),
        ] {
            assert!(
                src.lines().any(|l| l.trim().starts_with(&line)),
                "kernels/linear_stream.cu lacks `{line}`"
            );
        }
    }
}
