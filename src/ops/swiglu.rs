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
    let &[tokens, inter] = out.shape() else {
        return Err(Error::Shape { op: "swiglu", msg: format!("out must be 2-D, got {:?}", out.shape()) });
    };
    if gu.shape() != [tokens, 2 * inter] || tokens == 0 || inter == 0 {
        return Err(Error::Shape {
            op: "swiglu",
            msg: format!("{}: expected gu [T, 2I] -> out [T, I] with T, I > 0", shapes(gu, out)),
        });
    }
    if inter % 8 == 0 {
        check_aligned("swiglu", "gu", gu.ptr(), 16)?;
        check_aligned("swiglu", "out", out.ptr(), 16)?;
    }
    let work = if inter % 8 == 0 { tokens * inter / 8 } else { tokens * inter };
    let (mut gp, mut op, mut t, mut i) = (gu.ptr(), out.ptr(), tokens as i64, inter as i64);
    let mut args = [
        &mut gp as *mut u64 as *mut c_void,
        &mut op as *mut u64 as *mut c_void,
        &mut t as *mut i64 as *mut c_void,
        &mut i as *mut i64 as *mut c_void,
    ];
    // SAFETY: args match swiglu_bf16(const bf16*, bf16*, int64, int64); gu holds T·2I and out
    // T·I elements (checked above), aligned for the vector path.
    unsafe {
        gpu.launch(KernelId::SwigluBf16, Launch::linear(grid_for(work, THREADS), THREADS as u32), &mut args)
    }
}
