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

use crate::model::checkpoint::Checkpoint;
use crate::model::config::ModelConfig;
use crate::model::plan::{self, GridThw};
use crate::model::Task;
use crate::reference as r;
use crate::{Error, Result};

/// One sequence of a batch: token ids (prompt included; image blocks already expanded to their
/// `<|image_pad|>` runs), its task, and the images whose blocks it contains, in order.
#[derive(Clone, Debug)]
pub struct SeqInput {
    /// Token ids.
    pub ids: Vec<u32>,
    /// Task (selects the LoRA).
    pub task: Task,
    /// The images of this sequence, in the order of their blocks.
    pub images: Vec<ImageInput>,
}

/// One preprocessed image.
#[derive(Clone, Debug)]
pub struct ImageInput {
    /// `[patches, 3·t·p·p]` in merge-block row order.
    pub pixel_values: Vec<f32>,
    /// The patch grid.
    pub grid: GridThw,
}

/// What the model produces for one sequence.
#[derive(Clone, Debug)]
pub struct SeqOutput {
    /// Final-norm hidden states `[L, hidden]`.
    pub hidden: Vec<f32>,
    /// The single vector: mean over the pooling span, L2-normalised, full width (truncate with
    /// [`crate::reference::matryoshka`]).
    pub single: Vec<f32>,
    /// The multi-vector rows `[L, proj_dim]`, each L2-normalised.
    pub multi: Vec<f32>,
}

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

    /// One packed forward over `batch` (spec §3–§8): every sequence's final hidden states and
    /// both heads. Sequences never see each other.
    pub fn forward(&self, batch: &[SeqInput]) -> Result<Vec<SeqOutput>> {
        self.forward_traced(batch, None)
    }

    /// [`CpuModel::forward`] that also records the packed residual stream `[tokens, hidden]`
    /// after the embeddings (with the image rows spliced in), after every decoder layer, and the
    /// final-norm states: the checkpoints at which the GPU forward is compared layer by layer.
    pub fn forward_traced(
        &self,
        batch: &[SeqInput],
        mut trace: Option<&mut Vec<Vec<f32>>>,
    ) -> Result<Vec<SeqOutput>> {
        let t = &self.cfg.text;
        let sp = &self.cfg.special;
        let merge = self.cfg.vision.spatial_merge_size;
        let (hid, eps) = (t.hidden_size, t.rms_norm_eps as f32);

        // Host planning: segments, positions, the image-token rows.
        let mut cu = vec![0usize];
        let (mut pt, mut ph, mut pw) = (Vec::new(), Vec::new(), Vec::new());
        let mut ids = Vec::new();
        let mut segs = Vec::new();
        for s in batch {
            if s.ids.is_empty() {
                return Err(Error::Input("a sequence with no tokens".into()));
            }
            let grids: Vec<GridThw> = s.images.iter().map(|i| i.grid).collect();
            let pos = plan::mrope_positions(&s.ids, sp.image_token_id, &grids, merge)?;
            pt.extend(pos.t);
            ph.extend(pos.h);
            pw.extend(pos.w);
            let start = ids.len();
            ids.extend_from_slice(&s.ids);
            segs.push((start, ids.len(), s.task));
            cu.push(ids.len());
        }
        let n = ids.len();

        // Embeddings, with the image rows replaced by the vision tower's output (spec §4.3).
        let mut h = r::embedding(self.t("embed_tokens.weight"), hid, &ids);
        let images: Vec<&ImageInput> = batch.iter().flat_map(|s| s.images.iter()).collect();
        if !images.is_empty() {
            let vis = self.vision(&images);
            let expected = vis.len() / hid;
            let rows = plan::image_token_rows(&ids, sp.image_token_id, expected)?;
            for (i, &row) in rows.iter().enumerate() {
                let row = row as usize;
                h[row * hid..(row + 1) * hid].copy_from_slice(&vis[i * hid..(i + 1) * hid]);
            }
        }

        if let Some(tr) = trace.as_deref_mut() {
            tr.push(h.clone());
        }
        let angles = r::mrope_angles(&pt, &ph, &pw, t.head_dim, t.rope_theta, t.mrope_section);
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
        if let Some(tr) = trace {
            tr.push(h.clone());
        }

        // Heads (spec §8): both from the one pass.
        let multi = self.adapted("multi_vector_projector", &h, hid, true, &segs);
        let pd = multi.len() / n;
        let multi = r::l2_rows(&multi, pd);
        let mut out = Vec::with_capacity(batch.len());
        for (s, &(start, end, _)) in batch.iter().zip(&segs) {
            let (a, b) = plan::pooling_span(
                &s.ids,
                sp.vision_start_token_id,
                sp.vision_end_token_id,
                !s.images.is_empty(),
            )?;
            let hs = &h[start * hid..end * hid];
            out.push(SeqOutput {
                hidden: hs.to_vec(),
                single: r::mean_pool_l2(hs, hid, &[(a, b)]),
                multi: multi[start * pd..end * pd].to_vec(),
            });
        }
        Ok(out)
    }
}

fn add_into(acc: &mut [f32], x: &[f32]) {
    for (a, b) in acc.iter_mut().zip(x) {
        *a += b;
    }
}
