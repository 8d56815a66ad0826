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

use crate::cuda::{DTensor, DView, DeviceAllocator, DeviceBuffer, Gpu};
use crate::model::batch::{BatchOutput, PackedBatch};
use crate::model::checkpoint::Checkpoint;
use crate::model::config::ModelConfig;
use crate::model::plan;
use crate::model::weights::{DeviceWeights, LoadReport};
use crate::model::Task;
use crate::ops;
use crate::{Error, Result};

/// The model on the GPU (text path).
pub struct GpuModel {
    cfg: ModelConfig,
    w: DeviceWeights,
    /// f32 constants: the M-RoPE inverse frequencies.
    consts: DeviceBuffer,
    rank: usize,
}

/// An adapted projection's name in the prepared layout and the checkpoint projections it fuses.
struct Fused {
    name: &'static str,
    parts: &'static [&'static str],
}

const QKV: Fused =
    Fused { name: "qkv", parts: &["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"] };
const O: Fused = Fused { name: "o_proj", parts: &["self_attn.o_proj"] };
const GATE_UP: Fused = Fused { name: "gate_up", parts: &["mlp.gate_proj", "mlp.up_proj"] };
const DOWN: Fused = Fused { name: "down_proj", parts: &["mlp.down_proj"] };
const LAYER_PROJ: [Fused; 4] = [QKV, O, GATE_UP, DOWN];

/// Vision block tensors uploaded as stored (gate/up are fused separately).
const VISION_BLOCK_AS_IS: [&str; 8] = [
    "norm1.weight",
    "norm2.weight",
    "attn.qkv.weight",
    "attn.qkv.bias",
    "attn.proj.weight",
    "attn.proj.bias",
    "mlp.down_proj.weight",
    "mlp.down_proj.bias",
];

/// The patch merger's tensors (`visual.merger.*`), uploaded as stored.
const MERGER: [&str; 5] = ["ln_q.weight", "mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias"];

fn dims(shape: &[usize]) -> (usize, usize) {
    (shape[0], shape[1])
}

impl GpuModel {
    /// Prepares and uploads the text path's weights (see the module documentation).
    pub fn load(gpu: &Gpu, ckpt: &Checkpoint) -> Result<(GpuModel, LoadReport)> {
        let t0 = std::time::Instant::now();
        let cfg = ckpt.config.clone();
        let t = &cfg.text;
        let tasks = Task::ALL;
        let rank = ckpt.adapter.r;
        let scale = ckpt.adapter.scale();
        let shape_of = |name: &str| -> Result<Vec<usize>> {
            ckpt.get(name).map(|t| t.shape.clone()).ok_or_else(|| Error::Tensor {
                name: name.into(),
                file: ckpt.dir.clone(),
                msg: "missing".into(),
            })
        };

        // The layout: name and shape of every prepared tensor.
        let mut layout: Vec<(String, Vec<usize>)> = Vec::new();
        layout.push(("embed_tokens.weight".into(), shape_of("embed_tokens.weight")?));
        layout.push(("norm.weight".into(), shape_of("norm.weight")?));
        for l in 0..t.num_hidden_layers {
            for n in ["input_layernorm", "post_attention_layernorm"] {
                let name = format!("layers.{l}.{n}.weight");
                layout.push((name.clone(), shape_of(&name)?));
            }
            for f in &LAYER_PROJ {
                let mut rows = 0;
                let mut k = 0;
                for p in f.parts {
                    let (n, kk) = dims(&shape_of(&format!("layers.{l}.{p}.weight"))?);
                    rows += n;
                    k = kk;
                }
                let g = f.parts.len() * rank;
                layout.push((format!("layers.{l}.{}.weight", f.name), vec![rows, k]));
                if f.name == "qkv" {
                    layout.push((format!("layers.{l}.qkv.bias"), vec![rows]));
                }
                layout.push((format!("layers.{l}.{}.lora_a", f.name), vec![tasks.len() * g, k]));
                layout.push((format!("layers.{l}.{}.lora_b", f.name), vec![rows, tasks.len() * g]));
            }
        }
        let (pn, pk) = dims(&shape_of("multi_vector_projector.weight")?);
        layout.push(("multi_vector_projector.weight".into(), vec![pn, pk]));
        layout.push(("multi_vector_projector.bias".into(), vec![pn]));
        layout.push(("multi_vector_projector.lora_a".into(), vec![tasks.len() * rank, pk]));
        layout.push(("multi_vector_projector.lora_b".into(), vec![pn, tasks.len() * rank]));

        // The vision tower (spec §5): names as in the checkpoint, but the patch embedding as the
        // [hidden, c·t·p·p] matrix its Conv3d is, and gate/up fused like the decoder's.
        let v = &cfg.vision;
        let pe = shape_of("visual.patch_embed.proj.weight")?;
        layout.push(("visual.patch_embed".into(), vec![pe[0], pe[1..].iter().product()]));
        for j in 0..v.depth {
            let b = format!("visual.blocks.{j}");
            for n in VISION_BLOCK_AS_IS {
                layout.push((format!("{b}.{n}"), shape_of(&format!("{b}.{n}"))?));
            }
            let (gi, gk) = dims(&shape_of(&format!("{b}.mlp.gate_proj.weight"))?);
            layout.push((format!("{b}.mlp.gate_up.weight"), vec![2 * gi, gk]));
            layout.push((format!("{b}.mlp.gate_up.bias"), vec![2 * gi]));
        }
        for n in MERGER {
            let name = format!("visual.merger.{n}");
            layout.push((name.clone(), shape_of(&name)?));
        }

        let mut w = DeviceWeights::allocate(gpu, &layout)?;
        let mut report = LoadReport::default();
        let get = |name: &str| -> Vec<bf16> { ckpt.to_bf16(ckpt.get(name).expect("validated at open")) };
        for name in ["embed_tokens.weight", "norm.weight"] {
            w.fill(gpu, name, &get(name))?;
        }
        for l in 0..t.num_hidden_layers {
            for n in ["input_layernorm", "post_attention_layernorm"] {
                let name = format!("layers.{l}.{n}.weight");
                w.fill(gpu, &name, &get(&name))?;
            }
            for f in &LAYER_PROJ {
                let parts: Vec<String> = f.parts.iter().map(|p| format!("layers.{l}.{p}")).collect();
                let fused: Vec<bf16> = parts.iter().flat_map(|p| get(&format!("{p}.weight"))).collect();
                w.fill(gpu, &format!("layers.{l}.{}.weight", f.name), &fused)?;
                if f.name == "qkv" {
                    let bias: Vec<bf16> = parts.iter().flat_map(|p| get(&format!("{p}.bias"))).collect();
                    w.fill(gpu, &format!("layers.{l}.qkv.bias"), &bias)?;
                }
                let (a, b) = stack_lora(ckpt, &parts, rank, scale);
                w.fill(gpu, &format!("layers.{l}.{}.lora_a", f.name), &a)?;
                w.fill(gpu, &format!("layers.{l}.{}.lora_b", f.name), &b)?;
            }
        }
        for name in ["multi_vector_projector.weight", "multi_vector_projector.bias"] {
            w.fill(gpu, name, &get(name))?;
        }
        let (a, b) = stack_lora(ckpt, &["multi_vector_projector".to_string()], rank, scale);
        w.fill(gpu, "multi_vector_projector.lora_a", &a)?;
        w.fill(gpu, "multi_vector_projector.lora_b", &b)?;

        w.fill(gpu, "visual.patch_embed", &get("visual.patch_embed.proj.weight"))?;
        for j in 0..v.depth {
            let b = format!("visual.blocks.{j}");
            for n in VISION_BLOCK_AS_IS {
                w.fill(gpu, &format!("{b}.{n}"), &get(&format!("{b}.{n}")))?;
            }
            for kind in ["weight", "bias"] {
                let fused =
                    [get(&format!("{b}.mlp.gate_proj.{kind}")), get(&format!("{b}.mlp.up_proj.{kind}"))]
                        .concat();
                w.fill(gpu, &format!("{b}.mlp.gate_up.{kind}"), &fused)?;
            }
        }
        for n in MERGER {
            let name = format!("visual.merger.{n}");
            w.fill(gpu, &name, &get(&name))?;
        }

        // inv_freq[j] = theta^(-2j/head_dim), computed in f64 (spec §7.2).
        let half = t.head_dim / 2;
        let inv: Vec<f32> =
            (0..half).map(|j| t.rope_theta.powf(-2.0 * j as f64 / t.head_dim as f64) as f32).collect();
        let mut consts = DeviceBuffer::new(gpu, half * 4)?;
        consts.upload_at(gpu, 0, &inv)?;

        report.tensors = w.len();
        report.bytes = layout.iter().map(|(_, s)| s.iter().product::<usize>() as u64 * 2).sum();
        report.seconds = t0.elapsed().as_secs_f64();
        Ok((GpuModel { cfg, w, consts, rank }, report))
    }

    /// The configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// Device bytes held by the weights.
    pub fn device_bytes(&self) -> usize {
        self.w.device_bytes() + self.consts.bytes()
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
        let inv_freq: DView<'_, f32> = self.consts.view(0, &[hd / 2]).expect("inv_freq");
        let section = t.mrope_section.map(|v| v as u32);
        ops::embedding_f32(gpu, &w.expect("embed_tokens.weight"), &ids.view(), &mut h.view_mut())?;
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
        for l in 0..t.num_hidden_layers {
            let lw = |n: &str| w.expect(&format!("layers.{l}.{n}"));
            ops::rmsnorm_f32(gpu, &h.view(), &lw("input_layernorm.weight"), eps, &mut x.view_mut())?;
            ops::linear(
                gpu,
                &x.view(),
                &lw("qkv.weight"),
                Some(&lw("qkv.bias")),
                &mut qkv.view_mut(),
                false,
            )?;
            let t = self.lora_t(gpu, &x, &mut lora_t, &lw("qkv.lora_a"), &row_task, 3)?;
            ops::linear(gpu, &t.as_view(), &lw("qkv.lora_b"), None, &mut qkv.view_mut(), true)?;
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
            ops::linear_f32(gpu, &attn.view(), &lw("o_proj.weight"), &mut h.view_mut(), true)?;
            let t = self.lora_t(gpu, &attn, &mut lora_t, &lw("o_proj.lora_a"), &row_task, 1)?;
            ops::linear_f32(gpu, &t.as_view(), &lw("o_proj.lora_b"), &mut h.view_mut(), true)?;
            ops::rmsnorm_f32(gpu, &h.view(), &lw("post_attention_layernorm.weight"), eps, &mut x.view_mut())?;
            ops::linear(gpu, &x.view(), &lw("gate_up.weight"), None, &mut gu.view_mut(), false)?;
            let t = self.lora_t(gpu, &x, &mut lora_t, &lw("gate_up.lora_a"), &row_task, 2)?;
            ops::linear(gpu, &t.as_view(), &lw("gate_up.lora_b"), None, &mut gu.view_mut(), true)?;
            ops::swiglu(gpu, &gu.view(), &mut act.view_mut())?;
            ops::linear_f32(gpu, &act.view(), &lw("down_proj.weight"), &mut h.view_mut(), true)?;
            let t = self.lora_t(gpu, &act, &mut lora_t, &lw("down_proj.lora_a"), &row_task, 1)?;
            ops::linear_f32(gpu, &t.as_view(), &lw("down_proj.lora_b"), &mut h.view_mut(), true)?;
            record(gpu, Some(&h), None)?;
        }
        ops::rmsnorm_f32(gpu, &h.view(), &w.expect("norm.weight"), eps, &mut x.view_mut())?;
        record(gpu, None, Some(&x))?;

        // Heads from the one pass (spec §8).
        let mut single = alloc::<f32>(mem, &[batch.sequences(), hid])?;
        ops::mean_pool_l2(gpu, &x.view(), &spans.view(), &mut single.view_mut())?;
        let multi = if want_multi {
            let pd = self.cfg.multi_vector_projector_dim;
            let mut m = alloc::<bf16>(mem, &[n, pd])?;
            ops::linear(
                gpu,
                &x.view(),
                &w.expect("multi_vector_projector.weight"),
                Some(&w.expect("multi_vector_projector.bias")),
                &mut m.view_mut(),
                false,
            )?;
            let t =
                self.lora_t(gpu, &x, &mut lora_t, &w.expect("multi_vector_projector.lora_a"), &row_task, 1)?;
            let b = w.expect("multi_vector_projector.lora_b");
            ops::linear(gpu, &t.as_view(), &b, None, &mut m.view_mut(), true)?;
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
        ops::linear(gpu, &pix.view(), &w.expect("visual.patch_embed"), None, &mut x0.view_mut(), false)?;
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
        for j in 0..v.depth {
            let bw = |n: &str| w.expect(&format!("visual.blocks.{j}.{n}"));
            ops::rmsnorm(gpu, &h.view(), &bw("norm1.weight"), eps, &mut x.view_mut())?;
            ops::linear(
                gpu,
                &x.view(),
                &bw("attn.qkv.weight"),
                Some(&bw("attn.qkv.bias")),
                &mut qkv.view_mut(),
                false,
            )?;
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
            ops::linear(
                gpu,
                &attn.view(),
                &bw("attn.proj.weight"),
                Some(&bw("attn.proj.bias")),
                &mut h.view_mut(),
                true,
            )?;
            ops::rmsnorm(gpu, &h.view(), &bw("norm2.weight"), eps, &mut x.view_mut())?;
            ops::linear(
                gpu,
                &x.view(),
                &bw("mlp.gate_up.weight"),
                Some(&bw("mlp.gate_up.bias")),
                &mut gu.view_mut(),
                false,
            )?;
            ops::swiglu(gpu, &gu.view(), &mut act.view_mut())?;
            ops::linear(
                gpu,
                &act.view(),
                &bw("mlp.down_proj.weight"),
                Some(&bw("mlp.down_proj.bias")),
                &mut h.view_mut(),
                true,
            )?;
        }
        // Patch merger: RMSNorm per patch, merge² patches as one row, MLP with exact GELU.
        ops::rmsnorm(gpu, &h.view(), &w.expect("visual.merger.ln_q.weight"), eps, &mut x.view_mut())?;
        let groups = np / unit;
        let merged = x.view().reshape(&[groups, unit * d]);
        let mut z = alloc::<bf16>(mem, &[groups, unit * d])?;
        ops::linear(
            gpu,
            &merged,
            &w.expect("visual.merger.mlp.0.weight"),
            Some(&w.expect("visual.merger.mlp.0.bias")),
            &mut z.view_mut(),
            false,
        )?;
        let mut zg = alloc::<bf16>(mem, &[groups, unit * d])?;
        ops::gelu(gpu, &z.view(), &mut zg.view_mut())?;
        let out_d = v.out_hidden_size;
        let mut y = alloc::<bf16>(mem, &[groups, out_d])?;
        ops::linear(
            gpu,
            &zg.view(),
            &w.expect("visual.merger.mlp.2.weight"),
            Some(&w.expect("visual.merger.mlp.2.bias")),
            &mut y.view_mut(),
            false,
        )?;
        // Back to raster order: out[window_index[i]] = y[i], i.e. a gather with the inverse.
        let mut out = alloc::<bf16>(mem, &[groups, out_d])?;
        ops::gather_rows(gpu, &y.view(), &reverse.view(), &mut out.view_mut())?;
        Ok(out)
    }

    /// The LoRA shrink of a projection that fuses `parts` checkpoint projections: `x·A_allᵀ` with
    /// the other tasks' column groups of each row zeroed. The caller adds `t·B_allᵀ` to the
    /// projection's output (bf16 activation or the f32 residual stream).
    fn lora_t<'t>(
        &self,
        gpu: &Gpu,
        x: &DTensor<bf16>,
        t: &'t mut DTensor<bf16>,
        a: &DView<'_, bf16>,
        row_task: &DTensor<u8>,
        parts: usize,
    ) -> Result<crate::cuda::DViewMut<'t, bf16>> {
        let n = x.shape()[0];
        let mut tv = t.view_mut_as(&[n, a.shape()[0]]);
        ops::linear(gpu, &x.view(), a, None, &mut tv, false)?;
        ops::lora_mask(gpu, &mut tv, &row_task.view(), parts * self.rank)?;
        Ok(tv)
    }
}

/// Stacks the LoRA of the checkpoint projections `parts` for all tasks (module documentation):
/// `A_all [tasks·P·r, k]` task-major, `B_all [Σn_p, tasks·P·r]` block-structured, scale folded in.
fn stack_lora(ckpt: &Checkpoint, parts: &[String], rank: usize, scale: f32) -> (Vec<bf16>, Vec<bf16>) {
    let get = |name: String| -> Vec<bf16> { ckpt.to_bf16(ckpt.get(&name).expect("validated at open")) };
    let p = parts.len();
    let cols = Task::ALL.len() * p * rank;
    let mut a = Vec::new();
    let outs: Vec<usize> =
        parts.iter().map(|q| ckpt.get(&format!("{q}.lora_B.retrieval.weight")).unwrap().shape[0]).collect();
    let rows: usize = outs.iter().sum();
    let mut b = vec![bf16::ZERO; rows * cols];
    for (ti, task) in Task::ALL.iter().enumerate() {
        let mut row0 = 0;
        for (pi, q) in parts.iter().enumerate() {
            a.extend(get(format!("{q}.lora_A.{}.weight", task.name())));
            let bt = get(format!("{q}.lora_B.{}.weight", task.name())); // [n_p, r]
            let col0 = (ti * p + pi) * rank;
            for (i, row) in bt.chunks(rank).enumerate() {
                for (j, v) in row.iter().enumerate() {
                    b[(row0 + i) * cols + col0 + j] = bf16::from_f32(v.to_f32() * scale);
                }
            }
            row0 += outs[pi];
        }
    }
    (a, b)
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
