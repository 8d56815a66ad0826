//! The paged device allocator for activations.
//!
//! Device memory is handed out in fixed-size pages (default 2 MiB, the GPU's mapping granularity).
//! One virtual address range the size of the memory budget is reserved at start; physical pages
//! are mapped into it only when an allocation first reaches past the mapped prefix, and stay
//! mapped afterwards. So a forward's activations are carved from pages, given back after it, and
//! the next batch reuses the same pages: in steady state there is no `cudaMalloc` and no mapping.
//! Every allocation is a run of consecutive pages, so tensors are contiguous in device memory.
//!
//! The bookkeeping ([`PagePool`]) is pure and unit-tested on the CPU; [`DeviceAllocator`] puts it
//! on top of the CUDA virtual-memory API (or, on a GPU without it, one eager allocation).
//!
//! A forward takes its memory from an [`Arena`] ([`DeviceAllocator::arena`]): every tensor it
//! hands out borrows it, so none can outlive it, and dropping the arena gives every block back
//! (also on an early return with an error). [`Arena::nested`] opens an inner arena whose blocks go
//! back when it drops while the outer ones stay: the vision tower's activations are given back
//! before the decoder allocates its own. [`Arena::upload`] stages all host inputs of a forward
//! through one pinned buffer and copies them with one asynchronous copy (see [`super::pinned`]).
//!
//! Reuse within one stream is safe without waiting: a block freed after a kernel was enqueued and
//! handed to the next kernel on the same stream is only touched once the first has finished.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::marker::PhantomData;

use cudarc::driver::sys;

use super::pinned::{HostPod, Pinned};
use super::tensor::{BufferLayout, DView, Region, Tensor};
use super::{cuda_err, Gpu};
use crate::{Error, Result};

/// Default page size: the VMM granularity of NVIDIA datacenter GPUs.
pub const DEFAULT_PAGE_SIZE: u64 = 2 << 20;

/// Environment variable that sets the activation memory budget (e.g. `20GiB`, `512MiB`, bytes).
pub const BUDGET_ENV: &str = "JV4_MEM_BUDGET";

/// Parses a byte count: a plain number, or one with a `KiB`/`MiB`/`GiB`/`TiB` (powers of 1024)
/// or `KB`/`MB`/`GB`/`TB` (powers of 1000) suffix, e.g. `20GiB`, `1.5GB`.
pub fn parse_bytes(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult: f64 = match unit.trim() {
        "" | "B" => 1.0,
        "KiB" => 1024.0,
        "MiB" => 1024f64.powi(2),
        "GiB" => 1024f64.powi(3),
        "TiB" => 1024f64.powi(4),
        "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "TB" => 1e12,
        u => {
            return Err(Error::Input(format!(
                "memory size {s:?}: unknown unit {u:?} (use e.g. 20GiB, 512MiB)"
            )))
        }
    };
    match num.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok((v * mult) as u64),
        _ => Err(Error::Input(format!("memory size {s:?} is not a number with an optional unit"))),
    }
}

/// The activation budget: `flag` if given, else `$JV4_MEM_BUDGET`, else 90% of the device memory
/// free now (the weights should be loaded first).
pub fn resolve_budget(flag: Option<&str>, free_now: u64) -> Result<u64> {
    match flag.map(str::to_string).or_else(|| std::env::var(BUDGET_ENV).ok()) {
        Some(s) => parse_bytes(&s),
        None => Ok(free_now / 10 * 9),
    }
}

/// A run of consecutive pages `[start, start + len)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageRun {
    /// First page.
    pub start: usize,
    /// Number of pages (at least one).
    pub len: usize,
}

impl PageRun {
    /// One past the last page.
    pub fn end(self) -> usize {
        self.start + self.len
    }
}

/// Allocator statistics, in bytes unless named otherwise.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemStats {
    /// Hard limit.
    pub budget: u64,
    /// Page size.
    pub page_size: u64,
    /// Pages held by live allocations, times the page size.
    pub in_use: u64,
    /// Highest `in_use` since creation or the last [`PagePool::reset_peak`].
    pub peak: u64,
    /// Device memory actually taken (mapped pages).
    pub mapped: u64,
    /// Live allocations.
    pub live_allocations: usize,
    /// Times the mapped region had to grow (each one a driver call).
    pub grow_events: u64,
}

/// Page bookkeeping over a range of `capacity` pages: first fit at the lowest address, so that
/// allocations stay inside the mapped prefix whenever they can, and free runs coalesce.
#[derive(Debug)]
pub struct PagePool {
    page_size: u64,
    capacity: usize,
    mapped: usize,
    /// Free runs, start page -> length; never adjacent (coalesced on free).
    free: BTreeMap<usize, usize>,
    in_use_pages: usize,
    peak_pages: usize,
    live: usize,
    grow_events: u64,
}

impl PagePool {
    /// A pool of `capacity` pages of `page_size` bytes, none mapped yet.
    pub fn new(page_size: u64, capacity: usize) -> Self {
        let mut free = BTreeMap::new();
        if capacity > 0 {
            free.insert(0, capacity);
        }
        PagePool {
            page_size,
            capacity,
            mapped: 0,
            free,
            in_use_pages: 0,
            peak_pages: 0,
            live: 0,
            grow_events: 0,
        }
    }

    /// Pages needed for `bytes` (at least one, so that every block has a distinct address).
    pub fn pages_for(&self, bytes: u64) -> usize {
        bytes.div_ceil(self.page_size).max(1) as usize
    }

    /// Takes the lowest run of pages that holds `bytes`. Returns the run and, when the run reaches
    /// past the mapped prefix, the new mapped length the caller must back with memory before use.
    pub fn alloc(&mut self, bytes: u64) -> Result<(PageRun, Option<usize>)> {
        let len = self.pages_for(bytes);
        let found = self.free.iter().find(|(_, &l)| l >= len).map(|(&s, &l)| (s, l));
        let Some((start, run_len)) = found else {
            return Err(Error::OutOfMemory {
                requested: len as u64 * self.page_size,
                in_use: self.in_use_pages as u64 * self.page_size,
                budget: self.capacity as u64 * self.page_size,
            });
        };
        self.free.remove(&start);
        if run_len > len {
            self.free.insert(start + len, run_len - len);
        }
        self.in_use_pages += len;
        self.peak_pages = self.peak_pages.max(self.in_use_pages);
        self.live += 1;
        let run = PageRun { start, len };
        let grow = (run.end() > self.mapped).then_some(run.end());
        Ok((run, grow))
    }

    /// Records that pages `[0, mapped)` are now backed by device memory.
    pub fn set_mapped(&mut self, mapped: usize) {
        debug_assert!(mapped <= self.capacity);
        if mapped > self.mapped {
            self.grow_events += 1;
        }
        self.mapped = mapped;
    }

    /// Gives a run back; it merges with free neighbours.
    pub fn free(&mut self, run: PageRun) {
        let mut start = run.start;
        let mut len = run.len;
        if let Some((&ps, &pl)) = self.free.range(..start).next_back() {
            debug_assert!(ps + pl <= start, "double free of pages {run:?}");
            if ps + pl == start {
                self.free.remove(&ps);
                start = ps;
                len += pl;
            }
        }
        if let Some(nl) = self.free.remove(&(run.end())) {
            len += nl;
        }
        self.free.insert(start, len);
        self.in_use_pages -= run.len;
        self.live -= 1;
    }

    /// First page past every live allocation: pages from here to `mapped` could be unmapped.
    pub fn high_water(&self) -> usize {
        match self.free.iter().next_back() {
            Some((&s, &l)) if s + l == self.capacity => s,
            _ => self.capacity,
        }
    }

    /// Of the mapped chunks (`(first page, pages)`, in mapping order, laid end to end from page
    /// 0), the index from which every chunk lies wholly past the live allocations and can be
    /// unmapped: `chunks.len()` when none can.
    pub fn trim_from(&self, chunks: &[(usize, usize)]) -> usize {
        let hw = self.high_water();
        let mut i = chunks.len();
        while i > 0 && chunks[i - 1].0 >= hw {
            i -= 1;
        }
        i
    }

    /// Pages currently backed by memory.
    pub fn mapped(&self) -> usize {
        self.mapped
    }

    /// Restarts peak tracking from the current use.
    pub fn reset_peak(&mut self) {
        self.peak_pages = self.in_use_pages;
    }

    /// Current statistics.
    pub fn stats(&self) -> MemStats {
        MemStats {
            budget: self.capacity as u64 * self.page_size,
            page_size: self.page_size,
            in_use: self.in_use_pages as u64 * self.page_size,
            peak: self.peak_pages as u64 * self.page_size,
            mapped: self.mapped as u64 * self.page_size,
            live_allocations: self.live,
            grow_events: self.grow_events,
        }
    }
}

/// A block of device memory from the allocator. Not `Clone`: give it back with
/// [`DeviceAllocator::free`] exactly once.
#[derive(Debug)]
pub struct DeviceBlock {
    ptr: sys::CUdeviceptr,
    bytes: u64,
    run: PageRun,
}

impl DeviceBlock {
    /// Device address of the first byte (page aligned).
    pub fn ptr(&self) -> sys::CUdeviceptr {
        self.ptr
    }
    /// Bytes requested (the run may be larger).
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

/// How pages get their memory.
enum Backing {
    /// CUDA virtual memory: pages mapped on demand into a reserved range.
    Vmm { prop: sys::CUmemAllocationProp, chunks: Vec<(u64, u64, sys::CUmemGenericAllocationHandle)> },
    /// No VMM on this GPU: the whole budget allocated at once.
    Eager,
}

/// The paged allocator on a GPU. See the module documentation.
pub struct DeviceAllocator {
    pool: PagePool,
    base: sys::CUdeviceptr,
    backing: Backing,
    /// Where [`Arena::upload`] stages host inputs (allocated on first use).
    pinned: Pinned,
}

impl DeviceAllocator {
    /// An allocator with a hard budget of `budget` bytes (rounded down to whole pages) and pages of
    /// `page_size` bytes (rounded up to the GPU's mapping granularity).
    pub fn new(gpu: &Gpu, budget: u64, page_size: u64) -> Result<Self> {
        gpu.bind()?;
        let device = gpu.cu_device();
        // SAFETY: querying a device attribute of a valid device; writes one int.
        let vmm = unsafe {
            cudarc::driver::result::device::get_attribute(
                device,
                sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED,
            )
        }
        .map_err(|e| cuda_err("query VMM support", e))?;
        if vmm == 0 {
            let page_size = page_size.max(1);
            let pages = (budget / page_size) as usize;
            let bytes = pages as u64 * page_size;
            // SAFETY: plain device allocation; freed in Drop.
            let base = unsafe { cudarc::driver::result::malloc_sync(bytes.max(1) as usize) }
                .map_err(|e| cuda_err(&format!("allocate the {bytes}-byte budget"), e))?;
            let mut pool = PagePool::new(page_size, pages);
            pool.set_mapped(pages);
            return Ok(DeviceAllocator { pool, base, backing: Backing::Eager, pinned: Pinned::new() });
        }

        // SAFETY: a zeroed CUmemAllocationProp is the documented "no options" value; we set the
        // fields we need below.
        let mut prop: sys::CUmemAllocationProp = unsafe { std::mem::zeroed() };
        prop.type_ = sys::CUmemAllocationType::CU_MEM_ALLOCATION_TYPE_PINNED;
        prop.location.type_ = sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE;
        prop.location.id = device;
        let mut gran = 0usize;
        // SAFETY: prop is fully initialised; gran is a valid out pointer.
        unsafe {
            sys::cuMemGetAllocationGranularity(
                &mut gran,
                &prop,
                sys::CUmemAllocationGranularity_flags::CU_MEM_ALLOC_GRANULARITY_MINIMUM,
            )
        }
        .result()
        .map_err(|e| cuda_err("query the mapping granularity", e))?;
        let gran = gran.max(1) as u64;
        let page_size = page_size.max(1).div_ceil(gran) * gran;
        let pages = (budget / page_size) as usize;
        let mut base = 0;
        let reserve = (pages as u64 * page_size).max(page_size);
        // SAFETY: reserves address space only; released in Drop.
        unsafe { sys::cuMemAddressReserve(&mut base, reserve as usize, 0, 0, 0) }
            .result()
            .map_err(|e| cuda_err(&format!("reserve {reserve} bytes of address space"), e))?;
        Ok(DeviceAllocator {
            pool: PagePool::new(page_size, pages),
            base,
            backing: Backing::Vmm { prop, chunks: Vec::new() },
            pinned: Pinned::new(),
        })
    }

    /// A block of at least `bytes` bytes. [`Error::OutOfMemory`] when the budget cannot hold it.
    pub fn alloc(&mut self, bytes: u64) -> Result<DeviceBlock> {
        let (run, grow) = self.pool.alloc(bytes)?;
        if let Some(new_mapped) = grow {
            if let Err(e) = self.map_up_to(new_mapped) {
                self.pool.free(run);
                return Err(e);
            }
        }
        Ok(DeviceBlock { ptr: self.base + run.start as u64 * self.pool.page_size, bytes, run })
    }

    /// Gives a block back. Its pages stay mapped for the next allocation.
    pub fn free(&mut self, block: DeviceBlock) {
        self.pool.free(block.run);
    }

    /// An arena over this allocator: the memory of one forward (module documentation).
    pub fn arena(&mut self) -> Arena<'_> {
        Arena { source: Source::Root(RefCell::new(self)), blocks: RefCell::new(Vec::new()) }
    }

    /// Current statistics.
    pub fn stats(&self) -> MemStats {
        self.pool.stats()
    }

    /// Restarts peak tracking (e.g. per batch).
    pub fn reset_peak(&mut self) {
        self.pool.reset_peak();
    }

    /// Gives the device memory of the unused pages at the end of the mapping back to the driver
    /// (the allocator maps again on demand); returns the bytes released. Waits for the device
    /// first, so that no enqueued kernel still touches them. Without VMM (one eager allocation)
    /// there is nothing to give back.
    pub fn trim(&mut self) -> Result<u64> {
        let Backing::Vmm { chunks, .. } = &mut self.backing else {
            return Ok(0);
        };
        let page = self.pool.page_size;
        let pages: Vec<(usize, usize)> =
            chunks.iter().map(|&(off, size, _)| ((off / page) as usize, (size / page) as usize)).collect();
        let from = self.pool.trim_from(&pages);
        if from == chunks.len() {
            return Ok(0);
        }
        // SAFETY: a plain driver call on the current context (bound by the caller's thread).
        unsafe { sys::cuCtxSynchronize() }.result().map_err(|e| cuda_err("wait before trimming", e))?;
        let mut released = 0;
        for (offset, size, handle) in chunks.drain(from..) {
            // SAFETY: the chunk was mapped by map_up_to, holds no live allocation (it lies past the
            // high-water page) and no pending work (synchronised above); unmapped once, here.
            unsafe {
                sys::cuMemUnmap(self.base + offset, size as usize);
                sys::cuMemRelease(handle);
            }
            released += size;
        }
        self.pool.set_mapped(pages[from].0);
        Ok(released)
    }

    fn map_up_to(&mut self, new_mapped: usize) -> Result<()> {
        let Backing::Vmm { prop, chunks } = &mut self.backing else {
            unreachable!("eager backing is fully mapped");
        };
        let page = self.pool.page_size;
        let offset = self.pool.mapped() as u64 * page;
        let size = (new_mapped - self.pool.mapped()) as u64 * page;
        let oom = |what: &str, e| match e {
            sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY => Error::OutOfMemory {
                requested: size,
                in_use: self.pool.stats().in_use,
                budget: self.pool.stats().budget,
            },
            e => cuda_err(what, cudarc::driver::DriverError(e)),
        };
        let mut handle = 0;
        // SAFETY: prop is initialised; size is a multiple of the granularity.
        let r = unsafe { sys::cuMemCreate(&mut handle, size as usize, prop, 0) };
        if r != sys::CUresult::CUDA_SUCCESS {
            return Err(oom("create physical pages", r));
        }
        let addr = self.base + offset;
        // SAFETY: [addr, addr+size) lies inside our reservation and is not mapped yet.
        let r = unsafe { sys::cuMemMap(addr, size as usize, 0, handle, 0) };
        if r != sys::CUresult::CUDA_SUCCESS {
            // SAFETY: handle was created above and is not mapped.
            unsafe { sys::cuMemRelease(handle) };
            return Err(oom("map pages", r));
        }
        let access = sys::CUmemAccessDesc {
            location: prop.location,
            flags: sys::CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READWRITE,
        };
        // SAFETY: the range was just mapped; access is a valid descriptor for our device.
        let r = unsafe { sys::cuMemSetAccess(addr, size as usize, &access, 1) };
        if r != sys::CUresult::CUDA_SUCCESS {
            // SAFETY: undo the mapping made above.
            unsafe {
                sys::cuMemUnmap(addr, size as usize);
                sys::cuMemRelease(handle);
            }
            return Err(oom("enable access to pages", r));
        }
        chunks.push((offset, size, handle));
        self.pool.set_mapped(new_mapped);
        Ok(())
    }
}

impl Drop for DeviceAllocator {
    fn drop(&mut self) {
        let total = self.pool.stats().budget.max(self.pool.page_size);
        match &mut self.backing {
            Backing::Vmm { chunks, .. } => {
                for (offset, size, handle) in chunks.drain(..) {
                    // SAFETY: each chunk was mapped by map_up_to and is unmapped once here.
                    unsafe {
                        sys::cuMemUnmap(self.base + offset, size as usize);
                        sys::cuMemRelease(handle);
                    }
                }
                // SAFETY: the reservation made in new(), now with nothing mapped in it.
                unsafe { sys::cuMemAddressFree(self.base, total as usize) };
            }
            Backing::Eager => {
                // SAFETY: the allocation made in new(); no block outlives the allocator in use.
                unsafe {
                    let _ = cudarc::driver::result::free_sync(self.base);
                }
            }
        }
    }
}

/// Where an arena's blocks come from: the allocator itself, or an outer arena.
enum Source<'m> {
    Root(RefCell<&'m mut DeviceAllocator>),
    Nested(&'m dyn Blocks),
}

/// Block traffic between nested arenas and the allocator at the root.
trait Blocks {
    fn take(&self, bytes: u64) -> Result<DeviceBlock>;
    fn give(&self, block: DeviceBlock);
    fn with_root(&self, f: &mut dyn FnMut(&mut DeviceAllocator) -> Result<()>) -> Result<()>;
}

/// The memory of one forward (or of one part of it): tensors borrow the arena and every block goes
/// back to the allocator when it drops. See the module documentation.
pub struct Arena<'m> {
    source: Source<'m>,
    blocks: RefCell<Vec<DeviceBlock>>,
}

impl Blocks for Arena<'_> {
    fn take(&self, bytes: u64) -> Result<DeviceBlock> {
        match &self.source {
            Source::Root(mem) => mem.borrow_mut().alloc(bytes),
            Source::Nested(outer) => outer.take(bytes),
        }
    }
    fn give(&self, block: DeviceBlock) {
        match &self.source {
            Source::Root(mem) => mem.borrow_mut().free(block),
            Source::Nested(outer) => outer.give(block),
        }
    }
    fn with_root(&self, f: &mut dyn FnMut(&mut DeviceAllocator) -> Result<()>) -> Result<()> {
        match &self.source {
            Source::Root(mem) => f(&mut mem.borrow_mut()),
            Source::Nested(outer) => outer.with_root(f),
        }
    }
}

impl<'m> Arena<'m> {
    /// A tensor of shape `dims`, contents undefined. [`Error::OutOfMemory`] when the budget cannot
    /// hold it (the arena stays usable).
    pub fn alloc<T>(&self, dims: &[usize]) -> Result<Tensor<'_, T>> {
        let bytes = dims.iter().product::<usize>() * std::mem::size_of::<T>();
        let block = self.take(bytes as u64)?;
        let t = Tensor::new(block.ptr(), block.bytes(), dims);
        self.blocks.borrow_mut().push(block);
        Ok(t)
    }

    /// An inner arena: its blocks come from this one's allocator and go back when it drops,
    /// while this arena's stay.
    pub fn nested(&self) -> Arena<'_> {
        Arena { source: Source::Nested(self), blocks: RefCell::new(Vec::new()) }
    }

    /// Stages host data for the device: `write` fills the regions of `layout` in the pinned
    /// buffer, then one asynchronous copy moves all of it into one block of this arena. Does not
    /// wait for the copy (stream order makes it land before any later kernel reads it); waits only
    /// if the previous copy from the pinned buffer could still be running (see `cuda::pinned`).
    /// `write` must not allocate from the arena (the allocator is busy staging).
    pub fn upload(
        &self,
        gpu: &Gpu,
        layout: &BufferLayout,
        write: impl FnOnce(&mut StageWriter<'_>) -> Result<()>,
    ) -> Result<Staged<'_>> {
        let bytes = layout.bytes();
        let block = self.take(bytes as u64)?;
        let ptr = block.ptr();
        self.blocks.borrow_mut().push(block);
        let mut write = Some(write);
        self.with_root(&mut |mem| {
            let host = mem.pinned.writable(bytes)?;
            if let Some(write) = write.take() {
                write(&mut StageWriter { host })?;
            }
            // SAFETY: `ptr` is a block of at least `bytes` bytes held by this arena, which outlives
            // every kernel enqueued through its tensors (blocks are reused in stream order only).
            unsafe { mem.pinned.copy_to(gpu, ptr, bytes) }
        })?;
        Ok(Staged { ptr, bytes, _arena: PhantomData })
    }

    /// The allocator's statistics.
    pub fn stats(&self) -> MemStats {
        let mut s = MemStats::default();
        let _ = self.with_root(&mut |mem| {
            s = mem.stats();
            Ok(())
        });
        s
    }
}

impl Drop for Arena<'_> {
    fn drop(&mut self) {
        for block in std::mem::take(self.blocks.get_mut()) {
            self.give(block);
        }
    }
}

/// Writes host inputs into the pinned staging buffer, region by region (see [`Arena::upload`]).
pub struct StageWriter<'h> {
    host: &'h mut [u8],
}

impl StageWriter<'_> {
    /// The staging memory of `region`, to fill in place. Panics when the region lies outside the
    /// layout being staged (a region of another layout: a programming error).
    pub fn slice<T: HostPod>(&mut self, region: &Region<T>) -> &mut [T] {
        let (start, n) = (region.offset(), region.numel());
        let end = start + n * std::mem::size_of::<T>();
        assert!(end <= self.host.len(), "{region:?} outside a staging layout of {} bytes", self.host.len());
        let bytes = &mut self.host[start..end];
        assert_eq!(bytes.as_ptr() as usize % std::mem::align_of::<T>(), 0, "misaligned {region:?}");
        // SAFETY: the range is inside the buffer and aligned for T (checked), T accepts any bit
        // pattern (HostPod), and the slice borrows self mutably, so nothing else aliases it.
        unsafe { std::slice::from_raw_parts_mut(bytes.as_mut_ptr() as *mut T, n) }
    }

    /// Copies `data` into `region`; [`Error::Shape`] when the lengths differ.
    pub fn put<T: HostPod>(&mut self, region: &Region<T>, data: &[T]) -> Result<()> {
        if data.len() != region.numel() {
            return Err(Error::Shape {
                op: "upload",
                msg: format!("{} host elements into a tensor of {}", data.len(), region.numel()),
            });
        }
        self.slice(region).copy_from_slice(data);
        Ok(())
    }
}

/// Inputs staged on the device by [`Arena::upload`]: one block, read through the regions of the
/// layout it was staged with.
pub struct Staged<'a> {
    ptr: sys::CUdeviceptr,
    bytes: usize,
    _arena: PhantomData<&'a ()>,
}

impl<'a> Staged<'a> {
    /// The device address of the staged block (a captured graph checks that its inputs land
    /// where it reads them).
    pub fn ptr(&self) -> sys::CUdeviceptr {
        self.ptr
    }

    /// The device tensor of `region`. Panics when the region lies outside the staged layout (a
    /// region of another layout: a programming error).
    pub fn view<T>(&self, region: &Region<T>) -> DView<'a, T> {
        let end = region.offset() + region.numel() * std::mem::size_of::<T>();
        assert!(end <= self.bytes, "{region:?} outside staged inputs of {} bytes", self.bytes);
        // SAFETY: the range lies inside the staged block (checked), which the arena holds for 'a;
        // the copy that fills it is ordered before any kernel that reads the view.
        unsafe { DView::from_raw(self.ptr + region.offset() as u64, region.shape()) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_sizes_parse_and_bad_ones_say_why() {
        assert_eq!(parse_bytes("4096").unwrap(), 4096);
        assert_eq!(parse_bytes("20GiB").unwrap(), 20 << 30);
        assert_eq!(parse_bytes(" 512 MiB ").unwrap(), 512 << 20);
        assert_eq!(parse_bytes("1.5GB").unwrap(), 1_500_000_000);
        let e = parse_bytes("20GX").unwrap_err().to_string();
        assert!(e.contains("GX"), "{e}");
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("-1GiB").is_err());
        assert_eq!(resolve_budget(Some("1MiB"), 999).unwrap(), 1 << 20);
    }

    const P: u64 = 1 << 20;

    #[test]
    fn pages_round_up_and_zero_bytes_takes_one_page() {
        let pool = PagePool::new(P, 8);
        assert_eq!(pool.pages_for(0), 1);
        assert_eq!(pool.pages_for(1), 1);
        assert_eq!(pool.pages_for(P), 1);
        assert_eq!(pool.pages_for(P + 1), 2);
    }

    #[test]
    fn first_fit_grows_mapping_only_past_the_prefix() {
        let mut pool = PagePool::new(P, 16);
        let (a, g) = pool.alloc(3 * P).unwrap();
        assert_eq!((a, g), (PageRun { start: 0, len: 3 }, Some(3)));
        pool.set_mapped(3);
        let (b, g) = pool.alloc(P).unwrap();
        assert_eq!((b, g), (PageRun { start: 3, len: 1 }, Some(4)));
        pool.set_mapped(4);
        pool.free(a);
        // Fits in the freed hole: no growth.
        let (c, g) = pool.alloc(2 * P).unwrap();
        assert_eq!((c, g), (PageRun { start: 0, len: 2 }, None));
        assert_eq!(pool.stats().in_use, 3 * P);
        assert_eq!(pool.stats().peak, 4 * P);
        assert_eq!(pool.stats().live_allocations, 2);
        assert_eq!(pool.stats().grow_events, 2);
    }

    #[test]
    fn frees_coalesce_in_any_order() {
        for order in [[0, 1, 2], [2, 1, 0], [1, 0, 2], [0, 2, 1], [2, 0, 1], [1, 2, 0]] {
            let mut pool = PagePool::new(P, 6);
            let runs: Vec<_> = (0..3).map(|_| pool.alloc(2 * P).unwrap().0).collect();
            assert!(pool.alloc(1).is_err(), "pool should be full");
            for i in order {
                pool.free(runs[i]);
            }
            assert_eq!(pool.free.len(), 1, "order {order:?} left {:?}", pool.free);
            assert_eq!(pool.stats().in_use, 0);
            assert_eq!(pool.alloc(6 * P).unwrap().0, PageRun { start: 0, len: 6 });
        }
    }

    #[test]
    fn out_of_memory_is_typed_and_leaves_the_pool_intact() {
        let mut pool = PagePool::new(P, 4);
        let (a, _) = pool.alloc(3 * P).unwrap();
        match pool.alloc(2 * P) {
            Err(Error::OutOfMemory { requested, in_use, budget }) => {
                assert_eq!((requested, in_use, budget), (2 * P, 3 * P, 4 * P));
            }
            other => panic!("expected OutOfMemory, got {other:?}"),
        }
        assert_eq!(pool.stats().live_allocations, 1);
        pool.free(a);
        assert!(pool.alloc(4 * P).is_ok());
    }

    #[test]
    fn freeing_every_run_returns_everything_and_keeps_the_mapping() {
        // What dropping an arena does: every run it took goes back, in the order taken.
        let mut pool = PagePool::new(P, 8);
        let (a, _) = pool.alloc(3 * P).unwrap();
        pool.set_mapped(a.end());
        let (b, _) = pool.alloc(2 * P).unwrap();
        pool.set_mapped(5);
        pool.free(a);
        pool.free(b);
        assert_eq!(pool.stats().in_use, 0);
        assert_eq!(pool.stats().live_allocations, 0);
        assert_eq!(pool.mapped(), 5);
        assert_eq!(pool.alloc(8 * P).unwrap().0, PageRun { start: 0, len: 8 });
    }

    #[test]
    fn trim_releases_only_trailing_chunks_past_the_live_blocks() {
        let mut p = PagePool::new(1 << 20, 10);
        let mut chunks = Vec::new();
        let alloc = |p: &mut PagePool, chunks: &mut Vec<(usize, usize)>, pages: u64| {
            let (run, grow) = p.alloc(pages << 20).unwrap();
            if let Some(m) = grow {
                chunks.push((p.mapped(), m - p.mapped()));
                p.set_mapped(m);
            }
            run
        };
        let a = alloc(&mut p, &mut chunks, 2);
        let b = alloc(&mut p, &mut chunks, 3);
        let c = alloc(&mut p, &mut chunks, 1);
        assert_eq!(chunks, [(0, 2), (2, 3), (5, 1)]);
        assert_eq!(p.trim_from(&chunks), 3, "everything is live");
        p.free(b);
        assert_eq!(p.trim_from(&chunks), 3, "a hole below a live block is kept");
        p.free(c);
        assert_eq!(p.trim_from(&chunks), 1, "b's and c's chunks are past the high water");
        chunks.truncate(1);
        p.set_mapped(2);
        assert_eq!(p.stats().mapped, 2 << 20);
        // The next allocation past the trimmed mapping asks for memory again.
        let (d, grow) = p.alloc(3 << 20).unwrap();
        assert_eq!((d.start, grow), (2, Some(5)));
        p.free(d);
        p.free(a);
        assert_eq!(p.trim_from(&chunks), 0);
    }

    #[test]
    fn a_fragmented_pool_reports_oom_even_with_enough_total_free() {
        let mut pool = PagePool::new(P, 4);
        let r: Vec<_> = (0..4).map(|_| pool.alloc(P).unwrap().0).collect();
        pool.free(r[0]);
        pool.free(r[2]);
        assert!(matches!(pool.alloc(2 * P), Err(Error::OutOfMemory { .. })));
        pool.free(r[1]);
        assert_eq!(pool.alloc(3 * P).unwrap().0, PageRun { start: 0, len: 3 });
    }

    #[test]
    fn repeated_forward_cycles_do_not_grow() {
        // A forward-like pattern: per-layer temporaries freed inside, outputs freed at the end.
        let mut pool = PagePool::new(P, 64);
        let mut mapped_after_first = 0;
        for cycle in 0..100 {
            let hidden = pool.alloc(5 * P).unwrap();
            pool.set_mapped(pool.mapped().max(hidden.0.end()));
            for _layer in 0..4 {
                let t1 = pool.alloc(7 * P + 3).unwrap();
                pool.set_mapped(pool.mapped().max(t1.0.end()));
                let t2 = pool.alloc(11 * P).unwrap();
                pool.set_mapped(pool.mapped().max(t2.0.end()));
                pool.free(t1.0);
                let t3 = pool.alloc(2 * P).unwrap();
                pool.set_mapped(pool.mapped().max(t3.0.end()));
                pool.free(t2.0);
                pool.free(t3.0);
            }
            pool.free(hidden.0);
            if cycle == 0 {
                mapped_after_first = pool.mapped();
            }
            assert_eq!(pool.mapped(), mapped_after_first, "cycle {cycle} grew the mapping");
            assert_eq!(pool.stats().in_use, 0);
        }
        assert_eq!(pool.high_water(), 0);
    }

    #[test]
    fn random_alloc_free_keeps_invariants() {
        // Deterministic xorshift; checks no overlap and exact accounting against a shadow map.
        let mut s = 0x9E37_79B9_7F4A_7C15u64;
        let mut rnd = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        let mut pool = PagePool::new(P, 128);
        let mut live: Vec<PageRun> = Vec::new();
        let mut owner = [false; 128];
        for _ in 0..20_000 {
            if live.is_empty() || rnd() % 3 != 0 {
                let bytes = rnd() % (9 * P);
                if let Ok((run, _)) = pool.alloc(bytes) {
                    for (p, o) in owner.iter_mut().enumerate().take(run.end()).skip(run.start) {
                        assert!(!*o, "page {p} handed out twice");
                        *o = true;
                    }
                    live.push(run);
                }
            } else {
                let run = live.swap_remove((rnd() as usize) % live.len());
                owner[run.start..run.end()].fill(false);
                pool.free(run);
            }
            let used: usize = live.iter().map(|r| r.len).sum();
            assert_eq!(pool.stats().in_use, used as u64 * P);
            assert_eq!(pool.stats().live_allocations, live.len());
        }
    }
}
