//! Comparing GPU output with the CPU reference: every element, with a per-element tolerance the
//! caller derives from the dtype and the computation.

/// bf16 keeps 8 significant bits: rounding to nearest moves a value by at most 2^-8 of itself
/// (half an ulp at the bottom of a binade). This is exactly one rounding, no slack; tests that
/// round more than once add a term per extra rounding.
pub const BF16_REL: f32 = 1.0 / 256.0;

/// NaN in bf16: what outputs are poisoned with before a kernel runs, so an element the kernel
/// never wrote fails the comparison.
pub const BF16_NAN_BITS: u16 = 0x7FC0;

/// Checks `got[i]` against `want[i]` within `tol(i)`; NaN or infinity never passes. Reports the
/// worst element and how many failed.
pub fn check_close(
    what: &str,
    got: &[f32],
    want: &[f32],
    tol: impl Fn(usize) -> f32,
) -> Result<CloseStats, String> {
    if got.len() != want.len() {
        return Err(format!("{what}: {} values, expected {}", got.len(), want.len()));
    }
    let mut stats = CloseStats::default();
    let mut bad = 0usize;
    let mut first_bad = None;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs();
        let t = tol(i);
        // err > t is false for NaN, so NaN is rejected by the finiteness check on both sides.
        if !g.is_finite() || !err.is_finite() || err > t {
            bad += 1;
            first_bad.get_or_insert((i, g, w, t));
        }
        if err.is_finite() {
            stats.max_abs = stats.max_abs.max(err);
            if t > 0.0 {
                stats.max_tol_ratio = stats.max_tol_ratio.max(err / t);
            }
        }
    }
    if let Some((i, g, w, t)) = first_bad {
        return Err(format!(
            "{what}: {bad} of {} elements out of tolerance; first at {i}: got {g}, want {w}, tol {t}",
            got.len()
        ));
    }
    Ok(stats)
}

/// How close a comparison came: the largest error, and the largest error over its tolerance
/// (1.0 would be at the limit).
#[derive(Default, Debug, Clone, Copy)]
pub struct CloseStats {
    pub max_abs: f32,
    pub max_tol_ratio: f32,
}

/// First element where two bit patterns differ, as an error message.
pub fn check_bits(what: &str, got: &[u16], want: &[u16]) -> Result<(), String> {
    if got.len() != want.len() {
        return Err(format!("{what}: {} values, expected {}", got.len(), want.len()));
    }
    let bad = got.iter().zip(want).filter(|(g, w)| g != w).count();
    match got.iter().zip(want).position(|(g, w)| g != w) {
        None => Ok(()),
        Some(i) => Err(format!(
            "{what}: {bad} of {} elements differ; first at {i}: got {:#06x}, want {:#06x}",
            got.len(),
            got[i],
            want[i]
        )),
    }
}

/// `Ok` when `r` is a shape error of `op`.
pub fn expect_shape_error(op: &'static str, r: jv4::Result<()>) -> Result<(), String> {
    match r {
        Err(jv4::Error::Shape { op: got, .. }) if got == op => Ok(()),
        other => Err(format!("expected a {op} shape error, got {other:?}")),
    }
}
