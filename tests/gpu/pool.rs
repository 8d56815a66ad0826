//! The heads' ops against the CPU reference: `mean_pool_l2` (tolerance derived from the f32
//! summation order, batch-independent bits, invalid spans giving NaN) and `l2_rows`.

use half::bf16;

use crate::check::{check_close, expect_shape_error};
use crate::harness::{e, Ctx};
use crate::util::{allocator, dtensor, random_bf16, to_f32, upload, F32_NAN_BITS, U32};
use jv4::cuda::{DView, DeviceAllocator};
use jv4::{ops, reference};

/// Runs mean_pool_l2 on `spans` of `h` and returns the [B, d] result.
fn run_pool(
    ctx: &Ctx,
    mem: &mut DeviceAllocator,
    h: &DView<'_, bf16>,
    spans: &[(usize, usize)],
) -> Result<Vec<f32>, String> {
    let dim = h.shape()[1];
    let flat: Vec<u32> = spans.iter().flat_map(|&(s, e)| [s as u32, e as u32]).collect();
    let spans_d = upload(ctx, mem, &[spans.len(), 2], &flat)?;
    let mut out = dtensor::<f32>(mem, &[spans.len(), dim])?;
    ctx.gpu.fill_u32(&mut out.view_mut(), F32_NAN_BITS).map_err(e)?;
    ops::mean_pool_l2(&ctx.gpu, h, &spans_d.view(), &mut out.view_mut()).map_err(e)?;
    let got = ctx.gpu.download(&out.view()).map_err(e)?;
    mem.free(spans_d.into_block());
    mem.free(out.into_block());
    Ok(got)
}

pub fn mean_pool_l2_matches_reference(ctx: &mut Ctx) -> Result<(), String> {
    let mut worst = 0f32;
    for &(tokens, dim, lens) in ops::pool::CASES {
        // Hidden states have per-column offsets: a column bias plus noise.
        let bias: Vec<f32> = (0..dim).map(|_| 0.5 * ctx.rng.normal()).collect();
        let h_h: Vec<bf16> =
            (0..tokens * dim).map(|i| bf16::from_f32(bias[i % dim] + ctx.rng.normal())).collect();
        let h_f = to_f32(&h_h);
        let mut spans = Vec::new();
        let mut s = 0;
        for &l in lens {
            spans.push((s, s + l));
            s += l;
        }
        assert!(s <= tokens, "pool case: spans exceed the tokens");
        let mut mem = allocator(ctx, 256 << 20)?;
        let h = upload(ctx, &mut mem, &[tokens, dim], &h_h)?;
        let got = run_pool(ctx, &mut mem, &h.view(), &spans)?;

        let want = reference::mean_pool_l2(&h_f, dim, &spans);
        // The tolerance comes from the un-normalised means.
        let means = reference::mean_pool(&h_f, dim, &spans);
        let mut tol = Vec::with_capacity(spans.len() * dim);
        for ((&(s, e), m), w) in spans.iter().zip(&means).zip(want.chunks_exact(dim)) {
            let n = (e - s) as f64;
            // The kernel sums each column in f32 in row order: the k-th addition rounds by at
            // most 2^-24·|P_k| (P_k the partial sum), so the sum is off by ≤ 2^-24·Σ_k≥2 |P_k|;
            // the division and the reference's own f32 mean add 2^-24·|m| each.
            let err: Vec<f64> = (0..dim)
                .map(|c| {
                    let (mut p, mut sum_abs) = (0f64, 0f64);
                    for r in s..e {
                        p += h_f[r * dim + c] as f64;
                        if r > s {
                            sum_abs += p.abs();
                        }
                    }
                    U32 as f64 * (sum_abs / n + 2.0 * m[c].abs() as f64)
                })
                .collect();
            let norm = m.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt();
            let err_norm = err.iter().map(|x| x * x).sum::<f64>().sqrt();
            // ‖v‖ in f32 (≤ 8 squares per thread, a tree of ≤ 8 levels, sqrt) and the division:
            // ≤ ~20·2^-24 relative; we allow 64·2^-24. Everything doubled for margin.
            let rel = err_norm / norm + 64.0 * U32 as f64;
            for c in 0..dim {
                tol.push((2.0 * (err[c] / norm + w[c].abs() as f64 * rel)) as f32 + 1e-12);
            }
        }
        let what = format!("mean_pool_l2 T={tokens} d={dim} spans={lens:?}");
        let st = check_close(&what, &got, &want, |i| tol[i])?;
        worst = worst.max(st.max_tol_ratio);

        // A span's result does not depend on the batch: alone, it gives the same bits.
        for (b, &span) in spans.iter().enumerate() {
            let alone = run_pool(ctx, &mut mem, &h.view(), &[span])?;
            let row = &got[b * dim..(b + 1) * dim];
            if let Some(c) = alone.iter().zip(row).position(|(a, g)| a.to_bits() != g.to_bits()) {
                return Err(format!(
                    "{what}: span {span:?} alone differs from its batched result at column {c}: {} vs {}",
                    alone[c], row[c]
                ));
            }
        }
    }
    println!("  mean_pool_l2: worst error / tolerance {worst:.3}");
    Ok(())
}

pub fn mean_pool_l2_invalid_spans_give_nan(ctx: &mut Ctx) -> Result<(), String> {
    let (tokens, dim) = (10, 2048);
    let (h_h, h_f) = random_bf16(ctx, tokens * dim, 1.0);
    let mut mem = allocator(ctx, 64 << 20)?;
    let h = upload(ctx, &mut mem, &[tokens, dim], &h_h)?;
    // Empty, reversed, past the end, far past the end; and a valid one between them.
    let spans = [(3, 3), (5, 2), (4, 11), (0, 3), (7, u32::MAX as usize)];
    let got = run_pool(ctx, &mut mem, &h.view(), &spans)?;
    for (b, &(s, e)) in spans.iter().enumerate() {
        let row = &got[b * dim..(b + 1) * dim];
        if s < e && e <= tokens {
            let want = reference::mean_pool_l2(&h_f, dim, &[(s, e)]);
            // Loose (1e-5 relative, 1e-6 absolute for columns whose mean cancels): this test is
            // about the invalid rows; precision is mean_pool_l2_matches_reference's business.
            check_close(&format!("mean_pool_l2 valid span {b}"), row, &want, |i| {
                1e-5 * want[i].abs() + 1e-6
            })?;
        } else if let Some(c) = row.iter().position(|v| !v.is_nan()) {
            return Err(format!("invalid span ({s}, {e}) gave {} at column {c}, expected NaN", row[c]));
        }
    }
    Ok(())
}

pub fn l2_rows_matches_reference(ctx: &mut Ctx) -> Result<(), String> {
    let mut worst = 0f32;
    for &(tokens, dim) in ops::pool::L2_CASES {
        let (mut x_h, mut x_f) = random_bf16(ctx, tokens * dim, 3.0);
        if tokens > 2 {
            // A zero row stays zero; a row with a norm below 1e-12 is divided by 1e-12.
            x_h[dim..2 * dim].fill(bf16::ZERO);
            for c in 0..dim {
                x_h[2 * dim + c] = bf16::from_f32(1e-14 * ctx.rng.normal());
            }
            x_f = to_f32(&x_h);
        }
        let mut mem = allocator(ctx, 64 << 20)?;
        let x = upload(ctx, &mut mem, &[tokens, dim], &x_h)?;
        let mut out = dtensor::<f32>(&mut mem, &[tokens, dim])?;
        ctx.gpu.fill_u32(&mut out.view_mut(), F32_NAN_BITS).map_err(e)?;
        ops::l2_rows(&ctx.gpu, &x.view(), &mut out.view_mut()).map_err(e)?;
        let got = ctx.gpu.download(&out.view()).map_err(e)?;
        let want = reference::l2_rows(&x_f, dim);
        // Exact inputs; f32 sum of squares (d/32 per lane, 5 shuffle levels), sqrt, division:
        // ≤ ~(d/32 + 8)·2^-24 relative. We allow twice that plus 16.
        let rel = (2 * dim.div_ceil(32) + 32) as f32 * U32;
        let s = check_close(&format!("l2_rows T={tokens} d={dim}"), &got, &want, |i| {
            rel * want[i].abs() + 1e-12
        })?;
        worst = worst.max(s.max_tol_ratio);
    }
    println!("  l2_rows: worst error / tolerance {worst:.3}");
    Ok(())
}

/// `mean_pool_l2` and `l2_rows` reject bad spans and output shapes.
/// Part of `textops_reject_bad_shapes`.
pub fn pool_rejects_bad_shapes(ctx: &mut Ctx) -> Result<(), String> {
    let gpu = &ctx.gpu;
    let mut mem = allocator(ctx, 64 << 20)?;
    let x = dtensor::<bf16>(&mut mem, &[3, 16])?;
    let spans = dtensor::<u32>(&mut mem, &[2, 3])?;
    let mut pooled = dtensor::<f32>(&mut mem, &[2, 16])?;
    expect_shape_error(
        "mean_pool_l2",
        ops::mean_pool_l2(gpu, &x.view(), &spans.view(), &mut pooled.view_mut()),
    )?;
    let mut rows_out = dtensor::<f32>(&mut mem, &[3, 15])?;
    expect_shape_error("l2_rows", ops::l2_rows(gpu, &x.view(), &mut rows_out.view_mut()))?;
    Ok(())
}
