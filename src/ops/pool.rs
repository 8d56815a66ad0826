//! Output heads (docs/MODEL.md §8): [`mean_pool_l2`] (single-vector: span mean, then L2) and
//! [`l2_rows`] (multi-vector: per-token L2). Kernels: `kernels/pool.cu`; references:
//! [`crate::reference::mean_pool_l2`] and [`crate::reference::l2_rows`].

use half::bf16;

use super::{arg, check_aligned, grid_for, threads_for_row, MAX_ROW_BLOCKS, THREADS};
use crate::cuda::{DView, DViewMut, Gpu, KernelId, Launch};
use crate::{Error, Result};

/// Pooling shapes the tests run: (tokens, dim, span lengths). The model's 2048 (vector path) with
/// one one-token span, one 4097-row span, a batch of mixed odd spans; a scalar-path dim.
pub const CASES: &[(usize, usize, &[usize])] = &[
    (1, 2048, &[1]),
    (4097, 2048, &[4097]),
    (1200, 2048, &[1, 7, 333, 2, 857]),
    (40, 100, &[3, 1, 36]),
    (13, 8, &[13]),
];

/// Per-token L2 shapes the tests run: (tokens, dim). The multi-vector head's 128 at one token,
/// odd counts and 4097 tokens; a dim that is not a multiple of 32.
pub const L2_CASES: &[(usize, usize)] = &[(1, 128), (7, 128), (4097, 128), (5, 100)];

/// `out [B, d]`: for each span `(s, e)` of `spans [B, 2]` (rows `[s, e)` of `h [T, d]`), the mean
/// of those rows, L2-normalised (`v / max(‖v‖, 1e-12)`), in f32. Each span's result is
/// bit-identical whatever else is in the batch.
///
/// Spans must be non-empty and inside `h` (`s < e ≤ T`): the engine validates them on the host
/// before this launch. The kernel never reads out of bounds all the same: an invalid span gets a
/// row of NaN.
pub fn mean_pool_l2(
    gpu: &Gpu,
    h: &DView<'_, bf16>,
    spans: &DView<'_, u32>,
    out: &mut DViewMut<'_, f32>,
) -> Result<()> {
    let (&[tokens, dim], &[batch, 2]) = (h.shape(), spans.shape()) else {
        return Err(Error::Shape {
            op: "mean_pool_l2",
            msg: format!("expected h [T, d] and spans [B, 2], got {:?} and {:?}", h.shape(), spans.shape()),
        });
    };
    if out.shape() != [batch, dim] || tokens == 0 || dim == 0 || batch == 0 || tokens > u32::MAX as usize {
        return Err(Error::Shape {
            op: "mean_pool_l2",
            msg: format!(
                "h {:?}, spans {:?} -> out {:?}: expected out [B, d] with T, d, B > 0 and T < 2^32",
                h.shape(),
                spans.shape(),
                out.shape()
            ),
        });
    }
    if dim % 8 == 0 {
        check_aligned("mean_pool_l2", "h", h.ptr(), 16)?;
        check_aligned("mean_pool_l2", "out", out.ptr(), 16)?;
    }
    // From d only: the reduction order must not depend on the batch.
    let threads = threads_for_row(if dim % 8 == 0 { dim / 8 } else { dim });
    let (mut hp, mut sp, mut op) = (h.ptr(), spans.ptr(), out.ptr());
    let (mut t, mut d, mut b) = (tokens as i64, dim as i64, batch as i64);
    let mut args = [arg(&mut hp), arg(&mut sp), arg(&mut op), arg(&mut t), arg(&mut d), arg(&mut b)];
    // SAFETY: args match mean_pool_l2_f32(const bf16*, const u32*, f32*, int64 × 3); h holds T·d,
    // spans 2B and out B·d elements (checked above), aligned for the vector path; the kernel
    // reads rows of h only for spans with s < e ≤ T; threads is a multiple of 32.
    unsafe {
        gpu.launch(
            KernelId::MeanPoolL2F32,
            Launch::linear(batch.min(MAX_ROW_BLOCKS) as u32, threads),
            &mut args,
        )
    }
}

/// `out [T, c] = x / max(‖x‖, 1e-12)` per row of `x [T, c]`, in f32: the multi-vector head.
pub fn l2_rows(gpu: &Gpu, x: &DView<'_, bf16>, out: &mut DViewMut<'_, f32>) -> Result<()> {
    let &[tokens, dim] = x.shape() else {
        return Err(Error::Shape { op: "l2_rows", msg: format!("x must be 2-D, got {:?}", x.shape()) });
    };
    if out.shape() != [tokens, dim] || tokens == 0 || dim == 0 {
        return Err(Error::Shape {
            op: "l2_rows",
            msg: format!(
                "{:?} -> {:?}: expected x [T, c] -> out [T, c] with T, c > 0",
                x.shape(),
                out.shape()
            ),
        });
    }
    // One warp per row.
    let blocks = grid_for(tokens * 32, THREADS);
    let (mut xp, mut op) = (x.ptr(), out.ptr());
    let (mut t, mut d) = (tokens as i64, dim as i64);
    let mut args = [arg(&mut xp), arg(&mut op), arg(&mut t), arg(&mut d)];
    // SAFETY: args match l2_rows_f32(const bf16*, f32*, int64, int64); x and out hold T·c
    // elements (checked above); the block is a whole number of warps.
    unsafe { gpu.launch(KernelId::L2RowsF32, Launch::linear(blocks, THREADS as u32), &mut args) }
}
