//! Normalisations: RMSNorm (plain and fused with the residual add) and L2 of one vector (the
//! L2 ops of the heads are in `pool.rs`).

/// RMSNorm with weight only (docs/MODEL.md §5.4, §7.1), per row of `w.len()` elements:
/// `y = w ⊙ (x · 1/sqrt(mean(x²) + eps))`. `x` is `[rows, w.len()]`; the mean of squares, the
/// scale and the products are in f64, rounded to f32 once. (HF rounds `x·rsqrt(…)` to the
/// activation dtype before the weight multiply; the oracle does not round in between.)
pub fn rmsnorm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let dim = w.len();
    assert!(dim > 0, "rmsnorm: empty weight");
    assert_eq!(x.len() % dim, 0, "rmsnorm: x length {} is not a multiple of {dim}", x.len());
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks_exact(dim) {
        let ms = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / dim as f64;
        let inv = 1.0 / (ms + eps as f64).sqrt();
        out.extend(row.iter().zip(w).map(|(&v, &g)| (g as f64 * (v as f64 * inv)) as f32));
    }
    out
}

/// The fused residual-add + RMSNorm kernel's contract: `residual += x` (elementwise, f32 adds,
/// in place), then return [`rmsnorm`]`(residual, w, eps)` of the updated residual. `residual` and
/// `x` are `[rows, w.len()]`.
pub fn add_rmsnorm(residual: &mut [f32], x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    assert_eq!(residual.len(), x.len(), "add_rmsnorm: residual and x differ in length");
    for (r, &v) in residual.iter_mut().zip(x) {
        *r += v;
    }
    rmsnorm(residual, w, eps)
}

/// `v / max(‖v‖₂, 1e-12)`, the norm in f64 and the division in f64, rounded once (the
/// `F.normalize` of the single- and multi-vector heads, docs/MODEL.md §8). An all-zero vector stays
/// zero.
pub fn l2_normalize(v: &[f32]) -> Vec<f32> {
    let norm = v.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
    let d = norm.max(1e-12);
    v.iter().map(|&x| (x as f64 / d) as f32).collect()
}

/// Cosine similarity in f64 (0 when either vector is zero): how parity is measured against
/// reference embeddings.
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "cosine of vectors of different lengths");
    let (mut ab, mut aa, mut bb) = (0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        ab += x as f64 * y as f64;
        aa += (x as f64).powi(2);
        bb += (y as f64).powi(2);
    }
    ab / (aa.sqrt() * bb.sqrt()).max(1e-300)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rmsnorm_by_hand() {
        // Row [3, 4]: mean(x²) = 12.5; row [1, -1]: mean(x²) = 1. eps 0 keeps the numbers round.
        let y = rmsnorm(&[3.0, 4.0, 1.0, -1.0], &[1.0, 2.0], 0.0);
        let s = 1.0 / 12.5f64.sqrt();
        assert_eq!(y, vec![(3.0 * s) as f32, (8.0 * s) as f32, 1.0, -2.0]);
        // eps enters under the root: x = [1, 1], eps 3 → 1/sqrt(1 + 3) = 0.5.
        assert_eq!(rmsnorm(&[1.0, 1.0], &[1.0, -4.0], 3.0), vec![0.5, -2.0]);
        // A zero row stays finite (eps > 0).
        assert_eq!(rmsnorm(&[0.0, 0.0], &[1.0, 1.0], 1e-6), vec![0.0, 0.0]);
    }

    #[test]
    fn add_rmsnorm_updates_residual() {
        let mut res = vec![1.0, 2.0, 0.5, 0.5];
        let x = [2.0, 2.0, 0.5, -1.5];
        let y = add_rmsnorm(&mut res, &x, &[1.0, 2.0], 0.0);
        assert_eq!(res, vec![3.0, 4.0, 1.0, -1.0]);
        assert_eq!(y, rmsnorm(&res, &[1.0, 2.0], 0.0));
    }

    #[test]
    fn l2_by_hand() {
        assert_eq!(l2_normalize(&[3.0, 4.0]), vec![0.6, 0.8]);
        assert_eq!(l2_normalize(&[0.0, 0.0]), vec![0.0, 0.0]);
        // Below the 1e-12 floor the vector is divided by 1e-12, not by its norm.
        assert_eq!(l2_normalize(&[1e-14, 0.0]), vec![(1e-14f32 as f64 / 1e-12) as f32, 0.0]);
    }
}
