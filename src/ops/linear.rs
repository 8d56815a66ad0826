//! `linear`: `y = x·wᵀ (+ bias) (+ y)`, every projection of the model, through cuBLASLt
//! ([`crate::cuda::Blas::linear`]). Reference: [`crate::reference::linear`].

use half::bf16;

use crate::cuda::{DView, DViewMut, Gpu};
use crate::Result;

/// The model's GEMM shapes, as (n, k) of `w [n, k]`: q/o 2048×2048, k/v 256×2048, gate/up
/// 11008×2048, down 2048×11008.
pub const CASES: &[(usize, usize)] = &[(2048, 2048), (256, 2048), (11008, 2048), (2048, 11008)];

/// Token counts the GEMM tests run each case at: one token, odd sizes, a full batch.
pub const TOKENS: &[usize] = &[1, 7, 129, 1000, 4096];

/// `y [m, n] = x [m, k] · w [n, k]ᵀ (+ bias [n]) (+ y when accumulate)`.
pub fn linear(
    gpu: &Gpu,
    x: &DView<'_, bf16>,
    w: &DView<'_, bf16>,
    bias: Option<&DView<'_, bf16>>,
    y: &mut DViewMut<'_, bf16>,
    accumulate: bool,
) -> Result<()> {
    gpu.blas().linear(x, w, bias, y, accumulate)
}

/// [`linear`] into an f32 output, no bias: `y [m, n] (f32) = x·wᵀ (+ y when accumulate)`, the
/// residual adds of the decoder (its residual stream is f32).
pub fn linear_f32(
    gpu: &Gpu,
    x: &DView<'_, bf16>,
    w: &DView<'_, bf16>,
    y: &mut DViewMut<'_, f32>,
    accumulate: bool,
) -> Result<()> {
    gpu.blas().linear_f32(x, w, y, accumulate)
}
