//! `fault_trap`: TEST HOOK (fault injection), not a model op. Launches `kernels/fault.cu`, whose
//! `__trap()` leaves a sticky error in the GPU's context, as a real device fault does; the GPU
//! tests use it (through the engine's hidden `fault_device_after` option) to check that the
//! engine then reports [`crate::Error::DeviceLost`]. No CPU reference: it computes nothing.

use std::ffi::c_void;

use super::THREADS;
use crate::cuda::{Gpu, KernelId, Launch};
use crate::Result;

/// Enqueues the trap (`arm`) or a no-op launch of the same kernel. Returns once enqueued: the
/// fault shows at the next synchronising call in this context, and stays.
#[doc(hidden)]
pub fn fault_trap(gpu: &Gpu, arm: bool) -> Result<()> {
    let mut a = arm as i32;
    let mut args = [&mut a as *mut i32 as *mut c_void];
    // SAFETY: args match fault_trap(int); the kernel touches no memory.
    unsafe { gpu.launch(KernelId::FaultTrap, Launch::linear(1, THREADS as u32), &mut args) }
}
