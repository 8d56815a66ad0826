//! The vision path's small kernels against their CPU references: the exact GELU of the patch
//! merger, the row gather (window permutation and its inverse) and the f32 row scatter (the
//! image-token splice). Outputs are poisoned before each launch and every element is checked.

use half::bf16;

use crate::check::{check_close, BF16_NAN_BITS, BF16_REL};
use crate::harness::{e, Ctx};
use crate::ops::{allocator, random_bf16, to_f32};
use crate::textops::{check_bits, dtensor, random_bf16_bits, upload, U32};
use jv4::{ops, reference};

/// A random permutation of `0..n` (Fisher–Yates).
fn permutation(ctx: &mut Ctx, n: usize) -> Vec<usize> {
    let mut p: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        p.swap(i, ctx.rng.below(i + 1));
    }
    p
}

fn bits(v: &[bf16]) -> Vec<u16> {
    v.iter().map(|x| x.to_bits()).collect()
}

pub fn gelu_matches_reference(ctx: &mut Ctx) -> Result<(), String> {
    let mut worst = 0f32;
    for (case, &n) in ops::gelu::CASES.iter().enumerate() {
        // Typical merger activations, wide ones (deep negative tail, identity on the right) and
        // small ones.
        let scale = [1.0, 4.0, 0.05][case % 3];
        let (mut x_h, mut x_f) = random_bf16(ctx, n, scale);
        let special = [0.0, -0.0, 1.0, -1.0, -5.0, -10.0, -100.0, 100.0, 3.0e38, -3.0e38, 1e-40];
        for (k, &v) in special.iter().enumerate().take(n) {
            let i = (k * 997) % n;
            x_h[i] = bf16::from_f32(v);
            x_f[i] = x_h[i].to_f32();
        }
        let mut mem = allocator(ctx, 64 << 20)?;
        let x = upload(ctx, &mut mem, &[n], &x_h)?;
        let mut out = dtensor::<bf16>(&mut mem, &[n])?;
        ctx.gpu.fill_u16(&mut out.view_mut(), BF16_NAN_BITS).map_err(e)?;
        ops::gelu(&ctx.gpu, &x.view(), &mut out.view_mut()).map_err(e)?;
        let got = to_f32(&ctx.gpu.download(&out.view()).map_err(e)?);
        let want = reference::gelu(&x_f);
        // Kernel in f32: t = x·f32(1/√2) (2 roundings of t, ≤ 0.5 ulp of erf after erf' ≤ 1.13),
        // erff ≤ 2 ulp, 1 + erf ≤ 1 ulp of 2 (exact when erf ≤ -0.5), 0.5·x·s one rounding. So
        // s = 1 + erf is off by ≤ ~4·2^-24 absolute and the f32 value by
        // E ≤ 0.5·|x|·4·2^-24 + 2^-24·|g|; we allow E = (3·|x| + 2·|g|)·2^-24. Then one bf16
        // rounding of a value within E of g: BF16_REL·(|g| + E). f32::MIN_POSITIVE covers a
        // flushed subnormal.
        let s = check_close(&format!("gelu n={n} scale={scale}"), &got, &want, |i| {
            let err = (3.0 * x_f[i].abs() + 2.0 * want[i].abs()) * U32;
            BF16_REL * want[i].abs() + err * (1.0 + BF16_REL) + f32::MIN_POSITIVE
        })?;
        worst = worst.max(s.max_tol_ratio);
    }
    println!("  gelu: worst error / tolerance {worst:.3}");
    Ok(())
}

pub fn gather_rows_matches_reference(ctx: &mut Ctx) -> Result<(), String> {
    for &(rows, len) in ops::rows::CASES {
        let x_h = random_bf16_bits(ctx, rows * len);
        let x_f = to_f32(&x_h);
        let perm = permutation(ctx, rows);
        // The permutation, then two invalid indices (rows itself and u32::MAX): NaN rows.
        let mut index: Vec<u32> = perm.iter().map(|&i| i as u32).collect();
        index.extend([rows as u32, u32::MAX]);
        let rows_out = index.len();
        let mut mem = allocator(ctx, (4 * rows * len * 2) as u64 + (64 << 20))?;
        let x = upload(ctx, &mut mem, &[rows, len], &x_h)?;
        let idx = upload(ctx, &mut mem, &[rows_out], &index)?;
        let mut out = dtensor::<bf16>(&mut mem, &[rows_out, len])?;
        ctx.gpu.fill_u16(&mut out.view_mut(), 0x1234).map_err(e)?;
        ops::gather_rows(&ctx.gpu, &x.view(), &idx.view(), &mut out.view_mut()).map_err(e)?;
        let got = ctx.gpu.download(&out.view()).map_err(e)?;
        let what = format!("gather_rows rows={rows} L={len}");
        // A gather is a copy: bit-exact (the reference works in f32, which holds every bf16).
        let want: Vec<bf16> =
            reference::gather_rows(&x_f, len, &perm).iter().map(|&v| bf16::from_f32(v)).collect();
        check_bits(&what, &bits(&got[..rows * len]), &bits(&want))?;
        if let Some(c) = got[rows * len..].iter().position(|v| !v.is_nan()) {
            return Err(format!(
                "{what}: invalid index row gave {} at {c} past the valid rows",
                got[rows * len + c]
            ));
        }

        // The un-permutation: gathering the permuted rows with the inverse index gives x back,
        // as reference::gather_rows with the inverse does.
        let mut inverse = vec![0u32; rows];
        for (i, &p) in perm.iter().enumerate() {
            inverse[p] = i as u32;
        }
        let p = upload(ctx, &mut mem, &[rows, len], &want)?;
        let inv = upload(ctx, &mut mem, &[rows], &inverse)?;
        let mut back = dtensor::<bf16>(&mut mem, &[rows, len])?;
        ctx.gpu.fill_u16(&mut back.view_mut(), BF16_NAN_BITS).map_err(e)?;
        ops::gather_rows(&ctx.gpu, &p.view(), &inv.view(), &mut back.view_mut()).map_err(e)?;
        let got = ctx.gpu.download(&back.view()).map_err(e)?;
        let inverse_usize: Vec<usize> = inverse.iter().map(|&i| i as usize).collect();
        if reference::gather_rows(&to_f32(&want), len, &inverse_usize) != x_f {
            return Err(format!("{what}: reference gather_rows with the inverse does not give x back"));
        }
        check_bits(&format!("{what} (inverse)"), &bits(&got), &bits(&x_h))?;
    }
    Ok(())
}

pub fn scatter_rows_f32_matches_reference(ctx: &mut Ctx) -> Result<(), String> {
    for &(r, n, len) in ops::rows::SCATTER_CASES {
        let v_h = random_bf16_bits(ctx, n * len);
        // N distinct destination rows in random order; from 4 rows on, one of them replaced by an
        // out-of-range row (R), which must be skipped.
        let mut rows: Vec<u32> = permutation(ctx, r)[..n].iter().map(|&i| i as u32).collect();
        if n >= 4 {
            rows[n / 2] = r as u32;
        }
        // A known pattern in out: distinct, exactly representable values.
        let pattern: Vec<f32> = (0..r * len).map(|i| (i % (1 << 20)) as f32 * 0.25 - 1000.0).collect();
        let mut mem = allocator(ctx, (r * len * 4 + n * len * 2) as u64 + (64 << 20))?;
        let v = upload(ctx, &mut mem, &[n, len], &v_h)?;
        let rows_d = upload(ctx, &mut mem, &[n], &rows)?;
        let mut out = upload(ctx, &mut mem, &[r, len], &pattern)?;
        ops::scatter_rows_f32(&ctx.gpu, &v.view(), &rows_d.view(), &mut out.view_mut()).map_err(e)?;
        let got = ctx.gpu.download(&out.view()).map_err(e)?;
        // bf16 → f32 is exact, so the reference on the f32 images is the exact result.
        let mut want = pattern.clone();
        let rows_usize: Vec<usize> = rows.iter().map(|&i| i as usize).collect();
        reference::scatter_rows_f32(&mut want, &to_f32(&v_h), len, &rows_usize);
        // Scattered rows exact, other rows untouched: bit for bit.
        let what = format!("scatter_rows_f32 R={r} N={n} L={len}");
        let bad = got.iter().zip(&want).filter(|(g, w)| g.to_bits() != w.to_bits()).count();
        if let Some(i) = got.iter().zip(&want).position(|(g, w)| g.to_bits() != w.to_bits()) {
            return Err(format!(
                "{what}: {bad} of {} elements differ; first at row {} col {}: got {}, want {}",
                got.len(),
                i / len,
                i % len,
                got[i],
                want[i]
            ));
        }
    }
    Ok(())
}
