//! Weights on the GPU: named bf16 tensors in one device allocation. Either the checkpoint as is
//! ([`DeviceWeights::upload`]), or any set of prepared tensors (fused projections, stacked
//! adapters: [`DeviceWeights::allocate`] then [`DeviceWeights::fill`] one at a time, so the host
//! never holds more than one prepared tensor). F16/F32 checkpoint tensors (e.g. adapters stored in
//! f32) are converted to bf16 on the host: the reference runs them under bf16 autocast, which
//! rounds them the same way.

use std::collections::HashMap;
use std::time::Instant;

use half::bf16;

use crate::cuda::{DView, DeviceBuffer, Gpu};
use crate::model::checkpoint::{Checkpoint, Dtype};
use crate::{Error, Result};

/// Each tensor starts on a 256-byte boundary: what cuBLASLt and vector loads like best.
const ALIGN: usize = 256;

/// What a load did, for reports.
#[derive(Clone, Copy, Debug, Default)]
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

/// Named bf16 tensors on the device.
pub struct DeviceWeights {
    buffer: DeviceBuffer,
    index: HashMap<String, (usize, Vec<usize>)>,
}

impl DeviceWeights {
    /// One allocation holding every tensor of `layout` (name, shape), contents undefined until
    /// [`DeviceWeights::fill`]ed.
    pub fn allocate(gpu: &Gpu, layout: &[(String, Vec<usize>)]) -> Result<Self> {
        let mut index = HashMap::with_capacity(layout.len());
        let mut offset = 0usize;
        for (name, shape) in layout {
            index.insert(name.clone(), (offset, shape.clone()));
            offset = (offset + shape.iter().product::<usize>() * 2).div_ceil(ALIGN) * ALIGN;
        }
        Ok(DeviceWeights { buffer: DeviceBuffer::new(gpu, offset)?, index })
    }

    /// Copies `data` into the tensor `name` (waits for the copy).
    pub fn fill(&mut self, gpu: &Gpu, name: &str, data: &[bf16]) -> Result<()> {
        let (offset, shape) = self
            .index
            .get(name)
            .ok_or_else(|| Error::Shape { op: "weights", msg: format!("no tensor {name} in the layout") })?;
        let numel: usize = shape.iter().product();
        if data.len() != numel {
            return Err(Error::Shape {
                op: "weights",
                msg: format!("{name}: {} values for shape {shape:?}", data.len()),
            });
        }
        self.buffer.upload_at(gpu, *offset, data)
    }

    /// Uploads every tensor of `ckpt` under its canonical name.
    pub fn upload(gpu: &Gpu, ckpt: &Checkpoint) -> Result<(DeviceWeights, LoadReport)> {
        let t0 = Instant::now();
        let layout: Vec<_> = ckpt.tensors().iter().map(|t| (t.name.clone(), t.shape.clone())).collect();
        let mut w = DeviceWeights::allocate(gpu, &layout)?;
        let mut report = LoadReport::default();
        for t in ckpt.tensors() {
            let at = w.index[&t.name].0;
            if t.dtype == Dtype::BF16 {
                // Straight from the memory map: no host copy.
                w.buffer.upload_at(gpu, at, ckpt.data(t))?;
            } else {
                w.buffer.upload_at(gpu, at, &ckpt.to_bf16(t))?;
                report.converted += 1;
            }
            report.bytes += (t.numel() * 2) as u64;
        }
        report.tensors = w.index.len();
        report.seconds = t0.elapsed().as_secs_f64();
        Ok((w, report))
    }

    /// The tensor with this name.
    pub fn get(&self, name: &str) -> Option<DView<'_, bf16>> {
        let (offset, shape) = self.index.get(name)?;
        self.buffer.view(*offset, shape)
    }

    /// The tensor with this name; a missing one is a bug in the layout (validated at load).
    pub fn expect(&self, name: &str) -> DView<'_, bf16> {
        self.get(name).unwrap_or_else(|| panic!("weight {name} missing from the device layout"))
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
