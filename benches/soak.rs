//! `jv4-bench soak`: many mixed requests through ONE [`Engine`] from several caller threads, with
//! every answer checked (issue 12, deliverable 9).
//!
//! - **Inputs.** Request `i` is made from its own seed, when a caller takes it (so the driver holds
//!   only the requests in flight and host memory stays a fair measure). As JSON lines of the
//!   runner's format, parsed by [`parse_line`]: texts (lengths log-uniform over 1 to
//!   `--max-short-tokens`, by default 512, mean ≈ 85, and a `--long-fraction` of a quarter of
//!   `--max-text-tokens` to all of it), images (generated PNG
//!   and JPEG files by path and as base64; a few large ones that the preprocessor resizes down),
//!   every task, both prompts, single / multi / both outputs, Matryoshka widths; and a
//!   `--bad-fraction` of bad lines of several kinds (a text with `<|image_pad|>` or
//!   `<|video_pad|>`, undecodable image bytes, a missing file, a directory, an unknown task, a
//!   width not allowed, not JSON, bad base64), each with the error kind it must get.
//! - **Checks.** Every id answered exactly once; every good request succeeded with the shape it
//!   asked for (widths, unit norm, multi rows = tokens) and, for texts, its own token count; every
//!   bad one failed with its kind and a message naming the cause; a sample (`--recheck-every`)
//!   embedded again alone at the end equals its result bit for bit.
//! - **Memory.** After a warm-up (the extremes: the longest text, the large images, a full
//!   forward of short texts, then `--warmup` requests of the mix) and at the end: the device
//!   memory in use (driver), the allocator's mapped activation pages, the cuBLASLt plans and the
//!   host RSS. Growth past `--device-tolerance` / `--rss-tolerance` fails the run.
//!
//! The last line is the summary: `soak: PASS ...` or `soak: FAIL ...` (and a non-zero exit).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use jv4::engine::jsonl::{parse_line, Defaults, Line};
use jv4::engine::output::base64_encode;
use jv4::rng::Rng;
use jv4::{
    Device, Embedding, Engine, EngineOptions, Error, Input, OutputKind, PromptName, Request, Result, Task,
};

/// The settings of one soak run (the `jv4-bench soak` flags).
#[derive(clap::Args)]
pub struct SoakOptions {
    /// A model folder with tokenizer.json (e.g. `jv4 synth --out DIR`).
    #[arg(long)]
    pub model: PathBuf,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cuda")]
    pub device: Device,
    /// Requests in all (the warm-up ones included).
    #[arg(long, default_value_t = 100_000)]
    pub requests: usize,
    /// Caller threads.
    #[arg(long, default_value_t = 8)]
    pub callers: usize,
    #[arg(long, default_value_t = 12)]
    pub seed: u64,
    /// Requests of the mix run before the memory baseline is taken.
    #[arg(long, default_value_t = 2000)]
    pub warmup: usize,
    /// Longest text, in tokens (the warm-up embeds one this long).
    #[arg(long, default_value_t = 32768)]
    pub max_text_tokens: usize,
    /// Short texts are log-uniform over 1 to this many tokens (mean ≈ N / ln N).
    #[arg(long, default_value_t = 512)]
    pub max_short_tokens: usize,
    /// The small images are 1 to this many pixels wide and high (two large ones are added).
    #[arg(long, default_value_t = 448)]
    pub max_image_side: u32,
    /// The two large images are this many pixels on their long side.
    #[arg(long, default_value_t = 2400)]
    pub large_image_side: u32,
    /// Share of the texts that are long (a quarter of --max-text-tokens to all of it).
    #[arg(long, default_value_t = 0.0005)]
    pub long_fraction: f64,
    /// Share of the requests that are images.
    #[arg(long, default_value_t = 0.03)]
    pub image_fraction: f64,
    /// Share of the images that are large (resized down by the preprocessor).
    #[arg(long, default_value_t = 0.05)]
    pub large_image_fraction: f64,
    /// Share of the requests that are bad lines.
    #[arg(long, default_value_t = 0.05)]
    pub bad_fraction: f64,
    /// Most tokens per forward.
    #[arg(long, default_value_t = 16384)]
    pub max_batch_tokens: usize,
    /// Most requests per `embed` call (each call takes 1 to this many, mostly few).
    #[arg(long, default_value_t = 64)]
    pub max_call: usize,
    /// Every Nth good request is embedded again alone at the end and compared bitwise (0: none).
    #[arg(long, default_value_t = 1000)]
    pub recheck_every: usize,
    /// Most growth of device memory after the warm-up (driver-reported use and mapped
    /// activation pages), e.g. 256MiB.
    #[arg(long, default_value = "256MiB", value_parser = |s: &str| jv4::parse_bytes(s))]
    pub device_tolerance: u64,
    /// Most growth of the host RSS after the warm-up.
    #[arg(long, default_value = "256MiB", value_parser = |s: &str| jv4::parse_bytes(s))]
    pub rss_tolerance: u64,
    /// Also write the report to this file.
    #[arg(long)]
    pub log: Option<PathBuf>,
}

/// What a request must get.
#[derive(Clone, Debug)]
enum Expect {
    /// An embedding.
    Ok,
    /// An error of this kind whose message contains the needle.
    Err(&'static str, String),
}

/// The kinds of bad lines, each with what it must fail with.
const BAD_KINDS: [&str; 9] = [
    "image_pad_text",
    "video_pad_text",
    "undecodable_image",
    "missing_image",
    "directory_image",
    "unknown_task",
    "bad_dims",
    "not_json",
    "bad_base64",
];

/// The name of an error's kind (what the counts are kept by). `parse` is a line the runner's
/// parser refused (it never reaches the engine).
fn kind(e: &Error) -> &'static str {
    match e {
        Error::Io { .. } => "io",
        Error::Input(_) => "input",
        Error::Tokenizer(_) => "tokenizer",
        Error::OutOfMemory { .. } => "out_of_memory",
        Error::DeviceLost(_) => "device_lost",
        Error::NonFinite(_) => "non_finite",
        Error::Cancelled(_) => "cancelled",
        Error::Internal(_) => "internal",
        Error::Cuda { .. } => "cuda",
        Error::Kernel { .. } => "kernel",
        Error::Blas(_) => "blas",
        Error::Shape { .. } => "shape",
        _ => "other",
    }
}

/// Images the lines refer to: files by path, and the same bytes for base64 lines.
struct Images {
    files: Vec<PathBuf>,
    base64: Vec<String>,
    /// How many of the last entries are large.
    large: usize,
    dir: PathBuf,
}

/// A smooth random picture with some noise (never flat: every patch differs).
fn picture(rng: &mut Rng, w: u32, h: u32) -> image::RgbImage {
    let (a, b, c) = (rng.uniform(0.5, 4.0), rng.uniform(0.5, 4.0), rng.uniform(0.0, std::f32::consts::TAU));
    image::RgbImage::from_fn(w, h, |x, y| {
        let (u, v) = (x as f32 / w as f32, y as f32 / h as f32);
        let n = (rng.next_u64() & 31) as f32;
        let ch = |k: f32| {
            ((((a * u + k) * std::f32::consts::TAU).sin() * (b * v * std::f32::consts::TAU + c + k).cos()
                + 1.0)
                * 110.0
                + n) as u8
        };
        image::Rgb([ch(0.0), ch(0.33), ch(0.66)])
    })
}

fn make_images(dir: &Path, rng: &mut Rng, side: u32, large: u32) -> Result<Images> {
    let io = |e: image::ImageError| Error::Internal(format!("soak: writing an image: {e}"));
    let side = side.max(2) as usize;
    let mut sizes: Vec<(u32, u32)> =
        (0..14).map(|_| (1 + rng.below(side) as u32, 1 + rng.below(side) as u32)).collect();
    let large = large.max(2);
    sizes.extend([(1, 1), (large, large / 4 * 3), (large / 2, large)]);
    let large = 2;
    let mut files = Vec::new();
    let mut base64 = Vec::new();
    for (k, &(w, h)) in sizes.iter().enumerate() {
        let img = picture(rng, w, h);
        let path = dir.join(format!("img{k}.{}", if k % 3 == 1 { "jpg" } else { "png" }));
        img.save(&path).map_err(io)?;
        let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        base64.push(base64_encode(&bytes));
        files.push(path);
    }
    Ok(Images { files, base64, large, dir: dir.to_path_buf() })
}

/// Words for the texts (common English, some digits and non-ASCII, so several tokens per word).
const WORDS: [&str; 40] = [
    "the",
    "of",
    "and",
    "a",
    "to",
    "in",
    "is",
    "you",
    "that",
    "it",
    "he",
    "was",
    "for",
    "on",
    "are",
    "as",
    "with",
    "his",
    "they",
    "at",
    "be",
    "this",
    "have",
    "from",
    "or",
    "one",
    "had",
    "by",
    "word",
    "but",
    "not",
    "what",
    "all",
    "were",
    "we",
    "when",
    "2026",
    "über",
    "データ",
    "∑x",
];

fn words(rng: &mut Rng, n: usize) -> String {
    let mut s = String::with_capacity(n * 5);
    for k in 0..n {
        if k > 0 {
            s.push(if rng.below(12) == 0 { '\n' } else { ' ' });
        }
        s.push_str(WORDS[rng.below(WORDS.len())]);
    }
    s
}

/// One request: its JSON line, the outputs it asks for, and what it must get.
struct Case {
    line: String,
    output: OutputKind,
    expect: Expect,
}

struct Gen<'a> {
    o: &'a SoakOptions,
    images: &'a Images,
    /// Tokens per word of [`WORDS`] under this tokenizer (measured at start).
    tokens_per_word: f64,
    dims: Vec<usize>,
}

impl Gen<'_> {
    fn rng(&self, i: u64) -> Rng {
        Rng::new(self.o.seed ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x5EED)
    }

    /// A text of about `tokens` tokens.
    fn text_of(&self, rng: &mut Rng, tokens: usize) -> String {
        words(rng, ((tokens as f64 / self.tokens_per_word).round() as usize).max(1))
    }

    /// Request `i` of the mix.
    fn case(&self, i: u64) -> Case {
        let mut rng = self.rng(i);
        let task = Task::ALL[rng.below(3)];
        let output = [OutputKind::Single, OutputKind::Multi, OutputKind::Both][rng.below(3)];
        let mut o = serde_json::Map::new();
        o.insert("id".into(), format!("r{i}").into());
        o.insert("task".into(), task.name().into());
        if rng.below(4) == 0 {
            o.insert("dims".into(), self.dims[rng.below(self.dims.len())].into());
        }
        let u = rng.unit() as f64;
        if u < self.o.bad_fraction {
            return self.bad(&mut rng, o, output);
        }
        let u = rng.unit() as f64;
        if u < self.o.image_fraction {
            let n = self.images.files.len();
            let large = (rng.unit() as f64) < self.o.large_image_fraction;
            let k =
                if large { n - 1 - rng.below(self.images.large) } else { rng.below(n - self.images.large) };
            if rng.below(2) == 0 {
                o.insert("image".into(), self.images.files[k].to_string_lossy().into_owned().into());
            } else {
                o.insert("image_base64".into(), self.images.base64[k].clone().into());
            }
        } else {
            let long = (rng.unit() as f64) < self.o.long_fraction;
            let tokens = if long {
                let min = self.o.max_text_tokens / 4;
                min + rng.below((self.o.max_text_tokens - min).max(1))
            } else {
                (rng.unit() as f64 * (self.o.max_short_tokens.max(1) as f64).ln()).exp() as usize
            };
            o.insert("text".into(), self.text_of(&mut rng, tokens).into());
            o.insert("prompt_name".into(), if rng.below(2) == 0 { "query" } else { "passage" }.into());
        }
        Case { line: serde_json::Value::Object(o).to_string(), output, expect: Expect::Ok }
    }

    fn bad(
        &self,
        rng: &mut Rng,
        mut o: serde_json::Map<String, serde_json::Value>,
        output: OutputKind,
    ) -> Case {
        let k = BAD_KINDS[rng.below(BAD_KINDS.len())];
        let e = |kind: &'static str, needle: &str| Expect::Err(kind, needle.to_string());
        o.remove("dims");
        let expect = match k {
            "image_pad_text" | "video_pad_text" => {
                let tok = if k == "image_pad_text" { "<|image_pad|>" } else { "<|video_pad|>" };
                let (n1, n2) = (1 + rng.below(20), rng.below(20));
                let t = format!("{} {tok} {}", words(rng, n1), words(rng, n2));
                o.insert("text".into(), t.into());
                e("input", tok)
            }
            "undecodable_image" => {
                let junk: Vec<u8> = (0..1 + rng.below(600)).map(|_| rng.next_u64() as u8).collect();
                o.insert("image_base64".into(), base64_encode(&junk).into());
                e("input", "image")
            }
            "missing_image" => {
                let p = self.images.dir.join(format!("missing-{}.png", rng.below(1000)));
                o.insert("image".into(), p.to_string_lossy().into_owned().into());
                e("io", "missing-")
            }
            "directory_image" => {
                o.insert("image".into(), self.images.dir.to_string_lossy().into_owned().into());
                e("input", "not a regular file")
            }
            "unknown_task" => {
                o.insert("text".into(), words(rng, 3).into());
                o.insert("task".into(), "summarise".into());
                e("parse", "unknown task")
            }
            "bad_dims" => {
                o.insert("text".into(), words(rng, 3).into());
                o.insert("dims".into(), 300.into());
                e("input", "Matryoshka")
            }
            "not_json" => {
                return Case {
                    line: format!("{{\"text\": \"{}\"", words(rng, 2)),
                    output,
                    expect: e("parse", "not a JSON object"),
                }
            }
            _ => {
                o.insert("image_base64".into(), "@@not base64@@".into());
                e("parse", "image_base64")
            }
        };
        Case { line: serde_json::Value::Object(o).to_string(), output, expect }
    }
}

/// A scratch folder for the images, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Result<TempDir> {
        let p = std::env::temp_dir().join(format!("jv4-soak-{}", std::process::id()));
        std::fs::create_dir_all(&p).map_err(|e| Error::io(&p, e))?;
        Ok(TempDir(p))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Host resident memory (VmRSS of /proc/self/status), bytes; 0 where there is none.
fn rss() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb << 10)
}

/// The C heap (glibc's `mallinfo2`): bytes handed out and bytes freed but kept in its arenas.
/// A host RSS that grows while `in_use` stays flat is the allocator keeping freed memory (its
/// per-thread arenas fill up to a plateau), not a leak. Zero where the C library is not glibc.
#[derive(Clone, Copy, Debug, Default)]
struct Heap {
    in_use: u64,
    free: u64,
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn heap() -> Heap {
    /// glibc's `struct mallinfo2` (malloc.h): ten `size_t` fields.
    #[repr(C)]
    #[derive(Default)]
    struct MallInfo2 {
        arena: usize,
        ordblks: usize,
        smblks: usize,
        hblks: usize,
        hblkhd: usize,
        usmblks: usize,
        fsmblks: usize,
        uordblks: usize,
        fordblks: usize,
        keepcost: usize,
    }
    extern "C" {
        fn mallinfo2() -> MallInfo2;
    }
    // SAFETY: mallinfo2 (glibc ≥ 2.33) takes no arguments and returns a plain struct by value.
    let m = unsafe { mallinfo2() };
    Heap { in_use: (m.uordblks + m.hblkhd) as u64, free: m.fordblks as u64 }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn heap() -> Heap {
    Heap::default()
}

/// Memory figures at one point.
#[derive(Clone, Copy, Debug, Default)]
struct Sample {
    device_used: u64,
    mapped: u64,
    plans: u64,
    graphs: u64,
    captures: u64,
    rss: u64,
    heap: Heap,
}

fn sample(engine: &Engine) -> Result<Sample> {
    let m = engine.memory()?;
    Ok(Sample {
        device_used: m.device_used,
        mapped: m.activations_mapped,
        plans: m.plans,
        graphs: m.graphs,
        captures: m.graph_captures,
        rss: rss(),
        heap: heap(),
    })
}

fn mib(b: u64) -> f64 {
    b as f64 / (1u64 << 20) as f64
}

impl std::fmt::Display for Sample {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "device used {:.0} MiB, activations mapped {:.0} MiB, plans {}, graphs {} ({} captured), \
             host RSS {:.0} MiB (malloc: {:.0} MiB in use, {:.0} MiB free in its arenas)",
            mib(self.device_used),
            mib(self.mapped),
            self.plans,
            self.graphs,
            self.captures,
            mib(self.rss),
            mib(self.heap.in_use),
            mib(self.heap.free)
        )
    }
}

/// What the callers found.
#[derive(Default)]
struct Tally {
    /// (expected kind, got kind) -> count; "ok" for success.
    outcomes: BTreeMap<(String, String), u64>,
    /// The first problems, in words.
    problems: Vec<String>,
    problem_count: u64,
    /// Good requests kept for the bitwise re-check.
    kept: Vec<(usize, Request, Embedding)>,
    tokens: u64,
}

impl Tally {
    fn problem(&mut self, p: String) {
        self.problem_count += 1;
        if self.problems.len() < 20 {
            self.problems.push(p);
        }
    }
}

/// Checks a success against its request.
fn check_ok(engine: &Engine, req: &Request, e: &Embedding) -> std::result::Result<(), String> {
    let cfg = engine.config();
    match (&e.single, req.output.single()) {
        (Some(s), true) => {
            let want = req.dims.unwrap_or(cfg.text.hidden_size);
            if s.len() != want {
                return Err(format!("single of {} values, asked for {want}", s.len()));
            }
            let n = s.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
            if (n - 1.0).abs() > 1e-3 {
                return Err(format!("single vector of norm {n}"));
            }
        }
        (None, false) => {}
        _ => return Err("single vector present/absent against the request".into()),
    }
    match (&e.multi, req.output.multi()) {
        (Some(m), true) if m.rows() == e.tokens && m.dim == cfg.multi_vector_projector_dim => {}
        (None, false) => {}
        _ => return Err(format!("multi-vector of the wrong shape ({} tokens)", e.tokens)),
    }
    if e.tokens == 0 {
        return Err("0 tokens".into());
    }
    if let Input::Text(t) = &req.input {
        let want = engine
            .tokenizer()
            .encode_prompted(req.task, req.prompt, t, engine.truncation())
            .map_err(|e| format!("the check's own tokenizing failed: {e}"))?;
        if want.ids.len() != e.tokens || want.dropped != e.dropped {
            return Err(format!(
                "{} tokens ({} dropped), its text has {} ({} dropped): another request's result?",
                e.tokens,
                e.dropped,
                want.ids.len(),
                want.dropped
            ));
        }
    }
    Ok(())
}

/// Runs requests `[from, to)` of the mix from `callers` threads, `max_call` at most per call.
#[allow(clippy::too_many_arguments)]
fn drive(
    engine: &Engine,
    gen: &Gen,
    defaults: &Defaults,
    from: usize,
    to: usize,
    answered: &[AtomicU8],
    tally: &Mutex<Tally>,
    progress: &(dyn Fn(usize) + Sync),
) {
    let next = AtomicUsize::new(from);
    let done = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..gen.o.callers.max(1) {
            s.spawn(|| loop {
                // The call's size comes from its first index: 1..=max_call, mostly small.
                let size = {
                    let mut r = gen.rng(!(next.load(Ordering::Relaxed) as u64));
                    1 + (r.unit().powi(2) * gen.o.max_call as f32) as usize
                };
                let a = next.fetch_add(size, Ordering::Relaxed);
                if a >= to {
                    return;
                }
                let b = (a + size).min(to);
                let mut local = Tally::default();
                let mut reqs = Vec::new();
                let mut meta = Vec::new(); // (index, expect, position in reqs or None)
                for (i, count) in answered.iter().enumerate().take(b).skip(a) {
                    let c = gen.case(i as u64);
                    match parse_line(i + 1, Ok(c.line.into_bytes()), defaults) {
                        Line::Ok(_, mut r) => {
                            r.output = c.output;
                            meta.push((i, c.expect, Some(reqs.len())));
                            reqs.push(r);
                        }
                        Line::Err(_, msg) => {
                            count.fetch_add(1, Ordering::Relaxed);
                            match &c.expect {
                                Expect::Err("parse", needle) if msg.contains(needle.as_str()) => {}
                                want => local
                                    .problem(format!("request {i}: parse error {msg:?}, wanted {want:?}")),
                            }
                            let want = match &c.expect {
                                Expect::Ok => "ok",
                                Expect::Err(k, _) => k,
                            };
                            *local.outcomes.entry((want.into(), "parse".into())).or_default() += 1;
                            meta.push((i, c.expect, None));
                        }
                    }
                }
                let out = engine.embed(&reqs);
                if out.len() != reqs.len() {
                    local.problem(format!("{} results for {} requests", out.len(), reqs.len()));
                }
                for (i, expect, pos) in meta {
                    let Some(p) = pos else { continue };
                    let Some(r) = out.get(p) else { continue };
                    answered[i].fetch_add(1, Ordering::Relaxed);
                    let req = &reqs[p];
                    let want = match &expect {
                        Expect::Ok => "ok",
                        Expect::Err(k, _) => k,
                    };
                    let got = match r {
                        Ok(_) => "ok",
                        Err(e) => kind(e),
                    };
                    *local.outcomes.entry((want.into(), got.into())).or_default() += 1;
                    match (&expect, r) {
                        (Expect::Ok, Ok(e)) => {
                            local.tokens += e.tokens as u64;
                            if let Err(m) = check_ok(engine, req, e) {
                                local.problem(format!("request {i}: {m}"));
                            } else if gen.o.recheck_every > 0 && i % gen.o.recheck_every == 0 {
                                local.kept.push((i, req.clone(), e.clone()));
                            }
                        }
                        (Expect::Err(k, needle), Err(e))
                            if kind(e) == *k && e.to_string().contains(needle.as_str()) => {}
                        (want, got) => local.problem(format!(
                            "request {i}: wanted {want:?}, got {}",
                            match got {
                                Ok(e) => format!("an embedding of {} tokens", e.tokens),
                                Err(e) => format!("{} error: {e}", kind(e)),
                            }
                        )),
                    }
                }
                let mut t = tally.lock().unwrap_or_else(|p| p.into_inner());
                for (k, v) in local.outcomes {
                    *t.outcomes.entry(k).or_default() += v;
                }
                t.problem_count += local.problem_count;
                for p in local.problems {
                    if t.problems.len() < 20 {
                        t.problems.push(p);
                    }
                }
                t.kept.extend(local.kept);
                t.tokens += local.tokens;
                drop(t);
                let before = done.fetch_add(b - a, Ordering::Relaxed);
                progress(before + (b - a));
            });
        }
    });
}

pub fn run(o: &SoakOptions) -> Result<()> {
    let mut log: Box<dyn Write> = match &o.log {
        Some(p) => Box::new(std::fs::File::create(p).map_err(|e| Error::io(p, e))?),
        None => Box::new(std::io::sink()),
    };
    let mut say = |s: String| {
        println!("{s}");
        let _ = writeln!(log, "{s}");
    };
    let t0 = Instant::now();
    let opts = EngineOptions {
        device: o.device,
        max_batch_tokens: o.max_batch_tokens,
        preprocess_threads: 2,
        ..EngineOptions::default()
    };
    let engine = Engine::open(&o.model, opts)?;
    say(format!(
        "soak: {} on {}, opened in {:.1} s; {} requests from {} callers (seed {})",
        o.model.display(),
        engine.describe(),
        t0.elapsed().as_secs_f64(),
        o.requests,
        o.callers,
        o.seed
    ));
    let dir = TempDir::new()?;
    let mut rng = Rng::new(o.seed);
    let images = make_images(&dir.0, &mut rng, o.max_image_side, o.large_image_side)?;
    let probe = words(&mut rng, 2000);
    let tok =
        engine.tokenizer().encode_prompted(Task::Retrieval, PromptName::Query, &probe, Default::default())?;
    let gen = Gen {
        o,
        images: &images,
        tokens_per_word: (tok.ids.len() as f64 / 2000.0).max(0.1),
        dims: engine.config().matryoshka_dims.clone(),
    };
    let defaults = Defaults {
        task: Task::Retrieval,
        prompt: PromptName::Query,
        output: OutputKind::Single,
        dims: None,
        limits: engine.limits().clone(),
    };

    // Warm-up: the extremes first (the longest text, each large image, a full forward of short
    // texts, every bad kind), then the first `warmup` requests of the mix.
    let mut extremes = vec![
        Request::text(gen.text_of(&mut rng, o.max_text_tokens)).output(OutputKind::Both),
        Request::text(gen.text_of(&mut rng, o.max_batch_tokens.min(o.max_text_tokens)))
            .output(OutputKind::Both),
    ];
    for p in &images.files[images.files.len() - images.large..] {
        extremes.push(Request::image_path(p).output(OutputKind::Both));
    }
    let shorts: Vec<Request> = (0..o.max_batch_tokens / 64)
        .map(|k| Request::text(gen.text_of(&mut rng, 60)).task(Task::ALL[k % 3]).output(OutputKind::Both))
        .collect();
    let tw = Instant::now();
    for r in engine.embed(&extremes).iter().chain(&engine.embed(&shorts)) {
        if let Err(e) = r {
            return Err(Error::Internal(format!("soak: a warm-up request failed: {e}")));
        }
    }
    let answered: Vec<AtomicU8> = (0..o.requests).map(|_| AtomicU8::new(0)).collect();
    let tally = Mutex::new(Tally::default());
    let warm = o.warmup.min(o.requests);
    drive(&engine, &gen, &defaults, 0, warm, &answered, &tally, &|_| {});
    engine.reset_peak()?;
    let before = sample(&engine)?;
    say(format!(
        "soak: warm-up ({} extremes, {} requests) {:.1} s; {before}",
        extremes.len() + shorts.len(),
        warm,
        tw.elapsed().as_secs_f64()
    ));

    let t1 = Instant::now();
    let stats0 = engine.stats();
    let step = ((o.requests - warm) / 10).max(1);
    let next_report = AtomicUsize::new(step);
    let main = o.requests - warm;
    let progress = |done: usize| {
        if done >= next_report.load(Ordering::Relaxed) && done < main {
            next_report.fetch_add(step, Ordering::Relaxed);
            let s = sample(&engine).map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
            println!("soak: {done}/{main} after {:.1} s; {s}", t1.elapsed().as_secs_f64());
        }
    };
    drive(&engine, &gen, &defaults, warm, o.requests, &answered, &tally, &progress);
    let secs = t1.elapsed().as_secs_f64();
    let after = sample(&engine)?;
    let stats = engine.stats();
    let mut t = tally.into_inner().unwrap_or_else(|p| p.into_inner());

    // Every id exactly once.
    let counts = answered.iter().map(|a| a.load(Ordering::Relaxed));
    let (lost, dup) = counts.fold((0u64, 0u64), |(l, d), c| (l + (c == 0) as u64, d + (c > 1) as u64));
    if lost + dup > 0 {
        t.problem(format!("{lost} request(s) never answered, {dup} answered more than once"));
    }
    // The sample again, alone: bit for bit.
    let kept = std::mem::take(&mut t.kept);
    let mut rechecked = 0;
    for (i, req, e) in &kept {
        match engine.embed(std::slice::from_ref(req)).remove(0) {
            Ok(again) if again == *e => rechecked += 1,
            Ok(_) => t.problem(format!("request {i}: embedded alone again, not bitwise equal")),
            Err(err) => t.problem(format!("request {i}: embedded alone again: {err}")),
        }
    }
    let grow = |a: u64, b: u64| b.saturating_sub(a);
    let dev_growth = grow(before.device_used, after.device_used).max(grow(before.mapped, after.mapped));
    if dev_growth > o.device_tolerance {
        t.problem(format!(
            "device memory grew by {:.0} MiB after warm-up (tolerance {:.0} MiB)",
            mib(dev_growth),
            mib(o.device_tolerance)
        ));
    }
    let rss_growth = grow(before.rss, after.rss);
    if rss_growth > o.rss_tolerance {
        t.problem(format!(
            "host RSS grew by {:.0} MiB after warm-up (tolerance {:.0} MiB)",
            mib(rss_growth),
            mib(o.rss_tolerance)
        ));
    }
    let plan_cap = (jv4::cuda::blas::DEFAULT_PLAN_CAPACITY * engine.devices().len()) as u64;
    if after.plans > plan_cap {
        t.problem(format!("{} cuBLASLt plans cached, more than the bound {plan_cap}", after.plans));
    }
    let graph_cap = (jv4::model::gpu::GRAPH_CACHE * engine.devices().len()) as u64;
    if after.graphs > graph_cap {
        t.problem(format!("{} CUDA graphs held, more than the bound {graph_cap}", after.graphs));
    }

    let mut by_kind: BTreeMap<&str, u64> = BTreeMap::new();
    let (mut good, mut bad) = (0u64, 0u64);
    for ((want, got), n) in &t.outcomes {
        *by_kind.entry(got.as_str()).or_default() += n;
        if want == "ok" {
            good += n;
        } else {
            bad += n;
        }
    }
    say(format!("soak: outcomes (wanted -> got: count): {:?}", t.outcomes));
    for p in &t.problems {
        say(format!("soak: problem: {p}"));
    }
    say(format!(
        "soak: main run {main} requests in {secs:.1} s ({:.0} req/s), {} forwards, {} sequences, {} tokens; end: {after}",
        main as f64 / secs.max(1e-9),
        stats.forwards - stats0.forwards,
        stats.sequences - stats0.sequences,
        stats.tokens - stats0.tokens,
    ));
    let verdict = if t.problem_count == 0 { "PASS" } else { "FAIL" };
    say(format!(
        "soak: {verdict} {} requests ({good} good, {bad} bad) answered exactly once: lost {lost}, duplicated {dup}; \
         by kind {by_kind:?}; problems {} (wrong answers, lost memory); {rechecked}/{} re-embedded alone bitwise equal; \
         device memory +{:.1} MiB (used {:.0} -> {:.0} MiB, mapped {:.0} -> {:.0} MiB, tolerance {:.0}), \
         host RSS {:.0} -> {:.0} MiB (+{:.1}, tolerance {:.0}), plans {} -> {}, graphs {} -> {} ({} captures); {:.1} s in all",
        o.requests,
        t.problem_count,
        kept.len(),
        mib(dev_growth),
        mib(before.device_used),
        mib(after.device_used),
        mib(before.mapped),
        mib(after.mapped),
        mib(o.device_tolerance),
        mib(before.rss),
        mib(after.rss),
        mib(rss_growth),
        mib(o.rss_tolerance),
        before.plans,
        after.plans,
        before.graphs,
        after.graphs,
        after.captures - before.captures,
        t0.elapsed().as_secs_f64()
    ));
    if t.problem_count > 0 {
        return Err(Error::Internal(format!("soak failed: {} problem(s)", t.problem_count)));
    }
    Ok(())
}
