//! The engine layer: requests in, embeddings out.
//!
//! [`Engine`] is a handle (`Send + Sync + Clone`) to one model on one device. The device's
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
pub(crate) mod prepare;
pub mod request;
pub mod text;
mod worker;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::model::backend::{open_backend, Device, MemoryReport};
use crate::model::checkpoint::Checkpoint;
use crate::model::config::ModelConfig;
pub use crate::model::gpu::LoraMode;
use crate::{Error, Result};
pub use limits::Limits;
use prepare::Preparer;
pub use request::{matryoshka, Chunk, Chunking, Embedding, Input, MultiVector, OutputKind, Request};
pub use text::{
    plan_chunks, prompt_prefix, ChunkSpan, EncodedText, OffsetText, PromptName, TextTokenizer, Truncation,
    DEFAULT_MAX_LENGTH,
};
use worker::{Budgets, Counters, Item, Msg};

/// Engine settings.
#[derive(Clone, Debug)]
pub struct EngineOptions {
    /// Where the model runs (default `cuda:0`).
    pub device: Device,
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
    /// already packs concurrent callers together, and adds no latency to a lone query.
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

/// A handle to a model on a device. See the module documentation.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

struct Inner {
    prep: Preparer,
    device: Device,
    describe: String,
    tx: Option<Sender<Msg>>,
    worker: Mutex<Option<JoinHandle<()>>>,
    counters: Arc<Counters>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the channel ends the worker once its queue is done.
        self.tx.take();
        if let Some(h) = self.worker.get_mut().ok().and_then(Option::take) {
            let _ = h.join();
        }
    }
}

/// Requests prepared ahead of the worker at a time, per caller.
const WINDOW: usize = 256;

impl Engine {
    /// Opens a model folder (checkpoint and `tokenizer.json`, or `opts.tokenizer`), and loads the
    /// model onto `opts.device` on the engine's worker thread. The folder may also be a Hugging
    /// Face cache folder or the hub cache holding it ([`crate::model::folder::resolve_model_dir`]).
    pub fn open(model_dir: &Path, opts: EngineOptions) -> Result<Engine> {
        let model_dir = &crate::model::folder::resolve_model_dir(model_dir)?;
        if opts.max_batch_tokens == 0 || opts.max_batch_patches == 0 {
            return Err(Error::Input("max_batch_tokens and max_batch_patches must be at least 1".into()));
        }
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
            opts.device != Device::Cpu,
        )?;
        prep.limits = opts.limits.clone();

        let (tx, rx) = mpsc::channel::<Msg>();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<String>>();
        let counters = Arc::new(Counters::default());
        let budgets =
            Budgets { tokens: opts.max_batch_tokens, patches: opts.max_batch_patches, wait: opts.batch_wait };
        let (device, mem_budget, lora, c) = (opts.device, opts.mem_budget, opts.lora, counters.clone());
        let worker = std::thread::Builder::new()
            .name(format!("jv4-{device}"))
            .spawn(move || {
                // The backend is created here, so its CUDA context is current on this thread.
                let backend = match open_backend(device, &ckpt, mem_budget, lora) {
                    Ok(b) => b,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                drop(ckpt);
                let _ = ready_tx.send(Ok(backend.describe()));
                worker::run(backend, rx, budgets, c);
            })
            .map_err(|e| Error::Internal(format!("cannot start the engine's worker thread: {e}")))?;
        let describe = match ready_rx.recv() {
            Ok(Ok(d)) => d,
            Ok(Err(e)) => {
                let _ = worker.join();
                return Err(e);
            }
            Err(_) => {
                let _ = worker.join();
                return Err(Error::Internal("the engine's worker stopped while loading the model".into()));
            }
        };
        Ok(Engine {
            inner: Arc::new(Inner {
                prep,
                device,
                describe,
                tx: Some(tx),
                worker: Mutex::new(Some(worker)),
                counters,
            }),
        })
    }

    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.inner.prep.cfg
    }

    /// Where the model runs.
    pub fn device(&self) -> Device {
        self.inner.device
    }

    /// The device, in words (e.g. `cuda:0 (NVIDIA H200)`).
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

    /// Work done so far.
    pub fn stats(&self) -> EngineStats {
        let c = &self.inner.counters;
        let get = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        EngineStats { forwards: get(&c.forwards), sequences: get(&c.sequences), tokens: get(&c.tokens) }
    }

    /// Forwards run so far by how many sequences they packed: `(at most this many, forwards)`
    /// for 1, 2, 4, ..., 2048 sequences, then `(usize::MAX, forwards of more)`; not cumulative.
    pub fn batch_sizes(&self) -> Vec<(usize, u64)> {
        let c = &self.inner.counters.batch_sizes;
        let bound = |b: usize| if b + 1 < worker::BATCH_BUCKETS { 1usize << b } else { usize::MAX };
        c.iter().enumerate().map(|(b, n)| (bound(b), n.load(std::sync::atomic::Ordering::Relaxed))).collect()
    }

    /// Memory the backend holds (asks the worker: waits for the forward in progress).
    pub fn memory(&self) -> Result<MemoryReport> {
        let (tx, rx) = mpsc::channel();
        self.send(Msg::Memory(tx))?;
        rx.recv().map_err(|_| stopped())
    }

    /// Restarts the activation-memory peak.
    pub fn reset_peak(&self) -> Result<()> {
        self.send(Msg::ResetPeak)
    }

    fn send(&self, m: Msg) -> Result<()> {
        self.inner.tx.as_ref().ok_or_else(stopped)?.send(m).map_err(|_| stopped())
    }

    /// Embeds any mix of texts, images and token ids, tasks, outputs and widths: one result per
    /// request, in order. Safe to call from many threads at once.
    ///
    /// Requests are prepared in windows on the calling thread; while the worker runs one window's
    /// forwards, the next window is prepared.
    pub fn embed(&self, reqs: &[Request]) -> Vec<Result<Embedding>> {
        self.embed_with(reqs, &CallOptions::default())
    }

    /// [`Engine::embed`] with a cancel flag and a window size (a server's hooks, see
    /// [`CallOptions`]). Once `opts.cancel` is set, requests not yet in a forward are answered
    /// with [`Error::Cancelled`] (those in a forward finish; nothing is prepared any more).
    pub fn embed_with(&self, reqs: &[Request], opts: &CallOptions) -> Vec<Result<Embedding>> {
        let window = opts.window.max(1);
        let cancelled = || opts.cancel.as_ref().is_some_and(Cancel::is_cancelled);
        let mut results: Vec<Option<Result<Embedding>>> = (0..reqs.len()).map(|_| None).collect();
        let (tx, rx) = mpsc::channel::<(usize, Result<Embedding>)>();
        let mut sent = 0usize; // requests handed to the worker
        let mut answered = 0usize; // of those, answered
        for (w, chunk) in reqs.chunks(window).enumerate() {
            if cancelled() {
                break; // the rest are answered Cancelled below
            }
            let offset = w * window;
            let mut items = Vec::with_capacity(chunk.len());
            for (k, p) in self.inner.prep.prepare(chunk).into_iter().enumerate() {
                let r = &chunk[k];
                match p {
                    Ok(prepared) => items.push(Item {
                        slot: offset + k,
                        prepared,
                        task: r.task,
                        output: r.output,
                        dims: r.dims,
                        reply: tx.clone(),
                        cancel: opts.cancel.clone(),
                    }),
                    Err(e) => results[offset + k] = Some(Err(e)),
                }
            }
            // At most two windows with the worker: wait for the one before the last.
            while sent - answered > window {
                match rx.recv() {
                    Ok((slot, r)) => {
                        results[slot] = Some(r);
                        answered += 1;
                    }
                    Err(_) => break,
                }
            }
            let n = items.len();
            if n > 0 {
                match self.send(Msg::Work(items)) {
                    Ok(()) => sent += n,
                    Err(e) => {
                        for r in results[offset..offset + chunk.len()].iter_mut().filter(|r| r.is_none()) {
                            *r = Some(Err(e.clone()));
                        }
                    }
                }
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
    /// Requests prepared and handed to the worker at a time (at most two windows of a call are
    /// queued at once). The worker serves requests in arrival order, so a smaller window lets
    /// other callers' requests in between sooner (fairness) at the cost of more hand-offs.
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

fn stopped() -> Error {
    Error::Internal("the engine's worker has stopped".into())
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
