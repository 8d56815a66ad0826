//! Seeded fuzzing on stable Rust (docs/RELIABILITY.md): each target mutates a corpus of valid
//! inputs (bit flips, interesting bytes, truncation, splices, duplicated runs, huge lengths) and
//! feeds the results to one entry point, which must return (`Ok` or `Err`), never panic, never
//! hang (a watchdog fails the run when one input takes longer than `JV4_FUZZ_INPUT_SECS`, default
//! 10 s), and never ask the allocator for one block larger than [`MAX_ALLOC`] (a counting global
//! allocator checks every request).
//!
//! `cargo test --release --test fuzz` runs each target for `JV4_FUZZ_SECS` seconds (default 2);
//! CI runs them longer: `JV4_FUZZ_SECS=60 cargo test --release --test fuzz -- --test-threads 1`.
//! The seed is printed; `JV4_FUZZ_SEED=<n>` replays a run. A failing input is written to
//! `target/fuzz-failures/<target>-<seed>-<iteration>.bin`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jv4::engine::image::{preprocess_bytes, AlphaMode, DecodeLimits, ImageConfig};
use jv4::engine::jsonl::{base64_decode, parse_line, Defaults};
use jv4::engine::text::TextTokenizer;
use jv4::model::synth::{write_checkpoint, Preset, SynthSpec};
use jv4::model::{Checkpoint, Dtype};
use jv4::rng::Rng;
use jv4::{Limits, OutputKind, PromptName, Task, Truncation};

/// The largest single allocation any input may cause: the fuzz limits below (16 MiB decoded
/// image, 1 MiB lines) with room for the decoders' and tokenizer's own tables.
const MAX_ALLOC: usize = 64 << 20;

/// Counts the largest single allocation request of each thread (targets run on their own).
struct Counting;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
    static TRACING: Cell<bool> = const { Cell::new(false) };
}

/// Set by the replay test: print a backtrace for each allocation over [`MAX_ALLOC`].
static TRACE: AtomicUsize = AtomicUsize::new(0);

fn record(size: usize) {
    let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
    if size > MAX_ALLOC
        && TRACE.load(Ordering::Relaxed) != 0
        && TRACING.try_with(|t| !t.replace(true)) == Ok(true)
    {
        eprintln!("allocation of {size} bytes:\n{}", std::backtrace::Backtrace::force_capture());
        let _ = TRACING.try_with(|t| t.set(false));
    }
}

fn take_largest() -> usize {
    LARGEST.with(|l| l.replace(0))
}

// SAFETY: forwards every call to the system allocator unchanged; only records sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        record(layout.size());
        // SAFETY: the caller's contract, forwarded.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        record(layout.size());
        // SAFETY: the caller's contract, forwarded.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract, forwarded.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        record(new_size);
        // SAFETY: the caller's contract, forwarded.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn env_f64(name: &str, default: f64) -> f64 {
    std::env::var(name).ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}

/// One mutation of a corpus entry (with the others for splices).
fn mutate(rng: &mut Rng, corpus: &[Vec<u8>]) -> Vec<u8> {
    let mut v = corpus[rng.below(corpus.len())].clone();
    for _ in 0..1 + rng.below(4) {
        let n = v.len();
        match rng.below(8) {
            0 if n > 0 => {
                let i = rng.below(n);
                v[i] ^= 1 << rng.below(8);
            }
            1 if n > 0 => {
                let i = rng.below(n);
                v[i] = [0, 0xff, 0x7f, 0x80, b'"', b'\\', b'{', b'9'][rng.below(8)];
            }
            2 if n > 0 => v.truncate(rng.below(n)),
            3 => {
                let other = &corpus[rng.below(corpus.len())];
                if !other.is_empty() {
                    let (a, b) = (rng.below(other.len()), rng.below(other.len()));
                    let (a, b) = (a.min(b), a.max(b));
                    let at = rng.below(n + 1);
                    v.splice(at..at, other[a..b].iter().copied());
                }
            }
            4 if n > 0 => {
                let (a, len) = (rng.below(n), 1 + rng.below(64));
                let run: Vec<u8> = v[a..(a + len).min(n)].to_vec();
                let at = rng.below(n + 1);
                for _ in 0..1 + rng.below(8) {
                    v.splice(at..at, run.iter().copied());
                }
            }
            5 if n >= 4 => {
                // A huge length or dimension, little- or big-endian.
                let i = rng.below(n - 3);
                let x: u32 = [u32::MAX, 0x7fff_ffff, 0x0001_0000, 0xffff][rng.below(4)];
                let b = if rng.below(2) == 0 { x.to_le_bytes() } else { x.to_be_bytes() };
                v[i..i + 4].copy_from_slice(&b);
            }
            6 if n > 0 => {
                // A huge decimal number where a digit was (JSON lengths, dims, shapes).
                if let Some(i) = (0..n).map(|k| (k + rng.below(n)) % n).find(|&k| v[k].is_ascii_digit()) {
                    v.splice(i..i + 1, b"99999999999999999999".iter().copied());
                }
            }
            _ => {
                let at = rng.below(n + 1);
                v.insert(at, rng.next_u64() as u8);
            }
        }
    }
    v
}

enum Report {
    Progress,
    Done(u64),
    Failed(u64, String),
}

/// Runs `target` on mutated corpus inputs for the time budget; see the module documentation.
/// A fuzz target: one input in, no result (it must only return).
type Target = Arc<dyn Fn(&[u8]) + Send + Sync>;

fn fuzz(name: &'static str, corpus: Vec<Vec<u8>>, target: Target) {
    if replay(name, &*target) {
        return;
    }
    let secs = env_f64("JV4_FUZZ_SECS", 2.0);
    let cap = Duration::from_secs_f64(env_f64("JV4_FUZZ_INPUT_SECS", 10.0));
    let seed = std::env::var("JV4_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| name.bytes().fold(0x9e37_79b9_u64, |h, b| h.rotate_left(5) ^ b as u64));
    eprintln!("fuzz {name}: seed {seed}, {secs} s (JV4_FUZZ_SEED={seed} replays it)");
    let current = Arc::new(Mutex::new((0u64, Vec::new())));
    let (tx, rx) = mpsc::channel();
    let cur = current.clone();
    std::thread::spawn(move || {
        let mut rng = Rng::new(seed);
        let t0 = Instant::now();
        let mut i = 0u64;
        take_largest(); // the setup's own allocations do not count
                        // Every corpus entry once as it is, then mutations.
        while i < corpus.len() as u64 || t0.elapsed().as_secs_f64() < secs {
            let input = if (i as usize) < corpus.len() {
                corpus[i as usize].clone()
            } else {
                mutate(&mut rng, &corpus)
            };
            *cur.lock().unwrap() = (i, input.clone());
            if let Err(p) = catch_unwind(AssertUnwindSafe(|| target(&input))) {
                let msg = p
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| p.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                let _ = tx.send(Report::Failed(i, format!("panicked: {msg}")));
                return;
            }
            let largest = take_largest();
            if largest > MAX_ALLOC {
                let _ = tx.send(Report::Failed(i, format!("allocated {largest} bytes at once")));
                return;
            }
            i += 1;
            let _ = tx.send(Report::Progress);
        }
        let _ = tx.send(Report::Done(i));
    });
    let save = |i: u64| {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/fuzz-failures");
        let _ = std::fs::create_dir_all(&dir);
        let f = dir.join(format!("{name}-{seed}-{i}.bin"));
        let _ = std::fs::write(&f, &current.lock().unwrap().1);
        f
    };
    loop {
        match rx.recv_timeout(cap) {
            Ok(Report::Progress) => {}
            Ok(Report::Done(n)) => {
                eprintln!("fuzz {name}: {n} inputs, no failure");
                return;
            }
            Ok(Report::Failed(i, msg)) => {
                panic!("fuzz {name}: input {i} {msg}; saved to {}", save(i).display())
            }
            Err(_) => {
                let i = current.lock().unwrap().0;
                panic!(
                    "fuzz {name}: input {i} ran longer than {cap:?} (hang?); saved to {}",
                    save(i).display()
                )
            }
        }
    }
}

/// Runs `target` on the file `JV4_FUZZ_REPLAY` names (when it is set and names this target),
/// with a backtrace printed for every allocation over the cap.
fn replay(name: &str, target: &dyn Fn(&[u8])) -> bool {
    let Some(f) = std::env::var_os("JV4_FUZZ_REPLAY") else { return false };
    if !Path::new(&f).file_name().is_some_and(|n| n.to_string_lossy().starts_with(name)) {
        return true; // another target's input: skip this one
    }
    TRACE.store(1, Ordering::Relaxed);
    target(&std::fs::read(&f).unwrap());
    eprintln!("replayed {}: largest allocation {} bytes", Path::new(&f).display(), take_largest());
    true
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/images")
}

/// Small fixture images (the large ones only slow the loop down).
fn image_corpus() -> Vec<Vec<u8>> {
    ["cmyk_80x64.jpg", "gray16_64x48.png", "gray_100x60.png", "palette_60x60.gif", "plain_50x70.bmp"]
        .iter()
        .chain(["plain_64x64.tiff", "rgba_90x90.png", "round_70x42.png", "partial_196x308.jpg"].iter())
        .map(|n| std::fs::read(fixtures().join(n)).unwrap())
        .chain(std::iter::once(webp_corpus_entry()))
        .collect()
}

/// A small lossless WebP (the fixture is large), made with the `image` crate's encoder.
fn webp_corpus_entry() -> Vec<u8> {
    let img = image::RgbaImage::from_fn(24, 16, |x, y| image::Rgba([x as u8 * 9, y as u8 * 13, 77, 200]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::WebP).unwrap();
    out.into_inner()
}

fn base64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::new();
    for c in bytes.chunks(3) {
        let n = (c[0] as u32) << 16 | (*c.get(1).unwrap_or(&0) as u32) << 8 | *c.get(2).unwrap_or(&0) as u32;
        for k in 0..4 {
            if k <= c.len() {
                s.push(A[(n >> (18 - 6 * k) & 63) as usize] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}

fn small_image_config() -> ImageConfig {
    ImageConfig {
        limits: DecodeLimits { max_pixels: 1 << 20, max_bytes: 16 << 20 },
        max_pixels: 64 * 28 * 28,
        ..ImageConfig::default()
    }
}

#[test]
fn fuzz_jsonl_parser() {
    let d = Defaults {
        task: Task::Retrieval,
        prompt: PromptName::Query,
        output: OutputKind::Single,
        dims: None,
        limits: Limits { max_line_bytes: 1 << 20, max_base64_bytes: 1 << 19, ..Limits::default() },
    };
    let png = std::fs::read(fixtures().join("gray_100x60.png")).unwrap();
    let mut corpus: Vec<Vec<u8>> =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/requests.jsonl"))
            .unwrap()
            .lines()
            .map(|l| l.as_bytes().to_vec())
            .collect();
    for l in [
        r#"{"id": 18446744073709551615, "text": "x", "task": "code", "prompt_name": "passage", "dims": 128}"#,
        r#"{"id": -1.5e-7, "text": "\u00e9\ud83d\ude00 \"quoted\" , {\"id\": 2}", "task": "text-matching"}"#,
        r#"{"id": {"nested": [1, 2, {"id": 3}]}, "image": "/dev/zero", "max_pixels": 3136}"#,
        r#"{"id": "s", "text": "a", "\u0069d": 7, "dims": 2048}"#,
    ] {
        corpus.push(l.as_bytes().to_vec());
    }
    corpus.push(format!(r#"{{"id": 1, "image_base64": "{}"}}"#, base64(&png)).into_bytes());
    let d = Arc::new(d);
    fuzz(
        "jsonl",
        corpus,
        Arc::new(move |input: &[u8]| {
            let _ = parse_line(1, Ok(input.to_vec()), &d);
        }),
    );
}

#[test]
fn fuzz_base64_and_images() {
    let mut corpus = image_corpus();
    // Some as base64 text, decoded first (the image_base64 path).
    let b64: Vec<Vec<u8>> = corpus.iter().take(3).map(|b| base64(b).into_bytes()).collect();
    corpus.extend(b64);
    let cfg = Arc::new(small_image_config());
    fuzz(
        "image",
        corpus,
        Arc::new(move |input: &[u8]| {
            let bytes = match std::str::from_utf8(input).ok().map(base64_decode) {
                Some(Ok(b)) => b,
                _ => input.to_vec(),
            };
            for alpha in [AlphaMode::Drop, AlphaMode::CompositeWhite] {
                if let Ok(p) = preprocess_bytes(&bytes, &cfg, alpha) {
                    assert_eq!(p.pixel_values.len(), p.num_patches() * cfg.row_len());
                    assert!(p.pixel_values.iter().all(|v| v.is_finite()));
                    // smart_resize keeps a side of at least `factor`, so a thin image may end up
                    // above max_pixels, as in the reference; otherwise the area is within it.
                    let (h, w) = p.resized;
                    assert!(h * w <= cfg.max_pixels || h.min(w) == cfg.factor(), "resized to {h}x{w}");
                }
            }
        }),
    );
}

fn tiny_model() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let spec = SynthSpec { seed: 3, preset: Preset::Tiny, adapter_dtype: Dtype::BF16 };
    write_checkpoint(dir.path(), &spec).unwrap();
    dir
}

#[test]
fn fuzz_tokenizer_front_end() {
    let dir = tiny_model();
    let tok = Arc::new(TextTokenizer::from_model_dir(dir.path()).unwrap());
    let corpus: Vec<Vec<u8>> = [
        "What is the capital of France?",
        "def f(x):\n    return x ** 2  # square\n",
        "<|image_pad|><|vision_start|>x<|vision_end|><|video_pad|><|im_start|>user\n<|im_end|>",
        "日本語のテキストと emoji 😀👍🏽 and combining e\u{301}\u{302}",
        "1234567890 1234567890 1234567890 ..... !!!!!! \t\t\r\n\u{0}\u{feff}",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    fuzz(
        "tokenizer",
        corpus,
        Arc::new(move |input: &[u8]| {
            // The first byte picks the task, prompt and truncation; the rest is the text.
            let (ctl, rest) = input.split_first().map_or((0, &[][..]), |(c, r)| (*c, r));
            let text = String::from_utf8_lossy(rest);
            let task = Task::ALL[ctl as usize % Task::ALL.len()];
            let prompt = if ctl & 8 == 0 { PromptName::Query } else { PromptName::Passage };
            let trunc = Truncation { max_length: (ctl as usize >> 4) * 3, strict: ctl & 4 != 0 };
            let items = [(task, prompt, &*text), (task, prompt, "ok")];
            for e in tok.encode_batch_prompted(&items, trunc).into_iter().flatten() {
                {
                    assert!(!e.ids.is_empty() && e.ids.len() <= trunc.max_length, "{} ids", e.ids.len());
                    assert!(!trunc.strict || e.dropped == 0);
                }
            }
        }),
    );
}

#[test]
fn fuzz_checkpoint_loader() {
    let good = tiny_model();
    let scratch = tempfile::tempdir().unwrap();
    let files = [
        "config.json",
        "preprocessor_config.json",
        "model.safetensors.index.json",
        "adapters/adapter_config.json",
    ];
    let shards = [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "adapters/adapter_model.safetensors",
    ];
    copy_dir(good.path(), scratch.path());
    // Corpus entries: one byte naming the file, then its contents (a shard: its header and the
    // start of its data, which is all that open reads).
    let mut corpus = Vec::new();
    for (k, f) in files.iter().chain(shards.iter()).enumerate() {
        let mut bytes = std::fs::read(good.path().join(f)).unwrap();
        if k >= files.len() {
            let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
            bytes.truncate((8 + n + 4096).min(bytes.len()));
        }
        let mut e = vec![k as u8];
        e.extend(bytes);
        corpus.push(e);
    }
    let (good, scratch) = (Arc::new(good), Arc::new(scratch));
    fuzz(
        "checkpoint",
        corpus,
        Arc::new(move |input: &[u8]| {
            let Some((&k, body)) = input.split_first() else { return };
            let all: Vec<&str> = files.iter().chain(shards.iter()).copied().collect();
            let name = all[k as usize % all.len()];
            let path = scratch.path().join(name);
            let original = std::fs::read(good.path().join(name)).unwrap();
            let mut bytes = body.to_vec();
            if k as usize % all.len() >= files.len() && bytes.len() < original.len() && k & 0x80 == 0 {
                // Keep the rest of the shard's data behind a mutated header prefix.
                bytes.extend_from_slice(&original[bytes.len()..]);
            }
            std::fs::write(&path, &bytes).unwrap();
            if let Ok(ck) = Checkpoint::open(scratch.path()) {
                // Whatever opens must read without a panic (a read may fail: a file cut short).
                for t in ck.tensors() {
                    let _ = ck.to_bf16(t);
                }
            }
            std::fs::write(&path, &original).unwrap();
        }),
    );
}

fn copy_dir(from: &Path, to: &Path) {
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dst = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            std::fs::create_dir_all(&dst).unwrap();
            copy_dir(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), &dst).unwrap();
        }
    }
}
