//! Requests → token ids and image patches, on the caller's threads (never on the worker's): texts
//! are tokenized in one batched call, images read, decoded and preprocessed in parallel. Every
//! request is checked here (Matryoshka width, image template), so that what reaches the worker
//! can only fail for reasons of the batch.

use crate::engine::image::{self, ImageConfig};
use crate::engine::limits::Limits;
use crate::engine::request::{Chunk, Embedding, Input, MultiVector, Request};
use crate::engine::text::{
    plan_chunks, plan_macro_chunks, ChunkSpan, MacroChunk, TextTokenizer, Truncation,
    DEFAULT_LATE_CHUNK_OVERLAP,
};
use crate::model::batch::ImageInput;
use crate::model::config::ModelConfig;
use crate::model::plan::GridThw;
use crate::{Error, Result};

/// A request ready for a forward: its ids and, for an image, its patch rows.
#[derive(Clone, Debug)]
pub(crate) struct Prepared {
    pub ids: Vec<u32>,
    pub dropped: usize,
    pub image: Option<ImageInput>,
    /// The late chunks of a chunked text (`None` when not chunked).
    pub chunks: Option<Vec<ChunkSpan>>,
}

impl Prepared {
    pub fn patches(&self) -> usize {
        self.image.as_ref().map_or(0, |i| i.grid.patches())
    }
}

/// A request ready for the workers: one sequence, or for a late-chunked text longer than one
/// forward, one per macro-chunk (long late chunking, [`plan_macro_chunks`]).
pub(crate) enum Ready {
    One(Prepared),
    Long(LongText),
}

/// The macro-chunks of a long late-chunked text, and how their results make one.
pub(crate) struct LongText {
    /// One sequence per macro-chunk: the prompt prefix, then its text tokens; its chunks are the
    /// ones it pools, in its own positions.
    pub parts: Vec<Prepared>,
    pub layout: LongLayout,
}

/// How the macro-chunks' results are put together ([`LongLayout::assemble`]).
pub(crate) struct LongLayout {
    plan: Vec<MacroChunk>,
    /// The chunks, in positions of the whole prompted sequence.
    chunks: Vec<ChunkSpan>,
    prefix: usize,
    tokens: usize,
}

impl LongLayout {
    /// The text's result from its macro-chunks' (in plan order): every chunk as its macro-chunk
    /// pooled it, with its positions in the whole sequence; multi-vector rows from the macro-chunk
    /// owning each token; the whole-text single vector that of the first macro-chunk (the text as
    /// truncated to one forward: a mean over states of several forwards is no one forward's).
    pub fn assemble(&self, parts: Vec<crate::Result<Embedding>>) -> crate::Result<Embedding> {
        let parts = parts.into_iter().collect::<crate::Result<Vec<Embedding>>>()?;
        let broken =
            || crate::Error::Internal("long late chunking: a macro-chunk's result is incomplete".into());
        let multi = match parts.first().and_then(|e| e.multi.as_ref()) {
            None => None,
            Some(first) => {
                let dim = first.dim;
                let mut data = Vec::with_capacity(self.tokens * dim);
                for (m, e) in self.plan.iter().zip(&parts) {
                    let rows = &e.multi.as_ref().ok_or_else(broken)?.data;
                    let (a, b) = (m.local(self.prefix, m.owned.start), m.local(self.prefix, m.owned.end));
                    data.extend_from_slice(rows.get(a * dim..b * dim).ok_or_else(broken)?);
                }
                Some(MultiVector { dim, data })
            }
        };
        let mut chunks = Vec::with_capacity(self.chunks.len());
        for (m, e) in self.plan.iter().zip(&parts) {
            let got = e.chunks.as_deref().unwrap_or(&[]);
            if got.len() != m.chunks.len() {
                return Err(broken());
            }
            for (c, span) in got.iter().zip(&self.chunks[m.chunks.clone()]) {
                chunks.push(Chunk { tokens: span.tokens.clone(), chars: span.chars.clone(), ..c.clone() });
            }
        }
        Ok(Embedding {
            single: parts[0].single.clone(),
            multi,
            tokens: self.tokens,
            dropped: 0,
            chunks: Some(chunks),
        })
    }
}

/// Everything preparation needs; shared by all callers of an engine.
pub(crate) struct Preparer {
    pub tok: TextTokenizer,
    pub cfg: ModelConfig,
    pub image_cfg: ImageConfig,
    /// The image prompt's ids before and after the `<|image_pad|>` run (docs/MODEL.md §4.2).
    pub image_template: (Vec<u32>, Vec<u32>),
    pub truncation: Truncation,
    pub max_batch_patches: usize,
    pub threads: usize,
    /// Round patch rows to bf16 here (for a GPU backend), off the worker's thread.
    pub bf16_pixels: bool,
    /// Input size limits (set by `Engine::open`).
    pub limits: Limits,
    /// Overlap of long late chunking's macro-chunks, in tokens (set by `Engine::open`).
    pub late_chunk_overlap: usize,
}

impl Preparer {
    pub fn new(
        tok: TextTokenizer,
        cfg: ModelConfig,
        image_cfg: ImageConfig,
        truncation: Truncation,
        max_batch_patches: usize,
        threads: usize,
        bf16_pixels: bool,
    ) -> Result<Preparer> {
        let image_template = (
            tok.encode_raw("<|im_start|>user\n<|vision_start|>")?,
            tok.encode_raw("<|vision_end|>Describe the image.<|im_end|>\n")?,
        );
        Ok(Preparer {
            tok,
            cfg,
            image_cfg,
            image_template,
            truncation,
            max_batch_patches,
            threads,
            bf16_pixels,
            limits: Limits::default(),
            late_chunk_overlap: DEFAULT_LATE_CHUNK_OVERLAP,
        })
    }

    /// One result per request, in order.
    pub fn prepare(&self, reqs: &[Request]) -> Vec<Result<Ready>> {
        let mut long: Vec<Option<LongText>> = (0..reqs.len()).map(|_| None).collect();
        let mut out: Vec<Option<Result<Prepared>>> =
            reqs.iter().map(|r| self.check(r).err().map(Err)).collect();
        // Texts: one batched tokenizer call.
        let texts: Vec<(usize, &Request, &str)> = reqs
            .iter()
            .enumerate()
            .filter(|(i, r)| out[*i].is_none() && r.chunking.is_none())
            .filter_map(|(i, r)| if let Input::Text(t) = &r.input { Some((i, r, t.as_str())) } else { None })
            .collect();
        let items: Vec<_> = texts.iter().map(|(_, r, t)| (r.task, r.prompt, *t)).collect();
        for ((i, _, _), enc) in texts.iter().zip(self.tok.encode_batch_prompted(&items, self.truncation)) {
            out[*i] =
                Some(enc.map(|e| Prepared { ids: e.ids, dropped: e.dropped, image: None, chunks: None }));
        }
        // Late-chunked texts: one by one, with offsets.
        for (i, r) in reqs.iter().enumerate() {
            if let (None, Input::Text(t), Some(_)) = (&out[i], &r.input, &r.chunking) {
                out[i] = Some(match self.chunked(r, t) {
                    Ok(Ready::One(p)) => Ok(p),
                    Ok(Ready::Long(l)) => {
                        long[i] = Some(l);
                        continue;
                    }
                    Err(e) => Err(e),
                });
            }
        }
        // Token ids: as they are, truncated.
        for (i, r) in reqs.iter().enumerate() {
            if let (None, Input::Tokens(ids)) = (&out[i], &r.input) {
                out[i] = Some(self.tokens(ids));
            }
        }
        // Images: read, decode and preprocess on threads.
        let images: Vec<(usize, &Request)> =
            reqs.iter().enumerate().filter(|(i, r)| out[*i].is_none() && r.is_image()).collect();
        let threads = self.threads.max(1);
        let done: Vec<Result<Prepared>> = std::thread::scope(|s| {
            let chunk = images.len().div_ceil(threads).max(1);
            let handles: Vec<_> = images
                .chunks(chunk)
                .map(|part| s.spawn(move || part.iter().map(|(_, r)| self.image(r)).collect::<Vec<_>>()))
                .collect();
            handles
                .into_iter()
                .flat_map(|h| {
                    h.join().unwrap_or_else(|_| {
                        vec![Err(Error::Input("image preprocessing panicked".into())); chunk]
                    })
                })
                .collect()
        });
        for ((i, _), p) in images.iter().zip(done) {
            out[*i] = Some(p);
        }
        out.into_iter()
            .zip(long)
            .map(|(p, l)| match (p, l) {
                (_, Some(l)) => Ok(Ready::Long(l)),
                (Some(p), None) => p.map(Ready::One),
                (None, None) => Err(Error::Input("request was not prepared (a bug)".into())),
            })
            .collect()
    }

    /// What can be checked before any work.
    fn check(&self, r: &Request) -> Result<()> {
        match &r.input {
            Input::Text(t) => self.limits.check_text(t)?,
            Input::ImageBytes(b) => self.limits.check_image_bytes(b)?,
            _ => {}
        }
        if let Some(d) = r.dims {
            let m = &self.cfg.matryoshka_dims;
            if !m.contains(&d) && d != self.cfg.text.hidden_size {
                return Err(Error::Input(format!("dims {d} is not one of the Matryoshka sizes {m:?}")));
            }
        }
        if let Some(0) = r.max_pixels {
            return Err(Error::Input("max_pixels must be at least 1".into()));
        }
        if r.chunking.is_some() && !matches!(r.input, Input::Text(_)) {
            return Err(Error::Input("late chunking applies to texts only".into()));
        }
        Ok(())
    }

    /// A late-chunked text, never truncated (chunks past a cut would have no tokens): the whole
    /// text in one sequence, and its chunks; or, longer than one forward (`max_length`), its
    /// macro-chunks (long late chunking, [`plan_macro_chunks`]).
    fn chunked(&self, r: &Request, text: &str) -> Result<Ready> {
        let limit = self.truncation.limit()?;
        let enc = self.tok.encode_with_offsets(r.task, r.prompt, text)?;
        let chunks = plan_chunks(&enc, text, r.chunking.as_ref().expect("a chunked request"))?;
        if enc.ids.len() <= limit {
            return Ok(Ready::One(Prepared { ids: enc.ids, dropped: 0, image: None, chunks: Some(chunks) }));
        }
        let prefix = enc.first_text_token;
        let plan = plan_macro_chunks(enc.ids.len(), prefix, &chunks, limit, self.late_chunk_overlap)?;
        let parts = plan
            .iter()
            .map(|m| {
                let mut ids = enc.ids[..prefix].to_vec();
                ids.extend_from_slice(&enc.ids[m.body.clone()]);
                let own = chunks[m.chunks.clone()]
                    .iter()
                    .map(|c| ChunkSpan {
                        tokens: m.local(prefix, c.tokens.start)..m.local(prefix, c.tokens.end),
                        chars: c.chars.clone(),
                    })
                    .collect();
                Prepared { ids, dropped: 0, image: None, chunks: Some(own) }
            })
            .collect();
        let layout = LongLayout { plan, chunks, prefix, tokens: enc.ids.len() };
        Ok(Ready::Long(LongText { parts, layout }))
    }

    fn tokens(&self, ids: &[u32]) -> Result<Prepared> {
        let limit = self.truncation.limit()?;
        if ids.is_empty() {
            return Err(Error::Input("no token ids".into()));
        }
        if ids.len() <= limit {
            return Ok(Prepared { ids: ids.to_vec(), dropped: 0, image: None, chunks: None });
        }
        if self.truncation.strict {
            return Err(Error::Input(format!(
                "{} token ids, over the limit of {limit} tokens (strict truncation)",
                ids.len()
            )));
        }
        Ok(Prepared { ids: ids[..limit].to_vec(), dropped: ids.len() - limit, image: None, chunks: None })
    }

    /// Decodes and preprocesses one image (resized down to fit the patch budget), and lays out
    /// its prompt with the `<|image_pad|>` run of its merged tokens.
    fn image(&self, r: &Request) -> Result<Prepared> {
        let cfg = &self.image_cfg;
        let ceiling = self.max_batch_patches * cfg.patch_size * cfg.patch_size;
        let mut c = cfg.clone();
        c.max_pixels = r.max_pixels.unwrap_or(cfg.max_pixels).min(ceiling);
        c.min_pixels = c.min_pixels.min(c.max_pixels);
        let p = match &r.input {
            Input::ImageBytes(b) => image::preprocess_bytes(b, &c, image::AlphaMode::Drop)?,
            Input::ImagePath(path) => {
                image::preprocess_file_with(path, &c, image::AlphaMode::Drop, &self.limits)?
            }
            _ => return Err(Error::Input("not an image request".into())),
        };
        let grid = GridThw { t: p.grid_thw[0], h: p.grid_thw[1], w: p.grid_thw[2] };
        let (pre, post) = &self.image_template;
        let mut ids = pre.clone();
        ids.extend(std::iter::repeat_n(self.cfg.special.image_token_id, grid.merged_tokens(cfg.merge_size)));
        ids.extend_from_slice(post);
        let mut image = ImageInput::new(grid, p.pixel_values);
        if self.bf16_pixels {
            image.pixel_values = image.pixel_values.into_bf16();
        }
        Ok(Prepared { ids, dropped: 0, image: Some(image), chunks: None })
    }
}
