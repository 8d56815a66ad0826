//! A real device fault (issue 12, deliverable 5): the engine's hidden `fault_device_after` hook
//! launches `kernels/fault.cu`, whose `__trap()` leaves a genuine sticky CUDA error in the
//! context, before a chosen forward. The engine must turn into `DeviceLost`: the requests of that
//! forward fail with it, every later call gets it at once without touching the device, and
//! `Engine::devices` reports the device lost.
//!
//! A sticky error breaks the process's primary context for that GPU for good, so these tests never
//! run inside the main suite: `JV4_GPU_FAULT=<name> gpu-tests` runs the one named, alone, in a
//! process of its own (tools/gpu_run.sh does, after the suite).

use std::time::{Duration, Instant};

use crate::harness::Ctx;
use jv4::{Device, Error, OutputKind, Request, Task};

use crate::engine::engine_cases;

fn texts(n: usize, tag: &str) -> Vec<Request> {
    (0..n)
        .map(|i| {
            Request::text(format!("{tag} request {i}: {}", "word ".repeat(i % 17))).task(Task::ALL[i % 3])
        })
        .collect()
}

/// One GPU: two forwards served, then the trap before the third; that call's requests fail with
/// `DeviceLost`, and so does every later call, at once.
pub fn device_fault_turns_the_engine_lost(_ctx: &mut Ctx) -> Result<(), String> {
    let m = engine_cases::Model::new()?;
    let e = m.engine(Device::Cuda(0), |o| o.fault_device_after = vec![(0, 2)])?;
    for k in 0..2 {
        for (i, r) in e.embed(&texts(3, "before")).iter().enumerate() {
            r.as_ref().map_err(|e| format!("forward {k}, request {i} before the fault: {e}"))?;
        }
    }
    let t0 = Instant::now();
    let out = e.embed(&texts(5, "faulting"));
    let took = t0.elapsed();
    for (i, r) in out.iter().enumerate() {
        match r {
            Err(Error::DeviceLost(msg)) => {
                if i == 0 {
                    println!(
                        "  the faulting forward's error: {msg} (after {:.0} ms)",
                        took.as_secs_f64() * 1e3
                    );
                }
            }
            other => {
                return Err(format!(
                    "faulting call, request {i}: {:?}, expected DeviceLost",
                    other.as_ref().err()
                ))
            }
        }
    }
    let state = e.devices();
    if state.len() != 1 || state[0].lost.is_none() {
        return Err(format!("the device is not reported lost: {state:?}"));
    }
    // Every later call: DeviceLost at once (no forward, no wait on the device), for every kind of
    // request, from several threads.
    for round in 0..3 {
        let t0 = Instant::now();
        let reqs = vec![
            Request::text("after the fault").output(OutputKind::Both),
            Request::tokens(vec![5u32, 6, 7]),
            Request::image_path(
                std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("tests/fixtures/images/grad_224x224.png"),
            ),
        ];
        let outs: Vec<_> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..4).map(|_| s.spawn(|| e.embed(&reqs))).collect();
            hs.into_iter().map(|h| h.join().expect("caller")).collect()
        });
        let took = t0.elapsed();
        for out in &outs {
            for (i, r) in out.iter().enumerate() {
                if !matches!(r, Err(Error::DeviceLost(_))) {
                    return Err(format!(
                        "round {round}, request {i} after the fault: {:?}",
                        r.as_ref().err()
                    ));
                }
            }
        }
        if took > Duration::from_secs(2) {
            return Err(format!("round {round}: the lost engine took {took:?} to answer"));
        }
    }
    let s = e.stats();
    if s.forwards != 2 {
        return Err(format!("{} forwards counted; expected the 2 before the fault", s.forwards));
    }
    // The host can drop the lost engine (its worker ends; no hang, no panic).
    let t0 = Instant::now();
    drop(e);
    println!(
        "  lost engine dropped in {:.0} ms; later calls answered DeviceLost at once",
        t0.elapsed().as_secs_f64() * 1e3
    );
    Ok(())
}

/// Two GPUs: a fault on the second leaves the first serving every request (bitwise the results of
/// an engine on the first alone). Needs two devices: the engine refuses one GPU listed twice, so
/// on a one-GPU machine this says so and checks nothing.
pub fn device_fault_on_one_of_two_devices(_ctx: &mut Ctx) -> Result<(), String> {
    let count = jv4::model::backend::cuda_device_count().map_err(|e| e.to_string())?;
    if count < 2 {
        println!("  SKIPPED: {count} GPU(s); the engine refuses one device twice (devices must be distinct)");
        return Ok(());
    }
    let m = engine_cases::Model::new()?;
    let reqs = texts(64, "two");
    let want = m.engine(Device::Cuda(0), |_| {})?.embed(&reqs);
    let e = m.engine(Device::Cuda(0), |o| {
        o.devices = vec![Device::Cuda(0), Device::Cuda(1)];
        o.fault_device_after = vec![(1, 0)];
    })?;
    for round in 0..3 {
        let got = e.embed_with(&reqs, &jv4::engine::CallOptions { window: 4, ..Default::default() });
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            match (g, w) {
                (Ok(a), Ok(b)) if a == b => {}
                _ => return Err(format!("round {round}, request {i}: {:?}", g.as_ref().err())),
            }
        }
    }
    let state = e.devices();
    if state[0].lost.is_some() || state[1].lost.is_none() {
        return Err(format!("expected cuda:1 lost and cuda:0 serving: {state:?}"));
    }
    Ok(())
}
