//! Plain f32 CPU versions of every op the kernels implement. Slow and obvious on purpose: they
//! are the oracle that GPU tests and benchmarks compare against. Each op's function has the name
//! of its op (`kernels/<family>.cu`, `ops::<op>`, the GPU test `<op>_matches_reference`, the
//! bench case `<op>/…`): [`swiglu`], [`gelu`], [`linear`], [`embedding`], [`rmsnorm`], [`mrope`],
//! [`vision_rope`], [`mean_pool_l2`], [`l2_rows`], [`lora_mask`], [`gather_rows`],
//! [`scatter_rows_f32`], [`attention`]. The other functions are the helpers these are built from
//! or that the CPU model composes them with (angle tables, [`rope_apply`] on separate q and k,
//! [`swiglu_split`], [`lora`], [`mean_pool`], [`l2_normalize`], [`matryoshka`], …).
//!
//! Conventions shared by every function here:
//! - Tensors are plain row-major `f32` slices; results are fresh `Vec<f32>`, or are written in
//!   place where the op is in place ([`mrope`], [`vision_rope`], [`lora_mask`],
//!   [`scatter_rows_f32`], [`rope_apply`], [`add_rmsnorm`]'s residual).
//! - Every reduction (dot product, sum of squares, softmax denominator, pooling sum) accumulates
//!   in f64 and rounds to f32 once at the end, so the oracle's own rounding is negligible next to
//!   any GPU kernel's.
//! - Inconsistent sizes panic (`assert!`): this is a test oracle, not an API.
//! - Nothing here depends on the rest of the crate.
//!
//! Files, by topic (all private; everything is re-exported here): `act.rs` (SiLU, SwiGLU, erf,
//! GELU), `dense.rs` (linear layers, LoRA, the LoRA task mask), `norm.rs` (RMSNorm, L2 of a
//! vector), `rope.rs` (M-RoPE and the 2-D vision rotary), `attn.rs` (segmented attention, GQA,
//! causal or not), `pool.rs` (the heads: mean pooling with L2, per-row L2, Matryoshka),
//! `layout.rs` (embedding gather, merger reshape, row gather and scatter).

mod act;
mod attn;
mod dense;
mod layout;
mod norm;
mod pool;
mod rope;

pub use act::{erf, erfc, gelu, gelu_erf, silu, swiglu, swiglu_split};
pub use attn::{attention, attention_rows};
pub use dense::{linear, linear_f32, lora, lora_mask};
pub use layout::{embedding, gather_rows, merge_rows, scatter_rows_f32};
pub use norm::{add_rmsnorm, cosine, l2_normalize, rmsnorm};
pub use pool::{l2_rows, matryoshka, mean_pool, mean_pool_l2};
pub use rope::{mrope, mrope_angles, rope_apply, vision_rope, vision_rope_angles};

/// Runs `f(row_index, row)` for every row of `out` (rows of `row_len`), spread over the
/// available cores. Rows are dealt out in blocks of `block_rows`, round-robin, so work that grows
/// with the row index (causal attention) stays balanced across threads.
fn par_rows<F>(out: &mut [f32], row_len: usize, block_rows: usize, f: F)
where
    F: Fn(usize, &mut [f32]) + Sync,
{
    if row_len == 0 || out.is_empty() {
        return;
    }
    assert_eq!(out.len() % row_len, 0);
    let block_rows = block_rows.max(1);
    let blocks = out.len().div_ceil(row_len * block_rows);
    let threads = std::thread::available_parallelism().map_or(1, |p| p.get()).min(32).min(blocks);
    let mut per_thread: Vec<Vec<(usize, &mut [f32])>> = (0..threads).map(|_| Vec::new()).collect();
    for (b, chunk) in out.chunks_mut(row_len * block_rows).enumerate() {
        per_thread[b % threads].push((b * block_rows, chunk));
    }
    let f = &f;
    std::thread::scope(|s| {
        for work in per_thread {
            s.spawn(move || {
                for (first_row, chunk) in work {
                    for (i, row) in chunk.chunks_mut(row_len).enumerate() {
                        f(first_row + i, row);
                    }
                }
            });
        }
    });
}

/// `Σ a·b` in f64.
fn dot64(a: &[f32], b: &[f32]) -> f64 {
    debug_assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
}

/// Deterministic test values in [-1, 1) (SplitMix64), local so that the reference layer's tests
/// depend on nothing else in the crate either.
#[cfg(test)]
fn test_data(seed: u64, len: usize) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (0..len)
        .map(|_| {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            ((z >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn par_rows_visits_every_row_once() {
        let mut out = vec![0f32; 3 * 37];
        par_rows(&mut out, 3, 4, |r, row| {
            for (j, v) in row.iter_mut().enumerate() {
                *v += (r * 3 + j) as f32;
            }
        });
        assert!(out.iter().enumerate().all(|(i, &v)| v == i as f32));
    }
}
