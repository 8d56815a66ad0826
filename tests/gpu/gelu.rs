//! `gelu` (the merger's exact GELU) against the CPU reference, including special values.

use half::bf16;

use crate::check::{check_close, BF16_NAN_BITS, BF16_REL};
use crate::harness::{e, Ctx};
use crate::util::{allocator, dtensor, random_bf16, to_f32, upload, U32};
use jv4::{ops, reference};

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
