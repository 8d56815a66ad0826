//! Dense layers: `y = x·wᵀ + b` (all rows or a sample of rows), the LoRA delta, and the
//! `lora_mask` op of the batched LoRA path.

use super::{dot64, par_rows};

/// `y[m, n] = x[m, k] · w[n, k]ᵀ (+ bias[n])`, accumulated in f64 so that the reference's own
/// rounding is negligible next to the GPU's. Also returns, per output, `Σ_k |x·w|`, the scale
/// that bounds any f32 accumulation error (tests derive their tolerance from it).
/// Only rows listed in `rows` are computed (all rows when `None`), so large problems can be
/// checked on a sample.
pub fn linear(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    (m, n, k): (usize, usize, usize),
    rows: Option<&[usize]>,
) -> (Vec<f32>, Vec<f32>) {
    assert_eq!(x.len(), m * k);
    assert_eq!(w.len(), n * k);
    let all: Vec<usize>;
    let rows = match rows {
        Some(r) => r,
        None => {
            all = (0..m).collect();
            &all
        }
    };
    let mut y = vec![0f32; rows.len() * n];
    let mut scale = vec![0f32; rows.len() * n];
    // One thread per chunk of output features: the f64 loop is the slow part of the GPU tests.
    let threads = std::thread::available_parallelism().map_or(1, |p| p.get()).min(32);
    let chunk = n.div_ceil(threads).max(1);
    std::thread::scope(|s| {
        let mut handles = Vec::new();
        for c0 in (0..n).step_by(chunk) {
            let c1 = (c0 + chunk).min(n);
            handles.push(s.spawn(move || {
                let mut part = Vec::with_capacity(rows.len() * (c1 - c0));
                for &r in rows {
                    let xr = &x[r * k..(r + 1) * k];
                    for j in c0..c1 {
                        let wr = &w[j * k..(j + 1) * k];
                        let (mut acc, mut abs) = (0f64, 0f64);
                        for (&a, &b) in xr.iter().zip(wr) {
                            let p = a as f64 * b as f64;
                            acc += p;
                            abs += p.abs();
                        }
                        if let Some(b) = bias {
                            acc += b[j] as f64;
                            abs += (b[j] as f64).abs();
                        }
                        part.push((acc as f32, abs as f32));
                    }
                }
                (c0, c1, part)
            }));
        }
        for h in handles {
            let (c0, c1, part) = h.join().expect("reference thread");
            let width = c1 - c0;
            for (i, (v, a)) in part.into_iter().enumerate() {
                let (ri, j) = (i / width, c0 + i % width);
                y[ri * n + j] = v;
                scale[ri * n + j] = a;
            }
        }
    });
    (y, scale)
}

/// `y[m, n] = x[m, k] · w[n, k]ᵀ (+ bias[n])` for all rows, f64 accumulation, rounded once.
/// A convenience over [`linear`] without the error scale or the row sampling.
pub fn linear_f32(x: &[f32], w: &[f32], bias: Option<&[f32]>, m: usize, n: usize, k: usize) -> Vec<f32> {
    if let Some(b) = bias {
        assert_eq!(b.len(), n, "linear_f32: bias length");
    }
    linear(x, w, bias, (m, n, k), None).0
}

/// The LoRA delta of one adapted linear (docs/MODEL.md §6): `delta[m, n] = scale · (x·aᵀ)·bᵀ` with
/// `x [m, k]`, `a [r, k]` (lora_A), `b [n, r]` (lora_B, no bias). The rank-`r` intermediate
/// `x·aᵀ` is kept in f64 (not rounded), the result rounded to f32 once. The adapted layer's
/// output is `linear_f32(x, w, bias, ..) + delta` (scale is α/r = 1.0 for jina-v4).
#[allow(clippy::too_many_arguments)]
pub fn lora(x: &[f32], a: &[f32], b: &[f32], scale: f32, m: usize, k: usize, r: usize, n: usize) -> Vec<f32> {
    assert_eq!(x.len(), m * k, "lora: x is not [m, k]");
    assert_eq!(a.len(), r * k, "lora: a is not [r, k]");
    assert_eq!(b.len(), n * r, "lora: b is not [n, r]");
    let mut out = vec![0f32; m * n];
    par_rows(&mut out, n, 16, |i, row| {
        let xi = &x[i * k..(i + 1) * k];
        let t: Vec<f64> = a.chunks_exact(k).map(|ar| dot64(xi, ar)).collect();
        for (o, br) in row.iter_mut().zip(b.chunks_exact(r)) {
            let acc: f64 = t.iter().zip(br).map(|(&tv, &bv)| tv * bv as f64).sum();
            *o = (scale as f64 * acc) as f32;
        }
    });
    out
}

/// The `lora_mask` op (docs/MODEL.md §6): in place on `t [rows, tasks·r]` (the shrink `x·A_allᵀ` for
/// all tasks), zeroes every `r`-wide column group of row `i` except group `row_task[i]`; a row
/// whose task is ≥ tasks has every group zeroed. Kept elements are not touched; masked ones
/// become `+0.0`.
pub fn lora_mask(t: &mut [f32], row_task: &[u8], r: usize) {
    assert!(r > 0, "lora_mask: r 0");
    assert!(!row_task.is_empty(), "lora_mask: no rows");
    assert_eq!(t.len() % row_task.len(), 0, "lora_mask: t is not [rows, tasks·r]");
    let cols = t.len() / row_task.len();
    assert_eq!(cols % r, 0, "lora_mask: {cols} columns are not a multiple of r = {r}");
    for (row, &task) in t.chunks_exact_mut(cols).zip(row_task) {
        for (g, group) in row.chunks_exact_mut(r).enumerate() {
            if g != task as usize {
                group.fill(0.0);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::test_data;

    #[test]
    fn linear_by_hand_and_sampled_rows() {
        // x [2,3], w [2,3] (n=2), bias [2]
        let x = [1.0, 2.0, 3.0, -1.0, 0.5, 2.0];
        let w = [1.0, 0.0, -1.0, 2.0, 1.0, 1.0];
        let b = [0.5, -0.5];
        let (y, s) = linear(&x, &w, Some(&b), (2, 2, 3), None);
        assert_eq!(y, vec![-1.5, 6.5, -2.5, 0.0]);
        assert_eq!(s, vec![4.5, 7.5, 3.5, 5.0]);
        let (y1, _) = linear(&x, &w, Some(&b), (2, 2, 3), Some(&[1]));
        assert_eq!(y1, vec![-2.5, 0.0]);
    }

    #[test]
    fn linear_f32_by_hand() {
        let x = [1.0, 2.0, 3.0, -1.0, 0.5, 2.0];
        let w = [1.0, 0.0, -1.0, 2.0, 1.0, 1.0];
        assert_eq!(linear_f32(&x, &w, Some(&[0.5, -0.5]), 2, 2, 3), vec![-1.5, 6.5, -2.5, 0.0]);
        assert_eq!(linear_f32(&x, &w, None, 2, 2, 3), vec![-2.0, 7.0, -3.0, 0.5]);
    }

    #[test]
    fn lora_mask_by_hand() {
        // 3 rows of 2 tasks × r 2; tasks 1, 0 and 7 (out of range: all zeroed).
        let mut t: Vec<f32> = (1..=12).map(|v| v as f32).collect();
        lora_mask(&mut t, &[1, 0, 7], 2);
        assert_eq!(t, vec![0.0, 0.0, 3.0, 4.0, 5.0, 6.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
    }

    #[test]
    fn lora_by_hand() {
        // x [1,2], a [1,2] (r=1), b [3,1] (n=3), scale 2: x·aᵀ = 1·3 + 2·4 = 11.
        let out = lora(&[1.0, 2.0], &[3.0, 4.0], &[1.0, -1.0, 0.5], 2.0, 1, 2, 1, 3);
        assert_eq!(out, vec![22.0, -22.0, 11.0]);
    }

    #[test]
    fn lora_equals_linear_twice() {
        let (m, k, r, n) = (5, 24, 4, 7);
        let (x, a, b) = (test_data(1, m * k), test_data(2, r * k), test_data(3, n * r));
        let t = linear_f32(&x, &a, None, m, r, k);
        let two = linear_f32(&t, &b, None, m, n, r);
        let got = lora(&x, &a, &b, 0.5, m, k, r, n);
        for (g, w) in got.iter().zip(&two) {
            assert!((g - 0.5 * w).abs() <= 1e-6 * w.abs().max(1.0), "{g} vs {}", 0.5 * w);
        }
        // Integer-valued inputs: exact.
        let xi: Vec<f32> = (0..m * k).map(|i| (i % 5) as f32 - 2.0).collect();
        let ai: Vec<f32> = (0..r * k).map(|i| (i % 3) as f32 - 1.0).collect();
        let bi: Vec<f32> = (0..n * r).map(|i| (i % 4) as f32 - 1.5).collect();
        let two = linear_f32(&linear_f32(&xi, &ai, None, m, r, k), &bi, None, m, n, r);
        assert_eq!(lora(&xi, &ai, &bi, 1.0, m, k, r, n), two);
    }
}
