//! The heads on the GPU (docs/MODEL.md §8), both from the one pass over the final-norm states: the single
//! vector (mean over each sequence's pooling span, L2-normalised) and the multi-vector rows (the
//! task-adapted projector, each row L2-normalised).

use half::bf16;

use super::{GpuModel, LoraInputs, Outputs};
use crate::cuda::{Arena, DView, Gpu, Tensor};
use crate::ops;
use crate::Result;

impl GpuModel {
    /// Both heads over the final-norm states `x` `[tokens, hidden]`, on the device: the pooled
    /// rows of every span in `spans` (the main ones, then the chunk ones) and, when `want_multi`,
    /// the multi-vector rows of every token.
    pub(super) fn heads<'a>(
        &self,
        gpu: &Gpu,
        arena: &'a Arena<'_>,
        x: &Tensor<'_, bf16>,
        spans: &DView<'_, u32>,
        want_multi: bool,
        lora: &mut LoraInputs<'_, '_>,
    ) -> Result<Outputs<'a>> {
        let (n, hid) = (x.shape()[0], x.shape()[1]);
        let mut single = arena.alloc::<f32>(&[spans.shape()[0], hid])?;
        ops::mean_pool_l2(gpu, &x.view(), spans, &mut single.view_mut())?;
        let multi = if want_multi {
            let pd = self.cfg.multi_vector_projector_dim;
            let mut m = arena.alloc::<bf16>(&[n, pd])?;
            let w = &self.w;
            w.linear(gpu, &x.view(), &w.heads.projector, &mut m.view_mut(), false, Some(lora))?;
            let mut mf = arena.alloc::<f32>(&[n, pd])?;
            ops::l2_rows(gpu, &m.view(), &mut mf.view_mut())?;
            Some(mf)
        } else {
            None
        };
        Ok(Outputs { single, multi })
    }
}
