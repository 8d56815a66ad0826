//! The vision tower on the GPU (spec §5): patch embedding, window permutation, the blocks with
//! 2-D RoPE and windowed / full attention, the patch merger, and the way back to raster order.

use half::bf16;

use super::{alloc, upload, GpuModel};
use crate::cuda::{DTensor, DeviceAllocator, Gpu};
use crate::model::batch::PackedBatch;
use crate::model::constants::{vision_rope_angles, VISION_RMS_EPS};
use crate::model::plan;
use crate::ops;
use crate::Result;

impl GpuModel {
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
        // Host math (f64 → f32), after the permutation.
        let angles = vision_rope_angles(&vp.rot_pos_windowed(v.spatial_merge_size), hd);
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
        let eps = VISION_RMS_EPS;
        for (j, b) in w.blocks.iter().enumerate() {
            ops::rmsnorm(gpu, &h.view(), &w.at(&b.norm1), eps, &mut x.view_mut())?;
            w.linear(gpu, &x.view(), &b.qkv, &mut qkv.view_mut(), false, None)?;
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
            w.linear(gpu, &attn.view(), &b.proj, &mut h.view_mut(), true, None)?;
            ops::rmsnorm(gpu, &h.view(), &w.at(&b.norm2), eps, &mut x.view_mut())?;
            w.linear(gpu, &x.view(), &b.gate_up, &mut gu.view_mut(), false, None)?;
            ops::swiglu(gpu, &gu.view(), &mut act.view_mut())?;
            w.linear(gpu, &act.view(), &b.down, &mut h.view_mut(), true, None)?;
        }
        // Patch merger: RMSNorm per patch, merge² patches as one row, MLP with exact GELU.
        let m = &w.merger;
        ops::rmsnorm(gpu, &h.view(), &w.at(&m.ln_q), eps, &mut x.view_mut())?;
        let groups = np / unit;
        let merged = x.view().reshape(&[groups, unit * d]);
        let mut z = alloc::<bf16>(mem, &[groups, unit * d])?;
        w.linear(gpu, &merged, &m.mlp0, &mut z.view_mut(), false, None)?;
        let mut zg = alloc::<bf16>(mem, &[groups, unit * d])?;
        ops::gelu(gpu, &z.view(), &mut zg.view_mut())?;
        let out_d = v.out_hidden_size;
        let mut y = alloc::<bf16>(mem, &[groups, out_d])?;
        w.linear(gpu, &zg.view(), &m.mlp2, &mut y.view_mut(), false, None)?;
        // Back to raster order: out[window_index[i]] = y[i], i.e. a gather with the inverse.
        let mut out = alloc::<bf16>(mem, &[groups, out_d])?;
        ops::gather_rows(gpu, &y.view(), &reverse.view(), &mut out.view_mut())?;
        Ok(out)
    }
}
