//! Host-side planning for the image path: pure, deterministic index arithmetic with no GPU and no I/O.
//!
//! * [`mrope_positions`]: the language model's M-RoPE position triples of one sequence (docs/MODEL.md §7.3).
//! * [`vision_plan`]: what the vision tower needs for a batch of images: the per-patch rotary (row, col),
//!   the window permutation and its inverse, and the segment boundaries of windowed and full attention
//!   (docs/MODEL.md §5.2, §5.3, §5.5).
//! * [`pooling_span`]: the rows that the single-vector head mean-pools (docs/MODEL.md §8.1).
//! * [`image_token_rows`]: the rows of a packed batch that the vision tower's outputs replace (docs/MODEL.md §4.3).
//!
//! Every result is a plain struct of `Vec`s with named fields that derives `Debug`, `Clone`, `PartialEq`
//! and serde's traits, so that it can be compared directly with values dumped from the PyTorch reference.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// One image's patch grid: `t` frames (always 1 for images), `h` and `w` in PATCHES (both multiples of
/// the merge size). The field order and meaning match the reference's `image_grid_thw` rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct GridThw {
    /// Temporal patches (frames); 1 for a still image.
    pub t: usize,
    /// Patch rows.
    pub h: usize,
    /// Patch columns.
    pub w: usize,
}

impl GridThw {
    /// A still image's grid (`t` = 1) of `h` × `w` patches.
    pub fn image(h: usize, w: usize) -> Self {
        GridThw { t: 1, h, w }
    }

    /// Patches of the whole grid: `t·h·w` (the image's rows of `pixel_values`).
    pub fn patches(&self) -> usize {
        self.t * self.h * self.w
    }

    /// Merged tokens (language-model image tokens): `t·(h/merge)·(w/merge)`, which equals
    /// `t·h·w/merge²` for a valid grid.
    pub fn merged_tokens(&self, merge: usize) -> usize {
        self.t * (self.h / merge) * (self.w / merge)
    }

    /// Rows of merged tokens, `H' = h/merge`.
    pub fn merged_h(&self, merge: usize) -> usize {
        self.h / merge
    }

    /// Columns of merged tokens, `W' = w/merge`.
    pub fn merged_w(&self, merge: usize) -> usize {
        self.w / merge
    }

    /// Checks that the grid is non-empty and that `h` and `w` are multiples of `merge` (≥ 1).
    pub fn check(&self, merge: usize) -> Result<()> {
        if merge == 0 {
            return Err(Error::Input("spatial merge size is 0".into()));
        }
        if self.t == 0 || self.h == 0 || self.w == 0 || self.h % merge != 0 || self.w % merge != 0 {
            return Err(Error::Input(format!(
                "image grid {self} is invalid: t, h and w must be positive and h, w multiples of the merge \
                 size {merge}"
            )));
        }
        Ok(())
    }
}

impl std::fmt::Display for GridThw {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}x{}x{} (t x h x w patches)", self.t, self.h, self.w)
    }
}

/// M-RoPE position triples of one sequence, one entry per token in each of the three vectors.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MropePositions {
    /// Temporal component (frequencies 0..16).
    pub t: Vec<i32>,
    /// Height component (frequencies 16..40).
    pub h: Vec<i32>,
    /// Width component (frequencies 40..64).
    pub w: Vec<i32>,
}

impl MropePositions {
    /// Tokens covered.
    pub fn len(&self) -> usize {
        self.t.len()
    }

    /// Whether there are no tokens.
    pub fn is_empty(&self) -> bool {
        self.t.is_empty()
    }

    /// Plain 1-D positions `0..len` on all three components (a text-only sequence).
    pub fn text(len: usize) -> Self {
        let p: Vec<i32> = (0..len).map(|i| i as i32).collect();
        MropePositions { t: p.clone(), h: p.clone(), w: p }
    }

    /// The triple `(t, h, w)` of token `i`.
    pub fn get(&self, i: usize) -> (i32, i32, i32) {
        (self.t[i], self.h[i], self.w[i])
    }

    fn with_capacity(n: usize) -> Self {
        MropePositions { t: Vec::with_capacity(n), h: Vec::with_capacity(n), w: Vec::with_capacity(n) }
    }

    fn push(&mut self, t: i32, h: i32, w: i32) {
        self.t.push(t);
        self.h.push(h);
        self.w.push(w);
    }
}

/// Maximal runs of `token` in `ids`, as (start, length).
fn runs_of(ids: &[u32], token: u32) -> Vec<(usize, usize)> {
    let mut runs = Vec::new();
    let mut i = 0;
    while i < ids.len() {
        if ids[i] == token {
            let start = i;
            while i < ids.len() && ids[i] == token {
                i += 1;
            }
            runs.push((start, i - start));
        } else {
            i += 1;
        }
    }
    runs
}

/// Positions for one sequence of token ids that may contain image blocks (runs of `image_token_id`, one
/// run per image, in order, each run exactly `grid.t·grid.h·grid.w/merge²` long), docs/MODEL.md §7.3.
///
/// A text token gets `(next, next, next)` and advances `next` by one. The k-th token of an image block
/// (row-major over `H' × W'` merged tokens) gets `(base, base + r, base + c)` with `base = next`, and
/// the block advances `next` to `base + max(H', W')`. Positions start at 0 for every sequence.
///
/// Errors ([`Error::Input`]) when the runs do not match the grids (count or length), naming both, and
/// for grids with `t != 1` (videos are out of scope) or sizes not divisible by `merge`.
pub fn mrope_positions(
    ids: &[u32],
    image_token_id: u32,
    grids: &[GridThw],
    merge: usize,
) -> Result<MropePositions> {
    if ids.len() > i32::MAX as usize {
        return Err(Error::Input(format!("sequence of {} tokens is too long for i32 positions", ids.len())));
    }
    for (i, g) in grids.iter().enumerate() {
        g.check(merge).map_err(|e| Error::Input(format!("image {i}: {e}")))?;
        if g.t != 1 {
            return Err(Error::Input(format!(
                "image {i}: grid {g} has t = {}; only still images (t = 1) are supported",
                g.t
            )));
        }
    }
    let runs = runs_of(ids, image_token_id);
    if runs.len() != grids.len() {
        let lens: Vec<usize> = runs.iter().map(|r| r.1).collect();
        let want: Vec<usize> = grids.iter().map(|g| g.merged_tokens(merge)).collect();
        return Err(Error::Input(format!(
            "the sequence has {} run(s) of image token {image_token_id} (lengths {lens:?}) but {} image \
             grid(s) were given (needing {want:?} tokens)",
            runs.len(),
            grids.len()
        )));
    }
    for (i, (&(start, len), g)) in runs.iter().zip(grids).enumerate() {
        let want = g.merged_tokens(merge);
        if len != want {
            return Err(Error::Input(format!(
                "image {i}: the run of image token {image_token_id} at position {start} has {len} tokens \
                 but grid {g} with merge {merge} needs {want}"
            )));
        }
    }

    let mut pos = MropePositions::with_capacity(ids.len());
    let mut next: i32 = 0;
    let mut i = 0;
    let mut runs = runs.iter().zip(grids).peekable();
    while i < ids.len() {
        match runs.peek() {
            Some(&(&(start, len), g)) if start == i => {
                let (hh, ww) = (g.merged_h(merge), g.merged_w(merge));
                let base = next;
                for r in 0..hh {
                    for c in 0..ww {
                        pos.push(base, base + r as i32, base + c as i32);
                    }
                }
                next = base + hh.max(ww) as i32;
                i += len;
                runs.next();
            }
            _ => {
                pos.push(next, next, next);
                next += 1;
                i += 1;
            }
        }
    }
    Ok(pos)
}

/// Everything the vision tower needs for a batch of images (concatenated in order).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VisionPlan {
    /// Per patch, in the order patches arrive (`pixel_values` rows: merge-block order per image):
    /// (row, col) in patches.
    pub rot_pos: Vec<[i32; 2]>,
    /// Merged-token permutation into window order, docs/MODEL.md §5.3 (offset per image): position `i` of the
    /// windowed sequence holds merged token `window_index[i]` of the raster (batch) order.
    pub window_index: Vec<usize>,
    /// Inverse of `window_index`: `out[window_index[i]] = z[i]` ⇔ `reverse_index[m] = i`, so that
    /// `out[m] = z[reverse_index[m]]` (the reference's `argsort(window_index)`).
    pub reverse_index: Vec<usize>,
    /// Cumulative PATCH counts of each non-empty window, starting at 0 (i32 like the reference, equal
    /// to its `cu_window_seqlens` after `unique_consecutive`).
    pub cu_window_seqlens: Vec<i32>,
    /// Cumulative patch counts per image (per frame), starting at 0.
    pub cu_seqlens: Vec<i32>,
    /// Total patches.
    pub patches: usize,
}

impl VisionPlan {
    /// The rotary (row, col) of each patch AFTER the window permutation (what the blocks use): groups
    /// of `merge²` consecutive patches reordered by `window_index`.
    ///
    /// Panics if `merge` is not the merge size the plan was made with.
    pub fn rot_pos_windowed(&self, merge: usize) -> Vec<[i32; 2]> {
        let unit = merge * merge;
        assert_eq!(
            self.window_index.len() * unit,
            self.rot_pos.len(),
            "rot_pos_windowed: merge {merge} does not match the plan"
        );
        let mut out = Vec::with_capacity(self.rot_pos.len());
        for &m in &self.window_index {
            out.extend_from_slice(&self.rot_pos[m * unit..(m + 1) * unit]);
        }
        out
    }

    /// Merged tokens of the batch (the vision tower's output rows).
    pub fn merged_tokens(&self) -> usize {
        self.window_index.len()
    }

    /// Windows (segments of windowed attention).
    pub fn windows(&self) -> usize {
        self.cu_window_seqlens.len().saturating_sub(1)
    }

    /// The longest window, in patches (the `max_seqlen` of windowed attention).
    pub fn max_window_patches(&self) -> usize {
        max_segment(&self.cu_window_seqlens)
    }

    /// The longest full-attention segment (one image frame), in patches.
    pub fn max_image_patches(&self) -> usize {
        max_segment(&self.cu_seqlens)
    }
}

fn max_segment(cu: &[i32]) -> usize {
    cu.windows(2).map(|w| (w[1] - w[0]) as usize).max().unwrap_or(0)
}

/// The vision plan for `grids` (see [`VisionPlan`]), docs/MODEL.md §5.2–5.5. `merge` is the spatial merge size
/// (2), `window_size` the window side in pixels (112) and `patch_size` the patch side in pixels (14); the
/// window side in merged tokens is `window_size / merge / patch_size` (4).
///
/// Panics where [`try_vision_plan`] errors.
pub fn vision_plan(grids: &[GridThw], merge: usize, window_size: usize, patch_size: usize) -> VisionPlan {
    try_vision_plan(grids, merge, window_size, patch_size).unwrap_or_else(|e| panic!("vision_plan: {e}"))
}

/// [`vision_plan`] that errors ([`Error::Input`]) on an invalid grid, a window smaller than one merged
/// token, or more patches than i32 can count.
pub fn try_vision_plan(
    grids: &[GridThw],
    merge: usize,
    window_size: usize,
    patch_size: usize,
) -> Result<VisionPlan> {
    for (i, g) in grids.iter().enumerate() {
        g.check(merge).map_err(|e| Error::Input(format!("image {i}: {e}")))?;
    }
    let side = window_size.checked_div(merge).and_then(|x| x.checked_div(patch_size)).unwrap_or(0);
    if side == 0 {
        return Err(Error::Input(format!(
            "window of {window_size} px is smaller than one merged token ({merge} x {patch_size} px)"
        )));
    }
    let patches: usize = grids.iter().map(GridThw::patches).sum();
    if patches > i32::MAX as usize {
        return Err(Error::Input(format!("{patches} patches do not fit i32 sequence offsets")));
    }
    let unit = merge * merge;
    let tokens = patches / unit;

    // Rotary (row, col) per patch in merge-block order, repeated per frame.
    let mut rot_pos = Vec::with_capacity(patches);
    for g in grids {
        let (hh, ww) = (g.merged_h(merge), g.merged_w(merge));
        for _ in 0..g.t {
            for bh in 0..hh {
                for bw in 0..ww {
                    for mh in 0..merge {
                        for mw in 0..merge {
                            rot_pos.push([(bh * merge + mh) as i32, (bw * merge + mw) as i32]);
                        }
                    }
                }
            }
        }
    }

    // Window order: per image, per frame, window row R, window column C; tokens row-major inside.
    // Windows are clipped at the bottom and right edges, so none is empty.
    let mut window_index = Vec::with_capacity(tokens);
    let mut cu_window_seqlens = vec![0i32];
    let mut cu_seqlens = Vec::with_capacity(grids.iter().map(|g| g.t).sum::<usize>() + 1);
    cu_seqlens.push(0i32);
    let mut token_offset = 0usize;
    let mut patch_end = 0usize;
    let mut window_end = 0usize;
    for g in grids {
        let (hh, ww) = (g.merged_h(merge), g.merged_w(merge));
        for t in 0..g.t {
            patch_end += g.h * g.w;
            cu_seqlens.push(patch_end as i32);
            for r0 in (0..hh).step_by(side) {
                for c0 in (0..ww).step_by(side) {
                    let (r1, c1) = ((r0 + side).min(hh), (c0 + side).min(ww));
                    for r in r0..r1 {
                        let row = token_offset + (t * hh + r) * ww;
                        window_index.extend(row + c0..row + c1);
                    }
                    window_end += (r1 - r0) * (c1 - c0) * unit;
                    cu_window_seqlens.push(window_end as i32);
                }
            }
        }
        token_offset += g.merged_tokens(merge);
    }
    debug_assert_eq!(window_index.len(), tokens);
    debug_assert_eq!(window_end, patches);

    let mut reverse_index = vec![0usize; tokens];
    for (i, &m) in window_index.iter().enumerate() {
        reverse_index[m] = i;
    }

    Ok(VisionPlan { rot_pos, window_index, reverse_index, cu_window_seqlens, cu_seqlens, patches })
}

/// Span `[start, end)` of rows to mean-pool for one sequence's single-vector output, docs/MODEL.md §8.1.
///
/// Text: all tokens. Image: from the first `vision_start` through the first `vision_end`, inclusive.
/// Errors if the sequence is empty, or if an image sequence lacks either marker or has its first
/// `vision_end` before its first `vision_start`.
pub fn pooling_span(
    ids: &[u32],
    vision_start: u32,
    vision_end: u32,
    has_image: bool,
) -> Result<(usize, usize)> {
    if ids.is_empty() {
        return Err(Error::Input("cannot pool an empty sequence".into()));
    }
    if !has_image {
        return Ok((0, ids.len()));
    }
    let start = ids.iter().position(|&x| x == vision_start).ok_or_else(|| {
        Error::Input(format!(
            "image sequence of {} tokens has no vision_start token {vision_start}",
            ids.len()
        ))
    })?;
    let end = ids.iter().position(|&x| x == vision_end).ok_or_else(|| {
        Error::Input(format!("image sequence of {} tokens has no vision_end token {vision_end}", ids.len()))
    })?;
    if end < start {
        return Err(Error::Input(format!(
            "image sequence: the first vision_end (position {end}) comes before the first vision_start \
             (position {start})"
        )));
    }
    Ok((start, end + 1))
}

/// The image-token splice: for a packed batch of sequences (token ids concatenated), the row indices
/// (in the packed batch) of every `image_token_id`, in order: the rows that the vision tower's merged
/// outputs replace, in batch order. Errors if their count is not `expected` (the total merged tokens).
pub fn image_token_rows(ids: &[u32], image_token_id: u32, expected: usize) -> Result<Vec<u32>> {
    if ids.len() > u32::MAX as usize {
        return Err(Error::Input(format!("packed batch of {} tokens exceeds u32 row indices", ids.len())));
    }
    let mut rows = Vec::with_capacity(expected);
    rows.extend(ids.iter().enumerate().filter(|&(_, &x)| x == image_token_id).map(|(i, _)| i as u32));
    if rows.len() != expected {
        return Err(Error::Input(format!(
            "the batch has {} image tokens ({image_token_id}) but the images produce {expected} merged tokens",
            rows.len()
        )));
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    const IMG: u32 = 151655;
    const VS: u32 = 151652;
    const VE: u32 = 151653;
    const MERGE: usize = 2;
    const WINDOW: usize = 112;
    const PATCH: usize = 14;

    fn is_input_err<T: std::fmt::Debug>(r: Result<T>, needles: &[&str]) {
        match r {
            Err(Error::Input(msg)) => {
                for n in needles {
                    assert!(msg.contains(n), "error `{msg}` does not mention `{n}`");
                }
            }
            other => panic!("expected Error::Input, got {other:?}"),
        }
    }

    /// The default image template: `<|im_start|>user\n<|vision_start|>` + n image tokens +
    /// `<|vision_end|>` + 6 trailing tokens.
    fn template(n: usize) -> Vec<u32> {
        let mut ids = vec![151644, 872, 198, VS];
        ids.extend(std::iter::repeat_n(IMG, n));
        ids.push(VE);
        ids.extend([74785, 279, 2168, 13, 151645, 198]);
        ids
    }

    #[test]
    fn grid_counts() {
        let g = GridThw::image(48, 60);
        assert_eq!(g.patches(), 2880);
        assert_eq!(g.merged_tokens(MERGE), 720);
        assert_eq!((g.merged_h(MERGE), g.merged_w(MERGE)), (24, 30));
        assert_eq!(GridThw { t: 2, h: 4, w: 6 }.merged_tokens(MERGE), 12);
        assert!(g.check(MERGE).is_ok());
        is_input_err(GridThw::image(5, 4).check(MERGE), &["5", "merge"]);
        is_input_err(GridThw::image(0, 4).check(MERGE), &[]);
        is_input_err(GridThw { t: 0, h: 4, w: 4 }.check(MERGE), &[]);
        is_input_err(g.check(0), &["merge"]);
    }

    #[test]
    fn text_positions() {
        let p = MropePositions::text(5);
        assert_eq!(p.len(), 5);
        assert_eq!(p.t, vec![0, 1, 2, 3, 4]);
        assert_eq!(p.h, p.t);
        assert_eq!(p.w, p.t);
        assert!(MropePositions::text(0).is_empty());
        // A sequence without image tokens and no grids gives the same.
        let ids = [1u32, 2, 3, 4, 5];
        assert_eq!(mrope_positions(&ids, IMG, &[], MERGE).unwrap(), p);
        assert_eq!(mrope_positions(&[], IMG, &[], MERGE).unwrap(), MropePositions::text(0));
    }

    #[test]
    fn worked_example_spec_7_3() {
        let ids = template(64);
        assert_eq!(ids.len(), 75);
        let p = mrope_positions(&ids, IMG, &[GridThw::image(16, 16)], MERGE).unwrap();
        assert_eq!(p.len(), 75);
        for i in 0..4 {
            assert_eq!(p.get(i), (i as i32, i as i32, i as i32));
        }
        for k in 0..64 {
            let (r, c) = ((k / 8) as i32, (k % 8) as i32);
            assert_eq!(p.get(4 + k), (4, 4 + r, 4 + c), "image token {k}");
        }
        assert_eq!(*p.h[4..68].iter().min().unwrap(), 4);
        assert_eq!(*p.h[4..68].iter().max().unwrap(), 11);
        assert_eq!(*p.w[4..68].iter().max().unwrap(), 11);
        assert_eq!(p.get(68), (12, 12, 12), "<|vision_end|>");
        for j in 0..6 {
            let v = 13 + j as i32;
            assert_eq!(p.get(69 + j), (v, v, v));
        }
        assert_eq!(p.get(74), (18, 18, 18));
    }

    #[test]
    fn non_square_image() {
        // 48x60 patches: H' = 24, W' = 30.
        let g = GridThw::image(48, 60);
        let ids = template(720);
        let p = mrope_positions(&ids, IMG, &[g], MERGE).unwrap();
        for k in 0..720 {
            assert_eq!(p.get(4 + k), (4, 4 + (k / 30) as i32, 4 + (k % 30) as i32));
        }
        // next = 4 + max(24, 30) = 34.
        assert_eq!(p.get(724), (34, 34, 34));
        assert_eq!(p.get(730), (40, 40, 40));
        // Tall: 62x48 patches: H' = 31, W' = 24; next = 4 + 31.
        let g = GridThw::image(62, 48);
        let ids = template(744);
        let p = mrope_positions(&ids, IMG, &[g], MERGE).unwrap();
        assert_eq!(p.get(4 + 743), (4, 4 + 30, 4 + 23));
        assert_eq!(p.get(748), (35, 35, 35));
    }

    #[test]
    fn two_images_in_one_sequence() {
        // text(2) VS img(2x3 tokens) VE VS img(2x2 tokens) VE text(1)
        let mut ids = vec![10u32, 11, VS];
        ids.extend([IMG; 6]);
        ids.extend([VE, VS]);
        ids.extend([IMG; 4]);
        ids.extend([VE, 12]);
        let grids = [GridThw::image(4, 6), GridThw::image(4, 4)];
        let p = mrope_positions(&ids, IMG, &grids, MERGE).unwrap();
        let want: Vec<(i32, i32, i32)> = vec![
            (0, 0, 0),
            (1, 1, 1),
            (2, 2, 2),
            // image 0, base 3, H' = 2, W' = 3
            (3, 3, 3),
            (3, 3, 4),
            (3, 3, 5),
            (3, 4, 3),
            (3, 4, 4),
            (3, 4, 5),
            // next = 3 + 3 = 6
            (6, 6, 6),
            (7, 7, 7),
            // image 1, base 8, H' = W' = 2
            (8, 8, 8),
            (8, 8, 9),
            (8, 9, 8),
            (8, 9, 9),
            // next = 10
            (10, 10, 10),
            (11, 11, 11),
        ];
        let got: Vec<_> = (0..p.len()).map(|i| p.get(i)).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn mrope_mismatch_errors() {
        let ids = template(64);
        // Too few / too many grids.
        is_input_err(mrope_positions(&ids, IMG, &[], MERGE), &["1 run", "[64]", "0 image grid"]);
        let two = [GridThw::image(16, 16), GridThw::image(16, 16)];
        is_input_err(mrope_positions(&ids, IMG, &two, MERGE), &["1 run", "2 image grid", "[64, 64]"]);
        // Wrong length.
        is_input_err(
            mrope_positions(&ids, IMG, &[GridThw::image(16, 18)], MERGE),
            &["image 0", "64 tokens", "needs 72", "1x16x18"],
        );
        is_input_err(mrope_positions(&template(63), IMG, &[GridThw::image(16, 16)], MERGE), &["63", "64"]);
        // Adjacent blocks of two images form one run: rejected.
        let mut ids2 = vec![VS];
        ids2.extend([IMG; 8]);
        ids2.push(VE);
        let g4 = [GridThw::image(4, 4), GridThw::image(4, 4)];
        is_input_err(mrope_positions(&ids2, IMG, &g4, MERGE), &["1 run", "[8]"]);
        // Videos and bad grids.
        is_input_err(mrope_positions(&ids, IMG, &[GridThw { t: 2, h: 8, w: 16 }], MERGE), &["t = 2"]);
        is_input_err(mrope_positions(&ids, IMG, &[GridThw::image(15, 16)], MERGE), &["image 0", "merge"]);
    }

    /// Exhaustive checks of a plan's window structure against its definition (docs/MODEL.md §5.3).
    fn check_windows(grids: &[GridThw], plan: &VisionPlan) {
        let side = WINDOW / MERGE / PATCH;
        let unit = MERGE * MERGE;
        let tokens: usize = grids.iter().map(|g| g.merged_tokens(MERGE)).sum();
        let patches: usize = grids.iter().map(|g| g.patches()).sum();
        assert_eq!(plan.patches, patches);
        assert_eq!(plan.rot_pos.len(), patches);
        assert_eq!(plan.window_index.len(), tokens);
        assert_eq!(plan.merged_tokens(), tokens);

        // A permutation, inverted by reverse_index.
        let mut seen = vec![false; tokens];
        for &m in &plan.window_index {
            assert!(!seen[m], "token {m} twice");
            seen[m] = true;
        }
        assert_eq!(plan.reverse_index.len(), tokens);
        for (i, &m) in plan.window_index.iter().enumerate() {
            assert_eq!(plan.reverse_index[m], i);
        }
        for (m, &i) in plan.reverse_index.iter().enumerate() {
            assert_eq!(plan.window_index[i], m);
        }

        // Decode a batch token into (image, t, r, c).
        let decode = |mut m: usize| {
            for (img, g) in grids.iter().enumerate() {
                let n = g.merged_tokens(MERGE);
                if m < n {
                    let (hh, ww) = (g.merged_h(MERGE), g.merged_w(MERGE));
                    return (img, m / (hh * ww), (m / ww) % hh, m % ww);
                }
                m -= n;
            }
            unreachable!()
        };

        // Window boundaries: strictly increasing multiples of merge², from 0 to the total.
        let cu = &plan.cu_window_seqlens;
        assert_eq!(cu[0], 0);
        assert_eq!(*cu.last().unwrap() as usize, patches);
        assert!(cu.windows(2).all(|w| w[1] > w[0]), "cu_window_seqlens not strictly increasing: {cu:?}");
        assert!(cu.iter().all(|&x| x as usize % unit == 0));

        let mut last_key = None;
        let mut n_windows = 0;
        for w in cu.windows(2) {
            let (a, b) = (w[0] as usize / unit, w[1] as usize / unit);
            let toks: Vec<_> = plan.window_index[a..b].iter().map(|&m| decode(m)).collect();
            let (img, t, r, c) = toks[0];
            let key = (img, t, r / side, c / side);
            if let Some(prev) = last_key {
                assert!(key > prev, "windows out of order: {prev:?} then {key:?}");
            }
            last_key = Some(key);
            // The full tile, clipped at the edges, row-major.
            let g = grids[img];
            let (hh, ww) = (g.merged_h(MERGE), g.merged_w(MERGE));
            let (r0, c0) = (key.2 * side, key.3 * side);
            let mut want = Vec::new();
            for rr in r0..(r0 + side).min(hh) {
                for cc in c0..(c0 + side).min(ww) {
                    want.push((img, t, rr, cc));
                }
            }
            assert_eq!(toks, want, "window {key:?}");
            n_windows += 1;
        }
        let want_windows: usize = grids
            .iter()
            .map(|g| g.t * g.merged_h(MERGE).div_ceil(side) * g.merged_w(MERGE).div_ceil(side))
            .sum();
        assert_eq!(n_windows, want_windows);
        assert_eq!(plan.windows(), want_windows);

        // Full-attention segments: one per frame of each image.
        let mut want_cu = vec![0i32];
        for g in grids {
            for _ in 0..g.t {
                want_cu.push(want_cu.last().unwrap() + (g.h * g.w) as i32);
            }
        }
        assert_eq!(plan.cu_seqlens, want_cu);
        assert_eq!(plan.max_image_patches(), grids.iter().map(|g| g.h * g.w).max().unwrap_or(0));
        assert!(plan.max_window_patches() <= side * side * unit);
    }

    /// A reference-style window index (pad with a sentinel even when divisible, reshape into
    /// windows, filter), then `unique_consecutive` on the boundaries: independent of the engine's.
    fn reference_windows(grids: &[GridThw]) -> (Vec<usize>, Vec<i32>) {
        const PAD: i64 = -100;
        let ws = WINDOW / MERGE / PATCH;
        let unit = (MERGE * MERGE) as i64;
        let mut window_index: Vec<usize> = Vec::new();
        let mut cu: Vec<i64> = vec![0];
        let mut id_offset = 0usize;
        for g in grids {
            let (gt, lh, lw) = (g.t, g.h / MERGE, g.w / MERGE);
            let pad_h = ws - lh % ws;
            let pad_w = ws - lw % ws;
            let (ph, pw) = (lh + pad_h, lw + pad_w);
            // index_padded[t][y][x]
            let padded: Vec<i64> = (0..gt * ph * pw)
                .map(|k| {
                    let (t, y, x) = (k / (ph * pw), (k / pw) % ph, k % pw);
                    if y < lh && x < lw {
                        ((t * lh + y) * lw + x) as i64
                    } else {
                        PAD
                    }
                })
                .collect();
            let (nwh, nww) = (ph / ws, pw / ws);
            // reshape (t, nwh, ws, nww, ws) -> permute (0, 1, 3, 2, 4) -> (t, nwh*nww, ws, ws)
            let mut seqlens = Vec::new();
            for t in 0..gt {
                for wh in 0..nwh {
                    for ww in 0..nww {
                        let mut n = 0i64;
                        for i in 0..ws {
                            for j in 0..ws {
                                let v = padded[(t * ph + wh * ws + i) * pw + ww * ws + j];
                                if v != PAD {
                                    window_index.push(v as usize + id_offset);
                                    n += 1;
                                }
                            }
                        }
                        seqlens.push(n);
                    }
                }
            }
            let last = *cu.last().unwrap();
            let mut acc = 0;
            for s in seqlens {
                acc += s;
                cu.push(acc * unit + last);
            }
            id_offset += gt * lh * lw;
        }
        let mut dedup: Vec<i32> = Vec::new();
        for v in cu {
            if dedup.last() != Some(&(v as i32)) {
                dedup.push(v as i32);
            }
        }
        (window_index, dedup)
    }

    #[test]
    fn windows_match_definition_and_reference() {
        let cases: Vec<Vec<GridThw>> = vec![
            vec![GridThw::image(16, 16)],
            vec![GridThw::image(48, 60)],
            vec![GridThw::image(62, 48)],
            vec![GridThw::image(48, 60), GridThw::image(62, 48)],
            vec![
                GridThw::image(16, 16),
                GridThw::image(4, 4),
                GridThw::image(62, 48),
                GridThw::image(16, 16),
            ],
            vec![GridThw::image(2, 2)],
            vec![GridThw::image(2, 30), GridThw::image(30, 2)],
            vec![GridThw::image(8, 8)],
            vec![GridThw::image(10, 18)],
            vec![GridThw { t: 2, h: 12, w: 10 }, GridThw::image(6, 6)],
        ];
        for grids in &cases {
            let plan = vision_plan(grids, MERGE, WINDOW, PATCH);
            check_windows(grids, &plan);
            let (ref_index, ref_cu) = reference_windows(grids);
            assert_eq!(plan.window_index, ref_index, "window_index for {grids:?}");
            assert_eq!(plan.cu_window_seqlens, ref_cu, "cu_window_seqlens for {grids:?}");
        }
        // An empty batch is an empty plan.
        let empty = vision_plan(&[], MERGE, WINDOW, PATCH);
        assert_eq!(empty.cu_seqlens, vec![0]);
        assert_eq!(empty.cu_window_seqlens, vec![0]);
        assert_eq!(empty.patches, 0);
    }

    #[test]
    fn windows_16x16_by_hand() {
        // H' = W' = 8: four full 4x4 windows of 64 patches each.
        let plan = vision_plan(&[GridThw::image(16, 16)], MERGE, WINDOW, PATCH);
        assert_eq!(plan.cu_window_seqlens, vec![0, 64, 128, 192, 256]);
        assert_eq!(plan.cu_seqlens, vec![0, 256]);
        assert_eq!(&plan.window_index[..8], &[0, 1, 2, 3, 8, 9, 10, 11]);
        assert_eq!(&plan.window_index[16..20], &[4, 5, 6, 7]);
        assert_eq!(&plan.window_index[32..36], &[32, 33, 34, 35]);
        assert_eq!(plan.window_index[63], 63);
        assert_eq!(plan.max_window_patches(), 64);
        // 48x60 then 62x48: the second image's tokens are offset by 720, its patches by 2880.
        let grids = [GridThw::image(48, 60), GridThw::image(62, 48)];
        let plan = vision_plan(&grids, MERGE, WINDOW, PATCH);
        assert_eq!(plan.cu_seqlens, vec![0, 2880, 2880 + 2976]);
        // Image 0: 6 x 8 windows; the last column is 2 tokens wide (30 = 7*4 + 2).
        assert_eq!(&plan.cu_window_seqlens[..9], &[0, 64, 128, 192, 256, 320, 384, 448, 480]);
        assert_eq!(plan.cu_window_seqlens[48], 2880);
        assert_eq!(plan.window_index[720], 720);
        assert_eq!(plan.windows(), 48 + 8 * 6);
        // Image 1: H' = 31, the last window row is 3 tokens tall: 3x4 tokens = 48 patches.
        let n = plan.cu_window_seqlens.len();
        assert_eq!(plan.cu_window_seqlens[n - 1] - plan.cu_window_seqlens[n - 2], 48);
    }

    #[test]
    fn rot_pos_4x6_by_hand() {
        let plan = vision_plan(&[GridThw::image(4, 6)], MERGE, WINDOW, PATCH);
        #[rustfmt::skip]
        let want: Vec<[i32; 2]> = vec![
            [0, 0], [0, 1], [1, 0], [1, 1],  [0, 2], [0, 3], [1, 2], [1, 3],  [0, 4], [0, 5], [1, 4], [1, 5],
            [2, 0], [2, 1], [3, 0], [3, 1],  [2, 2], [2, 3], [3, 2], [3, 3],  [2, 4], [2, 5], [3, 4], [3, 5],
        ];
        assert_eq!(plan.rot_pos, want);
        // One window covers the whole 2x3-token image: identity permutation.
        assert_eq!(plan.window_index, vec![0, 1, 2, 3, 4, 5]);
        assert_eq!(plan.reverse_index, vec![0, 1, 2, 3, 4, 5]);
        assert_eq!(plan.cu_window_seqlens, vec![0, 24]);
        assert_eq!(plan.rot_pos_windowed(MERGE), want);

        // Agrees with the patchify row formula of docs/MODEL.md §4.1 for every patch, and repeats per frame and
        // restarts per image.
        let grids = [GridThw { t: 2, h: 4, w: 6 }, GridThw::image(10, 14)];
        let plan = vision_plan(&grids, MERGE, WINDOW, PATCH);
        assert_eq!(&plan.rot_pos[..24], &want[..]);
        assert_eq!(&plan.rot_pos[24..48], &want[..]);
        let rest = &plan.rot_pos[48..];
        assert_eq!(rest.len(), 140);
        let gw = 14;
        for pr in 0..10 {
            for pc in 0..14 {
                let (bh, mh, bw, mw) = (pr / 2, pr % 2, pc / 2, pc % 2);
                let n = ((bh * (gw / 2) + bw) * 2 + mh) * 2 + mw;
                assert_eq!(rest[n], [pr as i32, pc as i32]);
            }
        }
    }

    #[test]
    fn rot_pos_windowed_follows_window_index() {
        let grids = [GridThw::image(48, 60), GridThw::image(16, 16)];
        let plan = vision_plan(&grids, MERGE, WINDOW, PATCH);
        let rw = plan.rot_pos_windowed(MERGE);
        assert_eq!(rw.len(), plan.patches);
        for (i, &m) in plan.window_index.iter().enumerate() {
            assert_eq!(&rw[i * 4..i * 4 + 4], &plan.rot_pos[m * 4..m * 4 + 4]);
        }
        // The first window of image 0 is the 8x8-patch tile at the origin, in merge groups.
        assert_eq!(&rw[..8], &[[0, 0], [0, 1], [1, 0], [1, 1], [0, 2], [0, 3], [1, 2], [1, 3]]);
        for p in &rw[..64] {
            assert!(p[0] < 8 && p[1] < 8, "{p:?}");
        }
        // Every window's patches lie within one 8x8-patch tile.
        for w in plan.cu_window_seqlens.windows(2) {
            let seg = &rw[w[0] as usize..w[1] as usize];
            let (r0, c0) = (seg[0][0] / 8, seg[0][1] / 8);
            assert!(seg.iter().all(|p| p[0] / 8 == r0 && p[1] / 8 == c0));
        }
    }

    #[test]
    fn vision_plan_errors() {
        is_input_err(try_vision_plan(&[GridThw::image(16, 15)], MERGE, WINDOW, PATCH), &["image 0"]);
        is_input_err(try_vision_plan(&[GridThw::image(16, 16)], MERGE, 14, PATCH), &["window"]);
        is_input_err(try_vision_plan(&[GridThw::image(16, 16)], MERGE, WINDOW, 0), &["window"]);
        is_input_err(try_vision_plan(&[], 0, WINDOW, PATCH), &["window"]);
    }

    #[test]
    #[should_panic(expected = "merge")]
    fn rot_pos_windowed_wrong_merge_panics() {
        vision_plan(&[GridThw::image(16, 16)], MERGE, WINDOW, PATCH).rot_pos_windowed(1);
    }

    #[test]
    fn pooling_spans() {
        let ids = template(64);
        // Text: everything.
        assert_eq!(pooling_span(&ids, VS, VE, false).unwrap(), (0, 75));
        assert_eq!(pooling_span(&[7], VS, VE, false).unwrap(), (0, 1));
        // Image: vision_start (3) ..= vision_end (68): N + 2 = 66 rows.
        let (s, e) = pooling_span(&ids, VS, VE, true).unwrap();
        assert_eq!((s, e), (3, 69));
        assert_eq!(e - s, 66);
        // Only the first markers count.
        let mut two = ids.clone();
        two.extend([VS, IMG, VE]);
        assert_eq!(pooling_span(&two, VS, VE, true).unwrap(), (3, 69));
        // Errors.
        is_input_err(pooling_span(&[], VS, VE, false), &["empty"]);
        let no_start: Vec<u32> = ids.iter().copied().filter(|&x| x != VS).collect();
        is_input_err(pooling_span(&no_start, VS, VE, true), &["vision_start", "151652"]);
        let no_end: Vec<u32> = ids.iter().copied().filter(|&x| x != VE).collect();
        is_input_err(pooling_span(&no_end, VS, VE, true), &["vision_end", "151653"]);
        is_input_err(pooling_span(&[1, VE, IMG, VS], VS, VE, true), &["before"]);
    }

    #[test]
    fn image_token_rows_in_batch_order() {
        // Packed batch: a text sequence, an image sequence (4 tokens), another image (16 tokens).
        let mut ids = vec![1u32, 2, 3];
        let a = template(4);
        let b = template(16);
        ids.extend(&a);
        ids.extend(&b);
        let rows = image_token_rows(&ids, IMG, 20).unwrap();
        let want: Vec<u32> = (3 + 4..3 + 8).chain(3 + a.len() as u32 + 4..3 + a.len() as u32 + 20).collect();
        assert_eq!(rows, want);
        assert!(rows.iter().all(|&r| ids[r as usize] == IMG));
        assert_eq!(image_token_rows(&[1, 2, 3], IMG, 0).unwrap(), Vec::<u32>::new());
        is_input_err(image_token_rows(&ids, IMG, 21), &["20 image tokens", "21 merged"]);
        is_input_err(image_token_rows(&[1, 2, 3], IMG, 4), &["0 image tokens", "4 merged"]);
    }

    #[test]
    fn plans_round_trip_through_json() {
        let plan = vision_plan(&[GridThw::image(16, 20)], MERGE, WINDOW, PATCH);
        let s = serde_json::to_string(&plan).unwrap();
        assert_eq!(serde_json::from_str::<VisionPlan>(&s).unwrap(), plan);
        let g: GridThw = serde_json::from_str(r#"{"t":1,"h":48,"w":60}"#).unwrap();
        assert_eq!(g, GridThw::image(48, 60));
        let p = mrope_positions(&template(4), IMG, &[GridThw::image(4, 4)], MERGE).unwrap();
        let s = serde_json::to_string(&p).unwrap();
        assert!(s.starts_with(r#"{"t":[0,1,2,3,4,4,4,4,6"#), "{s}");
        assert_eq!(serde_json::from_str::<MropePositions>(&s).unwrap(), p);
    }
}
