//! What a host asks for and what it gets back: [`Request`] (an [`Input`] plus its task, prompt,
//! outputs and Matryoshka width) and [`Embedding`].

use std::path::PathBuf;

use crate::engine::text::PromptName;
use crate::model::Task;

/// Which outputs a request wants.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OutputKind {
    /// The pooled vector only.
    #[default]
    Single,
    /// The per-token vectors only.
    Multi,
    /// Both, from the one forward.
    Both,
}

impl OutputKind {
    /// Whether the single vector is wanted.
    pub fn single(self) -> bool {
        self != OutputKind::Multi
    }
    /// Whether the multi-vector rows are wanted.
    pub fn multi(self) -> bool {
        self != OutputKind::Single
    }
}

/// What to embed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Input {
    /// A text; the task's prompt prefix is added (docs/MODEL.md §3.1).
    Text(String),
    /// An image file (JPEG, PNG, WebP, GIF, BMP, TIFF), read when the request is prepared.
    ImagePath(PathBuf),
    /// An encoded image file's bytes.
    ImageBytes(Vec<u8>),
    /// Token ids used as they are: the caller has applied the prompt. Truncated like a text.
    Tokens(Vec<u32>),
}

/// One thing to embed and how. Build with [`Request::text`] (or the other constructors) and the
/// setters:
///
/// ```
/// use jv4::{OutputKind, PromptName, Request, Task};
/// let r = Request::text("fn main() {}").task(Task::Code).prompt(PromptName::Passage).dims(128);
/// assert_eq!(r.dims, Some(128));
/// assert_eq!(r.output, OutputKind::Single);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// The input.
    pub input: Input,
    /// Task adapter (default: retrieval).
    pub task: Task,
    /// Query or passage prompt for texts (text-matching always uses "Query"; images take none).
    pub prompt: PromptName,
    /// Which outputs.
    pub output: OutputKind,
    /// Matryoshka width of the single vector (one of the model's `matryoshka_dims`); `None` =
    /// full width.
    pub dims: Option<usize>,
    /// Resize ceiling for an image (default: the checkpoint's preprocessor `max_pixels`).
    pub max_pixels: Option<usize>,
    /// Late chunking of a text: one forward over the whole text (longer than `max_length`:
    /// overlapping macro-chunks, see [`crate::engine::plan_macro_chunks`]), then one result per
    /// chunk.
    pub chunking: Option<Chunking>,
}

/// How a text is cut into chunks for late chunking (the whole text is embedded in one pass; each
/// chunk's vectors pool that chunk's tokens only, docs/MODEL.md §11).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Chunking {
    /// Consecutive chunks of this many tokens of the text (the prompt prefix belongs to none).
    Tokens(usize),
    /// Explicit `[start, end)` byte ranges of the text (UTF-8 character boundaries), in order,
    /// not overlapping.
    Spans(Vec<(usize, usize)>),
}

/// The result for one chunk of a late-chunked text.
#[derive(Clone, Debug, PartialEq)]
pub struct Chunk {
    /// Mean of the chunk's final hidden states, L2-normalised, at the request's width.
    pub single: Option<Vec<f32>>,
    /// The chunk's per-token vectors.
    pub multi: Option<MultiVector>,
    /// The chunk's `[start, end)` token positions in the embedded sequence (prompt included).
    pub tokens: std::ops::Range<usize>,
    /// The chunk's `[start, end)` byte range in the text.
    pub chars: std::ops::Range<usize>,
}

impl Request {
    fn of(input: Input) -> Request {
        Request {
            input,
            task: Task::Retrieval,
            prompt: PromptName::Query,
            output: OutputKind::Single,
            dims: None,
            max_pixels: None,
            chunking: None,
        }
    }

    /// A text request (retrieval task, query prompt, single vector at full width).
    pub fn text(text: impl Into<String>) -> Request {
        Request::of(Input::Text(text.into()))
    }

    /// An image file to read.
    pub fn image_path(path: impl Into<PathBuf>) -> Request {
        Request::of(Input::ImagePath(path.into()))
    }

    /// An encoded image.
    pub fn image_bytes(bytes: impl Into<Vec<u8>>) -> Request {
        Request::of(Input::ImageBytes(bytes.into()))
    }

    /// Token ids, used as they are.
    pub fn tokens(ids: impl Into<Vec<u32>>) -> Request {
        Request::of(Input::Tokens(ids.into()))
    }

    /// With this task.
    pub fn task(mut self, task: Task) -> Request {
        self.task = task;
        self
    }

    /// With this prompt.
    pub fn prompt(mut self, prompt: PromptName) -> Request {
        self.prompt = prompt;
        self
    }

    /// With these outputs.
    pub fn output(mut self, output: OutputKind) -> Request {
        self.output = output;
        self
    }

    /// With this Matryoshka width.
    pub fn dims(mut self, dims: usize) -> Request {
        self.dims = Some(dims);
        self
    }

    /// With late chunking.
    pub fn late_chunking(mut self, chunking: Chunking) -> Request {
        self.chunking = Some(chunking);
        self
    }

    /// With this image resize ceiling.
    pub fn max_pixels(mut self, max_pixels: usize) -> Request {
        self.max_pixels = Some(max_pixels);
        self
    }

    /// Whether the input is an image.
    pub fn is_image(&self) -> bool {
        matches!(self.input, Input::ImagePath(_) | Input::ImageBytes(_))
    }
}

/// Per-token vectors: `data` is `[rows, dim]` row-major, each row L2-normalised.
#[derive(Clone, Debug, PartialEq)]
pub struct MultiVector {
    /// Width of a row (the projector's, 128).
    pub dim: usize,
    /// The rows, one per token.
    pub data: Vec<f32>,
}

impl MultiVector {
    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.data.len() / self.dim.max(1)
    }

    /// Row `i`.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.dim..(i + 1) * self.dim]
    }
}

/// The result for one request.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Embedding {
    /// L2-normalised single vector, truncated and renormalised to the requested width.
    pub single: Option<Vec<f32>>,
    /// The per-token vectors.
    pub multi: Option<MultiVector>,
    /// Tokens embedded (prompt included).
    pub tokens: usize,
    /// Tokens cut off by truncation.
    pub dropped: usize,
    /// Per chunk, for a late-chunked request (`single` and `multi` above are then the whole
    /// text's; for a text longer than one forward, `multi` has every token's row and `single` is
    /// the first macro-chunk's vector).
    pub chunks: Option<Vec<Chunk>>,
}

/// The first `dims` components of a unit vector, renormalised to unit length (Matryoshka
/// truncation, docs/MODEL.md §8.1); the norm in f64.
pub fn matryoshka(v: &[f32], dims: usize) -> Vec<f32> {
    let head = &v[..dims.min(v.len())];
    let norm = head.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
    let inv = if norm > 0.0 { 1.0 / norm } else { 0.0 };
    head.iter().map(|&x| (x as f64 * inv) as f32).collect()
}
