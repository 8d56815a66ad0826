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
use crate::model::gpu::GpuModel;
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

/// Memory a backend holds, for reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryReport {
    /// Bytes held by the weights (device memory for CUDA, host memory for the CPU).
    pub weights: u64,
    /// Activation bytes in use at the peak since the last reset (0 on the CPU: not tracked).
    pub activations_peak: u64,
    /// The activation budget (0 on the CPU: none).
    pub activations_budget: u64,
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

/// The GPU forward behind the [`Backend`] seam: the context, the weights on the device and the
/// paged activation allocator, all created on the calling thread.
pub struct CudaBackend {
    gpu: Gpu,
    model: GpuModel,
    mem: DeviceAllocator,
    ordinal: usize,
}

impl CudaBackend {
    /// Opens GPU `ordinal`, uploads the weights, and reserves the activation budget:
    /// `mem_budget` bytes, else `$JV4_MEM_BUDGET`, else 90% of the memory free after the weights.
    pub fn load(ordinal: usize, ckpt: &Checkpoint, mem_budget: Option<u64>) -> Result<CudaBackend> {
        let gpu = Gpu::new(ordinal)?;
        let (model, _) = GpuModel::load(&gpu, ckpt)?;
        let (free, _) = gpu.mem_info()?;
        let budget = match (mem_budget, std::env::var(BUDGET_ENV).ok()) {
            (Some(b), _) => b,
            (None, Some(s)) => parse_bytes(&s)?,
            (None, None) => free / 10 * 9,
        };
        let mem = DeviceAllocator::new(&gpu, budget, DEFAULT_PAGE_SIZE)?;
        Ok(CudaBackend { gpu, model, mem, ordinal })
    }

    /// The GPU (for benchmarks and kernel research).
    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// The model on the GPU.
    pub fn model(&self) -> &GpuModel {
        &self.model
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
        self.model.forward(&self.gpu, &mut self.mem, batch)
    }
    fn memory(&self) -> MemoryReport {
        let s = self.mem.stats();
        MemoryReport {
            weights: self.model.device_bytes() as u64,
            activations_peak: s.peak,
            activations_budget: s.budget,
        }
    }
    fn reset_peak(&mut self) {
        self.mem.reset_peak();
    }
}

/// Opens the backend for `device` (on the calling thread).
pub fn open_backend(device: Device, ckpt: &Checkpoint, mem_budget: Option<u64>) -> Result<Box<dyn Backend>> {
    Ok(match device {
        Device::Cpu => Box::new(CpuBackend::load(ckpt)?),
        Device::Cuda(n) => Box::new(CudaBackend::load(n, ckpt, mem_budget)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_parse_and_print() {
        assert_eq!("cpu".parse::<Device>().unwrap(), Device::Cpu);
        assert_eq!("cuda".parse::<Device>().unwrap(), Device::Cuda(0));
        assert_eq!("cuda:3".parse::<Device>().unwrap(), Device::Cuda(3));
        for bad in ["gpu", "cuda:", "cuda:x", "cuda:-1", ""] {
            let e = bad.parse::<Device>().unwrap_err().to_string();
            assert!(e.contains("expected cpu, cuda or cuda:N"), "{bad}: {e}");
        }
        assert_eq!(Device::Cuda(1).to_string(), "cuda:1");
        assert_eq!(Device::Cpu.to_string(), "cpu");
    }
}
