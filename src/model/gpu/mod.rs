//! The model on the GPU (spec §3–§8): packed variable-length batches, one stream, activations
//! from the paged allocator, both heads from one pass. By role:
//!
//! - [`weights`]: preparation and upload (typed structs of regions in one buffer);
//! - [`text`]: the decoder layers;
//! - [`vision`]: the vision tower;
//! - [`heads`]: pooling and the multi-vector projector.
//!
//! The residual stream is f32 and the residual adds ride on the GEMMs (cuBLASLt with beta = 1 and
//! an f32 output), so adding a projection (and its LoRA delta) to it rounds nothing to bf16; the
//! norms read it and write the bf16 activations the next GEMM takes. (HF keeps it in bf16: ours is
//! the more accurate of the two, at 8 extra bytes per token and layer of traffic.)

mod heads;
mod text;
mod vision;
mod weights;

use half::bf16;

use crate::cuda::{DTensor, DView, DeviceAllocator, Gpu};
use crate::model::batch::{BatchOutput, PackedBatch};
use crate::model::checkpoint::Checkpoint;
use crate::model::config::ModelConfig;
use crate::model::weights::LoadReport;
use crate::model::Task;
use crate::ops;
use crate::{Error, Result};
use weights::{LoraInputs, Weights};

/// The model on the GPU.
pub struct GpuModel {
    cfg: ModelConfig,
    w: Weights,
}

/// Where a traced forward records its checkpoints (nothing for a plain forward).
struct Trace<'a>(Option<&'a mut Vec<Vec<f32>>>);

impl Trace<'_> {
    /// Records an f32 tensor (waits for the GPU).
    fn f32(&mut self, gpu: &Gpu, x: &DView<'_, f32>) -> Result<()> {
        if let Some(tr) = self.0.as_deref_mut() {
            tr.push(gpu.download(x)?);
        }
        Ok(())
    }
    /// Records a bf16 tensor, widened (waits for the GPU).
    fn bf16(&mut self, gpu: &Gpu, x: &DView<'_, bf16>) -> Result<()> {
        if let Some(tr) = self.0.as_deref_mut() {
            tr.push(gpu.download(x)?.iter().map(|v| v.to_f32()).collect());
        }
        Ok(())
    }
}

impl GpuModel {
    /// Prepares and uploads the weights ([`weights`]). A tensor missing from the checkpoint is
    /// an [`Error::Tensor`] naming it.
    pub fn load(gpu: &Gpu, ckpt: &Checkpoint) -> Result<(GpuModel, LoadReport)> {
        let (w, report) = weights::prepare(gpu, ckpt)?;
        Ok((GpuModel { cfg: ckpt.config.clone(), w }, report))
    }

    /// The configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// Device bytes held by the weights.
    pub fn device_bytes(&self) -> usize {
        self.w.device_bytes()
    }

    /// One packed forward: single vectors always, multi-vector rows when the batch wants them.
    /// Everything runs on the GPU's stream; the only waits are the input uploads before the
    /// first kernel and the output downloads after the last.
    pub fn forward(&self, gpu: &Gpu, mem: &mut DeviceAllocator, batch: &PackedBatch) -> Result<BatchOutput> {
        let n = batch.tokens();
        if n == 0 || batch.sequences() == 0 {
            return Err(Error::Input("an empty batch".into()));
        }
        let result = self.forward_in(gpu, mem, batch, batch.want_multi, Trace(None));
        // Every block of the forward goes back, also after an error (e.g. out of memory half
        // way); the tensors holding them are gone by now.
        mem.free_all();
        result
    }

    /// [`GpuModel::forward`] that also downloads the residual stream after the embeddings,
    /// after every layer, and the final-norm states (the checkpoints of
    /// [`crate::model::cpu::CpuModel::forward_traced`]), for layer-by-layer comparison. Slow: it
    /// waits for the GPU at every checkpoint.
    pub fn forward_traced(
        &self,
        gpu: &Gpu,
        mem: &mut DeviceAllocator,
        batch: &PackedBatch,
        trace: &mut Vec<Vec<f32>>,
    ) -> Result<BatchOutput> {
        let result = self.forward_in(gpu, mem, batch, true, Trace(Some(trace)));
        mem.free_all();
        result
    }

    fn forward_in(
        &self,
        gpu: &Gpu,
        mem: &mut DeviceAllocator,
        batch: &PackedBatch,
        want_multi: bool,
        mut trace: Trace<'_>,
    ) -> Result<BatchOutput> {
        let t = &self.cfg.text;
        let n = batch.tokens();
        let hid = t.hidden_size;
        let groups = 3 * Task::ALL.len() * self.w.rank; // widest stacked LoRA (qkv)

        // Inputs.
        let ids = upload(gpu, mem, batch.ids(), &[n])?;
        let p = batch.positions();
        let positions = [p.t.as_slice(), &p.h, &p.w].concat();
        let pos = upload(gpu, mem, &positions, &[3, n])?;
        let cu = upload(gpu, mem, batch.cu_seqlens(), &[batch.cu_seqlens().len()])?;
        let row_task = upload(gpu, mem, batch.row_task(), &[n])?;
        let spans_flat: Vec<u32> = batch.spans().iter().flatten().copied().collect();
        let spans = upload(gpu, mem, &spans_flat, &[batch.sequences(), 2])?;

        // The residual stream stays f32: the projections accumulate into it without rounding.
        let mut h = alloc::<f32>(mem, &[n, hid])?;
        let mut x = alloc::<bf16>(mem, &[n, hid])?;
        let mut lora_t = alloc::<bf16>(mem, &[n, groups])?;

        let w = &self.w;
        ops::embedding_f32(gpu, &w.at(&w.embed), &ids.view(), &mut h.view_mut())?;
        if !batch.images().is_empty() {
            // The vision tower's rows replace the embeddings of the <|image_pad|> tokens (§4.3).
            let vis = self.vision(gpu, mem, batch)?;
            let rows = batch.image_rows();
            if rows.len() != vis.shape()[0] {
                return Err(Error::Input(format!(
                    "the batch has {} image tokens but the images produce {} merged tokens",
                    rows.len(),
                    vis.shape()[0]
                )));
            }
            let rows = upload(gpu, mem, rows, &[rows.len()])?;
            ops::scatter_rows_f32(gpu, &vis.view(), &rows.view(), &mut h.view_mut())?;
        }
        trace.f32(gpu, &h.view())?;
        let mut lora = LoraInputs { t: &mut lora_t, row_task: &row_task };
        self.decoder(gpu, mem, &mut h, &mut x, &pos, &cu, batch.max_seqlen(), &mut lora, &mut trace)?;
        trace.bf16(gpu, &x.view())?;
        self.heads(gpu, mem, &x, &spans, want_multi, &mut lora)
    }
}

fn alloc<T>(mem: &mut DeviceAllocator, dims: &[usize]) -> Result<DTensor<T>> {
    let bytes = dims.iter().product::<usize>() * std::mem::size_of::<T>();
    Ok(DTensor::from_block(mem.alloc(bytes as u64)?, dims))
}

fn upload<T: Copy>(gpu: &Gpu, mem: &mut DeviceAllocator, data: &[T], dims: &[usize]) -> Result<DTensor<T>> {
    let mut t = alloc::<T>(mem, dims)?;
    gpu.upload(&mut t.view_mut(), data)?;
    Ok(t)
}
