//! Row gather and scatter of the vision path: `gather_rows` (`out[i] = x[index[i]]`, the window
//! permutation and the merger's un-permutation) and `scatter_rows_f32` (`out[rows[i]] = v[i]`,
//! the image-token splice into the f32 residual stream).
//! Kernels: `kernels/rows.cu`; references: [`crate::reference::gather_rows`] and
//! [`crate::reference::scatter_rows_f32`].

use half::bf16;

use super::{arg, check_aligned, grid_for, THREADS};
use crate::cuda::{DView, DViewMut, Gpu, KernelId, Launch};
use crate::{Error, Result};

/// Shapes the tests run: (rows, row_len). Merge groups of 4·1280 (vector path) at one and many
/// rows, decoder-width rows of 2048, and odd rows of 7 (scalar path).
pub const CASES: &[(usize, usize)] =
    &[(1, 5120), (117, 5120), (1024, 5120), (33, 2048), (300, 2048), (5, 7), (129, 7)];

/// Shapes the scatter tests run: (R, N, L), N image rows spliced into R decoder rows of L. One
/// row, a prompt of 1024 image tokens among 1200 at the decoder width 2048, all rows replaced,
/// and an odd row length.
pub const SCATTER_CASES: &[(usize, usize, usize)] =
    &[(1, 1, 2048), (1200, 1024, 2048), (333, 333, 2048), (4097, 17, 2048), (50, 20, 7)];

/// `out [R_out, L] = x [R_in, L] [index [R_out]]`.
///
/// An index ≥ R_in is never read: its output row is written as NaN.
pub fn gather_rows(
    gpu: &Gpu,
    x: &DView<'_, bf16>,
    index: &DView<'_, u32>,
    out: &mut DViewMut<'_, bf16>,
) -> Result<()> {
    let bad = || {
        Error::Shape {
        op: "gather_rows",
        msg: format!(
            "x {:?}, index {:?} -> out {:?}: expected x [R_in, L], index [R_out], out [R_out, L], all non-empty",
            x.shape(),
            index.shape(),
            out.shape()
        ),
    }
    };
    let (&[rows_in, len], &[rows_out]) = (x.shape(), index.shape()) else {
        return Err(bad());
    };
    if out.shape() != [rows_out, len] || rows_in == 0 || len == 0 || rows_out == 0 {
        return Err(bad());
    }
    if len % 8 == 0 {
        check_aligned("gather_rows", "x", x.ptr(), 16)?;
        check_aligned("gather_rows", "out", out.ptr(), 16)?;
    }
    let work = if len % 8 == 0 { rows_out * len / 8 } else { rows_out * len };
    let (mut xp, mut ip, mut op) = (x.ptr(), index.ptr(), out.ptr());
    let (mut ro, mut l, mut ri) = (rows_out as i64, len as i64, rows_in as i64);
    let mut args = [arg(&mut xp), arg(&mut ip), arg(&mut op), arg(&mut ro), arg(&mut l), arg(&mut ri)];
    // SAFETY: args match gather_rows_bf16(const bf16*, const u32*, bf16*, int64, int64, int64);
    // x holds R_in·L, index R_out and out R_out·L elements (checked above), aligned for the
    // vector path; the kernel reads x rows only for indices < R_in.
    unsafe {
        gpu.launch(
            KernelId::GatherRowsBf16,
            Launch::linear(grid_for(work, THREADS), THREADS as u32),
            &mut args,
        )
    }
}

/// `out [R, L] [rows [N]] = f32(v [N, L])`; the other rows of `out` are not touched.
///
/// A row ≥ R is skipped. Rows must be distinct (two writes to one row race).
pub fn scatter_rows_f32(
    gpu: &Gpu,
    v: &DView<'_, bf16>,
    rows: &DView<'_, u32>,
    out: &mut DViewMut<'_, f32>,
) -> Result<()> {
    let bad = || Error::Shape {
        op: "scatter_rows_f32",
        msg: format!(
            "v {:?}, rows {:?} -> out {:?}: expected v [N, L], rows [N], out [R, L], all non-empty",
            v.shape(),
            rows.shape(),
            out.shape()
        ),
    };
    let (&[n, len], &[n_rows], &[rows_out, out_len]) = (v.shape(), rows.shape(), out.shape()) else {
        return Err(bad());
    };
    if n_rows != n || out_len != len || n == 0 || len == 0 || rows_out == 0 {
        return Err(bad());
    }
    let (mut vp, mut rp, mut op) = (v.ptr(), rows.ptr(), out.ptr());
    let (mut nr, mut l, mut ro) = (n as i64, len as i64, rows_out as i64);
    let mut args = [arg(&mut vp), arg(&mut rp), arg(&mut op), arg(&mut nr), arg(&mut l), arg(&mut ro)];
    // SAFETY: args match scatter_rows_f32(const bf16*, const u32*, float*, int64, int64, int64);
    // v holds N·L, rows N and out R·L elements (checked above); rows ≥ R are not written.
    unsafe {
        gpu.launch(
            KernelId::ScatterRowsF32,
            Launch::linear(grid_for(n * len, THREADS), THREADS as u32),
            &mut args,
        )
    }
}
