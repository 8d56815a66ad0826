//! Typed, validated launches: one file per op. Each op checks shapes, sizes and alignment and
//! returns [`crate::Error::Shape`] before anything is enqueued; kernels trust their inputs.

pub mod attention;
pub mod embedding;
pub mod fault;
pub mod gelu;
pub mod linear;
pub mod linear_wgmma;
pub mod lora;
pub mod pool;
pub mod rmsnorm;
pub mod rope;
pub mod rows;
pub mod swiglu;

pub use attention::flash_attn;
pub use embedding::{embedding, embedding_f32};
pub use gelu::gelu;
pub use linear::{
    linear, linear_cols, linear_f32, linear_stream, linear_stream_cols, linear_stream_cols_masked,
    linear_stream_f32, linear_stream_masked,
};
pub use lora::{lora_mask, lora_mask_cols, lora_shrink, lora_shrink_cols};
pub use pool::{l2_rows, mean_pool_l2};
pub use rmsnorm::{rmsnorm, rmsnorm_f32, rmsnorm_f32_cols};
pub use rope::{mrope, vision_rope};
pub use rows::{gather_rows, scatter_rows_f32};
pub use swiglu::{swiglu, swiglu_cols};

use std::ffi::c_void;

use crate::cuda::{DView, DViewMut};
use crate::{Error, Result};

/// Fails unless `ptr` is aligned to `align` bytes (vector loads need it).
pub(crate) fn check_aligned(op: &'static str, what: &str, ptr: u64, align: u64) -> Result<()> {
    if ptr % align != 0 {
        return Err(Error::Shape { op, msg: format!("{what} at {ptr:#x} is not {align}-byte aligned") });
    }
    Ok(())
}

/// Grid size for a grid-stride loop over `work` items with `threads` per block: enough blocks
/// to fill the GPU several times over, never more than the work needs.
pub(crate) fn grid_for(work: usize, threads: usize) -> u32 {
    work.div_ceil(threads).clamp(1, 132 * 32) as u32
}

/// Shapes of an input and output view, for error messages.
pub(crate) fn shapes<T, U>(a: &DView<'_, T>, b: &DViewMut<'_, U>) -> String {
    format!("{:?} -> {:?}", a.shape(), b.shape())
}

/// A kernel argument: the address of a value of the parameter's type.
pub(crate) fn arg<T>(v: &mut T) -> *mut c_void {
    v as *mut T as *mut c_void
}

/// Threads per block of every kernel in `kernels/` except attention (which has its own): the
/// grid-stride kernels are launched with exactly this many, the row kernels with up to this many.
/// The kernels declare it as `__launch_bounds__(JV4_THREADS)` (`kernels/common.cuh`), so ptxas
/// budgets registers for it and a larger launch fails instead of running out of registers.
pub(crate) const THREADS: usize = 256;

/// Most blocks a row-per-block kernel is launched with (its kernels loop over further rows).
pub(crate) const MAX_ROW_BLOCKS: usize = 65535;

/// Threads for a kernel that spreads `work` items of one row over a block: a multiple of 32,
/// from 32 to [`THREADS`]. Depends on the row size only, so reductions keep one order.
pub(crate) fn threads_for_row(work: usize) -> u32 {
    work.div_ceil(32).clamp(1, THREADS / 32) as u32 * 32
}

#[cfg(test)]
mod tests {
    #[test]
    fn threads_match_the_kernels_launch_bounds() {
        let common = include_str!("../../kernels/common.cuh");
        let define = format!("#define JV4_THREADS {}", super::THREADS);
        assert!(common.lines().any(|l| l.trim() == define), "kernels/common.cuh lacks `{define}`");
        // Every kernel outside attention declares the bound.
        for (file, src) in [
            ("embedding.cu", include_str!("../../kernels/embedding.cu")),
            ("gelu.cu", include_str!("../../kernels/gelu.cu")),
            ("lora.cu", include_str!("../../kernels/lora.cu")),
            ("pool.cu", include_str!("../../kernels/pool.cu")),
            ("rmsnorm.cu", include_str!("../../kernels/rmsnorm.cu")),
            ("rope.cu", include_str!("../../kernels/rope.cu")),
            ("rows.cu", include_str!("../../kernels/rows.cu")),
            ("swiglu.cu", include_str!("../../kernels/swiglu.cu")),
        ] {
            let kernels = src.matches("__global__").count();
            let bounded = src.matches("__global__ void __launch_bounds__(JV4_THREADS)").count();
            assert!(kernels > 0 && bounded == kernels, "{file}: {bounded} of {kernels} kernels bounded");
        }
    }
}
