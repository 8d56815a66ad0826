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

/// `lora_shrink` (issue 10, deliverable 1): the shrink with its mask fused into one
/// `linear_stream` launch against the unfused pair (cuBLASLt's GEMM, then `lora_mask`) bit for bit,
/// dense and within the folded `[x | t]` buffer (x's columns and the columns past t unchanged),
/// and against the f32 reference: every element, masked ones exactly +0.0, kept ones within one
/// bf16 rounding and the f32 accumulation over k. On the model's four shrink shapes, at m = 1, 7
/// and 16 (the stream path's), rows of every task, one out of range and one without a task; then
/// the dispatching op at m = 16 and 33 (past the stream path: the unfused pair) equal to the pair.
pub fn lora_shrink_equals_unfused_bitwise(ctx: &mut Ctx) -> Result<(), String> {
    use crate::check::{check_close, BF16_NAN_BITS, BF16_REL};
    use crate::util::{random_bf16, U32};
    let stream = ops::linear::stream_built();
    if !stream {
        println!("  not an sm_90a build: only the unfused pair exists (checked against the op below)");
    }
    let mut mem = allocator(ctx, 1 << 30)?;
    let (mut compared, mut worst) = (0usize, 0f32);
    for &(name, parts) in ops::lora::SHRINK_CASES {
        let &(_, n, k) = ops::linear::CASES.iter().find(|c| c.0 == name).ok_or(format!("no case {name}"))?;
        let r = parts * 32;
        let (a_h, a_f) = random_bf16(ctx, n * k, 1.0 / (k as f32).sqrt());
        let a = upload(ctx, &mut mem, &[n, k], &a_h)?;
        for m in [1usize, 7, 16, 33] {
            let what = format!("lora_shrink {name} m={m} n={n} k={k} r={r}");
            let (x_h, x_f) = random_bf16(ctx, m * k, 1.0);
            let mut row_task: Vec<u8> = (0..m).map(|i| (i % 3) as u8).collect();
            if m >= 4 {
                row_task[1] = 3; // out of range: every group zeroed
                row_task[2] = u8::MAX; // no task (a graph's padding row)
            }
            let x = upload(ctx, &mut mem, &[m, k], &x_h)?;
            let tasks = upload(ctx, &mut mem, &[m], &row_task)?;
            let nan = vec![bf16::from_bits(BF16_NAN_BITS); m * n];
            let run = |mem: &mut jv4::cuda::DeviceAllocator, path: u8| -> Result<Vec<u16>, String> {
                let mut t = upload(ctx, mem, &[m, n], &nan)?;
                let (gpu, tv) = (&ctx.gpu, &mut t.view_mut());
                match path {
                    0 => {
                        gpu.blas().linear(&x.view(), &a.view(), None, tv, false).map_err(e)?;
                        ops::lora_mask(gpu, tv, &tasks.view(), r).map_err(e)?;
                    }
                    1 => ops::linear_stream_masked(gpu, &x.view(), &a.view(), tv, &tasks.view(), r)
                        .map_err(e)?,
                    _ => ops::lora_shrink(gpu, &x.view(), &a.view(), tv, &tasks.view(), r).map_err(e)?,
                }
                let got = gpu.download(&t.view()).map_err(e)?.iter().map(|v| v.to_bits()).collect();
                mem.free(t.into_block());
                Ok(got)
            };
            let unfused = run(&mut mem, 0)?;
            // The reference: masked elements +0.0, kept ones x·aᵀ within one bf16 rounding and the
            // accumulation (as linear_stream_matches_reference).
            let (prod, scale) = reference::linear(&x_f, &a_f, None, (m, n, k), None);
            let mut want = prod;
            reference::lora_mask(&mut want, &row_task, r);
            let acc = 8.0 * (k as f32).sqrt() * U32;
            let check = |got: &[u16], how: &str| -> Result<f32, String> {
                for (i, &g) in got.iter().enumerate() {
                    if (i % n) / r != row_task[i / n] as usize && g != 0 {
                        return Err(format!("{what} {how}: masked element {i} is {g:#06x}, not +0.0"));
                    }
                }
                let gf: Vec<f32> = got.iter().map(|&b| bf16::from_bits(b).to_f32()).collect();
                let tol = |i: usize| (BF16_REL + 2.0 * U32) * want[i].abs() + acc * scale[i];
                Ok(check_close(&format!("{what} {how}"), &gf, &want, tol)?.max_tol_ratio)
            };
            worst = worst.max(check(&unfused, "unfused")?);
            let mut paths = vec![(2u8, "op")];
            if stream && m <= ops::linear::SHRINK_STREAM_MAX_M {
                paths.push((1, "fused"));
            }
            for (path, how) in paths {
                let got = run(&mut mem, path)?;
                worst = worst.max(check(&got, how)?);
                check_bits(&format!("{what}: {how} against the unfused pair"), &got, &unfused)?;
                compared += got.len();
            }
            // Within [x | t] (+ 8 columns past t): x and the tail unchanged, t as the dense one.
            if stream && m <= ops::linear::SHRINK_STREAM_MAX_M {
                let ld = k + n + 8;
                let buf_h: Vec<bf16> = (0..m * ld)
                    .map(|i| match i % ld {
                        c if c < k => x_h[(i / ld) * k + c],
                        c if c < k + n => bf16::from_bits(BF16_NAN_BITS),
                        _ => bf16::from_f32(1.5),
                    })
                    .collect();
                let mut outs = Vec::new();
                for fused in [false, true] {
                    let mut xt = upload(ctx, &mut mem, &[m, ld], &buf_h)?;
                    let gpu = &ctx.gpu;
                    if fused {
                        ops::linear_stream_cols_masked(
                            gpu,
                            &mut xt.view_mut(),
                            k,
                            &a.view(),
                            k,
                            &tasks.view(),
                            r,
                            n,
                        )
                        .map_err(e)?;
                    } else {
                        gpu.blas().linear_cols(&mut xt.view_mut(), k, &a.view(), k).map_err(e)?;
                        ops::lora_mask_cols(gpu, &mut xt.view_mut(), k..k + n, &tasks.view(), r)
                            .map_err(e)?;
                    }
                    outs.push(
                        gpu.download(&xt.view())
                            .map_err(e)?
                            .iter()
                            .map(|v| v.to_bits())
                            .collect::<Vec<u16>>(),
                    );
                    mem.free(xt.into_block());
                }
                check_bits(&format!("{what} [x | t]: fused against the unfused pair"), &outs[1], &outs[0])?;
                let window: Vec<u16> =
                    outs[1].chunks_exact(ld).flat_map(|row| row[k..k + n].iter().copied()).collect();
                check_bits(&format!("{what} [x | t]: t against the dense shrink"), &window, &unfused)?;
                for (row, before) in outs[1].chunks_exact(ld).zip(buf_h.chunks_exact(ld)) {
                    let got: Vec<u16> = row[..k].iter().chain(&row[k + n..]).copied().collect();
                    let was: Vec<u16> =
                        before[..k].iter().chain(&before[k + n..]).map(|v| v.to_bits()).collect();
                    check_bits(&format!("{what} [x | t]: outside t"), &got, &was)?;
                }
                compared += outs[1].len();
            }
            mem.free(x.into_block());
            mem.free(tasks.into_block());
        }
        mem.free(a.into_block());
    }
    println!("  lora_shrink: {compared} elements bitwise equal to the unfused pair; worst error / tolerance {worst:.3}");
    Ok(())
}
