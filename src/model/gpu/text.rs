//! The decoder layers on the GPU (docs/MODEL.md §7): per layer RMSNorm, the fused qkv projection with its
//! stacked LoRA, M-RoPE, causal varlen attention, o_proj into the f32 residual stream, RMSNorm,
//! the fused gate_up projection, SwiGLU and down_proj into the residual stream; the final norm.

use half::bf16;

use super::{Dims, GpuModel, LoraInputs, Trace};
use crate::cuda::{Arena, DView, Gpu, Tensor};
use crate::ops;
use crate::Result;

impl GpuModel {
    /// Runs every decoder layer on the residual stream `h` `[tokens, hidden]` (f32) and leaves
    /// the final-norm states in `x` (bf16). `pos` are the M-RoPE positions `[3, tokens]`, `cu`
    /// the sequence boundaries; `dims` what the kernels are launched for.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn decoder(
        &self,
        gpu: &Gpu,
        arena: &Arena<'_>,
        h: &mut Tensor<'_, f32>,
        x: &mut Tensor<'_, bf16>,
        pos: &DView<'_, i32>,
        cu: &DView<'_, i32>,
        dims: &Dims,
        lora: &mut LoraInputs<'_, '_>,
        trace: &mut Trace<'_>,
    ) -> Result<()> {
        let t = &self.cfg.text;
        let n = h.shape()[0];
        let (heads, kvh, hd) = (t.num_attention_heads, t.num_key_value_heads, t.head_dim);
        let eps = t.rms_norm_eps as f32;
        let w = &self.w;
        let Some(l0) = w.layers.first() else {
            return Err(crate::Error::Internal("a decoder without layers".into()));
        };
        // The inputs of qkv, gate_up and down: x in the first columns, and beside it the folded
        // LoRA's shrink t where the projection folds it (`weights`; else exactly x's width).
        let mut xq = arena.alloc::<bf16>(&[n, l0.qkv.input_width()])?;
        let mut qkv = arena.alloc::<bf16>(&[n, (heads + 2 * kvh) * hd])?;
        let mut attn = arena.alloc::<bf16>(&[n, heads * hd])?;
        let mut xg = arena.alloc::<bf16>(&[n, l0.gate_up.input_width()])?;
        let mut gu = arena.alloc::<bf16>(&[n, 2 * t.intermediate_size])?;
        let mut act = arena.alloc::<bf16>(&[n, l0.down.input_width()])?;
        // Padding rows (a graph's bucket) lie in no segment: the attention never writes them, so
        // they are zeroed once here and stay zero (o_proj reads them like any row). The segment
        // rows are written by the attention of every layer before o_proj reads them.
        if dims.padded {
            gpu.fill_u16(&mut attn.view_mut(), 0)?;
        }
        let inv_freq = w.buf.at(&w.inv_freq);
        let section = t.mrope_section.map(|v| v as u32);
        for l in &w.layers {
            ops::rmsnorm_f32_cols(gpu, &h.view(), &w.at(&l.input_norm), eps, &mut xq.view_mut())?;
            w.linear_xt(gpu, &mut xq.view_mut(), &l.qkv, &mut qkv.view_mut(), false, Some(lora))?;
            ops::mrope(gpu, &mut qkv.view_mut(), heads, kvh, hd, pos, &inv_freq, section)?;
            ops::flash_attn(
                gpu,
                &qkv.view(),
                &mut attn.view_mut(),
                cu,
                dims.max_seqlen,
                heads,
                kvh,
                hd,
                true,
                (hd as f32).powf(-0.5),
            )?;
            w.linear_residual(gpu, &attn.view(), &l.o, &mut h.view_mut(), Some(lora))?;
            ops::rmsnorm_f32_cols(gpu, &h.view(), &w.at(&l.post_norm), eps, &mut xg.view_mut())?;
            w.linear_xt(gpu, &mut xg.view_mut(), &l.gate_up, &mut gu.view_mut(), false, Some(lora))?;
            ops::swiglu_cols(gpu, &gu.view(), &mut act.view_mut())?;
            w.linear_residual_xt(gpu, &mut act.view_mut(), &l.down, &mut h.view_mut(), Some(lora))?;
            trace.f32(gpu, &h.view())?;
        }
        ops::rmsnorm_f32(gpu, &h.view(), &w.at(&w.norm), eps, &mut x.view_mut())
    }
}
