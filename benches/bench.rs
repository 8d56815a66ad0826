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
use jv4::ops::attention::{AttnKernel, QueryTile, Sm90Schedule};
use jv4::reference::cosine as cos;
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
}

/// Decoder GEMMs as (name, n, k): q+k+v fused, o, gate+up fused, down.
const GEMMS: &[(&str, usize, usize)] =
    &[("qkv", 2560, 2048), ("o", 2048, 2048), ("gate_up", 22016, 2048), ("down", 2048, 11008)];
const TOKENS: &[usize] = &[16, 512, 4096, 16384];
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
    let result = match cli.cmd {
        Cmd::Ops { torch_json, iters } => bench_ops(torch_json, iters),
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
        Cmd::Parity { model, reference } => parity(&model, &reference),
        Cmd::Images { model, reference } => bench_images(&model, &reference),
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

fn bench_ops(torch_json: Option<std::path::PathBuf>, iters: usize) -> Result<()> {
    let gpu = Gpu::new(0)?;
    let torch = read_torch_json(&torch_json);
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
    // rmsnorm at the decoder's width: reads x and writes y (the 4 KiB weight stays in cache).
    let (m, d) = (4096, 2048);
    let x = random_tensor(&gpu, &mut mem, &mut rng, &[m, d], 1.0)?;
    let w = random_tensor(&gpu, &mut mem, &mut rng, &[d], 1.0)?;
    let mut out = DTensor::<bf16>::from_block(mem.alloc((m * d * 2) as u64)?, &[m, d]);
    let ms = time_ms(&gpu, iters, || {
        ops::rmsnorm(&gpu, &x.view(), &w.view(), ops::rmsnorm::EPS, &mut out.view_mut())
    })?;
    let gbs = (m * d * 4) as f64 / (ms * 1e-3) / 1e9;
    row(format!("rmsnorm/{d}/m={m}"), ms, format!("{gbs:.0} GB/s"));
    mem.free(x.into_block());
    mem.free(w.into_block());
    mem.free(out.into_block());

    // M-RoPE in place on the fused qkv output [m, 2560]: reads and writes the q and k columns
    // (18 heads of 128), reads the positions; text positions (0..m on all three planes).
    let (q_heads, kv_heads, hd) = (16, 2, 128);
    let rowlen = (q_heads + 2 * kv_heads) * hd;
    let mut qkv = random_tensor(&gpu, &mut mem, &mut rng, &[m, rowlen], 1.0)?;
    let pos_host: Vec<i32> = (0..3).flat_map(|_| 0..m as i32).collect();
    let mut pos = DTensor::<i32>::from_block(mem.alloc((3 * m * 4) as u64)?, &[3, m]);
    gpu.upload(&mut pos.view_mut(), &pos_host)?;
    let freq_host = ops::rope::inv_freq(ops::rope::THETA, hd);
    let mut freq = DTensor::<f32>::from_block(mem.alloc((hd / 2 * 4) as u64)?, &[hd / 2]);
    gpu.upload(&mut freq.view_mut(), &freq_host)?;
    let ms = time_ms(&gpu, iters, || {
        ops::mrope(
            &gpu,
            &mut qkv.view_mut(),
            q_heads,
            kv_heads,
            hd,
            &pos.view(),
            &freq.view(),
            ops::rope::SECTION,
        )
    })?;
    let gbs = (m * (q_heads + kv_heads) * hd * 4 + 3 * m * 4) as f64 / (ms * 1e-3) / 1e9;
    row(format!("mrope/{rowlen}/m={m}"), ms, format!("{gbs:.0} GB/s"));
    mem.free(qkv.into_block());
    mem.free(pos.into_block());
    mem.free(freq.into_block());

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
    use jv4::model::checkpoint::Checkpoint;
    use jv4::model::gpu::{GpuModel, TextBatch};
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
    println!(
        "device: {}; weights {:.2} GB prepared in {:.1} s",
        gpu.info().name,
        load.bytes as f64 / 1e9,
        load.seconds
    );
    println!(
        "{:<10} {:>10} {:>12} {:>10} {:>12} {:>8} {:>12}",
        "workload", "ours ms", "ours tok/s", "torch ms", "torch tok/s", "ratio", "peak GB o/t"
    );
    for (name, lengths) in text_workloads() {
        let seqs: Vec<Vec<u32>> =
            lengths.iter().map(|&n| (0..n).map(|_| rng.below(vocab) as u32).collect()).collect();
        let limit = budget.max(*lengths.iter().max().unwrap());
        let mut batches: Vec<TextBatch> = Vec::new();
        let mut cur = TextBatch::default();
        for s in &seqs {
            if cur.tokens() + s.len() > limit {
                batches.push(std::mem::take(&mut cur));
            }
            cur.push_text(s, Task::Retrieval);
        }
        batches.push(cur);
        let run = |mem: &mut DeviceAllocator| -> Result<()> {
            for b in &batches {
                m.forward_text(&gpu, mem, b, false)?;
            }
            Ok(())
        };
        run(&mut mem)?;
        mem.reset_peak();
        let reps = if name == "query16" { 20 } else { iters };
        let mut times = Vec::new();
        for _ in 0..reps {
            let t0 = std::time::Instant::now();
            run(&mut mem)?;
            times.push(t0.elapsed().as_secs_f64());
        }
        times.sort_by(|a, b| a.total_cmp(b));
        let sec = times[times.len() / 2];
        let tokens: usize = lengths.iter().sum();
        let peak = (m.device_bytes() as u64 + mem.stats().peak) as f64 / 1e9;
        let t = torch.get(name);
        let tms = t.and_then(|v| v["ms"].as_f64());
        let ttok = t.and_then(|v| v["tok_s"].as_f64());
        let tpeak = t.and_then(|v| v["peak_gb"].as_f64());
        let fmt = |v: Option<f64>, p: usize| v.map_or("-".to_string(), |v| format!("{v:.p$}"));
        println!(
            "{name:<10} {:>10.2} {:>12.0} {:>10} {:>12} {:>8} {:>12}",
            sec * 1e3,
            tokens as f64 / sec,
            fmt(tms, 2),
            fmt(ttok, 0),
            tms.map_or("-".to_string(), |t| format!("{:.2}x", t / (sec * 1e3))),
            format!("{peak:.1}/{}", fmt(tpeak, 1)),
        );
    }
    Ok(())
}

fn parity(model: &std::path::Path, reference: &std::path::Path) -> Result<()> {
    use jv4::model::checkpoint::Checkpoint;
    use jv4::model::gpu::{GpuModel, TextBatch};
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
        let mut b = TextBatch::default();
        b.push_text(&ids, task);
        let out = m.forward_text(&gpu, &mut mem, &b, true)?;
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
    use jv4::model::checkpoint::Checkpoint;
    use jv4::model::gpu::{GpuModel, TextBatch};
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
        let mut b = TextBatch::default();
        b.push_with_images(&cfg, &ids, task, &[(grid, pv.as_slice())])?;
        let out = m.forward_text(&gpu, &mut mem, &b, true)?;
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
            m.forward_text(&gpu, &mut mem, &b, false)?;
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
    let mut b = TextBatch::default();
    for (ids, task, grid, pv) in &inputs {
        b.push_with_images(&cfg, ids, *task, &[(*grid, pv.as_slice())])?;
    }
    m.forward_text(&gpu, &mut mem, &b, false)?;
    let mut times = Vec::new();
    for _ in 0..5 {
        let t0 = std::time::Instant::now();
        m.forward_text(&gpu, &mut mem, &b, false)?;
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
