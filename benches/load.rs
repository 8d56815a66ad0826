//! `jv4-bench load`: where the checkpoint load's time goes (issue 12, deliverable 6). Each part
//! of the path from the page cache to the GPU is timed alone over the model folder's shard files,
//! then together:
//!   - `read pageable`: positioned reads into ordinary memory, N threads (the page-cache copy);
//!   - `read pinned`: the same into page-locked buffers (what the staging fills);
//!   - `dma`: one pinned chunk copied to the device over and over (the PCIe side);
//!   - `staging`: `Staging::copy_in` over whole files (the loader's pipeline without its
//!     per-tensor steps);
//!   - `register`: the page-cache pages themselves page-locked (`cuMemHostRegister`, read-only,
//!     on a memory map that the host never touches) and copied by DMA, then unlocked; no host copy.
//!
//! Compare with `jv4 info`'s figure (the real load: per tensor, the folded LoRA assembly).
//! Make sure the files are in the page cache first (`cat … > /dev/null`).

use std::ffi::c_void;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use cudarc::driver::sys;
use jv4::cuda::{Gpu, Staging};
use jv4::{Error, Result};

#[derive(clap::Args)]
pub struct LoadOptions {
    /// A model folder: its *.safetensors files and those under adapters/ are read.
    #[arg(long)]
    model: PathBuf,
    /// Thread counts to try.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16")]
    threads: Vec<usize>,
    /// MiB per chunk (per read, per copy, per registered window).
    #[arg(long, default_value_t = 64)]
    chunk_mib: usize,
}

fn io(e: std::io::Error) -> Error {
    Error::Internal(format!("read: {e}"))
}

fn cu(what: &str, r: sys::CUresult) -> Result<()> {
    r.result().map_err(|e| Error::Internal(format!("{what}: {e:?}")))
}

/// The shard files of `dir` and `dir/adapters`, with their lengths.
fn shards(dir: &Path) -> Result<Vec<(PathBuf, usize)>> {
    let mut v = Vec::new();
    for d in [dir.to_path_buf(), dir.join("adapters")] {
        let Ok(rd) = std::fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "safetensors") {
                v.push((p.clone(), std::fs::metadata(&p).map_err(io)?.len() as usize));
            }
        }
    }
    v.sort();
    if v.is_empty() {
        return Err(Error::Input(format!("no .safetensors files in {}", dir.display())));
    }
    Ok(v)
}

/// (file index, offset, length) of every chunk of every file.
fn chunks(files: &[(PathBuf, usize)], chunk: usize) -> Vec<(usize, usize, usize)> {
    let mut v = Vec::new();
    for (i, (_, len)) in files.iter().enumerate() {
        let mut off = 0;
        while off < *len {
            let n = chunk.min(len - off);
            v.push((i, off, n));
            off += n;
        }
    }
    v
}

/// Runs `work(thread, item)` for every item on `threads` threads taking items in turn.
fn par(threads: usize, items: usize, work: &(dyn Fn(usize, usize) -> Result<()> + Sync)) -> Result<()> {
    let next = AtomicUsize::new(0);
    std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|t| {
                let next = &next;
                s.spawn(move || loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= items {
                        return Ok(());
                    }
                    work(t, i)?;
                })
            })
            .collect();
        hs.into_iter()
            .try_for_each(|h| h.join().unwrap_or_else(|_| Err(Error::Internal("thread panicked".into()))))
    })
}

/// A page-locked host buffer (cuMemHostAlloc), freed on drop.
struct HostPinned(*mut u8);
// SAFETY: plain host memory; each buffer is used by one thread at a time (see its users).
unsafe impl Send for HostPinned {}
// SAFETY: as above.
unsafe impl Sync for HostPinned {}
impl HostPinned {
    fn new(bytes: usize) -> Result<Self> {
        let mut p: *mut c_void = std::ptr::null_mut();
        // SAFETY: a plain page-locked allocation in the bound context; freed in Drop.
        cu("cuMemHostAlloc", unsafe { sys::cuMemHostAlloc(&mut p, bytes, 0) })?;
        // SAFETY: p holds `bytes` writable bytes; touched once so that no first-write cost is timed.
        unsafe { std::ptr::write_bytes(p as *mut u8, 1, bytes) };
        Ok(HostPinned(p as *mut u8))
    }
}
impl Drop for HostPinned {
    fn drop(&mut self) {
        // SAFETY: allocated by cuMemHostAlloc; no copy from it is in flight (every user synchronises).
        unsafe { sys::cuMemFreeHost(self.0 as *mut c_void) };
    }
}

pub fn run(o: &LoadOptions) -> Result<()> {
    let gpu = Gpu::new(0)?;
    gpu.bind()?;
    let files = shards(&o.model)?;
    let total: usize = files.iter().map(|f| f.1).sum();
    let chunk = o.chunk_mib.max(1) << 20;
    let items = chunks(&files, chunk);
    let handles: Vec<std::fs::File> =
        files.iter().map(|(p, _)| std::fs::File::open(p)).collect::<std::io::Result<_>>().map_err(io)?;
    let gb = total as f64 / 1e9;
    println!(
        "load bench: {} files, {gb:.2} GB, chunks of {} MiB ({} chunks), {}",
        files.len(),
        o.chunk_mib,
        items.len(),
        gpu.info().name
    );
    let max_file = files.iter().map(|f| f.1).max().unwrap_or(0);
    let mut dev: sys::CUdeviceptr = 0;
    // SAFETY: one device allocation, freed at the end of this function.
    cu("cuMemAlloc", unsafe { sys::cuMemAlloc_v2(&mut dev, max_file.max(chunk)) })?;
    let report = |what: &str, t: f64| println!("load bench: {what:<28} {:7.3} s  {:6.1} GB/s", t, gb / t);

    for &t in &o.threads {
        let bufs: Vec<std::sync::Mutex<Vec<u8>>> =
            (0..t).map(|_| std::sync::Mutex::new(vec![1u8; chunk])).collect();
        let t0 = Instant::now();
        par(t, items.len(), &|th, i| {
            let (f, off, n) = items[i];
            let mut b = bufs[th].lock().unwrap();
            handles[f].read_exact_at(&mut b[..n], off as u64).map_err(io)
        })?;
        report(&format!("read pageable, {t} threads"), t0.elapsed().as_secs_f64());
    }
    for &t in &o.threads {
        let bufs: Vec<HostPinned> = (0..t).map(|_| HostPinned::new(chunk)).collect::<Result<_>>()?;
        let t0 = Instant::now();
        par(t, items.len(), &|th, i| {
            let (f, off, n) = items[i];
            // SAFETY: buffer `th` is used only by thread `th`; n <= chunk bytes.
            let b = unsafe { std::slice::from_raw_parts_mut(bufs[th].0, n) };
            handles[f].read_exact_at(b, off as u64).map_err(io)
        })?;
        report(&format!("read pinned, {t} threads"), t0.elapsed().as_secs_f64());
    }
    {
        let b = HostPinned::new(chunk)?;
        let reps = items.len();
        let t0 = Instant::now();
        for i in 0..reps {
            let dst = dev + ((i * chunk) % max_file.max(chunk)).min(max_file.max(chunk) - chunk) as u64;
            // SAFETY: chunk bytes from our pinned buffer into our device allocation (in bounds).
            cu("cuMemcpyHtoDAsync", unsafe {
                sys::cuMemcpyHtoDAsync_v2(dst, b.0 as *const c_void, chunk, gpu.cu_stream())
            })?;
        }
        gpu.sync()?;
        let t = t0.elapsed().as_secs_f64();
        println!(
            "load bench: {:<28} {:7.3} s  {:6.1} GB/s",
            "dma (pinned chunk, repeated)",
            t,
            (reps * chunk) as f64 / 1e9 / t
        );
    }
    for &t in &o.threads {
        let mut st = Staging::new(chunk, t);
        let t0 = Instant::now();
        for (f, (_, len)) in files.iter().enumerate() {
            let h = &handles[f];
            // SAFETY: [dev, dev + len) lies in our allocation (len <= max_file), which outlives
            // the staging's copies (finish below).
            unsafe {
                st.copy_in(&gpu, dev, *len, &|off, part| h.read_exact_at(part, off as u64).map_err(io))?
            };
        }
        st.finish(&gpu)?;
        report(&format!("staging, {t} fill threads"), t0.elapsed().as_secs_f64());
    }
    // Registered page-cache pages: each thread locks a window of the map, copies it on its own
    // stream, waits, and unlocks it.
    let maps: Vec<memmap2::Mmap> = handles
        .iter()
        // SAFETY: read-only maps; the host never reads through them (only the DMA engine does, of
        // pages locked in memory), so a file truncated meanwhile cannot fault this process.
        .map(|h| unsafe { memmap2::Mmap::map(h) })
        .collect::<std::io::Result<_>>()
        .map_err(io)?;
    let mut ctx: sys::CUcontext = std::ptr::null_mut();
    // SAFETY: reads the context bound above (Gpu is not Sync: the threads bind the raw handle).
    cu("cuCtxGetCurrent", unsafe { sys::cuCtxGetCurrent(&mut ctx) })?;
    let ctx = ctx as usize;
    for &t in &o.threads {
        let streams: Vec<usize> = (0..t)
            .map(|_| {
                let mut s: sys::CUstream = std::ptr::null_mut();
                // SAFETY: creates one stream, destroyed below.
                cu("cuStreamCreate", unsafe { sys::cuStreamCreate(&mut s, 1) }).map(|_| s as usize)
            })
            .collect::<Result<_>>()?;
        let times: Vec<std::sync::Mutex<[f64; 3]>> =
            (0..t).map(|_| std::sync::Mutex::new([0.0; 3])).collect();
        let t0 = Instant::now();
        let r = par(t, items.len(), &|th, i| {
            // SAFETY: the context is alive (gpu outlives the scope).
            cu("cuCtxSetCurrent", unsafe { sys::cuCtxSetCurrent(ctx as sys::CUcontext) })?;
            let (f, off, n) = items[i];
            let p = maps[f].as_ptr().wrapping_add(off) as *mut c_void;
            let s = streams[th] as sys::CUstream;
            let a = Instant::now();
            // SAFETY: [p, p + n) lies inside map f (chunks cover the file), page-aligned at its
            // start (offsets are multiples of the chunk, the map is page-aligned); read-only.
            cu("cuMemHostRegister", unsafe {
                sys::cuMemHostRegister_v2(p, n, sys::CU_MEMHOSTREGISTER_READ_ONLY)
            })?;
            let b = Instant::now();
            // SAFETY: n bytes from the locked window into our device allocation (off + n <= len).
            cu("cuMemcpyHtoDAsync", unsafe { sys::cuMemcpyHtoDAsync_v2(dev + off as u64, p, n, s) })?;
            // SAFETY: our stream.
            cu("cuStreamSynchronize", unsafe { sys::cuStreamSynchronize(s) })?;
            let c = Instant::now();
            // SAFETY: registered above; its copy has finished.
            cu("cuMemHostUnregister", unsafe { sys::cuMemHostUnregister(p) })?;
            let d = Instant::now();
            let mut tm = times[th].lock().unwrap();
            tm[0] += (b - a).as_secs_f64();
            tm[1] += (c - b).as_secs_f64();
            tm[2] += (d - c).as_secs_f64();
            Ok(())
        });
        let el = t0.elapsed().as_secs_f64();
        for s in &streams {
            // SAFETY: created above; synchronised by its thread.
            unsafe { sys::cuStreamDestroy_v2(*s as sys::CUstream) };
        }
        match r {
            Ok(()) => {
                let sum = times.iter().fold([0.0; 3], |mut acc, m| {
                    let m = m.lock().unwrap();
                    (0..3).for_each(|k| acc[k] += m[k]);
                    acc
                });
                report(&format!("register, {t} threads"), el);
                println!(
                    "load bench:   thread-seconds: register {:.3}, copy {:.3}, unregister {:.3}",
                    sum[0], sum[1], sum[2]
                );
            }
            Err(e) => println!("load bench: register, {t} threads: FAILED: {e}"),
        }
    }
    gpu.sync()?;
    // SAFETY: allocated above; every copy into it has finished.
    unsafe { sys::cuMemFree_v2(dev) };
    Ok(())
}
