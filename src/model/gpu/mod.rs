//! The model on the GPU (docs/MODEL.md §3–§8): packed variable-length batches, one stream, activations
//! from an arena over the paged allocator, both heads from one pass. By role:
//!
//! - `weights`: preparation and upload (typed structs of regions in one buffer);
//! - `text`: the decoder layers;
//! - `vision`: the vision tower;
//! - `heads`: pooling and the multi-vector projector.
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

use crate::cuda::{Arena, BufferLayout, DView, DeviceAllocator, Gpu};
use crate::model::batch::{BatchOutput, PackedBatch};
use crate::model::checkpoint::Checkpoint;
use crate::model::config::ModelConfig;
use crate::model::weights::{LoadReport, ALIGN};
use crate::model::Task;
use crate::ops;
use crate::{Error, Result};
pub use weights::LoraMode;
use weights::{task_runs, LoraInputs, Weights};

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
    /// Prepares and uploads the weights (`weights`). A tensor missing from the checkpoint is
    /// an [`Error::Tensor`] naming it.
    pub fn load(gpu: &Gpu, ckpt: &Checkpoint) -> Result<(GpuModel, LoadReport)> {
        Self::load_with(gpu, ckpt, LoraMode::default().or_env()?)
    }

    /// [`GpuModel::load`] with the task adapters prepared as `lora` says.
    pub fn load_with(gpu: &Gpu, ckpt: &Checkpoint, lora: LoraMode) -> Result<(GpuModel, LoadReport)> {
        let (w, report) = weights::prepare(gpu, ckpt, lora)?;
        Ok((GpuModel { cfg: ckpt.config.clone(), w }, report))
    }

    /// How the task adapters were prepared.
    pub fn lora_mode(&self) -> LoraMode {
        if self.w.merged() {
            LoraMode::Merged
        } else {
            LoraMode::Stacked
        }
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
    /// All host inputs go to the device in one asynchronous copy before the first kernel, and
    /// everything runs on the GPU's stream without waiting; the only waits are the output
    /// downloads after the last kernel. Every activation comes from one arena over `mem`, given
    /// back when the forward returns (also after an error, e.g. out of memory half way).
    pub fn forward(&self, gpu: &Gpu, mem: &mut DeviceAllocator, batch: &PackedBatch) -> Result<BatchOutput> {
        let arena = mem.arena();
        self.forward_in(gpu, &arena, batch, batch.want_multi, Trace(None))
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
        let arena = mem.arena();
        self.forward_in(gpu, &arena, batch, true, Trace(Some(trace)))
    }

    fn forward_in(
        &self,
        gpu: &Gpu,
        arena: &Arena<'_>,
        batch: &PackedBatch,
        want_multi: bool,
        mut trace: Trace<'_>,
    ) -> Result<BatchOutput> {
        let t = &self.cfg.text;
        let n = batch.tokens();
        if n == 0 || batch.sequences() == 0 {
            return Err(Error::Input("an empty batch".into()));
        }
        let hid = t.hidden_size;
        let groups = 3 * Task::ALL.len() * self.w.rank; // widest stacked LoRA (qkv)

        // Every host input of the forward, planned into one layout, staged in pinned memory and
        // copied with one asynchronous copy (no wait: stream order puts it before the kernels).
        let mut lay = BufferLayout::new(ALIGN);
        let ids = lay.push::<u32>(&[n]);
        let pos = lay.push::<i32>(&[3, n]);
        let cu = lay.push::<i32>(&[batch.cu_seqlens().len()]);
        let row_task = lay.push::<u8>(&[n]);
        // The main pooling spans, then the extra ones (late chunking): one launch pools them all.
        let spans = lay.push::<u32>(&[batch.sequences() + batch.chunk_spans().len(), 2]);
        let rows = lay.push::<u32>(&[batch.image_rows().len()]);
        let vision = if batch.images().is_empty() { None } else { Some(self.plan_vision(batch, &mut lay)?) };
        if let Some(v) = &vision {
            if batch.image_rows().len() != v.merged_tokens() {
                return Err(Error::Input(format!(
                    "the batch has {} image tokens but the images produce {} merged tokens",
                    batch.image_rows().len(),
                    v.merged_tokens()
                )));
            }
        }
        let staged = arena.upload(gpu, &lay, |st| {
            st.put(&ids, batch.ids())?;
            let p = batch.positions();
            for (dst, src) in st.slice(&pos).chunks_exact_mut(n).zip([&p.t, &p.h, &p.w]) {
                if src.len() != n {
                    return Err(Error::Input(format!("{} positions for {n} tokens", src.len())));
                }
                dst.copy_from_slice(src);
            }
            st.put(&cu, batch.cu_seqlens())?;
            st.put(&row_task, batch.row_task())?;
            for (dst, src) in st.slice(&spans).chunks_exact_mut(2).zip(batch.all_spans()) {
                dst.copy_from_slice(src);
            }
            st.put(&rows, batch.image_rows())?;
            match &vision {
                Some(v) => v.write(st, batch),
                None => Ok(()),
            }
        })?;

        // The residual stream stays f32: the projections accumulate into it without rounding.
        let mut h = arena.alloc::<f32>(&[n, hid])?;
        let w = &self.w;
        ops::embedding_f32(gpu, &w.at(&w.embed), &staged.view(&ids), &mut h.view_mut())?;
        if let Some(v) = &vision {
            // The vision tower's rows replace the embeddings of the <|image_pad|> tokens (§4.3).
            // Its activations live in an inner arena, given back before the decoder allocates.
            let scope = arena.nested();
            let out = self.tower(gpu, &scope, &v.inputs(&staged))?;
            ops::scatter_rows_f32(gpu, &out.view(), &staged.view(&rows), &mut h.view_mut())?;
        }
        trace.f32(gpu, &h.view())?;
        let mut x = arena.alloc::<bf16>(&[n, hid])?;
        // Stacked LoRA needs a scratch for the shrink; merged weights only the task runs.
        let mut lora_t = if self.w.merged() { None } else { Some(arena.alloc::<bf16>(&[n, groups])?) };
        let runs = task_runs(batch.row_task());
        let mut lora = LoraInputs { t: lora_t.as_mut(), row_task: staged.view(&row_task), runs: &runs };
        let (pos, cu) = (staged.view(&pos), staged.view(&cu));
        self.decoder(gpu, arena, &mut h, &mut x, &pos, &cu, batch.max_seqlen(), &mut lora, &mut trace)?;
        trace.bf16(gpu, &x.view())?;
        self.heads(gpu, arena, &x, &staged.view(&spans), batch.sequences(), want_multi, &mut lora)
    }
}
