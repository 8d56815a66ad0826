//! `rmsnorm`: `y = w ⊙ (x · rsqrt(mean(x²) + eps))` per row, f32 throughout, one bf16 rounding.
//! Kernel: `kernels/rmsnorm.cu`; reference: [`crate::reference::rmsnorm`].

use half::bf16;

use super::{arg, check_aligned, shapes, threads_for_row, MAX_ROW_BLOCKS};
use crate::cuda::{DView, DViewMut, Gpu, KernelId, Launch};
use crate::{Error, Result};

/// Shapes the tests run: (tokens, dim). The decoder's 2048 (vector path) at one token, odd
/// counts and 4097 tokens; the vision tower's 1280; dims that are not multiples of 8 (scalar
/// path) and one narrower than a warp.
pub const CASES: &[(usize, usize)] =
    &[(1, 2048), (7, 2048), (333, 2048), (4097, 2048), (5, 1280), (517, 1280), (3, 100), (9, 8), (4, 3)];

/// The model's epsilon (decoder and vision tower).
pub const EPS: f32 = 1e-6;

/// `out [T, d] = rmsnorm(x [T, d]) ⊙ w [d]`. `out` must not alias `x`.
pub fn rmsnorm(
    gpu: &Gpu,
    x: &DView<'_, bf16>,
    w: &DView<'_, bf16>,
    eps: f32,
    out: &mut DViewMut<'_, bf16>,
) -> Result<()> {
    let &[tokens, dim] = x.shape() else {
        return Err(Error::Shape { op: "rmsnorm", msg: format!("x must be 2-D, got {:?}", x.shape()) });
    };
    if out.shape() != [tokens, dim] || w.shape() != [dim] || tokens == 0 || dim == 0 {
        return Err(Error::Shape {
            op: "rmsnorm",
            msg: format!(
                "{} with w {:?}: expected x [T, d], w [d] -> out [T, d] with T, d > 0",
                shapes(x, out),
                w.shape()
            ),
        });
    }
    if !(eps.is_finite() && eps >= 0.0) {
        return Err(Error::Shape { op: "rmsnorm", msg: format!("eps must be finite and >= 0, got {eps}") });
    }
    if dim % 8 == 0 {
        check_aligned("rmsnorm", "x", x.ptr(), 16)?;
        check_aligned("rmsnorm", "w", w.ptr(), 16)?;
        check_aligned("rmsnorm", "out", out.ptr(), 16)?;
    }
    let threads = threads_for_row(if dim % 8 == 0 { dim / 8 } else { dim });
    let blocks = tokens.min(MAX_ROW_BLOCKS) as u32;
    let (mut xp, mut wp, mut op) = (x.ptr(), w.ptr(), out.ptr());
    let (mut t, mut d, mut e) = (tokens as i64, dim as i64, eps);
    let mut args = [arg(&mut xp), arg(&mut wp), arg(&mut op), arg(&mut t), arg(&mut d), arg(&mut e)];
    // SAFETY: args match rmsnorm_bf16(const bf16*, const bf16*, bf16*, int64, int64, float);
    // x and out hold T·d and w d elements (checked above), aligned for the vector path; threads is
    // a multiple of 32 (block_sum's requirement).
    unsafe { gpu.launch(KernelId::RmsnormBf16, Launch::linear(blocks, threads), &mut args) }
}

/// `out [T, d] (bf16) = rmsnorm(x [T, d] (f32)) ⊙ w [d]`: the norm of the f32 residual streams
/// (the decoder's and the vision tower's). Kernel `rmsnorm_f32_bf16`; same reference and tolerance as [`rmsnorm`].
pub fn rmsnorm_f32(
    gpu: &Gpu,
    x: &DView<'_, f32>,
    w: &DView<'_, bf16>,
    eps: f32,
    out: &mut DViewMut<'_, bf16>,
) -> Result<()> {
    if out.shape() != x.shape() {
        return Err(Error::Shape {
            op: "rmsnorm_f32",
            msg: format!("{} with w {:?}: expected x [T, d], w [d] -> out [T, d]", shapes(x, out), w.shape()),
        });
    }
    rmsnorm_f32_cols(gpu, x, w, eps, out)
}

/// [`rmsnorm_f32`] into the first d columns of a wider `out [T, ld]` (ld ≥ d), the others not
/// touched: the `x` of the folded LoRA's `[x | t]` (`model::gpu::weights`).
pub fn rmsnorm_f32_cols(
    gpu: &Gpu,
    x: &DView<'_, f32>,
    w: &DView<'_, bf16>,
    eps: f32,
    out: &mut DViewMut<'_, bf16>,
) -> Result<()> {
    let (&[tokens, dim], &[out_rows, ld]) = (x.shape(), out.shape()) else {
        return Err(Error::Shape {
            op: "rmsnorm_f32",
            msg: format!("x and out must be 2-D, got {}", shapes(x, out)),
        });
    };
    if out_rows != tokens || ld < dim || w.shape() != [dim] || tokens == 0 || dim == 0 {
        return Err(Error::Shape {
            op: "rmsnorm_f32",
            msg: format!(
                "{} with w {:?}: expected x [T, d], w [d] -> out [T, ≥ d] with T, d > 0",
                shapes(x, out),
                w.shape()
            ),
        });
    }
    if !(eps.is_finite() && eps >= 0.0) {
        return Err(Error::Shape {
            op: "rmsnorm_f32",
            msg: format!("eps must be finite and >= 0, got {eps}"),
        });
    }
    if dim % 4 == 0 {
        check_aligned("rmsnorm_f32", "x", x.ptr(), 16)?;
    }
    let threads = threads_for_row(if dim % 4 == 0 { dim / 4 } else { dim });
    let blocks = tokens.min(MAX_ROW_BLOCKS) as u32;
    let (mut xp, mut wp, mut op) = (x.ptr(), w.ptr(), out.ptr());
    let (mut t, mut d, mut l, mut e) = (tokens as i64, dim as i64, ld as i64, eps);
    let mut args =
        [arg(&mut xp), arg(&mut wp), arg(&mut op), arg(&mut t), arg(&mut d), arg(&mut l), arg(&mut e)];
    // SAFETY: args match rmsnorm_f32_bf16(const float*, const bf16*, bf16*, int64, int64, int64,
    // float); x holds T·d, out T·ld (ld ≥ d) and w d elements (checked above); x aligned for the
    // float4 path (out is written one element at a time).
    unsafe { gpu.launch(KernelId::RmsnormF32Bf16, Launch::linear(blocks, threads), &mut args) }
}
