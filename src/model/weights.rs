//! The checkpoint on the GPU as stored: every tensor under its canonical name in one device
//! allocation ([`DeviceWeights::upload`]), for `jv4 check` and the upload round-trip test. The
//! forward does not use it: `model::gpu` prepares its own typed layout (fused projections,
//! stacked adapters) from [`crate::model::schema`]. F16/F32 checkpoint tensors (e.g. adapters
//! stored in f32) are converted to bf16 on the host: the reference runs them under bf16 autocast,
//! which rounds them the same way.

use std::collections::HashMap;
use std::time::Instant;

use half::bf16;

use crate::cuda::{BufferLayout, DView, DeviceBuffer, Gpu, Region, Staging};
use crate::model::checkpoint::{Checkpoint, Dtype};
use crate::Result;

/// Each tensor starts on a 256-byte boundary: what cuBLASLt and vector loads like best.
pub const ALIGN: usize = 256;

/// What a load did, for reports.
#[derive(Clone, Debug, Default)]
pub struct LoadReport {
    /// Tensors uploaded.
    pub tensors: usize,
    /// Bytes moved to the GPU (bf16).
    pub bytes: u64,
    /// Tensors converted from F16/F32.
    pub converted: usize,
    /// Wall time of the upload.
    pub seconds: f64,
    /// Where that time went, in order (seconds per phase; empty where not measured).
    pub phases: Vec<(&'static str, f64)>,
}

/// Named bf16 tensors on the device.
pub struct DeviceWeights {
    buffer: DeviceBuffer,
    index: HashMap<String, Region<bf16>>,
}

impl DeviceWeights {
    /// Uploads every tensor of `ckpt` under its canonical name.
    pub fn upload(gpu: &Gpu, ckpt: &Checkpoint) -> Result<(DeviceWeights, LoadReport)> {
        let t0 = Instant::now();
        let mut layout = BufferLayout::new(ALIGN);
        let index: HashMap<String, Region<bf16>> =
            ckpt.tensors().iter().map(|t| (t.name.clone(), layout.push::<bf16>(&t.shape))).collect();
        let mut buffer = DeviceBuffer::new(gpu, layout.bytes())?;
        let mut report = LoadReport::default();
        let mut staging = Staging::default();
        for t in ckpt.tensors() {
            let region = &index[&t.name];
            if t.dtype == Dtype::BF16 {
                // Positioned reads into pinned staging, overlapped with the copies.
                let fill = |off: usize, part: &mut [u8]| ckpt.read_at(t, off, part);
                buffer.stream_in(gpu, &mut staging, region, 0, t.nbytes(), &fill)?;
            } else {
                buffer.fill(gpu, region, &ckpt.to_bf16(t)?)?;
                report.converted += 1;
            }
            report.bytes += (t.numel() * 2) as u64;
        }
        staging.finish(gpu)?;
        report.tensors = index.len();
        report.seconds = t0.elapsed().as_secs_f64();
        Ok((DeviceWeights { buffer, index }, report))
    }

    /// The tensor with this name.
    pub fn get(&self, name: &str) -> Option<DView<'_, bf16>> {
        self.index.get(name).map(|r| self.buffer.at(r))
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
