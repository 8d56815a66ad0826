//! The kernel table: every kernel id resolved, every module loaded from its cubin.

use crate::harness::Ctx;
use jv4::cuda::{KernelId, MODULES};

pub fn kernels_resolve(ctx: &mut Ctx) -> Result<(), String> {
    // Gpu::new resolved every id or failed; here we check the table itself and that no module
    // had to fall back to PTX JIT (the cubin is what should load).
    let info = ctx.gpu.info();
    if !info.ptx_fallbacks.is_empty() {
        return Err(format!("modules loaded from PTX, not cubin: {:?}", info.ptx_fallbacks));
    }
    if KernelId::ALL.is_empty() || MODULES.is_empty() {
        return Err("no kernels compiled".into());
    }
    println!("  {} kernels in {} modules", KernelId::ALL.len(), MODULES.len());
    Ok(())
}
