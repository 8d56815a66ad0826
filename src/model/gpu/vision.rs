//! The vision tower on the GPU (docs/MODEL.md §5): patch embedding, window permutation, the blocks with
//! 2-D RoPE and windowed / full attention, the patch merger, and the way back to raster order.

use half::bf16;

use super::GpuModel;
use crate::cuda::{Arena, BufferLayout, DView, Gpu, Region, StageWriter, Staged, Tensor};
use crate::model::batch::PackedBatch;
use crate::model::constants::{vision_rope_angles, VISION_RMS_EPS};
use crate::model::plan::{self, VisionPlan};
use crate::model::weights::ALIGN;
use crate::ops;
use crate::{Error, Result};

/// The vision tower's host inputs for one batch, planned on the host, and their regions in the
/// forward's staged inputs.
pub(super) struct VisionStage {
    vp: VisionPlan,
    /// The 2-D rotary angles after the window permutation, `[patches, head_dim/2]`.
    angles: Vec<f32>,
    window: Region<u32>,
    reverse: Region<u32>,
    cu_win: Region<i32>,
    cu_full: Region<i32>,
    angles_at: Region<f32>,
    /// Patch rows in bf16, as the reference feeds its patch embedding.
    pixels: Region<bf16>,
}

/// The vision tower's inputs on the device.
pub(super) struct VisionInputs<'s> {
    window: DView<'s, u32>,
    reverse: DView<'s, u32>,
    cu_win: DView<'s, i32>,
    cu_full: DView<'s, i32>,
    angles: DView<'s, f32>,
    pixels: DView<'s, bf16>,
    max_win: usize,
    max_full: usize,
}

impl VisionStage {
    /// Merged tokens the tower produces.
    pub(super) fn merged_tokens(&self) -> usize {
        self.vp.merged_tokens()
    }

    /// Writes the inputs into the staging buffer.
    pub(super) fn write(&self, st: &mut StageWriter<'_>, batch: &PackedBatch) -> Result<()> {
        for (d, &i) in st.slice(&self.window).iter_mut().zip(&self.vp.window_index) {
            *d = i as u32;
        }
        for (d, &i) in st.slice(&self.reverse).iter_mut().zip(&self.vp.reverse_index) {
            *d = i as u32;
        }
        st.put(&self.cu_win, &self.vp.cu_window_seqlens)?;
        st.put(&self.cu_full, &self.vp.cu_seqlens)?;
        st.put(&self.angles_at, &self.angles)?;
        let px = st.slice(&self.pixels);
        let mut at = 0;
        for img in batch.images() {
            let n = img.pixel_values.len();
            let Some(dst) = px.get_mut(at..at + n) else {
                return Err(Error::Input("the images hold more pixel values than planned".into()));
            };
            img.pixel_values.write_bf16(dst);
            at += n;
        }
        Ok(())
    }

    /// The inputs on the device, once staged.
    pub(super) fn inputs<'s>(&self, staged: &Staged<'s>) -> VisionInputs<'s> {
        VisionInputs {
            window: staged.view(&self.window),
            reverse: staged.view(&self.reverse),
            cu_win: staged.view(&self.cu_win),
            cu_full: staged.view(&self.cu_full),
            angles: staged.view(&self.angles_at),
            pixels: staged.view(&self.pixels),
            max_win: self.vp.max_window_patches(),
            max_full: self.vp.max_image_patches(),
        }
    }
}

impl GpuModel {
    /// Plans the vision tower's inputs for the batch's images into `lay` (host work only).
    pub(super) fn plan_vision(&self, batch: &PackedBatch, lay: &mut BufferLayout) -> Result<VisionStage> {
        let v = &self.cfg.vision;
        let vp = plan::try_vision_plan(&batch.grids(), v.spatial_merge_size, v.window_size, v.patch_size)?;
        let (np, hd) = (vp.patches, v.head_dim());
        // Host math (f64 → f32), after the permutation.
        let angles = vision_rope_angles(&vp.rot_pos_windowed(v.spatial_merge_size), hd);
        let values: usize = batch.images().iter().map(|i| i.pixel_values.len()).sum();
        Ok(VisionStage {
            window: lay.push(&[vp.window_index.len()]),
            reverse: lay.push(&[vp.reverse_index.len()]),
            cu_win: lay.push(&[vp.cu_window_seqlens.len()]),
            cu_full: lay.push(&[vp.cu_seqlens.len()]),
            angles_at: lay.push(&[np, hd / 2]),
            pixels: lay.push(&[np, values / np.max(1)]),
            vp,
            angles,
        })
    }

    /// The vision tower over the batch's images alone (docs/MODEL.md §5): `[merged tokens, out_hidden]`
    /// bf16, in raster order per image, images in order, in `arena` (with its inputs, staged in
    /// one copy). The forward runs the same tower on inputs staged with the decoder's.
    pub fn vision<'a>(
        &self,
        gpu: &Gpu,
        arena: &'a Arena<'_>,
        batch: &PackedBatch,
    ) -> Result<Tensor<'a, bf16>> {
        let mut lay = BufferLayout::new(ALIGN);
        let stage = self.plan_vision(batch, &mut lay)?;
        let staged = arena.upload(gpu, &lay, |st| stage.write(st, batch))?;
        self.tower(gpu, arena, &stage.inputs(&staged))
    }

    /// The tower on staged inputs; every activation from `arena`. The residual stream `h` is
    /// f32, like the decoder's (the reference keeps it in bf16): proj and down accumulate into it
    /// with their (f32) biases in the GEMM's epilogue, so no block's add rounds it to bf16, and
    /// the norms read it and write the bf16 activations the next GEMM takes.
    pub(super) fn tower<'a>(
        &self,
        gpu: &Gpu,
        arena: &'a Arena<'_>,
        inp: &VisionInputs<'_>,
    ) -> Result<Tensor<'a, bf16>> {
        let v = &self.cfg.vision;
        let unit = v.spatial_merge_size * v.spatial_merge_size;
        let (np, d, heads, hd) = (inp.pixels.shape()[0], v.hidden_size, v.num_heads, v.head_dim());
        let (max_win, max_full) = (inp.max_win, inp.max_full);
        let w = &self.w;
        let alloc = |dims: &[usize]| arena.alloc::<bf16>(dims);

        let mut h = arena.alloc::<f32>(&[np, d])?;
        {
            // Window order: groups of merge² patches permuted as whole rows. The patch embedding
            // maps each row on its own (no bias), so the permutation is applied to its input, the
            // bf16 pixel rows, and the embedding writes the f32 stream in window order: the gather
            // moves bf16 rows and the stream needs no second f32 buffer. The permuted pixels live in
            // an inner arena, given back before the blocks allocate.
            let kp = inp.pixels.shape()[1];
            let scope = arena.nested();
            let mut px = scope.alloc::<bf16>(&[np, kp])?;
            ops::gather_rows(
                gpu,
                &inp.pixels.reshape(&[np / unit, unit * kp]),
                &inp.window,
                &mut px.view_mut().reshape(&[np / unit, unit * kp]),
            )?;
            ops::linear_f32(gpu, &px.view(), &w.at(&w.patch_embed), None, &mut h.view_mut(), false)?;
        }
        let mut x = alloc(&[np, d])?;
        let mut qkv = alloc(&[np, 3 * d])?;
        let mut attn = alloc(&[np, d])?;
        // The MLP's padded width (weights::plan_padded; exact, see vision_mlp_width).
        let inter = crate::model::constants::vision_mlp_width(v.intermediate_size);
        let mut gu = alloc(&[np, 2 * inter])?;
        let mut act = alloc(&[np, inter])?;
        let eps = VISION_RMS_EPS;
        for (j, b) in w.blocks.iter().enumerate() {
            ops::rmsnorm_f32(gpu, &h.view(), &w.at(&b.norm1), eps, &mut x.view_mut())?;
            w.linear(gpu, &x.view(), &b.qkv, &mut qkv.view_mut(), false, None)?;
            ops::vision_rope(gpu, &mut qkv.view_mut(), heads, hd, &inp.angles)?;
            let full = v.fullatt_block_indexes.contains(&j);
            let (cu, max) = if full { (&inp.cu_full, max_full) } else { (&inp.cu_win, max_win) };
            ops::flash_attn(
                gpu,
                &qkv.view(),
                &mut attn.view_mut(),
                cu,
                max,
                heads,
                heads,
                hd,
                false,
                (hd as f32).powf(-0.5),
            )?;
            w.linear_residual(gpu, &attn.view(), &b.proj, &mut h.view_mut(), None)?;
            ops::rmsnorm_f32(gpu, &h.view(), &w.at(&b.norm2), eps, &mut x.view_mut())?;
            w.linear(gpu, &x.view(), &b.gate_up, &mut gu.view_mut(), false, None)?;
            ops::swiglu(gpu, &gu.view(), &mut act.view_mut())?;
            w.linear_residual(gpu, &act.view(), &b.down, &mut h.view_mut(), None)?;
        }
        // Patch merger: RMSNorm per patch, merge² patches as one row, MLP with exact GELU.
        let m = &w.merger;
        ops::rmsnorm_f32(gpu, &h.view(), &w.at(&m.ln_q), eps, &mut x.view_mut())?;
        let groups = np / unit;
        let merged = x.view().reshape(&[groups, unit * d]);
        let mut z = alloc(&[groups, unit * d])?;
        w.linear(gpu, &merged, &m.mlp0, &mut z.view_mut(), false, None)?;
        let mut zg = alloc(&[groups, unit * d])?;
        ops::gelu(gpu, &z.view(), &mut zg.view_mut())?;
        let out_d = v.out_hidden_size;
        let mut y = alloc(&[groups, out_d])?;
        w.linear(gpu, &zg.view(), &m.mlp2, &mut y.view_mut(), false, None)?;
        // Back to raster order: out[window_index[i]] = y[i], i.e. a gather with the inverse.
        let mut out = alloc(&[groups, out_d])?;
        ops::gather_rows(gpu, &y.view(), &inp.reverse, &mut out.view_mut())?;
        Ok(out)
    }
}
