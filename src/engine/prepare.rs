//! Requests → token ids and image patches, on the caller's threads (never on the worker's): texts
//! are tokenized in one batched call, images read, decoded and preprocessed in parallel. Every
//! request is checked here (Matryoshka width, image template), so that what reaches the worker
//! can only fail for reasons of the batch.

use crate::engine::image::{self, ImageConfig};
use crate::engine::limits::Limits;
use crate::engine::request::{Input, Request};
use crate::engine::text::{plan_chunks, ChunkSpan, TextTokenizer, Truncation};
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
        })
    }

    /// One result per request, in order.
    pub fn prepare(&self, reqs: &[Request]) -> Vec<Result<Prepared>> {
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
                out[i] = Some(self.chunked(r, t));
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
            .map(|p| p.unwrap_or_else(|| Err(Error::Input("request was not prepared (a bug)".into()))))
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

    /// A late-chunked text: the whole text in one sequence (never truncated: chunks past a cut
    /// would have no tokens), and its chunks.
    fn chunked(&self, r: &Request, text: &str) -> Result<Prepared> {
        let limit = self.truncation.limit()?;
        let enc = self.tok.encode_with_offsets(r.task, r.prompt, text)?;
        if enc.ids.len() > limit {
            // Partial: "long late chunking" (overlapping macro-chunks) is not built; such a text
            // is refused rather than chunked over a truncated forward.
            return Err(Error::Input(format!(
                "late chunking: the text is {} tokens with its prompt, over the limit of {limit} \
                 tokens of one forward (long late chunking over several forwards is not \
                 supported yet; split the text first)",
                enc.ids.len()
            )));
        }
        let chunks = plan_chunks(&enc, text, r.chunking.as_ref().expect("a chunked request"))?;
        Ok(Prepared { ids: enc.ids, dropped: 0, image: None, chunks: Some(chunks) })
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
