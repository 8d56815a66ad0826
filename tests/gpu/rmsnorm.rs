//! `rmsnorm` and `rmsnorm_f32` against the CPU reference at the decoder's and the vision
//! tower's widths and at edge sizes.

use half::bf16;

use crate::check::{check_close, expect_shape_error, BF16_NAN_BITS, BF16_REL};
use crate::harness::{e, Ctx};
use crate::util::{allocator, dtensor, random_bf16, to_f32, upload, U32};
use jv4::{ops, reference};

pub fn rmsnorm_matches_reference(ctx: &mut Ctx) -> Result<(), String> {
    let mut worst = 0f32;
    for (case, &(tokens, dim)) in ops::rmsnorm::CASES.iter().enumerate() {
        // Typical activations, large ones and small ones (where eps starts to matter a little).
        let scale = [1.0, 40.0, 0.02][case % 3];
        let (mut x_h, mut x_f) = random_bf16(ctx, tokens * dim, scale);
        if tokens > 1 {
            // A zero row: eps keeps it finite and the output is exactly zero.
            x_h[dim..2 * dim].fill(bf16::ZERO);
            x_f[dim..2 * dim].fill(0.0);
        }
        let w_h: Vec<bf16> = (0..dim).map(|_| bf16::from_f32(1.0 + 0.5 * ctx.rng.normal())).collect();
        let w_f = to_f32(&w_h);
        let mut mem = allocator(ctx, 256 << 20)?;
        let x = upload(ctx, &mut mem, &[tokens, dim], &x_h)?;
        let w = upload(ctx, &mut mem, &[dim], &w_h)?;
        let mut out = dtensor::<bf16>(&mut mem, &[tokens, dim])?;
        ctx.gpu.fill_u16(&mut out.view_mut(), BF16_NAN_BITS).map_err(e)?;
        ops::rmsnorm(&ctx.gpu, &x.view(), &w.view(), ops::rmsnorm::EPS, &mut out.view_mut()).map_err(e)?;
        let got = to_f32(&ctx.gpu.download(&out.view()).map_err(e)?);
        let want = reference::rmsnorm(&x_f, &w_f, ops::rmsnorm::EPS);
        // Before its one bf16 rounding the kernel's f32 value is off by at most ~(k/2 + 11)·2^-24
        // relative (k ≤ 8 squares summed per thread, a tree of ≤ 8 levels, the mean, + eps,
        // rsqrtf's 2 ulp, two products); we allow 64·2^-24 on top of the bf16 rounding.
        let s = check_close(&format!("rmsnorm T={tokens} d={dim} scale={scale}"), &got, &want, |i| {
            (BF16_REL + 64.0 * U32) * want[i].abs() + 1e-12
        })?;
        worst = worst.max(s.max_tol_ratio);
    }
    println!("  rmsnorm: worst error / tolerance {worst:.3}");
    Ok(())
}

/// `rmsnorm_f32` on an f32 input that is not bf16-representable (same tolerance as `rmsnorm`).
/// Part of `residual_f32_ops_match_reference`.
pub fn rmsnorm_f32_matches_reference(ctx: &mut Ctx) -> Result<(), String> {
    let mut mem = allocator(ctx, 1 << 30)?;
    for &(tokens, dim) in ops::rmsnorm::CASES {
        let x_f: Vec<f32> = (0..tokens * dim).map(|_| ctx.rng.normal() * 3.0).collect();
        let w_h: Vec<bf16> = (0..dim).map(|_| bf16::from_f32(1.0 + 0.5 * ctx.rng.normal())).collect();
        let x = upload(ctx, &mut mem, &[tokens, dim], &x_f)?;
        let w = upload(ctx, &mut mem, &[dim], &w_h)?;
        let mut out = dtensor::<bf16>(&mut mem, &[tokens, dim])?;
        ctx.gpu.fill_u16(&mut out.view_mut(), BF16_NAN_BITS).map_err(e)?;
        ops::rmsnorm_f32(&ctx.gpu, &x.view(), &w.view(), ops::rmsnorm::EPS, &mut out.view_mut())
            .map_err(e)?;
        let got = to_f32(&ctx.gpu.download(&out.view()).map_err(e)?);
        let want = reference::rmsnorm(&x_f, &to_f32(&w_h), ops::rmsnorm::EPS);
        check_close(&format!("rmsnorm_f32 T={tokens} d={dim}"), &got, &want, |i| {
            (BF16_REL + 64.0 * U32) * want[i].abs() + 1e-12
        })?;
    }
    Ok(())
}

/// `rmsnorm` rejects a weight of the wrong length. Part of `textops_reject_bad_shapes`.
pub fn rmsnorm_rejects_bad_shapes(ctx: &mut Ctx) -> Result<(), String> {
    let gpu = &ctx.gpu;
    let mut mem = allocator(ctx, 64 << 20)?;
    let mut out3 = dtensor::<bf16>(&mut mem, &[3, 16])?;
    let x = dtensor::<bf16>(&mut mem, &[3, 16])?;
    let w = dtensor::<bf16>(&mut mem, &[15])?;
    expect_shape_error("rmsnorm", ops::rmsnorm(gpu, &x.view(), &w.view(), 1e-6, &mut out3.view_mut()))?;
    Ok(())
}
