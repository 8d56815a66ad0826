//! `mrope` and `vision_rope` against the CPU reference, in place on the fused qkv rows: the
//! rotated q and k heads within the bf16 rounding and the angle error, v untouched bit for bit.

use half::bf16;

use crate::check::{check_close, expect_shape_error, BF16_REL};
use crate::harness::{e, Ctx};
use crate::util::{allocator, dtensor, random_bf16, to_f32, upload, U32};
use jv4::{ops, reference};

/// M-RoPE positions like the model's for a packed batch with images (docs/MODEL.md §7.3): text runs
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

/// `mrope` and `vision_rope` reject bad sections, head counts, positions and angles.
/// Part of `textops_reject_bad_shapes`.
pub fn rope_rejects_bad_shapes(ctx: &mut Ctx) -> Result<(), String> {
    let gpu = &ctx.gpu;
    let mut mem = allocator(ctx, 64 << 20)?;
    let mut qkv = dtensor::<bf16>(&mut mem, &[3, (4 + 2 * 2) * 16])?;
    let pos = dtensor::<i32>(&mut mem, &[3, 3])?;
    let freq = dtensor::<f32>(&mut mem, &[8])?;
    expect_shape_error(
        "mrope",
        ops::mrope(gpu, &mut qkv.view_mut(), 4, 2, 16, &pos.view(), &freq.view(), [2, 3, 2]),
    )?;
    expect_shape_error(
        "mrope",
        ops::mrope(gpu, &mut qkv.view_mut(), 4, 1, 16, &pos.view(), &freq.view(), [2, 3, 3]),
    )?;
    let pos_t = dtensor::<i32>(&mut mem, &[3, 2])?;
    expect_shape_error(
        "mrope",
        ops::mrope(gpu, &mut qkv.view_mut(), 4, 2, 16, &pos_t.view(), &freq.view(), [2, 3, 3]),
    )?;
    let mut vqkv = dtensor::<bf16>(&mut mem, &[3, 3 * 2 * 16])?;
    let angles = dtensor::<f32>(&mut mem, &[3, 7])?;
    expect_shape_error("vision_rope", ops::vision_rope(gpu, &mut vqkv.view_mut(), 2, 16, &angles.view()))?;
    let angles_ok = dtensor::<f32>(&mut mem, &[3, 8])?;
    expect_shape_error("vision_rope", ops::vision_rope(gpu, &mut vqkv.view_mut(), 3, 16, &angles_ok.view()))?;
    Ok(())
}
