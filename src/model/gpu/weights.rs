//! Weights preparation (docs/MODEL.md §6, §9): the checkpoint's tensors, walked through its
//! [`Schema`], become typed structs of regions in one device buffer, prepared once at load: q/k/v
//! fused into one `[q+k+v, hidden]` projection (with its bias), gate/up into one
//! `[2·inter, hidden]` projection (the SwiGLU kernel reads that layout), the patch embedding's
//! Conv3d as its matrix, and each adapted projection's LoRA stacked for all tasks:
//! `A_all = [A_{τ0,p0}; A_{τ0,p1}; …; A_{τ2,pP}]` (task-major) and a block matrix `B_all` whose
//! output rows of projection `p` hold `scale·B_{τ,p}` in the columns of `(τ, p)` and zeros
//! elsewhere. A batch that mixes tasks then costs two extra GEMMs per projection whatever the mix:
//! `t = x·A_allᵀ`, zero in each row the column groups of the other tasks (`lora_mask`), and
//! `y += t·B_allᵀ`. Every row gets exactly its own task's delta, so a request's vectors do not
//! depend on what else shares its batch.
//!
//! **Folded** (the stacked default for qkv, gate_up and down, whose input producers — the two
//! norms and SwiGLU — can write beside their output): the weight is `[W | B_all | 0]`
//! `[n, k + g8]` (g8: the stacked columns rounded up to 8, A padded with zero rows to match) and
//! the input one buffer `[x | t]`; the shrink writes t beside x (`linear_cols`), the mask zeroes
//! the other tasks' groups in place, and one GEMM gives `x·Wᵀ + t·B_allᵀ` with one accumulation
//! and one rounding. That saves the expand's re-read and re-write of y (+9% tokens/s at
//! 32 × 512 on the H200, benches/NOTES.md). o_proj (fed by the attention) and the projector keep
//! the separate expand. `JV4_LORA_FOLD=0` turns folding off.
//!
//! With [`LoraMode::Merged`] the adapted projections are instead **task-merged**: one
//! weight per task, `W_τ = W + B_τ·A_τ` (scale folded into B), computed once at load on the GPU
//! with f32 accumulation and one rounding to bf16, and the base weight is not kept. A forward then
//! runs one plain GEMM per run of same-task rows ([`TaskRun`]): the LoRA costs nothing at run
//! time, at the price of three copies of the decoder's adapted weights (≈ 16.6 GB at full size
//! instead of 5.5 GB + the stacked factors).
//!
//! **Loading.** Two kinds of work run at once. The tensors used as stored and every base weight
//! stream from the shards through the pinned staging (positioned reads on several threads,
//! overlapped with the DMA), a folded one straight into the first k columns of `[W | B_all | 0]`
//! by 2-D copies. Biases, the stacked LoRA factors and the padded vision MLP are assembled on
//! helper threads meanwhile and staged as they come. Nothing waits for the device until the end
//! (the merge of [`LoraMode::Merged`] comes after).

use half::bf16;

use crate::cuda::{BufferLayout, DView, DViewMut, DeviceBuffer, Gpu, Region, Staging, Tensor};
use crate::model::checkpoint::{Checkpoint, Dtype, TensorInfo};
use crate::model::constants::{text_inv_freq, vision_mlp_width};
use crate::model::schema::{LinearSpec, Schema};
use crate::model::weights::{LoadReport, ALIGN};
use crate::model::Task;
use crate::ops;
use crate::{Error, Result};

/// A bf16 weight in the one weights buffer.
pub(super) type W = Region<bf16>;

/// A projection's LoRA, stacked for all tasks (and all fused parts): `A_all [tasks·parts·r, k]`,
/// `B_all [n, tasks·parts·r]` (module documentation).
pub(super) struct Lora {
    pub(super) a: W,
    pub(super) b: W,
    /// Checkpoint projections fused into this one.
    pub(super) parts: usize,
}

/// How the adapted projections carry their task LoRA (module documentation).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum LoraMode {
    /// The base weight and the stacked factors of all tasks: two extra GEMMs per projection,
    /// and the more faithful of the two (measured against fp32, benches/NOTES.md).
    #[default]
    Stacked,
    /// One merged weight per task: no LoRA work in a forward (+21% tokens/s at 32 × 512 on the
    /// H200), ≈ 11 GB more device memory at full size, and the rounding of `W + B·A` to bf16:
    /// about twice the error of [`LoraMode::Stacked`] against fp32, more than PyTorch bf16's on
    /// long texts.
    Merged,
}

impl LoraMode {
    /// `$JV4_LORA` (`merged` or `stacked`) where set, else `self`.
    pub fn or_env(self) -> crate::Result<LoraMode> {
        match std::env::var("JV4_LORA").as_deref() {
            Ok("merged") => Ok(LoraMode::Merged),
            Ok("stacked") => Ok(LoraMode::Stacked),
            Ok(other) => Err(Error::Input(format!("JV4_LORA={other:?}: expected \"merged\" or \"stacked\""))),
            Err(_) => Ok(self),
        }
    }
}

/// The weight of a projection.
pub(super) enum Weight {
    /// Used as is (no adapter).
    Plain(W),
    /// The base weight and the stacked LoRA of all tasks.
    Stacked(W, Lora),
    /// The stacked LoRA folded into the base GEMM (module documentation): `wb = [W | B_all | 0]`
    /// `[n, k + g8]` and `a = [A_all; 0]` `[g8, k]`, g = tasks·parts·r real LoRA columns and
    /// g8 = g rounded up to a multiple of 8 (16-byte rows). The input is `[x | t]` `[T, k + g8]`.
    Folded { wb: W, a: W, k: usize, g: usize, parts: usize },
    /// One task-merged weight per task, in [`Task::ALL`] order.
    Merged([W; Task::ALL.len()]),
}

/// A projection's bias, in the type of the output it is added to: cuBLASLt documents the bias
/// in the output's type (src/cuda/blas.rs). bf16 beside a bf16 activation; f32 for a projection
/// into an f32 residual stream (the vision tower's proj and down), the checkpoint's bf16 values
/// widened exactly.
pub(super) enum Bias {
    Bf16(W),
    F32(Region<f32>),
}

impl Bias {
    fn numel(&self) -> usize {
        match self {
            Bias::Bf16(r) => r.numel(),
            Bias::F32(r) => r.numel(),
        }
    }
}

/// The type of a projection's output, which its bias takes ([`Bias`]): a bf16 activation, or an
/// f32 residual stream the projection accumulates into.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Out {
    Bf16,
    Residual,
}

/// `y = x·Wᵀ (+ b)`, task-adapted or not.
pub(super) struct Linear {
    pub(super) weight: Weight,
    pub(super) bias: Option<Bias>,
}

impl Linear {
    /// The `[n, k]` shape of the projection (of each task's weight, when merged).
    fn shape(&self) -> [usize; 2] {
        let w = match &self.weight {
            Weight::Plain(w) | Weight::Stacked(w, _) => w,
            Weight::Merged(ws) => &ws[0],
            Weight::Folded { wb, k, .. } => return [wb.shape()[0], *k],
        };
        [w.shape()[0], w.shape()[1]]
    }

    /// The width of the input buffer the projection reads: `k`, or `k + g8` for a folded LoRA
    /// (`[x | t]`: the producer writes x into the first k columns).
    pub(super) fn input_width(&self) -> usize {
        match &self.weight {
            Weight::Folded { wb, .. } => wb.shape()[1],
            _ => self.shape()[1],
        }
    }
}

/// A run of consecutive rows of one task in a packed batch: `rows` and the task's index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct TaskRun {
    pub(super) rows: std::ops::Range<usize>,
    pub(super) task: usize,
}

/// The maximal runs of equal tasks in `row_task` (the engine packs a forward's requests sorted by
/// task, so a forward has at most one run per task).
pub(super) fn task_runs(row_task: &[u8]) -> Vec<TaskRun> {
    let mut runs: Vec<TaskRun> = Vec::new();
    for (i, &t) in row_task.iter().enumerate() {
        match runs.last_mut() {
            Some(r) if r.task == t as usize => r.rows.end = i + 1,
            _ => runs.push(TaskRun { rows: i..i + 1, task: t as usize }),
        }
    }
    runs
}

/// One decoder layer, prepared.
pub(super) struct TextLayer {
    pub(super) input_norm: W,
    pub(super) qkv: Linear,
    pub(super) o: Linear,
    pub(super) post_norm: W,
    pub(super) gate_up: Linear,
    pub(super) down: Linear,
}

/// One vision block, prepared.
pub(super) struct VisionBlock {
    pub(super) norm1: W,
    pub(super) norm2: W,
    pub(super) qkv: Linear,
    pub(super) proj: Linear,
    pub(super) gate_up: Linear,
    pub(super) down: Linear,
}

/// The patch merger.
pub(super) struct Merger {
    pub(super) ln_q: W,
    pub(super) mlp0: Linear,
    pub(super) mlp2: Linear,
}

/// The heads after the final norm: the multi-vector projector with its LoRA (the single vector
/// is a pooling, no weights).
pub(super) struct Heads {
    pub(super) projector: Linear,
}

/// Every prepared tensor, in one device buffer.
pub(super) struct Weights {
    pub(super) buf: DeviceBuffer,
    pub(super) embed: W,
    pub(super) layers: Vec<TextLayer>,
    pub(super) norm: W,
    pub(super) patch_embed: W,
    pub(super) blocks: Vec<VisionBlock>,
    pub(super) merger: Merger,
    pub(super) heads: Heads,
    /// f32: the M-RoPE inverse frequencies, `[head_dim/2]`.
    pub(super) inv_freq: Region<f32>,
    /// LoRA rank.
    pub(super) rank: usize,
}

impl Weights {
    /// The weight `w`.
    pub(super) fn at(&self, w: &W) -> DView<'_, bf16> {
        self.buf.at(w)
    }

    /// Device bytes held (with alignment padding).
    pub(super) fn device_bytes(&self) -> usize {
        self.buf.bytes()
    }

    /// `y = x·Wᵀ (+ b)` (`accumulate`: `y +=`) with each row's task adapter: one GEMM per task
    /// run for merged weights; for stacked ones the base GEMM, then `y += t·B_allᵀ` with `t`
    /// from [`Weights::lora_t`]. Adapted projections need `lora`.
    pub(super) fn linear(
        &self,
        gpu: &Gpu,
        x: &DView<'_, bf16>,
        lin: &Linear,
        y: &mut DViewMut<'_, bf16>,
        accumulate: bool,
        lora: Option<&mut LoraInputs<'_, '_>>,
    ) -> Result<()> {
        let bias = self.bias_bf16(lin)?;
        match &lin.weight {
            Weight::Plain(w) => ops::linear(gpu, x, &self.at(w), bias.as_ref(), y, accumulate),
            Weight::Stacked(w, l) => {
                ops::linear(gpu, x, &self.at(w), bias.as_ref(), y, accumulate)?;
                let t = self.lora_t(gpu, x, l, lora)?;
                ops::linear(gpu, &t.as_view(), &self.at(&l.b), None, y, true)
            }
            Weight::Merged(ws) => {
                for r in runs_of(lora)? {
                    let w = self.at(task_weight(ws, r.task)?);
                    let mut yr = y.rows_mut(r.rows.clone());
                    ops::linear(gpu, &x.rows(r.rows.clone()), &w, bias.as_ref(), &mut yr, accumulate)?;
                }
                Ok(())
            }
            Weight::Folded { .. } => Err(folded_without_xt()),
        }
    }

    /// [`Weights::linear`] on the projection's input buffer `xt` `[T, input_width]` (x in its
    /// first k columns): a folded LoRA writes its shrink beside x, then one GEMM reads `[x | t]`.
    pub(super) fn linear_xt(
        &self,
        gpu: &Gpu,
        xt: &mut DViewMut<'_, bf16>,
        lin: &Linear,
        y: &mut DViewMut<'_, bf16>,
        accumulate: bool,
        lora: Option<&mut LoraInputs<'_, '_>>,
    ) -> Result<()> {
        let Weight::Folded { wb, .. } = &lin.weight else {
            return self.linear(gpu, &xt.as_view(), lin, y, accumulate, lora);
        };
        self.fold_t(gpu, xt, lin, lora)?;
        let bias = self.bias_bf16(lin)?;
        ops::linear(gpu, &xt.as_view(), &self.at(wb), bias.as_ref(), y, accumulate)
    }

    /// [`Weights::linear_residual`] on the projection's input buffer (see [`Weights::linear_xt`]).
    pub(super) fn linear_residual_xt(
        &self,
        gpu: &Gpu,
        xt: &mut DViewMut<'_, bf16>,
        lin: &Linear,
        h: &mut DViewMut<'_, f32>,
        lora: Option<&mut LoraInputs<'_, '_>>,
    ) -> Result<()> {
        let Weight::Folded { wb, .. } = &lin.weight else {
            return self.linear_residual(gpu, &xt.as_view(), lin, h, lora);
        };
        self.fold_t(gpu, xt, lin, lora)?;
        let bias = self.bias_f32(lin)?;
        ops::linear_f32(gpu, &xt.as_view(), &self.at(wb), bias.as_ref(), h, true)
    }

    /// [`Weights::linear`] accumulating into an f32 residual stream `h`: `h += x·Wᵀ (+ b)`, the
    /// bias (f32, [`Bias`]) where the projection has one (the vision tower's proj and down; the
    /// decoder's o_proj and down_proj have none).
    pub(super) fn linear_residual(
        &self,
        gpu: &Gpu,
        x: &DView<'_, bf16>,
        lin: &Linear,
        h: &mut DViewMut<'_, f32>,
        lora: Option<&mut LoraInputs<'_, '_>>,
    ) -> Result<()> {
        let bias = self.bias_f32(lin)?;
        match &lin.weight {
            Weight::Plain(w) => ops::linear_f32(gpu, x, &self.at(w), bias.as_ref(), h, true),
            Weight::Stacked(w, l) => {
                ops::linear_f32(gpu, x, &self.at(w), bias.as_ref(), h, true)?;
                let t = self.lora_t(gpu, x, l, lora)?;
                ops::linear_f32(gpu, &t.as_view(), &self.at(&l.b), None, h, true)
            }
            Weight::Merged(ws) => {
                for r in runs_of(lora)? {
                    let w = self.at(task_weight(ws, r.task)?);
                    let (xr, mut hr) = (x.rows(r.rows.clone()), h.rows_mut(r.rows.clone()));
                    ops::linear_f32(gpu, &xr, &w, bias.as_ref(), &mut hr, true)?;
                }
                Ok(())
            }
            Weight::Folded { .. } => Err(folded_without_xt()),
        }
    }

    /// The bias of a projection into a bf16 output (planned with [`Out::Bf16`]).
    fn bias_bf16(&self, lin: &Linear) -> Result<Option<DView<'_, bf16>>> {
        match &lin.bias {
            None => Ok(None),
            Some(Bias::Bf16(b)) => Ok(Some(self.at(b))),
            Some(Bias::F32(_)) => {
                Err(Error::Internal("a residual projection's f32 bias into a bf16 output".into()))
            }
        }
    }

    /// The bias of a projection into an f32 residual stream (planned with [`Out::Residual`]).
    fn bias_f32(&self, lin: &Linear) -> Result<Option<DView<'_, f32>>> {
        match &lin.bias {
            None => Ok(None),
            Some(Bias::F32(b)) => Ok(Some(self.buf.at(b))),
            Some(Bias::Bf16(_)) => {
                Err(Error::Internal("a bf16 bias on a projection into an f32 residual stream".into()))
            }
        }
    }

    /// The folded LoRA's shrink, in place: `t = x·A_allᵀ` into the g8 columns after x of
    /// `xt [T, k + g8]`, the other tasks' column groups of each row zeroed. (A's padding rows are
    /// zero, so t's padding columns are exact zeros that meet B's zero columns.)
    fn fold_t(
        &self,
        gpu: &Gpu,
        xt: &mut DViewMut<'_, bf16>,
        lin: &Linear,
        inputs: Option<&mut LoraInputs<'_, '_>>,
    ) -> Result<()> {
        let Weight::Folded { a, k, g, parts, .. } = &lin.weight else {
            return Err(Error::Internal("fold_t on a projection without a folded LoRA".into()));
        };
        let Some(LoraInputs { row_task, .. }) = inputs else {
            return Err(Error::Shape { op: "lora", msg: "a folded LoRA without row tasks".into() });
        };
        if xt.shape().get(1) != Some(&lin.input_width()) {
            return Err(Error::Shape {
                op: "lora",
                msg: format!(
                    "[x | t] {:?} for a folded projection of input width {}",
                    xt.shape(),
                    lin.input_width()
                ),
            });
        }
        ops::lora_shrink_cols(gpu, xt, *k, &self.at(a), *g, row_task, *parts * self.rank)
    }

    /// The LoRA shrink of a projection that fuses `l.parts` checkpoint projections: `x·A_allᵀ`
    /// with the other tasks' column groups of each row zeroed. The caller adds `t·B_allᵀ` to the
    /// projection's output (bf16 activation or the f32 residual stream).
    fn lora_t<'t>(
        &self,
        gpu: &Gpu,
        x: &DView<'_, bf16>,
        l: &Lora,
        inputs: Option<&'t mut LoraInputs<'_, '_>>,
    ) -> Result<DViewMut<'t, bf16>> {
        let Some(LoraInputs { t: Some(t), row_task, .. }) = inputs else {
            return Err(Error::Shape {
                op: "lora",
                msg: "a stacked LoRA without row tasks or scratch".into(),
            });
        };
        let a = self.at(&l.a);
        let n = x.shape()[0];
        let mut tv = t.view_mut_as(&[n, a.shape()[0]]);
        ops::lora_shrink(gpu, x, &a, &mut tv, row_task, l.parts * self.rank)?;
        Ok(tv)
    }

    /// Whether the adapted projections are task-merged (no LoRA scratch needed).
    pub(super) fn merged(&self) -> bool {
        self.layers.first().is_some_and(|l| matches!(l.o.weight, Weight::Merged(_)))
    }
}

/// A folded projection called without its `[x | t]` buffer (a programming error).
fn folded_without_xt() -> Error {
    Error::Internal("a projection with a folded LoRA needs its [x | t] input buffer (linear_xt)".into())
}

/// The task runs a merged projection needs from the forward's LoRA inputs.
fn runs_of<'a>(lora: Option<&'a mut LoraInputs<'_, '_>>) -> Result<&'a [TaskRun]> {
    match lora {
        Some(l) => Ok(l.runs),
        None => Err(Error::Shape { op: "lora", msg: "a task-merged projection without row tasks".into() }),
    }
}

/// Task `task`'s merged weight, or the error for a row task out of range.
fn task_weight(ws: &[W], task: usize) -> Result<&W> {
    ws.get(task)
        .ok_or_else(|| Error::Input(format!("row task {task}: the model has {} task adapters", ws.len())))
}

/// What the task adapters of a forward need: each row's task and the runs of equal tasks, and for
/// stacked LoRA a scratch wide enough for the widest stacked shrink.
pub(super) struct LoraInputs<'a, 't> {
    pub(super) t: Option<&'a mut Tensor<'t, bf16>>,
    pub(super) row_task: DView<'a, u8>,
    pub(super) runs: &'a [TaskRun],
}

/// Every prepared tensor's place in the one buffer (the layout and the typed regions).
struct Planned {
    lay: BufferLayout,
    embed: W,
    norm: W,
    layers: Vec<TextLayer>,
    projector: Linear,
    patch_embed: W,
    blocks: Vec<VisionBlock>,
    merger: Merger,
    inv_freq: Region<f32>,
}

/// `JV4_LORA_FOLD=0` keeps the stacked LoRA's expand as a GEMM of its own (research: the A/B of
/// the fold).
fn fold_from_env() -> bool {
    std::env::var("JV4_LORA_FOLD").map_or(true, |v| v.trim() != "0")
}

/// Plans the buffer: adapted projections task-merged (`merged`) or stacked, the stacked ones
/// folded where their input's producer writes `[x | t]` (unless `$JV4_LORA_FOLD=0`).
fn plan(s: &Schema, head_dim: usize, merged: bool) -> Planned {
    let rank = s.rank;
    let (adapt, fold) = match (merged, fold_from_env()) {
        (true, _) => (Adapt::Merged, Adapt::Merged),
        (false, true) => (Adapt::Stacked, Adapt::Folded),
        (false, false) => (Adapt::Stacked, Adapt::Stacked),
    };
    let mut lay = BufferLayout::new(ALIGN);
    let embed = lay.push(&s.embed.1);
    let norm = lay.push(&[s.norm.dim]);
    let layers: Vec<TextLayer> = s
        .layers
        .iter()
        .map(|l| TextLayer {
            input_norm: lay.push(&[l.input_norm.dim]),
            qkv: plan_linear(&mut lay, &l.qkv(), rank, fold, Out::Bf16),
            o: plan_linear(&mut lay, &[&l.o], rank, adapt, Out::Residual),
            post_norm: lay.push(&[l.post_norm.dim]),
            gate_up: plan_linear(&mut lay, &l.gate_up(), rank, fold, Out::Bf16),
            down: plan_linear(&mut lay, &[&l.down], rank, fold, Out::Residual),
        })
        .collect();
    let projector = plan_linear(&mut lay, &[&s.projector], rank, adapt, Out::Bf16);
    // The vision tower (docs/MODEL.md §5): the patch embedding as the [hidden, c·t·p·p] matrix its
    // Conv3d is, and gate/up fused like the decoder's.
    let patch_embed = lay.push(&s.patch_embed.matrix());
    let blocks: Vec<VisionBlock> = s
        .blocks
        .iter()
        .map(|b| VisionBlock {
            norm1: lay.push(&[b.norm1.dim]),
            norm2: lay.push(&[b.norm2.dim]),
            qkv: plan_linear(&mut lay, &[&b.qkv], rank, adapt, Out::Bf16),
            proj: plan_linear(&mut lay, &[&b.proj], rank, adapt, Out::Residual),
            gate_up: plan_padded(&mut lay, &b.gate_up(), vision_mlp_width(b.down.inp), None, Out::Bf16),
            down: plan_padded(
                &mut lay,
                &[&b.down],
                b.down.out,
                Some(vision_mlp_width(b.down.inp)),
                Out::Residual,
            ),
        })
        .collect();
    let m = &s.merger;
    let merger = Merger {
        ln_q: lay.push(&[m.ln_q.dim]),
        mlp0: plan_linear(&mut lay, &[&m.mlp0], rank, adapt, Out::Bf16),
        mlp2: plan_linear(&mut lay, &[&m.mlp2], rank, adapt, Out::Bf16),
    };
    let inv_freq = lay.push::<f32>(&[head_dim / 2]);
    Planned { lay, embed, norm, layers, projector, patch_embed, blocks, merger, inv_freq }
}

/// Prepares and uploads every weight (see the module documentation), the task adapters as `mode`
/// says. A tensor missing from the checkpoint is an [`Error::Tensor`] naming it.
pub(super) fn prepare(gpu: &Gpu, ckpt: &Checkpoint, mode: LoraMode) -> Result<(Weights, LoadReport)> {
    let t0 = std::time::Instant::now();
    let cfg = &ckpt.config;
    let s = Schema::new(cfg, &ckpt.adapter);
    let rank = s.rank;
    let scale = ckpt.adapter.scale();
    let hd = cfg.text.head_dim;
    let merged = mode == LoraMode::Merged;
    let Planned { lay, embed, norm, layers, projector, patch_embed, blocks, merger, inv_freq } =
        plan(&s, hd, merged);
    let tensors = lay.len();

    let mut buf = DeviceBuffer::new(gpu, lay.bytes())?;
    // Seconds since the last mark, per phase (the report's breakdown).
    let mut phases = Vec::new();
    let mut last = std::time::Instant::now();
    let mut mark = |name: &'static str, phases: &mut Vec<(&'static str, f64)>| {
        let now = std::time::Instant::now();
        phases.push((name, (now - last).as_secs_f64()));
        last = now;
    };
    phases.push(("allocate", t0.elapsed().as_secs_f64()));
    // Module documentation, "Loading": this thread streams the stored tensors; the helpers
    // assemble the rest (jobs below), which this thread stages as it arrives.
    let mut staging = Staging::default();
    {
        let mut jobs: Vec<Assemble> = Vec::new();
        for (l, p) in s.layers.iter().zip(&layers) {
            jobs.push(assemble_linear(ckpt, l.qkv().to_vec(), &p.qkv, scale));
            jobs.push(assemble_linear(ckpt, vec![&l.o], &p.o, scale));
            jobs.push(assemble_linear(ckpt, l.gate_up().to_vec(), &p.gate_up, scale));
            jobs.push(assemble_linear(ckpt, vec![&l.down], &p.down, scale));
        }
        jobs.push(assemble_linear(ckpt, vec![&s.projector], &projector, scale));
        for (b, p) in s.blocks.iter().zip(&blocks) {
            jobs.push(assemble_linear(ckpt, vec![&b.qkv], &p.qkv, scale));
            jobs.push(assemble_linear(ckpt, vec![&b.proj], &p.proj, scale));
            jobs.push(assemble_linear(ckpt, b.gate_up().to_vec(), &p.gate_up, scale));
            jobs.push(assemble_linear(ckpt, vec![&b.down], &p.down, scale));
        }
        let m = &s.merger;
        jobs.push(assemble_linear(ckpt, vec![&m.mlp0], &merger.mlp0, scale));
        jobs.push(assemble_linear(ckpt, vec![&m.mlp2], &merger.mlp2, scale));

        let jobs = std::sync::Mutex::new(jobs.into_iter());
        std::thread::scope(|sc| -> Result<()> {
            let (tx, rx) = std::sync::mpsc::sync_channel::<Result<Vec<Assembled>>>(ASSEMBLED_IN_FLIGHT);
            for _ in 0..ASSEMBLE_THREADS {
                let (tx, jobs) = (tx.clone(), &jobs);
                sc.spawn(move || loop {
                    let Some(job) = jobs.lock().ok().and_then(|mut j| j.next()) else { return };
                    // A closed channel: the load failed and returned; stop.
                    if tx.send(job()).is_err() {
                        return;
                    }
                });
            }
            drop(tx);
            // Stages whatever the helpers have finished (all of it, waiting, when `wait`).
            let stage_assembled = |buf: &mut DeviceBuffer, staging: &mut Staging, wait: bool| -> Result<()> {
                loop {
                    let next = if wait { rx.recv().ok() } else { rx.try_recv().ok() };
                    let Some(done) = next else { return Ok(()) };
                    for a in done? {
                        a.upload(gpu, buf, staging)?;
                    }
                }
            };
            as_stored(gpu, &mut buf, &mut staging, ckpt, &embed, &s.embed.0)?;
            as_stored(gpu, &mut buf, &mut staging, ckpt, &norm, &s.norm.weight)?;
            for (l, p) in s.layers.iter().zip(&layers) {
                as_stored(gpu, &mut buf, &mut staging, ckpt, &p.input_norm, &l.input_norm.weight)?;
                stream_weight(gpu, &mut buf, &mut staging, ckpt, &l.qkv(), &p.qkv)?;
                stream_weight(gpu, &mut buf, &mut staging, ckpt, &[&l.o], &p.o)?;
                as_stored(gpu, &mut buf, &mut staging, ckpt, &p.post_norm, &l.post_norm.weight)?;
                stream_weight(gpu, &mut buf, &mut staging, ckpt, &l.gate_up(), &p.gate_up)?;
                stream_weight(gpu, &mut buf, &mut staging, ckpt, &[&l.down], &p.down)?;
                stage_assembled(&mut buf, &mut staging, false)?;
            }
            stream_weight(gpu, &mut buf, &mut staging, ckpt, &[&s.projector], &projector)?;
            as_stored(gpu, &mut buf, &mut staging, ckpt, &patch_embed, &s.patch_embed.weight)?;
            for (b, p) in s.blocks.iter().zip(&blocks) {
                as_stored(gpu, &mut buf, &mut staging, ckpt, &p.norm1, &b.norm1.weight)?;
                as_stored(gpu, &mut buf, &mut staging, ckpt, &p.norm2, &b.norm2.weight)?;
                stream_weight(gpu, &mut buf, &mut staging, ckpt, &[&b.qkv], &p.qkv)?;
                stream_weight(gpu, &mut buf, &mut staging, ckpt, &[&b.proj], &p.proj)?;
                stream_padded(gpu, &mut buf, &mut staging, ckpt, &b.gate_up(), &p.gate_up)?;
                stream_padded(gpu, &mut buf, &mut staging, ckpt, &[&b.down], &p.down)?;
                stage_assembled(&mut buf, &mut staging, false)?;
            }
            as_stored(gpu, &mut buf, &mut staging, ckpt, &merger.ln_q, &m.ln_q.weight)?;
            stream_weight(gpu, &mut buf, &mut staging, ckpt, &[&m.mlp0], &merger.mlp0)?;
            stream_weight(gpu, &mut buf, &mut staging, ckpt, &[&m.mlp2], &merger.mlp2)?;
            mark("stream", &mut phases);
            stage_assembled(&mut buf, &mut staging, true)
        })?;
    }
    mark("assembled, rest", &mut phases);
    buf.fill(gpu, &inv_freq, &text_inv_freq(cfg.text.rope_theta, hd))?;
    staging.finish(gpu)?;
    mark("finish", &mut phases);
    if merged {
        // Every base weight is in place (in task 0's region): add each task's delta.
        let mut merge = Merge::new(gpu, &s, rank)?;
        for (l, p) in s.layers.iter().zip(&layers) {
            merge.linear(gpu, &mut buf, ckpt, &l.qkv(), &p.qkv, scale)?;
            merge.linear(gpu, &mut buf, ckpt, &[&l.o], &p.o, scale)?;
            merge.linear(gpu, &mut buf, ckpt, &l.gate_up(), &p.gate_up, scale)?;
            merge.linear(gpu, &mut buf, ckpt, &[&l.down], &p.down, scale)?;
        }
        merge.linear(gpu, &mut buf, ckpt, &[&s.projector], &projector, scale)?;
        gpu.sync()?;
        mark("merge", &mut phases);
    }

    let report = LoadReport {
        tensors,
        bytes: lay.bytes() as u64,
        converted: 0,
        seconds: t0.elapsed().as_secs_f64(),
        phases,
    };
    let w = Weights {
        buf,
        embed,
        layers,
        norm,
        patch_embed,
        blocks,
        merger,
        heads: Heads { projector },
        inv_freq,
        rank,
    };
    Ok((w, report))
}

/// The merge of task LoRA into per-task weights on the GPU: `W_τ = W + B_τ·A_τ` as one GEMM
/// accumulating into the bf16 weight (f32 accumulation, one rounding), `B_τ [n, P·r]` (the parts'
/// blocks, scale folded in) and `A_τᵀ [k, P·r]` assembled on the host into a scratch buffer.
struct Merge {
    scratch: DeviceBuffer,
}

impl Merge {
    fn new(gpu: &Gpu, s: &Schema, rank: usize) -> Result<Merge> {
        // The largest B_τ and A_τᵀ of any adapted projection (gate_up: 2 parts; qkv: 3).
        let widest = s
            .layers
            .iter()
            .flat_map(|l| [l.qkv().to_vec(), vec![&l.o], l.gate_up().to_vec(), vec![&l.down]])
            .chain(std::iter::once(vec![&s.projector]))
            .map(|parts| {
                let n: usize = parts.iter().map(|p| p.out).sum();
                (n + parts[0].inp) * parts.len() * rank
            })
            .max()
            .unwrap_or(0);
        Ok(Merge { scratch: DeviceBuffer::new(gpu, widest * 2 + ALIGN)? })
    }

    fn linear(
        &mut self,
        gpu: &Gpu,
        buf: &mut DeviceBuffer,
        ckpt: &Checkpoint,
        parts: &[&LinearSpec],
        lin: &Linear,
        scale: f32,
    ) -> Result<()> {
        let Weight::Merged(ws) = &lin.weight else { return Ok(()) };
        let (n, k) = (ws[0].shape()[0], ws[0].shape()[1]);
        for w in &ws[1..] {
            buf.copy_region(gpu, &ws[0], w)?;
        }
        for (ti, task) in Task::ALL.iter().enumerate().rev() {
            let (a, b) = task_lora(ckpt, parts, *task, scale)?; // [R, k], [n, R]
            let r = a.len() / k;
            let mut at = vec![bf16::ZERO; k * r];
            for (i, row) in a.chunks_exact(k).enumerate() {
                for (j, v) in row.iter().enumerate() {
                    at[j * r + i] = *v;
                }
            }
            // upload_at waits for the copy (and so for the GEMM before it, which read the scratch).
            let b_bytes = (n * r * 2).next_multiple_of(ALIGN);
            self.scratch.upload_at(gpu, 0, &b)?;
            self.scratch.upload_at(gpu, b_bytes, &at)?;
            let (Some(bv), Some(av)) =
                (self.scratch.view::<bf16>(0, &[n, r]), self.scratch.view::<bf16>(b_bytes, &[k, r]))
            else {
                return Err(Error::Internal(format!("merge scratch too small for [{n}, {r}] + [{k}, {r}]")));
            };
            // Task 0's region holds the base weight until its own delta is added, last.
            ops::linear(gpu, &bv, &av, None, &mut buf.at_mut(&ws[ti]), true)?;
        }
        Ok(())
    }
}

/// A checkpoint tensor, or the load error naming it.
fn tensor_of<'c>(ckpt: &'c Checkpoint, name: &str) -> Result<&'c TensorInfo> {
    ckpt.get(name).ok_or_else(|| Error::Tensor {
        name: name.into(),
        file: ckpt.dir.clone(),
        msg: "missing".into(),
    })
}

/// A checkpoint tensor as bf16, or the load error naming it.
fn bf16_of(ckpt: &Checkpoint, name: &str) -> Result<Vec<bf16>> {
    ckpt.to_bf16(tensor_of(ckpt, name)?)
}

/// A checkpoint tensor's bytes as bf16: a BF16 tensor read straight from its shard (positioned
/// reads into the pinned staging), another dtype converted on the host first.
enum Source<'c> {
    Stored(&'c Checkpoint, &'c TensorInfo),
    Converted(Vec<bf16>),
}

impl<'c> Source<'c> {
    fn of(ckpt: &'c Checkpoint, name: &str) -> Result<Source<'c>> {
        let t = tensor_of(ckpt, name)?;
        Ok(if t.dtype == Dtype::BF16 { Source::Stored(ckpt, t) } else { Source::Converted(ckpt.to_bf16(t)?) })
    }

    fn bytes(&self) -> usize {
        match self {
            Source::Stored(_, t) => t.numel() * 2,
            Source::Converted(v) => v.len() * 2,
        }
    }

    /// Writes the bytes `off..off + part.len()` into `part`.
    fn fill(&self, off: usize, part: &mut [u8]) -> Result<()> {
        match self {
            Source::Stored(ckpt, t) => ckpt.read_at(t, off, part),
            Source::Converted(v) => {
                part.copy_from_slice(&bytemuck::cast_slice(v)[off..off + part.len()]);
                Ok(())
            }
        }
    }
}

/// A tensor used as stored, streamed into its whole region.
fn as_stored(
    gpu: &Gpu,
    buf: &mut DeviceBuffer,
    staging: &mut Staging,
    ckpt: &Checkpoint,
    region: &W,
    name: &str,
) -> Result<()> {
    let src = Source::of(ckpt, name)?;
    let n = src.bytes();
    check_filled(ckpt, name, n, region.numel() * 2, region)?;
    buf.stream_in(gpu, staging, region, 0, n, &|off, part| src.fill(off, part))
}

/// Whether `bytes` of a tensor are the `want` bytes of its place (a shape mismatch would leave
/// it half-written).
fn check_filled(ckpt: &Checkpoint, name: &str, bytes: usize, want: usize, region: &W) -> Result<()> {
    if bytes != want {
        return Err(Error::Tensor {
            name: name.into(),
            file: ckpt.dir.clone(),
            msg: format!("{bytes} bytes for a prepared tensor of shape {:?}", region.shape()),
        });
    }
    Ok(())
}

/// Streams the base weight of a planned [`Linear`]: the parts' rows one after the other into its
/// weight (task 0's region when merged: [`Merge`] adds the deltas later), for a folded one into
/// the first k columns of `[W | B_all | 0]`.
fn stream_weight(
    gpu: &Gpu,
    buf: &mut DeviceBuffer,
    staging: &mut Staging,
    ckpt: &Checkpoint,
    parts: &[&LinearSpec],
    lin: &Linear,
) -> Result<()> {
    let [n, k] = lin.shape();
    let (w, folded) = match &lin.weight {
        Weight::Plain(w) | Weight::Stacked(w, _) => (w, false),
        Weight::Merged(ws) => (&ws[0], false),
        Weight::Folded { wb, .. } => (wb, true),
    };
    let mut row = 0;
    for p in parts {
        let name = p.weight();
        let src = Source::of(ckpt, &name)?;
        let bytes = src.bytes();
        let rows = bytes / (2 * k).max(1);
        // Whole rows, inside the planned rows (else the shape check below names the tensor).
        if rows * 2 * k != bytes || row + rows > n {
            check_filled(ckpt, &name, bytes, p.out * k * 2, w)?;
            return Err(Error::Tensor {
                name,
                file: ckpt.dir.clone(),
                msg: format!("{rows} rows of {k} past the {n} rows of the prepared weight"),
            });
        }
        let fill = |off: usize, part: &mut [u8]| src.fill(off, part);
        if folded {
            buf.stream_in_block(gpu, staging, w, (row, rows), (0, k), &fill)?;
        } else {
            buf.stream_in(gpu, staging, w, row * k * 2, bytes, &fill)?;
        }
        row += rows;
    }
    check_filled(ckpt, &parts[0].weight(), row * k * 2, n * k * 2, w)
}

/// Helper threads assembling tensors on the host during the load, and the results that may wait
/// for the staging at once (each at most one projection's factors or a vision MLP, ≤ 20 MB).
const ASSEMBLE_THREADS: usize = 4;
const ASSEMBLED_IN_FLIGHT: usize = 8;

/// Data assembled on the host for a place in the weights buffer.
enum Assembled {
    /// bf16 data. `cols` `None`: the whole region; `Some((col, width))`: that block of columns
    /// of every row (`data` is then `[rows, width]`).
    Bf16 { region: W, cols: Option<(usize, usize)>, data: Vec<bf16> },
    /// f32 data for the whole region (a residual projection's [`Bias`]).
    F32 { region: Region<f32>, data: Vec<f32> },
}

impl Assembled {
    /// Stages the data into its place (asynchronous; the load finishes the staging).
    fn upload(&self, gpu: &Gpu, buf: &mut DeviceBuffer, staging: &mut Staging) -> Result<()> {
        match self {
            Assembled::Bf16 { region, cols, data } => stage(gpu, buf, staging, region, *cols, data),
            Assembled::F32 { region, data } => stage(gpu, buf, staging, region, None, data),
        }
    }
}

/// Stages `data` into `region`, or into its block of columns `cols` (see [`Assembled`]).
fn stage<T: bytemuck::Pod>(
    gpu: &Gpu,
    buf: &mut DeviceBuffer,
    staging: &mut Staging,
    region: &Region<T>,
    cols: Option<(usize, usize)>,
    data: &[T],
) -> Result<()> {
    let bytes: &[u8] = bytemuck::cast_slice(data);
    let fill = |off: usize, part: &mut [u8]| {
        part.copy_from_slice(&bytes[off..off + part.len()]);
        Ok(())
    };
    let rows = region.shape()[0];
    let want = match cols {
        None => region.numel(),
        Some((_, width)) => rows * width,
    };
    if data.len() != want {
        return Err(Error::Shape {
            op: "upload",
            msg: format!("{} values for {want} of {region:?}", data.len()),
        });
    }
    match cols {
        None => buf.stream_in(gpu, staging, region, 0, bytes.len(), &fill),
        Some(cols) => buf.stream_in_block(gpu, staging, region, (0, rows), cols, &fill),
    }
}

/// Work that assembles some tensors on the host (run on a helper thread during the load).
type Assemble<'a> = Box<dyn FnOnce() -> Result<Vec<Assembled>> + Send + 'a>;

/// How an adapted projection is planned (module documentation).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Adapt {
    Merged,
    Stacked,
    /// Stacked with the expand folded into the base GEMM: for projections whose input producer
    /// can write `[x | t]` (the norms before qkv and gate_up, SwiGLU before down).
    Folded,
}

/// Plans the prepared tensor of the checkpoint projections `parts` (fused in row order); an
/// adapted one as `adapt` says, its bias in the type of `out`.
fn plan_linear(lay: &mut BufferLayout, parts: &[&LinearSpec], rank: usize, adapt: Adapt, out: Out) -> Linear {
    let rows: usize = parts.iter().map(|p| p.out).sum();
    let k = parts[0].inp;
    let g = Task::ALL.len() * parts.len() * rank;
    let weight = match (parts[0].lora, adapt) {
        (false, _) => Weight::Plain(lay.push(&[rows, k])),
        (true, Adapt::Merged) => Weight::Merged(std::array::from_fn(|_| lay.push(&[rows, k]))),
        (true, Adapt::Stacked) => {
            let w = lay.push(&[rows, k]);
            Weight::Stacked(w, Lora { a: lay.push(&[g, k]), b: lay.push(&[rows, g]), parts: parts.len() })
        }
        (true, Adapt::Folded) => {
            let g8 = g.next_multiple_of(8);
            Weight::Folded { wb: lay.push(&[rows, k + g8]), a: lay.push(&[g8, k]), k, g, parts: parts.len() }
        }
    };
    Linear { weight, bias: plan_bias(lay, parts, rows, out) }
}

/// The bias of a projection of `rows` outputs into `out`, if its parts have one.
fn plan_bias(lay: &mut BufferLayout, parts: &[&LinearSpec], rows: usize, out: Out) -> Option<Bias> {
    parts[0].bias.then(|| match out {
        Out::Bf16 => Bias::Bf16(lay.push(&[rows])),
        Out::Residual => Bias::F32(lay.push(&[rows])),
    })
}

/// Plans an unadapted projection padded with zeros: each part's rows to `part_rows` (gate/up
/// of the vision MLP) and, with `k_to`, its input width to `k_to` (the vision down projection).
fn plan_padded(
    lay: &mut BufferLayout,
    parts: &[&LinearSpec],
    part_rows: usize,
    k_to: Option<usize>,
    out: Out,
) -> Linear {
    let rows = parts.len() * part_rows;
    let k = k_to.unwrap_or(parts[0].inp);
    Linear { weight: Weight::Plain(lay.push(&[rows, k])), bias: plan_bias(lay, parts, rows, out) }
}

/// Streams the weight of a [`plan_padded`] projection: the region zeroed, then each part's rows
/// into the first columns of its block of rows, straight from the shards (2-D staged copies).
/// Its bias is [`assemble_linear`]'s (the parts' biases at their rows, zeros between).
fn stream_padded(
    gpu: &Gpu,
    buf: &mut DeviceBuffer,
    staging: &mut Staging,
    ckpt: &Checkpoint,
    parts: &[&LinearSpec],
    lin: &Linear,
) -> Result<()> {
    let Weight::Plain(w) = &lin.weight else {
        return Err(Error::Internal("a padded projection with an adapter".into()));
    };
    let (rows, k) = (w.shape()[0], w.shape()[1]);
    let part_rows = rows / parts.len();
    // Stream order: the zeros land before the rows.
    gpu.fill_u16(&mut buf.at_mut(w), 0)?;
    for (pi, p) in parts.iter().enumerate() {
        let name = p.weight();
        let src = Source::of(ckpt, &name)?;
        if src.bytes() != p.out * p.inp * 2 || p.out > part_rows || p.inp > k {
            return Err(Error::Tensor {
                name,
                file: ckpt.dir.clone(),
                msg: format!(
                    "{} values for [{}, {}] padded into [{part_rows}, {k}]",
                    src.bytes() / 2,
                    p.out,
                    p.inp
                ),
            });
        }
        let fill = |off: usize, part: &mut [u8]| src.fill(off, part);
        buf.stream_in_block(gpu, staging, w, (pi * part_rows, p.out), (0, p.inp), &fill)?;
    }
    Ok(())
}

/// Assembles what a planned [`Linear`] needs besides its base weight ([`stream_weight`]): the
/// parts' biases concatenated; a stacked LoRA with `scale` folded in, for a folded one `B_all`
/// (zero-padded to g8 columns) into columns `k..k + g8` of `[W | B_all | 0]` and A padded with
/// zero rows. A merged projection's deltas are [`Merge`]'s.
fn assemble_linear<'a>(
    ckpt: &'a Checkpoint,
    parts: Vec<&'a LinearSpec>,
    lin: &'a Linear,
    scale: f32,
) -> Assemble<'a> {
    Box::new(move || {
        let [n, k] = lin.shape();
        let mut out = Vec::new();
        if let Some(bias) = &lin.bias {
            // The parts' biases, each at the start of its block of rows (a padded projection's
            // blocks are wider than its parts: zeros between).
            let padded = bias.numel() != parts.iter().map(|p| p.out).sum::<usize>();
            let block = bias.numel() / parts.len();
            let mut b = vec![bf16::ZERO; bias.numel()];
            let mut row = 0;
            for (pi, p) in parts.iter().enumerate() {
                let at = if padded { pi * block } else { row };
                row += p.out;
                let Some(name) = p.bias_name() else { continue };
                let v = bf16_of(ckpt, &name)?;
                if v.len() != p.out || at + p.out > b.len() || (padded && p.out > block) {
                    return Err(Error::Tensor {
                        name,
                        file: ckpt.dir.clone(),
                        msg: format!("{} values, expected {} at row {at} of {}", v.len(), p.out, b.len()),
                    });
                }
                b[at..at + p.out].copy_from_slice(&v);
            }
            out.push(match bias {
                Bias::Bf16(region) => Assembled::Bf16 { region: *region, cols: None, data: b },
                // bf16 → f32 is exact: the values the checkpoint holds.
                Bias::F32(region) => {
                    Assembled::F32 { region: *region, data: b.iter().map(|v| v.to_f32()).collect() }
                }
            });
        }
        match &lin.weight {
            Weight::Stacked(_, lora) => {
                let g = lora.b.shape()[1];
                let (a, b) = stack_lora(ckpt, &parts, n, g, g, scale)?;
                out.push(Assembled::Bf16 { region: lora.a, cols: None, data: a });
                out.push(Assembled::Bf16 { region: lora.b, cols: None, data: b });
            }
            Weight::Folded { wb, a: a_region, g, .. } => {
                let g8 = a_region.shape()[0];
                // B's rows g8 apart: its padding columns zero, like A's padding rows.
                let (mut a, b) = stack_lora(ckpt, &parts, n, *g, g8, scale)?;
                a.resize(g8 * k, bf16::ZERO);
                out.push(Assembled::Bf16 { region: *wb, cols: Some((k, g8)), data: b });
                out.push(Assembled::Bf16 { region: *a_region, cols: None, data: a });
            }
            Weight::Plain(_) | Weight::Merged(_) => {}
        }
        Ok(out)
    })
}

/// One task's LoRA of the checkpoint projections `parts`: `A_τ [P·r, k]` (the parts' A one
/// after the other) and `B_τ [Σn_p, P·r]` (part p's `scale·B` in its rows and its r columns,
/// zeros elsewhere).
fn task_lora(
    ckpt: &Checkpoint,
    parts: &[&LinearSpec],
    task: Task,
    scale: f32,
) -> Result<(Vec<bf16>, Vec<bf16>)> {
    let p = parts.len();
    let rows: usize = parts.iter().map(|q| q.out).sum();
    let mut a = Vec::new();
    for q in parts {
        a.extend(bf16_of(ckpt, &q.lora_a(task))?);
    }
    let rank = a.len() / (p * parts[0].inp).max(1);
    if a.len() != p * rank * parts[0].inp || rank == 0 {
        return Err(Error::Tensor {
            name: parts[0].lora_a(task),
            file: ckpt.dir.clone(),
            msg: format!("{} values in the A factors, expected [r, {}] per part", a.len(), parts[0].inp),
        });
    }
    let cols = p * rank;
    let mut b = vec![bf16::ZERO; rows * cols];
    let mut row0 = 0;
    for (pi, q) in parts.iter().enumerate() {
        let name = q.lora_b(task);
        let bt = bf16_of(ckpt, &name)?; // [n_p, r]
        if bt.len() != q.out * rank {
            return Err(Error::Tensor {
                name,
                file: ckpt.dir.clone(),
                msg: format!("{} values, expected [{}, {rank}]", bt.len(), q.out),
            });
        }
        for (i, row) in bt.chunks(rank).enumerate() {
            let dst = &mut b[(row0 + i) * cols + pi * rank..][..rank];
            if scale == 1.0 {
                // jina's adapters (α = r): the scaled value is the stored one, bit for bit.
                dst.copy_from_slice(row);
            } else {
                for (d, v) in dst.iter_mut().zip(row) {
                    *d = bf16::from_f32(v.to_f32() * scale);
                }
            }
        }
        row0 += q.out;
    }
    Ok((a, b))
}

/// Stacks the LoRA of the checkpoint projections `parts` for all tasks (module documentation):
/// `A_all [tasks·P·r, k]` task-major, `B_all [Σn_p, tasks·P·r]` block-structured, scale folded in,
/// its rows `ld ≥ cols` apart (zeros past `cols`).
fn stack_lora(
    ckpt: &Checkpoint,
    parts: &[&LinearSpec],
    rows: usize,
    cols: usize,
    ld: usize,
    scale: f32,
) -> Result<(Vec<bf16>, Vec<bf16>)> {
    let per_task = cols / Task::ALL.len();
    let mut a = Vec::new();
    let mut b = vec![bf16::ZERO; rows * ld];
    for (ti, task) in Task::ALL.iter().enumerate() {
        let (at, bt) = task_lora(ckpt, parts, *task, scale)?;
        if bt.len() != rows * per_task {
            return Err(Error::Tensor {
                name: parts[0].lora_b(*task),
                file: ckpt.dir.clone(),
                msg: format!(
                    "rank {} does not match the planned {per_task} columns per task",
                    bt.len() / rows.max(1)
                ),
            });
        }
        a.extend(at);
        for (dst, src) in b.chunks_exact_mut(ld).zip(bt.chunks_exact(per_task)) {
            dst[ti * per_task..(ti + 1) * per_task].copy_from_slice(src);
        }
    }
    Ok((a, b))
}
