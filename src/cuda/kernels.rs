//! The compiled kernels. `build.rs` writes the table below from `kernels/*.cu`: one
//! [`ModuleSource`] per file (its cubin, PTX and ptxas report) and one [`KernelId`] variant per
//! `extern "C" __global__` function, named after its symbol (`swiglu_bf16` -> `SwigluBf16`).
//! [`super::Gpu::new`] loads every module and resolves every id, so a missing kernel fails at
//! start-up with its name, never in the middle of a forward.

/// One compiled `kernels/<name>.cu`.
#[derive(Debug)]
pub struct ModuleSource {
    /// File stem.
    pub name: &'static str,
    /// PTX text (kept for reading and as a fallback when the cubin does not load).
    pub ptx: &'static str,
    /// ptxas output for the target: what loads.
    pub cubin: &'static [u8],
    /// ptxas -v report: registers, spills, shared memory per kernel.
    pub ptxas_report: &'static str,
}

include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
