//! Typed, validated launches: one file per op. Each op checks shapes, sizes and alignment and
//! returns [`crate::Error::Shape`] before anything is enqueued; kernels trust their inputs.

pub mod attention;
pub mod linear;
pub mod swiglu;

pub use attention::flash_attn;
pub use linear::linear;
pub use swiglu::swiglu;

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
