//! The device layer: the only code that touches CUDA. [`Gpu`] holds the context, the one stream
//! every forward runs on, every kernel (resolved at start-up), and the cuBLASLt handle.
//!
//! Threads: the context is bound to the thread that created the [`Gpu`]; call [`Gpu::bind`]
//! before using it from another thread.

pub mod alloc;
pub mod blas;
pub mod graph;
pub mod kernels;
pub mod lru;
pub mod pinned;
pub mod staging;
pub mod tensor;
pub mod tma;

use std::ffi::c_void;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use cudarc::driver::{sys, CudaContext, CudaFunction, CudaModule, CudaStream, DriverError};
use cudarc::nvrtc::Ptx;

use crate::{Error, Result};
pub use alloc::{
    parse_bytes, resolve_budget, Arena, DeviceAllocator, DeviceBlock, MemStats, StageWriter, Staged,
    BUDGET_ENV, DEFAULT_PAGE_SIZE,
};
pub use blas::Blas;
pub use graph::Graph;
pub use kernels::{KernelId, ModuleSource, CUDA_ARCH, MODULES};
pub use pinned::HostPod;
pub use staging::Staging;
pub use tensor::{BufferLayout, DTensor, DView, DViewMut, DeviceBuffer, Region, Tensor};

/// Converts a driver error into [`Error::Cuda`] saying what we were doing.
pub(crate) fn cuda_err(what: &str, e: DriverError) -> Error {
    if is_sticky(e.0) {
        return Error::DeviceLost(format!("{what}: {e:?}"));
    }
    Error::Cuda { what: what.to_string(), msg: format!("{e:?}") }
}

/// Whether a driver error is sticky: after it the context is corrupt and every later call in it
/// fails the same way (CUDA programming guide, "error checking"), so the engine is lost. An
/// out-of-memory or invalid-value error is not: the context stays usable.
pub fn is_sticky(e: sys::CUresult) -> bool {
    use sys::CUresult as R;
    matches!(
        e,
        R::CUDA_ERROR_ILLEGAL_ADDRESS
            | R::CUDA_ERROR_LAUNCH_FAILED
            | R::CUDA_ERROR_LAUNCH_TIMEOUT
            | R::CUDA_ERROR_ECC_UNCORRECTABLE
            | R::CUDA_ERROR_NVLINK_UNCORRECTABLE
            | R::CUDA_ERROR_HARDWARE_STACK_ERROR
            | R::CUDA_ERROR_ILLEGAL_INSTRUCTION
            | R::CUDA_ERROR_MISALIGNED_ADDRESS
            | R::CUDA_ERROR_INVALID_ADDRESS_SPACE
            | R::CUDA_ERROR_INVALID_PC
            | R::CUDA_ERROR_ASSERT
            | R::CUDA_ERROR_CONTEXT_IS_DESTROYED
            | R::CUDA_ERROR_DEVICE_UNAVAILABLE
    )
}

/// How many CUDA devices the driver reports; [`Error::NoGpu`] without a driver, a device, or
/// kernels in this binary.
pub fn device_count() -> Result<usize> {
    use cudarc::driver::{sys, CudaContext};
    if cfg!(no_kernels) {
        return Err(Error::NoGpu("this binary was built without CUDA kernels (JV4_ALLOW_NO_NVCC=1)".into()));
    }
    // SAFETY: only tries to dlopen the driver library.
    if !unsafe { sys::is_culib_present() } {
        return Err(Error::NoGpu(
            "the NVIDIA driver library (libcuda.so.1) was not found on this machine".into(),
        ));
    }
    match CudaContext::device_count() {
        Ok(n) if n > 0 => Ok(n as usize),
        Err(e) if e.0 != sys::CUresult::CUDA_ERROR_NO_DEVICE => {
            Err(Error::NoGpu(format!("the CUDA driver failed to start: {e:?}")))
        }
        _ => Err(Error::NoGpu("the CUDA driver reports no device".into())),
    }
}

/// What we know about the device, for reports.
#[derive(Clone, Debug)]
pub struct DeviceInfo {
    /// Device ordinal.
    pub ordinal: usize,
    /// Marketing name, e.g. "NVIDIA H100 80GB HBM3".
    pub name: String,
    /// Compute capability (major, minor).
    pub compute_capability: (i32, i32),
    /// Streaming multiprocessors.
    pub sm_count: i32,
    /// Device memory in bytes.
    pub total_mem: u64,
    /// CUDA version of the driver, e.g. 13000.
    pub driver_version: i32,
    /// Target the kernels were built for.
    pub kernels_arch: &'static str,
    /// Modules that loaded from PTX because their cubin did not (normally none).
    pub ptx_fallbacks: Vec<&'static str>,
}

/// A launch shape.
#[derive(Clone, Copy, Debug)]
pub struct Launch {
    /// Grid dimensions.
    pub grid: (u32, u32, u32),
    /// Block dimensions.
    pub block: (u32, u32, u32),
    /// Dynamic shared memory in bytes.
    pub smem: u32,
}

impl Launch {
    /// A 1-D grid of `blocks` blocks of `threads` threads.
    pub fn linear(blocks: u32, threads: u32) -> Self {
        Launch { grid: (blocks, 1, 1), block: (threads, 1, 1), smem: 0 }
    }
}

/// The GPU: context, stream, kernels and cuBLASLt. See the module documentation.
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    _modules: Vec<Arc<CudaModule>>,
    functions: Vec<CudaFunction>,
    /// Per kernel: the dynamic shared memory limit set with [`Gpu::set_max_dynamic_smem`]
    /// (0 = the 48 KB default), so that the driver call happens once per kernel and size.
    smem_limits: Vec<AtomicU32>,
    blas: Blas,
    info: DeviceInfo,
}

/// Whether the kernels compiled for `arch` (e.g. "sm_90a") run on a device of compute
/// capability `cc`. Arch-specific targets (the `a` suffix) need the exact version; plain ones run
/// on the same major version at an equal or higher minor.
pub fn arch_runs_on(arch: &str, cc: (i32, i32)) -> bool {
    let digits = arch.trim_start_matches("sm_").trim_start_matches("compute_");
    let specific = digits.ends_with('a');
    let num: i32 = digits.trim_end_matches('a').parse().unwrap_or(0);
    let (major, minor) = (num / 10, num % 10);
    if specific {
        cc == (major, minor)
    } else {
        cc.0 == major && cc.1 >= minor
    }
}

impl Gpu {
    /// Opens GPU `ordinal`, loads every kernel module and resolves every kernel, and creates the
    /// stream and the cuBLASLt handle. [`Error::NoGpu`] when there is no driver or no device.
    pub fn new(ordinal: usize) -> Result<Gpu> {
        if cfg!(no_kernels) {
            return Err(Error::NoGpu(
                "this binary was built without CUDA kernels (JV4_ALLOW_NO_NVCC=1)".into(),
            ));
        }
        // SAFETY: only tries to dlopen the driver library.
        if !unsafe { sys::is_culib_present() } {
            return Err(Error::NoGpu(
                "the NVIDIA driver library (libcuda.so.1) was not found on this machine".into(),
            ));
        }
        let count = match CudaContext::device_count() {
            Ok(n) => n,
            Err(e) if e.0 == sys::CUresult::CUDA_ERROR_NO_DEVICE => 0,
            Err(e) => return Err(Error::NoGpu(format!("the CUDA driver failed to start: {e:?}"))),
        };
        if ordinal >= count.max(0) as usize {
            return Err(Error::NoGpu(format!(
                "GPU {ordinal} requested, but the driver sees {count} CUDA device(s)"
            )));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| cuda_err("create the context", e))?;
        // We manage ordering ourselves (one stream); cudarc's per-buffer events are not needed.
        // SAFETY: no CudaSlice is shared across streams in this engine.
        unsafe { ctx.disable_event_tracking() };
        let name = ctx.name().map_err(|e| cuda_err("read the device name", e))?;
        let cc = ctx.compute_capability().map_err(|e| cuda_err("read compute capability", e))?;
        if !arch_runs_on(CUDA_ARCH, cc) {
            return Err(Error::NoGpu(format!(
                "the kernels were compiled for {CUDA_ARCH}, which does not run on {name} \
                 (compute capability {}.{}); rebuild with JV4_CUDA_ARCH=sm_{}{} cargo build --release",
                cc.0, cc.1, cc.0, cc.1
            )));
        }
        let sm_count = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(|e| cuda_err("read the SM count", e))?;
        let total_mem = ctx.total_mem().map_err(|e| cuda_err("read the memory size", e))? as u64;
        let mut driver_version = 0;
        // SAFETY: writes one int.
        unsafe { sys::cuDriverGetVersion(&mut driver_version) }
            .result()
            .map_err(|e| cuda_err("read the driver version", e))?;

        let mut modules = Vec::with_capacity(MODULES.len());
        let mut ptx_fallbacks = Vec::new();
        for m in MODULES {
            let module = match ctx.load_module(Ptx::from_binary(m.cubin.to_vec())) {
                Ok(module) => module,
                Err(cubin_err) => {
                    let module = ctx.load_module(Ptx::from_src(m.ptx)).map_err(|e| Error::Kernel {
                        kernel: m.name,
                        msg: format!("module load failed: cubin {cubin_err:?}, PTX {e:?}"),
                    })?;
                    ptx_fallbacks.push(m.name);
                    module
                }
            };
            modules.push(module);
        }
        let functions = KernelId::ALL
            .iter()
            .map(|&id| {
                modules[id.module()].load_function(id.symbol()).map_err(|e| Error::Kernel {
                    kernel: id.symbol(),
                    msg: format!("not found in module {}: {e:?}", MODULES[id.module()].name),
                })
            })
            .collect::<Result<Vec<_>>>()?;

        let stream = ctx.new_stream().map_err(|e| cuda_err("create the stream", e))?;
        let blas = Blas::new(&stream)?;
        let info = DeviceInfo {
            ordinal,
            name,
            compute_capability: cc,
            sm_count,
            total_mem,
            driver_version,
            kernels_arch: CUDA_ARCH,
            ptx_fallbacks,
        };
        let smem_limits = functions.iter().map(|_| AtomicU32::new(0)).collect();
        Ok(Gpu { ctx, stream, _modules: modules, functions, smem_limits, blas, info })
    }

    /// Device facts.
    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// Makes the context current on this thread.
    pub fn bind(&self) -> Result<()> {
        self.ctx.bind_to_thread().map_err(|e| cuda_err("bind the context", e))
    }

    /// The stream every op of a forward is enqueued on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The raw stream handle.
    pub fn cu_stream(&self) -> sys::CUstream {
        self.stream.cu_stream()
    }

    /// The device handle.
    pub fn cu_device(&self) -> sys::CUdevice {
        self.ctx.cu_device()
    }

    /// cuBLASLt.
    pub fn blas(&self) -> &Blas {
        &self.blas
    }

    /// Free and total device memory in bytes.
    pub fn mem_info(&self) -> Result<(u64, u64)> {
        let (free, total) = self.ctx.mem_get_info().map_err(|e| cuda_err("read memory info", e))?;
        Ok((free as u64, total as u64))
    }

    /// Enqueues kernel `id` on the stream.
    ///
    /// # Safety
    /// `args` must match the kernel's parameter list in number, order and type (each entry points
    /// to a value of the parameter's type), and every device pointer among them must be valid for
    /// the accesses the kernel makes with this launch shape.
    pub unsafe fn launch(&self, id: KernelId, cfg: Launch, args: &mut [*mut c_void]) -> Result<()> {
        let f = self.functions[id as usize].cu_function();
        // SAFETY: forwarded to the caller's contract above.
        unsafe {
            cudarc::driver::result::launch_kernel(f, cfg.grid, cfg.block, cfg.smem, self.cu_stream(), args)
        }
        .map_err(|e| {
            if is_sticky(e.0) {
                cuda_err(&format!("launch kernel `{}`", id.symbol()), e)
            } else {
                Error::Kernel { kernel: id.symbol(), msg: format!("launch failed: {e:?}") }
            }
        })
    }

    /// Lets kernel `id` launch with up to `bytes` of dynamic shared memory. Above 48 KB a kernel
    /// needs this before its first such launch (`CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES`);
    /// ops call it before launching, and only the first call for a kernel (or a larger size)
    /// reaches the driver. Fails with the kernel's name when the device allows less.
    pub fn set_max_dynamic_smem(&self, id: KernelId, bytes: u32) -> Result<()> {
        let limit = &self.smem_limits[id as usize];
        if limit.load(Ordering::Relaxed) >= bytes {
            return Ok(());
        }
        self.functions[id as usize]
            .set_attribute(
                sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                bytes as i32,
            )
            .map_err(|e| Error::Kernel {
                kernel: id.symbol(),
                msg: format!("cannot allow {bytes} bytes of dynamic shared memory: {e:?}"),
            })?;
        limit.fetch_max(bytes, Ordering::Relaxed);
        Ok(())
    }

    /// Waits for all enqueued work; reports asynchronous kernel faults.
    pub fn sync(&self) -> Result<()> {
        self.stream.synchronize().map_err(|e| cuda_err("synchronize the stream", e))
    }

    /// Copies host data into device memory (ordered on the stream; waits for the copy, so the
    /// host slice may be dropped on return).
    pub fn upload<T: Copy>(&self, dst: &mut DViewMut<'_, T>, src: &[T]) -> Result<()> {
        if src.len() != dst.numel() {
            return Err(Error::Shape {
                op: "upload",
                msg: format!("{} host elements into a tensor of {}", src.len(), dst.numel()),
            });
        }
        // SAFETY: dst holds src.len() elements (checked); the copy completes before we return.
        unsafe { cudarc::driver::result::memcpy_htod_async(dst.ptr(), src, self.cu_stream()) }
            .map_err(|e| cuda_err("copy to the device", e))?;
        self.sync()
    }

    /// Copies a device tensor to the host (waits for all work before it).
    pub fn download<T: Copy + Default>(&self, src: &DView<'_, T>) -> Result<Vec<T>> {
        let mut out = vec![T::default(); src.numel()];
        // SAFETY: out holds src.numel() elements; the copy completes before we return.
        unsafe { cudarc::driver::result::memcpy_dtoh_async(&mut out, src.ptr(), self.cu_stream()) }
            .map_err(|e| cuda_err("copy to the host", e))?;
        self.sync()?;
        Ok(out)
    }

    /// Fills a tensor of 2-byte elements with one bit pattern (tests poison outputs with NaN).
    pub fn fill_u16<T>(&self, dst: &mut DViewMut<'_, T>, bits: u16) -> Result<()> {
        assert_eq!(std::mem::size_of::<T>(), 2, "fill_u16 on a {}-byte type", std::mem::size_of::<T>());
        // SAFETY: dst holds numel() 2-byte elements.
        unsafe { sys::cuMemsetD16Async(dst.ptr(), bits, dst.numel(), self.cu_stream()) }
            .result()
            .map_err(|e| cuda_err("fill device memory", e))
    }

    /// Fills a tensor of 4-byte elements with one bit pattern (tests poison f32 outputs with NaN).
    pub fn fill_u32<T>(&self, dst: &mut DViewMut<'_, T>, bits: u32) -> Result<()> {
        assert_eq!(std::mem::size_of::<T>(), 4, "fill_u32 on a {}-byte type", std::mem::size_of::<T>());
        // SAFETY: dst holds numel() 4-byte elements.
        unsafe { sys::cuMemsetD32Async(dst.ptr(), bits, dst.numel(), self.cu_stream()) }
            .result()
            .map_err(|e| cuda_err("fill device memory", e))
    }

    /// A new timing event.
    pub fn event(&self) -> Result<cudarc::driver::CudaEvent> {
        self.ctx
            .new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(|e| cuda_err("create an event", e))
    }
}

#[cfg(test)]
mod tests {
    use super::arch_runs_on;

    #[test]
    fn arch_compatibility() {
        assert!(arch_runs_on("sm_90a", (9, 0)));
        assert!(!arch_runs_on("sm_90a", (8, 0)));
        assert!(!arch_runs_on("sm_90a", (10, 0)));
        assert!(arch_runs_on("sm_80", (8, 6)));
        assert!(arch_runs_on("sm_80", (8, 0)));
        assert!(!arch_runs_on("sm_89", (8, 6)));
        assert!(!arch_runs_on("sm_80", (9, 0)));
    }
}
