//! Kernels and GEMMs against their CPU references, at the model's shapes and at edge sizes.

use half::bf16;

use crate::check::{check_close, BF16_NAN_BITS, BF16_REL};
use crate::harness::{e, Ctx};
use jv4::cuda::{DTensor, DeviceAllocator, KernelId, DEFAULT_PAGE_SIZE, MODULES};
use jv4::{ops, reference};

/// Random bf16 values and their exact f32 images (the reference computes on the latter).
pub fn random_bf16(ctx: &mut Ctx, n: usize, scale: f32) -> (Vec<bf16>, Vec<f32>) {
    let h: Vec<bf16> = (0..n).map(|_| bf16::from_f32(ctx.rng.normal() * scale)).collect();
    let f = h.iter().map(|v| v.to_f32()).collect();
    (h, f)
}

pub fn to_f32(v: &[bf16]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
}

pub fn allocator(ctx: &Ctx, budget: u64) -> Result<DeviceAllocator, String> {
    DeviceAllocator::new(&ctx.gpu, budget, DEFAULT_PAGE_SIZE).map_err(e)
}

fn tensor(a: &mut DeviceAllocator, dims: &[usize]) -> Result<DTensor<bf16>, String> {
    let n: usize = dims.iter().product();
    Ok(DTensor::from_block(a.alloc((n * 2) as u64).map_err(e)?, dims))
}

pub fn kernels_resolve(ctx: &mut Ctx) -> Result<(), String> {
    // Gpu::new resolved every id or failed; here we check the table itself and that no module
    // had to fall back to PTX JIT (the cubin is what should load).
    let info = ctx.gpu.info();
    if !info.ptx_fallbacks.is_empty() {
        return Err(format!("modules loaded from PTX, not cubin: {:?}", info.ptx_fallbacks));
    }
    if KernelId::ALL.is_empty() || MODULES.is_empty() {
        return Err("no kernels compiled".into());
    }
    println!("  {} kernels in {} modules", KernelId::ALL.len(), MODULES.len());
    Ok(())
}

pub fn swiglu_matches_reference(ctx: &mut Ctx) -> Result<(), String> {
    let mut mem = allocator(ctx, 1 << 30)?;
    for &(tokens, inter) in ops::swiglu::CASES {
        let (gu_h, gu_f) = random_bf16(ctx, tokens * 2 * inter, 2.0);
        let mut gu = tensor(&mut mem, &[tokens, 2 * inter])?;
        let mut out = tensor(&mut mem, &[tokens, inter])?;
        ctx.gpu.upload(&mut gu.view_mut(), &gu_h).map_err(e)?;
        ctx.gpu.fill_u16(&mut out.view_mut(), BF16_NAN_BITS).map_err(e)?;
        ops::swiglu(&ctx.gpu, &gu.view(), &mut out.view_mut()).map_err(e)?;
        let got = to_f32(&ctx.gpu.download(&out.view()).map_err(e)?);
        let want = reference::swiglu(&gu_f, tokens, inter);
        // f32 math in both; the kernel's one bf16 rounding is the only real difference.
        check_close(&format!("swiglu T={tokens} I={inter}"), &got, &want, |i| {
            BF16_REL * want[i].abs() + 1e-6
        })?;
        mem.free(gu.into_block());
        mem.free(out.into_block());
    }
    Ok(())
}

pub fn swiglu_rejects_bad_shapes(ctx: &mut Ctx) -> Result<(), String> {
    let mut mem = allocator(ctx, 64 << 20)?;
    let gu = tensor(&mut mem, &[4, 20])?;
    let mut out = tensor(&mut mem, &[4, 11])?;
    match ops::swiglu(&ctx.gpu, &gu.view(), &mut out.view_mut()) {
        Err(jv4::Error::Shape { op: "swiglu", .. }) => Ok(()),
        other => Err(format!("expected a swiglu shape error, got {other:?}")),
    }
}

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
    for (case, &(n, k)) in ops::linear::CASES.iter().enumerate() {
        let (w_h, w_f) = random_bf16(ctx, n * k, 1.0 / (k as f32).sqrt());
        let mut w = tensor(&mut mem, &[n, k])?;
        ctx.gpu.upload(&mut w.view_mut(), &w_h).map_err(e)?;
        let (b_h, b_f) = random_bf16(ctx, n, 0.5);
        let mut b = tensor(&mut mem, &[n])?;
        ctx.gpu.upload(&mut b.view_mut(), &b_h).map_err(e)?;
        for &m in ops::linear::TOKENS {
            // Cycle through the three forms the model uses: plain, with bias (q/k/v), and
            // accumulating into the output (residual adds after o and down).
            let form = (case + m) % 3;
            let (x_h, x_f) = random_bf16(ctx, m * k, 1.0);
            let mut x = tensor(&mut mem, &[m, k])?;
            ctx.gpu.upload(&mut x.view_mut(), &x_h).map_err(e)?;
            let mut y = tensor(&mut mem, &[m, n])?;
            let (y0_h, y0_f) = random_bf16(ctx, m * n, 1.0);
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
            let s = check_close(&format!("linear m={m} n={n} k={k} form={form}"), &got, &want, |i| {
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

pub fn linear_rejects_bad_shapes(ctx: &mut Ctx) -> Result<(), String> {
    let mut mem = allocator(ctx, 64 << 20)?;
    let x = tensor(&mut mem, &[3, 64])?;
    let w = tensor(&mut mem, &[32, 48])?;
    let mut y = tensor(&mut mem, &[3, 32])?;
    match ops::linear(&ctx.gpu, &x.view(), &w.view(), None, &mut y.view_mut(), false) {
        Err(jv4::Error::Shape { op: "linear", .. }) => Ok(()),
        other => Err(format!("expected a linear shape error, got {other:?}")),
    }
}
