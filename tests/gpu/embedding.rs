//! `embedding` and `embedding_f32` against the CPU reference: the real table (151936 × 2048) and
//! small ones, invalid ids giving NaN rows, bit-exact copies.

use half::bf16;

use crate::check::{check_bits, expect_shape_error, BF16_NAN_BITS};
use crate::harness::{e, Ctx};
use crate::util::{allocator, dtensor, random_bf16, random_bf16_bits, to_f32, upload};
use jv4::cuda::DView;
use jv4::{ops, reference};

/// An embedding table on the host: its (vocab, dim), bf16 values and their f32 images.
type HostTable = ((usize, usize), Vec<bf16>, Vec<f32>);

pub fn embedding_matches_reference(ctx: &mut Ctx) -> Result<(), String> {
    // The real table is 151936 × 2048 (622 MB): generated once, shared by the cases that use it.
    let mut table: Option<HostTable> = None;
    for &(vocab, dim, tokens) in ops::embedding::CASES {
        if table.as_ref().map(|t| t.0) != Some((vocab, dim)) {
            drop(table.take()); // free the previous one first
            let h = random_bf16_bits(ctx, vocab * dim);
            let f = to_f32(&h);
            table = Some(((vocab, dim), h, f));
        }
        let (_, table_h, table_f) = table.as_ref().unwrap();
        // Random ids, the last table row first and row 0 last; from 4 tokens on, two invalid ids
        // (vocab itself and u32::MAX), whose rows must come out NaN.
        let mut ids: Vec<u32> = (0..tokens).map(|_| ctx.rng.below(vocab) as u32).collect();
        ids[0] = (vocab - 1) as u32;
        ids[tokens - 1] = if tokens > 1 { 0 } else { ids[0] };
        let invalid: Vec<usize> = if tokens >= 4 { vec![1, tokens / 2] } else { vec![] };
        if tokens >= 4 {
            ids[1] = vocab as u32;
            ids[tokens / 2] = u32::MAX;
        }
        let mut mem = allocator(ctx, (vocab * dim * 2 + tokens * dim * 6) as u64 + (64 << 20))?;
        let table_d = upload(ctx, &mut mem, &[vocab, dim], table_h)?;
        let ids_d = upload(ctx, &mut mem, &[tokens], &ids)?;
        let mut out = dtensor::<bf16>(&mut mem, &[tokens, dim])?;
        ctx.gpu.fill_u16(&mut out.view_mut(), BF16_NAN_BITS).map_err(e)?;
        ops::embedding(&ctx.gpu, &table_d.view(), &ids_d.view(), &mut out.view_mut()).map_err(e)?;
        let got: Vec<u16> = ctx.gpu.download(&out.view()).map_err(e)?.iter().map(|v| v.to_bits()).collect();

        let safe: Vec<u32> = ids.iter().map(|&i| if (i as usize) < vocab { i } else { 0 }).collect();
        let want_f = reference::embedding(table_f, dim, &safe);
        let mut want: Vec<u16> = want_f.iter().map(|&v| bf16::from_f32(v).to_bits()).collect();
        let mut got_valid = got.clone();
        for &t in &invalid {
            let row = &got[t * dim..(t + 1) * dim];
            if let Some(c) = row.iter().position(|&b| !bf16::from_bits(b).is_nan()) {
                return Err(format!(
                    "embedding vocab={vocab} d={dim} T={tokens}: invalid id {} at token {t} gave {} at column {c}, \
                     expected NaN",
                    ids[t],
                    bf16::from_bits(row[c])
                ));
            }
            // Exclude the NaN rows from the bit comparison.
            got_valid[t * dim..(t + 1) * dim].fill(0);
            want[t * dim..(t + 1) * dim].fill(0);
        }
        // A gather is a copy: bit-exact.
        check_bits(&format!("embedding vocab={vocab} d={dim} T={tokens}"), &got_valid, &want)?;

        // embedding_f32, the same gather widened (exactly) into f32: the same rows, bit for bit.
        let mut out32 = dtensor::<f32>(&mut mem, &[tokens, dim])?;
        // Poison that is finite (an unwritten invalid row is not NaN) and has low bits set (no
        // widened bf16 equals it).
        ctx.gpu.fill_u32(&mut out32.view_mut(), 0x1234_5678).map_err(e)?;
        ops::embedding_f32(&ctx.gpu, &table_d.view(), &ids_d.view(), &mut out32.view_mut()).map_err(e)?;
        let got32 = ctx.gpu.download(&out32.view()).map_err(e)?;
        let what = format!("embedding_f32 vocab={vocab} d={dim} T={tokens}");
        for (i, (&g, &w)) in got32.iter().zip(&want_f).enumerate() {
            let (t, c) = (i / dim, i % dim);
            let ok = if invalid.contains(&t) { g.is_nan() } else { g.to_bits() == w.to_bits() };
            if !ok {
                return Err(format!("{what}: token {t} column {c}: got {g}, want {w} (id {})", ids[t]));
            }
        }
    }
    Ok(())
}

/// `embedding_f32`: an exact gather into f32. Part of `residual_f32_ops_match_reference`.
pub fn embedding_f32_matches_reference(ctx: &mut Ctx) -> Result<(), String> {
    let mut mem = allocator(ctx, 1 << 30)?;
    // embedding_f32
    let (vocab, dim, tokens) = (1000, 2048, 37);
    let (t_h, t_f) = random_bf16(ctx, vocab * dim, 1.0);
    let table = upload(ctx, &mut mem, &[vocab, dim], &t_h)?;
    let ids_h: Vec<u32> = (0..tokens).map(|_| ctx.rng.below(vocab) as u32).collect();
    let ids = upload(ctx, &mut mem, &[tokens], &ids_h)?;
    let mut h = dtensor::<f32>(&mut mem, &[tokens, dim])?;
    ctx.gpu.fill_u32(&mut h.view_mut(), 0x7fc0_0000).map_err(e)?;
    ops::embedding_f32(&ctx.gpu, &table.view(), &ids.view(), &mut h.view_mut()).map_err(e)?;
    let got = ctx.gpu.download(&h.view()).map_err(e)?;
    let want = reference::embedding(&t_f, dim, &ids_h);
    if got.iter().zip(&want).any(|(a, b)| a.to_bits() != b.to_bits()) {
        return Err("embedding_f32 is not an exact gather".into());
    }
    Ok(())
}

/// `embedding` rejects mismatched shapes and a misaligned table.
/// Part of `textops_reject_bad_shapes`.
pub fn embedding_rejects_bad_shapes(ctx: &mut Ctx) -> Result<(), String> {
    let gpu = &ctx.gpu;
    let mut mem = allocator(ctx, 64 << 20)?;
    let table = dtensor::<bf16>(&mut mem, &[10, 16])?;
    let ids = dtensor::<u32>(&mut mem, &[3])?;
    let mut out4 = dtensor::<bf16>(&mut mem, &[4, 16])?;
    let mut out3 = dtensor::<bf16>(&mut mem, &[3, 16])?;
    expect_shape_error("embedding", ops::embedding(gpu, &table.view(), &ids.view(), &mut out4.view_mut()))?;
    // SAFETY: 9 rows starting 2 bytes into a 10-row table stay inside it; the op rejects the
    // misaligned address before any launch.
    let shifted = unsafe { DView::<bf16>::from_raw(table.view().ptr() + 2, &[9, 16]) };
    expect_shape_error("embedding", ops::embedding(gpu, &shifted, &ids.view(), &mut out3.view_mut()))?;
    Ok(())
}
