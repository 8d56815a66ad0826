//! Where cuBLASLt reads (issue 12, deliverable 7: initcheck reported uninitialised reads inside
//! cuBLAS gemv kernels during the model tests). Each operand of a GEMM sits at the start of a
//! block of whole pages, as the arena and the weight buffer place tensors, and the rest of the
//! block (its tail) is filled with NaN in one run and zeros in the other: the outputs must be the
//! same bit for bit and match the reference, so whatever cuBLASLt reads past an operand cannot
//! change a result. `y` is NaN before a `beta = 0` GEMM, so C is not used either.
//!
//! Under compute-sanitizer initcheck (tools/gpu_sanitize.sh), `JV4_PROBE_UNWRITTEN=x,w,bias,y`
//! leaves the named operands' tails unwritten instead: a report then means cuBLASLt reads past
//! that operand's end; a report with every tail written means it reads memory of its own (the
//! workspace). The shapes are the model's GEMMs at 1 to 17 rows (gemv and small-tile kernels),
//! tiny and full size, with bias, accumulation and f32 output as the model runs them.

use half::bf16;

use crate::check::{check_close, BF16_NAN_BITS, BF16_REL};
use crate::harness::{e, Ctx};
use crate::util::{allocator, random_bf16, to_f32, F32_NAN_BITS};
use jv4::cuda::{DTensor, DeviceAllocator, DEFAULT_PAGE_SIZE};
use jv4::{ops, reference};

/// (name, n, k, bias, accumulate, f32 output).
const SHAPES: &[(&str, usize, usize, bool, bool, bool)] = &[
    ("tiny qkv", 512, 256, true, false, false),
    ("tiny o", 256, 256, false, true, true),
    ("tiny gate_up", 1024, 256, false, false, false),
    ("tiny down", 256, 512, false, true, true),
    ("tiny projector", 128, 256, false, false, false),
    ("tiny lora shrink qkv", 36, 256, false, false, false),
    ("tiny lora shrink o", 12, 256, false, false, false),
    ("tiny lora expand qkv", 512, 36, false, true, false),
    ("tiny lora expand o", 256, 12, false, true, true),
    ("full qkv", 2560, 2048, true, false, false),
    ("full down", 2048, 11008, false, true, true),
    ("full lora expand o", 2048, 96, false, true, true),
    ("vision down", 1280, 3456, true, true, false),
];

const ROWS: &[usize] = &[1, 2, 3, 17];

/// A block of whole pages holding `rows × cols` elements of `T` at its start, its tail filled
/// with `tail` (2- or 4-byte pattern), or left unwritten when `tail` is `None`.
fn placed<T: Copy>(
    ctx: &Ctx,
    mem: &mut DeviceAllocator,
    rows: usize,
    cols: usize,
    tail: Option<u32>,
) -> Result<DTensor<T>, String> {
    let size = std::mem::size_of::<T>();
    let bytes = ((rows * cols * size) as u64).div_ceil(DEFAULT_PAGE_SIZE).max(1) * DEFAULT_PAGE_SIZE;
    let block = mem.alloc(bytes).map_err(e)?;
    let block = match tail {
        Some(bits) if size == 2 => {
            let mut all = DTensor::<u16>::from_block(block, &[bytes as usize / 2]);
            ctx.gpu.fill_u16(&mut all.view_mut(), bits as u16).map_err(e)?;
            all.into_block()
        }
        Some(bits) => {
            let mut all = DTensor::<u32>::from_block(block, &[bytes as usize / 4]);
            ctx.gpu.fill_u32(&mut all.view_mut(), bits).map_err(e)?;
            all.into_block()
        }
        None => block,
    };
    Ok(DTensor::from_block(block, &[bytes as usize / (cols * size), cols]))
}

/// The operands whose tails `$JV4_PROBE_UNWRITTEN` leaves unwritten.
fn unwritten() -> Vec<String> {
    std::env::var("JV4_PROBE_UNWRITTEN")
        .unwrap_or_default()
        .split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// One GEMM with every operand placed at the start of its pages, the tails as `tail` says (per
/// operand: `None` leaves it unwritten); the output's first `m` rows, widened.
#[allow(clippy::too_many_arguments)]
fn run(
    ctx: &Ctx,
    mem: &mut DeviceAllocator,
    (m, n, k): (usize, usize, usize),
    (bias, accumulate, out_f32): (bool, bool, bool),
    host: (&[bf16], &[bf16], &[bf16], &[bf16]),
    tail: impl Fn(&str, bool) -> Option<u32>,
) -> Result<Vec<f32>, String> {
    let (x_h, w_h, b_h, y0_h) = host;
    let mut x = placed::<bf16>(ctx, mem, m, k, tail("x", false))?;
    let mut w = placed::<bf16>(ctx, mem, n, k, tail("w", false))?;
    let mut b = placed::<bf16>(ctx, mem, 1, n, tail("bias", false))?;
    ctx.gpu.upload(&mut x.view_mut().rows_mut(0..m), x_h).map_err(e)?;
    ctx.gpu.upload(&mut w.view_mut().rows_mut(0..n), w_h).map_err(e)?;
    ctx.gpu.upload(&mut b.view_mut().rows_mut(0..1).reshape(&[n]), b_h).map_err(e)?;
    let (xv, wv) = (x.view().rows(0..m), w.view().rows(0..n));
    let bv = b.view().rows(0..1).reshape(&[n]);
    let out = if out_f32 {
        let mut y = placed::<f32>(ctx, mem, m, n, tail("y", true))?;
        let mut yv = y.view_mut();
        let mut ym = yv.rows_mut(0..m);
        if accumulate {
            let y0: Vec<f32> = y0_h.iter().map(|v| v.to_f32()).collect();
            ctx.gpu.upload(&mut ym, &y0).map_err(e)?;
        } else {
            ctx.gpu.fill_u32(&mut ym, F32_NAN_BITS).map_err(e)?;
        }
        ops::linear_f32(&ctx.gpu, &xv, &wv, None, &mut ym, accumulate).map_err(e)?;
        let got = ctx.gpu.download(&ym.as_view()).map_err(e)?;
        mem.free(y.into_block());
        got
    } else {
        let mut y = placed::<bf16>(ctx, mem, m, n, tail("y", false))?;
        let mut yv = y.view_mut();
        let mut ym = yv.rows_mut(0..m);
        if accumulate {
            ctx.gpu.upload(&mut ym, y0_h).map_err(e)?;
        } else {
            ctx.gpu.fill_u16(&mut ym, BF16_NAN_BITS).map_err(e)?;
        }
        ops::linear(&ctx.gpu, &xv, &wv, bias.then_some(&bv), &mut ym, accumulate).map_err(e)?;
        let got = to_f32(&ctx.gpu.download(&ym.as_view()).map_err(e)?);
        mem.free(y.into_block());
        got
    };
    for t in [x, w, b] {
        mem.free(t.into_block());
    }
    Ok(out)
}

pub fn linear_ignores_bytes_past_its_operands(ctx: &mut Ctx) -> Result<(), String> {
    let mut mem = allocator(ctx, 2 << 30)?;
    let left = unwritten();
    if !left.is_empty() {
        println!("  tails left unwritten (initcheck probe): {left:?}");
    }
    for &(name, n, k, bias, accumulate, out_f32) in SHAPES {
        let (w_h, w_f) = random_bf16(ctx, n * k, 1.0 / (k as f32).sqrt());
        let (b_h, b_f) = random_bf16(ctx, n, 0.5);
        for &m in ROWS {
            let (x_h, x_f) = random_bf16(ctx, m * k, 1.0);
            let (y0_h, y0_f) = random_bf16(ctx, m * n, 1.0);
            let host = (&x_h[..], &w_h[..], &b_h[..], &y0_h[..]);
            let form = (bias, accumulate, out_f32);
            let pattern = |nan: bool, f32_out: bool| match (nan, f32_out) {
                (true, true) => F32_NAN_BITS,
                (true, false) => BF16_NAN_BITS as u32,
                (false, _) => 0,
            };
            let with = |nan: bool| {
                let left = left.clone();
                move |op: &str, f32_out: bool| (!left.iter().any(|l| l == op)).then(|| pattern(nan, f32_out))
            };
            let a = run(ctx, &mut mem, (m, n, k), form, host, with(true))?;
            let b = run(ctx, &mut mem, (m, n, k), form, host, with(false))?;
            let what = format!("{name} m={m} n={n} k={k}");
            if let Some(i) = (0..a.len()).find(|&i| a[i].to_bits() != b[i].to_bits()) {
                return Err(format!(
                    "{what}: element {i} is {} with NaN tails, {} with zero tails",
                    a[i], b[i]
                ));
            }
            let (mut want, mut scale) =
                reference::linear(&x_f, &w_f, bias.then_some(&b_f[..]), (m, n, k), None);
            if accumulate {
                for (i, v) in want.iter_mut().enumerate() {
                    *v += y0_f[i];
                    scale[i] += y0_f[i].abs();
                }
            }
            let acc = 8.0 * (k as f32).sqrt() * f32::EPSILON / 2.0;
            // One bf16 rounding of the output, and of the product before an epilogue add.
            let out_rel = if out_f32 { f32::EPSILON } else { BF16_REL };
            let epilogue = if bias || accumulate { BF16_REL } else { 0.0 };
            check_close(&what, &a, &want, |i| out_rel * want[i].abs() + (acc + epilogue) * scale[i])?;
        }
    }
    let s = mem.stats();
    if s.live_allocations != 0 {
        return Err(format!("blocks left behind: {s:?}"));
    }
    Ok(())
}

/// A GEMM's output read by one of our kernels (`y = x·wᵀ`, then `swiglu` over y), at the heights
/// where cuBLASLt picks gemv, small-tile and Hopper (TMA-store) kernels. The values are checked
/// against the reference, so y was written; under initcheck, a report here says the tool does not
/// see the GEMM's writes (its reports on the model's activations are then false positives).
pub fn probe_gemm_output_read_by_a_kernel(ctx: &mut Ctx) -> Result<(), String> {
    let mut mem = allocator(ctx, 1 << 30)?;
    let (n, k) = (2 * 1024, 2048);
    let (w_h, _) = random_bf16(ctx, n * k, 1.0 / (k as f32).sqrt());
    let w = crate::util::upload(ctx, &mut mem, &[n, k], &w_h)?;
    // $JV4_PROBE_M: one height only (the sanitize stage runs each under initcheck on its own).
    let heights: Vec<usize> = match std::env::var("JV4_PROBE_M") {
        Ok(v) => vec![v.trim().parse().map_err(|_| format!("JV4_PROBE_M={v:?}: expected a row count"))?],
        Err(_) => vec![1, 16, 512, 4096],
    };
    for m in heights {
        let (x_h, _) = random_bf16(ctx, m * k, 1.0);
        let x = crate::util::upload(ctx, &mut mem, &[m, k], &x_h)?;
        let mut y = crate::util::dtensor::<bf16>(&mut mem, &[m, n])?;
        let mut out = crate::util::dtensor::<bf16>(&mut mem, &[m, n / 2])?;
        ops::linear(&ctx.gpu, &x.view(), &w.view(), None, &mut y.view_mut(), false).map_err(e)?;
        ops::swiglu(&ctx.gpu, &y.view(), &mut out.view_mut()).map_err(e)?;
        let yv = to_f32(&ctx.gpu.download(&y.view()).map_err(e)?);
        let got = to_f32(&ctx.gpu.download(&out.view()).map_err(e)?);
        let want = reference::swiglu(&yv, m, n / 2);
        check_close(&format!("swiglu of a GEMM's output, m={m}"), &got, &want, |i| {
            BF16_REL * want[i].abs() + 1e-6
        })?;
        for b in [x.into_block(), y.into_block(), out.into_block()] {
            mem.free(b);
        }
    }
    Ok(())
}

/// Does initcheck see writes made inside a CUDA graph? `$JV4_PROBE_GRAPH`: `1` (default) `y =
/// gelu(x)` runs as a graph; `memset`: y is filled with 0.75 by a graph's memset node; `0`: the
/// first gelu runs eagerly (the control). Then `out =
/// gelu(y)` runs eagerly and reads y; the values are checked against the reference of the y that
/// was downloaded, so y was written. Under initcheck, reports in the second gelu in one mode and
/// none in the control say that the tool misses that kind of write.
pub fn probe_graph_writes_read_eagerly(ctx: &mut Ctx) -> Result<(), String> {
    let mut mem = allocator(ctx, 64 << 20)?;
    let n = 1 << 16;
    let (x_h, _) = random_bf16(ctx, n, 2.0);
    let x = crate::util::upload(ctx, &mut mem, &[n], &x_h)?;
    let mut y = crate::util::dtensor::<bf16>(&mut mem, &[n])?;
    let mut out = crate::util::dtensor::<bf16>(&mut mem, &[n])?;
    let mode = std::env::var("JV4_PROBE_GRAPH").unwrap_or_else(|_| "1".into());
    match mode.trim() {
        "1" => {
            let (g, ()) = ctx.gpu.capture(|| ops::gelu(&ctx.gpu, &x.view(), &mut y.view_mut())).map_err(e)?;
            g.launch().map_err(e)?;
        }
        "memset" => {
            // y's value from the memset only: out = gelu(memset value) everywhere.
            let (g, ()) = ctx
                .gpu
                .capture(|| ctx.gpu.fill_u16(&mut y.view_mut(), bf16::from_f32(0.75).to_bits()))
                .map_err(e)?;
            g.launch().map_err(e)?;
        }
        "0" => ops::gelu(&ctx.gpu, &x.view(), &mut y.view_mut()).map_err(e)?,
        other => return Err(format!("JV4_PROBE_GRAPH={other:?}: expected 1, memset or 0")),
    }
    ops::gelu(&ctx.gpu, &y.view(), &mut out.view_mut()).map_err(e)?;
    let mid = to_f32(&ctx.gpu.download(&y.view()).map_err(e)?);
    let got = to_f32(&ctx.gpu.download(&out.view()).map_err(e)?);
    let want = reference::gelu(&mid);
    check_close(&format!("gelu of a graph's output ({mode})"), &got, &want, |i| {
        BF16_REL * want[i].abs() + 1e-6
    })?;
    if mode.trim() == "memset" && mid.iter().any(|&v| v != 0.75) {
        return Err("the memset node did not fill y".into());
    }
    for b in [x.into_block(), y.into_block(), out.into_block()] {
        mem.free(b);
    }
    Ok(())
}

/// initcheck on graphs of several nodes, as the graphed forward has them (issue 12, the open
/// graph case): per height n in 16 then 64, from one pool at the same base address, a graph of
/// `h = embedding_f32(ids)` then `out = rmsnorm_f32(h)` is captured and launched, and out is
/// checked. Every row of h is written by the graph's first node before its second reads it;
/// initcheck reports in rmsnorm here reproduce the forward's reports with two kernels.
pub fn probe_graph_chain_embedding_rmsnorm(ctx: &mut Ctx) -> Result<(), String> {
    let (vocab, d, eps) = (512usize, 256usize, 1e-6f32);
    let mut mem = allocator(ctx, 64 << 20)?;
    let (table_h, table_f) = random_bf16(ctx, vocab * d, 1.0);
    let table = crate::util::upload(ctx, &mut mem, &[vocab, d], &table_h)?;
    let (w_h, w_f) = random_bf16(ctx, d, 1.0);
    let w = crate::util::upload(ctx, &mut mem, &[d], &w_h)?;
    for n in [16usize, 64] {
        let ids_h: Vec<u32> = (0..n).map(|_| ctx.rng.below(vocab) as u32).collect();
        let ids = crate::util::upload(ctx, &mut mem, &[n], &ids_h)?;
        let mut h = crate::util::dtensor::<f32>(&mut mem, &[n, d])?;
        let mut out = crate::util::dtensor::<bf16>(&mut mem, &[n, d])?;
        let (g, ()) = ctx
            .gpu
            .capture(|| {
                ops::embedding_f32(&ctx.gpu, &table.view(), &ids.view(), &mut h.view_mut())?;
                ops::rmsnorm_f32(&ctx.gpu, &h.view(), &w.view(), eps, &mut out.view_mut())
            })
            .map_err(e)?;
        g.launch().map_err(e)?;
        let got = to_f32(&ctx.gpu.download(&out.view()).map_err(e)?);
        let want = reference::rmsnorm(&reference::embedding(&table_f, d, &ids_h), &w_f, eps);
        check_close(&format!("rmsnorm of a graph's embedding, n={n}"), &got, &want, |i| {
            BF16_REL * want[i].abs() + 1e-6
        })?;
        drop(g);
        // Freed in reverse, so the next height starts at the same base address.
        for b in [out.into_block(), h.into_block(), ids.into_block()] {
            mem.free(b);
        }
    }
    Ok(())
}

/// initcheck on graphs as the graphed forward holds them (issue 12, the open graph case; the
/// two-kernel probe above gives 0 reports): several graphs alive at once, each captured from an
/// arena of one shared pool that starts from empty (so every height allocates from the same base
/// address), inputs staged into the pool by `Arena::upload` outside the graph, and a chain like a
/// decoder layer's with cuBLASLt nodes in it: `h = embedding_f32(ids)`, `x = rmsnorm_f32(h)`,
/// `y = x·w1ᵀ` (GEMM), `h += y·w2ᵀ` (f32 GEMM, accumulating), `out = rmsnorm_f32(h)`. Heights
/// 16, 64, 16, 64: the later ones replay held graphs on new ids. Every replay's `out` must be
/// bitwise the eager run's of the same ids (another allocator). Under initcheck (with
/// `JV4_SANITIZE_MARK_GEMM=1`), reports here and none in the probes above locate the forward's
/// reports in what this graph adds: GEMM nodes, held graphs, a shared pool. `$JV4_PROBE_LAYERS`
/// (default 1) repeats the layer (rmsnorm, GEMM, accumulating GEMM) that many times: the model's
/// reports come only from the first launch of each new graph (docs/RELIABILITY.md), whose graphs
/// have hundreds of nodes; 36 layers give this one about as many.
pub fn probe_graph_pool_forward_like(ctx: &mut Ctx) -> Result<(), String> {
    let layers: usize =
        std::env::var("JV4_PROBE_LAYERS").ok().and_then(|v| v.trim().parse().ok()).unwrap_or(1).max(1);
    use jv4::cuda::{BufferLayout, Graph};
    let (vocab, d, d2, eps) = (512usize, 256usize, 512usize, 1e-6f32);
    let mut weights = allocator(ctx, 64 << 20)?;
    let (table_h, _) = random_bf16(ctx, vocab * d, 1.0);
    let table = crate::util::upload(ctx, &mut weights, &[vocab, d], &table_h)?;
    let (nw_h, _) = random_bf16(ctx, d, 1.0);
    let nw = crate::util::upload(ctx, &mut weights, &[d], &nw_h)?;
    let (w1_h, _) = random_bf16(ctx, d2 * d, 0.06);
    let w1 = crate::util::upload(ctx, &mut weights, &[d2, d], &w1_h)?;
    let (w2_h, _) = random_bf16(ctx, d * d2, 0.04);
    let w2 = crate::util::upload(ctx, &mut weights, &[d, d2], &w2_h)?;
    let mut pool = allocator(ctx, 64 << 20)?;
    let mut eager_mem = allocator(ctx, 64 << 20)?;
    let gpu = &ctx.gpu;
    // The chain on `ids`, every activation from `arena`; returns out's address.
    let chain =
        |arena: &jv4::cuda::Arena<'_>, ids: &jv4::cuda::DView<'_, u32>, n: usize| -> jv4::Result<u64> {
            let mut h = arena.alloc::<f32>(&[n, d])?;
            let mut x = arena.alloc::<bf16>(&[n, d])?;
            let mut y = arena.alloc::<bf16>(&[n, d2])?;
            let mut out = arena.alloc::<bf16>(&[n, d])?;
            ops::embedding_f32(gpu, &table.view(), ids, &mut h.view_mut())?;
            for _ in 0..layers {
                ops::rmsnorm_f32(gpu, &h.view(), &nw.view(), eps, &mut x.view_mut())?;
                ops::linear(gpu, &x.view(), &w1.view(), None, &mut y.view_mut(), false)?;
                ops::linear_f32(gpu, &y.view(), &w2.view(), None, &mut h.view_mut(), true)?;
            }
            ops::rmsnorm_f32(gpu, &h.view(), &nw.view(), eps, &mut out.view_mut())?;
            Ok(out.view().ptr())
        };
    let mut held: Vec<(usize, Graph, u64, u64)> = Vec::new(); // (n, graph, ids at, out at)
    for (round, n) in [16usize, 64, 16, 64].into_iter().enumerate() {
        let ids_h: Vec<u32> = (0..n).map(|_| ctx.rng.below(vocab) as u32).collect();
        let mut lay = BufferLayout::new(256);
        let ids_r = lay.push::<u32>(&[n]);
        // Eager, from its own allocator.
        let want = {
            let arena = eager_mem.arena();
            let st = arena.upload(gpu, &lay, |w| w.put(&ids_r, &ids_h)).map_err(e)?;
            let out = chain(&arena, &st.view(&ids_r), n).map_err(e)?;
            // SAFETY: `out` is the arena's [n, d] bf16 tensor, alive until the arena drops below.
            let v = unsafe { jv4::cuda::DView::<bf16>::from_raw(out, &[n, d]) };
            gpu.download(&v).map_err(e)?
        };
        let arena = pool.arena();
        let st = arena.upload(gpu, &lay, |w| w.put(&ids_r, &ids_h)).map_err(e)?;
        if !held.iter().any(|g| g.0 == n) {
            let ids_v = st.view(&ids_r);
            let (g, out) = gpu.capture(|| chain(&arena, &ids_v, n)).map_err(e)?;
            held.push((n, g, st.ptr(), out));
        }
        let (_, g, ids_at, out) = held.iter().find(|g| g.0 == n).unwrap();
        if *ids_at != st.ptr() {
            return Err(format!(
                "round {round}: inputs staged at {:#x}, the graph reads {ids_at:#x}",
                st.ptr()
            ));
        }
        g.launch().map_err(e)?;
        // SAFETY: the graph's out lies in the pool at the address it was captured with; the
        // arena holds nothing else there until it drops after this download.
        let v = unsafe { jv4::cuda::DView::<bf16>::from_raw(*out, &[n, d]) };
        let got = gpu.download(&v).map_err(e)?;
        if got.iter().zip(&want).any(|(a, b)| a.to_bits() != b.to_bits()) || got.len() != want.len() {
            return Err(format!("round {round}, n={n}: the graph's out differs from the eager run"));
        }
        if got.iter().all(|v| v.to_bits() == got[0].to_bits()) || got.iter().any(|v| !v.to_f32().is_finite())
        {
            return Err(format!("round {round}, n={n}: out is constant or not finite"));
        }
    }
    Ok(())
}

/// Does a wgmma GEMM in k order give cuBLASLt's bits? (issue 10, deliverable 2; the question
/// `ops::linear_wgmma` exists for.) On the decoder's shapes at m = 1, 16, 64 and 200, f32 outputs
/// of the probe kernel in both operand roles against cuBLASLt's unsplit algorithm (the engine's
/// plans), element by element: the counts of differing bits are printed, the finding. The test
/// fails only if a probe output is wrong (checked against the f64 reference on sampled rows, every
/// element of them), so that a mismatch of bits cannot come from a broken kernel.
pub fn probe_linear_wgmma_bits(ctx: &mut Ctx) -> Result<(), String> {
    use jv4::ops::linear_wgmma::{linear_wgmma, linear_wgmma_built, WgmmaRoles};
    if !linear_wgmma_built() {
        println!("  not an sm_90a build: nothing to probe");
        return Ok(());
    }
    let mut mem = allocator(ctx, 1 << 30)?;
    let shapes = [("o", 2048usize, 2048usize), ("qkv", 2560, 2048), ("down", 2048, 11008)];
    for (name, n, k) in shapes {
        let (w_h, w_f) = random_bf16(ctx, n * k, 1.0 / (k as f32).sqrt());
        let w = crate::util::upload(ctx, &mut mem, &[n, k], &w_h)?;
        let mut line = format!("  {name} {n}x{k}:");
        for m in [1usize, 16, 64, 200] {
            let (x_h, x_f) = random_bf16(ctx, m * k, 1.0);
            let x = crate::util::upload(ctx, &mut mem, &[m, k], &x_h)?;
            let mut yc = crate::util::dtensor::<f32>(&mut mem, &[m, n])?;
            ctx.gpu.blas().linear_f32(&x.view(), &w.view(), None, &mut yc.view_mut(), false).map_err(e)?;
            let cub = ctx.gpu.download(&yc.view()).map_err(e)?;
            let rows: Vec<usize> = if m <= 16 { (0..m).collect() } else { vec![0, 1, m / 2, m - 2, m - 1] };
            let (want, scale) = reference::linear(&x_f, &w_f, None, (m, n, k), Some(&rows));
            let acc = 8.0 * (k as f32).sqrt() * f32::EPSILON / 2.0;
            for roles in [WgmmaRoles::TokensAsM, WgmmaRoles::FeaturesAsM] {
                let mut y = crate::util::dtensor::<f32>(&mut mem, &[m, n])?;
                ctx.gpu.fill_u32(&mut y.view_mut(), F32_NAN_BITS).map_err(e)?;
                linear_wgmma(&ctx.gpu, &x.view(), &w.view(), &mut y.view_mut(), roles).map_err(e)?;
                let got = ctx.gpu.download(&y.view()).map_err(e)?;
                let sampled: Vec<f32> =
                    rows.iter().flat_map(|&r| got[r * n..(r + 1) * n].iter().copied()).collect();
                check_close(&format!("linear_wgmma {roles:?} {name} m={m}"), &sampled, &want, |i| {
                    acc * scale[i] + 1e-30
                })?;
                let differ = got.iter().zip(&cub).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
                let tag = if roles == WgmmaRoles::TokensAsM { "tok" } else { "feat" };
                line += &format!(" m={m} {tag} {differ}/{}", got.len());
                mem.free(y.into_block());
            }
            mem.free(yc.into_block());
            mem.free(x.into_block());
        }
        println!("{line} (elements whose f32 bits differ from cuBLASLt's)");
        mem.free(w.into_block());
    }
    Ok(())
}
