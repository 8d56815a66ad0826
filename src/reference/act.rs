//! Elementwise activations: SiLU, SwiGLU (fused and split layouts), erf/erfc and the exact GELU.

/// `silu(x) = x · sigmoid(x)`.
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// SwiGLU over the fused `[gate | up]` layout: `gu` is `[tokens, 2·inter]`, the result
/// `[tokens, inter]` with `out[t, j] = silu(gu[t, j]) · gu[t, inter + j]`.
pub fn swiglu(gu: &[f32], tokens: usize, inter: usize) -> Vec<f32> {
    assert_eq!(gu.len(), tokens * 2 * inter);
    let mut out = Vec::with_capacity(tokens * inter);
    for row in gu.chunks_exact(2 * inter) {
        let (gate, up) = row.split_at(inter);
        out.extend(gate.iter().zip(up).map(|(&g, &u)| silu(g) * u));
    }
    out
}

/// SwiGLU over separate gate and up tensors of the same shape (the vision MLP, whose `gate` and
/// `up` projections are separate linears with biases): `out[i] = silu(gate[i]) · up[i]`,
/// computed in f64 and rounded once.
pub fn swiglu_split(gate: &[f32], up: &[f32]) -> Vec<f32> {
    assert_eq!(gate.len(), up.len(), "swiglu_split: gate and up differ in length");
    gate.iter()
        .zip(up)
        .map(|(&g, &u)| {
            let g = g as f64;
            (g / (1.0 + (-g).exp()) * u as f64) as f32
        })
        .collect()
}

/// Where [`erf`] and [`erfc`] switch from the power series to the continued fraction.
const ERF_SPLIT: f64 = 2.0;
const FRAC_1_SQRT_PI: f64 = 0.564_189_583_547_756_3; // 1/√π

/// `erf(x) = 2/√π ∫₀ˣ e^(−t²) dt`, to about 1e-15 relative.
///
/// For `|x| < 2` the all-positive series `erf(x) = 2/√π · e^(−x²) · Σₙ x·(2x²)ⁿ / (1·3·…·(2n+1))`
/// (no cancellation, at most ~31 terms); beyond, `1 − erfc(|x|)` with the sign of `x`.
pub fn erf(x: f64) -> f64 {
    if x.is_nan() {
        return f64::NAN;
    }
    let a = x.abs();
    if a < ERF_SPLIT {
        let (mut term, mut sum, mut n) = (a, a, 0.0);
        while term > 1e-17 * sum {
            term *= 2.0 * a * a / (2.0 * n + 3.0);
            sum += term;
            n += 1.0;
        }
        (2.0 * FRAC_1_SQRT_PI * (-a * a).exp() * sum).copysign(x)
    } else {
        (1.0 - erfc(a)).copysign(x)
    }
}

/// `erfc(x) = 1 − erf(x)`, to about 1e-15 relative, also far in the tail where `1 − erf` would
/// cancel to 0 (`erfc(10) ≈ 2.1e-45`).
///
/// For `x ≥ 2` the continued fraction `erfc(x) = e^(−x²)/√π · 1/(x + (1/2)/(x + (2/2)/(x + (3/2)/(x + …))))`
/// (modified Lentz, ≤ 60 terms); for `|x| < 2`, `1 − erf(x)`; for `x ≤ −2`, `2 − erfc(−x)`.
pub fn erfc(x: f64) -> f64 {
    if x.is_nan() {
        return f64::NAN;
    }
    if x < ERF_SPLIT {
        return if x > -ERF_SPLIT { 1.0 - erf(x) } else { 2.0 - erfc(-x) };
    }
    if x > 27.3 {
        return 0.0; // e^(−x²) underflows
    }
    // f = x + a₁/(x + a₂/(x + …)) with aₙ = n/2, by the modified Lentz method.
    let (mut f, mut c, mut d) = (x, x, 0.0);
    for n in 1..1000 {
        let a = n as f64 / 2.0;
        d = 1.0 / (x + a * d);
        c = x + a / c;
        let delta = c * d;
        f *= delta;
        if (delta - 1.0).abs() < 1e-16 {
            break;
        }
    }
    (-x * x).exp() * FRAC_1_SQRT_PI / f
}

/// Exact (erf) GELU, the merger's activation: `gelu(x) = 0.5·x·(1 + erf(x/√2)) = x·Φ(x)`.
/// Computed in f64 as `0.5·x·erfc(−x/√2)`, which is the same value but keeps full relative
/// accuracy for negative `x` (no cancellation in `1 + erf`), then rounded to f32 once.
pub fn gelu_erf(x: f32) -> f32 {
    let x = x as f64;
    (0.5 * x * erfc(-x * std::f64::consts::FRAC_1_SQRT_2)) as f32
}

/// [`gelu_erf`] on every element.
pub fn gelu(x: &[f32]) -> Vec<f32> {
    x.iter().map(|&v| gelu_erf(v)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn swiglu_by_hand() {
        let gu = [0.0, 1.0, 2.0, 3.0, -1.0, 4.0];
        // tokens 1, inter 3: gate [0,1,2], up [3,-1,4]
        let out = swiglu(&gu, 1, 3);
        assert_eq!(out[0], 0.0);
        assert!((out[1] - (-silu(1.0))).abs() < 1e-7);
        assert!((out[2] - 4.0 * 2.0 / (1.0 + (-2.0f32).exp())).abs() < 1e-6);
    }

    #[test]
    fn swiglu_split_by_hand_and_matches_fused() {
        let gate = [0.0, 1.0, 2.0, -3.0];
        let up = [3.0, -1.0, 4.0, 2.0];
        let out = swiglu_split(&gate, &up);
        assert_eq!(out[0], 0.0);
        let s1 = 1.0 / (1.0 + (-1.0f64).exp()); // silu(1) = sigmoid(1)
        assert_eq!(out[1], -s1 as f32);
        assert_eq!(out[2], (2.0 * 4.0 / (1.0 + (-2.0f64).exp())) as f32);
        assert_eq!(out[3], (-3.0 * 2.0 / (1.0 + 3.0f64.exp())) as f32);
        // Same as the fused [gate | up] layout, one token.
        let fused: Vec<f32> = gate.iter().chain(&up).copied().collect();
        for (a, b) in out.iter().zip(swiglu(&fused, 1, 4)) {
            assert!((a - b).abs() <= 1e-6 * a.abs().max(1.0));
        }
    }

    #[test]
    fn erf_and_erfc_known_values() {
        // (x, erf(x), erfc(x)) from CPython's math.erf / math.erfc.
        let known = [
            (0.1, 0.1124629160182849, 0.8875370839817152),
            (0.5, 0.5204998778130465, 0.4795001221869535),
            (1.0, 0.8427007929497149, 0.15729920705028513),
            (1.5, 0.9661051464753108, 0.033894853524689274),
            (2.0, 0.9953222650189527, 0.004677734981047265),
            (2.5, 0.999593047982555, 0.0004069520174449589),
            (3.0, 0.9999779095030014, 2.2090496998585438e-05),
            (4.0, 0.9999999845827421, 1.541725790028002e-08),
            (5.0, 0.9999999999984626, 1.5374597944280351e-12),
        ];
        for (x, e, c) in known {
            assert!((erf(x) - e).abs() <= 1e-12 * e, "erf({x}) = {} want {e}", erf(x));
            assert!((erf(-x) + e).abs() <= 1e-12 * e, "erf(-{x})");
            assert!((erfc(x) - c).abs() <= 1e-12 * c, "erfc({x}) = {} want {c}", erfc(x));
            assert!((erfc(-x) - (2.0 - c)).abs() <= 1e-12, "erfc(-{x})");
        }
        assert_eq!(erf(0.0), 0.0);
        assert_eq!(erfc(0.0), 1.0);
        assert_eq!(erf(f64::INFINITY), 1.0);
        assert_eq!(erf(f64::NEG_INFINITY), -1.0);
        assert_eq!(erfc(f64::INFINITY), 0.0);
        assert!(erf(f64::NAN).is_nan() && erfc(f64::NAN).is_nan());
        // Deep tail: erfc(10) = 2.088487583762545e-45 (Abramowitz & Stegun / mpmath).
        assert!((erfc(10.0) / 2.088487583762545e-45 - 1.0).abs() < 1e-12);
        // Continuity across the series / continued-fraction switch.
        let (lo, hi) = (ERF_SPLIT - 1e-12, ERF_SPLIT + 1e-12);
        assert!((erf(lo) - erf(hi)).abs() < 1e-13);
        assert!((erfc(lo) / erfc(hi) - 1.0).abs() < 1e-11);
    }

    #[test]
    fn gelu_erf_known_values() {
        // 0.5·x·(1 + erf(x/√2)) from CPython (f64), then rounded to f32 once.
        let known = [
            (0.0, 0.0),
            (1.0, 0.8413447460685429),
            (-1.0, -0.15865525393145707),
            (3.0, 2.99595030590511),
            (-3.0, -0.004049694094890287),
            (0.5, 0.34573123063700656),
            (-0.5, -0.15426876936299344),
            (-5.0, -1.4332578593959731e-06),
            (-10.0, -7.619853024160593e-23),
        ];
        for (x, g) in known {
            assert_eq!(gelu_erf(x as f32), g as f32, "gelu({x})");
        }
        assert_eq!(
            gelu(&[1.0, -1.0, 0.0]),
            vec![0.8413447460685429f64 as f32, -0.15865525393145707f64 as f32, 0.0]
        );
        // Large arguments: identity on the right, 0 (not NaN) on the left.
        assert_eq!(gelu_erf(100.0), 100.0);
        assert_eq!(gelu_erf(-100.0), 0.0);
    }
}
