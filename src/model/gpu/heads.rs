//! The heads on the GPU (docs/MODEL.md §8), both from the one pass over the final-norm states: the single
//! vector (mean over each sequence's pooling span, L2-normalised) and the multi-vector rows (the
//! task-adapted projector, each row L2-normalised).

use half::bf16;

use super::{GpuModel, LoraInputs};
use crate::cuda::{Arena, DView, Gpu, Tensor};
use crate::model::batch::BatchOutput;
use crate::ops;
use crate::Result;

impl GpuModel {
    /// Both heads over the final-norm states `x` `[tokens, hidden]`, downloaded: the forward's
    /// only waits for the GPU (the first download waits for all the work, the second finds it
    /// done). `spans` holds the `sequences` main pooling spans, then the extra (chunk) ones; the
    /// pooled rows are split the same way into `single` and `chunk_single`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn heads(
        &self,
        gpu: &Gpu,
        arena: &Arena<'_>,
        x: &Tensor<'_, bf16>,
        spans: &DView<'_, u32>,
        sequences: usize,
        want_multi: bool,
        lora: &mut LoraInputs<'_, '_>,
    ) -> Result<BatchOutput> {
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
            Some(gpu.download(&mf.view())?)
        } else {
            None
        };
        let mut single = gpu.download(&single.view())?;
        let chunk_single = single.split_off(sequences * hid);
        Ok(BatchOutput { single, multi, chunk_single })
    }
}
