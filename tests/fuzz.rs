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

/// Reads a fuzz input as a program: each byte a choice (0 once the input is used up).
struct Program<'a> {
    data: &'a [u8],
    at: usize,
}

impl Program<'_> {
    fn byte(&mut self) -> u8 {
        let b = self.data.get(self.at).copied().unwrap_or(0);
        self.at += 1;
        b
    }
    fn done(&self) -> bool {
        self.at >= self.data.len()
    }
    fn pick(&mut self, n: usize) -> usize {
        self.byte() as usize % n
    }
    fn bytes(&mut self, max: usize) -> Vec<u8> {
        let n = self.pick(max + 1);
        (0..n).map(|_| self.byte()).collect()
    }
    /// A size: small, zero, or huge.
    fn size(&mut self) -> usize {
        match self.pick(8) {
            0 => 0,
            1 => usize::MAX,
            2 => 1 << 40,
            3 => self.byte() as usize * 97,
            _ => self.byte() as usize % 16,
        }
    }
    fn u32(&mut self) -> u32 {
        match self.pick(4) {
            0 => u32::MAX,
            _ => self.byte() as u32 % 5,
        }
    }
}

/// Storage that the raw pointers of one call's requests point into.
#[derive(Default)]
struct Held {
    strings: Vec<std::ffi::CString>,
    bytes: Vec<Vec<u8>>,
    ids: Vec<Vec<u32>>,
    spans: Vec<Vec<jv4::capi::jv4_span>>,
}

impl Held {
    fn string(&mut self, s: &[u8]) -> *const std::ffi::c_char {
        let s: Vec<u8> = s.iter().copied().filter(|&b| b != 0).collect();
        self.strings.push(std::ffi::CString::new(s).unwrap());
        self.strings.last().unwrap().as_ptr()
    }
    /// NULL, a known-good value, or random bytes (invalid UTF-8 included) as a C string.
    fn choice(&mut self, p: &mut Program, good: &[&str]) -> *const std::ffi::c_char {
        match p.pick(good.len() + 2) {
            0 => std::ptr::null(),
            1 => {
                let b = p.bytes(24);
                self.string(&b)
            }
            k => self.string(good[k - 2].as_bytes()),
        }
    }
}

/// The C ABI (src/capi.rs, include/jv4.h) driven by fuzz programs: sequences of calls with NULL
/// pointers, buffers smaller than they say, freed and forged handles, random bytes as UTF-8 /
/// paths / option strings, random inputs, widths, tasks, outputs, chunkings and spans, against CPU
/// engines over a synthetic tiny model (one opened once with a short `max_length`, so long late
/// chunking runs too; others opened and freed by the programs). Every call must return a status
/// (a panic inside is reported as `JV4_ERR_PANIC`, which fails the run; one escaping would abort
/// the process), a failure must fill the error handle with that code and a message, a success
/// must leave it NULL, and every view read back must be consistent and readable.
#[test]
fn fuzz_c_abi() {
    use jv4::capi::*;
    use std::ffi::{c_char, CStr};
    use std::ptr::{null, null_mut};

    let dir = tiny_model();
    let model = std::ffi::CString::new(dir.path().to_str().unwrap()).unwrap();
    let cpu = std::ffi::CString::new("cpu").unwrap();
    let opts = jv4_engine_options {
        model_dir: model.as_ptr(),
        device: cpu.as_ptr(),
        max_length: 48,
        preprocess_threads: 1,
        ..Default::default()
    };
    let mut shared: *mut jv4_engine = null_mut();
    // SAFETY: valid options and out pointer; errors not asked for.
    assert_eq!(unsafe { jv4_engine_open(&opts, &mut shared, null_mut()) }, jv4_status::JV4_OK);
    let png = std::fs::read(fixtures().join("gray_100x60.png")).unwrap();
    let image_path = fixtures().join("round_70x42.png").to_str().unwrap().to_string();
    let (shared_addr, model, png) = (shared.addr(), Arc::new(model), Arc::new(png));

    // Corpus: small programs of valid calls, which mutation turns into invalid ones.
    let corpus: Vec<Vec<u8>> = vec![
        vec![
            3, 0, 1, 2, 0, 2, 12, b'h', b'e', b'l', b'l', b'o', b' ', b'w', b'o', b'r', b'l', b'd', 5, 0, 6,
            0, 0,
        ],
        [&[3u8, 0, 2, 2, 0, 2, 40][..], &[b'a'; 48]].concat(),
        // Found: an engine opened with batch_wait_ms = u64::MAX made every call wait forever.
        [
            &[1u8, 0, 2, 2, 1, 4, 0, 4, 0, 0, 0, 128, 4, 1, 2, 1, 1, 1, 3, 1, 1, 0, 2, 5][..],
            b"hello",
            &[1, 0, 0, 0, 1, 0, 0, 1, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 1, 2, 0, 1, 1],
        ]
        .concat(),
        vec![4, 0, 1, 2, 2, 3, 1, 3, 2, 1, 5, 5, 9, 9, 9, 2, 1, 0, 0],
        vec![0, 2, 3, 0, 0, 1, 0, 1, 1, 2, 9, 4, 1, 1],
        vec![3, 0, 3, 2, 3, 2, 8, 7, 7, 7, 7, 1, 2, 3, 4, 7, 1, 2, 6, 0, 1, 0, 8, 2, 9, 2, 10, 0],
        vec![3, 0, 1, 2, 1, 0, 6, 0, 0, 7, 0, 0, 0, 8, 1, 9, 0, 9, 1, 9, 2, 9, 3],
    ];
    fuzz(
        "capi",
        corpus,
        Arc::new(move |input: &[u8]| {
            let mut p = Program { data: input, at: 0 };
            // Handles this program made (live or freed: freeing twice must be a no-op).
            let (mut engines, mut results, mut errors): (Vec<usize>, Vec<usize>, Vec<usize>) =
                (Vec::new(), Vec::new(), Vec::new());
            let forged = |p: &mut Program| match p.pick(3) {
                0 => 0usize,
                1 => usize::MAX - p.byte() as usize,
                _ => 1 + p.byte() as usize * 7919,
            };
            // An engine handle: the shared one, one this program opened (maybe freed), NULL or forged.
            let engine = |p: &mut Program, engines: &[usize]| -> *mut jv4_engine {
                let a = match p.pick(4) {
                    0 | 1 => shared_addr,
                    2 if !engines.is_empty() => engines[p.pick(engines.len())],
                    _ => forged(p),
                };
                std::ptr::without_provenance_mut(a)
            };
            let handle = |p: &mut Program, live: &[usize]| -> usize {
                match p.pick(3) {
                    0 | 1 if !live.is_empty() => live[p.pick(live.len())],
                    _ => forged(p),
                }
            };
            // The status check every fallible call gets; keeps some error handles for later.
            let check = |p: &mut Program,
                         errors: &mut Vec<usize>,
                         what: &str,
                         status: jv4_status,
                         err: Option<*mut jv4_error>| {
                assert_ne!(status, jv4_status::JV4_ERR_PANIC, "{what}: the library panicked");
                let Some(e) = err else { return };
                if status == jv4_status::JV4_OK {
                    assert!(e.is_null(), "{what}: success with an error handle");
                    return;
                }
                assert!(!e.is_null(), "{what}: {status:?} without an error handle");
                // SAFETY: any handle value is accepted; the message is a C string until the free.
                unsafe {
                    assert_eq!(jv4_error_code(e), status, "{what}");
                    let m = CStr::from_ptr(jv4_error_message(e)).to_string_lossy().into_owned();
                    assert!(!m.is_empty(), "{what}: {status:?} with an empty message");
                    if p.pick(4) == 0 {
                        errors.push(e.addr());
                    } else {
                        jv4_error_free(e);
                    }
                }
            };
            for _ in 0..8 {
                if p.done() {
                    break;
                }
                let mut held = Held::default();
                let mut err: *mut jv4_error = null_mut();
                let want_err = p.pick(4) != 0;
                let err_ptr: *mut *mut jv4_error = if want_err { &mut err } else { null_mut() };
                let err_opt = want_err.then_some(());
                macro_rules! checked {
                    ($what:expr, $status:expr) => {{
                        let s = $status;
                        check(&mut p, &mut errors, $what, s, err_opt.map(|_| err));
                        s
                    }};
                }
                match p.pick(11) {
                    0 => {
                        // Open an engine: options from the program.
                        let model_dir = match p.pick(4) {
                            0 => null(),
                            1 => held.choice(&mut p, &["/nonexistent", "", "/dev/zero"]),
                            _ => model.as_ptr(),
                        };
                        let mut o = jv4_engine_options { model_dir, ..Default::default() };
                        o.device = held.choice(&mut p, &["cpu", "cpu", "cpu,cpu", "cuda:99", "gpu"]);
                        o.tokenizer =
                            if p.pick(4) == 0 { held.choice(&mut p, &["/nonexistent"]) } else { null() };
                        o.max_batch_tokens = p.size();
                        o.max_batch_patches = p.size();
                        o.mem_budget = p.size() as u64;
                        o.max_length = p.size();
                        o.strict = p.byte() as i32 - 128;
                        o.preprocess_threads = p.size() % 64;
                        o.batch_wait_ms = [0, 1, u64::MAX, 1 << 63][p.pick(4)];
                        let mut out: *mut jv4_engine = null_mut();
                        let opts_ptr: *const jv4_engine_options = if p.pick(8) == 0 { null() } else { &o };
                        let out_ptr: *mut *mut jv4_engine =
                            if p.pick(8) == 0 { null_mut() } else { &mut out };
                        // SAFETY: NULL or valid pointers; strings NUL-terminated.
                        let s = checked!("jv4_engine_open", unsafe {
                            jv4_engine_open(opts_ptr, out_ptr, err_ptr)
                        });
                        if s == jv4_status::JV4_OK {
                            assert!(!out.is_null());
                            engines.push(out.addr());
                        } else {
                            assert!(out.is_null(), "a failed open wrote a handle");
                        }
                    }
                    1 => {
                        // Free an engine of this program (maybe again), or a forged one; never the shared one.
                        let a = if !engines.is_empty() && p.pick(3) != 0 {
                            engines[p.pick(engines.len())]
                        } else {
                            forged(&mut p)
                        };
                        if a != shared_addr {
                            // SAFETY: any value is detected.
                            unsafe { jv4_engine_free(std::ptr::without_provenance_mut(a)) };
                        }
                    }
                    2 => {
                        let e = engine(&mut p, &engines);
                        let (mut s, mut m) = (0usize, 0usize);
                        let sp: *mut usize = if p.pick(4) == 0 { null_mut() } else { &mut s };
                        let mp: *mut usize = if p.pick(4) == 0 { null_mut() } else { &mut m };
                        // SAFETY: NULL or writable outputs.
                        let st = checked!("jv4_engine_dims", unsafe { jv4_engine_dims(e, sp, mp, err_ptr) });
                        if st == jv4_status::JV4_OK {
                            assert!(s > 0 && m > 0);
                        }
                    }
                    op @ (3 | 4) => {
                        // Embed requests built from the program.
                        let n = p.pick(4);
                        let mut reqs = Vec::with_capacity(n);
                        for _ in 0..n {
                            let mut r = jv4_request { kind: p.u32(), ..Default::default() };
                            r.text = match p.pick(5) {
                                0 => null(),
                                1 => held.string(image_path.as_bytes()),
                                _ => {
                                    let mut t = p.bytes(60);
                                    if p.pick(3) == 0 {
                                        t = t.repeat(1 + p.pick(6)); // long: over max_length
                                    }
                                    held.string(&t)
                                }
                            };
                            let b = match p.pick(3) {
                                0 => p.bytes(32),
                                1 => png.to_vec(),
                                _ => png[..p.byte() as usize % png.len()].to_vec(),
                            };
                            r.bytes_len = b.len().min(p.size());
                            held.bytes.push(b);
                            r.bytes =
                                if p.pick(5) == 0 { null() } else { held.bytes.last().unwrap().as_ptr() };
                            let ids: Vec<u32> = (0..p.pick(40))
                                .map(|_| [p.byte() as u32, u32::MAX, 151655][p.pick(3)])
                                .collect();
                            r.token_ids_len = ids.len().min(p.size());
                            held.ids.push(ids);
                            r.token_ids =
                                if p.pick(5) == 0 { null() } else { held.ids.last().unwrap().as_ptr() };
                            r.task = held.choice(&mut p, &["retrieval", "code", "text-matching"]);
                            r.prompt = held.choice(&mut p, &["query", "passage"]);
                            r.output = p.u32();
                            r.dims = [0, 64, 128, 256, 100, usize::MAX][p.pick(6)];
                            r.max_pixels = p.size();
                            r.chunking = p.u32();
                            r.chunk_tokens = p.size();
                            let spans: Vec<jv4_span> = (0..p.pick(5))
                                .map(|_| {
                                    let (a, b) = (p.size(), p.size());
                                    jv4_span { start: a, end: a.saturating_add(b) }
                                })
                                .collect();
                            r.spans_len = spans.len().min(p.size());
                            held.spans.push(spans);
                            r.spans =
                                if p.pick(5) == 0 { null() } else { held.spans.last().unwrap().as_ptr() };
                            reqs.push(r);
                        }
                        let e = engine(&mut p, &engines);
                        let rp: *const jv4_request = if p.pick(8) == 0 { null() } else { reqs.as_ptr() };
                        if op == 3 {
                            let mut out: *mut jv4_result = null_mut();
                            let op_: *mut *mut jv4_result =
                                if p.pick(8) == 0 { null_mut() } else { &mut out };
                            // SAFETY: `reqs` and everything it points to (in `held`) are alive; n is its length.
                            let s = checked!("jv4_embed", unsafe { jv4_embed(e, rp, n, op_, err_ptr) });
                            if s == jv4_status::JV4_OK {
                                let mut k = usize::MAX;
                                // SAFETY: a live result, a writable count.
                                let st = unsafe { jv4_result_count(out, &mut k, null_mut()) };
                                assert_eq!(st, jv4_status::JV4_OK);
                                assert_eq!(k, n);
                                results.push(out.addr());
                            } else {
                                assert!(out.is_null(), "a failed embed wrote a handle");
                            }
                        } else {
                            let dim = [64, 128, 256, 0, usize::MAX][p.pick(5)];
                            let mut buf = vec![7.0f32; p.pick(4) * 64 + p.pick(3)];
                            let out_len = buf.len().min(p.size().max(buf.len() * (p.pick(2))));
                            let mut statuses = vec![jv4_status::JV4_ERR_INTERNAL; n];
                            let bp: *mut f32 = if p.pick(6) == 0 { null_mut() } else { buf.as_mut_ptr() };
                            let stp: *mut jv4_status =
                                if p.pick(3) == 0 { null_mut() } else { statuses.as_mut_ptr() };
                            // SAFETY: `buf` holds at least `out_len` floats, `statuses` n codes.
                            let s = checked!("jv4_embed_into", unsafe {
                                jv4_embed_into(e, rp, n, dim, bp, out_len, stp, err_ptr)
                            });
                            if s == jv4_status::JV4_OK && !stp.is_null() {
                                assert!(statuses.iter().all(|&x| x == jv4_status::JV4_OK));
                                assert!(buf[..n * dim].iter().all(|x| x.is_finite()));
                            }
                        }
                    }
                    5 => {
                        let r = std::ptr::without_provenance::<jv4_result>(handle(&mut p, &results));
                        let mut k = 0usize;
                        let kp: *mut usize = if p.pick(4) == 0 { null_mut() } else { &mut k };
                        // SAFETY: NULL or a writable count.
                        checked!("jv4_result_count", unsafe { jv4_result_count(r, kp, err_ptr) });
                    }
                    6 => {
                        let r = std::ptr::without_provenance::<jv4_result>(handle(&mut p, &results));
                        let i = p.size();
                        // SAFETY: all-zero is a valid view (NULL pointers, zero lengths).
                        let mut v: jv4_embedding_view = unsafe { std::mem::zeroed() };
                        let vp: *mut jv4_embedding_view = if p.pick(6) == 0 { null_mut() } else { &mut v };
                        // SAFETY: NULL or a writable view.
                        let s = checked!("jv4_result_get", unsafe { jv4_result_get(r, i, vp, err_ptr) });
                        if s == jv4_status::JV4_OK && !vp.is_null() {
                            view_is_readable(&v);
                        }
                    }
                    7 => {
                        let r = std::ptr::without_provenance::<jv4_result>(handle(&mut p, &results));
                        let (i, k) = (p.size() % 5, p.size());
                        // SAFETY: all-zero is a valid view.
                        let mut v: jv4_chunk_view = unsafe { std::mem::zeroed() };
                        let vp: *mut jv4_chunk_view = if p.pick(6) == 0 { null_mut() } else { &mut v };
                        let s = checked!(
                            "jv4_result_chunk",
                            // SAFETY: NULL or a writable view.
                            unsafe { jv4_result_chunk(r, i, k, vp, err_ptr) }
                        );
                        if s == jv4_status::JV4_OK && !vp.is_null() {
                            assert!(
                                v.token_start < v.token_end && v.char_start <= v.char_end,
                                "chunk ranges"
                            );
                            // SAFETY: views of a live result: the lengths say how far they reach.
                            unsafe {
                                finite(v.single, v.single_len);
                                finite(v.multi, v.multi_rows.saturating_mul(v.multi_dim));
                            }
                        }
                    }
                    8 => {
                        let r = handle(&mut p, &results);
                        // SAFETY: any value is detected.
                        unsafe { jv4_result_free(std::ptr::without_provenance_mut(r)) };
                    }
                    9 => {
                        let e = std::ptr::without_provenance_mut::<jv4_error>(handle(&mut p, &errors));
                        // SAFETY: any value is detected; the message is never NULL.
                        unsafe {
                            let _ = jv4_error_code(e);
                            let m: *const c_char = jv4_error_message(e);
                            assert!(!m.is_null() && !CStr::from_ptr(m).to_bytes().is_empty());
                            if p.pick(2) == 0 {
                                jv4_error_free(e);
                            }
                        }
                    }
                    _ => {
                        // SAFETY: a static string.
                        assert!(!unsafe { CStr::from_ptr(jv4_version()) }.to_bytes().is_empty());
                    }
                }
                drop(held);
            }
            // SAFETY: every handle value is detected; freeing twice is a no-op.
            unsafe {
                for a in results {
                    jv4_result_free(std::ptr::without_provenance_mut(a));
                }
                for a in errors {
                    jv4_error_free(std::ptr::without_provenance_mut(a));
                }
                for a in engines {
                    jv4_engine_free(std::ptr::without_provenance_mut(a));
                }
            }
        }),
    );
    // SAFETY: the shared engine, freed once (then again: a no-op).
    unsafe {
        jv4_engine_free(std::ptr::without_provenance_mut(shared_addr));
        jv4_engine_free(std::ptr::without_provenance_mut(shared_addr));
    }
}

/// Reads every value an embedding view points to (a stale view would be caught by the sanitizer
/// runs; here it at least must be finite and consistent).
fn view_is_readable(v: &jv4::capi::jv4_embedding_view) {
    if v.status == jv4::capi::jv4_status::JV4_OK {
        assert!(v.message.is_null(), "a success with a message");
        // SAFETY: views of a live result: the lengths say how far they reach.
        unsafe {
            finite(v.single, v.single_len);
            finite(v.multi, v.multi_rows.saturating_mul(v.multi_dim));
        }
    } else {
        assert!(!v.message.is_null(), "a failure without a message");
        // SAFETY: a failure's message is a C string of the live result.
        assert!(!unsafe { std::ffi::CStr::from_ptr(v.message) }.to_bytes().is_empty());
    }
}

/// # Safety
/// `p` is NULL (with `n` 0) or valid for reading `n` floats.
unsafe fn finite(p: *const f32, n: usize) {
    assert_eq!(p.is_null(), n == 0, "a view's pointer and length disagree");
    if n > 0 {
        // SAFETY: by the contract.
        let s = unsafe { std::slice::from_raw_parts(p, n) };
        assert!(s.iter().all(|x| x.is_finite()), "a non-finite value in a view");
    }
}
