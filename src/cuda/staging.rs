//! Host-to-device streaming through pinned memory: two pinned buffers take turns, so that while
//! the DMA engine copies one chunk to the device, the host fills the other (for the checkpoint
//! load: positioned reads from the shard files, split over a few threads). With pageable memory
//! the driver would stage every copy itself, synchronously; here the reads and the copies overlap
//! and run at the slower of the two (the target is >= 15 GB/s from the page cache; PCIe 5 x16
//! gives ~50 GB/s, so the reads set the pace).

use cudarc::driver::sys;

use super::pinned::Pinned;
use super::Gpu;
use crate::Result;

/// Bytes per chunk: large enough that the per-copy overhead vanishes, small enough to keep two
/// in pinned memory without a care.
pub const CHUNK_BYTES: usize = 64 << 20;

/// Most threads that fill one chunk (the default is this or the machine's cores, the fewer): one
/// positioned read from the page cache runs at the copy speed of a single core (4.2 GB/s on the
/// H200 host), so a chunk is read in parts at once. Measured there (`jv4-bench load`, the
/// full-size checkpoint's shards, this pipeline alone): 8 threads 19.2 GB/s, 16 24.6.
pub const FILL_THREADS: usize = 16;

/// Two pinned buffers used in turn. See the module documentation.
pub struct Staging {
    bufs: [Pinned; 2],
    next: usize,
    chunk: usize,
    threads: usize,
    /// The fill threads, started on the first chunk that needs more than one and kept for the
    /// staging's life (a load makes hundreds of copies: threads spawned per chunk cost more than
    /// the reads of a small tensor). `None` also when the pool could not start: one thread fills.
    pool: Option<rayon::ThreadPool>,
}

/// `$JV4_LOAD_THREADS`: fill threads per chunk instead of [`FILL_THREADS`] (the cold-start
/// stage measures the load at several counts).
pub const LOAD_THREADS_ENV: &str = "JV4_LOAD_THREADS";

impl Default for Staging {
    /// [`CHUNK_BYTES`] per buffer, [`FILL_THREADS`] threads or the machine's cores, the fewer
    /// (or `$JV4_LOAD_THREADS`).
    fn default() -> Self {
        let threads = std::env::var(LOAD_THREADS_ENV).ok().and_then(|v| v.trim().parse().ok());
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Staging::new(CHUNK_BYTES, threads.unwrap_or(FILL_THREADS.min(cores)))
    }
}

impl Staging {
    /// Staging of `chunk` bytes per buffer (at least 1 MiB), filled by `threads` threads.
    pub fn new(chunk: usize, threads: usize) -> Self {
        Staging {
            bufs: [Pinned::new(), Pinned::new()],
            next: 0,
            chunk: chunk.max(1 << 20),
            threads: threads.max(1),
            pool: None,
        }
    }

    /// Copies `len` bytes to device address `dst`, chunk by chunk: `fill(offset, part)` writes the
    /// stream's bytes `offset..offset + part.len()` into `part` (called from several threads at
    /// once for the parts of one chunk). The copies are asynchronous on `gpu`'s stream; a buffer
    /// is refilled only after its previous copy has finished. Call [`Staging::finish`] before
    /// the memory at `dst` is used.
    ///
    /// # Safety
    /// `[dst, dst + len)` must be device memory that stays allocated until [`Staging::finish`]
    /// returns (or this staging is dropped, which also waits).
    pub unsafe fn copy_in(
        &mut self,
        gpu: &Gpu,
        dst: sys::CUdeviceptr,
        len: usize,
        fill: &(dyn Fn(usize, &mut [u8]) -> Result<()> + Sync),
    ) -> Result<()> {
        // SAFETY: `len` rows of one byte, one byte apart: [dst, dst + len), the caller's contract.
        unsafe { self.copy_in_rows(gpu, dst, 1, 1, len, fill) }
    }

    /// Like [`Staging::copy_in`], for a destination of `rows` rows of `row_bytes` bytes, `pitch`
    /// bytes apart from `dst` on (a block of columns of a wider matrix); the stream is the rows
    /// packed one after the other. Each chunk is whole rows (rows `pitch` apart that touch are one
    /// contiguous copy).
    ///
    /// # Safety
    /// `dst + i·pitch .. + row_bytes` must be device memory for every row i < `rows`, allocated
    /// until [`Staging::finish`] returns (or this staging is dropped).
    pub unsafe fn copy_in_rows(
        &mut self,
        gpu: &Gpu,
        dst: sys::CUdeviceptr,
        pitch: usize,
        row_bytes: usize,
        rows: usize,
        fill: &(dyn Fn(usize, &mut [u8]) -> Result<()> + Sync),
    ) -> Result<()> {
        if row_bytes == 0 {
            return Ok(());
        }
        let per = (self.chunk / row_bytes).max(1);
        let mut r = 0;
        while r < rows {
            let n = per.min(rows - r);
            if self.pool.is_none() && self.threads > 1 && n * row_bytes > MIN_PIECE_BYTES {
                self.pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(self.threads)
                    .thread_name(|i| format!("jv4-fill-{i}"))
                    .build()
                    .ok();
            }
            let b = &mut self.bufs[self.next];
            self.next ^= 1;
            // Waits for this buffer's previous copy; the other buffer's copy keeps running.
            let buf = b.writable(n * row_bytes)?;
            fill_parts(buf, r * row_bytes, self.pool.as_ref(), fill)?;
            // SAFETY: `buf` holds n filled rows; rows r..r + n of the destination are the
            // caller's contract.
            unsafe { b.copy_rows_to(gpu, dst + (r * pitch) as u64, pitch, row_bytes, n)? };
            r += n;
        }
        Ok(())
    }

    /// Waits until every copy has reached the device.
    pub fn finish(&mut self, gpu: &Gpu) -> Result<()> {
        gpu.sync()
    }
}

/// Bytes of the pieces a chunk is filled in, at most and at least: a piece is one positioned read
/// on one thread, so a chunk is cut into about four pieces per fill thread (a thread the host
/// preempts, the load's helpers running beside the fills, delays only its piece), but not below
/// the size where a read's own cost starts to show.
const PIECE_BYTES: usize = 2 << 20;
const MIN_PIECE_BYTES: usize = 256 << 10;

/// Fills `buf` (stream bytes from `offset` on) in pieces on `pool`'s threads (work-stealing:
/// each takes the next piece as it finishes one), or on this thread without a pool.
fn fill_parts(
    buf: &mut [u8],
    offset: usize,
    pool: Option<&rayon::ThreadPool>,
    fill: &(dyn Fn(usize, &mut [u8]) -> Result<()> + Sync),
) -> Result<()> {
    let Some(pool) = pool.filter(|p| p.current_num_threads() > 1 && buf.len() > MIN_PIECE_BYTES) else {
        return fill(offset, buf);
    };
    let piece = buf.len().div_ceil(4 * pool.current_num_threads()).clamp(MIN_PIECE_BYTES, PIECE_BYTES);
    use rayon::prelude::*;
    pool.install(|| {
        buf.par_chunks_mut(piece).enumerate().try_for_each(|(i, p)| {
            // A panicking fill (a bug) fails the load with an error instead of unwinding into
            // the host's thread through rayon.
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| fill(offset + i * piece, p)))
                .unwrap_or_else(|_| Err(crate::Error::Internal("a staging fill panicked".into())))
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_cover_the_chunk_exactly_once() {
        // Several pieces and a short last one, on fewer threads than pieces.
        let pool = rayon::ThreadPoolBuilder::new().num_threads(4).build().unwrap();
        let mut buf = vec![0u8; 5 * PIECE_BYTES + 5];
        let fill = |off: usize, p: &mut [u8]| {
            for (i, b) in p.iter_mut().enumerate() {
                *b = b.wrapping_add(((off + i) % 251) as u8 + 1);
            }
            Ok(())
        };
        fill_parts(&mut buf, 7, Some(&pool), &fill).unwrap();
        assert!(buf.iter().enumerate().all(|(i, &b)| b == ((7 + i) % 251) as u8 + 1));
        let failing = |off: usize, _: &mut [u8]| {
            if off > 7 {
                Err(crate::Error::Input("boom".into()))
            } else {
                Ok(())
            }
        };
        assert!(fill_parts(&mut buf, 7, Some(&pool), &failing).is_err());
        let panicking = |off: usize, _: &mut [u8]| -> Result<()> {
            assert!(off < 3 * PIECE_BYTES, "a fill bug");
            Ok(())
        };
        let e = fill_parts(&mut buf, 0, Some(&pool), &panicking).unwrap_err().to_string();
        assert!(e.contains("panicked"), "{e}");
        // Without a pool: one read of the whole chunk.
        let mut small = vec![0u8; 1000];
        fill_parts(&mut small, 3, None, &fill).unwrap();
        assert!(small.iter().enumerate().all(|(i, &b)| b == ((3 + i) % 251) as u8 + 1));
    }
}
