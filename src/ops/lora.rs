//! `lora_mask`: per-row task selection of the batched LoRA path (docs/MODEL.md §6). The engine
//! computes `t = x·[A_0; A_1; A_2]ᵀ` for all tasks in one GEMM, masks it with this op, then one
//! GEMM with `[B_0 | B_1 | B_2]` accumulates the delta: each row gets exactly its own task's
//! LoRA, whatever the batch mix. Kernel: `kernels/lora.cu`; reference:
//! [`crate::reference::lora_mask`] (and [`crate::reference::lora`], one task's whole delta).

use half::bf16;

use super::{arg, check_aligned, grid_for, THREADS};
use crate::cuda::{DView, DViewMut, Gpu, KernelId, Launch};
use crate::{Error, Result};

/// Shapes the tests run: (tokens, tasks, r). The model's 3 tasks with groups of rank 32 times 1
/// (o, down, the projector), 2 (gate_up) and 3 (qkv) fused projections, vector path, at one
/// token, odd counts and 4097 tokens; a group width that is not a multiple of 8 (scalar path).
pub const CASES: &[(usize, usize, usize)] = &[
    (1, 3, 32),
    (7, 3, 32),
    (4097, 3, 32),
    (333, 3, 32),
    (4097, 3, 64),
    (4097, 3, 96),
    (5, 3, 5),
    (17, 2, 8),
];

/// Zeroes, in place, every `r`-wide column group of each row of `t [T, tasks·r]` except the group
/// of that row's task (`row_task [T]`). A row whose task is ≥ tasks has every group zeroed (no
/// LoRA delta). Kept elements are not touched.
pub fn lora_mask(gpu: &Gpu, t: &mut DViewMut<'_, bf16>, row_task: &DView<'_, u8>, r: usize) -> Result<()> {
    let &[tokens, cols] = t.shape() else {
        return Err(Error::Shape { op: "lora_mask", msg: format!("t must be 2-D, got {:?}", t.shape()) });
    };
    if r == 0 || cols == 0 || cols % r != 0 || tokens == 0 || row_task.shape() != [tokens] {
        return Err(Error::Shape {
            op: "lora_mask",
            msg: format!(
                "t {:?}, row_task {:?}, r {r}: expected t [T, tasks·r], row_task [T] with T, tasks, r > 0",
                t.shape(),
                row_task.shape()
            ),
        });
    }
    if r % 8 == 0 {
        check_aligned("lora_mask", "t", t.ptr(), 16)?;
    }
    let tasks = cols / r;
    let work = if r % 8 == 0 { tokens * cols / 8 } else { tokens * cols };
    let (mut tp, mut rp) = (t.ptr(), row_task.ptr());
    let (mut n, mut k, mut rr) = (tokens as i64, tasks as i64, r as i64);
    let mut args = [arg(&mut tp), arg(&mut rp), arg(&mut n), arg(&mut k), arg(&mut rr)];
    // SAFETY: args match lora_mask_bf16(bf16*, const u8*, int64, int64, int64); t holds
    // T·tasks·r and row_task T elements (checked above), t is aligned for the vector path.
    unsafe {
        gpu.launch(KernelId::LoraMaskBf16, Launch::linear(grid_for(work, THREADS), THREADS as u32), &mut args)
    }
}
