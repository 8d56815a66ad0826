//! The column-window forms of the ops the folded LoRA uses (`model::gpu::weights`: the input of
//! qkv, gate_up and down is one buffer `[x | t]`): `rmsnorm_f32_cols` and `swiglu_cols` write x
//! into the first columns, `linear_cols` writes the shrink t beside it, `lora_mask_cols` masks t.
//! Each against its reference on fresh random inputs, the window's elements all checked, and
//! every element outside the window checked bit for bit unchanged (the buffer is filled with
//! random bits first, so a write outside shows).

use half::bf16;

use crate::check::{check_bits, check_close, BF16_REL};
use crate::harness::{e, Ctx};
use crate::util::{allocator, bits, random_bf16, random_bf16_bits, to_f32, upload, U32};
use jv4::{ops, reference};

/// (rows, x columns, t columns, LoRA columns g = tasks·parts·r): the full model's qkv / gate_up /
/// down folds at one token and odd counts; the tiny model's (t padded to a multiple of 8
/// columns past g).
const FOLDS: &[(usize, usize, usize, usize)] = &[
    (1, 2048, 288, 288),
    (7, 2048, 192, 192),
    (129, 11008, 96, 96),
    (333, 2048, 288, 288),
    (5, 256, 40, 36),
    (9, 512, 16, 12),
];

/// The elements of `buf [rows, ld]` outside columns `cols`, as bits.
fn outside(buf: &[bf16], ld: usize, cols: std::ops::Range<usize>) -> Vec<u16> {
    buf.chunks_exact(ld)
        .flat_map(|r| r[..cols.start].iter().chain(&r[cols.end..]))
        .map(|v| v.to_bits())
        .collect()
}

/// Columns `cols` of `buf [rows, ld]`.
fn window(buf: &[f32], ld: usize, cols: std::ops::Range<usize>) -> Vec<f32> {
    buf.chunks_exact(ld).flat_map(|r| r[cols.clone()].iter().copied()).collect()
}

pub fn fold_ops_write_only_their_columns(ctx: &mut Ctx) -> Result<(), String> {
    let mut mem = allocator(ctx, 1 << 30)?;
    for &(rows, k, tw, g) in FOLDS {
        let ld = k + tw;
        let what = format!("T={rows} k={k} t={tw}");
        // rmsnorm_f32_cols: x into columns ..k.
        let before = random_bf16_bits(ctx, rows * ld);
        let x_f: Vec<f32> = (0..rows * k).map(|_| ctx.rng.normal() * 3.0).collect();
        let w_h: Vec<bf16> = (0..k).map(|_| bf16::from_f32(1.0 + 0.5 * ctx.rng.normal())).collect();
        let x = upload(ctx, &mut mem, &[rows, k], &x_f)?;
        let w = upload(ctx, &mut mem, &[k], &w_h)?;
        let mut xt = upload(ctx, &mut mem, &[rows, ld], &before)?;
        ops::rmsnorm_f32_cols(&ctx.gpu, &x.view(), &w.view(), ops::rmsnorm::EPS, &mut xt.view_mut())
            .map_err(e)?;
        let after = ctx.gpu.download(&xt.view()).map_err(e)?;
        check_bits(
            &format!("rmsnorm_f32_cols {what}: outside"),
            &outside(&after, ld, 0..k),
            &outside(&before, ld, 0..k),
        )?;
        let want = reference::rmsnorm(&x_f, &to_f32(&w_h), ops::rmsnorm::EPS);
        check_close(&format!("rmsnorm_f32_cols {what}"), &window(&to_f32(&after), ld, 0..k), &want, |i| {
            (BF16_REL + 64.0 * U32) * want[i].abs() + 1e-12
        })?;

        // swiglu_cols: act into columns ..k (k plays the intermediate width).
        let (gu_h, gu_f) = random_bf16(ctx, rows * 2 * k, 2.0);
        let gu = upload(ctx, &mut mem, &[rows, 2 * k], &gu_h)?;
        let mut at = upload(ctx, &mut mem, &[rows, ld], &before)?;
        ops::swiglu_cols(&ctx.gpu, &gu.view(), &mut at.view_mut()).map_err(e)?;
        let after = ctx.gpu.download(&at.view()).map_err(e)?;
        check_bits(
            &format!("swiglu_cols {what}: outside"),
            &outside(&after, ld, 0..k),
            &outside(&before, ld, 0..k),
        )?;
        let want = reference::swiglu(&gu_f, rows, k);
        check_close(&format!("swiglu_cols {what}"), &window(&to_f32(&after), ld, 0..k), &want, |i| {
            BF16_REL * want[i].abs() + 1e-6
        })?;

        // linear_cols: t = x·Aᵀ into columns k..k + tw, reading columns ..k of the same buffer.
        let (a_h, a_f) = random_bf16(ctx, tw * k, 1.0 / (k as f32).sqrt());
        let a = upload(ctx, &mut mem, &[tw, k], &a_h)?;
        // x of moderate size in columns ..k (random bits of every magnitude would overflow).
        let (xs_h, xs) = random_bf16(ctx, rows * k, 1.0);
        let mut lin_before = before.clone();
        for (row, src) in lin_before.chunks_exact_mut(ld).zip(xs_h.chunks_exact(k)) {
            row[..k].copy_from_slice(src);
        }
        let mut xt = upload(ctx, &mut mem, &[rows, ld], &lin_before)?;
        ops::linear_cols(&ctx.gpu, &mut xt.view_mut(), k, &a.view(), k).map_err(e)?;
        let after = ctx.gpu.download(&xt.view()).map_err(e)?;
        check_bits(
            &format!("linear_cols {what}: outside"),
            &outside(&after, ld, k..ld),
            &outside(&lin_before, ld, k..ld),
        )?;
        let (want, scale) = reference::linear(&xs, &a_f, None, (rows, tw, k), None);
        let acc = 8.0 * (k as f32).sqrt() * U32;
        check_close(&format!("linear_cols {what}"), &window(&to_f32(&after), ld, k..ld), &want, |i| {
            BF16_REL * want[i].abs() + acc * scale[i]
        })?;

        // lora_mask_cols on the g real columns of t (groups of g/3: three tasks).
        let r = g / 3;
        let row_task: Vec<u8> =
            (0..rows).map(|i| if i == 1 { u8::MAX } else { ctx.rng.below(3) as u8 }).collect();
        let tasks = upload(ctx, &mut mem, &[rows], &row_task)?;
        let mut tt = upload(ctx, &mut mem, &[rows, ld], &before)?;
        ops::lora_mask_cols(&ctx.gpu, &mut tt.view_mut(), k..k + g, &tasks.view(), r).map_err(e)?;
        let after = ctx.gpu.download(&tt.view()).map_err(e)?;
        let cols = k..k + g;
        check_bits(
            &format!("lora_mask_cols {what}: outside"),
            &outside(&after, ld, cols.clone()),
            &outside(&before, ld, cols.clone()),
        )?;
        let mut want = window(&to_f32(&before), ld, cols.clone());
        reference::lora_mask(&mut want, &row_task, r);
        let want: Vec<bf16> = want.iter().map(|&v| bf16::from_f32(v)).collect();
        let got: Vec<bf16> =
            after.chunks_exact(ld).flat_map(|row| row[cols.clone()].iter().copied()).collect();
        check_bits(&format!("lora_mask_cols {what}"), &bits(&got), &bits(&want))?;
        for t in [x.into_block(), w.into_block(), xt.into_block(), gu.into_block(), at.into_block()] {
            mem.free(t);
        }
        for t in [a.into_block(), tasks.into_block(), tt.into_block()] {
            mem.free(t);
        }
    }
    // A window that does not fit, and an output window over the input columns, are refused.
    let (xt_h, a_h) = (random_bf16_bits(ctx, 48), random_bf16_bits(ctx, 128));
    let mut xt = upload(ctx, &mut mem, &[2, 24], &xt_h)?;
    let a = upload(ctx, &mut mem, &[8, 16], &a_h)?;
    for (k_in, col) in [(16, 8), (16, 17)] {
        match ops::linear_cols(&ctx.gpu, &mut xt.view_mut(), k_in, &a.view(), col) {
            Err(jv4::Error::Shape { .. }) => {}
            other => {
                return Err(format!(
                    "linear_cols k {k_in} at column {col}: expected a shape error, got {other:?}"
                ))
            }
        }
    }
    Ok(())
}
