//! Rotary position embeddings: the ops [`mrope`] (the LM's M-RoPE, docs/MODEL.md §7.2) and
//! [`vision_rope`] (the ViT's 2-D rotary, §5.2), in place on the fused `[q | k | v]` rows as
//! `ops::rope` runs them, and the helpers they are built from (also used by the CPU model on
//! separate q and k): the angle tables [`mrope_angles`] and [`vision_rope_angles`], and the
//! rotation [`rope_apply`] (rotate_half convention, shared by both).
//!
//! Angle tables are `[tokens, head_dim/2]`: one angle per rotation pair `(j, j + head_dim/2)`,
//! the same for every head. (HF stores `[tokens, head_dim]` with the half repeated twice; the
//! second half is redundant and left out here.)

/// `theta^(−2j/head_dim)` for `j < head_dim/2`, in f64.
fn inv_freq(theta: f64, j: usize, head_dim: usize) -> f64 {
    theta.powf(-2.0 * j as f64 / head_dim as f64)
}

/// M-RoPE angles, `[tokens, head_dim/2]` (docs/MODEL.md §7.2): `φ[t, j] = p_{sec(j)}[t] ·
/// theta^(−2j/head_dim)`, where the component `sec(j)` is chosen by the cumulative `section`:
/// `j < s₀` → `pos_t`, `j < s₀+s₁` → `pos_h`, else `pos_w` (jina-v4: head_dim 128, theta 1e6,
/// section [16, 24, 24]: j < 16 → t, j < 40 → h, else w). Computed in f64, stored f32.
/// With `pos_t = pos_h = pos_w` this is plain 1-D RoPE.
pub fn mrope_angles(
    pos_t: &[i32],
    pos_h: &[i32],
    pos_w: &[i32],
    head_dim: usize,
    theta: f64,
    section: [usize; 3],
) -> Vec<f32> {
    assert!(
        pos_t.len() == pos_h.len() && pos_h.len() == pos_w.len(),
        "mrope_angles: position lengths differ"
    );
    assert_eq!(head_dim % 2, 0, "mrope_angles: odd head_dim {head_dim}");
    let half = head_dim / 2;
    assert_eq!(
        section.iter().sum::<usize>(),
        half,
        "mrope_angles: section {section:?} does not sum to {half}"
    );
    let freqs: Vec<f64> = (0..half).map(|j| inv_freq(theta, j, head_dim)).collect();
    let mut out = Vec::with_capacity(pos_t.len() * half);
    for t in 0..pos_t.len() {
        for (j, &f) in freqs.iter().enumerate() {
            let p = if j < section[0] {
                pos_t[t]
            } else if j < section[0] + section[1] {
                pos_h[t]
            } else {
                pos_w[t]
            };
            out.push((p as f64 * f) as f32);
        }
    }
    out
}

/// The ViT's 2-D rotary angles, `[patches, head_dim/2]` (docs/MODEL.md §5.2). `rot_pos[i]` is the
/// patch's `[row, col]` (in the window-permuted order if the caller permutes). With
/// `q = head_dim/4` frequencies `inv_freq[k] = theta^(−2k/(head_dim/2))`, `k < q`:
/// `θ[k] = row·inv_freq[k]` and `θ[q + k] = col·inv_freq[k]`.
/// jina-v4: head_dim 80, theta 1e4 → 20 frequencies, 40 angles per patch. Computed in f64,
/// stored f32.
pub fn vision_rope_angles(rot_pos: &[[i32; 2]], head_dim: usize, theta: f64) -> Vec<f32> {
    assert_eq!(head_dim % 4, 0, "vision_rope_angles: head_dim {head_dim} is not a multiple of 4");
    let (half, q) = (head_dim / 2, head_dim / 4);
    let freqs: Vec<f64> = (0..q).map(|k| inv_freq(theta, k, half)).collect();
    let mut out = Vec::with_capacity(rot_pos.len() * half);
    for &[row, col] in rot_pos {
        out.extend(freqs.iter().map(|&f| (row as f64 * f) as f32));
        out.extend(freqs.iter().map(|&f| (col as f64 * f) as f32));
    }
    out
}

/// Rotary embedding in place, rotate_half (non-interleaved) convention. `x` is
/// `[tokens, heads, head_dim]`, `angles` is `[tokens, head_dim/2]` (the same angles for every
/// head). With `half = head_dim/2` and `φ = angles[t, j]`, for each `j < half`:
/// `x'[j] = x[j]·cos φ − x[j+half]·sin φ`, `x'[j+half] = x[j+half]·cos φ + x[j]·sin φ`.
/// cos/sin and the products are f64, rounded to f32 once.
pub fn rope_apply(x: &mut [f32], tokens: usize, heads: usize, head_dim: usize, angles: &[f32]) {
    assert_eq!(head_dim % 2, 0, "rope_apply: odd head_dim {head_dim}");
    let half = head_dim / 2;
    assert_eq!(x.len(), tokens * heads * head_dim, "rope_apply: x is not [tokens, heads, head_dim]");
    assert_eq!(angles.len(), tokens * half, "rope_apply: angles are not [tokens, head_dim/2]");
    if half == 0 || heads == 0 {
        return;
    }
    for (xt, at) in x.chunks_exact_mut(heads * head_dim).zip(angles.chunks_exact(half)) {
        let cs: Vec<(f64, f64)> = at.iter().map(|&a| ((a as f64).cos(), (a as f64).sin())).collect();
        for head in xt.chunks_exact_mut(head_dim) {
            let (lo, hi) = head.split_at_mut(half);
            for ((a, b), &(c, s)) in lo.iter_mut().zip(hi.iter_mut()).zip(&cs) {
                let (x0, x1) = (*a as f64, *b as f64);
                *a = (x0 * c - x1 * s) as f32;
                *b = (x1 * c + x0 * s) as f32;
            }
        }
    }
}

/// Rotates the first `rotated_heads` heads of every row of `qkv [tokens, row]` in place with
/// `angles [tokens, head_dim/2]` ([`rope_apply`] on that prefix); the rest of each row (v) is
/// not touched.
fn rope_rows(
    qkv: &mut [f32],
    tokens: usize,
    row: usize,
    rotated_heads: usize,
    head_dim: usize,
    angles: &[f32],
) {
    assert_eq!(qkv.len(), tokens * row, "rope: qkv is not [tokens, {row}]");
    let rot = rotated_heads * head_dim;
    assert!(rot <= row, "rope: {rotated_heads} heads of {head_dim} exceed rows of {row}");
    let half = head_dim / 2;
    for (t, x) in qkv.chunks_exact_mut(row.max(1)).enumerate() {
        rope_apply(&mut x[..rot], 1, rotated_heads, head_dim, &angles[t * half..(t + 1) * half]);
    }
}

/// The `mrope` op: M-RoPE in place on `qkv [tokens, (q_heads + 2·kv_heads)·head_dim]`
/// (`[q | k | v]` heads). The q and k heads are rotated by [`mrope_angles`] of `pos` (planes t,
/// h, w) with base `theta` and `section`; v is not touched.
#[allow(clippy::too_many_arguments)]
pub fn mrope(
    qkv: &mut [f32],
    tokens: usize,
    q_heads: usize,
    kv_heads: usize,
    head_dim: usize,
    pos: [&[i32]; 3],
    theta: f64,
    section: [usize; 3],
) {
    for p in pos {
        assert_eq!(p.len(), tokens, "mrope: positions are not [3, tokens]");
    }
    let angles = mrope_angles(pos[0], pos[1], pos[2], head_dim, theta, section);
    rope_rows(qkv, tokens, (q_heads + 2 * kv_heads) * head_dim, q_heads + kv_heads, head_dim, &angles);
}

/// The `vision_rope` op: the ViT's rotary in place on `qkv [patches, 3·heads·head_dim]`
/// (`[q | k | v]`): the q and k heads are rotated by `angles [patches, head_dim/2]` (from
/// [`vision_rope_angles`]); v is not touched.
pub fn vision_rope(qkv: &mut [f32], patches: usize, heads: usize, head_dim: usize, angles: &[f32]) {
    rope_rows(qkv, patches, 3 * heads * head_dim, 2 * heads, head_dim, angles);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::test_data;

    #[test]
    fn rope_apply_by_hand() {
        // head_dim 4 (pairs (0,2), (1,3)), 2 heads, 1 token: rotate pair 0 by π/2, pair 1 by 0.
        let mut x = vec![1.0, 2.0, 3.0, 4.0, -1.0, 5.0, 0.5, 6.0];
        rope_apply(&mut x, 1, 2, 4, &[std::f32::consts::FRAC_PI_2, 0.0]);
        let want = [-3.0, 2.0, 1.0, 4.0, -0.5, 5.0, -1.0, 6.0];
        for (g, w) in x.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{x:?}");
        }
    }

    #[test]
    fn rope_position_zero_is_identity() {
        let (tokens, heads, d) = (3, 2, 8);
        let x0 = test_data(11, tokens * heads * d);
        let zero = vec![0; tokens];
        let angles = mrope_angles(&zero, &zero, &zero, d, 1e6, [1, 2, 1]);
        assert!(angles.iter().all(|&a| a == 0.0));
        let mut x = x0.clone();
        rope_apply(&mut x, tokens, heads, d, &angles);
        assert_eq!(x, x0);
    }

    #[test]
    fn rope_preserves_pair_norms_and_composes() {
        let (tokens, heads, d) = (5, 3, 16);
        let half = d / 2;
        let x0 = test_data(12, tokens * heads * d);
        let pos: Vec<i32> = vec![0, 1, 7, 300, 32767];
        let angles = mrope_angles(&pos, &pos, &pos, d, 1e4, [2, 3, 3]);
        let mut x = x0.clone();
        rope_apply(&mut x, tokens, heads, d, &angles);
        for (h0, h1) in x0.chunks_exact(d).zip(x.chunks_exact(d)) {
            for j in 0..half {
                let n0 = (h0[j] as f64).hypot(h0[j + half] as f64);
                let n1 = (h1[j] as f64).hypot(h1[j + half] as f64);
                assert!((n0 - n1).abs() <= 1e-6 * n0.max(1e-3), "pair {j}: {n0} vs {n1}");
            }
        }
        // Rotating by a then by b equals rotating by a + b.
        let (a, b) = (test_data(13, tokens * half), test_data(14, tokens * half));
        let ab: Vec<f32> = a.iter().zip(&b).map(|(p, q)| p + q).collect();
        let (mut x1, mut x2) = (x0.clone(), x0.clone());
        rope_apply(&mut x1, tokens, heads, d, &a);
        rope_apply(&mut x1, tokens, heads, d, &b);
        rope_apply(&mut x2, tokens, heads, d, &ab);
        for (p, q) in x1.iter().zip(&x2) {
            assert!((p - q).abs() < 1e-6, "{p} vs {q}");
        }
    }

    #[test]
    fn mrope_equal_components_is_plain_rope() {
        let (d, theta) = (128, 1e6);
        let pos: Vec<i32> = vec![0, 1, 2, 17, 1000, 32767];
        let angles = mrope_angles(&pos, &pos, &pos, d, theta, [16, 24, 24]);
        assert_eq!(angles.len(), pos.len() * 64);
        for (t, &p) in pos.iter().enumerate() {
            for j in 0..64 {
                let plain = (p as f64 * theta.powf(-((2 * j) as f64) / d as f64)) as f32;
                assert_eq!(angles[t * 64 + j], plain, "token {t} freq {j}");
            }
        }
    }

    #[test]
    fn mrope_sections_by_hand() {
        // One image token at (t, h, w) = (4, 6, 9): j < 16 uses 4, 16 ≤ j < 40 uses 6, else 9.
        let angles = mrope_angles(&[4], &[6], &[9], 128, 1e6, [16, 24, 24]);
        let f = |j: usize| 1e6f64.powf(-((2 * j) as f64) / 128.0);
        for (j, want_pos) in [(0, 4.0), (15, 4.0), (16, 6.0), (39, 6.0), (40, 9.0), (63, 9.0)] {
            assert_eq!(angles[j], (want_pos * f(j)) as f32, "freq {j}");
        }
        assert_eq!(angles[0], 4.0);
    }

    #[test]
    fn mrope_rotates_q_and_k_heads_only() {
        // 2 q heads, 1 kv head of 4: q and k rotated as rope_apply does, v untouched.
        let (tokens, hq, hkv, d) = (3, 2, 1, 4);
        let row = (hq + 2 * hkv) * d;
        let x0 = test_data(21, tokens * row);
        let (pt, ph, pw) = (vec![0, 5, 9], vec![1, 2, 3], vec![7, 0, 4]);
        let mut got = x0.clone();
        mrope(&mut got, tokens, hq, hkv, d, [&pt, &ph, &pw], 1e4, [1, 0, 1]);
        let angles = mrope_angles(&pt, &ph, &pw, d, 1e4, [1, 0, 1]);
        for t in 0..tokens {
            let mut want = x0[t * row..t * row + (hq + hkv) * d].to_vec();
            rope_apply(&mut want, 1, hq + hkv, d, &angles[t * 2..t * 2 + 2]);
            assert_eq!(&got[t * row..t * row + (hq + hkv) * d], &want[..], "token {t}");
            assert_eq!(
                &got[t * row + (hq + hkv) * d..(t + 1) * row],
                &x0[t * row + (hq + hkv) * d..(t + 1) * row]
            );
        }
        assert_ne!(got, x0);
    }

    #[test]
    fn vision_rope_rotates_q_and_k_only() {
        let (patches, heads, d) = (2, 2, 8);
        let row = 3 * heads * d;
        let x0 = test_data(22, patches * row);
        let angles = vision_rope_angles(&[[1, 2], [3, 0]], d, 1e4);
        let mut got = x0.clone();
        vision_rope(&mut got, patches, heads, d, &angles);
        for t in 0..patches {
            let mut want = x0[t * row..t * row + 2 * heads * d].to_vec();
            rope_apply(&mut want, 1, 2 * heads, d, &angles[t * 4..t * 4 + 4]);
            assert_eq!(&got[t * row..t * row + 2 * heads * d], &want[..]);
            assert_eq!(
                &got[t * row + 2 * heads * d..(t + 1) * row],
                &x0[t * row + 2 * heads * d..(t + 1) * row]
            );
        }
    }

    #[test]
    fn vision_angles_layout_head_dim_80() {
        let angles = vision_rope_angles(&[[0, 0], [3, 5]], 80, 1e4);
        assert_eq!(angles.len(), 2 * 40);
        assert!(angles[..40].iter().all(|&a| a == 0.0));
        let p = &angles[40..];
        for k in 0..20 {
            let f = 1e4f64.powf(-((2 * k) as f64) / 40.0);
            assert_eq!(p[k], (3.0 * f) as f32, "row angle {k}");
            assert_eq!(p[20 + k], (5.0 * f) as f32, "col angle {k}");
        }
        assert_eq!((p[0], p[20]), (3.0, 5.0));
        assert_eq!(p[1], (3.0 * 1e4f64.powf(-0.05)) as f32);
    }
}
