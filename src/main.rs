//! `jv4`: the command-line runner. Today it inspects a checkpoint (and loads it onto the GPU),
//! tokenizes text with the task prompts, and reports the GPU and the compiled kernels; it becomes
//! the embedding runner in the next milestones.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use jv4::cuda::{Gpu, KernelId, CUDA_ARCH, MODULES};
use jv4::Error;

#[derive(Parser)]
#[command(name = "jv4", version, about = "jina-embeddings-v4 on NVIDIA GPUs", long_about = None)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Open the GPU and report it: name, compute capability, memory, driver, kernels loaded.
    Gpu {
        /// Which GPU (CUDA device ordinal).
        #[arg(long, default_value_t = 0)]
        device: usize,
    },
    /// List the compiled kernels and the target they were built for.
    Kernels {
        /// Also print each module's ptxas report (registers, spills, shared memory).
        #[arg(long)]
        ptxas: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli.cmd) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            // 2: no GPU / driver (the environment), 1: everything else (the input or a failure).
            ExitCode::from(if matches!(e, Error::NoGpu(_)) { 2 } else { 1 })
        }
    }
}

fn run(cmd: Cmd) -> jv4::Result<()> {
    match cmd {
        Cmd::Gpu { device } => {
            let gpu = Gpu::new(device)?;
            let i = gpu.info();
            let (free, total) = gpu.mem_info()?;
            println!("device {}: {}", i.ordinal, i.name);
            println!("  compute capability {}.{}, {} SMs", i.compute_capability.0, i.compute_capability.1, i.sm_count);
            println!("  memory {:.1} GiB free of {:.1} GiB", gib(free), gib(total));
            println!("  driver CUDA {}.{}", i.driver_version / 1000, (i.driver_version % 1000) / 10);
            println!(
                "  kernels: {} in {} modules, built for {}, loaded from {}",
                KernelId::ALL.len(),
                MODULES.len(),
                i.kernels_arch,
                if i.ptx_fallbacks.is_empty() { "cubin".to_string() } else { format!("PTX for {:?}", i.ptx_fallbacks) }
            );
            Ok(())
        }
        Cmd::Kernels { ptxas } => {
            println!("built for {CUDA_ARCH}");
            for (mi, m) in MODULES.iter().enumerate() {
                let ids: Vec<_> = KernelId::ALL.iter().filter(|k| k.module() == mi).map(|k| k.symbol()).collect();
                println!("kernels/{}.cu: {}", m.name, ids.join(", "));
                if ptxas {
                    for line in m.ptxas_report.lines() {
                        println!("    {line}");
                    }
                }
            }
            Ok(())
        }
    }
}

fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}
