//! The checkpoint on the GPU: every tensor of a validated [`Checkpoint`] in one device
//! allocation, as bf16 (F16/F32 tensors, e.g. adapters stored in f32, are converted on the host:
//! the reference runs them under bf16 autocast, which rounds them the same way).

use std::collections::HashMap;
use std::time::Instant;

use half::bf16;

use crate::cuda::{DView, DeviceBuffer, Gpu};
use crate::model::checkpoint::{Checkpoint, Dtype};
use crate::Result;

/// Each tensor starts on a 256-byte boundary: what cuBLASLt and vector loads like best.
const ALIGN: usize = 256;

/// What a load did, for reports.
#[derive(Clone, Copy, Debug)]
pub struct LoadReport {
    /// Tensors uploaded.
    pub tensors: usize,
    /// Bytes moved to the GPU (bf16).
    pub bytes: u64,
    /// Tensors converted from F16/F32.
    pub converted: usize,
    /// Wall time of the upload.
    pub seconds: f64,
}

/// The weights on the device, by canonical name.
pub struct DeviceWeights {
    buffer: DeviceBuffer,
    index: HashMap<String, (usize, Vec<usize>)>,
}

impl DeviceWeights {
    /// Uploads every tensor of `ckpt`.
    pub fn upload(gpu: &Gpu, ckpt: &Checkpoint) -> Result<(DeviceWeights, LoadReport)> {
        let t0 = Instant::now();
        let mut index = HashMap::with_capacity(ckpt.tensors().len());
        let mut offset = 0usize;
        for t in ckpt.tensors() {
            index.insert(t.name.clone(), (offset, t.shape.clone()));
            offset = (offset + t.numel() * 2).div_ceil(ALIGN) * ALIGN;
        }
        let mut buffer = DeviceBuffer::new(gpu, offset)?;
        let (mut bytes, mut converted) = (0u64, 0usize);
        for t in ckpt.tensors() {
            let at = index[&t.name].0;
            if t.dtype == Dtype::BF16 {
                // Straight from the memory map: no host copy.
                buffer.upload_at(gpu, at, ckpt.data(t))?;
            } else {
                buffer.upload_at(gpu, at, &ckpt.to_bf16(t))?;
                converted += 1;
            }
            bytes += (t.numel() * 2) as u64;
        }
        let report =
            LoadReport { tensors: index.len(), bytes, converted, seconds: t0.elapsed().as_secs_f64() };
        Ok((DeviceWeights { buffer, index }, report))
    }

    /// The tensor with this canonical name.
    pub fn get(&self, name: &str) -> Option<DView<'_, bf16>> {
        let (offset, shape) = self.index.get(name)?;
        self.buffer.view(*offset, shape)
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// Whether there are no tensors.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Device bytes held (with alignment padding).
    pub fn device_bytes(&self) -> usize {
        self.buffer.bytes()
    }
}
