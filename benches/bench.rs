//! `jv4-bench`: timings of the engine's pieces on the GPU, printed beside PyTorch's numbers for
//! the same cases when a JSON file from `tools/torch_ops_bench.py` (run in the same device call)
//! is given. Case names are shared with that script: `<op>/<shape>/m=<tokens>`.
//!
//! Method (docs/PERF.md): CUDA events around each run after warm-up, the median of many runs,
//! random inputs (never zeros); weights larger than L2 so that repeated runs do not hit cache.

use std::collections::BTreeMap;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use half::bf16;
use jv4::cuda::{DTensor, DeviceAllocator, Gpu, DEFAULT_PAGE_SIZE};
use jv4::ops::attention::QueryTile;
use jv4::rng::Rng;
use jv4::{ops, Result};

#[derive(Parser)]
#[command(name = "jv4-bench", about = "Benchmarks of jv4 on the GPU, beside PyTorch")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// GEMMs at the decoder's shapes, the elementwise kernels and attention, per op.
    Ops {
        /// JSON written by tools/torch_ops_bench.py in the same device call: {case: ms}.
        #[arg(long)]
        torch_json: Option<std::path::PathBuf>,
        /// Timed runs per case (the median is reported).
        #[arg(long, default_value_t = 50)]
        iters: usize,
    },
}

/// Decoder GEMMs as (name, n, k): q+k+v fused, o, gate+up fused, down.
const GEMMS: &[(&str, usize, usize)] =
    &[("qkv", 2560, 2048), ("o", 2048, 2048), ("gate_up", 22016, 2048), ("down", 2048, 11008)];
const TOKENS: &[usize] = &[16, 512, 4096, 16384];
/// Attention cases as (name, (segments, tokens per segment)).
const ATTENTION: &[(&str, (usize, usize))] =
    &[("L=512", (1, 512)), ("L=4096", (1, 4096)), ("L=32768", (1, 32768)), ("32x512", (32, 512))];

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Ops { torch_json, iters } => bench_ops(torch_json, iters),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Median milliseconds of `iters` timed runs of `f` after 3 warm-up runs.
fn time_ms(gpu: &Gpu, iters: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..3 {
        f()?;
    }
    gpu.sync()?;
    let (start, stop) = (gpu.event()?, gpu.event()?);
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters {
        start
            .record(gpu.stream())
            .map_err(|e| jv4::Error::Cuda { what: "record".into(), msg: format!("{e:?}") })?;
        f()?;
        stop.record(gpu.stream())
            .map_err(|e| jv4::Error::Cuda { what: "record".into(), msg: format!("{e:?}") })?;
        stop.synchronize().map_err(|e| jv4::Error::Cuda { what: "sync".into(), msg: format!("{e:?}") })?;
        times.push(
            start
                .elapsed_ms(&stop)
                .map_err(|e| jv4::Error::Cuda { what: "elapsed".into(), msg: format!("{e:?}") })?
                as f64,
        );
    }
    times.sort_by(|a, b| a.total_cmp(b));
    Ok(times[times.len() / 2])
}

fn random_tensor(
    gpu: &Gpu,
    mem: &mut DeviceAllocator,
    rng: &mut Rng,
    dims: &[usize],
    scale: f32,
) -> Result<DTensor<bf16>> {
    let n: usize = dims.iter().product();
    let host: Vec<bf16> = (0..n).map(|_| bf16::from_f32(rng.normal() * scale)).collect();
    let mut t = DTensor::from_block(mem.alloc((n * 2) as u64)?, dims);
    gpu.upload(&mut t.view_mut(), &host)?;
    Ok(t)
}

fn bench_ops(torch_json: Option<std::path::PathBuf>, iters: usize) -> Result<()> {
    let gpu = Gpu::new(0)?;
    let torch: BTreeMap<String, f64> = match &torch_json {
        Some(p) => match std::fs::read_to_string(p) {
            Ok(text) => serde_json::from_str(&text).unwrap_or_default(),
            Err(_) => BTreeMap::new(),
        },
        None => BTreeMap::new(),
    };
    let mut mem = DeviceAllocator::new(&gpu, 16 << 30, DEFAULT_PAGE_SIZE)?;
    let mut rng = Rng::new(1);
    println!("device: {}", gpu.info().name);
    println!("{:<28} {:>10} {:>14} {:>10} {:>8}", "case", "ours ms", "rate", "torch ms", "ratio");
    let row = |case: String, ms: f64, rate: String| {
        let (t, r) = match torch.get(&case) {
            Some(&t) => (format!("{t:.4}"), format!("{:.2}x", t / ms)),
            None => ("-".into(), "-".into()),
        };
        println!("{case:<28} {ms:>10.4} {rate:>14} {t:>10} {r:>8}");
    };
    for &(name, n, k) in GEMMS {
        let w = random_tensor(&gpu, &mut mem, &mut rng, &[n, k], 1.0 / (k as f32).sqrt())?;
        for &m in TOKENS {
            let x = random_tensor(&gpu, &mut mem, &mut rng, &[m, k], 1.0)?;
            let mut y = DTensor::<bf16>::from_block(mem.alloc((m * n * 2) as u64)?, &[m, n]);
            let ms = time_ms(&gpu, iters, || {
                ops::linear(&gpu, &x.view(), &w.view(), None, &mut y.view_mut(), false)
            })?;
            let tflops = 2.0 * (m * n * k) as f64 / (ms * 1e-3) / 1e12;
            row(format!("linear/{name}/m={m}"), ms, format!("{tflops:.0} TFLOP/s"));
            mem.free(x.into_block());
            mem.free(y.into_block());
        }
        mem.free(w.into_block());
    }
    let inter = 11008;
    for &m in &TOKENS[1..] {
        let gu = random_tensor(&gpu, &mut mem, &mut rng, &[m, 2 * inter], 2.0)?;
        let mut out = DTensor::<bf16>::from_block(mem.alloc((m * inter * 2) as u64)?, &[m, inter]);
        let ms = time_ms(&gpu, iters, || ops::swiglu(&gpu, &gu.view(), &mut out.view_mut()))?;
        let gbs = (m * inter * 6) as f64 / (ms * 1e-3) / 1e9;
        row(format!("swiglu/{inter}/m={m}"), ms, format!("{gbs:.0} GB/s"));
        mem.free(gu.into_block());
        mem.free(out.into_block());
    }
    // Causal GQA attention at the LM's shape (16 query heads, 2 kv heads, d 128) on one document
    // of L tokens, or 32 documents of 512. FLOPs: 2 matmuls · 2·L²·d·H, halved by the mask.
    let (heads, kv_heads, d) = (16usize, 2usize, 128usize);
    for (name, segments) in ATTENTION {
        let segs = vec![segments.1; segments.0];
        let tokens: usize = segs.iter().sum();
        let qkv = random_tensor(&gpu, &mut mem, &mut rng, &[tokens, (heads + 2 * kv_heads) * d], 1.0)?;
        let mut out =
            DTensor::<bf16>::from_block(mem.alloc((tokens * heads * d * 2) as u64)?, &[tokens, heads * d]);
        let cu_h = ops::attention::cu_seqlens(&segs);
        let mut cu = DTensor::<i32>::from_block(mem.alloc((cu_h.len() * 4) as u64)?, &[cu_h.len()]);
        gpu.upload(&mut cu.view_mut(), &cu_h)?;
        let scale = 1.0 / (d as f32).sqrt();
        let flops = segs.iter().map(|&l| 2.0 * 2.0 * (l * l * d * heads) as f64 / 2.0).sum::<f64>();
        let max_seqlen = segments.1;
        // The op's own choice of tiling under the shared case name, then each tiling.
        let tiles = [None, Some(QueryTile::M64), Some(QueryTile::M128)];
        for tile in tiles {
            let t = tile.unwrap_or(QueryTile::for_max_seqlen(max_seqlen));
            #[rustfmt::skip]
            let ms = time_ms(&gpu, iters, || {
                ops::attention::flash_attn_tiled(
                    &gpu, &qkv.view(), &mut out.view_mut(), &cu.view(), max_seqlen, heads, kv_heads, d, true, scale, t,
                )
            })?;
            let case = match tile {
                None => format!("attention/causal/{name}"),
                Some(t) => format!("attention/causal/{name}/{t:?}"),
            };
            row(case, ms, format!("{:.0} TFLOP/s", flops / (ms * 1e-3) / 1e12));
        }
        mem.free(qkv.into_block());
        mem.free(out.into_block());
        mem.free(cu.into_block());
    }
    let s = mem.stats();
    println!(
        "allocator: peak {} MiB, mapped {} MiB, {} growth events",
        s.peak >> 20,
        s.mapped >> 20,
        s.grow_events
    );
    Ok(())
}
