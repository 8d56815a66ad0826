//! `linear` and `linear_f32` against the CPU reference at every GEMM shape the model runs
//! (`ops::linear::CASES`), at token counts from one to a full batch; `linear_stream` (the
//! weight-streaming kernel of small batches) against the reference and bit for bit against
//! cuBLASLt.

use half::bf16;

use crate::check::{check_close, BF16_NAN_BITS, BF16_REL};
use crate::harness::{e, Ctx};
use crate::util::{allocator, dtensor, random_bf16, to_f32, upload, F32_NAN_BITS, U32};
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
        ops::linear_f32(&ctx.gpu, &x.view(), &w.view(), None, &mut y.view_mut(), true).map_err(e)?;
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

/// `linear_f32` with its f32 bias, the vision tower's residual adds (`h += x·wᵀ + b` after the
/// attention and the MLP) and its patch embedding (plain, into a fresh f32 stream): at the tower's
/// widths (n 1280; k 1280 for proj, the padded MLP width for down) and patch counts that are not
/// multiples of 16, in the three forms: bias and accumulate together, bias alone, neither. The
/// bias holds bf16 values widened, as the weights prepare it. A fresh y is poisoned with NaN.
pub fn linear_f32_bias_matches_reference(ctx: &mut Ctx) -> Result<(), String> {
    let mut mem = allocator(ctx, 1 << 30)?;
    let down_k = jv4::model::constants::vision_mlp_width(3420);
    let mut worst = 0f32;
    for &(m, n, k) in
        &[(1usize, 1280usize, 1280usize), (37, 1280, down_k), (1021, 1280, 1280), (4099, 1280, down_k)]
    {
        let (x_h, x_f) = random_bf16(ctx, m * k, 1.0);
        let (w_h, w_f) = random_bf16(ctx, n * k, 1.0 / (k as f32).sqrt());
        let b_f = random_bf16(ctx, n, 0.5).1;
        let x = upload(ctx, &mut mem, &[m, k], &x_h)?;
        let w = upload(ctx, &mut mem, &[n, k], &w_h)?;
        let b = upload(ctx, &mut mem, &[n], &b_f)?;
        for (bias, accumulate) in [(true, true), (true, false), (false, false)] {
            let y0: Vec<f32> =
                if accumulate { (0..m * n).map(|_| ctx.rng.normal()).collect() } else { Vec::new() };
            let mut y = dtensor::<f32>(&mut mem, &[m, n])?;
            if accumulate {
                ctx.gpu.upload(&mut y.view_mut(), &y0).map_err(e)?;
            } else {
                ctx.gpu.fill_u32(&mut y.view_mut(), F32_NAN_BITS).map_err(e)?;
            }
            let bv = bias.then(|| b.view());
            ops::linear_f32(&ctx.gpu, &x.view(), &w.view(), bv.as_ref(), &mut y.view_mut(), accumulate)
                .map_err(e)?;
            let got = ctx.gpu.download(&y.view()).map_err(e)?;
            let rows = sample_rows(m, 64);
            let (mut want, mut scale) =
                reference::linear(&x_f, &w_f, bias.then_some(&b_f[..]), (m, n, k), Some(&rows));
            let mut got_rows = Vec::with_capacity(rows.len() * n);
            for (ri, &r) in rows.iter().enumerate() {
                got_rows.extend_from_slice(&got[r * n..(r + 1) * n]);
                if accumulate {
                    for j in 0..n {
                        want[ri * n + j] += y0[r * n + j];
                        scale[ri * n + j] += y0[r * n + j].abs();
                    }
                }
            }
            // No bf16 rounding anywhere: the f32 accumulation (statistical bound, 8x, as in
            // `linear`'s test) and at most two f32 roundings of the epilogue's adds (the old y,
            // the bias), each within U32 of the scale (Σ|x·w| + |y0| + |b|).
            let acc = 8.0 * (k as f32).sqrt() * U32;
            let what = format!("linear_f32 m={m} n={n} k={k} bias={bias} accumulate={accumulate}");
            let s = check_close(&what, &got_rows, &want, |i| (acc + 2.0 * U32) * scale[i])?;
            worst = worst.max(s.max_tol_ratio);
            mem.free(y.into_block());
        }
        for t in [x.into_block(), w.into_block()] {
            mem.free(t);
        }
        mem.free(b.into_block());
    }
    // A bias of the wrong length is a shape error.
    let x = dtensor::<bf16>(&mut mem, &[3, 64])?;
    let w = dtensor::<bf16>(&mut mem, &[32, 64])?;
    let b = dtensor::<f32>(&mut mem, &[31])?;
    let mut y = dtensor::<f32>(&mut mem, &[3, 32])?;
    match ops::linear_f32(&ctx.gpu, &x.view(), &w.view(), Some(&b.view()), &mut y.view_mut(), false) {
        Err(jv4::Error::Shape { op: "linear", .. }) => {}
        other => return Err(format!("a bias [31] for n = 32: expected a linear shape error, got {other:?}")),
    }
    println!("  linear_f32 with bias: worst error / tolerance {worst:.3}");
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
        // bf16 output with bias, and the f32 residual form (accumulating onto a random y0), with
        // an f32 bias where the model has one (the vision tower's proj and down).
        let f32_bias = matches!(name, "vision_proj" | "vision_down");
        let (_, bf_f) = random_bf16(ctx, n, 0.5);
        let mut bf = dtensor::<f32>(&mut mem, &[n])?;
        ctx.gpu.upload(&mut bf.view_mut(), &bf_f).map_err(e)?;
        let bfv = f32_bias.then(|| bf.view());
        let mut y = dtensor::<bf16>(&mut mem, &[m, n])?;
        ops::linear(&ctx.gpu, &x.view(), &w.view(), Some(&b.view()), &mut y.view_mut(), false).map_err(e)?;
        let full = ctx.gpu.download(&y.view()).map_err(e)?;
        let y0: Vec<f32> = random_bf16(ctx, m * n, 1.0).1;
        let mut yf = dtensor::<f32>(&mut mem, &[m, n])?;
        ctx.gpu.upload(&mut yf.view_mut(), &y0).map_err(e)?;
        ops::linear_f32(&ctx.gpu, &x.view(), &w.view(), bfv.as_ref(), &mut yf.view_mut(), true).map_err(e)?;
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
            ops::linear_f32(&ctx.gpu, &xs, &w.view(), bfv.as_ref(), &mut yfs.view_mut(), true).map_err(e)?;
            let got = ctx.gpu.download(&yfs.view()).map_err(e)?;
            let want = &full_f[r.start * n..r.end * n];
            if let Some(i) = (0..got.len()).find(|&i| got[i].to_bits() != want[i].to_bits()) {
                return Err(format!(
                    "linear_f32 {name} n={n} k={k} (bias {f32_bias}): rows {r:?} alone differ from \
                     the same rows in m={m}: element {i}: {} vs {}",
                    got[i], want[i]
                ));
            }
            mem.free(ys.into_block());
            mem.free(yfs.into_block());
        }
        for t in [y.into_block(), x.into_block(), b.into_block(), w.into_block()] {
            mem.free(t);
        }
        mem.free(bf.into_block());
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

/// Token counts the `linear_stream` tests run each shape at: one token, counts inside and across
/// n8 tiles, and `ops::linear::STREAM_MAX_M`.
const STREAM_TOKENS: &[usize] = &[1, 7, 16, 33, 64];

/// The forms the model runs a projection in: plain, with bias (q/k/v), accumulating into a bf16
/// y, accumulating into the f32 residual stream, and `linear_cols` (x the first k columns of a
/// wider buffer, y a column window of the same buffer: the folded LoRA's shrink).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Form {
    Plain,
    Bias,
    Accumulate,
    F32Accumulate,
    Cols,
}

const FORMS: [Form; 5] = [Form::Plain, Form::Bias, Form::Accumulate, Form::F32Accumulate, Form::Cols];

/// The shapes of `ops::linear::CASES` that `linear_stream` takes (k % 16 == 0).
/// `$JV4_STREAM_CASES` (comma-separated case names) keeps only those: the sanitizer runs
/// (tools/gpu_sanitize.sh) take a few small ones.
fn stream_shapes() -> impl Iterator<Item = (&'static str, usize, usize)> {
    let only: Option<Vec<String>> =
        std::env::var("JV4_STREAM_CASES").ok().map(|v| v.split(',').map(|s| s.trim().to_string()).collect());
    ops::linear::CASES
        .iter()
        .copied()
        .filter(|&(_, _, k)| k % 16 == 0)
        .filter(move |&(name, _, _)| only.as_ref().is_none_or(|o| o.iter().any(|s| s == name)))
}

/// One problem's host inputs: x `[m, k]`, the old y (bf16 and f32) for the accumulating forms,
/// and the `linear_cols` buffer `[m, ld]`: x in columns ..k, 8 columns of random bits, the
/// window `y_col..y_col + n` poisoned with NaN.
struct Problem {
    m: usize,
    n: usize,
    k: usize,
    x_h: Vec<bf16>,
    x_f: Vec<f32>,
    y0_h: Vec<bf16>,
    y0_f: Vec<f32>,
    y0_32: Vec<f32>,
    buf: Vec<bf16>,
    ld: usize,
    y_col: usize,
}

impl Problem {
    fn new(ctx: &mut Ctx, m: usize, n: usize, k: usize) -> Problem {
        let (x_h, x_f) = random_bf16(ctx, m * k, 1.0);
        let (y0_h, y0_f) = random_bf16(ctx, m * n, 1.0);
        let y0_32: Vec<f32> = (0..m * n).map(|_| ctx.rng.normal()).collect();
        let (y_col, ld) = (k + 8, k + 8 + n);
        let gap = crate::util::random_bf16_bits(ctx, m * 8);
        let mut buf = Vec::with_capacity(m * ld);
        for r in 0..m {
            buf.extend_from_slice(&x_h[r * k..(r + 1) * k]);
            buf.extend_from_slice(&gap[r * 8..(r + 1) * 8]);
            buf.extend(std::iter::repeat_n(bf16::from_bits(BF16_NAN_BITS), n));
        }
        Problem { m, n, k, x_h, x_f, y0_h, y0_f, y0_32, buf, ld, y_col }
    }
}

/// What one run wrote: y (bf16 or f32), or the whole `linear_cols` buffer.
enum Out {
    Bf16(Vec<bf16>),
    F32(Vec<f32>),
    Cols(Vec<bf16>),
}

/// Runs `form` of problem `p` through `linear_stream` (`stream`) or cuBLASLt directly, on freshly
/// uploaded inputs (outputs poisoned unless accumulating), and downloads what it wrote.
fn run_form(
    ctx: &mut Ctx,
    mem: &mut jv4::cuda::DeviceAllocator,
    stream: bool,
    form: Form,
    w: &jv4::cuda::DTensor<bf16>,
    b: &jv4::cuda::DTensor<bf16>,
    p: &Problem,
) -> Result<Out, String> {
    let (m, n, k) = (p.m, p.n, p.k);
    let gpu = &ctx.gpu;
    let blas = gpu.blas();
    let out = match form {
        Form::Plain | Form::Bias | Form::Accumulate => {
            let x = upload(ctx, mem, &[m, k], &p.x_h)?;
            let mut y = dtensor::<bf16>(mem, &[m, n])?;
            let accumulate = form == Form::Accumulate;
            if accumulate {
                gpu.upload(&mut y.view_mut(), &p.y0_h).map_err(e)?;
            } else {
                gpu.fill_u16(&mut y.view_mut(), BF16_NAN_BITS).map_err(e)?;
            }
            let bias = (form == Form::Bias).then(|| b.view());
            let (xv, wv, mut yv) = (x.view(), w.view(), y.view_mut());
            if stream {
                ops::linear_stream(gpu, &xv, &wv, bias.as_ref(), &mut yv, accumulate)
            } else {
                blas.linear(&xv, &wv, bias.as_ref(), &mut yv, accumulate)
            }
            .map_err(e)?;
            let got = gpu.download(&y.view()).map_err(e)?;
            mem.free(x.into_block());
            mem.free(y.into_block());
            Out::Bf16(got)
        }
        Form::F32Accumulate => {
            let x = upload(ctx, mem, &[m, k], &p.x_h)?;
            let mut y = upload(ctx, mem, &[m, n], &p.y0_32)?;
            let (xv, wv, mut yv) = (x.view(), w.view(), y.view_mut());
            if stream {
                ops::linear_stream_f32(gpu, &xv, &wv, &mut yv, true)
            } else {
                blas.linear_f32(&xv, &wv, None, &mut yv, true)
            }
            .map_err(e)?;
            let got = gpu.download(&y.view()).map_err(e)?;
            mem.free(x.into_block());
            mem.free(y.into_block());
            Out::F32(got)
        }
        Form::Cols => {
            let mut xt = upload(ctx, mem, &[m, p.ld], &p.buf)?;
            let (mut xv, wv) = (xt.view_mut(), w.view());
            if stream {
                ops::linear_stream_cols(gpu, &mut xv, k, &wv, p.y_col)
            } else {
                blas.linear_cols(&mut xv, k, &wv, p.y_col)
            }
            .map_err(e)?;
            let got = gpu.download(&xt.view()).map_err(e)?;
            mem.free(xt.into_block());
            Out::Cols(got)
        }
    };
    Ok(out)
}

/// `linear_stream` (`kernels/linear_stream.cu`) against the CPU reference: every shape of
/// `ops::linear::CASES` it takes, at `STREAM_TOKENS`, in every form; every element checked
/// (outputs poisoned first), and for `linear_cols` every element outside the window bit for bit
/// unchanged. Tolerances as `linear_matches_reference`'s: one bf16 rounding of the output, and for
/// an accumulating bf16 y a second one of the product (the kernel rounds as cuBLASLt does).
pub fn linear_stream_matches_reference(ctx: &mut Ctx) -> Result<(), String> {
    let mut mem = allocator(ctx, 4 << 30)?;
    let mut worst = [0f32; FORMS.len()];
    for (name, n, k) in stream_shapes() {
        let (w_h, w_f) = random_bf16(ctx, n * k, 1.0 / (k as f32).sqrt());
        let w = upload(ctx, &mut mem, &[n, k], &w_h)?;
        let (b_h, b_f) = random_bf16(ctx, n, 0.5);
        let b = upload(ctx, &mut mem, &[n], &b_h)?;
        // f32 accumulation in the kernel's order (k16 steps from 0): the error grows like
        // sqrt(k)·2^-24·Σ|x·w|, allowed 8 times over (as linear_matches_reference).
        let acc = 8.0 * (k as f32).sqrt() * U32;
        for &m in STREAM_TOKENS {
            let p = Problem::new(ctx, m, n, k);
            let (prod, scale) = reference::linear(&p.x_f, &w_f, None, (m, n, k), None);
            for (fi, form) in FORMS.into_iter().enumerate() {
                let what = format!("linear_stream {name} m={m} n={n} k={k} {form:?}");
                // want = x·wᵀ (+ bias) (+ y0); tol from one bf16 rounding (bf16 outputs), the f32
                // adds of the epilogue, and the accumulation over k.
                let add = |i: usize| match form {
                    Form::Bias => b_f[i % n],
                    Form::Accumulate => p.y0_f[i],
                    Form::F32Accumulate => p.y0_32[i],
                    Form::Plain | Form::Cols => 0.0,
                };
                let want: Vec<f32> = (0..m * n).map(|i| prod[i] + add(i)).collect();
                let round = if form == Form::F32Accumulate { 0.0 } else { BF16_REL };
                // An accumulating bf16 y also rounds the product to bf16 before the add (as
                // cuBLASLt does, kernels/linear_stream.cu): one more bf16 rounding, of x·wᵀ.
                let product =
                    |i: usize| if form == Form::Accumulate { BF16_REL * prod[i].abs() } else { 0.0 };
                let tol = |i: usize| {
                    (round + 2.0 * U32) * want[i].abs() + product(i) + acc * (scale[i] + add(i).abs())
                };
                let got = match run_form(ctx, &mut mem, true, form, &w, &b, &p)? {
                    Out::Bf16(y) => to_f32(&y),
                    Out::F32(y) => y,
                    Out::Cols(buf) => {
                        let (ld, c0) = (p.ld, p.y_col);
                        for r in 0..m {
                            let (row, before) = (&buf[r * ld..(r + 1) * ld], &p.buf[r * ld..(r + 1) * ld]);
                            let outside = |v: &[bf16]| -> Vec<u16> {
                                v[..c0].iter().chain(&v[c0 + n..]).map(|x| x.to_bits()).collect()
                            };
                            crate::check::check_bits(
                                &format!("{what}: row {r} outside the window"),
                                &outside(row),
                                &outside(before),
                            )?;
                        }
                        buf.chunks_exact(ld).flat_map(|r| r[c0..c0 + n].iter().map(|v| v.to_f32())).collect()
                    }
                };
                let s = check_close(&what, &got, &want, tol)?;
                worst[fi] = worst[fi].max(s.max_tol_ratio);
            }
        }
        mem.free(w.into_block());
        mem.free(b.into_block());
    }
    let ratios: Vec<String> = FORMS.iter().zip(worst).map(|(f, r)| format!("{f:?} {r:.3}")).collect();
    println!("  linear_stream: worst error / tolerance: {}", ratios.join(", "));
    Ok(())
}

/// Which epilogue cuBLASLt's accumulating bf16 GEMM (`y = bf16(acc + y)`?) computes, from its own
/// f32 accumulator (an f32 GEMM of the same inputs: the same bits, `probe_linear_wgmma_bits`):
/// [elements, mismatches of `bf16(acc + y0)`, mismatches of `bf16(bf16(acc) + y0)`].
fn accumulate_hypotheses(
    ctx: &mut Ctx,
    mem: &mut jv4::cuda::DeviceAllocator,
    w: &jv4::cuda::DTensor<bf16>,
    p: &Problem,
) -> Result<[usize; 3], String> {
    let (m, n, k) = (p.m, p.n, p.k);
    let x = upload(ctx, mem, &[m, k], &p.x_h)?;
    let mut acc = dtensor::<f32>(mem, &[m, n])?;
    ctx.gpu.blas().linear_f32(&x.view(), &w.view(), None, &mut acc.view_mut(), false).map_err(e)?;
    let mut y = dtensor::<bf16>(mem, &[m, n])?;
    ctx.gpu.upload(&mut y.view_mut(), &p.y0_h).map_err(e)?;
    ctx.gpu.blas().linear(&x.view(), &w.view(), None, &mut y.view_mut(), true).map_err(e)?;
    let (acc_h, got) = (ctx.gpu.download(&acc.view()).map_err(e)?, ctx.gpu.download(&y.view()).map_err(e)?);
    for b in [x.into_block(), acc.into_block(), y.into_block()] {
        mem.free(b);
    }
    let (mut h1, mut h2) = (0, 0);
    for i in 0..m * n {
        let one = bf16::from_f32(acc_h[i] + p.y0_f[i]);
        let two = bf16::from_f32(bf16::from_f32(acc_h[i]).to_f32() + p.y0_f[i]);
        h1 += (one.to_bits() != got[i].to_bits()) as usize;
        h2 += (two.to_bits() != got[i].to_bits()) as usize;
    }
    Ok([m * n, h1, h2])
}

/// The hypothesis `linear_stream` rests on (kernels/linear_stream.cu): with one f32 accumulator
/// per output over k in order it gives the same bits as cuBLASLt's unsplit algorithms, so the
/// op may pick either by m and stay batch-invariant. Same shapes, token counts and forms as
/// `linear_stream_matches_reference`, the same random inputs through both; prints per (shape,
/// form) the mismatching elements and the largest difference, and fails on any mismatch. This
/// test decides whether `JV4_LINEAR_STREAM` may be on: it fails on any difference while the stream
/// path is on (by default or `JV4_LINEAR_STREAM=1`), and reports the differences while it is off.
pub fn linear_stream_equals_cublas_bitwise(ctx: &mut Ctx) -> Result<(), String> {
    if !ctx.gpu.blas().invariant() {
        return Err("JV4_BLAS_INVARIANT=0: cuBLAS may split K in this run; nothing to compare with".into());
    }
    let mut mem = allocator(ctx, 4 << 30)?;
    let (mut total, mut elements, mut accumulate_bad) = (0usize, 0usize, 0usize);
    let mut lines = Vec::new();
    let mut hyp: Vec<[usize; 3]> = Vec::new();
    for (name, n, k) in stream_shapes() {
        let (w_h, _) = random_bf16(ctx, n * k, 1.0 / (k as f32).sqrt());
        let w = upload(ctx, &mut mem, &[n, k], &w_h)?;
        let (b_h, _) = random_bf16(ctx, n, 0.5);
        let b = upload(ctx, &mut mem, &[n], &b_h)?;
        let problems: Vec<Problem> = STREAM_TOKENS.iter().map(|&m| Problem::new(ctx, m, n, k)).collect();
        for form in FORMS {
            let (mut bad, mut count, mut max_diff, mut bad_m) = (0usize, 0usize, 0f32, Vec::new());
            for p in &problems {
                let ours = run_form(ctx, &mut mem, true, form, &w, &b, p)?;
                let theirs = run_form(ctx, &mut mem, false, form, &w, &b, p)?;
                // (bits equal, |difference|) per element.
                let pairs: Vec<(bool, f32)> = match (ours, theirs) {
                    (Out::Bf16(a), Out::Bf16(c)) | (Out::Cols(a), Out::Cols(c)) => a
                        .iter()
                        .zip(&c)
                        .map(|(x, y)| (x.to_bits() == y.to_bits(), (x.to_f32() - y.to_f32()).abs()))
                        .collect(),
                    (Out::F32(a), Out::F32(c)) => {
                        a.iter().zip(&c).map(|(x, y)| (x.to_bits() == y.to_bits(), (x - y).abs())).collect()
                    }
                    _ => unreachable!("one form, one output kind"),
                };
                let mismatches = pairs.iter().filter(|(same, _)| !same).count();
                if mismatches > 0 {
                    bad_m.push(p.m);
                }
                if form == Form::Accumulate && mismatches > 0 {
                    hyp.push(accumulate_hypotheses(ctx, &mut mem, &w, p)?);
                }
                bad += mismatches;
                count += pairs.len();
                max_diff = pairs
                    .iter()
                    .fold(max_diff, |d, &(_, v)| if v.is_nan() { f32::INFINITY } else { d.max(v) });
            }
            lines.push(format!(
                "  {name:<16} {form:<14?} {bad:>8} of {count:>9} differ, max |diff| {max_diff:.3e}{}",
                if bad_m.is_empty() { String::new() } else { format!(" (m = {bad_m:?})") }
            ));
            if form == Form::Accumulate {
                accumulate_bad += bad;
            }
            total += bad;
            elements += count;
        }
        mem.free(w.into_block());
        mem.free(b.into_block());
    }
    for l in &lines {
        println!("{l}");
    }
    println!("  linear_stream vs cuBLASLt: {total} of {elements} elements differ (of them in the accumulating bf16 form: {accumulate_bad})");
    let h = hyp.iter().fold([0usize; 3], |a, v| [a[0] + v[0], a[1] + v[1], a[2] + v[2]]);
    if !hyp.is_empty() {
        println!(
            "  cuBLASLt's accumulating bf16 epilogue, of {} elements: bf16(acc + y) differs in {}, \
             bf16(bf16(acc) + y) in {}",
            h[0], h[1], h[2]
        );
    }
    if total > 0 && !ops::linear::stream_enabled() {
        // The engine never mixes the two paths then: the figures are a measurement, not a fault.
        println!("  (the stream path is off, so linear never mixes the two: batch invariance holds)");
        return Ok(());
    }
    if total > 0 {
        return Err(format!(
            "linear_stream and cuBLASLt differ in {total} of {elements} elements: not bitwise equal \
             (turn the stream path's default off, ops::linear::STREAM_DEFAULT)"
        ));
    }
    Ok(())
}

/// `linear_stream` refuses what it does not take (m past the limit, k not a multiple of 16)
/// with its own shape error, and `linear` then runs cuBLAS instead.
pub fn linear_stream_rejects_what_it_does_not_take(ctx: &mut Ctx) -> Result<(), String> {
    let mut mem = allocator(ctx, 64 << 20)?;
    for (m, n, k) in [(ops::linear::STREAM_MAX_M + 1, 64, 64), (4, 64, 40)] {
        let (x_h, _) = random_bf16(ctx, m * k, 1.0);
        let (w_h, _) = random_bf16(ctx, n * k, 0.1);
        let x = upload(ctx, &mut mem, &[m, k], &x_h)?;
        let w = upload(ctx, &mut mem, &[n, k], &w_h)?;
        let mut y = dtensor::<bf16>(&mut mem, &[m, n])?;
        crate::check::expect_shape_error(
            "linear_stream",
            ops::linear_stream(&ctx.gpu, &x.view(), &w.view(), None, &mut y.view_mut(), false),
        )?;
        ops::linear(&ctx.gpu, &x.view(), &w.view(), None, &mut y.view_mut(), false).map_err(e)?;
        mem.free(x.into_block());
        mem.free(w.into_block());
        mem.free(y.into_block());
    }
    Ok(())
}
