//! `linear` and `linear_f32` (cuBLASLt) against the CPU reference at every GEMM shape the model
//! runs (`ops::linear::CASES`), at token counts from one to a full batch.

use half::bf16;

use crate::check::{check_close, BF16_NAN_BITS, BF16_REL};
use crate::harness::{e, Ctx};
use crate::util::{allocator, dtensor, random_bf16, to_f32, upload, U32};
use jv4::{ops, reference};

/// Output rows to check on the CPU: all of a small problem, a spread sample of a large one
/// (first and last row always included).
fn sample_rows(m: usize, max: usize) -> Vec<usize> {
    if m <= max {
        return (0..m).collect();
    }
    (0..max).map(|i| i * (m - 1) / (max - 1)).collect()
}

pub fn linear_matches_reference(ctx: &mut Ctx) -> Result<(), String> {
    let mut mem = allocator(ctx, 4 << 30)?;
    let mut worst = [0f32; 3];
    for (case, &(name, n, k)) in ops::linear::CASES.iter().enumerate() {
        let (w_h, w_f) = random_bf16(ctx, n * k, 1.0 / (k as f32).sqrt());
        let mut w = dtensor::<bf16>(&mut mem, &[n, k])?;
        ctx.gpu.upload(&mut w.view_mut(), &w_h).map_err(e)?;
        let (b_h, b_f) = random_bf16(ctx, n, 0.5);
        let mut b = dtensor::<bf16>(&mut mem, &[n])?;
        ctx.gpu.upload(&mut b.view_mut(), &b_h).map_err(e)?;
        for &m in ops::linear::TOKENS {
            // Cycle through the three forms the model uses: plain, with bias (q/k/v), and
            // accumulating into the output (residual adds after o and down).
            let form = (case + m) % 3;
            let (x_h, x_f) = random_bf16(ctx, m * k, 1.0);
            let mut x = dtensor::<bf16>(&mut mem, &[m, k])?;
            ctx.gpu.upload(&mut x.view_mut(), &x_h).map_err(e)?;
            let mut y = dtensor::<bf16>(&mut mem, &[m, n])?;
            // The old y, for the accumulating form only (generating it costs more than the GEMM).
            let (y0_h, y0_f) =
                if form == 2 { random_bf16(ctx, m * n, 1.0) } else { (Vec::new(), Vec::new()) };
            if form == 2 {
                ctx.gpu.upload(&mut y.view_mut(), &y0_h).map_err(e)?;
            } else {
                ctx.gpu.fill_u16(&mut y.view_mut(), BF16_NAN_BITS).map_err(e)?;
            }
            let bias = (form == 1).then(|| b.view());
            ops::linear(&ctx.gpu, &x.view(), &w.view(), bias.as_ref(), &mut y.view_mut(), form == 2)
                .map_err(e)?;
            let got_all = to_f32(&ctx.gpu.download(&y.view()).map_err(e)?);
            let rows = sample_rows(m, 48);
            let (mut want, mut scale) =
                reference::linear(&x_f, &w_f, (form == 1).then_some(&b_f[..]), (m, n, k), Some(&rows));
            // When the epilogue adds something (bias, or the old y with accumulate), cuBLAS may
            // round x·wᵀ to bf16 before the add (two roundings): allow one bf16 rounding of the
            // product on top.
            let mut product_rounding = vec![0f32; want.len()];
            let mut got = Vec::with_capacity(rows.len() * n);
            for (ri, &r) in rows.iter().enumerate() {
                got.extend_from_slice(&got_all[r * n..(r + 1) * n]);
                if form == 1 {
                    for j in 0..n {
                        product_rounding[ri * n + j] = BF16_REL * (want[ri * n + j] - b_f[j]).abs();
                    }
                }
                if form == 2 {
                    for j in 0..n {
                        product_rounding[ri * n + j] = BF16_REL * want[ri * n + j].abs();
                        want[ri * n + j] += y0_f[r * n + j];
                        scale[ri * n + j] += y0_f[r * n + j].abs();
                    }
                }
            }
            // Products of bf16 values are exact in f32; what remains is f32 accumulation in an
            // unknown order (tensor cores) and one bf16 rounding of the output. The accumulation
            // error grows like sqrt(k)·2^-24·Σ|x·w|; we allow 8 times that, far below the error
            // of any indexing or layout mistake (which is of the order of |y| itself).
            let acc = 8.0 * (k as f32).sqrt() * f32::EPSILON / 2.0;
            let s = check_close(&format!("linear {name} m={m} n={n} k={k} form={form}"), &got, &want, |i| {
                BF16_REL * want[i].abs() + product_rounding[i] + acc * scale[i]
            })?;
            worst[form] = worst[form].max(s.max_tol_ratio);
            mem.free(x.into_block());
            mem.free(y.into_block());
        }
        mem.free(w.into_block());
        mem.free(b.into_block());
    }
    println!(
        "  linear: worst error / tolerance: plain {:.3}, bias {:.3}, accumulate {:.3} ({} plans cached)",
        worst[0],
        worst[1],
        worst[2],
        ctx.gpu.blas().plan_count()
    );
    Ok(())
}

/// `linear_f32` accumulating into an f32 y (no output rounding: only the f32 accumulation error
/// of `linear`'s test remains). Part of `residual_f32_ops_match_reference`.
pub fn linear_f32_matches_reference(ctx: &mut Ctx) -> Result<(), String> {
    let mut mem = allocator(ctx, 1 << 30)?;
    // linear_f32, accumulating into an f32 y.
    for &(m, n, k) in &[(1usize, 2048usize, 2048usize), (129, 2048, 11008), (1000, 2048, 96)] {
        let (x_h, x_f) = random_bf16(ctx, m * k, 1.0);
        let (w_h, w_f) = random_bf16(ctx, n * k, 1.0 / (k as f32).sqrt());
        let y0: Vec<f32> = (0..m * n).map(|_| ctx.rng.normal()).collect();
        let x = upload(ctx, &mut mem, &[m, k], &x_h)?;
        let w = upload(ctx, &mut mem, &[n, k], &w_h)?;
        let mut y = upload(ctx, &mut mem, &[m, n], &y0)?;
        ops::linear_f32(&ctx.gpu, &x.view(), &w.view(), &mut y.view_mut(), true).map_err(e)?;
        let got = ctx.gpu.download(&y.view()).map_err(e)?;
        let (mut want, mut scale) = reference::linear(&x_f, &w_f, None, (m, n, k), None);
        for i in 0..m * n {
            want[i] += y0[i];
            scale[i] += y0[i].abs();
        }
        // No bf16 rounding of the output: f32 accumulation (statistical bound, 8x) and the final
        // f32 add only.
        let acc = 8.0 * (k as f32).sqrt() * U32;
        check_close(&format!("linear_f32 m={m} n={n} k={k}"), &got, &want, |i| {
            acc * scale[i] + U32 * want[i].abs()
        })?;
    }
    Ok(())
}

pub fn linear_rejects_bad_shapes(ctx: &mut Ctx) -> Result<(), String> {
    let mut mem = allocator(ctx, 64 << 20)?;
    let x = dtensor::<bf16>(&mut mem, &[3, 64])?;
    let w = dtensor::<bf16>(&mut mem, &[32, 48])?;
    let mut y = dtensor::<bf16>(&mut mem, &[3, 32])?;
    match ops::linear(&ctx.gpu, &x.view(), &w.view(), None, &mut y.view_mut(), false) {
        Err(jv4::Error::Shape { op: "linear", .. }) => Ok(()),
        other => Err(format!("expected a linear shape error, got {other:?}")),
    }
}

/// Batch invariance of the GEMMs (src/cuda/blas.rs keeps to algorithms without split-K): rows of
/// `x` multiplied inside a tall GEMM and alone, or inside slices of other heights and offsets,
/// give bit-for-bit the same rows of `y`, in every form the model uses (bias; f32 accumulate).
pub fn linear_batch_invariant(ctx: &mut Ctx) -> Result<(), String> {
    if !ctx.gpu.blas().invariant() {
        return Err("JV4_BLAS_INVARIANT=0: the GEMMs are not batch-invariant in this run".into());
    }
    let mut mem = allocator(ctx, 4 << 30)?;
    let m = 1500;
    let slices: [std::ops::Range<usize>; 6] = [0..1, 1..17, 5..6, 100..612, 1499..1500, 0..1024];
    for &(name, n, k) in ops::linear::CASES {
        let (w_h, _) = random_bf16(ctx, n * k, 1.0 / (k as f32).sqrt());
        let mut w = dtensor::<bf16>(&mut mem, &[n, k])?;
        ctx.gpu.upload(&mut w.view_mut(), &w_h).map_err(e)?;
        let (b_h, _) = random_bf16(ctx, n, 0.5);
        let mut b = dtensor::<bf16>(&mut mem, &[n])?;
        ctx.gpu.upload(&mut b.view_mut(), &b_h).map_err(e)?;
        let (x_h, _) = random_bf16(ctx, m * k, 1.0);
        let mut x = dtensor::<bf16>(&mut mem, &[m, k])?;
        ctx.gpu.upload(&mut x.view_mut(), &x_h).map_err(e)?;
        // bf16 output with bias, and the f32 residual form (accumulating onto a random y0).
        let mut y = dtensor::<bf16>(&mut mem, &[m, n])?;
        ops::linear(&ctx.gpu, &x.view(), &w.view(), Some(&b.view()), &mut y.view_mut(), false).map_err(e)?;
        let full = ctx.gpu.download(&y.view()).map_err(e)?;
        let y0: Vec<f32> = random_bf16(ctx, m * n, 1.0).1;
        let mut yf = dtensor::<f32>(&mut mem, &[m, n])?;
        ctx.gpu.upload(&mut yf.view_mut(), &y0).map_err(e)?;
        ops::linear_f32(&ctx.gpu, &x.view(), &w.view(), &mut yf.view_mut(), true).map_err(e)?;
        let full_f = ctx.gpu.download(&yf.view()).map_err(e)?;
        for r in slices.iter().cloned() {
            let xs = x.view().rows(r.clone());
            let mut ys = dtensor::<bf16>(&mut mem, &[r.len(), n])?;
            ctx.gpu.fill_u16(&mut ys.view_mut(), BF16_NAN_BITS).map_err(e)?;
            ops::linear(&ctx.gpu, &xs, &w.view(), Some(&b.view()), &mut ys.view_mut(), false).map_err(e)?;
            let got = ctx.gpu.download(&ys.view()).map_err(e)?;
            let want = &full[r.start * n..r.end * n];
            if let Some(i) = (0..got.len()).find(|&i| got[i].to_bits() != want[i].to_bits()) {
                return Err(format!(
                    "linear {name} n={n} k={k}: rows {r:?} alone differ from the same rows in m={m} \
                     : element {i}: {} vs {}",
                    got[i], want[i]
                ));
            }
            let mut yfs = dtensor::<f32>(&mut mem, &[r.len(), n])?;
            ctx.gpu.upload(&mut yfs.view_mut(), &y0[r.start * n..r.end * n]).map_err(e)?;
            ops::linear_f32(&ctx.gpu, &xs, &w.view(), &mut yfs.view_mut(), true).map_err(e)?;
            let got = ctx.gpu.download(&yfs.view()).map_err(e)?;
            let want = &full_f[r.start * n..r.end * n];
            if let Some(i) = (0..got.len()).find(|&i| got[i].to_bits() != want[i].to_bits()) {
                return Err(format!(
                    "linear_f32 {name} n={n} k={k}: rows {r:?} alone differ from the same rows in \
                     m={m}: element {i}: {} vs {}",
                    got[i], want[i]
                ));
            }
            mem.free(ys.into_block());
            mem.free(yfs.into_block());
        }
        for t in [y.into_block(), x.into_block(), b.into_block(), w.into_block()] {
            mem.free(t);
        }
        mem.free(yf.into_block());
    }
    println!(
        "  {} shapes × {} row slices bitwise equal to the tall GEMM ({} problems without an unsplit algorithm)",
        ops::linear::CASES.len(),
        slices.len(),
        ctx.gpu.blas().invariance_fallbacks()
    );
    Ok(())
}
