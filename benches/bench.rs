//! `jv4-bench`: timings of the engine's pieces on the GPU, printed beside PyTorch's numbers for
//! the same cases when a JSON file from `tools/torch_ops_bench.py` (run in the same device call)
//! is given. The op cases come from the ops' `CASES` tables (the shapes the GPU tests check);
//! `jv4-bench ops --list-cases` prints them, and the script times exactly those, under the same
//! names: `<op>/<shape>/m=<tokens>`.
//!
//! Method (docs/PERF.md): CUDA events around each run after warm-up, the median of many runs,
//! random inputs (never zeros); weights larger than L2 so that repeated runs do not hit cache.

use std::collections::BTreeMap;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use half::bf16;
use jv4::cuda::{DTensor, DeviceAllocator, Gpu, DEFAULT_PAGE_SIZE};
use jv4::ops::attention::{AttnKernel, QueryTile, Sm90Schedule};
use jv4::reference::cosine as cos;
use jv4::rng::Rng;
use jv4::{ops, Result};
use serde::Serialize;

mod load;
mod serve_load;
mod soak;

#[derive(Parser)]
#[command(name = "jv4-bench", about = "Benchmarks of jv4 on the GPU, beside PyTorch")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Every op at the shapes of its `CASES` table (the shapes the GPU tests check; GEMMs at
    /// `linear::BENCH_TOKENS`), then attention.
    Ops {
        /// JSON written by tools/torch_ops_bench.py in the same device call: {case: ms}.
        #[arg(long)]
        torch_json: Option<std::path::PathBuf>,
        /// Timed runs per case (the median is reported).
        #[arg(long, default_value_t = 50)]
        iters: usize,
        /// Print the cases as JSON (name, op and shape; what tools/torch_ops_bench.py times)
        /// and exit without a GPU.
        #[arg(long)]
        list_cases: bool,
        /// Only the cases whose name contains this (and no attention section).
        #[arg(long)]
        only: Option<String>,
    },
    /// Attention alone (the attention cases of `ops`): each kernel beside torch SDPA's flash and
    /// cuDNN backends.
    Attention {
        /// JSON written by `tools/torch_ops_bench.py --only attention` in the same device call.
        #[arg(long)]
        torch_json: Option<std::path::PathBuf>,
        /// Timed runs per case (the median is reported).
        #[arg(long, default_value_t = 30)]
        iters: usize,
    },
    /// The text path end to end on a checkpoint: tokens/s on 256 documents of 16–1024 tokens,
    /// 32×512, 2×8192, 1×32768; latency of one 16-token query; peak device memory.
    Text {
        /// A checkpoint folder (e.g. `jv4 synth --preset full`).
        #[arg(long)]
        model: std::path::PathBuf,
        /// JSON written by tools/torch_text_bench.py in the same device call.
        #[arg(long)]
        torch_json: Option<std::path::PathBuf>,
        /// Most tokens per forward (documents are packed up to it).
        #[arg(long, default_value_t = 16384)]
        max_batch_tokens: usize,
        /// Timed repetitions per workload (median reported; the query runs 20).
        #[arg(long, default_value_t = 3)]
        iters: usize,
    },
    /// The whole engine (`Engine::embed`: preparation, the worker, packing, results back) on
    /// the text workloads as pre-tokenized requests, one caller; then 16-token queries from many
    /// concurrent callers (requests/s, p50/p99 latency). Compare with `text` (bare forwards).
    Engine {
        /// A model folder with tokenizer.json (e.g. `jv4 synth --preset full`).
        #[arg(long)]
        model: std::path::PathBuf,
        /// Most tokens per forward.
        #[arg(long, default_value_t = 16384)]
        max_batch_tokens: usize,
        /// Concurrent callers for the query run.
        #[arg(long, default_value_t = 64)]
        callers: usize,
    },
    /// Load on a running `jv4 serve` (loopback): 16-token queries at each concurrency level
    /// (requests/s, p50/p99 latency), then the `docs256` mix of `text` as concurrent
    /// single-document requests (tokens/s). `tools/serve_bench.sh` starts the server and runs it.
    ServeLoad {
        /// The server, e.g. http://127.0.0.1:8080.
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        url: String,
        /// API key, when the server wants one (default $JV4_API_KEY).
        #[arg(long)]
        api_key: Option<String>,
        /// Concurrency levels of the query run.
        #[arg(long, value_delimiter = ',', default_value = "1,16,64,256")]
        concurrency: Vec<usize>,
        /// Seconds per concurrency level at most.
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        /// Requests per concurrency level at most.
        #[arg(long, default_value_t = 50000)]
        max_requests: usize,
        /// Documents of the docs256 mix to send (its first N; all 256 by default).
        #[arg(long, default_value_t = 256)]
        docs: usize,
        /// Repetitions of the documents run (the median is reported).
        #[arg(long, default_value_t = 3)]
        reps: usize,
    },
    /// Parity of the text path against `tools/reference.py texts` output (PyTorch bf16, same
    /// checkpoint): per text the single-vector cosine, the multi-vector mean per-token cosine, and
    /// the error against the distance between different texts' embeddings.
    Parity {
        /// The checkpoint folder the reference used.
        #[arg(long)]
        model: std::path::PathBuf,
        /// The reference file.
        #[arg(long)]
        reference: std::path::PathBuf,
    },
    /// Images end to end against `tools/reference.py images` (same checkpoint, same call): per
    /// image the single-vector cosine, the multi-vector mean per-token cosine, the latency beside
    /// PyTorch's; then images/s for the default-cap images packed in one forward.
    Images {
        /// The checkpoint folder the reference used.
        #[arg(long)]
        model: std::path::PathBuf,
        /// The reference file.
        #[arg(long)]
        reference: std::path::PathBuf,
    },
    /// Research for batch-invariant GEMMs: per decoder weight shape, the heuristic's candidate
    /// algorithms at several heights, each timed at every height, with a hash of the first 16
    /// output rows (equal hashes: bit-for-bit the same rows).
    BlasSurvey,
    /// Many mixed requests (texts of 1 token to --max-text-tokens, images, bad lines of several
    /// kinds, every task and output) through one engine from several caller threads: every
    /// request answered exactly once with the result or error kind it must get, and device memory
    /// and host RSS flat after the warm-up (benches/soak.rs). Exits non-zero on any problem.
    Soak(soak::SoakOptions),
    /// Where the checkpoint load's time goes: page-cache reads (pageable, pinned), DMA, the
    /// staging pipeline, and DMA from registered page-cache pages, at several thread counts
    /// (benches/load.rs).
    Load(load::LoadOptions),
}

/// Attention cases: the LM's causal d 128 GQA 16:2 on single documents, 32 × 512 and the 256
/// documents of the text bench; the ViT's non-causal d 80 16:16 on the 64-patch windows of a
/// 4096- and a 9216-patch image, and full attention over those images. Names are shared with
/// tools/torch_ops_bench.py (`attention/<name>`).
/// (name, (heads, kv heads, head dim), causal, segment lengths).
type AttentionCase = (String, (usize, usize, usize), bool, Vec<usize>);

fn attention_cases() -> Vec<AttentionCase> {
    let text = (16, 2, 128);
    let vision = (16, 16, 80);
    let mut v: Vec<AttentionCase> = Vec::new();
    for l in [512, 2048, 4096, 8192, 16384, 32768] {
        v.push((format!("causal/L={l}"), text, true, vec![l]));
    }
    v.push(("causal/32x512".into(), text, true, vec![512; 32]));
    v.push(("causal/docs256".into(), text, true, (0..256).map(|i| 16 + (i * 7919) % 1009).collect()));
    for n in [4096, 9216] {
        v.push((format!("vision/win64/{n}"), vision, false, vec![64; n / 64]));
    }
    for n in [4096, 9216] {
        v.push((format!("vision/full/{n}"), vision, false, vec![n]));
    }
    v
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // As the jv4 binary does (the soak measures the host RSS): jv4::host_malloc.
    jv4::host_malloc::fix_mmap_threshold();
    let result = match cli.cmd {
        Cmd::Ops { torch_json, iters, list_cases, only } => bench_ops(torch_json, iters, list_cases, only),
        Cmd::Attention { torch_json, iters } => (|| {
            let gpu = Gpu::new(0)?;
            let torch = read_torch_json(&torch_json);
            let mut mem = DeviceAllocator::new(&gpu, 16 << 30, DEFAULT_PAGE_SIZE)?;
            println!("device: {}", gpu.info().name);
            bench_attention(&gpu, &mut mem, &mut Rng::new(1), &torch, iters)
        })(),
        Cmd::Text { model, torch_json, max_batch_tokens, iters } => {
            bench_text(&model, torch_json, max_batch_tokens, iters)
        }
        Cmd::Engine { model, max_batch_tokens, callers } => bench_engine(&model, max_batch_tokens, callers),
        Cmd::ServeLoad { url, api_key, concurrency, seconds, max_requests, docs, reps } => {
            let api_key = api_key.or_else(|| std::env::var("JV4_API_KEY").ok()).filter(|k| !k.is_empty());
            let o = serve_load::LoadOptions { url, api_key, concurrency, seconds, max_requests, docs, reps };
            serve_load::run(&o, &text_workloads()[0].1)
        }
        Cmd::Parity { model, reference } => parity(&model, &reference),
        Cmd::Images { model, reference } => bench_images(&model, &reference),
        Cmd::BlasSurvey => blas_survey(),
        Cmd::Soak(o) => soak::run(&o),
        Cmd::Load(o) => load::run(&o),
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

/// The median milliseconds of one call of `f`, timed as a CUDA graph of `GRAPH_REPS` calls
/// (captured once after a warm-up call outside the capture, which makes any plan or attribute):
/// for ops whose host cost per call is near their GPU time, where [`time_ms`] measures the host.
fn time_ms_graphed(gpu: &Gpu, iters: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    const GRAPH_REPS: usize = 20;
    f()?;
    gpu.sync()?;
    let (graph, ()) = gpu.capture(|| (0..GRAPH_REPS).try_for_each(|_| f()))?;
    let ms = time_ms(gpu, iters, || graph.launch())?;
    Ok(ms / GRAPH_REPS as f64)
}

/// A bf16 tensor of uniform random values with standard deviation `scale` (never zeros; uniform
/// rather than normal so that filling gigabytes of GEMM inputs takes a second, not a minute).
fn random_tensor(
    gpu: &Gpu,
    mem: &mut DeviceAllocator,
    rng: &mut Rng,
    dims: &[usize],
    scale: f32,
) -> Result<DTensor<bf16>> {
    let n: usize = dims.iter().product();
    // 16 random bits per value, mapped to [-√3, √3)·scale.
    let step = 2.0 * 3f32.sqrt() * scale / 65536.0;
    let mut host = Vec::with_capacity(n + 3);
    while host.len() < n {
        let r = rng.next_u64();
        for k in 0..4 {
            let u = (r >> (16 * k)) as u16 as f32;
            host.push(bf16::from_f32((u - 32767.5) * step));
        }
    }
    host.truncate(n);
    let mut t = DTensor::from_block(mem.alloc((n * 2) as u64)?, dims);
    gpu.upload(&mut t.view_mut(), &host)?;
    Ok(t)
}

/// A device tensor holding `host`.
fn tensor_of<T: Copy>(
    gpu: &Gpu,
    mem: &mut DeviceAllocator,
    dims: &[usize],
    host: &[T],
) -> Result<DTensor<T>> {
    let mut t = empty::<T>(mem, dims)?;
    gpu.upload(&mut t.view_mut(), host)?;
    Ok(t)
}

/// An uninitialised device tensor (an output).
fn empty<T>(mem: &mut DeviceAllocator, dims: &[usize]) -> Result<DTensor<T>> {
    let n: usize = dims.iter().product();
    Ok(DTensor::from_block(mem.alloc((n * std::mem::size_of::<T>()).max(1) as u64)?, dims))
}

/// One timed case of `jv4-bench ops`, built from an op family's `CASES` table. `--list-cases`
/// prints them (with their names) for tools/torch_ops_bench.py, which times the PyTorch
/// equivalent under the same name.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum OpCase {
    Linear { name: &'static str, m: usize, n: usize, k: usize },
    LinearStream { name: &'static str, m: usize, n: usize, k: usize },
    LoraShrink { name: &'static str, m: usize, n: usize, k: usize, r: usize },
    Swiglu { tokens: usize, inter: usize },
    Gelu { n: usize },
    Embedding { vocab: usize, dim: usize, tokens: usize },
    Rmsnorm { tokens: usize, dim: usize },
    Mrope { tokens: usize, q_heads: usize, kv_heads: usize, head_dim: usize, section: [u32; 3] },
    VisionRope { patches: usize, heads: usize, head_dim: usize },
    MeanPoolL2 { tokens: usize, dim: usize, spans: &'static [usize] },
    L2Rows { tokens: usize, dim: usize },
    LoraMask { tokens: usize, tasks: usize, r: usize },
    GatherRows { rows: usize, len: usize },
    ScatterRowsF32 { rows: usize, n: usize, len: usize },
}

impl OpCase {
    /// `<op>/<shape>/m=<tokens>`: the name the bench and tools/torch_ops_bench.py share.
    fn name(&self) -> String {
        use OpCase::*;
        match *self {
            Linear { name, m, .. } => format!("linear/{name}/m={m}"),
            LinearStream { name, m, .. } => format!("linear_stream/{name}/m={m}"),
            LoraShrink { name, m, .. } => format!("lora_shrink/{name}/m={m}"),
            Swiglu { tokens, inter } => format!("swiglu/{inter}/m={tokens}"),
            Gelu { n } => format!("gelu/n={n}"),
            Embedding { vocab, dim, tokens } => format!("embedding/{vocab}x{dim}/m={tokens}"),
            Rmsnorm { tokens, dim } => format!("rmsnorm/{dim}/m={tokens}"),
            Mrope { tokens, q_heads, kv_heads, head_dim, .. } => {
                format!("mrope/{}/m={tokens}", (q_heads + 2 * kv_heads) * head_dim)
            }
            VisionRope { patches, heads, head_dim } => {
                format!("vision_rope/{}/m={patches}", 3 * heads * head_dim)
            }
            MeanPoolL2 { tokens, dim, spans } => format!("mean_pool_l2/{dim}/m={tokens}/b={}", spans.len()),
            L2Rows { tokens, dim } => format!("l2_rows/{dim}/m={tokens}"),
            LoraMask { tokens, tasks, r } => format!("lora_mask/{tasks}x{r}/m={tokens}"),
            GatherRows { rows, len } => format!("gather_rows/{len}/m={rows}"),
            ScatterRowsF32 { rows, n, len } => format!("scatter_rows_f32/{len}/m={n}/r={rows}"),
        }
    }
}

/// Every case of every op family's `CASES` table (GEMMs at each of `linear::BENCH_TOKENS`).
fn op_cases() -> Vec<OpCase> {
    use OpCase::*;
    let mut v = Vec::new();
    for &(name, n, k) in ops::linear::CASES {
        v.extend(ops::linear::BENCH_TOKENS.iter().map(|&m| Linear { name, m, n, k }));
    }
    for &(name, n, k) in ops::linear::CASES.iter().filter(|c| ops::linear::STREAM_BENCH_SHAPES.contains(&c.0))
    {
        v.extend(ops::linear::STREAM_BENCH_TOKENS.iter().map(|&m| LinearStream { name, m, n, k }));
    }
    for &(name, parts) in ops::lora::SHRINK_CASES {
        if let Some(&(_, n, k)) = ops::linear::CASES.iter().find(|c| c.0 == name) {
            v.extend(ops::linear::STREAM_BENCH_TOKENS.iter().map(|&m| LoraShrink {
                name,
                m,
                n,
                k,
                r: parts * 32,
            }));
        }
    }
    v.extend(ops::swiglu::CASES.iter().map(|&(tokens, inter)| Swiglu { tokens, inter }));
    v.extend(ops::gelu::CASES.iter().map(|&n| Gelu { n }));
    v.extend(ops::embedding::CASES.iter().map(|&(vocab, dim, tokens)| Embedding { vocab, dim, tokens }));
    v.extend(ops::rmsnorm::CASES.iter().map(|&(tokens, dim)| Rmsnorm { tokens, dim }));
    v.extend(ops::rope::CASES.iter().map(|&(tokens, q_heads, kv_heads, head_dim, section)| Mrope {
        tokens,
        q_heads,
        kv_heads,
        head_dim,
        section,
    }));
    v.extend(ops::rope::VISION_CASES.iter().map(|&(patches, heads, head_dim)| VisionRope {
        patches,
        heads,
        head_dim,
    }));
    v.extend(ops::pool::CASES.iter().map(|&(tokens, dim, spans)| MeanPoolL2 { tokens, dim, spans }));
    v.extend(ops::pool::L2_CASES.iter().map(|&(tokens, dim)| L2Rows { tokens, dim }));
    v.extend(ops::lora::CASES.iter().map(|&(tokens, tasks, r)| LoraMask { tokens, tasks, r }));
    v.extend(ops::rows::CASES.iter().map(|&(rows, len)| GatherRows { rows, len }));
    v.extend(ops::rows::SCATTER_CASES.iter().map(|&(rows, n, len)| ScatterRowsF32 { rows, n, len }));
    v
}

/// Times one case on its own allocator (dropped at the end, giving everything back): the median
/// milliseconds and a rate (TFLOP/s for GEMMs, GB/s of compulsory traffic for the others).
fn run_case(gpu: &Gpu, rng: &mut Rng, iters: usize, case: &OpCase) -> Result<(f64, String)> {
    use OpCase::*;
    let mut mem = DeviceAllocator::new(gpu, 32 << 30, DEFAULT_PAGE_SIZE)?;
    let mem = &mut mem;
    let gbs = |bytes: usize, ms: f64| format!("{:.0} GB/s", bytes as f64 / (ms * 1e-3) / 1e9);
    let permutation = |rng: &mut Rng, n: usize| -> Vec<u32> {
        let mut p: Vec<u32> = (0..n as u32).collect();
        for i in (1..n).rev() {
            p.swap(i, rng.below(i + 1));
        }
        p
    };
    Ok(match *case {
        Linear { m, n, k, .. } => {
            let w = random_tensor(gpu, mem, rng, &[n, k], 1.0 / (k as f32).sqrt())?;
            let x = random_tensor(gpu, mem, rng, &[m, k], 1.0)?;
            let mut y = empty::<bf16>(mem, &[m, n])?;
            let ms = time_ms(gpu, iters, || {
                ops::linear(gpu, &x.view(), &w.view(), None, &mut y.view_mut(), false)
            })?;
            (ms, format!("{:.0} TFLOP/s", 2.0 * (m * n * k) as f64 / (ms * 1e-3) / 1e12))
        }
        LinearStream { m, n, k, .. } => {
            // GB/s of weight bytes (n·k·2 / time), the kernel's and cuBLASLt's (called directly)
            // at the same m; the ms column is the kernel's.
            // Weight copies in turn, over 4× the 50 MB L2, so that each run reads from HBM as
            // in a forward (one copy of o or qkv would stay in L2 between runs).
            let copies = (200usize << 20).div_ceil(n * k * 2).max(1);
            let ws = (0..copies)
                .map(|_| random_tensor(gpu, mem, rng, &[n, k], 1.0 / (k as f32).sqrt()))
                .collect::<Result<Vec<_>>>()?;
            let x = random_tensor(gpu, mem, rng, &[m, k], 1.0)?;
            let mut y = empty::<bf16>(mem, &[m, n])?;
            let mut turn = 0usize;
            // Both timed as graphs of back-to-back launches: cuBLASLt's host cost per call exceeds
            // its GPU time at these sizes, so timing single launches measured the host.
            let ms = time_ms_graphed(gpu, iters, || {
                turn += 1;
                ops::linear_stream(gpu, &x.view(), &ws[turn % copies].view(), None, &mut y.view_mut(), false)
            })?;
            let blas_ms = time_ms_graphed(gpu, iters, || {
                turn += 1;
                gpu.blas().linear(&x.view(), &ws[turn % copies].view(), None, &mut y.view_mut(), false)
            })?;
            let weights = |ms: f64| (n * k * 2) as f64 / (ms * 1e-3) / 1e9;
            let t = ops::linear::stream_launch_tile(m, n, k, gpu.info().sm_count.max(1) as usize);
            let tile = format!("F={} kc={} stages={}", t.rows, t.subs * 64, t.stages);
            (ms, format!("{:.0} GB/s (cuBLAS {:.0}) {tile}", weights(ms), weights(blas_ms)))
        }
        LoraShrink { m, n, k, r, .. } => {
            // The shrink with its mask: one masked linear_stream launch (where the engine takes
            // it, m ≤ linear::SHRINK_STREAM_MAX_M) against cuBLASLt then lora_mask, graph-timed;
            // weights rotated past L2 as for linear_stream.
            let copies = (200usize << 20).div_ceil(n * k * 2).max(1);
            let ws = (0..copies)
                .map(|_| random_tensor(gpu, mem, rng, &[n, k], 1.0 / (k as f32).sqrt()))
                .collect::<Result<Vec<_>>>()?;
            let x = random_tensor(gpu, mem, rng, &[m, k], 1.0)?;
            let tasks_h: Vec<u8> = (0..m).map(|i| (i % 3) as u8).collect();
            let tasks = tensor_of(gpu, mem, &[m], &tasks_h)?;
            let mut t = empty::<bf16>(mem, &[m, n])?;
            let mut turn = 0usize;
            let ms = time_ms_graphed(gpu, iters, || {
                turn += 1;
                let w = ws[turn % copies].view();
                ops::linear_stream_masked(gpu, &x.view(), &w, &mut t.view_mut(), &tasks.view(), r)
            })?;
            let pair_ms = time_ms_graphed(gpu, iters, || {
                turn += 1;
                let w = ws[turn % copies].view();
                gpu.blas().linear(&x.view(), &w, None, &mut t.view_mut(), false)?;
                ops::lora_mask(gpu, &mut t.view_mut(), &tasks.view(), r)
            })?;
            (ms, format!("{:.2} us (cuBLAS + lora_mask {:.2} us)", ms * 1e3, pair_ms * 1e3))
        }
        Swiglu { tokens, inter } => {
            let gu = random_tensor(gpu, mem, rng, &[tokens, 2 * inter], 2.0)?;
            let mut out = empty::<bf16>(mem, &[tokens, inter])?;
            let ms = time_ms(gpu, iters, || ops::swiglu(gpu, &gu.view(), &mut out.view_mut()))?;
            (ms, gbs(tokens * inter * 6, ms))
        }
        Gelu { n } => {
            let x = random_tensor(gpu, mem, rng, &[n], 1.0)?;
            let mut out = empty::<bf16>(mem, &[n])?;
            let ms = time_ms(gpu, iters, || ops::gelu(gpu, &x.view(), &mut out.view_mut()))?;
            (ms, gbs(n * 4, ms))
        }
        Embedding { vocab, dim, tokens } => {
            let table = random_tensor(gpu, mem, rng, &[vocab, dim], 1.0)?;
            let ids_h: Vec<u32> = (0..tokens).map(|_| rng.below(vocab) as u32).collect();
            let ids = tensor_of(gpu, mem, &[tokens], &ids_h)?;
            let mut out = empty::<bf16>(mem, &[tokens, dim])?;
            let ms =
                time_ms(gpu, iters, || ops::embedding(gpu, &table.view(), &ids.view(), &mut out.view_mut()))?;
            (ms, gbs(tokens * dim * 4, ms))
        }
        Rmsnorm { tokens, dim } => {
            // Reads x and writes y (the weight stays in cache).
            let x = random_tensor(gpu, mem, rng, &[tokens, dim], 1.0)?;
            let w = random_tensor(gpu, mem, rng, &[dim], 1.0)?;
            let mut out = empty::<bf16>(mem, &[tokens, dim])?;
            let ms = time_ms(gpu, iters, || {
                ops::rmsnorm(gpu, &x.view(), &w.view(), ops::rmsnorm::EPS, &mut out.view_mut())
            })?;
            (ms, gbs(tokens * dim * 4, ms))
        }
        Mrope { tokens, q_heads, kv_heads, head_dim, section } => {
            // In place on the fused qkv rows: reads and writes the q and k heads, reads the
            // positions; text positions (0..T on all three planes).
            let mut qkv = random_tensor(gpu, mem, rng, &[tokens, (q_heads + 2 * kv_heads) * head_dim], 1.0)?;
            let pos_h: Vec<i32> = (0..3).flat_map(|_| 0..tokens as i32).collect();
            let pos = tensor_of(gpu, mem, &[3, tokens], &pos_h)?;
            let freq_h = ops::rope::inv_freq(ops::rope::THETA, head_dim);
            let freq = tensor_of(gpu, mem, &[head_dim / 2], &freq_h)?;
            let ms = time_ms(gpu, iters, || {
                let (p, f) = (pos.view(), freq.view());
                ops::mrope(gpu, &mut qkv.view_mut(), q_heads, kv_heads, head_dim, &p, &f, section)
            })?;
            (ms, gbs(tokens * (q_heads + kv_heads) * head_dim * 4 + 3 * tokens * 4, ms))
        }
        VisionRope { patches, heads, head_dim } => {
            let mut qkv = random_tensor(gpu, mem, rng, &[patches, 3 * heads * head_dim], 1.0)?;
            let ang_h: Vec<f32> = (0..patches * head_dim / 2).map(|_| rng.uniform(0.0, 128.0)).collect();
            let angles = tensor_of(gpu, mem, &[patches, head_dim / 2], &ang_h)?;
            let ms = time_ms(gpu, iters, || {
                ops::vision_rope(gpu, &mut qkv.view_mut(), heads, head_dim, &angles.view())
            })?;
            (ms, gbs(patches * 2 * heads * head_dim * 4 + patches * head_dim / 2 * 4, ms))
        }
        MeanPoolL2 { tokens, dim, spans } => {
            let h = random_tensor(gpu, mem, rng, &[tokens, dim], 1.0)?;
            let mut flat = Vec::with_capacity(2 * spans.len());
            let mut s = 0u32;
            for &l in spans {
                flat.extend([s, s + l as u32]);
                s += l as u32;
            }
            let sp = tensor_of(gpu, mem, &[spans.len(), 2], &flat)?;
            let mut out = empty::<f32>(mem, &[spans.len(), dim])?;
            let ms =
                time_ms(gpu, iters, || ops::mean_pool_l2(gpu, &h.view(), &sp.view(), &mut out.view_mut()))?;
            (ms, gbs(s as usize * dim * 2 + spans.len() * dim * 4, ms))
        }
        L2Rows { tokens, dim } => {
            let x = random_tensor(gpu, mem, rng, &[tokens, dim], 1.0)?;
            let mut out = empty::<f32>(mem, &[tokens, dim])?;
            let ms = time_ms(gpu, iters, || ops::l2_rows(gpu, &x.view(), &mut out.view_mut()))?;
            (ms, gbs(tokens * dim * 6, ms))
        }
        LoraMask { tokens, tasks, r } => {
            // The kernel only writes: the masked groups, (tasks - 1)/tasks of t.
            let mut t = random_tensor(gpu, mem, rng, &[tokens, tasks * r], 1.0)?;
            let task_h: Vec<u8> = (0..tokens).map(|_| rng.below(tasks) as u8).collect();
            let task = tensor_of(gpu, mem, &[tokens], &task_h)?;
            let ms = time_ms(gpu, iters, || ops::lora_mask(gpu, &mut t.view_mut(), &task.view(), r))?;
            (ms, gbs(tokens * (tasks - 1) * r * 2 + tokens, ms))
        }
        GatherRows { rows, len } => {
            let x = random_tensor(gpu, mem, rng, &[rows, len], 1.0)?;
            let index = tensor_of(gpu, mem, &[rows], &permutation(rng, rows))?;
            let mut out = empty::<bf16>(mem, &[rows, len])?;
            let ms =
                time_ms(gpu, iters, || ops::gather_rows(gpu, &x.view(), &index.view(), &mut out.view_mut()))?;
            (ms, gbs(rows * len * 4, ms))
        }
        ScatterRowsF32 { rows, n, len } => {
            let v = random_tensor(gpu, mem, rng, &[n, len], 1.0)?;
            let dst = tensor_of(gpu, mem, &[n], &permutation(rng, rows)[..n])?;
            let mut out = empty::<f32>(mem, &[rows, len])?;
            let ms = time_ms(gpu, iters, || {
                ops::scatter_rows_f32(gpu, &v.view(), &dst.view(), &mut out.view_mut())
            })?;
            (ms, gbs(n * len * 6, ms))
        }
    })
}

/// {case: ms} from a torch bench script, or empty when there is none.
fn read_torch_json(path: &Option<std::path::PathBuf>) -> BTreeMap<String, f64> {
    match path {
        Some(p) => match std::fs::read_to_string(p) {
            Ok(text) => serde_json::from_str(&text).unwrap_or_default(),
            Err(_) => BTreeMap::new(),
        },
        None => BTreeMap::new(),
    }
}

/// The attention cases: per case the Hopper kernel (where built) and FA2 (the op's tiling for
/// the case), beside torch SDPA's flash and cuDNN backends from the same call. TFLOP/s counts
/// 2 GEMMs · 2·L²·d·H per segment, halved when causal.
fn bench_attention(
    gpu: &Gpu,
    mem: &mut DeviceAllocator,
    rng: &mut Rng,
    torch: &BTreeMap<String, f64>,
    iters: usize,
) -> Result<()> {
    println!(
        "attention (TFLOP/s; ratio = sm90 over each; default kernel here: d 128 {}, d 80 {})",
        AttnKernel::default_for(4096, 128).name(),
        AttnKernel::default_for(4096, 80).name()
    );
    let scheds = Sm90Schedule::ALL;
    let mut head = format!("{:<20} {:>6}", "case", "sm90");
    for sc in scheds {
        head += &format!(" {:>4}", sc.name());
    }
    head += &format!(
        " {:>5} {:>6} {:>6} {:>6} {:>6} {:>6} {:>8}",
        "fa2", "flash", "cudnn", "/fa2", "/flash", "/cudnn", "sm90 ms"
    );
    println!("{head}");
    for (name, (heads, kv_heads, d), causal, segs) in attention_cases() {
        let tokens: usize = segs.iter().sum();
        let qkv = random_tensor(gpu, mem, rng, &[tokens, (heads + 2 * kv_heads) * d], 1.0)?;
        let mut out =
            DTensor::<bf16>::from_block(mem.alloc((tokens * heads * d * 2) as u64)?, &[tokens, heads * d]);
        let cu_h = ops::attention::cu_seqlens(&segs);
        let mut cu = DTensor::<i32>::from_block(mem.alloc((cu_h.len() * 4) as u64)?, &[cu_h.len()]);
        gpu.upload(&mut cu.view_mut(), &cu_h)?;
        let scale = 1.0 / (d as f32).sqrt();
        let half = if causal { 0.5 } else { 1.0 };
        let flops = segs.iter().map(|&l| 4.0 * (l * l * d * heads) as f64 * half).sum::<f64>();
        let max_seqlen = segs.iter().copied().max().unwrap_or(1);
        let tf = |ms: f64| flops / (ms * 1e-3) / 1e12;
        let cell = |ms: Option<f64>| ms.map_or("-".to_string(), |ms| format!("{:.0}", tf(ms)));
        // The op's sm90 schedule, then each schedule, then FA2 (the op's tiling for the case).
        let mut sm90 = Vec::new();
        if AttnKernel::sm90_built() {
            for sc in [None].into_iter().chain(scheds.map(Some)) {
                let sc = sc.unwrap_or(Sm90Schedule::for_shape(max_seqlen));
                #[rustfmt::skip]
                let ms = time_ms(gpu, iters, || {
                    ops::attention::flash_attn_sm90(
                        gpu, &qkv.view(), &mut out.view_mut(), &cu.view(), max_seqlen, heads, kv_heads, d, causal, scale, sc,
                    )
                })?;
                sm90.push(Some(ms));
            }
        } else {
            sm90 = vec![None; 1 + scheds.len()];
        }
        let fa2 = AttnKernel::Fa2(QueryTile::for_max_seqlen(max_seqlen));
        #[rustfmt::skip]
        let fa2_ms = Some(time_ms(gpu, iters, || {
            ops::attention::flash_attn_with(
                gpu, &qkv.view(), &mut out.view_mut(), &cu.view(), max_seqlen, heads, kv_heads, d, causal, scale, fa2,
            )
        })?);
        let flash = torch.get(&format!("attention/{name}/flash")).copied();
        let cudnn = torch.get(&format!("attention/{name}/cudnn")).copied();
        let ratio = |other: Option<f64>| match (sm90[0], other) {
            (Some(a), Some(b)) => format!("{:.2}x", b / a),
            _ => "-".to_string(),
        };
        let mut line = format!("{:<20} {:>6}", name, cell(sm90[0]));
        for ms in &sm90[1..] {
            line += &format!(" {:>4}", cell(*ms));
        }
        line += &format!(
            " {:>5} {:>6} {:>6} {:>6} {:>6} {:>6} {:>8}",
            cell(fa2_ms),
            cell(flash),
            cell(cudnn),
            ratio(fa2_ms),
            ratio(flash),
            ratio(cudnn),
            sm90[0].map_or("-".to_string(), |ms| format!("{ms:.4}"))
        );
        println!("{line}");
        mem.free(qkv.into_block());
        mem.free(out.into_block());
        mem.free(cu.into_block());
    }
    Ok(())
}

fn bench_ops(
    torch_json: Option<std::path::PathBuf>,
    iters: usize,
    list_cases: bool,
    only: Option<String>,
) -> Result<()> {
    let mut cases = op_cases();
    let mut names = std::collections::BTreeSet::new();
    for c in &cases {
        if !names.insert(c.name()) {
            return Err(jv4::Error::Input(format!("two op cases are named {}", c.name())));
        }
    }
    if list_cases {
        let list: Vec<serde_json::Value> = cases
            .iter()
            .map(|c| {
                let mut v = serde_json::to_value(c).expect("plain data");
                v["case"] = c.name().into();
                v
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&list).expect("plain data"));
        return Ok(());
    }
    if let Some(o) = &only {
        cases.retain(|c| c.name().contains(o.as_str()));
    }
    let gpu = Gpu::new(0)?;
    let torch = read_torch_json(&torch_json);
    let mut rng = Rng::new(1);
    println!("device: {}", gpu.info().name);
    println!("{:<36} {:>10} {:>14} {:>10} {:>8}", "case", "ours ms", "rate", "torch ms", "ratio");
    let row = |case: String, ms: f64, rate: String| {
        let (t, r) = match torch.get(&case) {
            Some(&t) => (format!("{t:.4}"), format!("{:.2}x", t / ms)),
            None => ("-".into(), "-".into()),
        };
        println!("{case:<36} {ms:>10.4} {rate:>14} {t:>10} {r:>8}");
    };
    for case in &cases {
        let (ms, rate) = run_case(&gpu, &mut rng, iters, case)?;
        row(case.name(), ms, rate);
    }
    if only.is_some() {
        return Ok(());
    }

    let mut mem = DeviceAllocator::new(&gpu, 16 << 30, DEFAULT_PAGE_SIZE)?;
    bench_attention(&gpu, &mut mem, &mut rng, &torch, iters)?;
    let s = mem.stats();
    println!(
        "allocator: peak {} MiB, mapped {} MiB, {} growth events",
        s.peak >> 20,
        s.mapped >> 20,
        s.grow_events
    );
    Ok(())
}

/// The workloads of tools/torch_text_bench.py (same lengths: a formula both sides compute).
fn text_workloads() -> Vec<(&'static str, Vec<usize>)> {
    vec![
        ("docs256", (0..256).map(|i| 16 + (i * 7919) % 1009).collect()),
        ("32x512", vec![512; 32]),
        ("2x8192", vec![8192; 2]),
        ("1x32768", vec![32768]),
        ("query16", vec![16]),
    ]
}

fn bench_text(
    model: &std::path::Path,
    torch_json: Option<std::path::PathBuf>,
    budget: usize,
    iters: usize,
) -> Result<()> {
    use jv4::model::batch::PackedBatch;
    use jv4::model::checkpoint::Checkpoint;
    use jv4::model::gpu::{GpuModel, Graphs};
    use jv4::model::Task;
    let torch: BTreeMap<String, serde_json::Value> = torch_json
        .and_then(|p| std::fs::read_to_string(p).ok())
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    let gpu = Gpu::new(0)?;
    let ckpt = Checkpoint::open(model)?;
    let (m, load) = GpuModel::load(&gpu, &ckpt)?;
    drop(ckpt);
    let (free, _) = gpu.mem_info()?;
    let mut mem = DeviceAllocator::new(&gpu, free / 10 * 9, DEFAULT_PAGE_SIZE)?;
    let vocab = m.config().text.vocab_size.min(150_000);
    let mut rng = Rng::new(2);
    // Short forwards through CUDA graphs, as the engine runs them (`JV4_GRAPHS=0`: eager).
    let mut graphs = if Graphs::enabled_by_env() { Some(Graphs::new(&gpu)?) } else { None };
    println!(
        "device: {}; weights {:.2} GB prepared in {:.1} s; LoRA {:?}; GEMMs batch-invariant {}; graphs {}",
        gpu.info().name,
        load.bytes as f64 / 1e9,
        load.seconds,
        m.lora_mode(),
        gpu.blas().invariant(),
        graphs.is_some()
    );
    // Two PyTorch columns: "shipped" is the model as jina runs it, "best" the fastest stock
    // configuration (merged LoRA, compiled, cuDNN SDPA; its JSON rows say what ran). Ratios are
    // ours over theirs in tok/s.
    println!(
        "{:<10} {:>9} {:>10} {:>13} {:>7} {:>10} {:>7} {:>15}",
        "workload", "ours ms", "ours tok/s", "shipped tok/s", "ratio", "best tok/s", "ratio", "peak GB o/s/b"
    );
    let mut configs = Vec::new();
    // `$JV4_TEXT_WORKLOADS` (comma-separated names) runs a subset; "q32x16" (32 queries of 16
    // tokens in one forward, a server's batch) runs only when named there (PyTorch has no row).
    let only = std::env::var("JV4_TEXT_WORKLOADS").ok();
    let mut workloads = text_workloads();
    workloads.push(("q32x16", vec![16; 32]));
    let wanted = |n: &str| match &only {
        Some(list) => list.split(',').any(|w| w.trim() == n),
        None => n != "q32x16",
    };
    for (name, lengths) in workloads.into_iter().filter(|(n, _)| wanted(n)) {
        let seqs: Vec<Vec<u32>> =
            lengths.iter().map(|&n| (0..n).map(|_| rng.below(vocab) as u32).collect()).collect();
        let limit = budget.max(*lengths.iter().max().unwrap());
        let mut batches: Vec<PackedBatch> = Vec::new();
        let mut cur = PackedBatch::new(m.config());
        for s in &seqs {
            if cur.tokens() + s.len() > limit {
                batches.push(std::mem::replace(&mut cur, PackedBatch::new(m.config())));
            }
            cur.push_text(s, Task::Retrieval)?;
        }
        batches.push(cur);
        let run = |mem: &mut DeviceAllocator, graphs: &mut Option<Graphs>| -> Result<()> {
            for b in &batches {
                match graphs {
                    Some(g) => m.forward_graphed(&gpu, mem, g, b)?,
                    None => m.forward(&gpu, mem, b)?,
                };
            }
            Ok(())
        };
        run(&mut mem, &mut graphs)?;
        mem.reset_peak();
        let reps = if name.starts_with('q') { 20 } else { iters };
        let mut times = Vec::new();
        for _ in 0..reps {
            let t0 = std::time::Instant::now();
            run(&mut mem, &mut graphs)?;
            times.push(t0.elapsed().as_secs_f64());
        }
        times.sort_by(|a, b| a.total_cmp(b));
        let sec = times[times.len() / 2];
        let tokens: usize = lengths.iter().sum();
        let peak = (m.device_bytes() as u64 + mem.stats().peak) as f64 / 1e9;
        let ours = tokens as f64 / sec;
        let field = |key: &str, f: &str| torch.get(key).and_then(|v| v[f].as_f64());
        let fmt = |v: Option<f64>, p: usize| v.map_or("-".to_string(), |v| format!("{v:.p$}"));
        let ratio = |v: Option<f64>| v.map_or("-".to_string(), |t| format!("{:.2}x", ours / t));
        let best = format!("best/{name}");
        let (stok, btok) = (field(name, "tok_s"), field(&best, "tok_s"));
        println!(
            "{name:<10} {:>9.2} {:>10.0} {:>13} {:>7} {:>10} {:>7} {:>15}",
            sec * 1e3,
            ours,
            fmt(stok, 0),
            ratio(stok),
            fmt(btok, 0),
            ratio(btok),
            format!("{peak:.1}/{}/{}", fmt(field(name, "peak_gb"), 1), fmt(field(&best, "peak_gb"), 1)),
        );
        if let Some(c) = torch.get(&best).and_then(|v| v["config"].as_str()) {
            configs.push(format!("  best/{name}: {c}"));
        }
    }
    for c in configs {
        println!("{c}");
    }
    if let Some(g) = &graphs {
        println!("  graphs: {:?}", g.stats());
    }
    Ok(())
}

fn parity(model: &std::path::Path, reference: &std::path::Path) -> Result<()> {
    use jv4::model::batch::PackedBatch;
    use jv4::model::checkpoint::Checkpoint;
    use jv4::model::gpu::GpuModel;
    use jv4::model::Task;
    let bytes = std::fs::read(reference).map_err(|e| jv4::Error::io(reference, e))?;
    let (_, meta) =
        safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| jv4::Error::Input(e.to_string()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| jv4::Error::Input(e.to_string()))?;
    let texts: Vec<serde_json::Value> = serde_json::from_str(
        meta.metadata().as_ref().and_then(|m| m.get("texts")).map(String::as_str).unwrap_or("[]"),
    )
    .unwrap_or_default();
    let f32s = |name: &str| -> Option<Vec<f32>> {
        st.tensor(name)
            .ok()
            .map(|t| t.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    };
    let gpu = Gpu::new(0)?;
    let ckpt = Checkpoint::open(model)?;
    let (m, _) = GpuModel::load(&gpu, &ckpt)?;
    drop(ckpt);
    let (free, _) = gpu.mem_info()?;
    let mut mem = DeviceAllocator::new(&gpu, free / 10 * 9, DEFAULT_PAGE_SIZE)?;
    let pd = m.config().multi_vector_projector_dim;
    let mut ours = Vec::new();
    let mut refs = Vec::new();
    println!("{:<6} {:>7} {:<14} {:>12} {:>14}", "text", "tokens", "task", "single cos", "multi mean cos");
    for (i, t) in texts.iter().enumerate() {
        let ids: Vec<u32> = st
            .tensor(&format!("{i}/ids"))
            .map_err(|e| jv4::Error::Input(e.to_string()))?
            .data()
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as u32)
            .collect();
        let task: Task = t["task"].as_str().unwrap_or("retrieval").parse()?;
        let mut b = PackedBatch::new(m.config());
        b.push_text(&ids, task)?;
        b.want_multi = true;
        let out = m.forward(&gpu, &mut mem, &b)?;
        let single_ref = f32s(&format!("{i}/single")).unwrap_or_default();
        let c = cos(&out.single, &single_ref);
        let mc = match f32s(&format!("{i}/multi")) {
            Some(mr) => {
                let got = out.multi.as_ref().unwrap();
                let rows = mr.len() / pd;
                format!(
                    "{:.6}",
                    (0..rows)
                        .map(|r| cos(&got[r * pd..(r + 1) * pd], &mr[r * pd..(r + 1) * pd]))
                        .sum::<f64>()
                        / rows as f64
                )
            }
            None => "-".into(),
        };
        println!("{i:<6} {:>7} {:<14} {c:>12.6} {mc:>14}", ids.len(), task.name());
        ours.push(out.single);
        refs.push(single_ref);
    }
    // The error must be far below the distance between different inputs' embeddings, or the
    // check passes trivially (random weights can make all embeddings alike).
    let dist =
        |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum::<f64>().sqrt();
    let max_err = ours.iter().zip(&refs).map(|(a, b)| dist(a, b)).fold(0f64, f64::max);
    let mut min_between = f64::MAX;
    for i in 0..refs.len() {
        for j in i + 1..refs.len() {
            min_between = min_between.min(dist(&refs[i], &refs[j]));
        }
    }
    println!(
        "max |ours - ref| = {max_err:.4}, min distance between different texts' reference vectors = {min_between:.4}, ratio {:.1}x",
        min_between / max_err.max(1e-12)
    );
    Ok(())
}

fn bench_images(model: &std::path::Path, reference: &std::path::Path) -> Result<()> {
    use jv4::model::batch::{ImageInput, PackedBatch};
    use jv4::model::checkpoint::Checkpoint;
    use jv4::model::gpu::GpuModel;
    use jv4::model::plan::GridThw;
    use jv4::model::Task;
    let bytes = std::fs::read(reference).map_err(|e| jv4::Error::io(reference, e))?;
    let (_, meta) =
        safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| jv4::Error::Input(e.to_string()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| jv4::Error::Input(e.to_string()))?;
    let images: Vec<serde_json::Value> = serde_json::from_str(
        meta.metadata().as_ref().and_then(|m| m.get("images")).map(String::as_str).unwrap_or("[]"),
    )
    .unwrap_or_default();
    let raw = |name: &str| -> Result<Vec<u8>> {
        Ok(st.tensor(name).map_err(|e| jv4::Error::Input(format!("{name}: {e}")))?.data().to_vec())
    };
    let f32s = |name: &str| -> Result<Vec<f32>> {
        Ok(raw(name)?.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    };
    let gpu = Gpu::new(0)?;
    let ckpt = Checkpoint::open(model)?;
    let (m, _) = GpuModel::load(&gpu, &ckpt)?;
    drop(ckpt);
    let cfg = m.config().clone();
    let (free, _) = gpu.mem_info()?;
    let mut mem = DeviceAllocator::new(&gpu, free / 10 * 9, DEFAULT_PAGE_SIZE)?;
    let pd = cfg.multi_vector_projector_dim;
    let mut inputs = Vec::new();
    println!(
        "{:<5} {:>11} {:>8} {:>7} {:>11} {:>14} {:>9} {:>9} {:>7}",
        "image", "size", "patches", "tokens", "single cos", "multi mean cos", "ours ms", "torch ms", "ratio"
    );
    let (mut ours_v, mut refs_v) = (Vec::new(), Vec::new());
    let mut cap_torch_ms = 0.0;
    for (i, im) in images.iter().enumerate() {
        let g = &im["grid"];
        let grid = GridThw {
            t: g[0].as_u64().unwrap_or(1) as usize,
            h: g[1].as_u64().unwrap_or(0) as usize,
            w: g[2].as_u64().unwrap_or(0) as usize,
        };
        let ids: Vec<u32> = raw(&format!("{i}/ids"))?
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as u32)
            .collect();
        let pv = f32s(&format!("{i}/pixel_values"))?;
        let task: Task = im["task"].as_str().unwrap_or("retrieval").parse()?;
        let mut b = PackedBatch::new(&cfg);
        b.push(&ids, task, vec![ImageInput::new(grid, pv.clone()).bf16()])?;
        b.want_multi = true;
        let out = m.forward(&gpu, &mut mem, &b)?;
        b.want_multi = false;
        let single_ref = f32s(&format!("{i}/single"))?;
        let multi_ref = f32s(&format!("{i}/multi"))?;
        let c = cos(&out.single, &single_ref);
        let got = out.multi.as_ref().unwrap();
        let rows = multi_ref.len() / pd;
        let mc =
            (0..rows).map(|r| cos(&got[r * pd..(r + 1) * pd], &multi_ref[r * pd..(r + 1) * pd])).sum::<f64>()
                / rows as f64;
        let mut times = Vec::new();
        for _ in 0..5 {
            let t0 = std::time::Instant::now();
            m.forward(&gpu, &mut mem, &b)?;
            times.push(t0.elapsed().as_secs_f64() * 1e3);
        }
        times.sort_by(|a, b| a.total_cmp(b));
        let torch_ms = im["torch_ms"].as_f64().unwrap_or(f64::NAN);
        let hw = &im["hw"];
        println!(
            "{i:<5} {:>11} {:>8} {:>7} {c:>11.6} {mc:>14.6} {:>9.2} {torch_ms:>9.2} {:>6.2}x",
            format!("{}x{}", hw[0], hw[1]),
            grid.patches(),
            ids.len(),
            times[2],
            torch_ms / times[2]
        );
        if grid.patches() <= 3072 {
            cap_torch_ms += torch_ms;
            inputs.push((ids, task, grid, pv));
        }
        ours_v.push(out.single);
        refs_v.push(single_ref);
    }
    // Images/s at the default cap: those images packed into one forward.
    let mut b = PackedBatch::new(&cfg);
    for (ids, task, grid, pv) in &inputs {
        b.push(ids, *task, vec![ImageInput::new(*grid, pv.clone()).bf16()])?;
    }
    m.forward(&gpu, &mut mem, &b)?;
    let mut times = Vec::new();
    for _ in 0..5 {
        let t0 = std::time::Instant::now();
        m.forward(&gpu, &mut mem, &b)?;
        times.push(t0.elapsed().as_secs_f64());
    }
    times.sort_by(|a, b| a.total_cmp(b));
    let n = inputs.len() as f64;
    println!(
        "default-cap images packed: {:.1} images/s (ours) vs {:.1} images/s (torch, one per forward as jina runs them): {:.2}x",
        n / times[2],
        n / (cap_torch_ms / 1e3),
        (cap_torch_ms / 1e3) / times[2]
    );
    let dist =
        |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum::<f64>().sqrt();
    let max_err = ours_v.iter().zip(&refs_v).map(|(a, b)| dist(a, b)).fold(0f64, f64::max);
    let mut min_between = f64::MAX;
    for i in 0..refs_v.len() {
        for j in i + 1..refs_v.len() {
            min_between = min_between.min(dist(&refs_v[i], &refs_v[j]));
        }
    }
    println!("max |ours - ref| = {max_err:.4}, min distance between different images = {min_between:.4}, ratio {:.1}x", min_between / max_err.max(1e-12));
    Ok(())
}

fn bench_engine(model: &std::path::Path, max_batch_tokens: usize, callers: usize) -> Result<()> {
    use jv4::{Device, Engine, EngineOptions, Request};
    let opts = EngineOptions { device: Device::Cuda(0), max_batch_tokens, ..EngineOptions::default() };
    let engine = Engine::open(model, opts)?;
    println!("engine on {}", engine.describe());
    let vocab = engine.config().text.vocab_size.min(150_000);
    let mut rng = Rng::new(2);
    println!("{:<10} {:>10} {:>12}", "workload", "ours ms", "ours tok/s");
    for (name, lengths) in text_workloads() {
        let reqs: Vec<Request> = lengths
            .iter()
            .map(|&n| Request::tokens((0..n).map(|_| rng.below(vocab) as u32).collect::<Vec<u32>>()))
            .collect();
        let run = || -> Result<()> {
            for r in engine.embed(&reqs) {
                r?;
            }
            Ok(())
        };
        run()?;
        let reps = if name == "query16" { 20 } else { 3 };
        let mut times = Vec::new();
        for _ in 0..reps {
            let t0 = std::time::Instant::now();
            run()?;
            times.push(t0.elapsed().as_secs_f64());
        }
        times.sort_by(|a, b| a.total_cmp(b));
        let sec = times[times.len() / 2];
        let tokens: usize = lengths.iter().sum();
        println!("{name:<10} {:>10.2} {:>12.0}", sec * 1e3, tokens as f64 / sec);
    }
    // Concurrent 16-token queries: each caller sends one request at a time.
    let per_caller = 32;
    let queries: Vec<Vec<u32>> =
        (0..callers * per_caller).map(|_| (0..16).map(|_| rng.below(vocab) as u32).collect()).collect();
    let t0 = std::time::Instant::now();
    let mut lat: Vec<f64> = std::thread::scope(|s| {
        let handles: Vec<_> = queries
            .chunks(per_caller)
            .map(|mine| {
                let engine = engine.clone();
                s.spawn(move || {
                    mine.iter()
                        .map(|q| {
                            let t = std::time::Instant::now();
                            let r = engine.embed(&[Request::tokens(q.clone())]);
                            assert!(r[0].is_ok(), "{:?}", r[0]);
                            t.elapsed().as_secs_f64() * 1e3
                        })
                        .collect::<Vec<f64>>()
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().expect("caller")).collect()
    });
    let wall = t0.elapsed().as_secs_f64();
    lat.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| lat[((lat.len() - 1) as f64 * p) as usize];
    println!(
        "{callers} concurrent callers, 16-token queries: {:.0} requests/s, p50 {:.2} ms, p99 {:.2} ms",
        lat.len() as f64 / wall,
        pct(0.5),
        pct(0.99)
    );
    Ok(())
}

/// See `Cmd::BlasSurvey`.
fn blas_survey() -> Result<()> {
    let gpu = Gpu::new(0)?;
    let mut mem = DeviceAllocator::new(&gpu, 8 << 30, DEFAULT_PAGE_SIZE)?;
    let mut rng = Rng::new(5);
    let heights = [16usize, 64, 256, 4096, 16384];
    println!("device: {}; batch-invariant plans: {}", gpu.info().name, gpu.blas().invariant());
    for &(name, n, k) in &ops::linear::CASES[..4] {
        let w = random_tensor(&gpu, &mut mem, &mut rng, &[n, k], 1.0 / (k as f32).sqrt())?;
        let mmax = *heights.last().unwrap();
        let x = random_tensor(&gpu, &mut mem, &mut rng, &[mmax, k], 1.0)?;
        let mut y = empty::<bf16>(&mut mem, &[mmax, n])?;
        let mut algos: Vec<jv4::cuda::blas::Algo> = Vec::new();
        for &m in &heights {
            for a in gpu.blas().survey(m, n, k, 8)? {
                if !algos.iter().any(|b| b.config == a.config) {
                    algos.push(a);
                }
            }
        }
        println!(
            "== {name} n={n} k={k}: {} candidates; µs at m = {heights:?}; hash of rows 0..16 per height",
            algos.len()
        );
        for a in &algos {
            let mut cells = Vec::new();
            let mut hashes = Vec::new();
            for &m in &heights {
                let xv = x.view().rows(0..m);
                let run = |y: &mut DTensor<bf16>| -> Result<()> {
                    let mut yv = y.view_mut_as(&[m, n]);
                    gpu.blas().linear_with(a, &xv, &w.view(), &mut yv)
                };
                if run(&mut y).is_err() {
                    cells.push("-".to_string());
                    hashes.push("-".to_string());
                    continue;
                }
                let ms = time_ms(&gpu, 10, || run(&mut y))?;
                let head = gpu.download(&y.view().rows(0..16))?;
                let h = head
                    .iter()
                    .fold(0xcbf29ce484222325u64, |h, v| (h ^ v.to_bits() as u64).wrapping_mul(0x100000001b3));
                cells.push(format!("{:.1}", ms * 1e3));
                hashes.push(format!("{:06x}", h & 0xffffff));
            }
            println!("  {a:<44} {:>40}   {}", cells.join(" "), hashes.join(" "));
        }
        for t in [w, x] {
            mem.free(t.into_block());
        }
        mem.free(y.into_block());
    }
    Ok(())
}
