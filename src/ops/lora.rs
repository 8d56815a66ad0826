//! `lora_mask`: per-row task selection of the batched LoRA path (docs/MODEL.md §6). The engine
//! computes `t = x·[A_0; A_1; A_2]ᵀ` for all tasks in one GEMM, masks it with this op, then one
//! GEMM with `[B_0 | B_1 | B_2]` accumulates the delta: each row gets exactly its own task's
//! LoRA, whatever the batch mix. Kernel: `kernels/lora.cu`; reference:
//! [`crate::reference::lora_mask`] (and [`crate::reference::lora`], one task's whole delta).

use half::bf16;

use super::{arg, check_aligned, grid_for, THREADS};
use crate::cuda::{DView, DViewMut, Gpu, KernelId, Launch};
use crate::{Error, Result};

/// Shapes the tests run: (tokens, tasks, r). The model's 3 tasks with groups of rank 32 times 1
/// (o, down, the projector), 2 (gate_up) and 3 (qkv) fused projections, vector path, at one
/// token, odd counts and 4097 tokens; a group width that is not a multiple of 8 (scalar path).
pub const CASES: &[(usize, usize, usize)] = &[
    (1, 3, 32),
    (7, 3, 32),
    (4097, 3, 32),
    (333, 3, 32),
    (4097, 3, 64),
    (4097, 3, 96),
    (5, 3, 5),
    (17, 2, 8),
];

/// The model's LoRA shrinks [`lora_shrink`] runs: (`linear::CASES` name, fused parts), each task's
/// group `parts · 32` columns wide (rank 32, 3 tasks).
pub const SHRINK_CASES: &[(&str, usize)] =
    &[("qkv_lora_a", 3), ("o_lora_a", 1), ("gate_up_lora_a", 2), ("down_lora_a", 1)];

/// Zeroes, in place, every `r`-wide column group of each row of `t [T, tasks·r]` except the group
/// of that row's task (`row_task [T]`). A row whose task is ≥ tasks has every group zeroed (no
/// LoRA delta). Kept elements are not touched.
pub fn lora_mask(gpu: &Gpu, t: &mut DViewMut<'_, bf16>, row_task: &DView<'_, u8>, r: usize) -> Result<()> {
    let &[_, cols] = t.shape() else {
        return Err(Error::Shape { op: "lora_mask", msg: format!("t must be 2-D, got {:?}", t.shape()) });
    };
    lora_mask_cols(gpu, t, 0..cols, row_task, r)
}

/// [`lora_mask`] on the column window `cols` of a wider buffer `t [T, ld]` (the `t` of the folded
/// LoRA's `[x | t]`); the other columns are not touched.
pub fn lora_mask_cols(
    gpu: &Gpu,
    t: &mut DViewMut<'_, bf16>,
    cols: std::ops::Range<usize>,
    row_task: &DView<'_, u8>,
    r: usize,
) -> Result<()> {
    let &[tokens, ld] = t.shape() else {
        return Err(Error::Shape { op: "lora_mask", msg: format!("t must be 2-D, got {:?}", t.shape()) });
    };
    let width = cols.len();
    if r == 0 || width == 0 || width % r != 0 || cols.end > ld || tokens == 0 || row_task.shape() != [tokens]
    {
        return Err(Error::Shape {
            op: "lora_mask",
            msg: format!(
                "t {:?} columns {cols:?}, row_task {:?}, r {r}: expected a window of tasks·r columns of t [T, ld], row_task [T] with T, tasks, r > 0",
                t.shape(),
                row_task.shape()
            ),
        });
    }
    let start = t.ptr() + (cols.start * 2) as u64;
    if r % 8 == 0 {
        check_aligned("lora_mask", "t", start, 16)?;
        if ld % 8 != 0 {
            return Err(Error::Shape {
                op: "lora_mask",
                msg: format!("t rows of {ld} elements: the 8-wide path needs a multiple of 8"),
            });
        }
    }
    let tasks = width / r;
    let work = if r % 8 == 0 { tokens * width / 8 } else { tokens * width };
    let (mut tp, mut rp) = (start, row_task.ptr());
    let (mut n, mut k, mut rr, mut l) = (tokens as i64, tasks as i64, r as i64, ld as i64);
    let mut args = [arg(&mut tp), arg(&mut rp), arg(&mut n), arg(&mut k), arg(&mut rr), arg(&mut l)];
    // SAFETY: args match lora_mask_bf16(bf16*, const u8*, int64, int64, int64, int64); the window
    // (columns cols.start.. of rows ld apart) lies inside t's T·ld elements and row_task holds T
    // (checked above); the window's start and rows are aligned for the vector path.
    unsafe {
        gpu.launch(KernelId::LoraMaskBf16, Launch::linear(grid_for(work, THREADS), THREADS as u32), &mut args)
    }
}

/// The stacked LoRA's shrink with its mask: `t [m, n] = x [m, k] · a [n, k]ᵀ`, then in each row
/// every `r`-wide column group but the row's task's zeroed ([`lora_mask`]). Small batches
/// ([`super::linear::shrink_stream`]) run it as one `linear_stream` launch with the mask in its
/// epilogue, the others as [`super::linear`] then [`lora_mask`]: the same bits either way
/// (`lora_shrink_equals_unfused_bitwise`), so a row's t does not depend on its batch.
pub fn lora_shrink(
    gpu: &Gpu,
    x: &DView<'_, bf16>,
    a: &DView<'_, bf16>,
    t: &mut DViewMut<'_, bf16>,
    row_task: &DView<'_, u8>,
    r: usize,
) -> Result<()> {
    if super::linear::shrink_stream_dense(x, a, t) {
        return super::linear::linear_stream_masked(gpu, x, a, t, row_task, r);
    }
    super::linear(gpu, x, a, None, t, false)?;
    lora_mask(gpu, t, row_task, r)
}

/// [`lora_shrink`] within the folded LoRA's input buffer `xt [m, ld]`: x in columns `..k`, t
/// written into the `a.shape()[0]` columns from `k` on, the mask on the first `g` of them (a's
/// padding rows, zero, give the rest) ([`super::linear_cols`] then [`lora_mask_cols`], or one
/// masked `linear_stream` launch).
pub fn lora_shrink_cols(
    gpu: &Gpu,
    xt: &mut DViewMut<'_, bf16>,
    k: usize,
    a: &DView<'_, bf16>,
    g: usize,
    row_task: &DView<'_, u8>,
    r: usize,
) -> Result<()> {
    if super::linear::shrink_stream_cols(xt, k, a, k) {
        return super::linear::linear_stream_cols_masked(gpu, xt, k, a, k, row_task, r, g);
    }
    super::linear_cols(gpu, xt, k, a, k)?;
    lora_mask_cols(gpu, xt, k..k + g, row_task, r)
}
