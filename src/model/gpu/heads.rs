//! The heads on the GPU (spec §8), both from the one pass over the final-norm states: the single
//! vector (mean over each sequence's pooling span, L2-normalised) and the multi-vector rows (the
//! task-adapted projector, each row L2-normalised).

use half::bf16;

use super::{alloc, GpuModel, LoraInputs};
use crate::cuda::{DTensor, DeviceAllocator, Gpu};
use crate::model::batch::BatchOutput;
use crate::ops;
use crate::Result;

impl GpuModel {
    /// Both heads over the final-norm states `x` `[tokens, hidden]`, downloaded: the forward's
    /// only waits for the GPU.
    pub(super) fn heads(
        &self,
        gpu: &Gpu,
        mem: &mut DeviceAllocator,
        x: &DTensor<bf16>,
        spans: &DTensor<u32>,
        want_multi: bool,
        lora: &mut LoraInputs<'_>,
    ) -> Result<BatchOutput> {
        let (n, hid) = (x.shape()[0], x.shape()[1]);
        let mut single = alloc::<f32>(mem, &[spans.shape()[0], hid])?;
        ops::mean_pool_l2(gpu, &x.view(), &spans.view(), &mut single.view_mut())?;
        let multi = if want_multi {
            let pd = self.cfg.multi_vector_projector_dim;
            let mut m = alloc::<bf16>(mem, &[n, pd])?;
            let w = &self.w;
            w.linear(gpu, &x.view(), &w.heads.projector, &mut m.view_mut(), false, Some(lora))?;
            let mut mf = alloc::<f32>(mem, &[n, pd])?;
            ops::l2_rows(gpu, &m.view(), &mut mf.view_mut())?;
            Some(gpu.download(&mf.view())?)
        } else {
            None
        };
        let single = gpu.download(&single.view())?;
        Ok(BatchOutput { single, multi })
    }
}
