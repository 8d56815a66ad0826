//! The host's C allocator under a long-running mixed load.
//!
//! glibc's malloc raises its mmap threshold each time a large block is freed (up to 32 MiB), so
//! after the first long text the per-request buffers of up to tens of MiB (token ids, outputs,
//! image pixels) come from its arenas instead of their own mappings, and memory freed there is
//! mostly kept. Measured in the H200 soak (`jv4-bench soak`, 80,000 mixed requests after warm-up):
//! host RSS +515 MiB, of which +447 MiB was free memory held in malloc's arenas and the bytes in use
//! stayed within their own noise. Fixing the threshold turns the adjustment off: blocks of at least
//! [`MMAP_THRESHOLD`] are mapped on allocation and returned to the system on free, and the RSS
//! stays flat.
//!
//! The library never changes its host's allocator; the `jv4` binaries (`embed`, `serve`) and
//! `jv4-bench` call [`fix_mmap_threshold`] at start. A host that links the library can do the same,
//! or set `MALLOC_MMAP_THRESHOLD_=1048576` in the environment (docs/RELIABILITY.md).

/// Bytes from which a block gets a mapping of its own (1 MiB: a 16-token query's buffers stay in
/// the arenas, a long text's or an image's are mapped and given back).
pub const MMAP_THRESHOLD: usize = 1 << 20;

/// Fixes glibc's mmap threshold at [`MMAP_THRESHOLD`] unless the environment already sets it
/// (`MALLOC_MMAP_THRESHOLD_` or a `GLIBC_TUNABLES` entry). Returns whether it set it; false where
/// the C library is not glibc.
pub fn fix_mmap_threshold() -> bool {
    let preset = std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_some()
        || std::env::var("GLIBC_TUNABLES").is_ok_and(|v| v.contains("mmap_threshold"));
    !preset && set_threshold(MMAP_THRESHOLD)
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn set_threshold(bytes: usize) -> bool {
    /// malloc.h: `M_MMAP_THRESHOLD`.
    const M_MMAP_THRESHOLD: std::ffi::c_int = -3;
    extern "C" {
        fn mallopt(param: std::ffi::c_int, value: std::ffi::c_int) -> std::ffi::c_int;
    }
    let value = std::ffi::c_int::try_from(bytes).unwrap_or(std::ffi::c_int::MAX);
    // SAFETY: mallopt takes two ints and only changes malloc's settings; it is thread-safe.
    unsafe { mallopt(M_MMAP_THRESHOLD, value) == 1 }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn set_threshold(_bytes: usize) -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threshold_is_set_on_glibc() {
        // The test binary's environment sets neither variable (CI does not).
        if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none()
            && std::env::var_os("GLIBC_TUNABLES").is_none()
        {
            assert_eq!(fix_mmap_threshold(), cfg!(all(target_os = "linux", target_env = "gnu")));
        }
        // Large blocks still work after it (mapped and unmapped).
        let v = vec![7u8; 3 * MMAP_THRESHOLD];
        assert_eq!(v.iter().map(|&b| b as usize).sum::<usize>(), 21 * MMAP_THRESHOLD);
    }
}
