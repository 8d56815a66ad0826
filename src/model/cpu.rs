//! The whole model on the CPU in plain f32: the oracle for the GPU forward, and what CI checks
//! against the PyTorch fixtures on every push. Built from the same checkpoint loader and host
//! planning the GPU path uses; every op comes from [`crate::reference`].
//!
//! Batches are packed exactly as on the GPU: the sequences' tokens are concatenated (no padding),
//! attention runs over `cu_seqlens` segments, and each sequence's LoRA is its own task's. The
//! wiring follows spec §5 (vision tower), §4.3 (splice), §7 (decoder) and §8 (heads).
//!
//! Slow by design (f64 accumulation in every reduction); fine for the tiny fixture model, far too
//! slow for the full one.

use std::collections::HashMap;

use crate::model::batch::{BatchOutput, ImageInput, PackedBatch};
use crate::model::checkpoint::Checkpoint;
use crate::model::config::ModelConfig;
use crate::model::plan::{self, GridThw};
use crate::model::Task;
use crate::reference as r;
use crate::{Error, Result};

/// The checkpoint's tensors as f32 (bf16 values widened exactly).
pub struct CpuModel {
    cfg: ModelConfig,
    lora_scale: f32,
    w: HashMap<String, Vec<f32>>,
}

/// The seven adapted projections of a decoder layer, in checkpoint naming.
const PROJ: [(&str, &str); 7] = [
    ("self_attn", "q_proj"),
    ("self_attn", "k_proj"),
    ("self_attn", "v_proj"),
    ("self_attn", "o_proj"),
    ("mlp", "gate_proj"),
    ("mlp", "up_proj"),
    ("mlp", "down_proj"),
];

impl CpuModel {
    /// Widens every tensor of a validated checkpoint to f32 (bf16 → f32 is exact; F32 tensors go
    /// through bf16 first, as the engine stores them).
    pub fn from_checkpoint(ckpt: &Checkpoint) -> Self {
        let w = ckpt
            .tensors()
            .iter()
            .map(|t| (t.name.clone(), ckpt.to_bf16(t).iter().map(|v| v.to_f32()).collect()))
            .collect();
        CpuModel { cfg: ckpt.config.clone(), lora_scale: ckpt.adapter.scale(), w }
    }

    /// The configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// Host bytes held by the f32 weights.
    pub fn host_bytes(&self) -> usize {
        self.w.values().map(|v| v.len() * 4).sum()
    }

    fn t(&self, name: &str) -> &[f32] {
        self.w.get(name).unwrap_or_else(|| panic!("tensor {name} (validated at load, so a bug)"))
    }

    /// `x [m, k] · W[n, k]ᵀ (+ b)` for the linear `prefix` (`prefix.weight`, optional `prefix.bias`).
    fn linear(&self, prefix: &str, x: &[f32], m: usize, k: usize, bias: bool) -> Vec<f32> {
        let w = self.t(&format!("{prefix}.weight"));
        let n = w.len() / k;
        let b = bias.then(|| self.t(&format!("{prefix}.bias")));
        r::linear_f32(x, w, b, m, n, k)
    }

    /// A task-adapted linear over a packed batch: the base projection plus, per sequence segment,
    /// its task's LoRA delta.
    fn adapted(
        &self,
        prefix: &str,
        x: &[f32],
        k: usize,
        bias: bool,
        segs: &[(usize, usize, Task)],
    ) -> Vec<f32> {
        let m = x.len() / k;
        let mut y = self.linear(prefix, x, m, k, bias);
        let n = y.len() / m;
        for &(s, e, task) in segs {
            let a = self.t(&format!("{prefix}.lora_A.{}.weight", task.name()));
            let b = self.t(&format!("{prefix}.lora_B.{}.weight", task.name()));
            let rank = a.len() / k;
            let d = r::lora(&x[s * k..e * k], a, b, self.lora_scale, e - s, k, rank, n);
            for (yv, dv) in y[s * n..e * n].iter_mut().zip(d) {
                *yv += dv;
            }
        }
        y
    }

    /// The vision tower for a batch of images (spec §5): merged-token embeddings `[N, out_hidden]`
    /// in raster order per image, images in order.
    pub fn vision(&self, images: &[&ImageInput]) -> Vec<f32> {
        let v = &self.cfg.vision;
        let grids: Vec<GridThw> = images.iter().map(|i| i.grid).collect();
        let vp = plan::vision_plan(&grids, v.spatial_merge_size, v.window_size, v.patch_size);
        let unit = v.spatial_merge_size * v.spatial_merge_size;
        let (d, np) = (v.hidden_size, vp.patches);
        let pix: Vec<f32> = images.iter().flat_map(|i| i.pixel_values.iter().copied()).collect();
        let row = pix.len() / np;

        // Patch embedding: the Conv3d with stride = kernel is a GEMM on flattened patches.
        let x = self.linear("visual.patch_embed.proj", &pix, np, row, false);
        let mut x = r::gather_rows(&x, unit * d, &vp.window_index);
        let angles = r::vision_rope_angles(&vp.rot_pos_windowed(v.spatial_merge_size), v.head_dim(), 10000.0);
        let full: Vec<usize> = vp.cu_seqlens.iter().map(|&c| c as usize).collect();
        let windows: Vec<usize> = vp.cu_window_seqlens.iter().map(|&c| c as usize).collect();
        let (heads, hd) = (v.num_heads, v.head_dim());
        let eps = 1e-6;
        for j in 0..v.depth {
            let p = format!("visual.blocks.{j}");
            let h = r::rmsnorm(&x, self.t(&format!("{p}.norm1.weight")), eps);
            let qkv = self.linear(&format!("{p}.attn.qkv"), &h, np, d, true);
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
            let o = self.linear(&format!("{p}.attn.proj"), &a, np, d, true);
            add_into(&mut x, &o);
            let h = r::rmsnorm(&x, self.t(&format!("{p}.norm2.weight")), eps);
            let g = self.linear(&format!("{p}.mlp.gate_proj"), &h, np, d, true);
            let u = self.linear(&format!("{p}.mlp.up_proj"), &h, np, d, true);
            let act = r::swiglu_split(&g, &u);
            let o = self.linear(&format!("{p}.mlp.down_proj"), &act, np, v.intermediate_size, true);
            add_into(&mut x, &o);
        }
        // Patch merger: RMSNorm per patch, groups of merge² patches as one row, MLP with exact GELU.
        let h = r::rmsnorm(&x, self.t("visual.merger.ln_q.weight"), eps);
        let merged = r::merge_rows(&h, d, unit);
        let wide = unit * d;
        let z = self.linear("visual.merger.mlp.0", &merged, np / unit, wide, true);
        let z = r::gelu(&z);
        let z = self.linear("visual.merger.mlp.2", &z, np / unit, wide, true);
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
        let mut h = r::embedding(self.t("embed_tokens.weight"), hid, ids);
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
        for l in 0..t.num_hidden_layers {
            let p = format!("layers.{l}");
            let proj = |i: usize| format!("{p}.{}.{}", PROJ[i].0, PROJ[i].1);
            let x = r::rmsnorm(&h, self.t(&format!("{p}.input_layernorm.weight")), eps);
            let mut q = self.adapted(&proj(0), &x, hid, true, &segs);
            let mut k = self.adapted(&proj(1), &x, hid, true, &segs);
            let v = self.adapted(&proj(2), &x, hid, true, &segs);
            r::rope_apply(&mut q, n, heads, hd, &angles);
            r::rope_apply(&mut k, n, kvh, hd, &angles);
            let a = r::attention(&q, &k, &v, &cu, heads, kvh, hd, true, (hd as f32).powf(-0.5));
            let o = self.adapted(&proj(3), &a, heads * hd, false, &segs);
            add_into(&mut h, &o);
            let x = r::rmsnorm(&h, self.t(&format!("{p}.post_attention_layernorm.weight")), eps);
            let g = self.adapted(&proj(4), &x, hid, false, &segs);
            let u = self.adapted(&proj(5), &x, hid, false, &segs);
            let act = r::swiglu_split(&g, &u);
            let o = self.adapted(&proj(6), &act, t.intermediate_size, false, &segs);
            add_into(&mut h, &o);
            if let Some(tr) = trace.as_deref_mut() {
                tr.push(h.clone());
            }
        }
        let h = r::rmsnorm(&h, self.t("norm.weight"), eps);

        // Heads (§8): both from the one pass.
        let multi = self.adapted("multi_vector_projector", &h, hid, true, &segs);
        let pd = multi.len() / n;
        let multi = r::l2_rows(&multi, pd);
        let spans: Vec<(usize, usize)> =
            batch.spans().iter().map(|&[a, b]| (a as usize, b as usize)).collect();
        let single = r::mean_pool_l2(&h, hid, &spans);
        if let Some(tr) = trace {
            tr.push(h);
        }
        Ok(BatchOutput { single, multi: batch.want_multi.then_some(multi) })
    }
}

fn add_into(acc: &mut [f32], x: &[f32]) {
    for (a, b) in acc.iter_mut().zip(x) {
        *a += b;
    }
}
