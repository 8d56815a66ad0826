//! `embedding`: `out[t, :] = table[ids[t], :]`, the token-embedding gather.
//! Kernel: `kernels/embedding.cu` (the row gather of `kernels/gather.cuh`, shared with
//! [`super::gather_rows`]); reference: [`crate::reference::embedding`].

use half::bf16;

use super::{arg, check_aligned, grid_for, THREADS};
use crate::cuda::{DView, DViewMut, Gpu, KernelId, Launch};
use crate::{Error, Result};

/// Shapes the tests run: (vocab, dim, tokens). The real table (151936 × 2048, vector path) at one
/// token, an odd count and 4097 tokens; a small table; dims that are not multiples of 8 (scalar
/// path).
pub const CASES: &[(usize, usize, usize)] = &[
    (151936, 2048, 1),
    (151936, 2048, 4097),
    (151936, 2048, 333),
    (1000, 2048, 7),
    (50, 12, 33),
    (300, 8, 5),
];

/// `out [T, d] = table [vocab, d] [ids [T]]`.
///
/// Ids must be below `vocab`: the engine validates them on the host before this launch. The
/// kernel never reads out of bounds all the same: an id ≥ vocab gets a row of NaN.
pub fn embedding(
    gpu: &Gpu,
    table: &DView<'_, bf16>,
    ids: &DView<'_, u32>,
    out: &mut DViewMut<'_, bf16>,
) -> Result<()> {
    let (vocab, dim, tokens) = check_shapes("embedding", table, ids, out.shape())?;
    if dim % 8 == 0 {
        check_aligned("embedding", "table", table.ptr(), 16)?;
        check_aligned("embedding", "out", out.ptr(), 16)?;
    }
    let work = if dim % 8 == 0 { tokens * dim / 8 } else { tokens * dim };
    let (mut tp, mut ip, mut op) = (table.ptr(), ids.ptr(), out.ptr());
    let (mut t, mut d, mut v) = (tokens as i64, dim as i64, vocab as i64);
    let mut args = [arg(&mut tp), arg(&mut ip), arg(&mut op), arg(&mut t), arg(&mut d), arg(&mut v)];
    // SAFETY: args match embedding_bf16(const bf16*, const u32*, bf16*, int64, int64, int64);
    // table holds vocab·d, ids T and out T·d elements (checked above), aligned for the vector
    // path; the kernel reads table rows only for ids < vocab.
    unsafe {
        gpu.launch(
            KernelId::EmbeddingBf16,
            Launch::linear(grid_for(work, THREADS), THREADS as u32),
            &mut args,
        )
    }
}

/// [`embedding`] into an f32 output (the start of the decoder's f32 residual stream; exact).
/// Kernel `embedding_f32`, the same shared gather (`kernels/gather.cuh`).
pub fn embedding_f32(
    gpu: &Gpu,
    table: &DView<'_, bf16>,
    ids: &DView<'_, u32>,
    out: &mut DViewMut<'_, f32>,
) -> Result<()> {
    let (vocab, dim, tokens) = check_shapes("embedding_f32", table, ids, out.shape())?;
    if dim % 8 == 0 {
        check_aligned("embedding_f32", "table", table.ptr(), 16)?;
        check_aligned("embedding_f32", "out", out.ptr(), 16)?;
    }
    let work = if dim % 8 == 0 { tokens * dim / 8 } else { tokens * dim };
    let (mut tp, mut ip, mut op) = (table.ptr(), ids.ptr(), out.ptr());
    let (mut t, mut d, mut v) = (tokens as i64, dim as i64, vocab as i64);
    let mut args = [arg(&mut tp), arg(&mut ip), arg(&mut op), arg(&mut t), arg(&mut d), arg(&mut v)];
    // SAFETY: args match embedding_f32(const bf16*, const u32*, float*, int64, int64, int64);
    // table holds vocab·d, ids T and out T·d elements (checked above), aligned for the vector
    // path; the kernel reads table rows only for ids < vocab.
    unsafe {
        gpu.launch(KernelId::EmbeddingF32, Launch::linear(grid_for(work, THREADS), THREADS as u32), &mut args)
    }
}

/// Checks table `[vocab, d]`, ids `[T]` and out `[T, d]` (all non-empty); returns (vocab, d, T).
fn check_shapes(
    op: &'static str,
    table: &DView<'_, bf16>,
    ids: &DView<'_, u32>,
    out: &[usize],
) -> Result<(usize, usize, usize)> {
    let bad = || {
        Error::Shape {
        op,
        msg: format!(
            "table {:?}, ids {:?} -> out {out:?}: expected table [vocab, d], ids [T], out [T, d], all non-empty",
            table.shape(),
            ids.shape()
        ),
    }
    };
    let (&[vocab, dim], &[tokens]) = (table.shape(), ids.shape()) else {
        return Err(bad());
    };
    if out != [tokens, dim] || vocab == 0 || dim == 0 || tokens == 0 {
        return Err(bad());
    }
    Ok((vocab, dim, tokens))
}
