//! The text decoder on the GPU (spec §3, §7, §8): packed variable-length batches, one stream,
//! activations from the paged allocator, both heads from one pass.
//!
//! Weights are prepared once at load: q/k/v fused into one `[q+k+v, hidden]` projection (with
//! its bias), gate/up into one `[2·inter, hidden]` projection (the SwiGLU kernel reads that
//! layout), and each adapted projection's LoRA stacked for all tasks:
//! `A_all = [A_{τ0,p0}; A_{τ0,p1}; …; A_{τ2,pP}]` (task-major) and a block matrix `B_all` whose
//! output rows of projection `p` hold `scale·B_{τ,p}` in the columns of `(τ, p)` and zeros
//! elsewhere. A batch that mixes tasks then costs two extra GEMMs per projection whatever the mix:
//! `t = x·A_allᵀ`, zero in each row the column groups of the other tasks (`lora_mask`), and
//! `y += t·B_allᵀ`. Every row gets exactly its own task's delta, so a request's vectors do not
//! depend on what else shares its batch.
//!
//! The residual stream is f32 and the residual adds ride on the GEMMs (cuBLASLt with beta = 1 and
//! an f32 output), so adding a projection (and its LoRA delta) to it rounds nothing to bf16; the
//! norms read it and write the bf16 activations the next GEMM takes. (HF keeps it in bf16: ours is
//! the more accurate of the two, at 8 extra bytes per token and layer of traffic.)

use half::bf16;

use crate::cuda::{BufferLayout, DTensor, DView, DViewMut, DeviceAllocator, DeviceBuffer, Gpu, Region};
use crate::model::batch::{BatchOutput, PackedBatch};
use crate::model::checkpoint::Checkpoint;
use crate::model::config::ModelConfig;
use crate::model::plan;
use crate::model::schema::{LinearSpec, Schema};
use crate::model::weights::{LoadReport, ALIGN};
use crate::model::Task;
use crate::ops;
use crate::{Error, Result};

/// A bf16 weight in the one weights buffer.
type W = Region<bf16>;

/// A projection's LoRA, stacked for all tasks (and all fused parts): `A_all [tasks·parts·r, k]`,
/// `B_all [n, tasks·parts·r]` (module documentation).
struct Lora {
    a: W,
    b: W,
    /// Checkpoint projections fused into this one.
    parts: usize,
}

/// `y = x·Wᵀ (+ b)` with an optional stacked LoRA.
struct Linear {
    w: W,
    bias: Option<W>,
    lora: Option<Lora>,
}

/// One decoder layer, prepared.
struct TextLayer {
    input_norm: W,
    qkv: Linear,
    o: Linear,
    post_norm: W,
    gate_up: Linear,
    down: Linear,
}

/// One vision block, prepared.
struct VisionBlock {
    norm1: W,
    norm2: W,
    qkv: Linear,
    proj: Linear,
    gate_up: Linear,
    down: Linear,
}

/// The patch merger.
struct Merger {
    ln_q: W,
    mlp0: Linear,
    mlp2: Linear,
}

/// The heads after the final norm: the multi-vector projector with its LoRA (the single vector
/// is a pooling, no weights).
struct Heads {
    projector: Linear,
}

/// Every prepared tensor, in one device buffer.
struct Weights {
    buf: DeviceBuffer,
    embed: W,
    layers: Vec<TextLayer>,
    norm: W,
    patch_embed: W,
    blocks: Vec<VisionBlock>,
    merger: Merger,
    heads: Heads,
    /// f32: the M-RoPE inverse frequencies, `[head_dim/2]`.
    inv_freq: Region<f32>,
}

impl Weights {
    fn at(&self, w: &W) -> DView<'_, bf16> {
        self.buf.at(w)
    }
}

/// The model on the GPU (text path).
pub struct GpuModel {
    cfg: ModelConfig,
    w: Weights,
    rank: usize,
}

/// A checkpoint tensor as bf16, or the load error naming it.
fn bf16_of(ckpt: &Checkpoint, name: &str) -> Result<Vec<bf16>> {
    let t = ckpt.get(name).ok_or_else(|| Error::Tensor {
        name: name.into(),
        file: ckpt.dir.clone(),
        msg: "missing".into(),
    })?;
    Ok(ckpt.to_bf16(t))
}

/// Plans the prepared tensor of the checkpoint projections `parts` (fused in row order).
fn plan_linear(lay: &mut BufferLayout, parts: &[&LinearSpec], rank: usize) -> Linear {
    let rows: usize = parts.iter().map(|p| p.out).sum();
    let k = parts[0].inp;
    let g = Task::ALL.len() * parts.len() * rank;
    Linear {
        w: lay.push(&[rows, k]),
        bias: parts[0].bias.then(|| lay.push(&[rows])),
        lora: parts[0].lora.then(|| Lora {
            a: lay.push(&[g, k]),
            b: lay.push(&[rows, g]),
            parts: parts.len(),
        }),
    }
}

/// Fills a planned [`Linear`] from the checkpoint: weights and biases concatenated, the LoRA
/// stacked with `scale` folded in.
fn fill_linear(
    gpu: &Gpu,
    buf: &mut DeviceBuffer,
    ckpt: &Checkpoint,
    parts: &[&LinearSpec],
    lin: &Linear,
    scale: f32,
) -> Result<()> {
    let mut w = Vec::new();
    for p in parts {
        w.extend(bf16_of(ckpt, &p.weight())?);
    }
    buf.fill(gpu, &lin.w, &w)?;
    if let Some(bias) = &lin.bias {
        let mut b = Vec::new();
        for name in parts.iter().filter_map(|p| p.bias_name()) {
            b.extend(bf16_of(ckpt, &name)?);
        }
        buf.fill(gpu, bias, &b)?;
    }
    if let Some(lora) = &lin.lora {
        let (a, b) = stack_lora(ckpt, parts, lora, scale)?;
        buf.fill(gpu, &lora.a, &a)?;
        buf.fill(gpu, &lora.b, &b)?;
    }
    Ok(())
}

impl GpuModel {
    /// Prepares and uploads the weights (see the module documentation), walking the checkpoint's
    /// [`Schema`]. A tensor missing from the checkpoint is an [`Error::Tensor`] naming it.
    pub fn load(gpu: &Gpu, ckpt: &Checkpoint) -> Result<(GpuModel, LoadReport)> {
        let t0 = std::time::Instant::now();
        let cfg = ckpt.config.clone();
        let s = Schema::new(&cfg, &ckpt.adapter);
        let rank = s.rank;
        let scale = ckpt.adapter.scale();

        // The layout: every prepared tensor's place in the one buffer.
        let mut lay = BufferLayout::new(ALIGN);
        let embed = lay.push(&s.embed.1);
        let norm = lay.push(&[s.norm.dim]);
        let layers: Vec<TextLayer> = s
            .layers
            .iter()
            .map(|l| TextLayer {
                input_norm: lay.push(&[l.input_norm.dim]),
                qkv: plan_linear(&mut lay, &l.qkv(), rank),
                o: plan_linear(&mut lay, &[&l.o], rank),
                post_norm: lay.push(&[l.post_norm.dim]),
                gate_up: plan_linear(&mut lay, &l.gate_up(), rank),
                down: plan_linear(&mut lay, &[&l.down], rank),
            })
            .collect();
        let projector = plan_linear(&mut lay, &[&s.projector], rank);
        // The vision tower (spec §5): the patch embedding as the [hidden, c·t·p·p] matrix its
        // Conv3d is, and gate/up fused like the decoder's.
        let patch_embed = lay.push(&s.patch_embed.matrix());
        let blocks: Vec<VisionBlock> = s
            .blocks
            .iter()
            .map(|b| VisionBlock {
                norm1: lay.push(&[b.norm1.dim]),
                norm2: lay.push(&[b.norm2.dim]),
                qkv: plan_linear(&mut lay, &[&b.qkv], rank),
                proj: plan_linear(&mut lay, &[&b.proj], rank),
                gate_up: plan_linear(&mut lay, &b.gate_up(), rank),
                down: plan_linear(&mut lay, &[&b.down], rank),
            })
            .collect();
        let m = &s.merger;
        let merger = Merger {
            ln_q: lay.push(&[m.ln_q.dim]),
            mlp0: plan_linear(&mut lay, &[&m.mlp0], rank),
            mlp2: plan_linear(&mut lay, &[&m.mlp2], rank),
        };
        let hd = cfg.text.head_dim;
        let inv_freq = lay.push::<f32>(&[hd / 2]);
        let tensors = lay.len();

        let mut buf = DeviceBuffer::new(gpu, lay.bytes())?;
        let as_stored = |buf: &mut DeviceBuffer, w: &W, name: &str| buf.fill(gpu, w, &bf16_of(ckpt, name)?);
        as_stored(&mut buf, &embed, &s.embed.0)?;
        as_stored(&mut buf, &norm, &s.norm.weight)?;
        for (l, p) in s.layers.iter().zip(&layers) {
            as_stored(&mut buf, &p.input_norm, &l.input_norm.weight)?;
            fill_linear(gpu, &mut buf, ckpt, &l.qkv(), &p.qkv, scale)?;
            fill_linear(gpu, &mut buf, ckpt, &[&l.o], &p.o, scale)?;
            as_stored(&mut buf, &p.post_norm, &l.post_norm.weight)?;
            fill_linear(gpu, &mut buf, ckpt, &l.gate_up(), &p.gate_up, scale)?;
            fill_linear(gpu, &mut buf, ckpt, &[&l.down], &p.down, scale)?;
        }
        fill_linear(gpu, &mut buf, ckpt, &[&s.projector], &projector, scale)?;
        as_stored(&mut buf, &patch_embed, &s.patch_embed.weight)?;
        for (b, p) in s.blocks.iter().zip(&blocks) {
            as_stored(&mut buf, &p.norm1, &b.norm1.weight)?;
            as_stored(&mut buf, &p.norm2, &b.norm2.weight)?;
            fill_linear(gpu, &mut buf, ckpt, &[&b.qkv], &p.qkv, scale)?;
            fill_linear(gpu, &mut buf, ckpt, &[&b.proj], &p.proj, scale)?;
            fill_linear(gpu, &mut buf, ckpt, &b.gate_up(), &p.gate_up, scale)?;
            fill_linear(gpu, &mut buf, ckpt, &[&b.down], &p.down, scale)?;
        }
        as_stored(&mut buf, &merger.ln_q, &m.ln_q.weight)?;
        fill_linear(gpu, &mut buf, ckpt, &[&m.mlp0], &merger.mlp0, scale)?;
        fill_linear(gpu, &mut buf, ckpt, &[&m.mlp2], &merger.mlp2, scale)?;
        // inv_freq[j] = theta^(-2j/head_dim), computed in f64 (spec §7.2).
        let half = hd / 2;
        let inv: Vec<f32> =
            (0..half).map(|j| cfg.text.rope_theta.powf(-2.0 * j as f64 / hd as f64) as f32).collect();
        buf.fill(gpu, &inv_freq, &inv)?;

        let report = LoadReport {
            tensors,
            bytes: lay.bytes() as u64,
            converted: 0,
            seconds: t0.elapsed().as_secs_f64(),
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
        };
        Ok((GpuModel { cfg, w, rank }, report))
    }

    /// The configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// Device bytes held by the weights.
    pub fn device_bytes(&self) -> usize {
        self.w.buf.bytes()
    }

    /// One packed forward: single vectors always, multi-vector rows when the batch wants them.
    /// Everything runs on the GPU's stream; the only waits are the input uploads before the
    /// first kernel and the output downloads after the last.
    pub fn forward(&self, gpu: &Gpu, mem: &mut DeviceAllocator, batch: &PackedBatch) -> Result<BatchOutput> {
        let n = batch.tokens();
        if n == 0 || batch.sequences() == 0 {
            return Err(Error::Input("an empty batch".into()));
        }
        let result = self.forward_in(gpu, mem, batch, batch.want_multi, None);
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
        let result = self.forward_in(gpu, mem, batch, true, Some(trace));
        mem.free_all();
        result
    }

    fn forward_in(
        &self,
        gpu: &Gpu,
        mem: &mut DeviceAllocator,
        batch: &PackedBatch,
        want_multi: bool,
        mut trace: Option<&mut Vec<Vec<f32>>>,
    ) -> Result<BatchOutput> {
        let mut record = |gpu: &Gpu, h: Option<&DTensor<f32>>, x: Option<&DTensor<bf16>>| -> Result<()> {
            if let Some(tr) = trace.as_deref_mut() {
                match (h, x) {
                    (Some(h), _) => tr.push(gpu.download(&h.view())?),
                    (None, Some(x)) => tr.push(gpu.download(&x.view())?.iter().map(|v| v.to_f32()).collect()),
                    (None, None) => {}
                }
            }
            Ok(())
        };
        let t = &self.cfg.text;
        let n = batch.tokens();
        let (hid, heads, kvh, hd) = (t.hidden_size, t.num_attention_heads, t.num_key_value_heads, t.head_dim);
        let qkv_w = (heads + 2 * kvh) * hd;
        let eps = t.rms_norm_eps as f32;
        let groups = 3 * Task::ALL.len() * self.rank; // widest stacked LoRA (qkv)

        // Inputs.
        let ids = upload(gpu, mem, batch.ids(), &[n])?;
        let p = batch.positions();
        let positions = [p.t.as_slice(), &p.h, &p.w].concat();
        let pos = upload(gpu, mem, &positions, &[3, n])?;
        let cu = upload(gpu, mem, batch.cu_seqlens(), &[batch.cu_seqlens().len()])?;
        let row_task = upload(gpu, mem, batch.row_task(), &[n])?;
        let spans_flat: Vec<u32> = batch.spans().iter().flatten().copied().collect();
        let spans = upload(gpu, mem, &spans_flat, &[batch.sequences(), 2])?;
        let max_seqlen = batch.max_seqlen();

        // Activations.
        // The residual stream stays f32: the projections accumulate into it without rounding.
        let mut h = alloc::<f32>(mem, &[n, hid])?;
        let mut x = alloc::<bf16>(mem, &[n, hid])?;
        let mut qkv = alloc::<bf16>(mem, &[n, qkv_w])?;
        let mut attn = alloc::<bf16>(mem, &[n, heads * hd])?;
        let mut gu = alloc::<bf16>(mem, &[n, 2 * t.intermediate_size])?;
        let mut act = alloc::<bf16>(mem, &[n, t.intermediate_size])?;
        let mut lora_t = alloc::<bf16>(mem, &[n, groups])?;

        let w = &self.w;
        // The f32 constants buffer holds head_dim/2 values (uploaded at load).
        let inv_freq = w.buf.at(&w.inv_freq);
        let section = t.mrope_section.map(|v| v as u32);
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
        record(gpu, Some(&h), None)?;
        let mut lora = LoraInputs { t: &mut lora_t, row_task: &row_task };
        for l in &w.layers {
            ops::rmsnorm_f32(gpu, &h.view(), &w.at(&l.input_norm), eps, &mut x.view_mut())?;
            self.linear(gpu, &x.view(), &l.qkv, &mut qkv.view_mut(), false, Some(&mut lora))?;
            ops::mrope(gpu, &mut qkv.view_mut(), heads, kvh, hd, &pos.view(), &inv_freq, section)?;
            ops::flash_attn(
                gpu,
                &qkv.view(),
                &mut attn.view_mut(),
                &cu.view(),
                max_seqlen,
                heads,
                kvh,
                hd,
                true,
                (hd as f32).powf(-0.5),
            )?;
            self.linear_residual(gpu, &attn.view(), &l.o, &mut h.view_mut(), Some(&mut lora))?;
            ops::rmsnorm_f32(gpu, &h.view(), &w.at(&l.post_norm), eps, &mut x.view_mut())?;
            self.linear(gpu, &x.view(), &l.gate_up, &mut gu.view_mut(), false, Some(&mut lora))?;
            ops::swiglu(gpu, &gu.view(), &mut act.view_mut())?;
            self.linear_residual(gpu, &act.view(), &l.down, &mut h.view_mut(), Some(&mut lora))?;
            record(gpu, Some(&h), None)?;
        }
        ops::rmsnorm_f32(gpu, &h.view(), &w.at(&w.norm), eps, &mut x.view_mut())?;
        record(gpu, None, Some(&x))?;

        // Heads from the one pass (spec §8).
        let mut single = alloc::<f32>(mem, &[batch.sequences(), hid])?;
        ops::mean_pool_l2(gpu, &x.view(), &spans.view(), &mut single.view_mut())?;
        let multi = if want_multi {
            let pd = self.cfg.multi_vector_projector_dim;
            let mut m = alloc::<bf16>(mem, &[n, pd])?;
            self.linear(gpu, &x.view(), &w.heads.projector, &mut m.view_mut(), false, Some(&mut lora))?;
            let mut mf = alloc::<f32>(mem, &[n, pd])?;
            ops::l2_rows(gpu, &m.view(), &mut mf.view_mut())?;
            Some(gpu.download(&mf.view())?)
        } else {
            None
        };
        let single = gpu.download(&single.view())?;
        Ok(BatchOutput { single, multi })
    }

    /// The vision tower over the batch's images (spec §5): `[merged tokens, out_hidden]` bf16, in
    /// raster order per image, images in order. The residual stream is bf16 here, as in the
    /// reference; every block's adds ride on the GEMMs (bias and accumulate epilogues).
    pub fn vision(&self, gpu: &Gpu, mem: &mut DeviceAllocator, batch: &PackedBatch) -> Result<DTensor<bf16>> {
        let v = &self.cfg.vision;
        let unit = v.spatial_merge_size * v.spatial_merge_size;
        let vp = plan::try_vision_plan(&batch.grids(), v.spatial_merge_size, v.window_size, v.patch_size)?;
        let (np, d, heads, hd) = (vp.patches, v.hidden_size, v.num_heads, v.head_dim());
        // Patch rows in bf16, as the reference feeds its patch embedding.
        let pixels: Vec<bf16> =
            batch.images().iter().flat_map(|i| i.pixel_values.iter().map(|&x| bf16::from_f32(x))).collect();
        let row = pixels.len() / np.max(1);
        let w = &self.w;
        // Host planning, uploaded once.
        let idx = |v: &[usize]| v.iter().map(|&i| i as u32).collect::<Vec<u32>>();
        let window = upload(gpu, mem, &idx(&vp.window_index), &[vp.window_index.len()])?;
        let reverse = upload(gpu, mem, &idx(&vp.reverse_index), &[vp.reverse_index.len()])?;
        let cu_win = upload(gpu, mem, &vp.cu_window_seqlens, &[vp.cu_window_seqlens.len()])?;
        let cu_full = upload(gpu, mem, &vp.cu_seqlens, &[vp.cu_seqlens.len()])?;
        let max_win = vp.cu_window_seqlens.windows(2).map(|p| (p[1] - p[0]) as usize).max().unwrap_or(0);
        let max_full = vp.cu_seqlens.windows(2).map(|p| (p[1] - p[0]) as usize).max().unwrap_or(0);
        // The same angle table the CPU oracle uses (host math, f64 → f32), after the permutation.
        let angles =
            crate::reference::vision_rope_angles(&vp.rot_pos_windowed(v.spatial_merge_size), hd, 10000.0);
        let angles = upload(gpu, mem, &angles, &[np, hd / 2])?;
        let pix = upload(gpu, mem, &pixels, &[np, row])?;

        let mut x0 = alloc::<bf16>(mem, &[np, d])?;
        ops::linear(gpu, &pix.view(), &w.at(&w.patch_embed), None, &mut x0.view_mut(), false)?;
        // Window order: groups of merge² patches permuted as whole rows.
        let mut h = alloc::<bf16>(mem, &[np, d])?;
        ops::gather_rows(
            gpu,
            &x0.view().reshape(&[np / unit, unit * d]),
            &window.view(),
            &mut h.view_mut().reshape(&[np / unit, unit * d]),
        )?;
        let mut x = x0;
        let mut qkv = alloc::<bf16>(mem, &[np, 3 * d])?;
        let mut attn = alloc::<bf16>(mem, &[np, d])?;
        let mut gu = alloc::<bf16>(mem, &[np, 2 * v.intermediate_size])?;
        let mut act = alloc::<bf16>(mem, &[np, v.intermediate_size])?;
        let eps = 1e-6; // the vision RMSNorm's, fixed in the reference code
        for (j, b) in w.blocks.iter().enumerate() {
            ops::rmsnorm(gpu, &h.view(), &w.at(&b.norm1), eps, &mut x.view_mut())?;
            self.linear(gpu, &x.view(), &b.qkv, &mut qkv.view_mut(), false, None)?;
            ops::vision_rope(gpu, &mut qkv.view_mut(), heads, hd, &angles.view())?;
            let full = v.fullatt_block_indexes.contains(&j);
            let (cu, max) = if full { (&cu_full, max_full) } else { (&cu_win, max_win) };
            ops::flash_attn(
                gpu,
                &qkv.view(),
                &mut attn.view_mut(),
                &cu.view(),
                max,
                heads,
                heads,
                hd,
                false,
                (hd as f32).powf(-0.5),
            )?;
            self.linear(gpu, &attn.view(), &b.proj, &mut h.view_mut(), true, None)?;
            ops::rmsnorm(gpu, &h.view(), &w.at(&b.norm2), eps, &mut x.view_mut())?;
            self.linear(gpu, &x.view(), &b.gate_up, &mut gu.view_mut(), false, None)?;
            ops::swiglu(gpu, &gu.view(), &mut act.view_mut())?;
            self.linear(gpu, &act.view(), &b.down, &mut h.view_mut(), true, None)?;
        }
        // Patch merger: RMSNorm per patch, merge² patches as one row, MLP with exact GELU.
        let m = &w.merger;
        ops::rmsnorm(gpu, &h.view(), &w.at(&m.ln_q), eps, &mut x.view_mut())?;
        let groups = np / unit;
        let merged = x.view().reshape(&[groups, unit * d]);
        let mut z = alloc::<bf16>(mem, &[groups, unit * d])?;
        self.linear(gpu, &merged, &m.mlp0, &mut z.view_mut(), false, None)?;
        let mut zg = alloc::<bf16>(mem, &[groups, unit * d])?;
        ops::gelu(gpu, &z.view(), &mut zg.view_mut())?;
        let out_d = v.out_hidden_size;
        let mut y = alloc::<bf16>(mem, &[groups, out_d])?;
        self.linear(gpu, &zg.view(), &m.mlp2, &mut y.view_mut(), false, None)?;
        // Back to raster order: out[window_index[i]] = y[i], i.e. a gather with the inverse.
        let mut out = alloc::<bf16>(mem, &[groups, out_d])?;
        ops::gather_rows(gpu, &y.view(), &reverse.view(), &mut out.view_mut())?;
        Ok(out)
    }

    /// `y = x·Wᵀ (+ b)` (`accumulate`: `y +=`), then, for an adapted projection, its LoRA delta
    /// `y += t·B_allᵀ` with `t` from [`GpuModel::lora_t`]. Adapted projections need `lora`.
    fn linear(
        &self,
        gpu: &Gpu,
        x: &DView<'_, bf16>,
        lin: &Linear,
        y: &mut DViewMut<'_, bf16>,
        accumulate: bool,
        lora: Option<&mut LoraInputs<'_>>,
    ) -> Result<()> {
        let w = &self.w;
        ops::linear(gpu, x, &w.at(&lin.w), lin.bias.as_ref().map(|b| w.at(b)).as_ref(), y, accumulate)?;
        if let Some(l) = &lin.lora {
            let t = self.lora_t(gpu, x, l, lora)?;
            ops::linear(gpu, &t.as_view(), &w.at(&l.b), None, y, true)?;
        }
        Ok(())
    }

    /// [`GpuModel::linear`] accumulating into the f32 residual stream (no bias: the decoder's
    /// o_proj and down_proj have none).
    fn linear_residual(
        &self,
        gpu: &Gpu,
        x: &DView<'_, bf16>,
        lin: &Linear,
        h: &mut DViewMut<'_, f32>,
        lora: Option<&mut LoraInputs<'_>>,
    ) -> Result<()> {
        if lin.bias.is_some() {
            return Err(Error::Shape { op: "linear_f32", msg: "a residual projection with a bias".into() });
        }
        let w = &self.w;
        ops::linear_f32(gpu, x, &w.at(&lin.w), h, true)?;
        if let Some(l) = &lin.lora {
            let t = self.lora_t(gpu, x, l, lora)?;
            ops::linear_f32(gpu, &t.as_view(), &w.at(&l.b), h, true)?;
        }
        Ok(())
    }

    /// The LoRA shrink of a projection that fuses `l.parts` checkpoint projections: `x·A_allᵀ`
    /// with the other tasks' column groups of each row zeroed. The caller adds `t·B_allᵀ` to the
    /// projection's output (bf16 activation or the f32 residual stream).
    fn lora_t<'t>(
        &self,
        gpu: &Gpu,
        x: &DView<'_, bf16>,
        l: &Lora,
        inputs: Option<&'t mut LoraInputs<'_>>,
    ) -> Result<DViewMut<'t, bf16>> {
        let Some(inputs) = inputs else {
            return Err(Error::Shape { op: "lora", msg: "an adapted projection without row tasks".into() });
        };
        let a = self.w.at(&l.a);
        let n = x.shape()[0];
        let mut tv = inputs.t.view_mut_as(&[n, a.shape()[0]]);
        ops::linear(gpu, x, &a, None, &mut tv, false)?;
        ops::lora_mask(gpu, &mut tv, &inputs.row_task.view(), l.parts * self.rank)?;
        Ok(tv)
    }
}

/// What the LoRA deltas of a forward need: a scratch wide enough for the widest stacked LoRA,
/// and each row's task.
struct LoraInputs<'a> {
    t: &'a mut DTensor<bf16>,
    row_task: &'a DTensor<u8>,
}

/// Stacks the LoRA of the checkpoint projections `parts` for all tasks (module documentation):
/// `A_all [tasks·P·r, k]` task-major, `B_all [Σn_p, tasks·P·r]` block-structured, scale folded in.
fn stack_lora(
    ckpt: &Checkpoint,
    parts: &[&LinearSpec],
    lora: &Lora,
    scale: f32,
) -> Result<(Vec<bf16>, Vec<bf16>)> {
    let p = parts.len();
    let (cols, rows) = (lora.b.shape()[1], lora.b.shape()[0]);
    let rank = cols / (Task::ALL.len() * p);
    let mut a = Vec::new();
    let mut b = vec![bf16::ZERO; rows * cols];
    for (ti, task) in Task::ALL.iter().enumerate() {
        let mut row0 = 0;
        for (pi, q) in parts.iter().enumerate() {
            a.extend(bf16_of(ckpt, &q.lora_a(*task))?);
            let name = q.lora_b(*task);
            let bt = bf16_of(ckpt, &name)?; // [n_p, r]
            if bt.len() != q.out * rank || row0 + q.out > rows {
                return Err(Error::Tensor {
                    name,
                    file: ckpt.dir.clone(),
                    msg: format!("{} values, expected [{}, {rank}]", bt.len(), q.out),
                });
            }
            let col0 = (ti * p + pi) * rank;
            for (i, row) in bt.chunks(rank).enumerate() {
                for (j, v) in row.iter().enumerate() {
                    b[(row0 + i) * cols + col0 + j] = bf16::from_f32(v.to_f32() * scale);
                }
            }
            row0 += q.out;
        }
    }
    Ok((a, b))
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
