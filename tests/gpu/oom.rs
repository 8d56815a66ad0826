//! Forced out-of-memory splits (issue 12, deliverable 5): the same requests through engines whose
//! activation budgets are so small that packed forwards run out of memory and the worker bisects
//! them. Every request is answered exactly once, in order, with the vectors of a roomy engine bit
//! for bit (the GPU engine is batch-invariant), and a request that cannot fit even alone gets a
//! clear `OutOfMemory` while the others are served. The synthetic tiny model keeps it fast; its
//! forwards take whole 2 MiB pages per tensor, so a few tens of MiB are already tight.

use std::path::{Path, PathBuf};

use crate::harness::Ctx;
use jv4::{Device, Embedding, Error, OutputKind, PromptName, Request, Task};

use crate::engine::engine_cases;

fn image(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/images").join(name)
}

/// Texts of 1 to ~300 tokens over every task and output, two images, token ids, one bad request
/// (a width the model does not have) and one long text (~6000 tokens) that the small budgets
/// cannot hold even alone.
fn requests() -> Vec<Request> {
    let words = ["sun", "river", "stone", "glass", "north", "copper", "eleven", "maple", "quiet", "delta"];
    let mut reqs: Vec<Request> = (0..40)
        .map(|i| {
            let n = 1 + (i * 53) % 300;
            let text: Vec<&str> = (0..n).map(|j| words[(i * 7 + j * 3) % words.len()]).collect();
            let prompt = if i % 2 == 0 { PromptName::Query } else { PromptName::Passage };
            let output = [OutputKind::Single, OutputKind::Multi, OutputKind::Both][i % 3];
            let mut r = Request::text(text.join(" ")).task(Task::ALL[i % 3]).prompt(prompt).output(output);
            if i % 5 == 3 {
                r = r.dims(128);
            }
            r
        })
        .collect();
    reqs.insert(5, Request::image_path(image("grad_224x224.png")).output(OutputKind::Both));
    reqs.insert(17, Request::image_path(image("tall_588x84.png")).task(Task::Code));
    reqs.insert(23, Request::tokens((0..90u32).map(|t| 5 + t * 11 % 1500).collect::<Vec<u32>>()));
    reqs.insert(29, Request::text("a width the model does not have").dims(300));
    let long: Vec<&str> = (0..6000).map(|j| words[(j * 7) % words.len()]).collect();
    reqs.insert(33, Request::text(long.join(" ")).output(OutputKind::Both));
    reqs
}

/// The index of the bad request and of the long one in [`requests`].
const BAD: usize = 29;
const LONG: usize = 33;

fn describe(r: &jv4::Result<Embedding>) -> String {
    match r {
        Ok(e) => format!("an embedding of {} tokens", e.tokens),
        Err(e) => format!("error: {e}"),
    }
}

pub fn oom_splits_serve_every_request_bitwise(_ctx: &mut Ctx) -> Result<(), String> {
    let m = engine_cases::Model::new()?;
    let reqs = requests();
    let roomy = m.engine(Device::Cuda(0), |o| o.mem_budget = Some(1 << 30))?;
    let want = roomy.embed(&reqs);
    let roomy_forwards = roomy.stats().forwards;
    let alone: Vec<_> = reqs.iter().map(|r| roomy.embed(std::slice::from_ref(r)).remove(0)).collect();
    drop(roomy);
    for (i, (w, a)) in want.iter().zip(&alone).enumerate() {
        match (i, w, a) {
            (BAD, Err(Error::Input(_)), Err(Error::Input(_))) => {}
            (BAD, _, _) => return Err(format!("the bad request got {} / {}", describe(w), describe(a))),
            (_, Ok(x), Ok(y)) if x == y => {}
            _ => {
                return Err(format!(
                    "roomy engine, request {i}: {} together, {} alone",
                    describe(w),
                    describe(a)
                ))
            }
        }
    }
    let (mut split_budgets, mut oom_alone_budgets) = (0, 0);
    let mut report = Vec::new();
    for mib in [20u64, 28, 36, 48, 64, 96] {
        let e = m.engine(Device::Cuda(0), |o| o.mem_budget = Some(mib << 20))?;
        // Which requests fit this budget at all: alone, in a forward of their own.
        let fits: Vec<bool> = reqs
            .iter()
            .map(|r| !matches!(e.embed(std::slice::from_ref(r)).remove(0), Err(Error::OutOfMemory { .. })))
            .collect();
        let before = e.stats().forwards;
        // Four callers at once, each with all the requests: each gets every answer once, in order.
        let outs: Vec<Vec<jv4::Result<Embedding>>> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..4).map(|_| s.spawn(|| e.embed(&reqs))).collect();
            hs.into_iter().map(|h| h.join().expect("caller")).collect()
        });
        let forwards = e.stats().forwards - before;
        for (c, out) in outs.iter().enumerate() {
            if out.len() != reqs.len() {
                return Err(format!(
                    "{mib} MiB, caller {c}: {} answers for {} requests",
                    out.len(),
                    reqs.len()
                ));
            }
            for (i, got) in out.iter().enumerate() {
                let what = format!("{mib} MiB, caller {c}, request {i}");
                match (got, &want[i]) {
                    (Err(Error::Input(_)), Err(Error::Input(_))) if i == BAD => {}
                    (Err(Error::OutOfMemory { requested, budget, .. }), _) if !fits[i] => {
                        let msg = got.as_ref().unwrap_err().to_string();
                        if *budget == 0 || *requested == 0 || !msg.contains("out of device memory") {
                            return Err(format!("{what}: an unclear out-of-memory error: {msg}"));
                        }
                    }
                    (Ok(g), Ok(w)) if fits[i] => {
                        if g != w {
                            return Err(format!("{what}: not bitwise equal to the roomy engine's result"));
                        }
                    }
                    _ => {
                        return Err(format!(
                            "{what}: got {}, the roomy engine {}, alone under this budget it {}",
                            describe(got),
                            describe(&want[i]),
                            if fits[i] { "fits" } else { "runs out of memory" }
                        ))
                    }
                }
            }
        }
        let served = fits.iter().enumerate().filter(|&(i, &f)| f && i != BAD).count();
        let stats = e.memory().map_err(|e| e.to_string())?;
        if stats.activations_peak > stats.activations_budget {
            return Err(format!(
                "{mib} MiB: peak {} over the budget {}",
                stats.activations_peak, stats.activations_budget
            ));
        }
        if served > 0 && forwards > 4 * roomy_forwards.max(1) {
            split_budgets += 1;
        }
        if !fits[LONG] && served > 0 {
            oom_alone_budgets += 1;
        }
        report.push(format!("{mib} MiB: {served} served, {forwards} forwards for 4 callers"));
        println!(
            "  {mib} MiB: {} of {} requests fit alone; 4 callers x {} requests in {forwards} forwards",
            served,
            reqs.len() - 1,
            reqs.len()
        );
    }
    // The budgets must have done what the test is about.
    if split_budgets == 0 {
        return Err(format!("no budget forced a split: {report:?}"));
    }
    if oom_alone_budgets == 0 {
        return Err(format!(
            "no budget left the long request out of memory while serving the others: {report:?}"
        ));
    }
    Ok(())
}
