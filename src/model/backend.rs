//! The seam between the engine and the hardware: a [`Backend`] runs one [`PackedBatch`] forward
//! and returns its vectors. Two implementations, kept independent (the CPU one is the oracle of the
//! GPU one; they share only the batch, the checkpoint and the constants):
//!
//! - [`CudaBackend`]: the GPU forward (`model::gpu`) with its paged activation allocator;
//! - [`CpuBackend`]: the plain f32 CPU forward (`model::cpu`): exact and slow, for tests, CI and
//!   development on machines without a GPU. Not meant for speed.
//!
//! A backend is created on the thread that will run it (the engine's worker), so a CUDA context
//! is only ever current there.

use std::fmt;
use std::str::FromStr;

use crate::cuda::{parse_bytes, DeviceAllocator, Gpu, BUDGET_ENV, DEFAULT_PAGE_SIZE};
use crate::model::batch::{BatchOutput, PackedBatch};
use crate::model::checkpoint::Checkpoint;
use crate::model::config::ModelConfig;
use crate::model::cpu::CpuModel;
use crate::model::gpu::{GpuModel, GraphStats, Graphs, LoraMode, GRAPH_POOL_BYTES};
use crate::{Error, Result};

/// Where a model runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Device {
    /// The f32 CPU forward (exact, slow).
    Cpu,
    /// CUDA device of this ordinal.
    Cuda(usize),
}

impl Default for Device {
    fn default() -> Self {
        Device::Cuda(0)
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl FromStr for Device {
    type Err = Error;

    /// `cpu`, `cuda` (device 0) or `cuda:N`.
    fn from_str(s: &str) -> Result<Device> {
        let bad = || Error::Input(format!("device {s:?}: expected cpu, cuda or cuda:N"));
        match s.trim() {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            t => t.strip_prefix("cuda:").and_then(|n| n.parse().ok()).map(Device::Cuda).ok_or_else(bad),
        }
    }
}

impl Device {
    /// A list of devices: `all` (every CUDA device the driver reports; [`Error::NoGpu`] when it
    /// reports none), or comma-separated devices, each `cpu`, `cuda`, `cuda:N` or an ordinal `N`.
    pub fn parse_list(s: &str) -> Result<Vec<Device>> {
        if s.trim() == "all" {
            return Ok((0..cuda_device_count()?).map(Device::Cuda).collect());
        }
        s.split(',')
            .map(|d| match d.trim().parse::<usize>() {
                Ok(n) => Ok(Device::Cuda(n)),
                Err(_) => d.parse().map_err(|e: Error| {
                    Error::Input(format!("devices {s:?}: {e}; or all, or a list such as 0,1 or cpu,cpu"))
                }),
            })
            .collect()
    }
}

pub use crate::cuda::device_count as cuda_device_count;

/// Memory a backend holds, for reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryReport {
    /// Bytes held by the weights (device memory for CUDA, host memory for the CPU).
    pub weights: u64,
    /// Activation bytes in use at the peak since the last reset (0 on the CPU: not tracked).
    pub activations_peak: u64,
    /// The activation budget (0 on the CPU: none).
    pub activations_budget: u64,
    /// Activation bytes taken from the device now (the allocator's mapped pages; 0 on the CPU).
    pub activations_mapped: u64,
    /// Device memory in use by every process on the device (total − free, as the driver reports
    /// it; 0 on the CPU or when the driver does not answer).
    pub device_used: u64,
    /// cuBLASLt plans cached (0 on the CPU).
    pub plans: u64,
    /// CUDA graphs held (0 on the CPU or with graphs off); bounded by their LRU.
    pub graphs: u64,
    /// Graphs captured since the engine opened (each capture past the bound evicts one).
    pub graph_captures: u64,
    /// Device bytes of the graphs' memory pool, mapped at start (0 without graphs); not part of
    /// the activation figures.
    pub graph_pool: u64,
}

/// Runs forwards of packed batches. See the module documentation.
pub trait Backend {
    /// The model's configuration.
    fn config(&self) -> &ModelConfig;

    /// Where it runs.
    fn device(&self) -> Device;

    /// A one-line description (device name, for logs).
    fn describe(&self) -> String;

    /// One forward: the single vectors of every sequence, and the multi-vector rows when the batch
    /// asks for them. An [`Error::OutOfMemory`] leaves the backend usable (split and retry).
    fn forward(&mut self, batch: &PackedBatch) -> Result<BatchOutput>;

    /// Memory held.
    fn memory(&self) -> MemoryReport;

    /// Restarts the activation peak.
    fn reset_peak(&mut self) {}

    /// TEST HOOK (fault injection), not an API: makes the device fail as a real fault does (a
    /// kernel that traps, leaving a sticky error in the context). Only the CUDA backend can.
    #[doc(hidden)]
    fn inject_fault(&mut self) -> Result<()> {
        Err(Error::Input(format!("{}: no device fault to inject", self.describe())))
    }
}

/// The f32 CPU forward behind the [`Backend`] seam.
pub struct CpuBackend {
    model: CpuModel,
}

impl CpuBackend {
    /// Widens the checkpoint's weights to f32.
    pub fn load(ckpt: &Checkpoint) -> Result<CpuBackend> {
        Ok(CpuBackend { model: CpuModel::from_checkpoint(ckpt)? })
    }
}

impl Backend for CpuBackend {
    fn config(&self) -> &ModelConfig {
        self.model.config()
    }
    fn device(&self) -> Device {
        Device::Cpu
    }
    fn describe(&self) -> String {
        "cpu (f32 reference forward)".into()
    }
    fn forward(&mut self, batch: &PackedBatch) -> Result<BatchOutput> {
        self.model.forward(batch)
    }
    fn memory(&self) -> MemoryReport {
        MemoryReport { weights: self.model.host_bytes() as u64, ..MemoryReport::default() }
    }
}

/// Whether a device is still usable. Once a forward has hit a sticky fault ([`Error::DeviceLost`])
/// the device stays lost: every later call gets that first error at once, without touching the
/// device, until the host drops the engine and opens a new one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeviceHealth {
    lost: Option<String>,
}

impl DeviceHealth {
    /// `Err(DeviceLost)` once lost.
    pub fn check(&self) -> Result<()> {
        match &self.lost {
            Some(m) => Err(Error::DeviceLost(m.clone())),
            None => Ok(()),
        }
    }

    /// Whether a sticky fault has been seen.
    pub fn is_lost(&self) -> bool {
        self.lost.is_some()
    }

    /// Passes `r` on, remembering a `DeviceLost` in it (the first one is kept).
    pub fn observe<T>(&mut self, r: Result<T>) -> Result<T> {
        if let Err(Error::DeviceLost(m)) = &r {
            self.lost.get_or_insert_with(|| m.clone());
        }
        r
    }
}

/// Whether a failed forward may have left a sticky fault behind that the error itself does not
/// show (e.g. cuBLAS reporting an execution failure), so the context must be probed.
fn needs_probe(e: &Error) -> bool {
    !matches!(
        e,
        Error::DeviceLost(_)
            | Error::OutOfMemory { .. }
            | Error::Input(_)
            | Error::Shape { .. }
            | Error::NonFinite(_)
    )
}

/// The GPU forward behind the [`Backend`] seam: the context, the weights on the device and the
/// paged activation allocator, all created on the calling thread.
pub struct CudaBackend {
    gpu: Gpu,
    model: GpuModel,
    mem: DeviceAllocator,
    /// Short text forwards through CUDA graphs (`model::gpu::graph`); `None` when turned off.
    graphs: Option<Graphs>,
    ordinal: usize,
    health: DeviceHealth,
}

impl CudaBackend {
    /// Opens GPU `ordinal`, uploads the weights, and reserves the activation budget:
    /// `mem_budget` bytes, else `$JV4_MEM_BUDGET`, else 90% of the memory free after the weights.
    /// `lora`: how the task adapters are prepared (`$JV4_LORA` overrides).
    pub fn load(
        ordinal: usize,
        ckpt: &Checkpoint,
        mem_budget: Option<u64>,
        lora: LoraMode,
    ) -> Result<CudaBackend> {
        let gpu = Gpu::new(ordinal)?;
        let asked = match (mem_budget, std::env::var(BUDGET_ENV).ok()) {
            (Some(b), _) => Some(b),
            (None, Some(s)) => Some(parse_bytes(&s)?),
            (None, None) => None,
        };
        let (model, _) = GpuModel::load_with(&gpu, ckpt, lora.or_env()?)?;
        let (free, _) = gpu.mem_info()?;
        let budget = asked.unwrap_or(free / 10 * 9);
        // The graph pool comes out of the budget; a budget too small to spare it runs eagerly.
        let graphs = if Graphs::enabled_by_env() && budget >= 8 * GRAPH_POOL_BYTES {
            Some(Graphs::new(&gpu)?)
        } else {
            None
        };
        let budget = budget - graphs.as_ref().map_or(0, |_| GRAPH_POOL_BYTES);
        let mem = DeviceAllocator::new(&gpu, budget, DEFAULT_PAGE_SIZE)?;
        Ok(CudaBackend { gpu, model, mem, graphs, ordinal, health: DeviceHealth::default() })
    }

    /// The GPU (for benchmarks and kernel research).
    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// The model on the GPU.
    pub fn model(&self) -> &GpuModel {
        &self.model
    }

    /// The CUDA graph counters (`None`: graphs are off).
    pub fn graph_stats(&self) -> Option<GraphStats> {
        self.graphs.as_ref().map(Graphs::stats)
    }

    /// Turns CUDA graphs off (every later forward eager), e.g. to compare the two paths.
    pub fn disable_graphs(&mut self) {
        self.graphs = None;
    }

    /// Whether the device is still usable.
    pub fn health(&self) -> &DeviceHealth {
        &self.health
    }

    /// Gives the activation pages no allocation uses back to the driver; returns the bytes freed.
    pub fn trim(&mut self) -> Result<u64> {
        self.health.check()?;
        let r = self.gpu.bind().and_then(|()| self.mem.trim());
        self.health.observe(r)
    }
}

impl Backend for CudaBackend {
    fn config(&self) -> &ModelConfig {
        self.model.config()
    }
    fn device(&self) -> Device {
        Device::Cuda(self.ordinal)
    }
    fn describe(&self) -> String {
        format!("cuda:{} ({})", self.ordinal, self.gpu.info().name)
    }
    fn forward(&mut self, batch: &PackedBatch) -> Result<BatchOutput> {
        self.health.check()?;
        // Bind on entry: the engine calls from its worker thread, a benchmark may call from any.
        let r = self.gpu.bind().and_then(|()| match &mut self.graphs {
            Some(g) => self.model.forward_graphed(&self.gpu, &mut self.mem, g, batch),
            None => self.model.forward(&self.gpu, &mut self.mem, batch),
        });
        let r = match r {
            // A sticky fault makes every later call fail with it: a synchronise tells.
            Err(e) if needs_probe(&e) => Err(match self.gpu.sync() {
                Err(lost @ Error::DeviceLost(_)) => lost,
                _ => e,
            }),
            r => r,
        };
        self.health.observe(r)
    }
    fn memory(&self) -> MemoryReport {
        let s = self.mem.stats();
        let device_used = self.gpu.mem_info().map_or(0, |(free, total)| total.saturating_sub(free));
        let g = self.graphs.as_ref().map(|g| g.stats()).unwrap_or_default();
        MemoryReport {
            weights: self.model.device_bytes() as u64,
            activations_peak: s.peak,
            activations_budget: s.budget,
            activations_mapped: s.mapped,
            device_used,
            plans: self.gpu.blas().plan_count() as u64,
            graphs: g.held as u64,
            graph_captures: g.captures,
            graph_pool: if self.graphs.is_some() { GRAPH_POOL_BYTES } else { 0 },
        }
    }
    fn reset_peak(&mut self) {
        self.mem.reset_peak();
    }
    fn inject_fault(&mut self) -> Result<()> {
        self.gpu.bind()?;
        crate::ops::fault::fault_trap(&self.gpu, true)
    }
}

/// Opens the backend for `device` (on the calling thread).
/// `lora` applies to the GPU (the CPU oracle always adds the LoRA unmerged, in f32).
pub fn open_backend(
    device: Device,
    ckpt: &Checkpoint,
    mem_budget: Option<u64>,
    lora: LoraMode,
) -> Result<Box<dyn Backend>> {
    Ok(match device {
        Device::Cpu => Box::new(CpuBackend::load(ckpt)?),
        Device::Cuda(n) => Box::new(CudaBackend::load(n, ckpt, mem_budget, lora)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lost_device_stays_lost_with_its_first_error() {
        let mut h = DeviceHealth::default();
        assert!(h.check().is_ok());
        let oom: Result<()> = Err(Error::OutOfMemory { requested: 1, in_use: 0, budget: 0 });
        assert!(h.observe(oom).is_err());
        assert!(!h.is_lost(), "out of memory is recoverable");
        assert!(h.observe(Err::<(), _>(Error::DeviceLost("illegal address".into()))).is_err());
        assert!(h.observe(Err::<(), _>(Error::DeviceLost("later".into()))).is_err());
        for _ in 0..3 {
            let e = h.check().unwrap_err();
            assert!(matches!(&e, Error::DeviceLost(m) if m == "illegal address"), "{e}");
        }
        assert!(needs_probe(&Error::Blas("execution failed".into())));
        assert!(!needs_probe(&Error::Input("x".into())));
    }

    #[test]
    fn sticky_driver_errors_are_device_lost() {
        use cudarc::driver::sys::CUresult as R;
        for r in [R::CUDA_ERROR_ILLEGAL_ADDRESS, R::CUDA_ERROR_LAUNCH_FAILED, R::CUDA_ERROR_ECC_UNCORRECTABLE]
        {
            assert!(crate::cuda::is_sticky(r), "{r:?}");
        }
        for r in [R::CUDA_ERROR_OUT_OF_MEMORY, R::CUDA_ERROR_INVALID_VALUE, R::CUDA_SUCCESS] {
            assert!(!crate::cuda::is_sticky(r), "{r:?}");
        }
    }

    #[test]
    fn devices_parse_and_print() {
        assert_eq!("cpu".parse::<Device>().unwrap(), Device::Cpu);
        assert_eq!("cuda".parse::<Device>().unwrap(), Device::Cuda(0));
        assert_eq!("cuda:3".parse::<Device>().unwrap(), Device::Cuda(3));
        for bad in ["gpu", "cuda:", "cuda:x", "cuda:-1", ""] {
            let e = bad.parse::<Device>().unwrap_err().to_string();
            assert!(e.contains("expected cpu, cuda or cuda:N"), "{bad}: {e}");
        }
        assert_eq!(Device::parse_list("0,1").unwrap(), [Device::Cuda(0), Device::Cuda(1)]);
        assert_eq!(Device::parse_list("cpu, cpu").unwrap(), [Device::Cpu, Device::Cpu]);
        assert_eq!(Device::parse_list("cuda:2,3,cuda").unwrap(), [2, 3, 0].map(Device::Cuda));
        for bad in ["", "0,,1", "gpu", "1,x", "-1"] {
            let e = Device::parse_list(bad).unwrap_err().to_string();
            assert!(e.contains("or all, or a list"), "{bad}: {e}");
        }
        // `all`: every device the driver reports, or a clear error on a machine without one.
        match Device::parse_list("all") {
            Ok(all) => assert!(!all.is_empty() && all.iter().enumerate().all(|(i, &d)| d == Device::Cuda(i))),
            Err(e) => assert!(matches!(e, Error::NoGpu(_)), "{e}"),
        }
        assert_eq!(Device::Cuda(1).to_string(), "cuda:1");
        assert_eq!(Device::Cpu.to_string(), "cpu");
    }
}
