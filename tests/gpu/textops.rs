//! The text path's elementwise and reduction kernels against their CPU references, at the model's
//! shapes and at edge sizes (one token, odd counts, 4097 tokens): embedding, rmsnorm, M-RoPE and
//! the vision rotary, mean pooling with L2, per-token L2, and the LoRA task mask. Outputs are
//! poisoned with NaN before each launch (in-place ops: the untouched part is checked bit for bit)
//! and every element is checked, with a tolerance derived from the dtype and the computation.

use half::bf16;

use crate::check::{check_close, BF16_NAN_BITS, BF16_REL};
use crate::harness::{e, Ctx};
use crate::ops::{allocator, random_bf16, to_f32};
use jv4::cuda::{DTensor, DView, DeviceAllocator};
use jv4::{ops, reference};

/// f32 unit roundoff, 2^-24: the relative error of one f32 rounding.
pub(crate) const U32: f32 = f32::EPSILON / 2.0;

/// NaN in f32: the poison of f32 outputs.
pub(crate) const F32_NAN_BITS: u32 = 0x7FC0_0000;

pub(crate) fn dtensor<T>(mem: &mut DeviceAllocator, dims: &[usize]) -> Result<DTensor<T>, String> {
    let n: usize = dims.iter().product();
    Ok(DTensor::from_block(mem.alloc((n * std::mem::size_of::<T>()).max(1) as u64).map_err(e)?, dims))
}

pub(crate) fn upload<T: Copy>(
    ctx: &Ctx,
    mem: &mut DeviceAllocator,
    dims: &[usize],
    host: &[T],
) -> Result<DTensor<T>, String> {
    let mut t = dtensor(mem, dims)?;
    ctx.gpu.upload(&mut t.view_mut(), host).map_err(e)?;
    Ok(t)
}

/// Random finite bf16 values of every magnitude (random bits; an all-ones exponent, inf or NaN,
/// gets its top exponent bit cleared).
pub(crate) fn random_bf16_bits(ctx: &mut Ctx, n: usize) -> Vec<bf16> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let r = ctx.rng.next_u64();
        for k in 0..4.min(n - out.len()) {
            let mut b = (r >> (16 * k)) as u16;
            if b & 0x7F80 == 0x7F80 {
                b &= !0x4000;
            }
            out.push(bf16::from_bits(b));
        }
    }
    out
}

/// First element where two bit patterns differ, as an error message.
pub(crate) fn check_bits(what: &str, got: &[u16], want: &[u16]) -> Result<(), String> {
    if got.len() != want.len() {
        return Err(format!("{what}: {} values, expected {}", got.len(), want.len()));
    }
    let bad = got.iter().zip(want).filter(|(g, w)| g != w).count();
    match got.iter().zip(want).position(|(g, w)| g != w) {
        None => Ok(()),
        Some(i) => Err(format!(
            "{what}: {bad} of {} elements differ; first at {i}: got {:#06x}, want {:#06x}",
            got.len(),
            got[i],
            want[i]
        )),
    }
}

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
        let mut mem = allocator(ctx, (vocab * dim * 2 + tokens * dim * 2) as u64 + (64 << 20))?;
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
    }
    Ok(())
}

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

/// M-RoPE positions like the model's for a packed batch with images (MODEL.md §7.3): text runs
/// (p, p, p) and image blocks of h'×w' merged tokens at (base, base + r, base + c), the next
/// text position after a block being base + max(h', w'); everything offset by up to 16384.
fn image_like_positions(ctx: &mut Ctx, tokens: usize) -> [Vec<i32>; 3] {
    let mut p: [Vec<i32>; 3] = Default::default();
    let mut next = ctx.rng.below(16384) as i32;
    while p[0].len() < tokens {
        for _ in 0..1 + ctx.rng.below(6) {
            if p[0].len() == tokens {
                break;
            }
            p.iter_mut().for_each(|v| v.push(next));
            next += 1;
        }
        let (hh, ww) = (1 + ctx.rng.below(48), 1 + ctx.rng.below(48));
        let base = next;
        'image: for r in 0..hh {
            for c in 0..ww {
                if p[0].len() == tokens {
                    break 'image;
                }
                p[0].push(base);
                p[1].push(base + r as i32);
                p[2].push(base + c as i32);
            }
        }
        next = base + hh.max(ww) as i32;
    }
    p
}

/// Checks an in-place rotary result: the first `rot_heads` heads of each row of `got` against
/// `want` (the reference op on `input`, [T, row]), within the bf16 rounding plus `angle_err(|φ|)`
/// times the pair's norm (`angles` [T, head_dim/2] the reference's); the rest of each row (v)
/// bit for bit against `input`.
#[allow(clippy::too_many_arguments)]
fn check_rotated(
    what: &str,
    got: &[bf16],
    input: &[bf16],
    want: &[f32],
    tokens: usize,
    row: usize,
    rot_heads: usize,
    head_dim: usize,
    angles: &[f32],
    angle_err: impl Fn(f32) -> f32,
) -> Result<f32, String> {
    let (half, rot) = (head_dim / 2, rot_heads * head_dim);
    let prefix =
        |v: &[f32]| -> Vec<f32> { (0..tokens).flat_map(|t| v[t * row..t * row + rot].to_vec()).collect() };
    let want = prefix(want);
    let got_rot = prefix(&to_f32(got));
    let s = check_close(what, &got_rot, &want, |i| {
        let (t, c) = (i / rot, i % rot);
        let head = t * row + (c / head_dim) * head_dim;
        let j = c % head_dim % half;
        let r = input[head + j].to_f32().hypot(input[head + j + half].to_f32());
        BF16_REL * want[i].abs() + r * angle_err(angles[t * half + j].abs()) + 1e-12
    })?;
    for t in 0..tokens {
        for c in rot..row {
            let (g, w) = (got[t * row + c], input[t * row + c]);
            if g.to_bits() != w.to_bits() {
                return Err(format!("{what}: untouched column {c} of token {t} changed from {w} to {g}"));
            }
        }
    }
    Ok(s.max_tol_ratio)
}

pub fn mrope_matches_reference(ctx: &mut Ctx) -> Result<(), String> {
    let mut worst = 0f32;
    for &(tokens, q_heads, kv_heads, head_dim, section) in ops::rope::CASES {
        let row = (q_heads + 2 * kv_heads) * head_dim;
        let freqs = ops::rope::inv_freq(ops::rope::THETA, head_dim);
        for image_like in [false, true] {
            let pos = if image_like {
                image_like_positions(ctx, tokens)
            } else {
                // Independent random components over the whole range the model reaches.
                [0, 1, 2].map(|_| (0..tokens).map(|_| ctx.rng.below(32768) as i32).collect::<Vec<_>>())
            };
            let (x_h, _) = random_bf16(ctx, tokens * row, 1.0);
            let mut mem = allocator(ctx, 256 << 20)?;
            let mut qkv = upload(ctx, &mut mem, &[tokens, row], &x_h)?;
            let pos_flat: Vec<i32> = pos.concat();
            let pos_d = upload(ctx, &mut mem, &[3, tokens], &pos_flat)?;
            let freq_d = upload(ctx, &mut mem, &[head_dim / 2], &freqs)?;
            ops::mrope(
                &ctx.gpu,
                &mut qkv.view_mut(),
                q_heads,
                kv_heads,
                head_dim,
                &pos_d.view(),
                &freq_d.view(),
                section,
            )
            .map_err(e)?;
            let got = ctx.gpu.download(&qkv.view()).map_err(e)?;
            let sec = section.map(|s| s as usize);
            let mut want = to_f32(&x_h);
            let planes = [&pos[0][..], &pos[1][..], &pos[2][..]];
            reference::mrope(&mut want, tokens, q_heads, kv_heads, head_dim, planes, ops::rope::THETA, sec);
            let angles = reference::mrope_angles(&pos[0], &pos[1], &pos[2], head_dim, ops::rope::THETA, sec);
            // The kernel's angle is fl(p · fl(inv_freq)): within 2·2^-24·|φ| of the exact angle, and
            // the reference's f32 angle within 2^-24·|φ|, so they differ by ≤ 3·2^-24·|φ| (at
            // p = 32767, 6e-3 rad). An angle error δ moves each output by ≤ δ·r (r the pair's norm).
            // sincosf (2 ulp) and the f32 rotation add ≤ ~6·2^-24·r. We allow 4·2^-24·|φ| + 16·2^-24.
            let what = format!(
                "mrope T={tokens} heads={q_heads}+{kv_heads}x{head_dim} {}",
                if image_like { "image-like" } else { "random" }
            );
            worst = worst.max(check_rotated(
                &what,
                &got,
                &x_h,
                &want,
                tokens,
                row,
                q_heads + kv_heads,
                head_dim,
                &angles,
                |phi| U32 * (4.0 * phi + 16.0),
            )?);
        }
    }
    println!("  mrope: worst error / tolerance {worst:.3}");
    Ok(())
}

pub fn vision_rope_matches_reference(ctx: &mut Ctx) -> Result<(), String> {
    let mut worst = 0f32;
    for &(tokens, heads, head_dim) in ops::rope::VISION_CASES {
        let row = 3 * heads * head_dim;
        // Patch (row, col) in the grid of an image up to 1792 px (128 patches) on a side.
        let rot_pos: Vec<[i32; 2]> =
            (0..tokens).map(|_| [ctx.rng.below(128) as i32, ctx.rng.below(128) as i32]).collect();
        let angles = reference::vision_rope_angles(&rot_pos, head_dim, 1e4);
        let (x_h, _) = random_bf16(ctx, tokens * row, 1.0);
        let mut mem = allocator(ctx, 256 << 20)?;
        let mut qkv = upload(ctx, &mut mem, &[tokens, row], &x_h)?;
        let ang_d = upload(ctx, &mut mem, &[tokens, head_dim / 2], &angles)?;
        ops::vision_rope(&ctx.gpu, &mut qkv.view_mut(), heads, head_dim, &ang_d.view()).map_err(e)?;
        let got = ctx.gpu.download(&qkv.view()).map_err(e)?;
        let mut want = to_f32(&x_h);
        reference::vision_rope(&mut want, tokens, heads, head_dim, &angles);
        // The same f32 angles on both sides: only sincosf's 2 ulp and the f32 rotation remain.
        worst = worst.max(check_rotated(
            &format!("vision_rope P={tokens} heads={heads}x{head_dim}"),
            &got,
            &x_h,
            &want,
            tokens,
            row,
            2 * heads,
            head_dim,
            &angles,
            |_| 16.0 * U32,
        )?);
    }
    println!("  vision_rope: worst error / tolerance {worst:.3}");
    Ok(())
}

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

pub fn lora_mask_matches_cpu(ctx: &mut Ctx) -> Result<(), String> {
    for &(tokens, tasks, r) in ops::lora::CASES {
        let cols = tasks * r;
        let t_h = random_bf16_bits(ctx, tokens * cols);
        let mut row_task: Vec<u8> = (0..tokens).map(|_| ctx.rng.below(tasks) as u8).collect();
        if tokens >= 4 {
            // Out-of-range tasks: every group of the row is zeroed.
            row_task[1] = tasks as u8;
            row_task[2] = u8::MAX;
        }
        let mut mem = allocator(ctx, 64 << 20)?;
        let mut t = upload(ctx, &mut mem, &[tokens, cols], &t_h)?;
        let task_d = upload(ctx, &mut mem, &[tokens], &row_task)?;
        ops::lora_mask(&ctx.gpu, &mut t.view_mut(), &task_d.view(), r).map_err(e)?;
        let got: Vec<u16> = ctx.gpu.download(&t.view()).map_err(e)?.iter().map(|v| v.to_bits()).collect();
        // Kept elements round-trip bf16 → f32 → bf16 exactly; masked ones are +0.0.
        let mut want_f = to_f32(&t_h);
        reference::lora_mask(&mut want_f, &row_task, r);
        let want: Vec<u16> = want_f.iter().map(|&v| bf16::from_f32(v).to_bits()).collect();
        check_bits(&format!("lora_mask T={tokens} tasks={tasks} r={r}"), &got, &want)?;
    }
    Ok(())
}

pub fn textops_reject_bad_shapes(ctx: &mut Ctx) -> Result<(), String> {
    fn expect(op: &'static str, r: jv4::Result<()>) -> Result<(), String> {
        match r {
            Err(jv4::Error::Shape { op: got, .. }) if got == op => Ok(()),
            other => Err(format!("expected a {op} shape error, got {other:?}")),
        }
    }
    let gpu = &ctx.gpu;
    let mut mem = allocator(ctx, 64 << 20)?;
    let table = dtensor::<bf16>(&mut mem, &[10, 16])?;
    let ids = dtensor::<u32>(&mut mem, &[3])?;
    let mut out4 = dtensor::<bf16>(&mut mem, &[4, 16])?;
    let mut out3 = dtensor::<bf16>(&mut mem, &[3, 16])?;
    expect("embedding", ops::embedding(gpu, &table.view(), &ids.view(), &mut out4.view_mut()))?;
    // SAFETY: 9 rows starting 2 bytes into a 10-row table stay inside it; the op rejects the
    // misaligned address before any launch.
    let shifted = unsafe { DView::<bf16>::from_raw(table.view().ptr() + 2, &[9, 16]) };
    expect("embedding", ops::embedding(gpu, &shifted, &ids.view(), &mut out3.view_mut()))?;

    let x = dtensor::<bf16>(&mut mem, &[3, 16])?;
    let w = dtensor::<bf16>(&mut mem, &[15])?;
    expect("rmsnorm", ops::rmsnorm(gpu, &x.view(), &w.view(), 1e-6, &mut out3.view_mut()))?;

    let mut qkv = dtensor::<bf16>(&mut mem, &[3, (4 + 2 * 2) * 16])?;
    let pos = dtensor::<i32>(&mut mem, &[3, 3])?;
    let freq = dtensor::<f32>(&mut mem, &[8])?;
    expect("mrope", ops::mrope(gpu, &mut qkv.view_mut(), 4, 2, 16, &pos.view(), &freq.view(), [2, 3, 2]))?;
    expect("mrope", ops::mrope(gpu, &mut qkv.view_mut(), 4, 1, 16, &pos.view(), &freq.view(), [2, 3, 3]))?;
    let pos_t = dtensor::<i32>(&mut mem, &[3, 2])?;
    expect("mrope", ops::mrope(gpu, &mut qkv.view_mut(), 4, 2, 16, &pos_t.view(), &freq.view(), [2, 3, 3]))?;
    let mut vqkv = dtensor::<bf16>(&mut mem, &[3, 3 * 2 * 16])?;
    let angles = dtensor::<f32>(&mut mem, &[3, 7])?;
    expect("vision_rope", ops::vision_rope(gpu, &mut vqkv.view_mut(), 2, 16, &angles.view()))?;
    let angles_ok = dtensor::<f32>(&mut mem, &[3, 8])?;
    expect("vision_rope", ops::vision_rope(gpu, &mut vqkv.view_mut(), 3, 16, &angles_ok.view()))?;

    let spans = dtensor::<u32>(&mut mem, &[2, 3])?;
    let mut pooled = dtensor::<f32>(&mut mem, &[2, 16])?;
    expect("mean_pool_l2", ops::mean_pool_l2(gpu, &x.view(), &spans.view(), &mut pooled.view_mut()))?;
    let mut rows_out = dtensor::<f32>(&mut mem, &[3, 15])?;
    expect("l2_rows", ops::l2_rows(gpu, &x.view(), &mut rows_out.view_mut()))?;

    let mut lt = dtensor::<bf16>(&mut mem, &[3, 96])?;
    let tasks = dtensor::<u8>(&mut mem, &[3])?;
    expect("lora_mask", ops::lora_mask(gpu, &mut lt.view_mut(), &tasks.view(), 36))?;
    let tasks2 = dtensor::<u8>(&mut mem, &[2])?;
    expect("lora_mask", ops::lora_mask(gpu, &mut lt.view_mut(), &tasks2.view(), 32))?;
    Ok(())
}

/// The f32-residual variants the decoder uses: `embedding_f32` (exact), `rmsnorm_f32` (same
/// tolerance as `rmsnorm`), and `linear_f32` accumulating into f32 (no output rounding: only the
/// f32 accumulation error of `linear`'s test remains).
pub fn residual_f32_ops_match_reference(ctx: &mut Ctx) -> Result<(), String> {
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
    // rmsnorm_f32 on an f32 input that is not bf16-representable.
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
