//! Output heads (docs/MODEL.md §8): the single vector ([`mean_pool_l2`]: span mean, then L2), the
//! multi-vector rows ([`l2_rows`]: per-token L2) and Matryoshka truncation. Ops:
//! `ops::pool::{mean_pool_l2, l2_rows}`.

use super::l2_normalize;

/// Mean of the rows `[s, e)` of `h [N, dim]` for each span `(s, e)`, summed in f64 and rounded
/// once: the single-vector pooling (text: all real tokens; image: `<|vision_start|>` through
/// `<|vision_end|>` inclusive, i.e. `e` = end index + 1). Not normalised: the helper under
/// [`mean_pool_l2`], public because tests derive their tolerance from the raw mean.
/// Panics on an empty span or one past the end.
pub fn mean_pool(h: &[f32], dim: usize, spans: &[(usize, usize)]) -> Vec<Vec<f32>> {
    assert!(dim > 0, "mean_pool: dim 0");
    assert_eq!(h.len() % dim, 0, "mean_pool: length {} is not a multiple of {dim}", h.len());
    let n = h.len() / dim;
    spans
        .iter()
        .map(|&(s, e)| {
            assert!(s < e && e <= n, "mean_pool: bad span ({s}, {e}) for {n} rows");
            let mut acc = vec![0f64; dim];
            for row in h[s * dim..e * dim].chunks_exact(dim) {
                for (a, &x) in acc.iter_mut().zip(row) {
                    *a += x as f64;
                }
            }
            acc.iter().map(|&a| (a / (e - s) as f64) as f32).collect()
        })
        .collect()
}

/// The `mean_pool_l2` op: for each span `(s, e)` the mean of rows `[s, e)` of `h [N, dim]`
/// ([`mean_pool`]), L2-normalised ([`l2_normalize`]); the result is `[spans.len(), dim]`.
pub fn mean_pool_l2(h: &[f32], dim: usize, spans: &[(usize, usize)]) -> Vec<f32> {
    mean_pool(h, dim, spans).iter().flat_map(|m| l2_normalize(m)).collect()
}

/// The `l2_rows` op: [`l2_normalize`] applied to each row of `x [rows, dim]`, the per-token
/// normalisation of the multi-vector head.
pub fn l2_rows(x: &[f32], dim: usize) -> Vec<f32> {
    assert!(dim > 0, "l2_rows: dim 0");
    assert_eq!(x.len() % dim, 0, "l2_rows: length {} is not a multiple of {dim}", x.len());
    x.chunks_exact(dim).flat_map(l2_normalize).collect()
}

/// Matryoshka truncation (docs/MODEL.md §8.1): `l2_normalize(&v[..dims])`. The input may be the
/// un-normalised mean or the already normalised vector: normalising is scale-invariant, so the
/// result is the same (up to rounding). Panics if `dims > v.len()`.
pub fn matryoshka(v: &[f32], dims: usize) -> Vec<f32> {
    assert!(dims <= v.len(), "matryoshka: {dims} dims > vector length {}", v.len());
    l2_normalize(&v[..dims])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::test_data;

    #[test]
    fn mean_pool_by_hand() {
        // h [4, 2]
        let h = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, -1.0, 0.0];
        let p = mean_pool(&h, 2, &[(0, 4), (1, 3), (3, 4)]);
        assert_eq!(p, vec![vec![2.0, 3.0], vec![4.0, 5.0], vec![-1.0, 0.0]]);
    }

    #[test]
    fn mean_pool_l2_by_hand() {
        // Spans' means [3, 4] and [0, -2]: normalised [0.6, 0.8] and [0, -1].
        let h = [2.0, 4.0, 4.0, 4.0, 0.0, -2.0];
        assert_eq!(mean_pool_l2(&h, 2, &[(0, 2), (2, 3)]), vec![0.6, 0.8, 0.0, -1.0]);
    }

    #[test]
    fn l2_rows_by_hand() {
        assert_eq!(l2_rows(&[3.0, 4.0, 0.0, -2.0, 0.0, 0.0], 2), vec![0.6, 0.8, 0.0, -1.0, 0.0, 0.0]);
    }

    #[test]
    #[should_panic(expected = "bad span")]
    fn mean_pool_rejects_empty_span() {
        mean_pool(&[1.0, 2.0], 1, &[(1, 1)]);
    }

    #[test]
    fn matryoshka_by_hand_and_property() {
        assert_eq!(matryoshka(&[3.0, 4.0, 12.0], 2), vec![0.6, 0.8]);
        assert_eq!(matryoshka(&[3.0, 4.0, 12.0], 3), l2_normalize(&[3.0, 4.0, 12.0]));
        // Truncate-then-normalise of the normalised vector = of the raw mean.
        let raw: Vec<f32> = test_data(90, 2048).iter().map(|x| 7.0 * x).collect();
        let normed = l2_normalize(&raw);
        for d in [128, 256, 512, 1024, 2048] {
            let (a, b) = (matryoshka(&raw, d), matryoshka(&normed, d));
            assert_eq!(a.len(), d);
            for (x, y) in a.iter().zip(&b) {
                assert!((x - y).abs() <= 1e-6 * x.abs().max(1e-3), "dims {d}: {x} vs {y}");
            }
            let n: f64 = a.iter().map(|&x| x as f64 * x as f64).sum();
            assert!((n - 1.0).abs() < 1e-6);
        }
    }

    #[test]
    #[should_panic(expected = "matryoshka")]
    fn matryoshka_rejects_too_many_dims() {
        matryoshka(&[1.0, 2.0], 3);
    }
}
