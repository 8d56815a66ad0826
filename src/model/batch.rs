//! One packed batch: the sequences of a forward concatenated without padding, with everything
//! both forwards need planned on the host (docs/MODEL.md §3, §4.3, §7.3, §8). The engine builds it;
//! [`crate::model::cpu::CpuModel`] and the GPU decoder take it as it is, so the two forwards can
//! differ only in how they compute, never in what they are given.
//!
//! [`PackedBatch::push`] validates a sequence completely before it changes the batch: a bad
//! sequence is refused alone and the batch stays usable for the others.

use half::bf16;

use crate::model::config::ModelConfig;
use crate::model::plan::{self, GridThw, MropePositions};
use crate::model::Task;
use crate::{Error, Result};

/// Patch rows in the precision a backend consumes: f32 for the CPU forward (as the fp32
/// reference feeds them), bf16 for the GPU (the reference's bf16 patch embedding rounds them so).
/// The engine prepares the backend's kind on the callers' threads, so the worker only copies.
#[derive(Clone, Debug, PartialEq)]
pub enum Pixels {
    /// f32 values.
    F32(Vec<f32>),
    /// bf16 values (rounded to nearest even from the f32 ones).
    Bf16(Vec<bf16>),
}

impl Pixels {
    /// Number of values.
    pub fn len(&self) -> usize {
        match self {
            Pixels::F32(v) => v.len(),
            Pixels::Bf16(v) => v.len(),
        }
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The values as f32 (bf16 widened exactly).
    pub fn to_f32(&self) -> Vec<f32> {
        match self {
            Pixels::F32(v) => v.clone(),
            Pixels::Bf16(v) => v.iter().map(|x| x.to_f32()).collect(),
        }
    }

    /// Writes the values as bf16 into `dst` (of the same length).
    pub fn write_bf16(&self, dst: &mut [bf16]) {
        match self {
            Pixels::F32(v) => dst.iter_mut().zip(v).for_each(|(d, &x)| *d = bf16::from_f32(x)),
            Pixels::Bf16(v) => dst.copy_from_slice(v),
        }
    }

    /// The same values rounded to bf16.
    pub fn into_bf16(self) -> Pixels {
        match self {
            Pixels::F32(v) => Pixels::Bf16(v.iter().map(|&x| bf16::from_f32(x)).collect()),
            b => b,
        }
    }
}

/// One preprocessed image: its patch rows and grid.
#[derive(Clone, Debug)]
pub struct ImageInput {
    /// `[grid.patches(), channels·temporal·patch²]` in merge-block row order.
    pub pixel_values: Pixels,
    /// The patch grid.
    pub grid: GridThw,
}

impl ImageInput {
    /// An image from f32 patch rows.
    pub fn new(grid: GridThw, pixel_values: Vec<f32>) -> ImageInput {
        ImageInput { pixel_values: Pixels::F32(pixel_values), grid }
    }

    /// The same image with its values rounded to bf16 (what a GPU backend consumes).
    pub fn bf16(self) -> ImageInput {
        ImageInput { pixel_values: self.pixel_values.into_bf16(), grid: self.grid }
    }
}

/// A packed batch of sequences. See the module documentation.
#[derive(Clone, Debug)]
pub struct PackedBatch {
    vocab_size: usize,
    image_token_id: u32,
    vision_start: u32,
    vision_end: u32,
    /// `<|video_pad|>` and `<|vision_pad|>` where the config names them: never in a sequence.
    video_ids: [Option<u32>; 2],
    merge: usize,
    ids: Vec<u32>,
    cu_seqlens: Vec<i32>,
    positions: MropePositions,
    tasks: Vec<Task>,
    row_task: Vec<u8>,
    spans: Vec<[u32; 2]>,
    /// Extra pooling spans (late chunking), absolute rows, all sequences' in order.
    chunk_spans: Vec<[u32; 2]>,
    /// `[0, n0, n0 + n1, …]`: sequence k's extra spans are `chunk_spans[cu_chunks[k]..cu_chunks[k + 1]]`.
    cu_chunks: Vec<usize>,
    images: Vec<ImageInput>,
    image_rows: Vec<u32>,
    /// Whether the multi-vector head runs (it always may: the single vector is always computed).
    pub want_multi: bool,
}

impl PackedBatch {
    /// An empty batch for the model `cfg`.
    pub fn new(cfg: &ModelConfig) -> Self {
        let sp = &cfg.special;
        PackedBatch {
            vocab_size: cfg.text.vocab_size,
            image_token_id: sp.image_token_id,
            vision_start: sp.vision_start_token_id,
            vision_end: sp.vision_end_token_id,
            video_ids: [sp.video_token_id, sp.vision_token_id],
            merge: cfg.vision.spatial_merge_size,
            ids: Vec::new(),
            cu_seqlens: vec![0],
            positions: MropePositions::default(),
            tasks: Vec::new(),
            row_task: Vec::new(),
            spans: Vec::new(),
            chunk_spans: Vec::new(),
            cu_chunks: vec![0],
            images: Vec::new(),
            image_rows: Vec::new(),
            want_multi: false,
        }
    }

    /// Appends a text sequence: [`PackedBatch::push`] without images.
    pub fn push_text(&mut self, ids: &[u32], task: Task) -> Result<()> {
        self.push(ids, task, Vec::new())
    }

    /// Appends one sequence whose `<|image_pad|>` runs are the blocks of `images`, in order (none
    /// for a text). Checks everything first (ids inside the vocabulary, one run per image of the
    /// length its grid merges to, patch rows that fit the grid, the pooling span's markers) and
    /// leaves the batch unchanged on an error. A text holding `<|image_pad|>` tokens is refused
    /// here: the runs would not match its (zero) images.
    pub fn push(&mut self, ids: &[u32], task: Task, images: Vec<ImageInput>) -> Result<()> {
        self.push_chunked(ids, task, images, &[])
    }

    /// [`PackedBatch::push`] with extra pooling spans: `[start, end)` positions in this sequence
    /// (e.g. the chunks of late chunking), each pooled like the main span into
    /// [`BatchOutput::chunk_single`]. Each must be non-empty and inside the sequence; they may
    /// overlap and come in any order.
    pub fn push_chunked(
        &mut self,
        ids: &[u32],
        task: Task,
        images: Vec<ImageInput>,
        chunks: &[(usize, usize)],
    ) -> Result<()> {
        if let Some(&(s, e)) = chunks.iter().find(|&&(s, e)| s >= e || e > ids.len()) {
            return Err(Error::Input(format!(
                "pooling span [{s}, {e}) is empty or outside the sequence of {} tokens",
                ids.len()
            )));
        }
        if ids.is_empty() {
            return Err(Error::Input("a sequence with no tokens".into()));
        }
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= self.vocab_size) {
            return Err(Error::Input(format!(
                "token id {bad} is outside the vocabulary ({})",
                self.vocab_size
            )));
        }
        let start = self.ids.len();
        if start + ids.len() > i32::MAX as usize {
            return Err(Error::Input(format!("a packed batch of more than {} tokens", i32::MAX)));
        }
        // The pad tokens belong to image blocks only: in a text the reference counts them as
        // image (or video) slots it has no pixels for and mis-embeds the text, so such a text fails
        // alone with its own error. `<|vision_start|>` / `<|vision_end|>` alone are harmless in a
        // text (plain positions, pooled over all tokens) and are embedded as the reference does.
        if images.is_empty() {
            let vision = [
                (Some(self.image_token_id), "<|image_pad|>"),
                (self.video_ids[0], "<|video_pad|>"),
                (self.video_ids[1], "<|vision_pad|>"),
            ];
            if let Some((Some(id), name)) =
                vision.iter().find(|(id, _)| id.is_some_and(|id| ids.contains(&id)))
            {
                return Err(Error::Input(format!(
                    "a text holds the vision token {id} (`{name}`), which only an image's block may \
                     (the reference would mis-embed it)"
                )));
            }
        }
        if let Some(id) = self.video_ids.iter().flatten().find(|id| ids.contains(id)) {
            return Err(Error::Input(format!("video input (token {id}) is not supported")));
        }
        let grids: Vec<GridThw> = images.iter().map(|i| i.grid).collect();
        let pos = plan::mrope_positions(ids, self.image_token_id, &grids, self.merge)?;
        let (a, b) = plan::pooling_span(ids, self.vision_start, self.vision_end, !images.is_empty())?;
        for im in &images {
            let p = im.grid.patches();
            if im.pixel_values.is_empty() || im.pixel_values.len() % p != 0 {
                return Err(Error::Input(format!(
                    "{} pixel values for a {} grid",
                    im.pixel_values.len(),
                    im.grid
                )));
            }
        }
        let row = |i: &ImageInput| i.pixel_values.len() / i.grid.patches();
        if let Some(first) = self.images.first().or(images.first()) {
            if let Some(bad) = images.iter().find(|i| row(i) != row(first)) {
                return Err(Error::Input(format!(
                    "patch rows of {} values, the batch's images have {}",
                    row(bad),
                    row(first)
                )));
            }
        }

        self.ids.extend_from_slice(ids);
        self.cu_seqlens.push(self.ids.len() as i32);
        self.positions.t.extend(pos.t);
        self.positions.h.extend(pos.h);
        self.positions.w.extend(pos.w);
        self.tasks.push(task);
        self.row_task.extend(std::iter::repeat_n(task.index() as u8, ids.len()));
        self.spans.push([(start + a) as u32, (start + b) as u32]);
        self.chunk_spans.extend(chunks.iter().map(|&(s, e)| [(start + s) as u32, (start + e) as u32]));
        self.cu_chunks.push(self.chunk_spans.len());
        let image_id = self.image_token_id;
        self.image_rows
            .extend(ids.iter().enumerate().filter(|&(_, &x)| x == image_id).map(|(i, _)| (start + i) as u32));
        self.images.extend(images);
        Ok(())
    }

    /// Token ids of all sequences, concatenated.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// Sequence boundaries `[0, len0, len0 + len1, …]`.
    pub fn cu_seqlens(&self) -> &[i32] {
        &self.cu_seqlens
    }

    /// The M-RoPE positions of every token (docs/MODEL.md §7.3).
    pub fn positions(&self) -> &MropePositions {
        &self.positions
    }

    /// Each sequence's task.
    pub fn tasks(&self) -> &[Task] {
        &self.tasks
    }

    /// Each token's task index ([`Task::index`]).
    pub fn row_task(&self) -> &[u8] {
        &self.row_task
    }

    /// Per sequence, the `[start, end)` packed rows its single vector pools.
    pub fn spans(&self) -> &[[u32; 2]] {
        &self.spans
    }

    /// The extra pooling spans of all sequences (absolute packed rows), in sequence order: the
    /// rows of [`BatchOutput::chunk_single`].
    pub fn chunk_spans(&self) -> &[[u32; 2]] {
        &self.chunk_spans
    }

    /// The indices into [`PackedBatch::chunk_spans`] of sequence `k`'s extra spans.
    pub fn chunks(&self, k: usize) -> std::ops::Range<usize> {
        self.cu_chunks[k]..self.cu_chunks[k + 1]
    }

    /// The main spans, then the extra ones: every span a forward pools, in output order.
    pub fn all_spans(&self) -> impl Iterator<Item = &[u32; 2]> {
        self.spans.iter().chain(&self.chunk_spans)
    }

    /// The images of all sequences, in the order of their blocks.
    pub fn images(&self) -> &[ImageInput] {
        &self.images
    }

    /// The grids of [`PackedBatch::images`].
    pub fn grids(&self) -> Vec<GridThw> {
        self.images.iter().map(|i| i.grid).collect()
    }

    /// Packed rows of the `<|image_pad|>` tokens, in order: the rows the vision tower's merged
    /// outputs replace (docs/MODEL.md §4.3).
    pub fn image_rows(&self) -> &[u32] {
        &self.image_rows
    }

    /// Number of tokens.
    pub fn tokens(&self) -> usize {
        self.ids.len()
    }

    /// Number of sequences.
    pub fn sequences(&self) -> usize {
        self.tasks.len()
    }

    /// Number of image patches.
    pub fn patches(&self) -> usize {
        self.images.iter().map(|i| i.grid.patches()).sum()
    }

    /// The longest sequence.
    pub fn max_seqlen(&self) -> usize {
        self.cu_seqlens.windows(2).map(|w| (w[1] - w[0]) as usize).max().unwrap_or(0)
    }

    /// The `[start, end)` packed rows of sequence `k`.
    pub fn rows(&self, k: usize) -> std::ops::Range<usize> {
        self.cu_seqlens[k] as usize..self.cu_seqlens[k + 1] as usize
    }
}

/// What one forward returns, on the host.
#[derive(Clone, Debug, PartialEq)]
pub struct BatchOutput {
    /// `[sequences, hidden]` L2-normalised single vectors at full width (f32).
    pub single: Vec<f32>,
    /// `[tokens, proj_dim]` L2-normalised multi-vector rows (f32), when the batch asked for them.
    pub multi: Option<Vec<f32>>,
    /// `[chunk spans, hidden]` L2-normalised means of the extra pooling spans
    /// ([`PackedBatch::chunk_spans`], in that order), at full width (f32).
    pub chunk_single: Vec<f32>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::synth::{config_json, Preset};

    fn cfg() -> ModelConfig {
        let text = config_json(Preset::Tiny).to_string();
        ModelConfig::from_json_str(&text, std::path::Path::new("config.json")).unwrap()
    }

    #[test]
    fn push_packs_and_a_bad_sequence_leaves_the_batch_unchanged() {
        let c = cfg();
        let mut b = PackedBatch::new(&c);
        b.push_text(&[1, 2, 3], Task::Code).unwrap();
        let before = (b.ids().to_vec(), b.cu_seqlens().to_vec(), b.spans().to_vec(), b.row_task().to_vec());
        let vocab = c.text.vocab_size as u32;
        for (ids, what) in [
            (vec![], "no tokens"),
            (vec![5, vocab], "outside the vocabulary"),
            (vec![7, c.special.image_token_id, 8], "<|image_pad|>"),
        ] {
            let e = b.push_text(&ids, Task::Retrieval).unwrap_err().to_string();
            assert!(e.contains(what), "{e}");
            let now = (b.ids().to_vec(), b.cu_seqlens().to_vec(), b.spans().to_vec(), b.row_task().to_vec());
            assert_eq!(now, before, "a refused sequence changed the batch");
        }
        b.push_text(&[4, 5], Task::TextMatching).unwrap();
        assert_eq!(b.cu_seqlens(), &[0, 3, 5]);
        assert_eq!(b.spans(), &[[0, 3], [3, 5]]);
        assert_eq!(b.row_task(), &[2, 2, 2, 1, 1]);
        assert_eq!(b.positions().t, vec![0, 1, 2, 0, 1]);
        assert_eq!((b.sequences(), b.tokens(), b.max_seqlen()), (2, 5, 3));
        assert!(b.chunk_spans().is_empty());
    }

    #[test]
    fn extra_spans_are_absolute_and_bad_ones_refused() {
        let c = cfg();
        let mut b = PackedBatch::new(&c);
        b.push_chunked(&[1, 2, 3], Task::Code, Vec::new(), &[(0, 2), (1, 3)]).unwrap();
        for bad in [[(0, 0)], [(2, 1)], [(1, 4)]] {
            let e = b.push_chunked(&[4, 5, 6], Task::Code, Vec::new(), &bad).unwrap_err().to_string();
            assert!(e.contains("outside the sequence"), "{e}");
        }
        assert_eq!(b.sequences(), 1);
        b.push_text(&[7], Task::Code).unwrap();
        b.push_chunked(&[4, 5, 6, 7], Task::Retrieval, Vec::new(), &[(3, 4)]).unwrap();
        assert_eq!(b.chunk_spans(), &[[0, 2], [1, 3], [7, 8]]);
        assert_eq!((b.chunks(0), b.chunks(1), b.chunks(2)), (0..2, 2..2, 2..3));
        let all: Vec<[u32; 2]> = b.all_spans().copied().collect();
        assert_eq!(all, vec![[0, 3], [3, 4], [4, 8], [0, 2], [1, 3], [7, 8]]);
    }
}
