//! `linear_wgmma` (`kernels/linear_wgmma.cu`): a probe, not used by the engine. An f32 GEMM
//! `y [m, n] = x [m, k] · w [n, k]ᵀ` on Hopper's wgmma with one accumulator per output in k order,
//! in either operand role, to find out whether such a kernel gives cuBLASLt's bits (the condition
//! for a small-m kernel of our own that keeps the engine batch-invariant; issue 10, deliverable
//! 2). `probe_linear_wgmma_bits` in the GPU suite counts the bits that differ.

use half::bf16;

use super::{arg, check_aligned};
use crate::cuda::{DView, DViewMut, Gpu, KernelId, Launch, CUDA_ARCH};
use crate::{Error, Result};

/// Rows per tile and k per chunk (`TILE` of the kernel); shared memory: two tiles and 1 KB.
const TILE: usize = 64;
const SMEM_BYTES: u32 = (2 * TILE * 128 + 1024) as u32;

/// Which operand is the wgmma's M side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WgmmaRoles {
    /// Tokens as M (A = x, B = w).
    TokensAsM,
    /// Features as M (A = w, B = x): cuBLASLt's view of the problem (column-major `C [n, m]`).
    FeaturesAsM,
}

/// Whether this build has the kernel's body (sm_90a); elsewhere it traps.
pub fn linear_wgmma_built() -> bool {
    CUDA_ARCH == "sm_90a"
}

/// `y (f32) = x·wᵀ` through the probe kernel. Needs an sm_90a build, `k % 64 == 0` and 16-byte
/// aligned x and w.
pub fn linear_wgmma(
    gpu: &Gpu,
    x: &DView<'_, bf16>,
    w: &DView<'_, bf16>,
    y: &mut DViewMut<'_, f32>,
    roles: WgmmaRoles,
) -> Result<()> {
    let err = |msg: String| Error::Shape { op: "linear_wgmma", msg };
    let (&[m, k], &[n, k2]) = (x.shape(), w.shape()) else {
        return Err(err(format!("x {:?} and w {:?} must be 2-D", x.shape(), w.shape())));
    };
    if k != k2 || y.shape() != [m, n] || k % TILE != 0 || m == 0 || n == 0 {
        return Err(err(format!(
            "x {:?} · w {:?}ᵀ -> y {:?}: expected x [m, k], w [n, k], y [m, n], k a positive multiple of {TILE}",
            x.shape(),
            w.shape(),
            y.shape()
        )));
    }
    if !linear_wgmma_built() {
        return Err(err(format!("the wgmma probe needs an sm_90a build (this one is {CUDA_ARCH})")));
    }
    check_aligned("linear_wgmma", "x", x.ptr(), 16)?;
    check_aligned("linear_wgmma", "w", w.ptr(), 16)?;
    let id = match roles {
        WgmmaRoles::TokensAsM => KernelId::LinearWgmmaTok,
        WgmmaRoles::FeaturesAsM => KernelId::LinearWgmmaFeat,
    };
    let (mut xp, mut wp, mut yp) = (x.ptr(), w.ptr(), y.ptr());
    let (mut mi, mut ni, mut ki) = (m as i32, n as i32, k as i32);
    let mut args = [arg(&mut xp), arg(&mut wp), arg(&mut yp), arg(&mut mi), arg(&mut ni), arg(&mut ki)];
    let launch = Launch {
        grid: (n.div_ceil(TILE) as u32, m.div_ceil(TILE) as u32, 1),
        block: (128, 1, 1),
        smem: SMEM_BYTES,
    };
    // SAFETY: args match linear_wgmma_*(const bf16*, const bf16*, float*, int, int, int); x holds
    // m·k, w n·k and y m·n elements (checked above), k % 64 == 0 and both inputs are 16-byte
    // aligned, as the kernel's 16-byte loads need; it reads rows < m of x, < n of w and writes
    // y[t, f] for t < m, f < n only. 17 KB of dynamic shared memory needs no opt-in.
    unsafe { gpu.launch(id, launch, &mut args) }
}
