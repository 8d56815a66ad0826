//! The row ops of the vision path against the CPU reference: `gather_rows` (window permutation
//! and its inverse, invalid indices giving NaN) and `scatter_rows_f32` (the image-token splice,
//! other rows untouched). Bit for bit.

use half::bf16;

use crate::check::{check_bits, BF16_NAN_BITS};
use crate::harness::{e, Ctx};
use crate::util::{allocator, bits, dtensor, permutation, random_bf16_bits, to_f32, upload};
use jv4::{ops, reference};

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
