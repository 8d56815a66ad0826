//! Plain f32 CPU versions of every op the kernels implement. Slow and obvious on purpose: they
//! are the oracle that GPU tests and benchmarks compare against. Each function has the name of
//! its op (`kernels/<op>.cu`, `ops::<op>`).

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
}
