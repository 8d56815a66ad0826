//! `lora_mask` against the CPU reference: bit for bit, out-of-range tasks fully masked.

use half::bf16;

use crate::check::{check_bits, expect_shape_error};
use crate::harness::{e, Ctx};
use crate::util::{allocator, dtensor, random_bf16_bits, to_f32, upload};
use jv4::{ops, reference};

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

/// `lora_mask` rejects a rank that does not divide the columns and a short task list.
/// Part of `textops_reject_bad_shapes`.
pub fn lora_rejects_bad_shapes(ctx: &mut Ctx) -> Result<(), String> {
    let gpu = &ctx.gpu;
    let mut mem = allocator(ctx, 64 << 20)?;
    let mut lt = dtensor::<bf16>(&mut mem, &[3, 96])?;
    let tasks = dtensor::<u8>(&mut mem, &[3])?;
    expect_shape_error("lora_mask", ops::lora_mask(gpu, &mut lt.view_mut(), &tasks.view(), 36))?;
    let tasks2 = dtensor::<u8>(&mut mem, &[2])?;
    expect_shape_error("lora_mask", ops::lora_mask(gpu, &mut lt.view_mut(), &tasks2.view(), 32))?;
    Ok(())
}
