//! `swiglu` against its CPU reference, at the text and vision MLP widths and at edge sizes.

use half::bf16;

use crate::check::{check_close, BF16_NAN_BITS, BF16_REL};
use crate::harness::{e, Ctx};
use crate::util::{allocator, dtensor, random_bf16, to_f32};
use jv4::{ops, reference};

pub fn swiglu_matches_reference(ctx: &mut Ctx) -> Result<(), String> {
    let mut mem = allocator(ctx, 1 << 30)?;
    for &(tokens, inter) in ops::swiglu::CASES {
        let (gu_h, gu_f) = random_bf16(ctx, tokens * 2 * inter, 2.0);
        let mut gu = dtensor::<bf16>(&mut mem, &[tokens, 2 * inter])?;
        let mut out = dtensor::<bf16>(&mut mem, &[tokens, inter])?;
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
    let gu = dtensor::<bf16>(&mut mem, &[4, 20])?;
    let mut out = dtensor::<bf16>(&mut mem, &[4, 11])?;
    match ops::swiglu(&ctx.gpu, &gu.view(), &mut out.view_mut()) {
        Err(jv4::Error::Shape { op: "swiglu", .. }) => Ok(()),
        other => Err(format!("expected a swiglu shape error, got {other:?}")),
    }
}
