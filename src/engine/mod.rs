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
use crate::model::plan::GridThw;
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

/// One image to embed (spec §4): the encoded file's bytes (JPEG, PNG, WebP, GIF, BMP, TIFF).
#[derive(Clone, Debug)]
pub struct ImageRequest {
    /// The image file's bytes.
    pub bytes: Vec<u8>,
    /// Task adapter (images take no prompt).
    pub task: Task,
    /// Which outputs.
    pub output: OutputKind,
    /// Matryoshka width of the single vector.
    pub dims: Option<usize>,
    /// Resize ceiling for this image (default: the checkpoint's preprocessor max_pixels).
    pub max_pixels: Option<usize>,
}

/// A text or an image.
#[derive(Clone, Debug)]
pub enum Request {
    /// A text.
    Text(TextRequest),
    /// An image.
    Image(ImageRequest),
}

impl Request {
    fn output(&self) -> OutputKind {
        match self {
            Request::Text(r) => r.output,
            Request::Image(r) => r.output,
        }
    }
    fn dims(&self) -> Option<usize> {
        match self {
            Request::Text(r) => r.dims,
            Request::Image(r) => r.dims,
        }
    }
    fn task(&self) -> Task {
        match self {
            Request::Text(r) => r.task,
            Request::Image(r) => r.task,
        }
    }
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
    /// Most image patches in one forward; a larger image is resized down to fit (its
    /// max_pixels lowered), never an out-of-memory.
    pub max_batch_patches: usize,
    /// CPU threads for image decoding and preprocessing.
    pub preprocess_threads: usize,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            device: 0,
            max_batch_tokens: 16384,
            mem_budget: None,
            truncation: Truncation::default(),
            max_batch_patches: 16384,
            preprocess_threads: std::thread::available_parallelism().map_or(4, |n| n.get()).min(16),
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
    image_cfg: image::ImageConfig,
    /// The image prompt's ids around the `<|image_pad|>` run (spec §4.2).
    image_template: (Vec<u32>, Vec<u32>),
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
        let image_cfg = image::ImageConfig::from(&ckpt.preprocessor);
        let image_template = (
            tok.encode_raw("<|im_start|>user\n<|vision_start|>")?,
            tok.encode_raw("<|vision_end|>Describe the image.<|im_end|>\n")?,
        );
        let gpu = Gpu::new(opts.device)?;
        let (model, load) = GpuModel::load(&gpu, &ckpt)?;
        drop(ckpt);
        let (free, _) = gpu.mem_info()?;
        let budget = resolve_budget(opts.mem_budget.as_deref(), free)?;
        let mem = DeviceAllocator::new(&gpu, budget, DEFAULT_PAGE_SIZE)?;
        Ok(Engine { gpu, model, mem, tok, opts, load, image_cfg, image_template })
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
        let all: Vec<Request> = reqs.iter().cloned().map(Request::Text).collect();
        self.embed(&all)
    }

    /// Embeds any mix of texts and images, tasks and outputs: one result per request, in order.
    /// Requests go in windows: while the GPU runs one window's forwards, CPU threads tokenize the
    /// next window's texts and decode and preprocess its images. Inside a window they are packed
    /// in order into forwards under the token and patch budgets.
    pub fn embed(&mut self, reqs: &[Request]) -> Vec<Result<Embedding>> {
        /// Requests prepared ahead of the GPU at a time.
        const WINDOW: usize = 256;
        let mut results: Vec<Option<Result<Embedding>>> = (0..reqs.len()).map(|_| None).collect();
        let Engine { gpu, model, mem, tok, opts, image_cfg, image_template, .. } = self;
        let prep = Prep { tok, opts, image_cfg, image_template, cfg: model.config() };
        let windows: Vec<(usize, usize)> =
            (0..reqs.len()).step_by(WINDOW).map(|s| (s, (s + WINDOW).min(reqs.len()))).collect();
        let mut next = windows.first().map(|&(a, b)| prep.prepare(&reqs[a..b]));
        for (k, &(a, _)) in windows.iter().enumerate() {
            let current = next.take().expect("prepared window");
            std::thread::scope(|s| {
                let ahead = windows.get(k + 1).map(|&(c, d)| {
                    let prep = &prep;
                    s.spawn(move || prep.prepare(&reqs[c..d]))
                });
                let ready = prep.check_all(reqs, a, current, &mut results);
                run_window(gpu, model, mem, opts, reqs, &ready, &mut results);
                next = ahead.map(|h| h.join().expect("preparation thread"));
            });
        }
        results.into_iter().map(|r| r.expect("every request answered")).collect()
    }
}

/// What preparing requests needs: everything but the GPU.
struct Prep<'a> {
    tok: &'a TextTokenizer,
    opts: &'a EngineOptions,
    image_cfg: &'a image::ImageConfig,
    image_template: &'a (Vec<u32>, Vec<u32>),
    cfg: &'a crate::model::config::ModelConfig,
}

impl Prep<'_> {
    /// Tokenizes the texts (one call) and decodes and preprocesses the images (on threads); an
    /// image over the patch budget is resized down to fit.
    fn prepare(&self, reqs: &[Request]) -> Vec<Result<Prepared>> {
        let mut out: Vec<Option<Result<Prepared>>> = (0..reqs.len()).map(|_| None).collect();
        let texts: Vec<(usize, &TextRequest)> = reqs
            .iter()
            .enumerate()
            .filter_map(|(i, r)| if let Request::Text(t) = r { Some((i, t)) } else { None })
            .collect();
        let items: Vec<_> = texts.iter().map(|(_, r)| (r.task, r.prompt, r.text.as_str())).collect();
        for ((i, _), enc) in texts.iter().zip(self.tok.encode_batch_prompted(&items, self.opts.truncation)) {
            out[*i] = Some(enc.map(|e| Prepared { ids: e.ids, dropped: e.dropped, image: None }));
        }
        let images: Vec<(usize, &ImageRequest)> = reqs
            .iter()
            .enumerate()
            .filter_map(|(i, r)| if let Request::Image(m) = r { Some((i, m)) } else { None })
            .collect();
        let cfg = self.image_cfg;
        let ceiling = self.opts.max_batch_patches * cfg.patch_size * cfg.patch_size;
        let threads = self.opts.preprocess_threads.max(1);
        let done: Vec<Result<image::Preprocessed>> = std::thread::scope(|s| {
            let chunk = images.len().div_ceil(threads).max(1);
            let handles: Vec<_> = images
                .chunks(chunk)
                .map(|part| {
                    s.spawn(move || {
                        part.iter()
                            .map(|(_, r)| {
                                let mut c = cfg.clone();
                                c.max_pixels = r.max_pixels.unwrap_or(cfg.max_pixels).min(ceiling);
                                c.min_pixels = c.min_pixels.min(c.max_pixels);
                                image::preprocess_bytes(&r.bytes, &c, image::AlphaMode::Drop)
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles.into_iter().flat_map(|h| h.join().expect("preprocessing thread")).collect()
        });
        let pad = self.cfg.special.image_token_id;
        for ((i, _), p) in images.iter().zip(done) {
            out[*i] = Some(p.map(|p| {
                let grid = GridThw { t: p.grid_thw[0], h: p.grid_thw[1], w: p.grid_thw[2] };
                let (pre, post) = self.image_template;
                let mut ids = pre.clone();
                ids.extend(std::iter::repeat_n(pad, grid.merged_tokens(cfg.merge_size)));
                ids.extend_from_slice(post);
                Prepared { ids, dropped: 0, image: Some((grid, p.pixel_values)) }
            }));
        }
        out.into_iter().map(|p| p.expect("every request prepared")).collect()
    }

    /// Checks each prepared request of the window starting at `offset`; failures are answered
    /// at once, the rest returned with their request index.
    fn check_all(
        &self,
        reqs: &[Request],
        offset: usize,
        prepared: Vec<Result<Prepared>>,
        results: &mut [Option<Result<Embedding>>],
    ) -> Vec<(usize, Prepared)> {
        let mut ready = Vec::new();
        for (k, p) in prepared.into_iter().enumerate() {
            let i = offset + k;
            let req = &reqs[i];
            let probe = TextRequest {
                text: String::new(),
                task: req.task(),
                prompt: PromptName::Query,
                output: req.output(),
                dims: req.dims(),
            };
            let checked = p.and_then(|p| {
                check_request(
                    &probe,
                    p.ids.len(),
                    &self.cfg.matryoshka_dims,
                    self.cfg.text.hidden_size,
                    self.opts.max_batch_tokens,
                )
                .map(|_| p)
            });
            match checked {
                Ok(p) => ready.push((i, p)),
                Err(e) => results[i] = Some(Err(e)),
            }
        }
        ready
    }
}

/// Packs a window's ready requests in order into forwards under the token and patch budgets.
fn run_window(
    gpu: &Gpu,
    model: &GpuModel,
    mem: &mut DeviceAllocator,
    opts: &EngineOptions,
    reqs: &[Request],
    ready: &[(usize, Prepared)],
    results: &mut [Option<Result<Embedding>>],
) {
    let mut start = 0;
    while start < ready.len() {
        let (mut end, mut tokens, mut patches) = (start, 0, 0);
        while end < ready.len() {
            let p = &ready[end].1;
            let np = p.image.as_ref().map_or(0, |(g, _)| g.patches());
            let over = tokens + p.ids.len() > opts.max_batch_tokens || patches + np > opts.max_batch_patches;
            if end > start && over {
                break;
            }
            tokens += p.ids.len();
            patches += np;
            end += 1;
        }
        run_batch(gpu, model, mem, reqs, &ready[start..end], results);
        start = end;
    }
}

/// One forward for `group`; on out-of-memory, halves the group and tries again.
fn run_batch(
    gpu: &Gpu,
    model: &GpuModel,
    mem: &mut DeviceAllocator,
    reqs: &[Request],
    group: &[(usize, Prepared)],
    results: &mut [Option<Result<Embedding>>],
) {
    let mut batch = TextBatch::default();
    let mut served = Vec::with_capacity(group.len());
    for (i, p) in group {
        let pushed = match &p.image {
            None => {
                batch.push_text(&p.ids, reqs[*i].task());
                Ok(())
            }
            Some((g, pv)) => batch.push_with_images(model.config(), &p.ids, reqs[*i].task(), &[(*g, pv)]),
        };
        match pushed {
            Ok(()) => served.push((*i, p)),
            Err(e) => results[*i] = Some(Err(e)),
        }
    }
    if served.is_empty() {
        return;
    }
    let want_multi = served.iter().any(|(i, _)| reqs[*i].output().multi());
    match model.forward_text(gpu, mem, &batch, want_multi) {
        Ok(out) => {
            let hid = model.config().text.hidden_size;
            let pd = model.config().multi_vector_projector_dim;
            let mut row = 0;
            for (k, (i, p)) in served.iter().enumerate() {
                let req = &reqs[*i];
                let n = p.ids.len();
                let single = &out.single[k * hid..(k + 1) * hid];
                let emb = Embedding {
                    single: req.output().single().then(|| match req.dims() {
                        Some(d) if d < hid => matryoshka(single, d),
                        _ => single.to_vec(),
                    }),
                    multi: req.output().multi().then(|| {
                        out.multi.as_ref().expect("multi computed")[row * pd..(row + n) * pd].to_vec()
                    }),
                    tokens: n,
                    dropped: p.dropped,
                };
                results[*i] = Some(Ok(emb));
                row += n;
            }
        }
        Err(Error::OutOfMemory { .. }) if served.len() > 1 => {
            let rest: Vec<(usize, Prepared)> = served.iter().map(|(i, p)| (*i, (*p).clone())).collect();
            let mid = rest.len() / 2;
            run_batch(gpu, model, mem, reqs, &rest[..mid], results);
            run_batch(gpu, model, mem, reqs, &rest[mid..], results);
        }
        Err(e) => {
            let msg = e.to_string();
            for (i, _) in &served {
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

/// A request ready for the GPU: its token ids and, for an image, its grid and patch rows.
#[derive(Clone, Debug)]
struct Prepared {
    ids: Vec<u32>,
    dropped: usize,
    image: Option<(GridThw, Vec<f32>)>,
}
