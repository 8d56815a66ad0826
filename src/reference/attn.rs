//! Scaled dot-product attention over packed variable-length segments (docs/MODEL.md §5.4 step 3 and
//! §7.1 step 4): the ViT's full/window attention (non-causal) and the LM's causal GQA attention.

use super::{dot64, par_rows};

/// Packed attention, `out [T, heads, head_dim]` from `q [T, heads, head_dim]` and
/// `k, v [T, kv_heads, head_dim]` (row-major, T tokens of all segments back to back).
///
/// - Segments: `cu_seqlens` is `[0, e₁, e₂, …, T]` (non-decreasing; empty segments allowed);
///   token `t` of segment `[s, e)` attends only to keys in `[s, e)`, never across segments.
/// - `causal`: additionally only keys `j ≤ t` (key index ≤ query index within the segment).
/// - GQA: query head `h` reads kv head `h / (heads / kv_heads)`.
/// - `out[t, h] = Σⱼ pⱼ·v[j, kvh]` with `pⱼ = exp(sⱼ − max s) / Σ exp(s − max s)`,
///   `sⱼ = scale · q[t, h]·k[j, kvh]` (scale is usually `1/√head_dim`).
///
/// Everything (scores, softmax, the weighted sum) is f64, rounded to f32 once. Only one row of
/// scores exists per thread at a time, so 32k-token segments fit; the work is still
/// O(T²·heads·head_dim), so for long inputs check a sample of query rows with
/// [`attention_rows`].
#[allow(clippy::too_many_arguments)]
pub fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    cu_seqlens: &[usize],
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    causal: bool,
    scale: f32,
) -> Vec<f32> {
    let tokens = q.len().checked_div(heads * head_dim).unwrap_or(0);
    let rows: Vec<usize> = (0..tokens).collect();
    attention_rows(q, k, v, cu_seqlens, heads, kv_heads, head_dim, causal, scale, &rows)
}

/// [`attention`] for the query tokens listed in `rows` only (any order, repeats allowed):
/// `out [rows.len(), heads, head_dim]`, row `i` being token `rows[i]`'s output. Keys and values
/// are still all tokens of that token's segment, so the rows equal the same rows of the full
/// result exactly.
#[allow(clippy::too_many_arguments)]
pub fn attention_rows(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    cu_seqlens: &[usize],
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    causal: bool,
    scale: f32,
    rows: &[usize],
) -> Vec<f32> {
    assert!(heads > 0 && kv_heads > 0 && head_dim > 0, "attention: zero heads or head_dim");
    assert_eq!(heads % kv_heads, 0, "attention: {heads} heads not a multiple of {kv_heads} kv heads");
    let row_len = heads * head_dim;
    let kv_len = kv_heads * head_dim;
    assert_eq!(q.len() % row_len, 0, "attention: q is not [T, heads, head_dim]");
    let tokens = q.len() / row_len;
    assert_eq!(k.len(), tokens * kv_len, "attention: k is not [T, kv_heads, head_dim]");
    assert_eq!(v.len(), tokens * kv_len, "attention: v is not [T, kv_heads, head_dim]");
    assert!(cu_seqlens.len() >= 2 || tokens == 0, "attention: cu_seqlens needs at least [0, T]");
    assert!(cu_seqlens.first().is_none_or(|&c| c == 0), "attention: cu_seqlens must start at 0");
    assert!(cu_seqlens.last().is_none_or(|&c| c == tokens), "attention: cu_seqlens must end at T = {tokens}");
    assert!(cu_seqlens.windows(2).all(|w| w[0] <= w[1]), "attention: cu_seqlens must be non-decreasing");
    if let Some(&bad) = rows.iter().find(|&&r| r >= tokens) {
        panic!("attention: query row {bad} out of range (T = {tokens})");
    }
    let group = heads / kv_heads;
    let scale = scale as f64;

    let mut out = vec![0f32; rows.len() * row_len];
    par_rows(&mut out, row_len, 8, |i, out_row| {
        let t = rows[i];
        // The segment [start, end) holding t: the last boundary ≤ t starts it.
        let seg = cu_seqlens.partition_point(|&c| c <= t) - 1;
        let (start, end) = (cu_seqlens[seg], cu_seqlens[seg + 1]);
        let stop = if causal { t + 1 } else { end };
        let mut scores = vec![0f64; stop - start];
        let mut acc = vec![0f64; head_dim];
        for (h, o) in out_row.chunks_exact_mut(head_dim).enumerate() {
            let kvh = h / group;
            let qh = &q[t * row_len + h * head_dim..][..head_dim];
            let kv_row = |j: usize| j * kv_len + kvh * head_dim..(j * kv_len + kvh * head_dim + head_dim);
            let mut max = f64::NEG_INFINITY;
            for (s, j) in scores.iter_mut().zip(start..stop) {
                *s = scale * dot64(qh, &k[kv_row(j)]);
                max = max.max(*s);
            }
            let mut denom = 0f64;
            acc.fill(0.0);
            for (s, j) in scores.iter().zip(start..stop) {
                let p = (s - max).exp();
                denom += p;
                for (a, &vv) in acc.iter_mut().zip(&v[kv_row(j)]) {
                    *a += p * vv as f64;
                }
            }
            for (o, a) in o.iter_mut().zip(&acc) {
                *o = (a / denom) as f32;
            }
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::test_data;

    const H: usize = 4;
    const KVH: usize = 2;
    const D: usize = 4;

    /// Direct dense `softmax(Q·Kᵀ·scale + mask)·V` per segment and head, written out with full
    /// score matrices (the obvious formula the reference must agree with).
    fn dense(q: &[f32], k: &[f32], v: &[f32], cu: &[usize], causal: bool, scale: f64) -> Vec<f32> {
        let mut out = vec![0f32; q.len()];
        for seg in cu.windows(2) {
            let (s, e) = (seg[0], seg[1]);
            let n = e - s;
            for h in 0..H {
                let kvh = h / (H / KVH);
                // Full n×n score matrix, masked entries −∞.
                let mut sm = vec![vec![f64::NEG_INFINITY; n]; n];
                for i in 0..n {
                    for j in 0..n {
                        if !causal || j <= i {
                            let mut d = 0f64;
                            for c in 0..D {
                                d += q[((s + i) * H + h) * D + c] as f64
                                    * k[((s + j) * KVH + kvh) * D + c] as f64;
                            }
                            sm[i][j] = d * scale;
                        }
                    }
                }
                for i in 0..n {
                    let m = sm[i].iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let p: Vec<f64> = sm[i].iter().map(|x| (x - m).exp()).collect();
                    let z: f64 = p.iter().sum();
                    for c in 0..D {
                        let o: f64 = (0..n).map(|j| p[j] * v[((s + j) * KVH + kvh) * D + c] as f64).sum();
                        out[((s + i) * H + h) * D + c] = (o / z) as f32;
                    }
                }
            }
        }
        out
    }

    fn inputs(t: usize, seed: u64) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let q: Vec<f32> = test_data(seed, t * H * D).iter().map(|x| 3.0 * x).collect();
        (q, test_data(seed + 1, t * KVH * D), test_data(seed + 2, t * KVH * D))
    }

    #[test]
    fn matches_dense_two_segments_gqa() {
        let cu = [0, 3, 7];
        let (q, k, v) = inputs(7, 20);
        let scale = 0.5f32;
        for causal in [false, true] {
            let got = attention(&q, &k, &v, &cu, H, KVH, D, causal, scale);
            let want = dense(&q, &k, &v, &cu, causal, scale as f64);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!((g - w).abs() <= 1e-6, "causal {causal} elem {i}: {g} vs {w}");
            }
            // The sampled-rows form gives the same rows exactly.
            let rows = [6, 0, 3, 3];
            let part = attention_rows(&q, &k, &v, &cu, H, KVH, D, causal, scale, &rows);
            for (i, &r) in rows.iter().enumerate() {
                assert_eq!(part[i * H * D..][..H * D], got[r * H * D..][..H * D]);
            }
        }
        // Causal: the first token of each segment sees only itself, so it gets its kv head's v.
        let got = attention(&q, &k, &v, &cu, H, KVH, D, true, scale);
        for t in [0, 3] {
            for h in 0..H {
                let kvh = h / 2;
                assert_eq!(got[(t * H + h) * D..][..D], v[(t * KVH + kvh) * D..][..D]);
            }
        }
    }

    #[test]
    fn segment_of_length_one() {
        // Segments [0,1), [1,1) (empty), [1,4), [4,5).
        let cu = [0, 1, 1, 4, 5];
        let (q, k, v) = inputs(5, 30);
        for causal in [false, true] {
            let got = attention(&q, &k, &v, &cu, H, KVH, D, causal, 0.3);
            for t in [0, 4] {
                for h in 0..H {
                    let kvh = h / (H / KVH);
                    assert_eq!(got[(t * H + h) * D..][..D], v[(t * KVH + kvh) * D..][..D], "token {t}");
                }
            }
            let want = dense(&q, &k, &v, &cu, causal, 0.3);
            assert!(got.iter().zip(&want).all(|(g, w)| (g - w).abs() <= 1e-6));
        }
    }

    #[test]
    fn segments_are_independent() {
        let cu = [0, 4, 9];
        let (q, k, v) = inputs(9, 40);
        let (mut q2, mut k2, mut v2) = (q.clone(), k.clone(), v.clone());
        // Replace every token of segment 2 (tokens 4..9).
        let (nq, nk, nv) = inputs(9, 50);
        q2[4 * H * D..].copy_from_slice(&nq[4 * H * D..]);
        k2[4 * KVH * D..].copy_from_slice(&nk[4 * KVH * D..]);
        v2[4 * KVH * D..].copy_from_slice(&nv[4 * KVH * D..]);
        for causal in [false, true] {
            let a = attention(&q, &k, &v, &cu, H, KVH, D, causal, 0.5);
            let b = attention(&q2, &k2, &v2, &cu, H, KVH, D, causal, 0.5);
            assert_eq!(a[..4 * H * D], b[..4 * H * D]);
            assert_ne!(a[4 * H * D..], b[4 * H * D..]);
        }
    }

    #[test]
    fn causal_prefix_property() {
        let cu = [0, 8];
        let (q, k, v) = inputs(8, 60);
        let full = attention(&q, &k, &v, &cu, H, KVH, D, true, 0.5);
        let (nq, nk, nv) = inputs(8, 70);
        for i in 0..7 {
            // Change every token after i.
            let (mut q2, mut k2, mut v2) = (q.clone(), k.clone(), v.clone());
            q2[(i + 1) * H * D..].copy_from_slice(&nq[(i + 1) * H * D..]);
            k2[(i + 1) * KVH * D..].copy_from_slice(&nk[(i + 1) * KVH * D..]);
            v2[(i + 1) * KVH * D..].copy_from_slice(&nv[(i + 1) * KVH * D..]);
            let got = attention(&q2, &k2, &v2, &cu, H, KVH, D, true, 0.5);
            assert_eq!(got[..(i + 1) * H * D], full[..(i + 1) * H * D], "prefix up to {i}");
            // Non-causal attention does see the change.
            let nc = attention(&q, &k, &v, &cu, H, KVH, D, false, 0.5);
            let nc2 = attention(&q2, &k2, &v2, &cu, H, KVH, D, false, 0.5);
            assert_ne!(nc[..H * D], nc2[..H * D]);
        }
    }

    #[test]
    fn large_scores_stay_finite() {
        let (q, k, v) = inputs(6, 80);
        let got = attention(&q, &k, &v, &[0, 6], H, KVH, D, false, 1e4);
        assert!(got.iter().all(|x| x.is_finite()));
        // Each output is a convex combination of the values.
        let vmax = v.iter().fold(0f32, |m, x| m.max(x.abs()));
        assert!(got.iter().all(|x| x.abs() <= vmax * (1.0 + 1e-6)));
    }

    #[test]
    fn long_segment_sampled_rows() {
        // One 32k-token segment: only one row of scores per thread exists, and sampled rows are
        // cheap. The last token sees every key whether causal or not; the first sees only itself.
        let t = 32 * 1024;
        let (h, kvh, d) = (2, 1, 8);
        let q = test_data(100, t * h * d);
        let (k, v) = (test_data(101, t * kvh * d), test_data(102, t * kvh * d));
        let cu = [0, t];
        let rows = [0, t - 1];
        let c = attention_rows(&q, &k, &v, &cu, h, kvh, d, true, 0.35, &rows);
        let nc = attention_rows(&q, &k, &v, &cu, h, kvh, d, false, 0.35, &rows);
        assert_eq!(c[h * d..], nc[h * d..]);
        assert_eq!(c[..d], v[..d]);
        assert_eq!(c[d..2 * d], v[..d]);
    }
}
