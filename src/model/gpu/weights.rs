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

use half::bf16;

use crate::cuda::{BufferLayout, DView, DViewMut, DeviceBuffer, Gpu, Region, Staging, Tensor};
use crate::model::checkpoint::{Checkpoint, Dtype, TensorInfo};
use crate::model::constants::text_inv_freq;
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

/// `y = x·Wᵀ (+ b)` with an optional stacked LoRA.
pub(super) struct Linear {
    pub(super) w: W,
    pub(super) bias: Option<W>,
    pub(super) lora: Option<Lora>,
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

    /// `y = x·Wᵀ (+ b)` (`accumulate`: `y +=`), then, for an adapted projection, its LoRA delta
    /// `y += t·B_allᵀ` with `t` from [`Weights::lora_t`]. Adapted projections need `lora`.
    pub(super) fn linear(
        &self,
        gpu: &Gpu,
        x: &DView<'_, bf16>,
        lin: &Linear,
        y: &mut DViewMut<'_, bf16>,
        accumulate: bool,
        lora: Option<&mut LoraInputs<'_, '_>>,
    ) -> Result<()> {
        let w = self;
        ops::linear(gpu, x, &w.at(&lin.w), lin.bias.as_ref().map(|b| w.at(b)).as_ref(), y, accumulate)?;
        if let Some(l) = &lin.lora {
            let t = self.lora_t(gpu, x, l, lora)?;
            ops::linear(gpu, &t.as_view(), &w.at(&l.b), None, y, true)?;
        }
        Ok(())
    }

    /// [`Weights::linear`] accumulating into the f32 residual stream (no bias: the decoder's
    /// o_proj and down_proj have none).
    pub(super) fn linear_residual(
        &self,
        gpu: &Gpu,
        x: &DView<'_, bf16>,
        lin: &Linear,
        h: &mut DViewMut<'_, f32>,
        lora: Option<&mut LoraInputs<'_, '_>>,
    ) -> Result<()> {
        if lin.bias.is_some() {
            return Err(Error::Shape { op: "linear_f32", msg: "a residual projection with a bias".into() });
        }
        let w = self;
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
        inputs: Option<&'t mut LoraInputs<'_, '_>>,
    ) -> Result<DViewMut<'t, bf16>> {
        let Some(inputs) = inputs else {
            return Err(Error::Shape { op: "lora", msg: "an adapted projection without row tasks".into() });
        };
        let a = self.at(&l.a);
        let n = x.shape()[0];
        let mut tv = inputs.t.view_mut_as(&[n, a.shape()[0]]);
        ops::linear(gpu, x, &a, None, &mut tv, false)?;
        ops::lora_mask(gpu, &mut tv, &inputs.row_task, l.parts * self.rank)?;
        Ok(tv)
    }
}

/// What the LoRA deltas of a forward need: a scratch wide enough for the widest stacked LoRA,
/// and each row's task.
pub(super) struct LoraInputs<'a, 't> {
    pub(super) t: &'a mut Tensor<'t, bf16>,
    pub(super) row_task: DView<'a, u8>,
}

/// Prepares and uploads every weight (see the module documentation). A tensor missing from the
/// checkpoint is an [`Error::Tensor`] naming it.
pub(super) fn prepare(gpu: &Gpu, ckpt: &Checkpoint) -> Result<(Weights, LoadReport)> {
    let t0 = std::time::Instant::now();
    let cfg = &ckpt.config;
    let s = Schema::new(cfg, &ckpt.adapter);
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
    // The vision tower (docs/MODEL.md §5): the patch embedding as the [hidden, c·t·p·p] matrix its
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
    // The tensors used as stored stream from the shards through pinned staging (positioned reads
    // overlapped with the copies); the fused and stacked ones are assembled on the host.
    let mut staging = Staging::default();
    as_stored(gpu, &mut buf, &mut staging, ckpt, &embed, &s.embed.0)?;
    as_stored(gpu, &mut buf, &mut staging, ckpt, &norm, &s.norm.weight)?;
    for (l, p) in s.layers.iter().zip(&layers) {
        as_stored(gpu, &mut buf, &mut staging, ckpt, &p.input_norm, &l.input_norm.weight)?;
        fill_linear(gpu, &mut buf, &mut staging, ckpt, &l.qkv(), &p.qkv, scale)?;
        fill_linear(gpu, &mut buf, &mut staging, ckpt, &[&l.o], &p.o, scale)?;
        as_stored(gpu, &mut buf, &mut staging, ckpt, &p.post_norm, &l.post_norm.weight)?;
        fill_linear(gpu, &mut buf, &mut staging, ckpt, &l.gate_up(), &p.gate_up, scale)?;
        fill_linear(gpu, &mut buf, &mut staging, ckpt, &[&l.down], &p.down, scale)?;
    }
    fill_linear(gpu, &mut buf, &mut staging, ckpt, &[&s.projector], &projector, scale)?;
    as_stored(gpu, &mut buf, &mut staging, ckpt, &patch_embed, &s.patch_embed.weight)?;
    for (b, p) in s.blocks.iter().zip(&blocks) {
        as_stored(gpu, &mut buf, &mut staging, ckpt, &p.norm1, &b.norm1.weight)?;
        as_stored(gpu, &mut buf, &mut staging, ckpt, &p.norm2, &b.norm2.weight)?;
        fill_linear(gpu, &mut buf, &mut staging, ckpt, &[&b.qkv], &p.qkv, scale)?;
        fill_linear(gpu, &mut buf, &mut staging, ckpt, &[&b.proj], &p.proj, scale)?;
        fill_linear(gpu, &mut buf, &mut staging, ckpt, &b.gate_up(), &p.gate_up, scale)?;
        fill_linear(gpu, &mut buf, &mut staging, ckpt, &[&b.down], &p.down, scale)?;
    }
    as_stored(gpu, &mut buf, &mut staging, ckpt, &merger.ln_q, &m.ln_q.weight)?;
    fill_linear(gpu, &mut buf, &mut staging, ckpt, &[&m.mlp0], &merger.mlp0, scale)?;
    fill_linear(gpu, &mut buf, &mut staging, ckpt, &[&m.mlp2], &merger.mlp2, scale)?;
    buf.fill(gpu, &inv_freq, &text_inv_freq(cfg.text.rope_theta, hd))?;
    staging.finish(gpu)?;

    let report =
        LoadReport { tensors, bytes: lay.bytes() as u64, converted: 0, seconds: t0.elapsed().as_secs_f64() };
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

/// Streams checkpoint tensor `name` as bf16 into `region` from byte `offset` on: a BF16 tensor
/// straight from its shard (positioned reads into the pinned staging), another dtype converted
/// on the host first. Returns the bytes written.
fn stream_tensor(
    gpu: &Gpu,
    buf: &mut DeviceBuffer,
    staging: &mut Staging,
    ckpt: &Checkpoint,
    name: &str,
    region: &W,
    offset: usize,
) -> Result<usize> {
    let t = tensor_of(ckpt, name)?;
    let bytes = t.numel() * 2;
    if t.dtype == Dtype::BF16 {
        buf.stream_in(gpu, staging, region, offset, bytes, &|off, part| ckpt.read_at(t, off, part))?;
    } else {
        let v = ckpt.to_bf16(t)?;
        let src: &[u8] = bytemuck::cast_slice(&v);
        buf.stream_in(gpu, staging, region, offset, bytes, &|off, part| {
            part.copy_from_slice(&src[off..off + part.len()]);
            Ok(())
        })?;
    }
    Ok(bytes)
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
    let n = stream_tensor(gpu, buf, staging, ckpt, name, region, 0)?;
    check_filled(ckpt, name, n, region)
}

/// Whether `bytes` written fill `region` exactly (a shape mismatch would leave it half-written).
fn check_filled(ckpt: &Checkpoint, name: &str, bytes: usize, region: &W) -> Result<()> {
    if bytes != region.numel() * 2 {
        return Err(Error::Tensor {
            name: name.into(),
            file: ckpt.dir.clone(),
            msg: format!("{bytes} bytes for a prepared tensor of shape {:?}", region.shape()),
        });
    }
    Ok(())
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
    staging: &mut Staging,
    ckpt: &Checkpoint,
    parts: &[&LinearSpec],
    lin: &Linear,
    scale: f32,
) -> Result<()> {
    // The fused weight is the parts' rows one after the other: each part streams to its offset.
    let mut off = 0;
    for p in parts {
        off += stream_tensor(gpu, buf, staging, ckpt, &p.weight(), &lin.w, off)?;
    }
    check_filled(ckpt, &parts[0].weight(), off, &lin.w)?;
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
