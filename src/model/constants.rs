//! Constants and host-side rotary tables shared by both forwards (the CPU oracle and the GPU
//! forward), so that a value fixed by the reference code exists once. The GPU forward computes its
//! angle tables here, not in `crate::reference`: the oracle stays independent of what it checks
//! (a test below compares the two).

/// The vision tower's RMSNorm epsilon (fixed in the reference code, not in the config).
pub const VISION_RMS_EPS: f32 = 1e-6;

/// The vision tower's rotary base (fixed in the reference code; the decoder's is
/// `text_config.rope_theta`).
pub const VISION_ROPE_THETA: f64 = 10000.0;

/// The vision MLP's width as the GPU prepares it: the config's (3420) padded with zero rows of
/// gate/up and zero columns of down to a multiple of 64, where cuBLAS runs K at full rate (K = 3420
/// ran at a third of its neighbours'). Exact: silu(0)·0 = 0, and a zero column adds nothing.
pub fn vision_mlp_width(intermediate_size: usize) -> usize {
    intermediate_size.next_multiple_of(64)
}

/// Rotary inverse frequencies `theta^(−2j/dim)` for `j < dim/2`, in f64.
pub fn inv_freq(theta: f64, dim: usize) -> Vec<f64> {
    (0..dim / 2).map(|j| theta.powf(-2.0 * j as f64 / dim as f64)).collect()
}

/// The decoder's M-RoPE table (docs/MODEL.md §7.2): [`inv_freq`] over `head_dim`, rounded to f32
/// (what `ops::mrope` takes).
pub fn text_inv_freq(theta: f64, head_dim: usize) -> Vec<f32> {
    inv_freq(theta, head_dim).into_iter().map(|f| f as f32).collect()
}

/// The vision tower's 2-D rotary angles, `[patches, head_dim/2]` (docs/MODEL.md §5.2): with
/// `f = inv_freq(VISION_ROPE_THETA, head_dim/2)` (`head_dim/4` values), a patch at `[row, col]`
/// gets `row·f` then `col·f`, computed in f64 and rounded to f32 once.
pub fn vision_rope_angles(rot_pos: &[[i32; 2]], head_dim: usize) -> Vec<f32> {
    let f = inv_freq(VISION_ROPE_THETA, head_dim / 2);
    let mut out = Vec::with_capacity(rot_pos.len() * 2 * f.len());
    for &[row, col] in rot_pos {
        out.extend(f.iter().map(|&f| (row as f64 * f) as f32));
        out.extend(f.iter().map(|&f| (col as f64 * f) as f32));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference;

    #[test]
    fn vision_angles_equal_the_oracle_bitwise() {
        // Positions up to the largest grids (a few hundred patches a side), head_dim 80 (jina-v4)
        // and a small one.
        let mut s = 0x2545_F491_4F6C_DD1Du64;
        let mut next = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % 512) as i32
        };
        let pos: Vec<[i32; 2]> = (0..1000).map(|_| [next(), next()]).collect();
        for hd in [80, 8] {
            let ours = vision_rope_angles(&pos, hd);
            let oracle = reference::vision_rope_angles(&pos, hd, VISION_ROPE_THETA);
            assert_eq!(ours.len(), oracle.len());
            assert!(ours.iter().zip(&oracle).all(|(a, b)| a.to_bits() == b.to_bits()), "head_dim {hd}");
            assert!(ours.iter().any(|&a| a != 0.0));
        }
    }

    #[test]
    fn text_table_is_the_decoder_frequencies() {
        let f = text_inv_freq(1e6, 128);
        assert_eq!(f.len(), 64);
        assert_eq!(f[0], 1.0);
        for (j, &v) in f.iter().enumerate() {
            assert_eq!(v, 1e6f64.powf(-2.0 * j as f64 / 128.0) as f32);
        }
        // The same table the M-RoPE op is tested with.
        assert_eq!(f, crate::ops::rope::inv_freq(1e6, 128));
    }
}
