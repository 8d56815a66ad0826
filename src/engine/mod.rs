//! The engine layer: requests in, embeddings out.
//!
//! [`Engine`] is a handle (`Send + Sync + Clone`) to one model on one device, or on several
//! ([`EngineOptions::devices`]: one worker per device, see src/engine/pool.rs). The device's
//! [`Backend`](crate::model::Backend) lives on a worker thread the engine owns; any number of
//! threads may call [`Engine::embed`] at once. Each caller prepares its own requests (tokenizing
//! texts, decoding images) on its own thread, then hands them to the worker, which packs the
//! requests of all callers into shared forwards under the token and patch budgets and sends every
//! caller exactly its own results, in its order. A bad request fails alone; the rest are served.
//!
//! ```
//! # fn main() -> jv4::Result<()> {
//! # let dir = tempfile::tempdir().unwrap();
//! # use jv4::model::synth::{write_checkpoint, Preset, SynthSpec};
//! # let spec = SynthSpec { seed: 7, preset: Preset::Tiny, adapter_dtype: jv4::model::Dtype::BF16 };
//! # write_checkpoint(dir.path(), &spec)?;
//! use jv4::{Device, Engine, EngineOptions, OutputKind, Request, Task};
//! let engine = Engine::open(dir.path(), EngineOptions { device: Device::Cpu, ..Default::default() })?;
//! let out = engine.embed(&[
//!     Request::text("What is the capital of France?"),
//!     Request::text("def f(): pass").task(Task::Code).output(OutputKind::Both).dims(128),
//! ]);
//! let query = out[0].as_ref().unwrap();
//! assert_eq!(query.single.as_ref().unwrap().len(), engine.config().text.hidden_size);
//! let code = out[1].as_ref().unwrap();
//! assert_eq!(code.single.as_ref().unwrap().len(), 128);
//! assert_eq!(code.multi.as_ref().unwrap().rows(), code.tokens);
//! # Ok(())
//! # }
//! ```

pub mod image;
pub mod jsonl;
pub mod limits;
pub mod output;
mod pool;
pub(crate) mod prepare;
pub mod request;
pub mod text;
mod worker;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::model::backend::{open_backend, Device, MemoryReport};
use crate::model::checkpoint::Checkpoint;
use crate::model::config::ModelConfig;
pub use crate::model::gpu::LoraMode;
use crate::{Error, Result};
pub use limits::Limits;
use pool::{stopped, FaultAfter, LoseAfter, Pool};
use prepare::Prepared;
use prepare::{LongLayout, Preparer, Ready};
pub use request::{matryoshka, Chunk, Chunking, Embedding, Input, MultiVector, OutputKind, Request};
pub use text::{
    plan_chunks, plan_macro_chunks, prompt_prefix, ChunkSpan, EncodedText, MacroChunk, OffsetText,
    PromptName, TextTokenizer, Truncation, DEFAULT_LATE_CHUNK_OVERLAP, DEFAULT_MAX_LENGTH,
};
use worker::{Budgets, Item, Msg};

/// Engine settings.
#[derive(Clone, Debug)]
pub struct EngineOptions {
    /// Where the model runs (default `cuda:0`), unless `devices` is set.
    pub device: Device,
    /// Several devices of one kind (data parallelism: one worker and one copy of the model each;
    /// see src/engine/pool.rs). Empty (the default): `device` alone. CUDA devices must be distinct.
    pub devices: Vec<Device>,
    /// Most tokens in one forward (sequences are packed up to it; a longer one runs alone).
    pub max_batch_tokens: usize,
    /// Most image patches in one forward; a larger image is resized down to fit (its max_pixels
    /// lowered), never an out-of-memory.
    pub max_batch_patches: usize,
    /// Activation memory budget in bytes; `None`: `$JV4_MEM_BUDGET`, else 90% of the device
    /// memory free after the weights.
    pub mem_budget: Option<u64>,
    /// Truncation of long texts.
    pub truncation: Truncation,
    /// CPU threads per call for image decoding and preprocessing.
    pub preprocess_threads: usize,
    /// How long a forward that is not full waits for more requests (from other callers) before it
    /// starts. Zero (the default): it starts at once with whatever has queued, which under load
    /// already packs concurrent callers together, and adds no latency to a lone query. At most
    /// [`MAX_BATCH_WAIT`].
    pub batch_wait: Duration,
    /// `tokenizer.json` to use instead of the model folder's.
    pub tokenizer: Option<PathBuf>,
    /// Input size limits (bytes per text, image file and base64 string, decoded pixels) and the
    /// folder image paths must stay in; the defaults protect a host (docs/RELIABILITY.md).
    pub limits: Limits,
    /// How the GPU carries the task adapters: stacked (the default, the more faithful) or merged
    /// into one weight per task (faster, ≈ 11 GB more memory at full size, less faithful; see
    /// [`LoraMode`]). `$JV4_LORA` overrides. The CPU backend ignores it.
    pub lora: LoraMode,
    /// Long late chunking (a late-chunked text longer than `truncation.max_length`): the tokens
    /// of left context each macro-chunk after the first repeats from the one before (at most half
    /// a macro-chunk; see [`text::plan_macro_chunks`]). Default 512.
    pub late_chunk_overlap: usize,
    /// TEST HOOK (fault injection), not an API: each `(i, n)` makes worker `i` (an index into the
    /// devices) report [`Error::DeviceLost`] from its forward `n + 1` on (`n = 0`: the first).
    #[doc(hidden)]
    pub lose_device_after: Vec<(usize, u64)>,
    /// TEST HOOK (fault injection), not an API: each `(i, n)` makes worker `i` launch a kernel
    /// that traps (a genuine sticky CUDA error in its context) before its forward `n + 1`
    /// (`n = 0`: the first). The process's context for that GPU stays broken: tests that use it
    /// run in a process of their own (tests/gpu/fault.rs).
    #[doc(hidden)]
    pub fault_device_after: Vec<(usize, u64)>,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            device: Device::default(),
            max_batch_tokens: 16384,
            max_batch_patches: 16384,
            mem_budget: None,
            truncation: Truncation::default(),
            preprocess_threads: std::thread::available_parallelism().map_or(4, |n| n.get()).min(16),
            batch_wait: Duration::ZERO,
            tokenizer: None,
            limits: Limits::default(),
            lora: LoraMode::default(),
            devices: Vec::new(),
            late_chunk_overlap: text::DEFAULT_LATE_CHUNK_OVERLAP,
            lose_device_after: Vec::new(),
            fault_device_after: Vec::new(),
        }
    }
}

/// Work done so far by an engine (all callers together).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Forwards run.
    pub forwards: u64,
    /// Sequences embedded.
    pub sequences: u64,
    /// Tokens embedded.
    pub tokens: u64,
}

/// One device of an engine, as [`Engine::devices`] reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceState {
    /// The device.
    pub device: Device,
    /// In words (e.g. `cuda:0 (NVIDIA H200)`).
    pub describe: String,
    /// Why it was lost (taken out of the rotation), if it was.
    pub lost: Option<String>,
    /// The work it has done.
    pub stats: EngineStats,
}

/// A handle to a model on a device. See the module documentation.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

struct Inner {
    prep: Preparer,
    describe: String,
    pool: Arc<Pool>,
    workers: Mutex<Vec<JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the channels ends the workers once their queues are done.
        close(&self.pool, self.workers.get_mut().map(std::mem::take).unwrap_or_default());
    }
}

fn close(pool: &Pool, workers: Vec<JoinHandle<()>>) {
    pool.close();
    for h in workers {
        let _ = h.join();
    }
}

/// The devices of `opts`, checked: one kind, no CUDA device twice.
fn devices_of(opts: &EngineOptions) -> Result<Vec<Device>> {
    let devices = if opts.devices.is_empty() { vec![opts.device] } else { opts.devices.clone() };
    let cpu = devices[0] == Device::Cpu;
    if devices.iter().any(|&d| (d == Device::Cpu) != cpu) {
        return Err(Error::Input(
            "devices must be all CUDA or all cpu (their results would differ otherwise)".into(),
        ));
    }
    for (i, d) in devices.iter().enumerate() {
        if *d != Device::Cpu && devices[..i].contains(d) {
            return Err(Error::Input(format!("device {d} is listed twice")));
        }
    }
    Ok(devices)
}

/// The longest [`EngineOptions::batch_wait`] accepted.
pub const MAX_BATCH_WAIT: Duration = Duration::from_secs(60);

/// Requests prepared ahead of the worker at a time, per caller.
const WINDOW: usize = 256;

impl Engine {
    /// Opens a model folder (checkpoint and `tokenizer.json`, or `opts.tokenizer`), and loads the
    /// model onto `opts.device` (or each of `opts.devices`) on the engine's worker thread(s),
    /// in parallel. The folder may also be a Hugging
    /// Face cache folder or the hub cache holding it ([`crate::model::folder::resolve_model_dir`]).
    pub fn open(model_dir: &Path, opts: EngineOptions) -> Result<Engine> {
        let model_dir = &crate::model::folder::resolve_model_dir(model_dir)?;
        if opts.max_batch_tokens == 0 || opts.max_batch_patches == 0 {
            return Err(Error::Input("max_batch_tokens and max_batch_patches must be at least 1".into()));
        }
        if opts.batch_wait > MAX_BATCH_WAIT {
            // A lone request would wait that long for company (the C ABI fuzzer found
            // `batch_wait_ms = u64::MAX` hanging every call).
            return Err(Error::Input(format!(
                "batch_wait of {} ms is over the most, {} ms",
                opts.batch_wait.as_millis(),
                MAX_BATCH_WAIT.as_millis()
            )));
        }
        let devices = devices_of(&opts)?;
        let tok = match &opts.tokenizer {
            Some(t) => TextTokenizer::from_file(t)?,
            None => TextTokenizer::from_model_dir(model_dir)?,
        };
        let ckpt = Checkpoint::open(model_dir)?;
        let cfg = ckpt.config.clone();
        opts.limits.validate()?;
        let mut image_cfg = image::ImageConfig::from(&ckpt.preprocessor);
        image_cfg.limits.max_pixels = opts.limits.max_image_pixels;
        let mut prep = Preparer::new(
            tok,
            cfg,
            image_cfg,
            opts.truncation,
            opts.max_batch_patches,
            opts.preprocess_threads,
            devices[0] != Device::Cpu,
        )?;
        prep.limits = opts.limits.clone();
        prep.late_chunk_overlap = opts.late_chunk_overlap;

        let ckpt = Arc::new(ckpt);
        let (txs, rxs): (Vec<_>, Vec<_>) = devices.iter().map(|_| mpsc::channel::<Msg>()).unzip();
        let pool = Arc::new(Pool::new(&devices, txs));
        let (ready_tx, ready_rx) = mpsc::channel::<(usize, Result<String>)>();
        let budgets =
            Budgets { tokens: opts.max_batch_tokens, patches: opts.max_batch_patches, wait: opts.batch_wait };
        let mut workers = Vec::with_capacity(devices.len());
        for (i, rx) in rxs.into_iter().enumerate() {
            let (device, mem_budget, lora) = (devices[i], opts.mem_budget, opts.lora);
            let (ckpt, worker_pool, ready_tx) = (ckpt.clone(), pool.clone(), ready_tx.clone());
            let lose_after = opts.lose_device_after.iter().find(|&&(w, _)| w == i).map(|&(_, n)| n);
            let fault_after = opts.fault_device_after.iter().find(|&&(w, _)| w == i).map(|&(_, n)| n);
            let name = if devices.len() == 1 { format!("jv4-{device}") } else { format!("jv4-{i}-{device}") };
            let spawned = std::thread::Builder::new().name(name).spawn(move || {
                // The backend is created here, so its CUDA context is current on this thread.
                let backend = match open_backend(device, &ckpt, mem_budget, lora) {
                    Ok(b) => b,
                    Err(e) => {
                        let _ = ready_tx.send((i, Err(e)));
                        return;
                    }
                };
                drop(ckpt);
                let backend = match lose_after {
                    Some(left) => Box::new(LoseAfter { inner: backend, left }),
                    None => backend,
                };
                let backend: Box<dyn crate::model::Backend> = match fault_after {
                    Some(n) => Box::new(FaultAfter { inner: backend, left: Some(n) }),
                    None => backend,
                };
                let _ = ready_tx.send((i, Ok(backend.describe())));
                drop(ready_tx);
                worker::run(backend, rx, budgets, worker_pool, i);
            });
            match spawned {
                Ok(h) => workers.push(h),
                Err(e) => {
                    close(&pool, workers);
                    return Err(Error::Internal(format!("cannot start the engine's worker thread: {e}")));
                }
            }
        }
        drop((ready_tx, ckpt));
        let mut failed = None;
        for _ in 0..devices.len() {
            match ready_rx.recv() {
                Ok((i, Ok(d))) => {
                    let _ = pool.slots[i].describe.set(d);
                }
                Ok((_, Err(e))) => {
                    failed.get_or_insert(e);
                }
                Err(_) => {
                    failed.get_or_insert(Error::Internal(
                        "the engine's worker stopped while loading the model".into(),
                    ));
                    break;
                }
            }
        }
        if let Some(e) = failed {
            close(&pool, workers);
            return Err(e);
        }
        let describe =
            pool.slots.iter().filter_map(|s| s.describe.get().cloned()).collect::<Vec<_>>().join(", ");
        Ok(Engine { inner: Arc::new(Inner { prep, describe, pool, workers: Mutex::new(workers) }) })
    }

    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.inner.prep.cfg
    }

    /// Where the model runs (the first device, when there are several).
    pub fn device(&self) -> Device {
        self.inner.pool.slots[0].device
    }

    /// Every device, in the order of [`EngineOptions::devices`], with its state and its work.
    pub fn devices(&self) -> Vec<DeviceState> {
        let pool = &self.inner.pool;
        (0..pool.slots.len())
            .map(|i| {
                let s = &pool.slots[i];
                DeviceState {
                    device: s.device,
                    describe: s.describe.get().cloned().unwrap_or_default(),
                    lost: pool.lost(i),
                    stats: stats_of(&s.counters),
                }
            })
            .collect()
    }

    /// The device(s), in words (e.g. `cuda:0 (NVIDIA H200)`; several joined by `, `).
    pub fn describe(&self) -> &str {
        &self.inner.describe
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &TextTokenizer {
        &self.inner.prep.tok
    }

    /// The input size limits it was opened with.
    pub fn limits(&self) -> &Limits {
        &self.inner.prep.limits
    }

    /// How it truncates long inputs.
    pub fn truncation(&self) -> Truncation {
        self.inner.prep.truncation
    }

    /// Work done so far (all devices together).
    pub fn stats(&self) -> EngineStats {
        self.devices().iter().fold(EngineStats::default(), |a, d| EngineStats {
            forwards: a.forwards + d.stats.forwards,
            sequences: a.sequences + d.stats.sequences,
            tokens: a.tokens + d.stats.tokens,
        })
    }

    /// Forwards run so far by how many sequences they packed: `(at most this many, forwards)`
    /// for 1, 2, 4, ..., 2048 sequences, then `(usize::MAX, forwards of more)`; not cumulative.
    pub fn batch_sizes(&self) -> Vec<(usize, u64)> {
        let bound = |b: usize| if b + 1 < worker::BATCH_BUCKETS { 1usize << b } else { usize::MAX };
        let count = |b: usize| {
            self.inner.pool.slots.iter().map(|s| s.counters.batch_sizes[b].load(Ordering::Relaxed)).sum()
        };
        (0..worker::BATCH_BUCKETS).map(|b| (bound(b), count(b))).collect()
    }

    /// Memory the backends hold, summed over the devices (asks the workers: waits for the
    /// forwards in progress).
    pub fn memory(&self) -> Result<MemoryReport> {
        let (tx, rx) = mpsc::channel();
        let n = self.inner.pool.broadcast(|| Msg::Memory(tx.clone()));
        drop(tx);
        if n == 0 {
            return Err(stopped());
        }
        let mut sum = MemoryReport::default();
        for _ in 0..n {
            let m = rx.recv().map_err(|_| stopped())?;
            sum.weights += m.weights;
            sum.activations_peak += m.activations_peak;
            sum.activations_budget += m.activations_budget;
            sum.activations_mapped += m.activations_mapped;
            sum.device_used += m.device_used;
            sum.plans += m.plans;
            sum.graphs += m.graphs;
            sum.graph_captures += m.graph_captures;
            sum.graph_pool += m.graph_pool;
        }
        Ok(sum)
    }

    /// Restarts the activation-memory peak (of every device).
    pub fn reset_peak(&self) -> Result<()> {
        match self.inner.pool.broadcast(|| Msg::ResetPeak) {
            0 => Err(stopped()),
            _ => Ok(()),
        }
    }

    /// Embeds any mix of texts, images and token ids, tasks, outputs and widths: one result per
    /// request, in order. Safe to call from many threads at once.
    ///
    /// Requests are prepared in windows on the calling thread; while the workers run some windows'
    /// forwards, the next window is prepared. Each window goes to the least-loaded device.
    pub fn embed(&self, reqs: &[Request]) -> Vec<Result<Embedding>> {
        self.embed_with(reqs, &CallOptions::default())
    }

    /// [`Engine::embed`] with a cancel flag and a window size (a server's hooks, see
    /// [`CallOptions`]). Once `opts.cancel` is set, requests not yet in a forward are answered
    /// with [`Error::Cancelled`] (those in a forward finish; nothing is prepared any more).
    pub fn embed_with(&self, reqs: &[Request], opts: &CallOptions) -> Vec<Result<Embedding>> {
        let window = opts.window.max(1);
        let cancelled = || opts.cancel.as_ref().is_some_and(Cancel::is_cancelled);
        // One slot per request, then one per macro-chunk of each long late-chunked text (their
        // results are put together into the request's at the end).
        let mut results: Vec<Option<Result<Embedding>>> = (0..reqs.len()).map(|_| None).collect();
        let mut long: Vec<(usize, std::ops::Range<usize>, LongLayout)> = Vec::new();
        let (tx, rx) = mpsc::channel::<(usize, Result<Embedding>)>();
        let mut sent = 0usize; // requests handed to the workers
        let mut answered = 0usize; // of those, answered
                                   // Windows with the workers at a time: one per device and one more (two for one device).
        let in_flight = window * self.inner.pool.slots.len();
        for (w, chunk) in reqs.chunks(window).enumerate() {
            if cancelled() {
                break; // the rest are answered Cancelled below
            }
            let offset = w * window;
            let mut items = Vec::with_capacity(chunk.len());
            for (k, p) in self.inner.prep.prepare(chunk).into_iter().enumerate() {
                let r = &chunk[k];
                let item = |slot: usize, prepared: Prepared| Item {
                    slot,
                    prepared,
                    task: r.task,
                    output: r.output,
                    dims: r.dims,
                    reply: tx.clone(),
                    cancel: opts.cancel.clone(),
                    resent: false,
                };
                match p {
                    Ok(Ready::One(prepared)) => items.push(item(offset + k, prepared)),
                    Ok(Ready::Long(text)) => {
                        let first = results.len();
                        for prepared in text.parts {
                            items.push(item(results.len(), prepared));
                            results.push(None);
                        }
                        long.push((offset + k, first..results.len(), text.layout));
                    }
                    Err(e) => results[offset + k] = Some(Err(e)),
                }
            }
            // Keep every device busy: wait only once `in_flight` are with the workers.
            while sent - answered > in_flight {
                match rx.recv() {
                    Ok((slot, r)) => {
                        results[slot] = Some(r);
                        answered += 1;
                    }
                    Err(_) => break,
                }
            }
            if !items.is_empty() {
                // Every item is answered on `rx`, by a worker or by the pool.
                sent += items.len();
                self.inner.pool.dispatch(items);
            }
        }
        drop(tx);
        while answered < sent {
            match rx.recv() {
                Ok((slot, r)) => {
                    results[slot] = Some(r);
                    answered += 1;
                }
                Err(_) => break, // the worker is gone: the rest get the error below
            }
        }
        let missing = || if cancelled() { cancelled_error() } else { stopped() };
        for (i, slots, layout) in long {
            let parts = slots.map(|s| results[s].take().unwrap_or_else(|| Err(missing()))).collect();
            results[i] = Some(layout.assemble(parts));
        }
        results.truncate(reqs.len());
        results.into_iter().map(|r| r.unwrap_or_else(|| Err(missing()))).collect()
    }
}

/// A flag a caller sets to give up on the requests of its [`Engine::embed_with`] call (cheap to
/// clone; set from any thread).
#[derive(Clone, Debug, Default)]
pub struct Cancel(Arc<AtomicBool>);

impl Cancel {
    /// A flag not yet set.
    pub fn new() -> Cancel {
        Cancel::default()
    }

    /// Gives up: requests of the call not yet in a forward are answered [`Error::Cancelled`].
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    /// Whether [`Cancel::cancel`] was called.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// How one [`Engine::embed_with`] call runs.
#[derive(Clone, Debug)]
pub struct CallOptions {
    /// When set and then cancelled, the call's requests still queued are dropped.
    pub cancel: Option<Cancel>,
    /// Requests prepared and handed to a worker at a time (at most one window of a call per device
    /// and one more are queued at once; each window goes to one device). A worker serves requests
    /// in arrival order, so a smaller window lets other callers' requests in between sooner
    /// (fairness) and spreads one caller over more devices, at the cost of more hand-offs.
    pub window: usize,
}

impl Default for CallOptions {
    fn default() -> Self {
        CallOptions { cancel: None, window: WINDOW }
    }
}

pub(crate) fn cancelled_error() -> Error {
    Error::Cancelled("the caller gave up before the request ran".into())
}

fn stats_of(c: &worker::Counters) -> EngineStats {
    let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    EngineStats { forwards: get(&c.forwards), sequences: get(&c.sequences), tokens: get(&c.tokens) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_handle_is_send_sync_clone() {
        fn check<T: Send + Sync + Clone>() {}
        check::<Engine>();
    }
}
