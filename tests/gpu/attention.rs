//! `flash_attn` (each kernel: FA2 in both tilings, the Hopper kernel where built) against the f64
//! CPU reference (`reference::attention_rows`) on the model's two attention shapes, over segment
//! mixes with single tokens, empty segments, lengths that are not multiples of the tiles, 5000
//! mixed segments and one 32k document; negative controls that show the tolerance is tight enough
//! to catch a wrong mask, head mapping or segment boundary; and a bitwise check that a segment's
//! output does not depend on the rest of the batch.
//!
//! Tolerance (derived, per element). The kernel computes `out = Σⱼ p̃ⱼ·vⱼ / Σⱼ pⱼ`, where pⱼ are
//! f32 exponentials, p̃ⱼ = bf16(pⱼ) feeds the P·V MMA (as in FlashAttention-2) and the sums are
//! f32. bf16 keeps 8 significant bits, so one rounding moves a value by at most 2⁻⁸ relative:
//! |p̃ⱼ − pⱼ| ≤ 2⁻⁸·pⱼ. With wⱼ = pⱼ / Σp the exact softmax weights:
//!     |out − ref| ≤ 2⁻⁸ · Σⱼ wⱼ·|vⱼ|  (p rounding)  + f32 terms  + 2⁻⁸·|ref|  (output rounding).
//! `Σⱼ wⱼ·|vⱼ|` is itself an attention output, of |v|: the reference computes it exactly
//! (`attention_rows(q, k, |v|)`). We allow twice the p-rounding bound, 2⁻⁷·Σwⱼ|vⱼ|: the second
//! half covers everything f32 (ex2.approx ~2⁻²², the tensor-core and row-sum accumulations,
//! ~√n·2⁻²⁴ in practice and below 2⁻¹⁰ even in the worst case for the 32k-key rows), plus
//! BF16_REL = 2⁻⁸·|ref| for the output rounding. For standard normal v this is about 0.006–0.01
//! in absolute terms, while a wrong key set or head moves an output by the weight of the keys
//! concerned times |v| ≈ 0.1–1: q is drawn with standard deviation Q_STD, so the logits have
//! standard deviation Q_STD and each row's softmax is dominated by a few keys, and any such
//! mistake shows up in some rows one to two orders of magnitude over the tolerance
//! (`attention_tolerance_catches_mistakes` checks this on every run). A line-by-line emulation of
//! the kernel (f64 except the bf16 roundings) reached up to 0.5 of this tolerance on small
//! segments, where a single rounded p dominates a row.

use half::bf16;

use crate::check::{check_close, BF16_NAN_BITS, BF16_REL};
use crate::harness::{e, Ctx};
use jv4::cuda::{DTensor, DeviceAllocator, DEFAULT_PAGE_SIZE};
use jv4::ops::attention::{cu_seqlens, AttnKernel, Case, Sm90Schedule, CASES};
use jv4::{ops, reference};

/// Standard deviation of q (k and v are standard normal): with scale 1/√d the logits have this
/// standard deviation, so the softmax is far from uniform (a few keys carry most weight).
const Q_STD: f32 = 3.0;

/// Tolerance per unit of Σⱼ wⱼ·|vⱼ|: twice the bf16 rounding bound of p, 2·2⁻⁸ (see the
/// module comment).
const P_TOL: f32 = 1.0 / 128.0;

/// What a case produced on the GPU, with the f32 inputs the reference needs.
struct Run {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    cu: Vec<usize>,
    /// The GPU output of each kernel (FA2 in both tilings, and the Hopper kernel where built),
    /// all rows `[T, heads·head_dim]`.
    outs: Vec<(AttnKernel, Vec<f32>)>,
    /// Hopper schedules whose output differs in any bit from the default schedule's.
    schedule_mismatches: Vec<String>,
}

fn normal_bf16(ctx: &mut Ctx, n: usize, std: f32) -> Vec<f32> {
    (0..n).map(|_| bf16::from_f32(ctx.rng.normal() * std).to_f32()).collect()
}

/// Random q, k, v for the case, packed into one qkv tensor the way the fused projection writes
/// it; runs `flash_attn` with each available kernel on a NaN-poisoned output and downloads the
/// results (in `AttnKernel::available()` order).
fn run_case(ctx: &mut Ctx, mem: &mut DeviceAllocator, c: &Case) -> Result<Run, String> {
    let tokens: usize = c.segments.iter().sum();
    let (h, kvh, d) = (c.heads, c.kv_heads, c.head_dim);
    let q = normal_bf16(ctx, tokens * h * d, Q_STD);
    let k = normal_bf16(ctx, tokens * kvh * d, 1.0);
    let v = normal_bf16(ctx, tokens * kvh * d, 1.0);
    let row = (h + 2 * kvh) * d;
    let mut qkv_h = Vec::with_capacity(tokens * row);
    for t in 0..tokens {
        for src in [&q[t * h * d..][..h * d], &k[t * kvh * d..][..kvh * d], &v[t * kvh * d..][..kvh * d]] {
            qkv_h.extend(src.iter().map(|&x| bf16::from_f32(x)));
        }
    }
    let cu_h = cu_seqlens(c.segments);
    let max_seqlen = c.segments.iter().copied().max().unwrap_or(0).max(1);

    let mut qkv =
        DTensor::<bf16>::from_block(mem.alloc((qkv_h.len() * 2) as u64).map_err(e)?, &[tokens, row]);
    let mut out =
        DTensor::<bf16>::from_block(mem.alloc((tokens * h * d * 2) as u64).map_err(e)?, &[tokens, h * d]);
    let mut cu = DTensor::<i32>::from_block(mem.alloc((cu_h.len() * 4) as u64).map_err(e)?, &[cu_h.len()]);
    ctx.gpu.upload(&mut qkv.view_mut(), &qkv_h).map_err(e)?;
    ctx.gpu.upload(&mut cu.view_mut(), &cu_h).map_err(e)?;
    let scale = 1.0 / (d as f32).sqrt();
    let mut outs: Vec<(AttnKernel, Vec<f32>)> = Vec::new();
    for kernel in AttnKernel::available() {
        ctx.gpu.fill_u16(&mut out.view_mut(), BF16_NAN_BITS).map_err(e)?;
        #[rustfmt::skip]
        ops::attention::flash_attn_with(
            &ctx.gpu, &qkv.view(), &mut out.view_mut(), &cu.view(), max_seqlen, h, kvh, d, c.causal, scale, kernel,
        )
        .map_err(e)?;
        outs.push((kernel, ctx.gpu.download(&out.view()).map_err(e)?.iter().map(|x| x.to_f32()).collect()));
    }
    // Every schedule of the Hopper kernel must give the default schedule's bits.
    let mut schedule_mismatches = Vec::new();
    if let Some((_, base)) = outs.iter().find(|(k, _)| *k == AttnKernel::Sm90) {
        for sched in Sm90Schedule::ALL {
            ctx.gpu.fill_u16(&mut out.view_mut(), BF16_NAN_BITS).map_err(e)?;
            #[rustfmt::skip]
            ops::attention::flash_attn_sm90(
                &ctx.gpu, &qkv.view(), &mut out.view_mut(), &cu.view(), max_seqlen, h, kvh, d, c.causal, scale, sched,
            )
            .map_err(e)?;
            let got = ctx.gpu.download(&out.view()).map_err(e)?;
            if let Some(i) = (0..got.len()).find(|&i| got[i].to_f32().to_bits() != base[i].to_bits()) {
                schedule_mismatches.push(format!(
                    "{}: schedule {} differs from the default at element {i}: {} vs {}",
                    c.name,
                    sched.name(),
                    got[i],
                    base[i]
                ));
            }
        }
    }
    mem.free(qkv.into_block());
    mem.free(out.into_block());
    mem.free(cu.into_block());
    Ok(Run { q, k, v, cu: cu_h.iter().map(|&x| x as usize).collect(), outs, schedule_mismatches })
}

/// Query rows to check: all of them, or `n` spread over the batch plus the tile edges around
/// 64 and a few random rows (first and last always included).
fn rows_to_check(ctx: &mut Ctx, tokens: usize, sample: Option<usize>) -> Vec<usize> {
    match sample {
        None => (0..tokens).collect(),
        Some(n) => {
            let mut rows: Vec<usize> = (0..n).map(|i| i * (tokens - 1) / (n - 1).max(1)).collect();
            rows.extend([63, 64, 65, 127, 128].into_iter().filter(|&r| r < tokens));
            rows.extend((0..8).map(|_| ctx.rng.below(tokens)));
            rows.sort_unstable();
            rows.dedup();
            rows
        }
    }
}

/// The rows of `out` listed in `rows`, in that order.
fn gather(out: &[f32], width: usize, rows: &[usize]) -> Vec<f32> {
    rows.iter().flat_map(|&r| out[r * width..(r + 1) * width].iter().copied()).collect()
}

/// Reference output and the per-element tolerance for `rows`, for given inputs (the negative
/// controls pass deliberately wrong ones).
#[allow(clippy::too_many_arguments)]
fn reference_and_tol(
    c: &Case,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    cu: &[usize],
    causal: bool,
    rows: &[usize],
) -> (Vec<f32>, Vec<f32>) {
    let scale = 1.0 / (c.head_dim as f32).sqrt();
    let (h, kvh, d) = (c.heads, c.kv_heads, c.head_dim);
    let want = reference::attention_rows(q, k, v, cu, h, kvh, d, causal, scale, rows);
    let v_abs: Vec<f32> = v.iter().map(|x| x.abs()).collect();
    let weighted_abs = reference::attention_rows(q, k, &v_abs, cu, h, kvh, d, causal, scale, rows);
    let tol = want.iter().zip(&weighted_abs).map(|(w, a)| P_TOL * a + BF16_REL * w.abs()).collect();
    (want, tol)
}

pub fn attention_matches_reference(ctx: &mut Ctx) -> Result<(), String> {
    let mut mem = DeviceAllocator::new(&ctx.gpu, 2 << 30, DEFAULT_PAGE_SIZE).map_err(e)?;
    // Every case and kernel runs; the failures are reported together at the end.
    let mut failures = Vec::new();
    // `$JV4_ATTN_MAX_TOKENS`: skip the larger cases (the sanitizer runs, tools/gpu_sanitize.sh).
    let max_tokens: usize =
        std::env::var("JV4_ATTN_MAX_TOKENS").ok().and_then(|v| v.parse().ok()).unwrap_or(usize::MAX);
    for c in CASES {
        let total: usize = c.segments.iter().sum();
        if total > max_tokens {
            println!("  {}: skipped ({total} tokens, JV4_ATTN_MAX_TOKENS={max_tokens})", c.name);
            continue;
        }
        let run = run_case(ctx, &mut mem, c)?;
        let tokens = *run.cu.last().unwrap();
        let width = c.heads * c.head_dim;
        let rows = rows_to_check(ctx, tokens, c.sample_rows);
        let (want, tol) = reference_and_tol(c, &run.q, &run.k, &run.v, &run.cu, c.causal, &rows);
        for (kernel, out) in &run.outs {
            let got = gather(out, width, &rows);
            let what = format!("flash_attn {} {} ({} of {tokens} rows)", c.name, kernel.name(), rows.len());
            let s = match check_close(&what, &got, &want, |i| tol[i]) {
                Ok(s) => s,
                Err(msg) => {
                    let where_ = bad_pattern(c, &run.cu, &rows, &got, &want, &tol);
                    println!("  FAILED {msg}\n    {where_}");
                    failures.push(msg);
                    continue;
                }
            };
            // Causal: the first token of a segment sees only itself, p = 1 exactly, so its
            // output is its own v row (of its kv head) bit for bit.
            if c.causal {
                let group = c.heads / c.kv_heads;
                'seg: for w in run.cu.windows(2).filter(|w| w[1] > w[0]) {
                    let t = w[0];
                    for hh in 0..c.heads {
                        let o = &out[t * width + hh * c.head_dim..][..c.head_dim];
                        let vv = &run.v[(t * c.kv_heads + hh / group) * c.head_dim..][..c.head_dim];
                        if o != vv {
                            let msg = format!("{what}: token {t} head {hh} is not exactly its v row");
                            println!("  FAILED {msg}");
                            failures.push(msg);
                            break 'seg;
                        }
                    }
                }
            }
            println!("  {what}: max |err| {:.2e}, worst err/tol {:.3}", s.max_abs, s.max_tol_ratio);
        }
        for msg in &run.schedule_mismatches {
            println!("  FAILED {msg}");
            failures.push(msg.clone());
        }
        if AttnKernel::sm90_built() && run.schedule_mismatches.is_empty() {
            println!(
                "  flash_attn {}: all {} sm90 schedules give the same bits",
                c.name,
                Sm90Schedule::ALL.len()
            );
        }
        // flash_attn picks the FA2 tiling from max_seqlen (a property of the batch): both tilings
        // must give the same bits.
        let fa2: Vec<&Vec<f32>> =
            run.outs.iter().filter(|(k, _)| matches!(k, AttnKernel::Fa2(_))).map(|(_, o)| o).collect();
        if let Some(i) = (0..fa2[0].len()).find(|&i| fa2[0][i].to_bits() != fa2[1][i].to_bits()) {
            let msg =
                format!("{}: FA2 tilings differ at element {i}: {} vs {}", c.name, fa2[0][i], fa2[1][i]);
            println!("  FAILED {msg}");
            failures.push(msg);
        }
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(format!("{} failures; first: {}", failures.len(), failures[0]))
    }
}

/// Where the out-of-tolerance elements of a failed comparison lie, as counts per bucket: head-dim
/// column / 8, row within its segment mod 128 / 16 (the query tile), head. A layout mistake
/// shows up as a pattern here.
fn bad_pattern(c: &Case, cu: &[usize], rows: &[usize], got: &[f32], want: &[f32], tol: &[f32]) -> String {
    let (d, width) = (c.head_dim, c.heads * c.head_dim);
    let mut by_col = vec![0usize; d / 8];
    let mut by_row = [0usize; 8];
    let mut by_head = vec![0usize; c.heads];
    let mut nan = 0usize;
    for i in 0..got.len() {
        let err = (got[i] - want[i]).abs();
        if got[i].is_finite() && err <= tol[i] {
            continue;
        }
        nan += usize::from(!got[i].is_finite());
        let r = rows[i / width];
        let seg_start = cu[cu.partition_point(|&x| x <= r) - 1];
        let col = i % width;
        by_col[(col % d) / 8] += 1;
        by_row[((r - seg_start) % 128) / 16] += 1;
        by_head[col / d] += 1;
    }
    format!("bad by col/8 {by_col:?}, by row%128/16 {by_row:?}, by head {by_head:?}, non-finite {nan}")
}

/// The GPU output (bf16 bits) of one kernel on host data: qkv `[T, row]` and segment lengths.
#[allow(clippy::too_many_arguments)]
fn run_bits(
    ctx: &mut Ctx,
    mem: &mut DeviceAllocator,
    qkv_h: &[bf16],
    segments: &[usize],
    (h, kvh, d): (usize, usize, usize),
    causal: bool,
    kernel: AttnKernel,
) -> Result<Vec<u16>, String> {
    let row = (h + 2 * kvh) * d;
    let tokens = qkv_h.len() / row;
    let cu_h = cu_seqlens(segments);
    let max_seqlen = segments.iter().copied().max().unwrap_or(0).max(1);
    let mut qkv =
        DTensor::<bf16>::from_block(mem.alloc((qkv_h.len() * 2) as u64).map_err(e)?, &[tokens, row]);
    let mut out =
        DTensor::<bf16>::from_block(mem.alloc((tokens * h * d * 2) as u64).map_err(e)?, &[tokens, h * d]);
    let mut cu = DTensor::<i32>::from_block(mem.alloc((cu_h.len() * 4) as u64).map_err(e)?, &[cu_h.len()]);
    ctx.gpu.upload(&mut qkv.view_mut(), qkv_h).map_err(e)?;
    ctx.gpu.upload(&mut cu.view_mut(), &cu_h).map_err(e)?;
    ctx.gpu.fill_u16(&mut out.view_mut(), BF16_NAN_BITS).map_err(e)?;
    let scale = 1.0 / (d as f32).sqrt();
    #[rustfmt::skip]
    ops::attention::flash_attn_with(
        &ctx.gpu, &qkv.view(), &mut out.view_mut(), &cu.view(), max_seqlen, h, kvh, d, causal, scale, kernel,
    )
    .map_err(e)?;
    let bits = ctx.gpu.download(&out.view()).map_err(e)?.iter().map(|x| x.to_bits()).collect();
    mem.free(qkv.into_block());
    mem.free(out.into_block());
    mem.free(cu.into_block());
    Ok(bits)
}

/// Batch invariance, bitwise: a segment's output alone (at the end of its own tensor, where the
/// tiles read zeros past it) equals its rows inside a large packed batch (between other
/// segments, where the tiles read their neighbours' rows), for every kernel and both shapes.
pub fn attention_batch_invariant(ctx: &mut Ctx) -> Result<(), String> {
    let mut mem = DeviceAllocator::new(&ctx.gpu, 2 << 30, DEFAULT_PAGE_SIZE).map_err(e)?;
    // (heads, kv heads, head dim), causal, the segment's lengths to test.
    type Shape = ((usize, usize, usize), bool, &'static [usize]);
    let shapes: [Shape; 2] =
        [((16, 2, 128), true, &[300, 1, 64, 129]), ((16, 16, 80), false, &[64, 37, 1000])];
    for ((h, kvh, d), causal, lens) in shapes {
        let row = (h + 2 * kvh) * d;
        for &len in lens {
            // The batch: 40 mixed segments, a 2000-token one, the segment, 37 more tokens.
            let mut segs: Vec<usize> = ops::attention::MIXED_5000[..40].to_vec();
            segs.push(2000);
            let at: usize = segs.iter().sum();
            segs.extend([len, 37]);
            let tokens: usize = segs.iter().sum();
            let qkv_h: Vec<bf16> =
                (0..tokens * row).map(|_| bf16::from_f32(ctx.rng.normal() * 2.0)).collect();
            let alone_h = &qkv_h[at * row..(at + len) * row];
            let width = h * d;
            for kernel in AttnKernel::available() {
                let packed = run_bits(ctx, &mut mem, &qkv_h, &segs, (h, kvh, d), causal, kernel)?;
                let alone = run_bits(ctx, &mut mem, alone_h, &[len], (h, kvh, d), causal, kernel)?;
                let inside = &packed[at * width..(at + len) * width];
                if let Some(i) = (0..alone.len()).find(|&i| alone[i] != inside[i]) {
                    return Err(format!(
                        "d {d} len {len} {}: element {i} (row {}) is {:#06x} alone, {:#06x} in the batch",
                        kernel.name(),
                        i / width,
                        alone[i],
                        inside[i]
                    ));
                }
                if alone.iter().any(|&b| !bf16::from_bits(b).to_f32().is_finite()) {
                    return Err(format!("d {d} len {len} {}: non-finite output", kernel.name()));
                }
            }
            println!("  d {d} len {len}: identical alone and at row {at} of {tokens} (all kernels)");
        }
    }
    Ok(())
}

/// Worst error over tolerance of `got` against a reference; a NaN counts as infinitely far.
fn worst_ratio(got: &[f32], want: &[f32], tol: &[f32]) -> f32 {
    got.iter()
        .zip(want)
        .zip(tol)
        .map(|((g, w), t)| {
            let r = (g - w).abs() / t;
            if r.is_nan() {
                f32::INFINITY
            } else {
                r
            }
        })
        .fold(0.0, f32::max)
}

/// Negative controls: the GPU output of a text case and a vision case, compared with references
/// computed with a deliberate mistake (no causal mask; the other kv head; neighbouring segments
/// merged). Each must miss the tolerance by far (≥ 30×) for the tolerance to mean anything.
pub fn attention_tolerance_catches_mistakes(ctx: &mut Ctx) -> Result<(), String> {
    let mut mem = DeviceAllocator::new(&ctx.gpu, 1 << 30, DEFAULT_PAGE_SIZE).map_err(e)?;
    let picks = [
        CASES.iter().find(|c| c.name == "text [7, 1, 130]").unwrap(),
        CASES.iter().find(|c| c.name == "vision windows [64, 32, 16, 64, 8]").unwrap(),
    ];
    for c in picks {
        let run = run_case(ctx, &mut mem, c)?;
        let tokens = *run.cu.last().unwrap();
        let width = c.heads * c.head_dim;
        let rows: Vec<usize> = (0..tokens).collect();
        let (want, tol) = reference_and_tol(c, &run.q, &run.k, &run.v, &run.cu, c.causal, &rows);

        // Wrong head mapping: query head h reads the kv head after its own.
        let d = c.head_dim;
        let rotate = |x: &[f32]| -> Vec<f32> {
            let mut y = x.to_vec();
            for t in 0..tokens {
                for g in 0..c.kv_heads {
                    let src = (t * c.kv_heads + (g + 1) % c.kv_heads) * d;
                    y[(t * c.kv_heads + g) * d..][..d].copy_from_slice(&x[src..src + d]);
                }
            }
            y
        };
        let (k2, v2) = (rotate(&run.k), rotate(&run.v));
        let mut mistakes =
            vec![("wrong kv head", reference_and_tol(c, &run.q, &k2, &v2, &run.cu, c.causal, &rows))];
        // Wrong mask: causal flipped.
        mistakes.push((
            "causal flipped",
            reference_and_tol(c, &run.q, &run.k, &run.v, &run.cu, !c.causal, &rows),
        ));
        // Wrong segments: the boundaries between the first segments dropped.
        let merged: Vec<usize> = [0].into_iter().chain(run.cu[3..].iter().copied()).collect();
        mistakes.push((
            "segments merged",
            reference_and_tol(c, &run.q, &run.k, &run.v, &merged, c.causal, &rows),
        ));

        for (kernel, out) in &run.outs {
            let kernel = kernel.name();
            let got = gather(out, width, &rows);
            let right = worst_ratio(&got, &want, &tol);
            if right > 1.0 {
                return Err(format!(
                    "{} {kernel}: the right reference is {right:.3}x over tolerance",
                    c.name
                ));
            }
            let mut report = format!("right {right:.3}");
            for (name, (bad_want, bad_tol)) in &mistakes {
                let r = worst_ratio(&got, bad_want, bad_tol);
                report += &format!(", {name} {r:.0}");
                if r < 30.0 {
                    return Err(format!(
                        "{} {kernel}: a reference with '{name}' is only {r:.1}x over tolerance",
                        c.name
                    ));
                }
            }
            println!("  {} {kernel}: worst err/tol: {report}", c.name);
        }
    }
    Ok(())
}

pub fn attention_rejects_bad_shapes(ctx: &mut Ctx) -> Result<(), String> {
    let mut mem = DeviceAllocator::new(&ctx.gpu, 64 << 20, DEFAULT_PAGE_SIZE).map_err(e)?;
    let (t, h, kvh) = (8usize, 4usize, 2usize);
    let mut bf = |dims: &[usize]| -> Result<DTensor<bf16>, String> {
        let n: usize = dims.iter().product();
        Ok(DTensor::from_block(mem.alloc((n * 2) as u64).map_err(e)?, dims))
    };
    let qkv128 = bf(&[t, (h + 2 * kvh) * 128])?;
    let mut out128 = bf(&[t, h * 128])?;
    let qkv64 = bf(&[t, (h + 2 * kvh) * 64])?;
    let mut out64 = bf(&[t, h * 64])?;
    let qkv_short = bf(&[t, (h + 2 * kvh) * 128 - 8])?;
    // cu_seqlens tensors (their contents never matter: every call must fail before launching).
    let cu = bf(&[6])?;
    let cu = DTensor::<i32>::from_block(cu.into_block(), &[3]);
    let cu_one = bf(&[2])?;
    let cu_one = DTensor::<i32>::from_block(cu_one.into_block(), &[1]);
    let gpu = &ctx.gpu;
    let cases: Vec<(&str, jv4::Result<()>)> = vec![
        (
            "head_dim 64",
            ops::flash_attn(gpu, &qkv64.view(), &mut out64.view_mut(), &cu.view(), t, h, kvh, 64, true, 0.1),
        ),
        (
            "qkv too narrow",
            ops::flash_attn(
                gpu,
                &qkv_short.view(),
                &mut out128.view_mut(),
                &cu.view(),
                t,
                h,
                kvh,
                128,
                true,
                0.1,
            ),
        ),
        (
            "heads not a multiple",
            ops::flash_attn(gpu, &qkv128.view(), &mut out128.view_mut(), &cu.view(), t, 3, 2, 128, true, 0.1),
        ),
        (
            "one cu_seqlens entry",
            ops::flash_attn(
                gpu,
                &qkv128.view(),
                &mut out128.view_mut(),
                &cu_one.view(),
                t,
                h,
                kvh,
                128,
                true,
                0.1,
            ),
        ),
        (
            "max_seqlen > T",
            ops::flash_attn(
                gpu,
                &qkv128.view(),
                &mut out128.view_mut(),
                &cu.view(),
                t + 1,
                h,
                kvh,
                128,
                true,
                0.1,
            ),
        ),
        (
            "max_seqlen 0",
            ops::flash_attn(
                gpu,
                &qkv128.view(),
                &mut out128.view_mut(),
                &cu.view(),
                0,
                h,
                kvh,
                128,
                true,
                0.1,
            ),
        ),
        (
            "scale 0",
            ops::flash_attn(
                gpu,
                &qkv128.view(),
                &mut out128.view_mut(),
                &cu.view(),
                t,
                h,
                kvh,
                128,
                true,
                0.0,
            ),
        ),
        (
            "scale NaN",
            ops::flash_attn(
                gpu,
                &qkv128.view(),
                &mut out128.view_mut(),
                &cu.view(),
                t,
                h,
                kvh,
                128,
                true,
                f32::NAN,
            ),
        ),
    ];
    for (name, r) in cases {
        match r {
            Err(jv4::Error::Shape { op: "flash_attn", .. }) => {}
            other => return Err(format!("{name}: expected a flash_attn shape error, got {other:?}")),
        }
    }
    Ok(())
}
