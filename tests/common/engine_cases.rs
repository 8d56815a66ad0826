//! Engine-level tests, one body for both backends: `tests/engine.rs` runs them on the CPU backend
//! (in CI), the GPU suite on CUDA. Each takes the device and returns `Err(message)` on failure.
//!
//! The model is a synthetic tiny checkpoint written with its tokenizer (`jv4 synth`). Every
//! comparison of a request's vectors across batches is bitwise, on both backends: the GPU's GEMMs
//! keep to cuBLASLt algorithms without split-K (src/cuda/blas.rs) and its attention has no
//! batch-dependent split, so a request's vectors do not depend on what shares its forward.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use jv4::model::synth::{write_checkpoint, Preset, SynthSpec};
use jv4::model::Dtype;
use jv4::{Device, Embedding, Engine, EngineOptions, Error, OutputKind, PromptName, Request, Task};

/// A synthetic tiny model folder (checkpoint + tokenizer.json) in a temporary directory.
pub struct Model {
    pub dir: tempfile::TempDir,
}

impl Model {
    pub fn new() -> Result<Model, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let spec = SynthSpec { seed: 11, preset: Preset::Tiny, adapter_dtype: Dtype::BF16 };
        write_checkpoint(dir.path(), &spec).map_err(|e| e.to_string())?;
        Ok(Model { dir })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn engine(&self, device: Device, f: impl FnOnce(&mut EngineOptions)) -> Result<Engine, String> {
        let mut opts = EngineOptions { device, preprocess_threads: 2, ..EngineOptions::default() };
        f(&mut opts);
        Engine::open(self.path(), opts).map_err(|e| format!("open the engine on {device}: {e}"))
    }
}

fn image(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/images").join(name)
}

/// Texts, images and token ids over every task, prompt, output kind and a Matryoshka width.
pub fn mixed_requests() -> Vec<Request> {
    let texts = [
        "What is the capital of France?",
        "Paris is the capital and largest city of France.",
        "fn main() { println!(\"hello\"); }",
        "",
        "Ein kurzer deutscher Satz über Katzen.",
        "日本語のテキストも埋め込めます。",
        "emoji 🙂🚀 and symbols ∑∫√",
        "a somewhat longer passage that goes on for a while so that the sequences of one batch have \
         clearly different lengths, which is what packing is about",
    ];
    let mut reqs = Vec::new();
    for (i, t) in texts.iter().enumerate() {
        let task = Task::ALL[i % 3];
        let prompt = if i % 2 == 0 { PromptName::Query } else { PromptName::Passage };
        let output = [OutputKind::Single, OutputKind::Multi, OutputKind::Both][i % 3];
        let mut r = Request::text(*t).task(task).prompt(prompt).output(output);
        if i % 4 == 1 {
            r = r.dims(128);
        }
        reqs.push(r);
    }
    reqs.insert(2, Request::image_path(image("grad_224x224.png")).output(OutputKind::Both));
    let bytes = std::fs::read(image("tall_588x84.png")).expect("fixture image");
    reqs.insert(5, Request::image_bytes(bytes).task(Task::Code).dims(256));
    reqs.push(
        Request::tokens(vec![5u32, 17, 42, 99, 3, 8]).task(Task::TextMatching).output(OutputKind::Both),
    );
    reqs
}

/// Checks one result against another: bitwise when `exact`, else by cosine.
fn same(what: &str, a: &Embedding, b: &Embedding, exact: bool) -> Result<(), String> {
    if a.tokens != b.tokens || a.dropped != b.dropped {
        return Err(format!("{what}: tokens {}/{} vs {}/{}", a.tokens, a.dropped, b.tokens, b.dropped));
    }
    if a.single.is_some() != b.single.is_some() || a.multi.is_some() != b.multi.is_some() {
        return Err(format!("{what}: different outputs present"));
    }
    if exact {
        if a != b {
            return Err(format!("{what}: not bitwise equal"));
        }
        return Ok(());
    }
    if let (Some(x), Some(y)) = (&a.single, &b.single) {
        let c = cos(x, y);
        if c < 0.9999 {
            return Err(format!("{what}: single cos {c:.6}"));
        }
    }
    if let (Some(x), Some(y)) = (&a.multi, &b.multi) {
        for r in 0..x.rows() {
            let c = cos(x.row(r), y.row(r));
            if c < 0.999 {
                return Err(format!("{what}: multi row {r} cos {c:.6}"));
            }
        }
    }
    Ok(())
}

fn cos(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum();
    let na: f64 = a.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb).max(1e-300)
}

fn ok(what: &str, r: &jv4::Result<Embedding>) -> Result<Embedding, String> {
    r.clone().map_err(|e| format!("{what}: unexpected error: {e}"))
}

/// Every result has the shape its request asked for.
fn check_shape(engine: &Engine, req: &Request, e: &Embedding) -> Result<(), String> {
    let cfg = engine.config();
    if let Some(s) = &e.single {
        let want = req.dims.unwrap_or(cfg.text.hidden_size);
        if s.len() != want || !req.output.single() {
            return Err(format!("single of {} values for {req:?}", s.len()));
        }
        let n: f64 = s.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
        if (n - 1.0).abs() > 1e-4 {
            return Err(format!("single vector norm {n}"));
        }
    } else if req.output.single() {
        return Err(format!("no single vector for {req:?}"));
    }
    match (&e.multi, req.output.multi()) {
        (Some(m), true) if m.rows() == e.tokens && m.dim == cfg.multi_vector_projector_dim => Ok(()),
        (None, false) => Ok(()),
        _ => Err(format!("multi-vector of the wrong shape for {req:?}")),
    }
}

/// A mixed batch (texts, images, ids; all tasks and outputs) equals the same requests sent alone,
/// and comes back in request order.
pub fn mixed_batch_equals_requests_alone(device: Device) -> Result<(), String> {
    let m = Model::new()?;
    let engine = m.engine(device, |_| {})?;
    let reqs = mixed_requests();
    let all = engine.embed(&reqs);
    if all.len() != reqs.len() {
        return Err(format!("{} results for {} requests", all.len(), reqs.len()));
    }
    let tok = engine.tokenizer();
    for (i, (req, r)) in reqs.iter().zip(&all).enumerate() {
        let got = ok(&format!("request {i}"), r)?;
        check_shape(&engine, req, &got)?;
        // In order: a text's token count is its own prompted length.
        if let jv4::Input::Text(t) = &req.input {
            let want = tok
                .encode_prompted(req.task, req.prompt, t, Default::default())
                .map_err(|e| e.to_string())?;
            if want.ids.len() != got.tokens {
                return Err(format!("request {i}: {} tokens, its text has {}", got.tokens, want.ids.len()));
            }
        }
        let alone = engine.embed(std::slice::from_ref(req)).remove(0);
        same(&format!("request {i} in the batch vs alone"), &got, &ok("alone", &alone)?, true)?;
    }
    // And in reverse order: the same vectors.
    let rev: Vec<Request> = reqs.iter().rev().cloned().collect();
    for (i, r) in engine.embed(&rev).iter().rev().enumerate() {
        same(&format!("request {i} reversed"), &ok("reversed", r)?, &ok("first", &all[i])?, true)?;
    }
    Ok(())
}

/// 40 requests (texts of many lengths, all tasks, both outputs, Matryoshka widths, token ids,
/// images) embedded alone, all together, reversed, and under three token budgets (so packed with
/// different neighbours at different offsets): every vector bit-for-bit the same everywhere.
pub fn batch_invariant_bitwise(device: Device) -> Result<(), String> {
    let m = Model::new()?;
    let words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"];
    let mut reqs: Vec<Request> = (0..36)
        .map(|i| {
            let n = 1 + (i * 37) % 40; // 1..40 words
            let text: Vec<&str> = (0..n).map(|j| words[(i + j * 3) % words.len()]).collect();
            let prompt = if i % 2 == 0 { PromptName::Query } else { PromptName::Passage };
            let mut r =
                Request::text(text.join(" ")).task(Task::ALL[i % 3]).prompt(prompt).output(OutputKind::Both);
            if i % 5 == 2 {
                r = r.dims(128);
            }
            r
        })
        .collect();
    reqs.push(
        Request::tokens((0..50u32).map(|t| 3 + t * 7 % 200).collect::<Vec<u32>>())
            .task(Task::Code)
            .output(OutputKind::Both),
    );
    reqs.push(Request::tokens(vec![9u32]).output(OutputKind::Both));
    reqs.insert(7, Request::image_path(image("grad_224x224.png")).output(OutputKind::Both));
    reqs.insert(
        23,
        Request::image_path(image("tall_588x84.png")).task(Task::TextMatching).output(OutputKind::Both),
    );
    assert_eq!(reqs.len(), 40);

    let engine = m.engine(device, |_| {})?;
    let together = engine.embed(&reqs);
    let alone: Vec<_> = reqs.iter().map(|r| engine.embed(std::slice::from_ref(r)).remove(0)).collect();
    let rev: Vec<Request> = reqs.iter().rev().cloned().collect();
    let mut reversed = engine.embed(&rev);
    reversed.reverse();
    drop(engine);
    let mut runs = vec![("together", together), ("reversed", reversed)];
    for (name, budget) in [("budget 64", 64usize), ("budget 300", 300), ("budget 2048", 2048)] {
        let e = m.engine(device, |o| o.max_batch_tokens = budget)?;
        let out = e.embed(&reqs);
        if budget < 2048 && e.stats().forwards < 2 {
            return Err(format!("{name}: {} forward(s), the packing did not change", e.stats().forwards));
        }
        runs.push((name, out));
    }
    for (i, a) in alone.iter().enumerate() {
        let a = ok(&format!("request {i} alone"), a)?;
        for (name, out) in &runs {
            same(&format!("request {i}: {name} vs alone"), &ok(name, &out[i])?, &a, true)?;
        }
    }
    Ok(())
}

/// Eight threads call `embed` at once, each with its own requests: each gets exactly its own
/// results (equal to a single-threaded run).
pub fn concurrent_callers_get_their_own_results(device: Device) -> Result<(), String> {
    let m = Model::new()?;
    let engine = m.engine(device, |o| o.batch_wait = Duration::from_millis(20))?;
    let per_thread: Vec<Vec<Request>> = (0..8)
        .map(|t| {
            (0..5)
                .map(|k| {
                    Request::text(format!("thread {t} request {k}: {}", "word ".repeat(t * 3 + k)))
                        .task(Task::ALL[(t + k) % 3])
                        .output(if k % 2 == 0 { OutputKind::Both } else { OutputKind::Single })
                })
                .collect()
        })
        .collect();
    let expected: Vec<Vec<jv4::Result<Embedding>>> = per_thread.iter().map(|r| engine.embed(r)).collect();
    let barrier = Arc::new(Barrier::new(8));
    let got: Vec<Vec<jv4::Result<Embedding>>> = std::thread::scope(|s| {
        let handles: Vec<_> = per_thread
            .iter()
            .map(|reqs| {
                let (engine, barrier) = (engine.clone(), barrier.clone());
                s.spawn(move || {
                    barrier.wait();
                    engine.embed(reqs)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("caller thread")).collect()
    });
    for (t, (g, w)) in got.iter().zip(&expected).enumerate() {
        for (k, (a, b)) in g.iter().zip(w).enumerate() {
            same(
                &format!("thread {t} request {k}"),
                &ok("concurrent", a)?,
                &ok("alone", b)?,
                device == Device::Cpu,
            )?;
        }
    }
    Ok(())
}

/// Callers that arrive together share forwards (the wait window packs them).
pub fn concurrent_callers_share_forwards(device: Device) -> Result<(), String> {
    let m = Model::new()?;
    let engine = m.engine(device, |o| o.batch_wait = Duration::from_millis(500))?;
    let before = engine.stats();
    let barrier = Arc::new(Barrier::new(6));
    std::thread::scope(|s| {
        for t in 0..6 {
            let (engine, barrier) = (engine.clone(), barrier.clone());
            s.spawn(move || {
                barrier.wait();
                engine.embed(&[Request::text(format!("caller {t}"))])
            });
        }
    });
    let after = engine.stats();
    let (forwards, seqs) = (after.forwards - before.forwards, after.sequences - before.sequences);
    if seqs != 6 || forwards >= 6 {
        return Err(format!(
            "6 callers took {forwards} forwards for {seqs} sequences (expected fewer than 6)"
        ));
    }
    Ok(())
}

/// Bad requests fail alone, each with a message naming what is wrong; the others are served and
/// equal to their results without the bad ones.
pub fn bad_requests_fail_alone(device: Device) -> Result<(), String> {
    let m = Model::new()?;
    let engine = m.engine(device, |_| {})?;
    let vocab = engine.config().text.vocab_size as u32;
    let pad = engine.config().special.image_token_id;
    let good = [
        Request::text("a good text").output(OutputKind::Both),
        Request::text("another one").task(Task::Code),
    ];
    let bad: Vec<(Request, &str)> = vec![
        (Request::text("x").dims(300), "Matryoshka"),
        (Request::image_path("/nonexistent/jv4/x.png"), "/nonexistent/jv4/x.png"),
        (Request::image_bytes(b"not an image at all".to_vec()), "image"),
        (Request::tokens(Vec::<u32>::new()), "no token ids"),
        (Request::tokens(vec![1, vocab + 5]), "outside the vocabulary"),
        (Request::tokens(vec![1, pad, 2]), "<|image_pad|>"),
        (Request::text("a text with <|image_pad|> in it"), "<|image_pad|>"),
        (Request::text("<|video_pad|>"), "<|video_pad|>"),
        (Request::image_path(image("grad_224x224.png")).max_pixels(0), "max_pixels"),
    ];
    let mut reqs = vec![good[0].clone()];
    for (r, _) in &bad {
        reqs.push(r.clone());
    }
    reqs.push(good[1].clone());
    let out = engine.embed(&reqs);
    for (k, (_, needle)) in bad.iter().enumerate() {
        match &out[k + 1] {
            Err(e) if e.to_string().contains(needle) => {}
            Err(e) => return Err(format!("bad request {k}: error {e:?} does not mention {needle:?}")),
            Ok(_) => return Err(format!("bad request {k} ({needle}) was embedded")),
        }
    }
    let clean = engine.embed(&good);
    same("good request 0", &ok("mixed", &out[0])?, &ok("clean", &clean[0])?, device == Device::Cpu)?;
    same(
        "good request 1",
        &ok("mixed", &out[reqs.len() - 1])?,
        &ok("clean", &clean[1])?,
        device == Device::Cpu,
    )?;
    Ok(())
}

/// A token budget so small that every request needs a forward of its own still serves them all,
/// with the same vectors.
pub fn tiny_budget_serves_every_request(device: Device) -> Result<(), String> {
    let m = Model::new()?;
    let reqs = mixed_requests();
    let normal = m.engine(device, |_| {})?.embed(&reqs);
    let engine = m.engine(device, |o| {
        o.max_batch_tokens = 1;
        o.max_batch_patches = 1 << 20;
    })?;
    let before = engine.stats();
    let out = engine.embed(&reqs);
    let forwards = engine.stats().forwards - before.forwards;
    if forwards != reqs.len() as u64 {
        return Err(format!("{forwards} forwards for {} requests under a 1-token budget", reqs.len()));
    }
    for (i, (a, b)) in out.iter().zip(&normal).enumerate() {
        same(
            &format!("request {i} (1-token budget)"),
            &ok("tiny", a)?,
            &ok("normal", b)?,
            device == Device::Cpu,
        )?;
    }
    Ok(())
}

/// A device that cannot be opened is a clear error at `Engine::open`, not later.
pub fn open_errors_are_clear(device: Device) -> Result<(), String> {
    let m = Model::new()?;
    match Engine::open(Path::new("/nonexistent/jv4-model"), EngineOptions { device, ..Default::default() }) {
        Err(e) if e.to_string().contains("/nonexistent/jv4-model") => {}
        Err(e) => return Err(format!("missing folder: {e}")),
        Ok(_) => return Err("a missing folder opened".into()),
    }
    let opts = EngineOptions { device, max_batch_tokens: 0, ..Default::default() };
    match Engine::open(m.path(), opts) {
        Err(Error::Input(msg)) if msg.contains("max_batch_tokens") => Ok(()),
        other => Err(format!("max_batch_tokens 0: {:?}", other.err())),
    }
}

/// A device list of one (`EngineOptions::devices = [device]`, `--devices 0`) is the single-device
/// engine: the mixed requests give bit-for-bit the same vectors, one device is reported, and it
/// did the work.
pub fn device_list_of_one_equals_device(device: Device) -> Result<(), String> {
    let m = Model::new()?;
    let reqs = mixed_requests();
    let single = m.engine(device, |_| {})?.embed(&reqs);
    let listed = m.engine(device, |o| o.devices = vec![device])?;
    let got = listed.embed(&reqs);
    for (i, (a, b)) in single.iter().zip(&got).enumerate() {
        let (a, b) = (ok(&format!("request {i} alone"), a)?, ok(&format!("request {i} listed"), b)?);
        same(&format!("request {i}: devices [{device}] vs device {device}"), &a, &b, true)?;
    }
    let states = listed.devices();
    if states.len() != 1
        || states[0].device != device
        || states[0].lost.is_some()
        || states[0].stats.forwards == 0
    {
        return Err(format!("devices [{device}]: reported {states:?}"));
    }
    Ok(())
}
