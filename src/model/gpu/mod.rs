//! The model on the GPU (docs/MODEL.md §3–§8): packed variable-length batches, one stream, activations
//! from an arena over the paged allocator, both heads from one pass. By role:
//!
//! - `weights`: preparation and upload (typed structs of regions in one buffer);
//! - `text`: the decoder layers;
//! - `vision`: the vision tower;
//! - `heads`: pooling and the multi-vector projector.
//!
//! The residual streams (the decoder's and the vision tower's) are f32 and the residual adds ride
//! on the GEMMs (cuBLASLt with beta = 1 and an f32 output, the vision blocks' biases f32 in the same
//! epilogue), so adding a projection (and its LoRA delta) to it rounds nothing to bf16; the norms
//! read it and write the bf16 activations the next GEMM takes. (HF keeps it in bf16: ours is the
//! more accurate of the two, at 8 extra bytes per token and layer of traffic.)

mod graph;
mod heads;
mod text;
mod vision;
mod weights;

use half::bf16;

use crate::cuda::{Arena, BufferLayout, DView, DeviceAllocator, Gpu, Region, StageWriter, Staged, Tensor};
use crate::model::batch::{BatchOutput, PackedBatch};
use crate::model::checkpoint::Checkpoint;
use crate::model::config::ModelConfig;
use crate::model::weights::{LoadReport, ALIGN};
use crate::model::Task;
use crate::ops;
use crate::{Error, Result};
pub use graph::{GraphStats, Graphs, GRAPHS_ENV, GRAPH_CACHE, GRAPH_MAX_TOKENS, GRAPH_POOL_BYTES};
pub use weights::LoraMode;
use weights::{task_runs, LoraInputs, TaskRun, Weights};

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
        if batch.tokens() == 0 || batch.sequences() == 0 {
            return Err(Error::Input("an empty batch".into()));
        }
        let dims = Dims::of(batch);
        let inputs = self.plan_inputs(batch, &dims)?;
        let staged = arena.upload(gpu, &inputs.lay, |st| inputs.write(st, batch, &dims, None))?;
        let runs = task_runs(batch.row_task());
        let out = self.compute(gpu, arena, &staged, &inputs, &dims, &runs, want_multi, &mut trace)?;
        let multi = out.multi.as_ref().map(|m| m.view());
        fetch(gpu, &out.single.view(), multi.as_ref(), batch, want_multi)
    }

    /// Plans the forward's host inputs for `dims` (the batch's own, or a graph's bucket) into one
    /// layout, staged in pinned memory and copied with one asynchronous copy (no wait: stream
    /// order puts it before the kernels).
    fn plan_inputs(&self, batch: &PackedBatch, dims: &Dims) -> Result<Inputs> {
        let n = dims.tokens;
        let mut lay = BufferLayout::new(ALIGN);
        let ids = lay.push::<u32>(&[n]);
        let pos = lay.push::<i32>(&[3, n]);
        let cu = lay.push::<i32>(&[dims.segments + 1]);
        let row_task = lay.push::<u8>(&[n]);
        // The main pooling spans, then the extra ones (late chunking): one launch pools them all.
        let spans = lay.push::<u32>(&[dims.spans, 2]);
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
        Ok(Inputs { lay, ids, pos, cu, row_task, spans, rows, vision })
    }

    /// The forward's kernels on staged inputs, every activation from `arena`; nothing waits for
    /// the GPU (unless `trace` records). Returns the pooled rows `[dims.spans, hidden]` and, when
    /// `want_multi`, the multi-vector rows `[dims.tokens, proj_dim]`, on the device.
    #[allow(clippy::too_many_arguments)]
    fn compute<'a>(
        &self,
        gpu: &Gpu,
        arena: &'a Arena<'_>,
        staged: &Staged<'_>,
        inputs: &Inputs,
        dims: &Dims,
        runs: &[TaskRun],
        want_multi: bool,
        trace: &mut Trace<'_>,
    ) -> Result<Outputs<'a>> {
        let t = &self.cfg.text;
        let n = dims.tokens;
        let hid = t.hidden_size;
        let groups = 3 * Task::ALL.len() * self.w.rank; // widest stacked LoRA (qkv)

        // The residual stream stays f32: the projections accumulate into it without rounding.
        let mut h = arena.alloc::<f32>(&[n, hid])?;
        let w = &self.w;
        ops::embedding_f32(gpu, &w.at(&w.embed), &staged.view(&inputs.ids), &mut h.view_mut())?;
        if let Some(v) = &inputs.vision {
            // The vision tower's rows replace the embeddings of the <|image_pad|> tokens (§4.3).
            // Its activations live in an inner arena, given back before the decoder allocates.
            let scope = arena.nested();
            let out = self.tower(gpu, &scope, &v.inputs(staged))?;
            ops::scatter_rows_f32(gpu, &out.view(), &staged.view(&inputs.rows), &mut h.view_mut())?;
        }
        trace.f32(gpu, &h.view())?;
        let mut x = arena.alloc::<bf16>(&[n, hid])?;
        // Stacked LoRA needs a scratch for the shrink; merged weights only the task runs.
        let mut lora_t = if self.w.merged() { None } else { Some(arena.alloc::<bf16>(&[n, groups])?) };
        let mut lora = LoraInputs { t: lora_t.as_mut(), row_task: staged.view(&inputs.row_task), runs };
        let (pos, cu) = (staged.view(&inputs.pos), staged.view(&inputs.cu));
        self.decoder(gpu, arena, &mut h, &mut x, &pos, &cu, dims, &mut lora, trace)?;
        trace.bf16(gpu, &x.view())?;
        self.heads(gpu, arena, &x, &staged.view(&inputs.spans), want_multi, &mut lora)
    }
}

/// What the kernels of one forward are launched for: token rows, segments, the longest segment
/// and pooled rows. For an eager forward the batch's own; for a graph the bucket's (rounded up,
/// see `graph`), the extra rows in no segment, the extra segments empty, the extra spans dummies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Dims {
    /// Token rows.
    pub tokens: usize,
    /// Whether rows past the batch's are padding, in no segment (a graph's bucket).
    pub padded: bool,
    /// Segments (cu_seqlens holds one more entry).
    pub segments: usize,
    /// The longest segment the attention is launched for (at least the batch's).
    pub max_seqlen: usize,
    /// Pooling spans (the main ones, then the chunk ones, then dummies).
    pub spans: usize,
}

impl Dims {
    /// The batch's own dimensions.
    pub fn of(batch: &PackedBatch) -> Dims {
        Dims {
            tokens: batch.tokens(),
            padded: false,
            segments: batch.sequences(),
            max_seqlen: batch.max_seqlen(),
            spans: batch.sequences() + batch.chunk_spans().len(),
        }
    }
}

/// The staged host inputs of a forward: their layout and regions.
struct Inputs {
    lay: BufferLayout,
    ids: Region<u32>,
    pos: Region<i32>,
    cu: Region<i32>,
    row_task: Region<u8>,
    spans: Region<u32>,
    rows: Region<u32>,
    vision: Option<vision::VisionStage>,
}

impl Inputs {
    /// Writes the batch into the staging buffer, padded to `dims`: padding rows get token id 0,
    /// position 0 and row task `pad_task` (none given: no task, so no LoRA delta), the extra
    /// segments are empty (cu_seqlens repeats the batch's end), and the extra spans pool row 0.
    fn write(
        &self,
        st: &mut StageWriter<'_>,
        batch: &PackedBatch,
        dims: &Dims,
        pad_task: Option<u8>,
    ) -> Result<()> {
        let (n, real) = (dims.tokens, batch.tokens());
        let spans_real = batch.sequences() + batch.chunk_spans().len();
        if real > n || batch.sequences() > dims.segments || spans_real > dims.spans {
            return Err(Error::Internal(format!(
                "a batch of {real} tokens, {} sequences and {spans_real} spans staged for {dims:?}",
                batch.sequences()
            )));
        }
        let ids = st.slice(&self.ids);
        ids[..real].copy_from_slice(batch.ids());
        ids[real..].fill(0);
        let p = batch.positions();
        for (dst, src) in st.slice(&self.pos).chunks_exact_mut(n).zip([&p.t, &p.h, &p.w]) {
            if src.len() != real {
                return Err(Error::Input(format!("{} positions for {real} tokens", src.len())));
            }
            dst[..real].copy_from_slice(src);
            dst[real..].fill(0);
        }
        let cu = st.slice(&self.cu);
        let real_cu = batch.cu_seqlens();
        cu[..real_cu.len()].copy_from_slice(real_cu);
        let end = real_cu.last().copied().unwrap_or(0);
        cu[real_cu.len()..].fill(end);
        let rt = st.slice(&self.row_task);
        rt[..real].copy_from_slice(batch.row_task());
        rt[real..].fill(pad_task.unwrap_or(u8::MAX));
        let spans = st.slice(&self.spans);
        for (dst, src) in spans.chunks_exact_mut(2).zip(batch.all_spans()) {
            dst.copy_from_slice(src);
        }
        for dst in spans[spans_real * 2..].chunks_exact_mut(2) {
            dst.copy_from_slice(&[0, 1]);
        }
        st.put(&self.rows, batch.image_rows())?;
        match &self.vision {
            Some(v) => v.write(st, batch),
            None => Ok(()),
        }
    }
}

/// A forward's outputs on the device (see [`GpuModel::compute`]).
struct Outputs<'a> {
    single: Tensor<'a, f32>,
    multi: Option<Tensor<'a, f32>>,
}

/// Downloads what the batch asked for from a forward's outputs: its pooled rows, split into the
/// main and the chunk ones, and its multi-vector rows when wanted. The first download waits for
/// all the work, the second finds it done.
fn fetch(
    gpu: &Gpu,
    single: &DView<'_, f32>,
    multi: Option<&DView<'_, f32>>,
    batch: &PackedBatch,
    want_multi: bool,
) -> Result<BatchOutput> {
    let hid = single.shape()[1];
    let multi = match (want_multi, multi) {
        (true, Some(m)) => Some(gpu.download(&m.rows(0..batch.tokens()))?),
        (true, None) => return Err(Error::Internal("multi-vector rows wanted but not computed".into())),
        (false, _) => None,
    };
    let spans = batch.sequences() + batch.chunk_spans().len();
    let mut single = gpu.download(&single.rows(0..spans))?;
    let chunk_single = single.split_off(batch.sequences() * hid);
    Ok(BatchOutput { single, multi, chunk_single })
}
