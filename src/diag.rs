//! The runner's diagnostic reports (`jv4 gpu`, `jv4 kernels`, `jv4 info`), as text: what the GPU
//! is, which kernels were built, what a checkpoint holds and how fast it loads. They reach below
//! the engine (into [`crate::cuda`] and [`crate::model`]) on purpose, so that the runner itself
//! needs only the crate's facade.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Instant;

use crate::cuda::{resolve_budget, DeviceAllocator, Gpu, KernelId, CUDA_ARCH, DEFAULT_PAGE_SIZE, MODULES};
use crate::model::checkpoint::{Checkpoint, Source};
use crate::model::weights::DeviceWeights;
use crate::Result;

/// One line into a report (a `String` cannot fail to grow).
macro_rules! say {
    ($out:expr, $($arg:tt)*) => {
        let _ = writeln!($out, $($arg)*);
    };
}

fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

/// GPU `device`: name, compute capability, memory, driver, the kernels loaded, and the activation
/// allocator a budget (`mem_budget`, e.g. "20GiB"; default `$JV4_MEM_BUDGET`, else 90% of free)
/// would get.
pub fn gpu_report(device: usize, mem_budget: Option<&str>) -> Result<String> {
    let mut out = String::new();
    let gpu = Gpu::new(device)?;
    let i = gpu.info();
    let (free, total) = gpu.mem_info()?;
    say!(out, "device {}: {}", i.ordinal, i.name);
    say!(
        out,
        "  compute capability {}.{}, {} SMs",
        i.compute_capability.0,
        i.compute_capability.1,
        i.sm_count
    );
    say!(out, "  memory {:.1} GiB free of {:.1} GiB", gib(free), gib(total));
    say!(out, "  driver CUDA {}.{}", i.driver_version / 1000, (i.driver_version % 1000) / 10);
    say!(
        out,
        "  kernels: {} in {} modules, built for {}, loaded from {}",
        KernelId::ALL.len(),
        MODULES.len(),
        i.kernels_arch,
        if i.ptx_fallbacks.is_empty() {
            "cubin".to_string()
        } else {
            format!("PTX for {:?}", i.ptx_fallbacks)
        }
    );
    let budget = resolve_budget(mem_budget, free)?;
    let mem = DeviceAllocator::new(&gpu, budget, DEFAULT_PAGE_SIZE)?;
    let s = mem.stats();
    say!(
        out,
        "  activation allocator: budget {:.1} GiB in {} pages of {} MiB (mapped on first use)",
        gib(s.budget),
        s.budget / s.page_size.max(1),
        s.page_size >> 20
    );
    Ok(out)
}

/// The compiled kernels by module and the target they were built for; with `ptxas`, each
/// module's register/spill report.
pub fn kernels_report(ptxas: bool) -> String {
    let mut out = String::new();
    say!(out, "built for {CUDA_ARCH}");
    for (mi, m) in MODULES.iter().enumerate() {
        let ids: Vec<_> = KernelId::ALL.iter().filter(|k| k.module() == mi).map(|k| k.symbol()).collect();
        say!(out, "kernels/{}.cu: {}", m.name, ids.join(", "));
        if ptxas {
            for line in m.ptxas_report.lines() {
                say!(out, "    {line}");
            }
        }
    }
    out
}

/// Opens and validates a checkpoint folder and describes it; unless `no_gpu`, also uploads it to
/// GPU `device` and reports the load time. `list`: every tensor too.
pub fn checkpoint_report(dir: &Path, no_gpu: bool, device: usize, list: bool) -> Result<String> {
    let mut out = String::new();
    let t0 = Instant::now();
    let ckpt = Checkpoint::open(dir)?;
    let open_s = t0.elapsed().as_secs_f64();
    let c = &ckpt.config;
    let (t, v) = (&c.text, &c.vision);
    say!(out, "checkpoint {} (opened and validated in {:.3} s)", dir.display(), open_s);
    say!(
        out,
        "  text: {} layers, hidden {}, {} heads / {} kv heads × {}, mlp {}, vocab {}, rope theta {}, mrope {:?}",
        t.num_hidden_layers,
        t.hidden_size,
        t.num_attention_heads,
        t.num_key_value_heads,
        t.head_dim,
        t.intermediate_size,
        t.vocab_size,
        t.rope_theta,
        t.mrope_section
    );
    say!(
        out,
        "  vision: {} blocks, hidden {}, {} heads, mlp {}, patch {}, window {}, full attention in {:?}",
        v.depth,
        v.hidden_size,
        v.num_heads,
        v.intermediate_size,
        v.patch_size,
        v.window_size,
        v.fullatt_block_indexes
    );
    let base = ckpt.tensors().iter().filter(|t| t.source == Source::Base).count();
    let lora = ckpt.tensors().len() - base;
    let params: usize = ckpt.tensors().iter().map(|t| t.numel()).sum();
    say!(
        out,
        "  tensors: {} ({} base, {} adapter), {:.3} B parameters, {:.2} GB on disk",
        ckpt.tensors().len(),
        base,
        lora,
        params as f64 / 1e9,
        ckpt.total_bytes() as f64 / 1e9
    );
    say!(
        out,
        "  adapters: {} (r {}, alpha {}, scale {})",
        c.tasks().iter().map(|t| t.name()).collect::<Vec<_>>().join(", "),
        ckpt.adapter.r,
        ckpt.adapter.lora_alpha,
        ckpt.adapter.scale()
    );
    say!(
        out,
        "  outputs: single-vector {} (Matryoshka {:?}), multi-vector {} per token",
        t.hidden_size,
        c.matryoshka_dims,
        c.multi_vector_projector_dim
    );
    say!(
        out,
        "  images: {}..{} pixels (preprocessor_config.json)",
        ckpt.preprocessor.min_pixels,
        ckpt.preprocessor.max_pixels
    );
    for (name, file) in &ckpt.ignored {
        say!(out, "  ignored (documented): {name} in {}", file.display());
    }
    if list {
        for t in ckpt.tensors() {
            say!(out, "    {} <- {} {} {:?}", t.name, t.stored_name, t.dtype.name(), t.shape);
        }
    }
    if no_gpu {
        return Ok(out);
    }
    let gpu = Gpu::new(device)?;
    let (weights, r) = DeviceWeights::upload(&gpu, &ckpt)?;
    say!(
        out,
        "loaded onto {}: {} tensors, {:.2} GB in {:.2} s ({:.1} GB/s){}",
        gpu.info().name,
        r.tensors,
        r.bytes as f64 / 1e9,
        r.seconds,
        r.bytes as f64 / 1e9 / r.seconds.max(1e-9),
        if r.converted > 0 { format!(", {} tensors converted to bf16", r.converted) } else { String::new() }
    );
    let (free, total) = gpu.mem_info()?;
    say!(
        out,
        "  device memory: weights {:.2} GiB, {:.1} GiB free of {:.1} GiB",
        gib(weights.device_bytes() as u64),
        gib(free),
        gib(total)
    );
    drop(weights);
    // The load the engine does: the same checkpoint prepared (fused, LoRA stacked and folded or
    // merged as $JV4_LORA says), with where its time went.
    let (model, r) = crate::model::gpu::GpuModel::load(&gpu, &ckpt)?;
    say!(
        out,
        "prepared for the engine ({:?} LoRA): {:.2} GB in {:.2} s ({:.1} GB/s); {}",
        model.lora_mode(),
        r.bytes as f64 / 1e9,
        r.seconds,
        r.bytes as f64 / 1e9 / r.seconds.max(1e-9),
        r.phases.iter().map(|(p, t)| format!("{p} {t:.3} s")).collect::<Vec<_>>().join(", ")
    );
    Ok(out)
}

/// Writes a random checkpoint with its tokenizer in the exact layout of the real one (`full`:
/// the real 3.8B shapes, about 8 GB; else the tiny preset of a few MB), the LoRA tensors in f32
/// when `f32_adapters`.
pub fn synth(out: &Path, full: bool, seed: u64, f32_adapters: bool) -> Result<()> {
    use crate::model::synth::{write_checkpoint, Preset, SynthSpec};
    let preset = if full { Preset::Full } else { Preset::Tiny };
    let adapter_dtype = if f32_adapters { crate::model::Dtype::F32 } else { crate::model::Dtype::BF16 };
    write_checkpoint(out, &SynthSpec { seed, preset, adapter_dtype })
}
