//! The engine layer: requests in, embeddings out. [`Engine`] owns the GPU, the model, the paged
//! allocator and the tokenizer; [`Engine::embed_texts`] takes any mix of tasks, prompts, output
//! kinds and Matryoshka sizes, packs the requests into batches under a token budget, and returns
//! one result per request, in order. A bad request fails alone; the rest are served.

pub mod image;
pub mod jsonl;
pub mod text;

use std::path::Path;

use crate::cuda::{resolve_budget, DeviceAllocator, Gpu, MemStats, DEFAULT_PAGE_SIZE};
use crate::model::checkpoint::Checkpoint;
use crate::model::gpu::{GpuModel, TextBatch};
use crate::model::weights::LoadReport;
use crate::model::Task;
use crate::reference::matryoshka;
use crate::{Error, Result};
pub use text::{prompt_prefix, EncodedText, PromptName, TextTokenizer, Truncation, DEFAULT_MAX_LENGTH};

/// Which outputs a request wants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputKind {
    /// The pooled vector only.
    Single,
    /// The per-token vectors only.
    Multi,
    /// Both, from the one forward.
    Both,
}

impl OutputKind {
    fn single(self) -> bool {
        self != OutputKind::Multi
    }
    fn multi(self) -> bool {
        self != OutputKind::Single
    }
}

/// One text to embed.
#[derive(Clone, Debug)]
pub struct TextRequest {
    /// The raw text (the prompt prefix is added here).
    pub text: String,
    /// Task adapter.
    pub task: Task,
    /// Query or passage prompt (text-matching always uses "Query").
    pub prompt: PromptName,
    /// Which outputs.
    pub output: OutputKind,
    /// Matryoshka width of the single vector (one of the model's `matryoshka_dims`); `None` =
    /// full width.
    pub dims: Option<usize>,
}

/// The result for one request.
#[derive(Clone, Debug, Default)]
pub struct Embedding {
    /// L2-normalised single vector, truncated and renormalised to the requested width.
    pub single: Option<Vec<f32>>,
    /// `[tokens, proj_dim]` row-major, each row L2-normalised.
    pub multi: Option<Vec<f32>>,
    /// Tokens embedded (prompt included).
    pub tokens: usize,
    /// Tokens cut off by truncation.
    pub dropped: usize,
}

/// Engine settings.
#[derive(Clone, Debug)]
pub struct EngineOptions {
    /// CUDA device ordinal.
    pub device: usize,
    /// Most tokens in one forward (sequences are packed up to it).
    pub max_batch_tokens: usize,
    /// Activation memory budget (e.g. "20GiB"); `None`: `$JV4_MEM_BUDGET`, else 90% of free.
    pub mem_budget: Option<String>,
    /// Truncation of long texts.
    pub truncation: Truncation,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            device: 0,
            max_batch_tokens: 16384,
            mem_budget: None,
            truncation: Truncation::default(),
        }
    }
}

/// Checks what can be checked before a request reaches the GPU: its Matryoshka width is one of
/// the model's, and its token count fits the batch budget.
pub fn check_request(
    req: &TextRequest,
    tokens: usize,
    matryoshka_dims: &[usize],
    hidden: usize,
    max_batch_tokens: usize,
) -> Result<()> {
    if let Some(d) = req.dims {
        if !matryoshka_dims.contains(&d) && d != hidden {
            return Err(Error::Input(format!(
                "dims {d} is not one of the Matryoshka sizes {matryoshka_dims:?}"
            )));
        }
    }
    if tokens > max_batch_tokens {
        return Err(Error::Input(format!(
            "the text has {tokens} tokens, more than the batch budget of {max_batch_tokens} tokens \
             (max_batch_tokens): raise the budget or lower --max-length"
        )));
    }
    Ok(())
}

/// The engine: see the module documentation.
pub struct Engine {
    gpu: Gpu,
    model: GpuModel,
    mem: DeviceAllocator,
    tok: TextTokenizer,
    opts: EngineOptions,
    load: LoadReport,
}

impl Engine {
    /// Opens a model folder (checkpoint + tokenizer.json), loads it onto the GPU, and sets up the
    /// allocator with the remaining memory budget.
    pub fn open(model_dir: &Path, opts: EngineOptions) -> Result<Engine> {
        let tok = TextTokenizer::from_model_dir(model_dir)?;
        Self::with_tokenizer(model_dir, tok, opts)
    }

    /// Like [`Engine::open`] with a tokenizer loaded elsewhere (a checkpoint folder without
    /// tokenizer.json, e.g. a synthetic one).
    pub fn with_tokenizer(model_dir: &Path, tok: TextTokenizer, opts: EngineOptions) -> Result<Engine> {
        if opts.max_batch_tokens == 0 {
            return Err(Error::Input("max_batch_tokens must be at least 1".into()));
        }
        let ckpt = Checkpoint::open(model_dir)?;
        let gpu = Gpu::new(opts.device)?;
        let (model, load) = GpuModel::load(&gpu, &ckpt)?;
        drop(ckpt);
        let (free, _) = gpu.mem_info()?;
        let budget = resolve_budget(opts.mem_budget.as_deref(), free)?;
        let mem = DeviceAllocator::new(&gpu, budget, DEFAULT_PAGE_SIZE)?;
        Ok(Engine { gpu, model, mem, tok, opts, load })
    }

    /// The GPU.
    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// The model on the GPU.
    pub fn model(&self) -> &GpuModel {
        &self.model
    }

    /// How the weights were loaded.
    pub fn load_report(&self) -> LoadReport {
        self.load
    }

    /// Activation allocator statistics (peak since the last [`Engine::reset_peak`]).
    pub fn mem_stats(&self) -> MemStats {
        self.mem.stats()
    }

    /// Restarts peak-memory tracking.
    pub fn reset_peak(&mut self) {
        self.mem.reset_peak();
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &TextTokenizer {
        &self.tok
    }

    /// Embeds text requests: one result per request, in order.
    pub fn embed_texts(&mut self, reqs: &[TextRequest]) -> Vec<Result<Embedding>> {
        let items: Vec<_> = reqs.iter().map(|r| (r.task, r.prompt, r.text.as_str())).collect();
        let encoded = self.tok.encode_batch_prompted(&items, self.opts.truncation);
        let mut results: Vec<Option<Result<Embedding>>> = (0..reqs.len()).map(|_| None).collect();
        let mut ready: Vec<(usize, EncodedText)> = Vec::new();
        for (i, (req, enc)) in reqs.iter().zip(encoded).enumerate() {
            match enc.and_then(|e| self.check(req, e)) {
                Ok(e) => ready.push((i, e)),
                Err(e) => results[i] = Some(Err(e)),
            }
        }
        // Pack in request order up to the token budget.
        let mut start = 0;
        while start < ready.len() {
            let mut end = start;
            let mut tokens = 0;
            while end < ready.len() && tokens + ready[end].1.ids.len() <= self.opts.max_batch_tokens {
                tokens += ready[end].1.ids.len();
                end += 1;
            }
            self.run_batch(reqs, &ready[start..end], &mut results);
            start = end;
        }
        results.into_iter().map(|r| r.expect("every request answered")).collect()
    }

    fn check(&self, req: &TextRequest, enc: EncodedText) -> Result<EncodedText> {
        let cfg = self.model.config();
        check_request(
            req,
            enc.ids.len(),
            &cfg.matryoshka_dims,
            cfg.text.hidden_size,
            self.opts.max_batch_tokens,
        )?;
        Ok(enc)
    }

    /// One forward for `group`; on out-of-memory, halves the group and tries again.
    fn run_batch(
        &mut self,
        reqs: &[TextRequest],
        group: &[(usize, EncodedText)],
        results: &mut [Option<Result<Embedding>>],
    ) {
        let mut batch = TextBatch::default();
        for (i, e) in group {
            batch.push_text(&e.ids, reqs[*i].task);
        }
        let want_multi = group.iter().any(|(i, _)| reqs[*i].output.multi());
        match self.model.forward_text(&self.gpu, &mut self.mem, &batch, want_multi) {
            Ok(out) => {
                let hid = self.model.config().text.hidden_size;
                let pd = self.model.config().multi_vector_projector_dim;
                let mut row = 0;
                for (k, (i, e)) in group.iter().enumerate() {
                    let req = &reqs[*i];
                    let n = e.ids.len();
                    let single = &out.single[k * hid..(k + 1) * hid];
                    let emb = Embedding {
                        single: req.output.single().then(|| match req.dims {
                            Some(d) if d < hid => matryoshka(single, d),
                            _ => single.to_vec(),
                        }),
                        multi: req.output.multi().then(|| {
                            out.multi.as_ref().expect("multi computed")[row * pd..(row + n) * pd].to_vec()
                        }),
                        tokens: n,
                        dropped: e.dropped,
                    };
                    results[*i] = Some(Ok(emb));
                    row += n;
                }
            }
            Err(Error::OutOfMemory { .. }) if group.len() > 1 => {
                let mid = group.len() / 2;
                self.run_batch(reqs, &group[..mid], results);
                self.run_batch(reqs, &group[mid..], results);
            }
            Err(e) => {
                let msg = e.to_string();
                for (i, _) in group {
                    results[*i] = Some(Err(match &e {
                        Error::OutOfMemory { requested, in_use, budget } => {
                            Error::OutOfMemory { requested: *requested, in_use: *in_use, budget: *budget }
                        }
                        Error::Input(m) => Error::Input(m.clone()),
                        _ => Error::Cuda { what: "the batch's forward".into(), msg: msg.clone() },
                    }));
                }
            }
        }
    }
}
