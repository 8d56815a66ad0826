//! `gelu`: `out = 0.5·x·(1 + erf(x/√2))`, the exact GELU of the vision patch merger.
//! Kernel: `kernels/gelu.cu`; reference: [`crate::reference::gelu`].

use half::bf16;

use super::{arg, check_aligned, grid_for, shapes, THREADS};
use crate::cuda::{DView, DViewMut, Gpu, KernelId, Launch};
use crate::{Error, Result};

/// Element counts the tests run: one element, one merger row ×3 and a full image's merger
/// activations (117 rows of 5120, vector path), and an odd count (scalar path).
pub const CASES: &[usize] = &[1, 5120 * 3, 117 * 5120, 7];

/// `out = gelu(x)`, elementwise; `x` and `out` have the same shape (any rank, non-empty).
pub fn gelu(gpu: &Gpu, x: &DView<'_, bf16>, out: &mut DViewMut<'_, bf16>) -> Result<()> {
    let n = x.numel();
    if x.shape() != out.shape() || n == 0 {
        return Err(Error::Shape {
            op: "gelu",
            msg: format!("{}: expected the same non-empty shape", shapes(x, out)),
        });
    }
    if n % 8 == 0 {
        check_aligned("gelu", "x", x.ptr(), 16)?;
        check_aligned("gelu", "out", out.ptr(), 16)?;
    }
    let work = if n % 8 == 0 { n / 8 } else { n };
    let (mut xp, mut op, mut nn) = (x.ptr(), out.ptr(), n as i64);
    let mut args = [arg(&mut xp), arg(&mut op), arg(&mut nn)];
    // SAFETY: args match gelu_bf16(const bf16*, bf16*, int64); x and out hold n elements each
    // (checked above), aligned for the vector path.
    unsafe {
        gpu.launch(KernelId::GeluBf16, Launch::linear(grid_for(work, THREADS), THREADS as u32), &mut args)
    }
}
