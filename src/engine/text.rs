//! The text front end: prompt prefixes, tokenisation and truncation (docs/MODEL.md §2, §3.1).
//!
//! The reference feeds `"Query: " + text` or `"Passage: " + text` to the Qwen2 tokenizer with
//! `add_special_tokens=True`, which adds no BOS/EOS for this tokenizer, then keeps the first
//! `max_length` tokens of that prefixed string. Everything here reproduces exactly that, so the
//! ids are the ones the HF reference would embed.

use crate::engine::request::Chunking;
use crate::model::task::Task;
use crate::{Error, Result};
use std::fmt;
use std::ops::Range;
use std::path::Path;
use std::str::FromStr;

/// The model's context limit, and the reference's default `max_length` for `encode_text`.
/// Longer requests are clamped to it (docs/MODEL.md §2: `min(user_max_length, 32768)`), because positions
/// past it are outside the trained RoPE range (docs/MODEL.md §11).
pub const DEFAULT_MAX_LENGTH: usize = 32768;

/// Which side of an asymmetric search a text is on (the reference's `prompt_name`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PromptName {
    /// A search query (the reference's default).
    #[default]
    Query,
    /// A document to be searched.
    Passage,
}

impl PromptName {
    /// Both prompt names.
    pub const ALL: [PromptName; 2] = [PromptName::Query, PromptName::Passage];

    /// The name the reference and the command line use.
    pub fn name(self) -> &'static str {
        match self {
            PromptName::Query => "query",
            PromptName::Passage => "passage",
        }
    }
}

impl fmt::Display for PromptName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for PromptName {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        PromptName::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| Error::Input(format!("unknown prompt name {s:?}: expected one of query, passage")))
    }
}

/// The string put in front of a text (docs/MODEL.md §3.1). Text-matching is symmetric, so both sides get
/// the query prefix: that is what the reference does, whatever `prompt_name` says.
pub fn prompt_prefix(task: Task, prompt: PromptName) -> &'static str {
    match (task, prompt) {
        (Task::TextMatching, _) | (_, PromptName::Query) => "Query: ",
        (_, PromptName::Passage) => "Passage: ",
    }
}

/// How to fit a text into the context.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Truncation {
    /// Keep at most this many tokens, prefix included. Must be at least 1; values above
    /// [`DEFAULT_MAX_LENGTH`] are clamped to it, as the reference does.
    pub max_length: usize,
    /// Reject an over-long text with [`Error::Input`] instead of cutting it, for callers who
    /// would rather know than embed a silently shortened text.
    pub strict: bool,
}

impl Default for Truncation {
    /// The reference's behaviour: cut at 32768 tokens.
    fn default() -> Self {
        Truncation { max_length: DEFAULT_MAX_LENGTH, strict: false }
    }
}

impl Truncation {
    /// Cut at `max_length` tokens (not strict).
    pub fn new(max_length: usize) -> Self {
        Truncation { max_length, strict: false }
    }

    /// The limit actually applied, or an error for a limit that can hold nothing.
    pub(crate) fn limit(self) -> Result<usize> {
        if self.max_length == 0 {
            return Err(Error::Input(
                "max_length must be at least 1 (it counts the prompt prefix too)".into(),
            ));
        }
        Ok(self.max_length.min(DEFAULT_MAX_LENGTH))
    }
}

/// The token ids of one prompted text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EncodedText {
    /// The ids to embed: prefix first, at most the truncation limit.
    pub ids: Vec<u32>,
    /// How many tokens truncation removed from the end (0 if the text fit).
    pub dropped: usize,
}

/// A prompted text's ids with, per token, the byte range of the text it covers (for late
/// chunking). Nothing is truncated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OffsetText {
    /// All ids of `prefix + text`.
    pub ids: Vec<u32>,
    /// Per token, its `[start, end)` bytes in the text (the prefix cut off: a token of the prefix
    /// alone is `(0, 0)`; one that straddles the prefix and the text starts at 0).
    pub offsets: Vec<(usize, usize)>,
    /// The first token holding a byte of the text (`ids.len()` for an empty text): the tokens
    /// before it are the prompt prefix, which belongs to no chunk.
    pub first_text_token: usize,
}

/// One late chunk, planned: its token positions in the embedded sequence (prefix included) and
/// its byte range in the text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkSpan {
    /// `[start, end)` token positions.
    pub tokens: Range<usize>,
    /// `[start, end)` bytes of the text, on character boundaries.
    pub chars: Range<usize>,
}

/// The chunks of `chunking` over a text tokenized as `enc` (docs/MODEL.md §11).
///
/// - [`Chunking::Tokens`]`(n)`: the text's tokens (the prefix excluded) in consecutive runs of
///   `n` (the last one shorter); each chunk's bytes are the smallest range covering its tokens'.
///   A byte-level token may hold part of a character, so two neighbouring chunks can share the
///   character at their boundary in `chars` (never a token).
/// - [`Chunking::Spans`]: each byte range must be non-empty, inside the text, on character
///   boundaries, and start at or after the previous one's end. A chunk's tokens are every token
///   that covers at least one byte of its range, so a token straddling two neighbouring spans
///   belongs to both. `chars` is the span as given. (Token offsets are in text order, as a
///   tokenizer gives them.)
///
/// An empty text has no chunks. Anything else wrong is an [`Error::Input`] naming it.
pub fn plan_chunks(enc: &OffsetText, text: &str, chunking: &Chunking) -> Result<Vec<ChunkSpan>> {
    let first = enc.first_text_token;
    let n = enc.ids.len();
    let cover = |tokens: Range<usize>| {
        let s = enc.offsets[tokens.clone()].iter().map(|o| o.0).min().unwrap_or(0);
        let e = enc.offsets[tokens.clone()].iter().map(|o| o.1).max().unwrap_or(0);
        // Offsets are character-aligned already; widen to boundaries should a tokenizer not be.
        let (mut s, mut e) = (s.min(text.len()), e.min(text.len()));
        while !text.is_char_boundary(s) {
            s -= 1;
        }
        while !text.is_char_boundary(e) {
            e += 1;
        }
        ChunkSpan { tokens, chars: s..e }
    };
    match chunking {
        Chunking::Tokens(0) => Err(Error::Input("late chunking: chunk_size must be at least 1 token".into())),
        Chunking::Tokens(size) => {
            // Saturating: a chunk size near usize::MAX (any caller's number) means one chunk.
            Ok((first..n).step_by(*size).map(|a| cover(a..a.saturating_add(*size).min(n))).collect())
        }
        Chunking::Spans(spans) => {
            let mut prev_end = 0;
            let mut from = first;
            let mut out = Vec::with_capacity(spans.len());
            for (i, &(s, e)) in spans.iter().enumerate() {
                let bad =
                    |why: String| Err(Error::Input(format!("late chunking: span {i} [{s}, {e}): {why}")));
                if s >= e {
                    return bad("empty (start must be below end)".into());
                }
                if e > text.len() {
                    return bad(format!("outside the text of {} bytes", text.len()));
                }
                if !text.is_char_boundary(s) || !text.is_char_boundary(e) {
                    return bad("not on UTF-8 character boundaries".into());
                }
                if s < prev_end {
                    return bad(format!(
                        "overlaps or comes before the previous span (which ends at {prev_end})"
                    ));
                }
                prev_end = e;
                // Token offsets are in text order, and so are the spans: one sweep. Skip the
                // tokens that end before the span, take those that start before its end.
                while from < n && enc.offsets[from].1 <= s {
                    from += 1;
                }
                let mut to = from;
                while to < n && enc.offsets[to].0 < e {
                    to += 1;
                }
                if to == from {
                    return bad("no token covers it".into());
                }
                out.push(ChunkSpan { tokens: from..to, chars: s..e });
            }
            Ok(out)
        }
    }
}

/// Overlap of long late chunking's macro-chunks by default, in tokens: the left context each
/// macro-chunk after the first repeats from the one before (the late chunking paper's reference
/// code uses 256 to 512; at 32768 tokens per forward, 512 costs about 1.6% more tokens).
pub const DEFAULT_LATE_CHUNK_OVERLAP: usize = 512;

/// One forward of long late chunking (a text longer than one forward, docs/MODEL.md §11): the
/// prompt prefix (token positions `0..prefix`) followed by the text tokens `body` of the whole
/// prompted sequence. Its states are used for the tokens `owned` (the first macro-chunk owns the
/// prefix too) and for the chunks with indices `chunks`, each pooled entirely inside it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MacroChunk {
    /// `[start, end)` positions in the whole prompted sequence of the text tokens it runs.
    pub body: Range<usize>,
    /// `[start, end)` positions whose states (multi-vector rows) it provides; the owned ranges of
    /// consecutive macro-chunks tile `0..n`.
    pub owned: Range<usize>,
    /// Indices of the chunks it pools.
    pub chunks: Range<usize>,
}

impl MacroChunk {
    /// The position in this macro-chunk's own sequence (prefix first) of position `t` of the
    /// whole sequence (`t` in the prefix or in `body`).
    pub fn local(&self, prefix: usize, t: usize) -> usize {
        if t < prefix {
            t
        } else {
            prefix + t - self.body.start
        }
    }
}

/// Long late chunking: the macro-chunks covering a prompted sequence of `n` tokens (prefix of
/// `prefix` tokens, then the text) with `chunks` (from [`plan_chunks`]), each macro-chunk at most
/// `limit` tokens with its prefix.
///
/// The late chunking paper's long late chunking cuts the token sequence into macro-chunks of the
/// model's length that overlap by ω tokens, embeds each, drops every macro-chunk's first ω token
/// states but the first's (their left context is shorter than in the macro-chunk before) and
/// pools each chunk over the concatenation. This plan keeps that, with two differences:
///
/// - Every macro-chunk starts with the prompt prefix (the model never saw a sequence without it:
///   a macro-chunk from the middle of the text still reads as a passage or a query), so its text
///   part is `limit - prefix` tokens long.
/// - A boundary between owned ranges never falls inside a chunk: where the paper's boundary would
///   cut one, it moves back to that chunk's start, and the next macro-chunk starts ω tokens before
///   it. So each chunk is pooled from one forward (one mean over one sequence's states, the same
///   kernel as ever), every chunk still has at least ω tokens of left context (or all of the text
///   before it), and with boundaries that fall between chunks the plan is the paper's.
///
/// ω is `overlap`, at most half of a macro-chunk's text part. A chunk longer than that text part
/// cannot be pooled from one forward: an [`Error::Input`] naming it. One that fits only with less
/// context gets the shorter overlap. The plan is a function of its arguments alone.
pub fn plan_macro_chunks(
    n: usize,
    prefix: usize,
    chunks: &[ChunkSpan],
    limit: usize,
    overlap: usize,
) -> Result<Vec<MacroChunk>> {
    if limit <= prefix {
        return Err(Error::Input(format!(
            "late chunking: max_length {limit} leaves no room for text after the {prefix}-token prompt"
        )));
    }
    let cap = limit - prefix;
    let overlap = overlap.min(cap / 2);
    // `cut[x]`: whether an owned range may end at position x (no chunk has tokens both before and
    // at or after it).
    let mut cut = vec![true; n + 1];
    for c in chunks {
        if c.tokens.end > c.tokens.start + 1 {
            cut[c.tokens.start + 1..c.tokens.end].fill(false);
        }
    }
    let mut out: Vec<MacroChunk> = Vec::new();
    let (mut from, mut start, mut next_chunk) = (prefix.min(n), prefix.min(n), 0);
    loop {
        let end = if start + cap >= n {
            n
        } else if let Some(x) = (from + 1..=start + cap).rev().find(|&x| cut[x]) {
            x
        } else {
            // A chunk reaches past this macro-chunk: run the next one later (less overlap), so
            // that it ends where that chunk does.
            let x = (start + cap + 1..=n).find(|&x| cut[x]).unwrap_or(n);
            if x - from > cap {
                // (Spans sharing a boundary token cannot be parted either.)
                return Err(Error::Input(format!(
                    "late chunking: chunk {next_chunk} and those sharing tokens with it cover tokens \
                     {from}..{x} ({} tokens), over the {cap} text tokens one forward holds after the \
                     prompt (max_length {limit}); use smaller chunks",
                    x - from
                )));
            }
            start = x - cap;
            x
        };
        let first = next_chunk;
        while next_chunk < chunks.len() && chunks[next_chunk].tokens.end <= end {
            next_chunk += 1;
        }
        let owned = if out.is_empty() { 0..end } else { from..end };
        out.push(MacroChunk { body: start..end, owned, chunks: first..next_chunk });
        if end >= n {
            return Ok(out);
        }
        from = end;
        start = end.saturating_sub(overlap).max(prefix);
    }
}

/// The Qwen2 byte-level BPE tokenizer of the model, loaded once and shared (it is `Send + Sync`;
/// encoding takes `&self`).
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
}

impl fmt::Debug for TextTokenizer {
    // The derived form would print the whole vocabulary.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TextTokenizer").field("vocab_size", &self.inner.get_vocab_size(true)).finish()
    }
}

impl TextTokenizer {
    /// Loads a `tokenizer.json`. A missing or unreadable file is [`Error::Io`]; a file that is not
    /// a valid tokenizer is [`Error::Tokenizer`]; both name the path.
    ///
    /// Any truncation or padding stored in the file is switched off: this type applies the
    /// reference's truncation itself, and the engine runs unpadded.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let mut inner = tokenizers::Tokenizer::from_bytes(&bytes)
            .map_err(|e| Error::Tokenizer(format!("{}: not a valid tokenizer.json: {e}", path.display())))?;
        inner.with_truncation(None).map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        inner.with_padding(None);
        Ok(TextTokenizer { inner })
    }

    /// Loads `dir/tokenizer.json`, the layout of a model download.
    pub fn from_model_dir(dir: impl AsRef<Path>) -> Result<Self> {
        Self::from_file(dir.as_ref().join("tokenizer.json"))
    }

    /// The id of a token string, e.g. `"<|image_pad|>"` → 151655; `None` if not in the vocabulary.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The ids of `text` as is: no prefix, no truncation. For fixed templates such as the image
    /// prompt (docs/MODEL.md §4.2), where special-token strings must become single special tokens.
    pub fn encode_raw(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.encode_full(text)?.get_ids().to_vec())
    }

    /// The ids of `prompt_prefix(task, prompt) + text`, truncated on the right.
    ///
    /// The prefix and the text are tokenised as one string, as the reference does: the space of
    /// `"Query: "` merges into the text's first word (`" What"` is one token), so prefix ids
    /// followed by text ids would be wrong. Truncation keeps the first tokens of the prefixed
    /// string, so the prefix always survives (for any `max_length` ≥ its 3–4 tokens).
    ///
    /// An empty text is valid and gives exactly the prefix's ids: the reference embeds
    /// `"Query: "` for `""` rather than rejecting it, and so do we.
    ///
    /// Special-token strings inside `text` (e.g. `"<|im_end|>"`) become their special ids, not
    /// plain characters. That is what the HF tokenizer does, so the ids match the reference;
    /// callers who embed untrusted text and want otherwise must escape it first.
    ///
    /// Cost: the whole text is tokenised, since `dropped` needs the full count. Measured in
    /// release on one core: 1 MB of prose ≈ 0.4 s, the worst case found (1 MB of digits, one
    /// token per byte) ≈ 1 s.
    pub fn encode_prompted(
        &self,
        task: Task,
        prompt: PromptName,
        text: &str,
        trunc: Truncation,
    ) -> Result<EncodedText> {
        let limit = trunc.limit()?;
        let prefixed = prefixed(task, prompt, text);
        let enc = self.encode_full(&prefixed)?;
        cut(enc.get_ids(), limit, trunc.strict, task, prompt)
    }

    /// [`encode_prompted`](Self::encode_prompted) for many texts, in parallel where the tokenizer
    /// can. One result per item, in input order; a bad item (e.g. over-long in strict mode) fails
    /// alone.
    pub fn encode_batch_prompted(
        &self,
        items: &[(Task, PromptName, &str)],
        trunc: Truncation,
    ) -> Vec<Result<EncodedText>> {
        let one_by_one = || items.iter().map(|&(t, p, s)| self.encode_prompted(t, p, s, trunc)).collect();
        // A bad limit: every item gets its own copy of the error, without encoding anything.
        let Ok(limit) = trunc.limit() else {
            return one_by_one();
        };
        let strings: Vec<String> = items.iter().map(|&(t, p, s)| prefixed(t, p, s)).collect();
        let inputs: Vec<&str> = strings.iter().map(String::as_str).collect();
        match self.inner.encode_batch_fast(inputs, true) {
            // The common case: one parallel pass, then truncation item by item.
            Ok(encs) => items
                .iter()
                .zip(&encs)
                .map(|(&(t, p, _), enc)| cut(enc.get_ids(), limit, trunc.strict, t, p))
                .collect(),
            // The tokenizer's batch call fails as a whole; redo item by item so that only the
            // bad ones fail.
            Err(_) => one_by_one(),
        }
    }

    /// The ids of `prompt_prefix(task, prompt) + text` (not truncated), each with the bytes of
    /// `text` it covers: what late chunking maps spans with. Slower than
    /// [`encode_prompted`](Self::encode_prompted) (offsets are tracked).
    pub fn encode_with_offsets(&self, task: Task, prompt: PromptName, text: &str) -> Result<OffsetText> {
        let p = prompt_prefix(task, prompt).len();
        let enc = self
            .inner
            .encode(prefixed(task, prompt, text), true)
            .map_err(|e| Error::Tokenizer(format!("encoding failed: {e}")))?;
        let offsets: Vec<(usize, usize)> = enc
            .get_offsets()
            .iter()
            .map(|&(s, e)| (s.saturating_sub(p).min(text.len()), e.saturating_sub(p).min(text.len())))
            .collect();
        let first_text_token = enc.get_offsets().iter().position(|&(_, e)| e > p).unwrap_or(offsets.len());
        Ok(OffsetText { ids: enc.get_ids().to_vec(), offsets, first_text_token })
    }

    /// The full encoding with the tokenizer's own special-token handling (`add_special_tokens`
    /// true, like the reference; for this tokenizer it adds nothing). Offsets are not needed, so
    /// the fast path that skips them is used.
    fn encode_full(&self, text: &str) -> Result<tokenizers::Encoding> {
        self.inner.encode_fast(text, true).map_err(|e| Error::Tokenizer(format!("encoding failed: {e}")))
    }
}

fn prefixed(task: Task, prompt: PromptName, text: &str) -> String {
    let prefix = prompt_prefix(task, prompt);
    let mut s = String::with_capacity(prefix.len() + text.len());
    s.push_str(prefix);
    s.push_str(text);
    s
}

/// Keeps the first `limit` ids, or rejects the text in strict mode.
fn cut(ids: &[u32], limit: usize, strict: bool, task: Task, prompt: PromptName) -> Result<EncodedText> {
    if ids.len() <= limit {
        return Ok(EncodedText { ids: ids.to_vec(), dropped: 0 });
    }
    if strict {
        return Err(Error::Input(format!(
            "text is {} tokens long (with the {:?} prefix of task {task}, prompt {prompt}), \
             over the limit of {limit} tokens (strict truncation)",
            ids.len(),
            prompt_prefix(task, prompt),
        )));
    }
    Ok(EncodedText { ids: ids[..limit].to_vec(), dropped: ids.len() - limit })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spans(v: &[(usize, usize)]) -> Vec<ChunkSpan> {
        v.iter().map(|&(a, b)| ChunkSpan { tokens: a..b, chars: 0..0 }).collect()
    }

    /// Checks what every plan must satisfy, and returns its (body, owned, chunks) triples.
    fn checked(n: usize, p: usize, c: &[ChunkSpan], limit: usize, w: usize) -> Vec<MacroChunk> {
        let plan = plan_macro_chunks(n, p, c, limit, w).unwrap();
        let w = w.min((limit - p) / 2);
        assert_eq!(plan[0].owned.start, 0);
        assert_eq!(plan.last().unwrap().owned.end, n);
        for (k, m) in plan.iter().enumerate() {
            assert!(p + m.body.len() <= limit, "macro {k} {m:?} over the limit");
            assert!(m.body.start >= p && m.body.start <= m.owned.start.max(p) && m.owned.end == m.body.end);
            if k > 0 {
                assert_eq!(m.owned.start, plan[k - 1].owned.end);
                assert_eq!(m.chunks.start, plan[k - 1].chunks.end);
                assert!(m.owned.start > plan[k - 1].owned.start);
            }
            for i in m.chunks.clone() {
                let t = &c[i].tokens;
                assert!(m.owned.start <= t.start && t.end <= m.owned.end, "chunk {i} outside macro {k}");
                // At least w tokens of left context inside the macro (or the text from its start).
                assert!(t.start - m.body.start >= w.min(t.start - p) || t.len() + w > limit - p);
            }
        }
        assert_eq!(plan.last().unwrap().chunks.end, c.len());
        plan
    }

    #[test]
    fn macro_chunks_are_the_papers_when_boundaries_fall_between_chunks() {
        // Chunks of one token: every position is a boundary. Macro bodies of 10 after a 2-token
        // prompt, overlap 3: bodies [2, 12), [9, 19), [16, 26), [23, 30).
        let c: Vec<ChunkSpan> = spans(&(2..30).map(|t| (t, t + 1)).collect::<Vec<_>>());
        let plan = checked(30, 2, &c, 12, 3);
        let bodies: Vec<_> = plan.iter().map(|m| (m.body.clone(), m.owned.clone())).collect();
        assert_eq!(bodies, vec![(2..12, 0..12), (9..19, 12..19), (16..26, 19..26), (23..30, 26..30)]);
        // No chunks at all (the multi rows still need every token), and a text that fits.
        assert_eq!(checked(30, 2, &[], 12, 3).len(), 4);
        assert_eq!(checked(12, 2, &c[..10], 12, 3).len(), 1);
    }

    #[test]
    fn a_boundary_moves_back_to_the_start_of_the_chunk_it_would_cut() {
        // Chunks of 4 from position 2: [2,6) [6,10) [10,14) ...; body 10, overlap 3.
        let c: Vec<ChunkSpan> = spans(&(0..7).map(|i| (2 + 4 * i, 6 + 4 * i)).collect::<Vec<_>>());
        let plan = checked(30, 2, &c, 12, 3);
        // Macro 0 (body up to [2, 12)) holds [2,6) [6,10); [10,14) would be cut at 12, so macro 0
        // ends at 10 and macro 1 starts 3 before that, at 7. Its body could reach 17, which would cut
        // [14,18): it ends at 14. And so on, one chunk per macro-chunk.
        let got: Vec<_> = plan.iter().map(|m| (m.body.clone(), m.owned.clone(), m.chunks.clone())).collect();
        assert_eq!(
            got,
            vec![
                (2..10, 0..10, 0..2),
                (7..14, 10..14, 2..3),
                (11..18, 14..18, 3..4),
                (15..22, 18..22, 4..5),
                (19..26, 22..26, 5..6),
                (23..30, 26..30, 6..7)
            ]
        );
    }

    #[test]
    fn a_long_chunk_gets_less_overlap_or_an_error() {
        // Body 10, overlap 4: a chunk of 9 tokens after one of 3 fits only with overlap 1.
        let c = spans(&[(2, 5), (5, 14), (14, 16)]);
        let plan = checked(16, 2, &c, 12, 4);
        assert_eq!(plan[1].body, 4..14);
        assert_eq!(plan[1].chunks, 1..2);
        // A chunk of 11 tokens fits no forward of 10.
        let e = plan_macro_chunks(20, 2, &spans(&[(2, 4), (4, 15), (15, 20)]), 12, 4).unwrap_err();
        assert!(e.to_string().contains("tokens 4..15 (11 tokens), over the 10 text tokens"), "{e}");
        // Neighbouring spans sharing a token cannot be parted: together they must fit.
        let shared = spans(&[(2, 8), (7, 13), (12, 16)]);
        assert!(plan_macro_chunks(16, 2, &shared, 12, 2).is_err());
        checked(16, 2, &shared[..2], 14, 2);
        let e = plan_macro_chunks(20, 5, &[], 5, 0).unwrap_err();
        assert!(e.to_string().contains("no room"), "{e}");
    }

    #[test]
    fn prefix_for_every_task_and_prompt() {
        for task in Task::ALL {
            for prompt in PromptName::ALL {
                let want = match (task, prompt) {
                    (Task::TextMatching, _) => "Query: ",
                    (Task::Retrieval | Task::Code, PromptName::Query) => "Query: ",
                    (Task::Retrieval | Task::Code, PromptName::Passage) => "Passage: ",
                };
                assert_eq!(prompt_prefix(task, prompt), want, "{task} × {prompt}");
            }
        }
    }

    #[test]
    fn prompt_names_round_trip_and_unknown_is_an_error() {
        for p in PromptName::ALL {
            assert_eq!(p.name().parse::<PromptName>().unwrap(), p);
        }
        assert_eq!(PromptName::default(), PromptName::Query);
        let err = "document".parse::<PromptName>().unwrap_err();
        assert!(matches!(err, Error::Input(_)), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("document") && msg.contains("query") && msg.contains("passage"), "{msg}");
    }

    #[test]
    fn limit_is_clamped_and_zero_rejected() {
        assert_eq!(Truncation::new(16).limit().unwrap(), 16);
        assert_eq!(Truncation::new(1 << 20).limit().unwrap(), DEFAULT_MAX_LENGTH);
        assert!(matches!(Truncation::new(0).limit(), Err(Error::Input(_))));
    }

    fn enc(offsets: &[(usize, usize)], first: usize) -> OffsetText {
        OffsetText { ids: vec![0; offsets.len()], offsets: offsets.to_vec(), first_text_token: first }
    }

    #[test]
    fn chunks_by_tokens_skip_the_prefix() {
        // "ab cd é": prefix tokens 0, 1; text tokens "ab" (straddling: starts in the prefix),
        // " cd", and "é" split into two byte-level tokens sharing the character's bytes.
        let text = "ab cd é";
        let e = enc(&[(0, 0), (0, 0), (0, 2), (2, 5), (5, 6), (6, 8), (6, 8)], 2);
        let got = plan_chunks(&e, text, &Chunking::Tokens(2)).unwrap();
        let want = [(2..4, 0..5), (4..6, 5..8), (6..7, 6..8)];
        let got: Vec<_> = got.into_iter().map(|c| (c.tokens, c.chars)).collect();
        assert_eq!(got, want);
        let one = plan_chunks(&e, text, &Chunking::Tokens(100)).unwrap();
        assert_eq!((one[0].tokens.clone(), one[0].chars.clone()), (2..7, 0..8));
        // The largest size is one chunk too (a + size used to wrap around: found by fuzz_c_abi).
        let max = plan_chunks(&e, text, &Chunking::Tokens(usize::MAX)).unwrap();
        assert_eq!(max, one);
        assert!(plan_chunks(&enc(&[(0, 0)], 1), "", &Chunking::Tokens(3)).unwrap().is_empty());
        let zero = plan_chunks(&e, text, &Chunking::Tokens(0)).unwrap_err();
        assert!(matches!(zero, Error::Input(_)) && zero.to_string().contains("chunk_size"), "{zero}");
    }

    #[test]
    fn chunks_by_spans_take_every_covering_token_and_refuse_bad_spans() {
        let text = "ab cd é";
        let e = enc(&[(0, 0), (0, 0), (0, 2), (2, 5), (5, 6), (6, 8), (6, 8)], 2);
        let got = plan_chunks(&e, text, &Chunking::Spans(vec![(0, 1), (1, 4), (6, 8)])).unwrap();
        let got: Vec<_> = got.into_iter().map(|c| (c.tokens, c.chars)).collect();
        assert_eq!(got, [(2..3, 0..1), (2..4, 1..4), (5..7, 6..8)]);
        for (spans, what) in [
            (vec![(2, 2)], "empty"),
            (vec![(3, 2)], "empty"),
            (vec![(0, 9)], "outside the text"),
            (vec![(0, 7)], "character boundaries"),
            (vec![(0, 3), (2, 4)], "overlaps"),
            (vec![(3, 4), (0, 2)], "overlaps"),
        ] {
            let err = plan_chunks(&e, text, &Chunking::Spans(spans.clone())).unwrap_err();
            assert!(matches!(err, Error::Input(_)), "{spans:?}: {err:?}");
            assert!(err.to_string().contains(what), "{spans:?}: {err}");
        }
    }

    #[test]
    fn cut_keeps_the_front_and_counts_the_rest() {
        let ids: Vec<u32> = (0..10).collect();
        let got = cut(&ids, 4, false, Task::Retrieval, PromptName::Query).unwrap();
        assert_eq!(got, EncodedText { ids: vec![0, 1, 2, 3], dropped: 6 });
        let fit = cut(&ids, 10, true, Task::Retrieval, PromptName::Query).unwrap();
        assert_eq!(fit.dropped, 0);
        let msg = cut(&ids, 4, true, Task::Code, PromptName::Passage).unwrap_err().to_string();
        assert!(msg.contains("10 tokens") && msg.contains("limit of 4"), "{msg}");
    }
}
