//! A minimal test runner for the GPU suite: one process, one GPU context, tests in order, each
//! isolated by catch_unwind; prints one line per test and ends with `N passed, M failed`.
//! Where no GPU is present it says so and skips everything (exit 0), so CI stays green.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Instant;

use jv4::cuda::Gpu;
use jv4::rng::Rng;
use jv4::Error;

/// What a test gets: the GPU and a random generator with a fresh seed.
pub struct Ctx {
    pub gpu: Gpu,
    pub rng: Rng,
}

/// A test: `Err(message)` or a panic fails it.
pub type TestFn = fn(&mut Ctx) -> Result<(), String>;

pub fn run(tests: &[(&'static str, TestFn)]) -> ! {
    let filter: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    if std::env::args().any(|a| a == "--list") {
        for (name, _) in tests {
            println!("{name}");
        }
        std::process::exit(0);
    }
    let selected: Vec<_> = tests
        .iter()
        .filter(|(n, _)| filter.is_empty() || filter.iter().any(|f| n.contains(f.as_str())))
        .collect();

    let gpu = match Gpu::new(0) {
        Ok(gpu) => gpu,
        Err(Error::NoGpu(why)) => {
            println!("gpu suite: SKIPPED {} GPU tests: {why}", selected.len());
            std::process::exit(0);
        }
        Err(e) => {
            println!("gpu suite: the GPU could not be opened: {e}");
            println!("0 passed, {} failed", selected.len());
            std::process::exit(1);
        }
    };
    let info = gpu.info().clone();
    let (rng, seed) = Rng::from_time();
    println!(
        "gpu suite: {} (sm_{}{}, {} SMs, {:.1} GiB, driver {}), kernels {}, seed {seed}",
        info.name,
        info.compute_capability.0,
        info.compute_capability.1,
        info.sm_count,
        info.total_mem as f64 / (1u64 << 30) as f64,
        info.driver_version,
        info.kernels_arch
    );
    let mut ctx = Ctx { gpu, rng };
    let (mut passed, mut failed) = (0, 0);
    for (name, test) in selected {
        let t0 = Instant::now();
        let result = catch_unwind(AssertUnwindSafe(|| test(&mut ctx)));
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        match result {
            Ok(Ok(())) => {
                passed += 1;
                println!("test {name} ... ok ({ms:.0} ms)");
            }
            Ok(Err(msg)) => {
                failed += 1;
                println!("test {name} ... FAILED ({ms:.0} ms): {msg}");
            }
            Err(panic) => {
                failed += 1;
                let msg = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                println!("test {name} ... FAILED ({ms:.0} ms): panicked: {msg}");
            }
        }
    }
    println!("{passed} passed, {failed} failed");
    std::process::exit(if failed == 0 { 0 } else { 1 });
}

/// Turns any displayable error into the test's failure message.
pub fn e<E: std::fmt::Display>(err: E) -> String {
    err.to_string()
}
