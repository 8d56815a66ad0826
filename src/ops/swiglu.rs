//! `swiglu`: `out[t, j] = silu(gu[t, j]) · gu[t, I + j]` over the fused `[gate | up]` GEMM output.
//! Kernel: `kernels/swiglu.cu`; reference: [`crate::reference::swiglu`].

use std::ffi::c_void;

use half::bf16;

use super::{check_aligned, grid_for, shapes, THREADS};
use crate::cuda::{DView, DViewMut, Gpu, KernelId, Launch};
use crate::{Error, Result};

/// Shapes the tests and benchmarks run: (tokens, intermediate size). Text MLP 11008 (vector
/// path), vision MLP 3420 (scalar path), single tokens and sizes that are not multiples of
/// the block.
pub const CASES: &[(usize, usize)] =
    &[(1, 11008), (7, 11008), (333, 11008), (4096, 11008), (1, 3456), (517, 3456), (3, 8), (5, 12)];

/// `out [T, I] = swiglu(gu [T, 2I])`.
pub fn swiglu(gpu: &Gpu, gu: &DView<'_, bf16>, out: &mut DViewMut<'_, bf16>) -> Result<()> {
    match (gu.shape(), out.shape()) {
        (&[t, gi], &[to, i]) if t == to && gi == 2 * i => swiglu_cols(gpu, gu, out),
        _ => Err(Error::Shape {
            op: "swiglu",
            msg: format!("{}: expected gu [T, 2I] -> out [T, I] with T, I > 0", shapes(gu, out)),
        }),
    }
}

/// [`swiglu`] into the first I columns of a wider `out [T, ld]` (ld ≥ I, I from gu's `[T, 2I]`),
/// the others not touched: the `act` of the folded LoRA's `[act | t]` (`model::gpu::weights`).
pub fn swiglu_cols(gpu: &Gpu, gu: &DView<'_, bf16>, out: &mut DViewMut<'_, bf16>) -> Result<()> {
    let (&[tokens, gi], &[out_rows, ld]) = (gu.shape(), out.shape()) else {
        return Err(Error::Shape {
            op: "swiglu",
            msg: format!("gu and out must be 2-D: {}", shapes(gu, out)),
        });
    };
    let inter = gi / 2;
    if gi % 2 != 0 || out_rows != tokens || ld < inter || tokens == 0 || inter == 0 {
        return Err(Error::Shape {
            op: "swiglu",
            msg: format!("{}: expected gu [T, 2I] -> out [T, ≥ I] with T, I > 0", shapes(gu, out)),
        });
    }
    let vector = inter % 8 == 0;
    if vector {
        check_aligned("swiglu", "gu", gu.ptr(), 16)?;
        check_aligned("swiglu", "out", out.ptr(), 16)?;
        if ld % 8 != 0 {
            return Err(Error::Shape {
                op: "swiglu",
                msg: format!("out rows of {ld} elements: the 8-wide path needs a multiple of 8"),
            });
        }
    }
    let work = if vector { tokens * inter / 8 } else { tokens * inter };
    let (mut gp, mut op, mut t, mut i, mut l) = (gu.ptr(), out.ptr(), tokens as i64, inter as i64, ld as i64);
    let mut args = [
        &mut gp as *mut u64 as *mut c_void,
        &mut op as *mut u64 as *mut c_void,
        &mut t as *mut i64 as *mut c_void,
        &mut i as *mut i64 as *mut c_void,
        &mut l as *mut i64 as *mut c_void,
    ];
    // SAFETY: args match swiglu_bf16(const bf16*, bf16*, int64, int64, int64); gu holds T·2I and
    // out T·ld (ld ≥ I) elements (checked above), aligned (rows included) for the vector path.
    unsafe {
        gpu.launch(KernelId::SwigluBf16, Launch::linear(grid_for(work, THREADS), THREADS as u32), &mut args)
    }
}
