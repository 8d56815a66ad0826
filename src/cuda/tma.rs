//! Tensor maps for Hopper's TMA loads (`kernels/tma.cuh`): a 2-D bf16 tensor described to the
//! copy engine once per launch, passed to the kernel by value.

use std::ffi::c_void;

use cudarc::driver::sys;

use crate::{Error, Result};

/// The map of a row-major 2-D bf16 tensor at `ptr`: `rows` rows of `cols` elements, rows
/// `row_bytes` apart, read in boxes of `box_rows` rows × `box_cols` columns with `swizzle`.
/// Boxes reaching past the tensor's edge read zeros there. The copy engine's limits (16-byte
/// aligned address and row stride, boxes of at most 256 × 256 elements, a swizzled box row of at
/// most the swizzle's span) are checked by the driver: a violation is an [`Error::Kernel`] of `who`.
pub fn tma_map_bf16(
    who: &'static str,
    ptr: u64,
    cols: usize,
    rows: usize,
    row_bytes: usize,
    (box_cols, box_rows): (u32, u32),
    swizzle: sys::CUtensorMapSwizzle,
) -> Result<sys::CUtensorMap> {
    let dims: [u64; 2] = [cols as u64, rows as u64];
    let strides: [u64; 1] = [row_bytes as u64];
    let boxes: [u32; 2] = [box_cols, box_rows];
    let steps: [u32; 2] = [1, 1];
    let mut map = sys::CUtensorMap { opaque: [0; 16] };
    // SAFETY: a host-side encode into `map` (128 bytes, owned here) from arrays of the rank (2)
    // the call is given; the caller's tensor holds `rows` rows of `cols` elements `row_bytes`
    // apart at `ptr` (the driver rejects what it cannot describe).
    unsafe {
        sys::cuTensorMapEncodeTiled(
            &mut map,
            sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
            2,
            ptr as *mut c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxes.as_ptr(),
            steps.as_ptr(),
            sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            swizzle,
            sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    }
    .result()
    .map_err(|e| Error::Kernel {
        kernel: who,
        msg: format!(
            "cuTensorMapEncodeTiled ({rows} × {cols} at {ptr:#x}, rows {row_bytes} bytes apart, box \
             {box_rows} × {box_cols}): {e:?}"
        ),
    })?;
    Ok(map)
}
