//! Compiles every `kernels/*.cu` to PTX (nvcc) and then to a cubin (ptxas), embeds both, and
//! writes `$OUT_DIR/kernels.rs`: the module table and the typed `KernelId` enum, one variant per
//! `extern "C" __global__` entry found in the PTX. The cubin is what loads at run time (no JIT);
//! the PTX is kept for reading and as a fallback. The ptxas register/spill report of each file is
//! saved beside the binaries (`target/<profile>/ptxas/<file>.txt`) and embedded (`jv4 kernels`).
//!
//! Environment (each one re-runs this script when it changes):
//! - `NVCC`, `CUDA_HOME`, `CUDA_PATH`: where nvcc is (see `find_nvcc` for the full search order).
//! - `JV4_CUDA_ARCH`: target, default `sm_90a` (H100). `sm_80`, `sm_89`, `sm_90` work for other cards.
//! - `JV4_MAX_PTX_ISA`: highest PTX ISA the target driver accepts, default 9.0 (CUDA 13.0 driver).
//! - `JV4_NVCC_FLAGS`: extra nvcc flags, split on whitespace.
//! - `JV4_PTXAS_VERBOSE=1`: show the ptxas reports as cargo warnings.
//! - `JV4_ALLOW_NO_NVCC=1`: build without kernels (CPU-only work); the binary says so at start.

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const PIP_FIX: &str = "python3 -m pip install --target .cuda \"cuda-toolkit[nvcc,cccl]==13.0.3.0\"";

fn main() {
    for var in [
        "NVCC",
        "CUDA_HOME",
        "CUDA_PATH",
        "JV4_CUDA_ARCH",
        "JV4_MAX_PTX_ISA",
        "JV4_NVCC_FLAGS",
        "JV4_PTXAS_VERBOSE",
        "JV4_ALLOW_NO_NVCC",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo::rustc-check-cfg=cfg(no_kernels)");
    add_cuda_runpaths();

    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let arch = env::var("JV4_CUDA_ARCH").unwrap_or_else(|_| "sm_90a".to_string());
    println!("cargo:rustc-env=JV4_CUDA_ARCH={arch}");

    let mut sources: Vec<PathBuf> = fs::read_dir(manifest_dir.join("kernels"))
        .expect("read kernels/")
        .map(|e| e.expect("kernels/ entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .collect();
    sources.sort();

    let Some(nvcc) = find_nvcc(&manifest_dir) else {
        if env::var("JV4_ALLOW_NO_NVCC").is_ok_and(|v| v == "1") {
            println!("cargo:rustc-cfg=no_kernels");
            println!("cargo:warning=jv4: building WITHOUT CUDA kernels (JV4_ALLOW_NO_NVCC=1)");
            write_table(&out_dir, &arch, &[]);
            return;
        }
        panic!(
            "\n\njv4: nvcc not found. Install CUDA 13.0's compiler into this repository with:\n\n    {PIP_FIX}\n\n\
             (or set NVCC / CUDA_HOME). Searched: $NVCC, $CUDA_HOME/bin, $CUDA_PATH/bin, \
             .cuda/nvidia/cu13/bin in this folder and its parents, PATH, /usr/local/cuda/bin.\n\n"
        );
    };
    let ptxas = nvcc.with_file_name("ptxas");
    let max_isa = parse_isa(&env::var("JV4_MAX_PTX_ISA").unwrap_or_else(|_| "9.0".to_string()));
    let extra: Vec<String> =
        env::var("JV4_NVCC_FLAGS").unwrap_or_default().split_whitespace().map(str::to_string).collect();

    // One thread per file: nvcc dominates the build time and the files are independent.
    let compiled: Vec<Compiled> = std::thread::scope(|s| {
        let jobs: Vec<_> = sources
            .iter()
            .map(|src| s.spawn(|| compile(&nvcc, &ptxas, src, &out_dir, &arch, max_isa, &extra)))
            .collect();
        jobs.into_iter().map(|j| j.join().expect("compile thread")).collect()
    });

    let verbose = env::var("JV4_PTXAS_VERBOSE").is_ok_and(|v| v == "1");
    // target/<profile>/ptxas/: three levels above OUT_DIR (target/<profile>/build/<pkg>/out).
    let report_dir = out_dir.ancestors().nth(3).map(|p| p.join("ptxas"));
    for c in &compiled {
        if let Some(dir) = &report_dir {
            let _ = fs::create_dir_all(dir);
            let _ = fs::write(dir.join(format!("{}.txt", c.stem)), &c.report);
        }
        if verbose {
            for line in c.report.lines() {
                println!("cargo:warning={}: {line}", c.stem);
            }
        }
    }
    write_table(&out_dir, &arch, &compiled);
}

struct Compiled {
    stem: String,
    entries: Vec<String>,
    report: String,
}

fn compile(
    nvcc: &Path,
    ptxas: &Path,
    src: &Path,
    out_dir: &Path,
    arch: &str,
    max_isa: (u32, u32),
    extra: &[String],
) -> Compiled {
    let stem = src.file_stem().unwrap().to_string_lossy().to_string();
    let ptx = out_dir.join(format!("{stem}.ptx"));
    let cubin = out_dir.join(format!("{stem}.cubin"));
    let kernels_dir = src.parent().unwrap();
    run(Command::new(nvcc)
        .arg("-ptx")
        .arg(format!("-arch={arch}"))
        .args(["-O3", "-std=c++17", "-lineinfo"])
        .arg(format!("-I{}", kernels_dir.display()))
        .args(extra)
        .arg("-o")
        .arg(&ptx)
        .arg(src));

    let text = fs::read_to_string(&ptx).expect("read ptx");
    let isa = text
        .lines()
        .find_map(|l| l.trim().strip_prefix(".version "))
        .map(parse_isa)
        .unwrap_or_else(|| panic!("{}: no .version line in PTX", ptx.display()));
    if isa > max_isa {
        panic!(
            "\n\njv4: {stem}.ptx has PTX ISA {}.{}, above {}.{} (JV4_MAX_PTX_ISA), which the CUDA 13.0 \
             driver rejects. Use nvcc 13.0 exactly:\n\n    {PIP_FIX}\n\n",
            isa.0, isa.1, max_isa.0, max_isa.1
        );
    }
    // `.visible .entry name(` marks each extern "C" __global__ function.
    let entries = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix(".visible .entry "))
        .map(|l| l.split('(').next().unwrap().trim().to_string())
        .collect();

    let ptxas_arch = arch.trim_start_matches("compute_");
    let out = run(Command::new(ptxas)
        .arg(format!("-arch={ptxas_arch}"))
        .args(["-O3", "-v"])
        .arg(&ptx)
        .arg("-o")
        .arg(&cubin));
    Compiled { stem, entries, report: out }
}

/// Runs a command, returns its stderr+stdout, and fails the build with both on error.
fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        panic!("\n\njv4: command failed: {cmd:?}\n{text}\n");
    }
    text
}

fn parse_isa(s: &str) -> (u32, u32) {
    let mut it = s.trim().split('.');
    let major = it.next().and_then(|v| v.parse().ok()).unwrap_or(0);
    let minor = it.next().and_then(|v| v.parse().ok()).unwrap_or(0);
    (major, minor)
}

fn find_nvcc(manifest_dir: &Path) -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Ok(p) = env::var("NVCC") {
        candidates.push(p.into());
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Ok(p) = env::var(var) {
            candidates.push(Path::new(&p).join("bin/nvcc"));
        }
    }
    // The pip wheels' real nvcc (a symlink to it would not find its headers).
    for dir in manifest_dir.ancestors() {
        candidates.push(dir.join(".cuda/nvidia/cu13/bin/nvcc"));
    }
    if let Some(path) = env::var_os("PATH") {
        candidates.extend(env::split_paths(&path).map(|d| d.join("nvcc")));
    }
    candidates.push("/usr/local/cuda/bin/nvcc".into());
    candidates.into_iter().find(|p| p.is_file())
}

/// dlopen() from the executable searches its RUNPATH: list where the GPU hosts keep the CUDA
/// libraries, so that cuBLAS is found without LD_LIBRARY_PATH.
fn add_cuda_runpaths() {
    for dir in [
        "/usr/local/cuda/lib64",
        "/usr/local/cuda/targets/x86_64-linux/lib",
        "/usr/local/cuda-13.0/lib64",
        "/usr/local/cuda-13.0/targets/x86_64-linux/lib",
        "/usr/local/nvidia/lib64",
        "/opt/torch/.venv/lib/python3.12/site-packages/nvidia/cu13/lib",
    ] {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    }
}

fn camel(symbol: &str) -> String {
    symbol
        .split('_')
        .map(|w| {
            let mut c = w.chars();
            c.next().map(|f| f.to_ascii_uppercase().to_string() + c.as_str()).unwrap_or_default()
        })
        .collect()
}

fn write_table(out_dir: &Path, arch: &str, compiled: &[Compiled]) {
    let mut s = String::new();
    writeln!(s, "// Generated by build.rs from kernels/*.cu. Do not edit.").unwrap();
    writeln!(s, "/// Target the kernels were compiled for.").unwrap();
    writeln!(s, "pub const CUDA_ARCH: &str = {arch:?};").unwrap();
    writeln!(s, "/// One compiled `kernels/<name>.cu`.").unwrap();
    writeln!(s, "pub const MODULES: &[ModuleSource] = &[").unwrap();
    for c in compiled {
        let stem = &c.stem;
        writeln!(
            s,
            "    ModuleSource {{ name: {stem:?}, \
             ptx: include_str!(concat!(env!(\"OUT_DIR\"), \"/{stem}.ptx\")), \
             cubin: include_bytes!(concat!(env!(\"OUT_DIR\"), \"/{stem}.cubin\")), \
             ptxas_report: {:?} }},",
            c.report
        )
        .unwrap();
    }
    writeln!(s, "];").unwrap();
    writeln!(s, "/// Every `extern \"C\" __global__` kernel, named after its symbol.").unwrap();
    writeln!(s, "#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]").unwrap();
    writeln!(s, "pub enum KernelId {{").unwrap();
    for c in compiled {
        for e in &c.entries {
            writeln!(s, "    /// `{e}` in `kernels/{}.cu`", c.stem).unwrap();
            writeln!(s, "    {},", camel(e)).unwrap();
        }
    }
    writeln!(s, "}}").unwrap();
    writeln!(s, "impl KernelId {{").unwrap();
    writeln!(s, "    /// All kernels, in module order.").unwrap();
    writeln!(s, "    pub const ALL: &'static [KernelId] = &[").unwrap();
    for c in compiled {
        for e in &c.entries {
            writeln!(s, "        KernelId::{},", camel(e)).unwrap();
        }
    }
    writeln!(s, "    ];").unwrap();
    writeln!(s, "    /// The kernel's symbol in its module.").unwrap();
    writeln!(s, "    pub fn symbol(self) -> &'static str {{").unwrap();
    writeln!(s, "        match self {{").unwrap();
    let mut any = false;
    for c in compiled {
        for e in &c.entries {
            any = true;
            writeln!(s, "            KernelId::{} => {e:?},", camel(e)).unwrap();
        }
    }
    if !any {
        writeln!(s, "            _ => unreachable!(),").unwrap();
    }
    writeln!(s, "        }}").unwrap();
    writeln!(s, "    }}").unwrap();
    writeln!(s, "    /// Index into `MODULES` of the file that defines the kernel.").unwrap();
    writeln!(s, "    pub fn module(self) -> usize {{").unwrap();
    writeln!(s, "        match self {{").unwrap();
    for (i, c) in compiled.iter().enumerate() {
        for e in &c.entries {
            writeln!(s, "            KernelId::{} => {i},", camel(e)).unwrap();
        }
    }
    if !any {
        writeln!(s, "            _ => unreachable!(),").unwrap();
    }
    writeln!(s, "        }}").unwrap();
    writeln!(s, "    }}").unwrap();
    writeln!(s, "}}").unwrap();
    fs::write(out_dir.join("kernels.rs"), s).expect("write kernels.rs");
}
