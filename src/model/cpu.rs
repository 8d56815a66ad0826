//! The whole model on the CPU in plain f32: the oracle for the GPU forward, and what CI checks
//! against the PyTorch fixtures on every push. Built from the same checkpoint loader and host
//! planning the GPU path uses; every op comes from [`crate::reference`].
//!
//! Batches are packed exactly as on the GPU: the sequences' tokens are concatenated (no padding),
//! attention runs over `cu_seqlens` segments, and each sequence's LoRA is its own task's. The
//! wiring follows docs/MODEL.md §5 (vision tower), §4.3 (splice), §7 (decoder) and §8 (heads).
//!
//! Slow by design (f64 accumulation in every reduction); fine for the tiny fixture model, far too
//! slow for the full one.

use crate::model::batch::{BatchOutput, ImageInput, PackedBatch};
use crate::model::checkpoint::Checkpoint;
use crate::model::config::ModelConfig;
use crate::model::constants::{VISION_RMS_EPS, VISION_ROPE_THETA};
use crate::model::plan::{self, GridThw};
use crate::model::schema::{LinearSpec, Schema};
use crate::model::Task;
use crate::reference as r;
use crate::{Error, Result};

/// A linear layer's weights as f32, with its per-task LoRA (indexed by [`Task::index`]).
struct Linear {
    w: Vec<f32>,
    bias: Option<Vec<f32>>,
    /// `(A [r, in], B [out, r])` per task; empty when not adapted.
    lora: Vec<(Vec<f32>, Vec<f32>)>,
}

/// One decoder layer, tensor by tensor as stored (nothing fused: this is the oracle).
struct TextLayer {
    input_norm: Vec<f32>,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    post_norm: Vec<f32>,
    gate: Linear,
    up: Linear,
    down: Linear,
}

/// One vision block.
struct VisionBlock {
    norm1: Vec<f32>,
    norm2: Vec<f32>,
    qkv: Linear,
    proj: Linear,
    gate: Linear,
    up: Linear,
    down: Linear,
}

/// The checkpoint's tensors as f32 (bf16 values widened exactly), structured by the [`Schema`].
pub struct CpuModel {
    cfg: ModelConfig,
    lora_scale: f32,
    embed: Vec<f32>,
    layers: Vec<TextLayer>,
    norm: Vec<f32>,
    patch_embed: Linear,
    blocks: Vec<VisionBlock>,
    merger_ln_q: Vec<f32>,
    merger_mlp0: Linear,
    merger_mlp2: Linear,
    projector: Linear,
    floats: usize,
}

/// Reads tensors of a checkpoint as f32, counting what it holds.
struct Loader<'c> {
    ckpt: &'c Checkpoint,
    floats: usize,
}

impl Loader<'_> {
    /// bf16 → f32 is exact; F16/F32 tensors go through bf16 first, as the engine stores them.
    fn get(&mut self, name: &str) -> Result<Vec<f32>> {
        let t = self.ckpt.get(name).ok_or_else(|| Error::Tensor {
            name: name.into(),
            file: self.ckpt.dir.clone(),
            msg: "missing".into(),
        })?;
        let v: Vec<f32> = self.ckpt.to_bf16(t)?.iter().map(|v| v.to_f32()).collect();
        self.floats += v.len();
        Ok(v)
    }

    fn linear(&mut self, s: &LinearSpec) -> Result<Linear> {
        let w = self.get(&s.weight())?;
        let bias = s.bias_name().map(|b| self.get(&b)).transpose()?;
        let mut lora = Vec::new();
        if s.lora {
            for task in Task::ALL {
                lora.push((self.get(&s.lora_a(task))?, self.get(&s.lora_b(task))?));
            }
        }
        Ok(Linear { w, bias, lora })
    }
}

impl CpuModel {
    /// Widens every tensor of a validated checkpoint to f32 (bf16 → f32 is exact; F32 tensors go
    /// through bf16 first, as the engine stores them). A missing tensor is an [`Error::Tensor`].
    pub fn from_checkpoint(ckpt: &Checkpoint) -> Result<Self> {
        let s = Schema::new(&ckpt.config, &ckpt.adapter);
        let mut ld = Loader { ckpt, floats: 0 };
        let mut layers = Vec::with_capacity(s.layers.len());
        for l in &s.layers {
            layers.push(TextLayer {
                input_norm: ld.get(&l.input_norm.weight)?,
                q: ld.linear(&l.q)?,
                k: ld.linear(&l.k)?,
                v: ld.linear(&l.v)?,
                o: ld.linear(&l.o)?,
                post_norm: ld.get(&l.post_norm.weight)?,
                gate: ld.linear(&l.gate)?,
                up: ld.linear(&l.up)?,
                down: ld.linear(&l.down)?,
            });
        }
        let mut blocks = Vec::with_capacity(s.blocks.len());
        for b in &s.blocks {
            blocks.push(VisionBlock {
                norm1: ld.get(&b.norm1.weight)?,
                norm2: ld.get(&b.norm2.weight)?,
                qkv: ld.linear(&b.qkv)?,
                proj: ld.linear(&b.proj)?,
                gate: ld.linear(&b.gate)?,
                up: ld.linear(&b.up)?,
                down: ld.linear(&b.down)?,
            });
        }
        Ok(CpuModel {
            cfg: ckpt.config.clone(),
            lora_scale: ckpt.adapter.scale(),
            embed: ld.get(&s.embed.0)?,
            layers,
            norm: ld.get(&s.norm.weight)?,
            patch_embed: Linear { w: ld.get(&s.patch_embed.weight)?, bias: None, lora: Vec::new() },
            blocks,
            merger_ln_q: ld.get(&s.merger.ln_q.weight)?,
            merger_mlp0: ld.linear(&s.merger.mlp0)?,
            merger_mlp2: ld.linear(&s.merger.mlp2)?,
            projector: ld.linear(&s.projector)?,
            floats: ld.floats,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// Host bytes held by the f32 weights.
    pub fn host_bytes(&self) -> usize {
        self.floats * 4
    }

    /// `x [m, k] · W[n, k]ᵀ (+ b)`.
    fn linear(&self, lin: &Linear, x: &[f32], m: usize, k: usize) -> Vec<f32> {
        let n = lin.w.len() / k;
        r::linear_f32(x, &lin.w, lin.bias.as_deref(), m, n, k)
    }

    /// A task-adapted linear over a packed batch: the base projection plus, per sequence segment,
    /// its task's LoRA delta.
    fn adapted(&self, lin: &Linear, x: &[f32], k: usize, segs: &[(usize, usize, Task)]) -> Vec<f32> {
        let m = x.len() / k;
        let mut y = self.linear(lin, x, m, k);
        let n = y.len() / m;
        for &(s, e, task) in segs {
            let (a, b) = &lin.lora[task.index()];
            let rank = a.len() / k;
            let d = r::lora(&x[s * k..e * k], a, b, self.lora_scale, e - s, k, rank, n);
            for (yv, dv) in y[s * n..e * n].iter_mut().zip(d) {
                *yv += dv;
            }
        }
        y
    }

    /// The vision tower for a batch of images (docs/MODEL.md §5): merged-token embeddings `[N, out_hidden]`
    /// in raster order per image, images in order.
    pub fn vision(&self, images: &[&ImageInput]) -> Vec<f32> {
        let v = &self.cfg.vision;
        let grids: Vec<GridThw> = images.iter().map(|i| i.grid).collect();
        let vp = plan::vision_plan(&grids, v.spatial_merge_size, v.window_size, v.patch_size);
        let unit = v.spatial_merge_size * v.spatial_merge_size;
        let (d, np) = (v.hidden_size, vp.patches);
        let pix: Vec<f32> = images.iter().flat_map(|i| i.pixel_values.to_f32()).collect();
        let row = pix.len() / np;

        // Patch embedding: the Conv3d with stride = kernel is a GEMM on flattened patches.
        let x = self.linear(&self.patch_embed, &pix, np, row);
        let mut x = r::gather_rows(&x, unit * d, &vp.window_index);
        let angles = r::vision_rope_angles(
            &vp.rot_pos_windowed(v.spatial_merge_size),
            v.head_dim(),
            VISION_ROPE_THETA,
        );
        let full: Vec<usize> = vp.cu_seqlens.iter().map(|&c| c as usize).collect();
        let windows: Vec<usize> = vp.cu_window_seqlens.iter().map(|&c| c as usize).collect();
        let (heads, hd) = (v.num_heads, v.head_dim());
        let eps = VISION_RMS_EPS;
        for (j, b) in self.blocks.iter().enumerate() {
            let h = r::rmsnorm(&x, &b.norm1, eps);
            let qkv = self.linear(&b.qkv, &h, np, d);
            let (mut q, mut k, mut vv) =
                (Vec::with_capacity(np * d), Vec::with_capacity(np * d), Vec::with_capacity(np * d));
            for t in qkv.chunks_exact(3 * d) {
                q.extend_from_slice(&t[..d]);
                k.extend_from_slice(&t[d..2 * d]);
                vv.extend_from_slice(&t[2 * d..]);
            }
            r::rope_apply(&mut q, np, heads, hd, &angles);
            r::rope_apply(&mut k, np, heads, hd, &angles);
            let segs = if v.fullatt_block_indexes.contains(&j) { &full } else { &windows };
            let a = r::attention(&q, &k, &vv, segs, heads, heads, hd, false, (hd as f32).powf(-0.5));
            let o = self.linear(&b.proj, &a, np, d);
            add_into(&mut x, &o);
            let h = r::rmsnorm(&x, &b.norm2, eps);
            let g = self.linear(&b.gate, &h, np, d);
            let u = self.linear(&b.up, &h, np, d);
            let act = r::swiglu_split(&g, &u);
            let o = self.linear(&b.down, &act, np, v.intermediate_size);
            add_into(&mut x, &o);
        }
        // Patch merger: RMSNorm per patch, groups of merge² patches as one row, MLP with exact GELU.
        let h = r::rmsnorm(&x, &self.merger_ln_q, eps);
        let merged = r::merge_rows(&h, d, unit);
        let wide = unit * d;
        let z = self.linear(&self.merger_mlp0, &merged, np / unit, wide);
        let z = r::gelu(&z);
        let z = self.linear(&self.merger_mlp2, &z, np / unit, wide);
        r::gather_rows(&z, v.out_hidden_size, &vp.reverse_index)
    }

    /// One packed forward over `batch` (docs/MODEL.md §3–§8): both heads (the multi-vector one
    /// always; the batch's `want_multi` only decides whether it is returned). Sequences never see
    /// each other.
    pub fn forward(&self, batch: &PackedBatch) -> Result<BatchOutput> {
        self.forward_traced(batch, None)
    }

    /// [`CpuModel::forward`] that also records the packed residual stream `[tokens, hidden]`
    /// after the embeddings (with the image rows spliced in), after every decoder layer, and the
    /// final-norm states (the last entry): the checkpoints at which the GPU forward is compared
    /// layer by layer.
    pub fn forward_traced(
        &self,
        batch: &PackedBatch,
        mut trace: Option<&mut Vec<Vec<f32>>>,
    ) -> Result<BatchOutput> {
        let t = &self.cfg.text;
        let (hid, eps) = (t.hidden_size, t.rms_norm_eps as f32);
        let n = batch.tokens();
        if n == 0 {
            return Err(Error::Input("an empty batch".into()));
        }
        let ids = batch.ids();
        let cu: Vec<usize> = batch.cu_seqlens().iter().map(|&c| c as usize).collect();
        let segs: Vec<(usize, usize, Task)> =
            batch.tasks().iter().enumerate().map(|(k, &task)| (cu[k], cu[k + 1], task)).collect();

        // Embeddings, with the image rows replaced by the vision tower's output (§4.3).
        let mut h = r::embedding(&self.embed, hid, ids);
        if !batch.images().is_empty() {
            let images: Vec<&ImageInput> = batch.images().iter().collect();
            let vis = self.vision(&images);
            let rows = batch.image_rows();
            if rows.len() * hid != vis.len() {
                return Err(Error::Input(format!(
                    "the batch has {} image tokens but the images produce {} merged tokens",
                    rows.len(),
                    vis.len() / hid
                )));
            }
            for (i, &row) in rows.iter().enumerate() {
                let row = row as usize;
                h[row * hid..(row + 1) * hid].copy_from_slice(&vis[i * hid..(i + 1) * hid]);
            }
        }

        if let Some(tr) = trace.as_deref_mut() {
            tr.push(h.clone());
        }
        let pos = batch.positions();
        let angles = r::mrope_angles(&pos.t, &pos.h, &pos.w, t.head_dim, t.rope_theta, t.mrope_section);
        let (heads, kvh, hd) = (t.num_attention_heads, t.num_key_value_heads, t.head_dim);
        for l in &self.layers {
            let x = r::rmsnorm(&h, &l.input_norm, eps);
            let mut q = self.adapted(&l.q, &x, hid, &segs);
            let mut k = self.adapted(&l.k, &x, hid, &segs);
            let v = self.adapted(&l.v, &x, hid, &segs);
            r::rope_apply(&mut q, n, heads, hd, &angles);
            r::rope_apply(&mut k, n, kvh, hd, &angles);
            let a = r::attention(&q, &k, &v, &cu, heads, kvh, hd, true, (hd as f32).powf(-0.5));
            let o = self.adapted(&l.o, &a, heads * hd, &segs);
            add_into(&mut h, &o);
            let x = r::rmsnorm(&h, &l.post_norm, eps);
            let g = self.adapted(&l.gate, &x, hid, &segs);
            let u = self.adapted(&l.up, &x, hid, &segs);
            let act = r::swiglu_split(&g, &u);
            let o = self.adapted(&l.down, &act, t.intermediate_size, &segs);
            add_into(&mut h, &o);
            if let Some(tr) = trace.as_deref_mut() {
                tr.push(h.clone());
            }
        }
        let h = r::rmsnorm(&h, &self.norm, eps);

        // Heads (§8): both from the one pass.
        let multi = self.adapted(&self.projector, &h, hid, &segs);
        let pd = multi.len() / n;
        let multi = r::l2_rows(&multi, pd);
        let spans: Vec<(usize, usize)> =
            batch.spans().iter().map(|&[a, b]| (a as usize, b as usize)).collect();
        let single = r::mean_pool_l2(&h, hid, &spans);
        let chunks: Vec<(usize, usize)> =
            batch.chunk_spans().iter().map(|&[a, b]| (a as usize, b as usize)).collect();
        let chunk_single = r::mean_pool_l2(&h, hid, &chunks);
        if let Some(tr) = trace {
            tr.push(h);
        }
        Ok(BatchOutput { single, multi: batch.want_multi.then_some(multi), chunk_single })
    }
}

fn add_into(acc: &mut [f32], x: &[f32]) {
    for (a, b) in acc.iter_mut().zip(x) {
        *a += b;
    }
}
