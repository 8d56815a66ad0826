//! The pinned host buffer every forward stages its inputs through: page-locked memory, so that
//! one `cuMemcpyHtoDAsync` from it is a true asynchronous DMA and the forward never waits for it.
//!
//! Reuse rule: the host must not write the buffer while a copy from it may still be reading.
//! Each copy records an event; `Pinned::writable` waits for that event before handing the
//! memory out again. In steady state the previous forward's final download has already waited for
//! the stream, so the event is long complete and the wait costs nothing; after a forward that
//! failed before its download it is what keeps the next forward from overwriting a copy in flight.

use std::ffi::c_void;

use cudarc::driver::sys;

use super::{cuda_err, Gpu};
use crate::Result;

/// Types any bit pattern of which is a valid value: what may be written into (and viewed in)
/// staging memory.
pub trait HostPod: Copy + sealed::Sealed {}
mod sealed {
    pub trait Sealed {}
}
macro_rules! host_pod {
    ($($t:ty),*) => {$(impl sealed::Sealed for $t {} impl HostPod for $t {})*};
}
host_pod!(u8, u16, u32, i32, f32, half::bf16);

/// A growable page-locked host buffer with a guard event (module documentation).
pub(crate) struct Pinned {
    ptr: *mut u8,
    cap: usize,
    /// Recorded after each copy from the buffer; null until the first.
    event: sys::CUevent,
}

impl Pinned {
    pub(crate) fn new() -> Self {
        Pinned { ptr: std::ptr::null_mut(), cap: 0, event: std::ptr::null_mut() }
    }

    /// The first `bytes` bytes, once no copy may still read them (waits for the last copy's
    /// event; grows the buffer when it is too small). Zeroed when newly allocated.
    pub(crate) fn writable(&mut self, bytes: usize) -> Result<&mut [u8]> {
        if !self.event.is_null() {
            // SAFETY: the event was created by cuEventCreate and not destroyed.
            unsafe { sys::cuEventSynchronize(self.event) }
                .result()
                .map_err(|e| cuda_err("wait for the previous input copy", e))?;
        }
        if bytes > self.cap {
            self.release();
            // Round up to 1 MiB steps so that slightly larger batches do not reallocate.
            let cap = bytes.div_ceil(1 << 20) << 20;
            let mut p: *mut c_void = std::ptr::null_mut();
            // SAFETY: plain page-locked allocation in the current context; freed in release().
            unsafe { sys::cuMemHostAlloc(&mut p, cap, 0) }
                .result()
                .map_err(|e| cuda_err(&format!("allocate {cap} bytes of pinned host memory"), e))?;
            // SAFETY: p points to cap writable bytes just allocated.
            unsafe { std::ptr::write_bytes(p as *mut u8, 0, cap) };
            self.ptr = p as *mut u8;
            self.cap = cap;
        }
        if bytes == 0 {
            return Ok(&mut []);
        }
        // SAFETY: ptr holds cap >= bytes initialised bytes, no copy reads them (event waited), and
        // the returned borrow of self keeps any other access out.
        Ok(unsafe { std::slice::from_raw_parts_mut(self.ptr, bytes) })
    }

    /// Enqueues the copy of the first `bytes` bytes to `dst` on the GPU's stream and records the
    /// guard event after it. Does not wait.
    ///
    /// # Safety
    /// `dst` must point to at least `bytes` bytes of device memory that stay allocated until the
    /// copy has run (stream order: until later work on the stream may reuse them).
    pub(crate) unsafe fn copy_to(&mut self, gpu: &Gpu, dst: sys::CUdeviceptr, bytes: usize) -> Result<()> {
        assert!(bytes <= self.cap, "copy of {bytes} bytes from a pinned buffer of {}", self.cap);
        if bytes == 0 {
            return Ok(());
        }
        self.ensure_event()?;
        // SAFETY: the source is `bytes` bytes of our pinned buffer, which writable() will not hand
        // out again before the event recorded below has completed; dst is the caller's contract.
        unsafe {
            sys::cuMemcpyHtoDAsync_v2(dst, self.ptr as *const c_void, bytes, gpu.cu_stream())
                .result()
                .map_err(|e| cuda_err("copy the inputs to the device", e))?;
            sys::cuEventRecord(self.event, gpu.cu_stream())
                .result()
                .map_err(|e| cuda_err("record an event", e))
        }
    }

    /// Like [`Pinned::copy_to`], for `rows` rows of `row_bytes` bytes packed in the buffer, written
    /// `pitch` bytes apart from `dst` on (one 2-D copy; a plain one when the rows touch).
    ///
    /// # Safety
    /// `dst + i·pitch .. + row_bytes` must be device memory for every row i < `rows`, allocated
    /// until the copy has run (as for [`Pinned::copy_to`]).
    pub(crate) unsafe fn copy_rows_to(
        &mut self,
        gpu: &Gpu,
        dst: sys::CUdeviceptr,
        pitch: usize,
        row_bytes: usize,
        rows: usize,
    ) -> Result<()> {
        let bytes = row_bytes * rows;
        assert!(
            bytes <= self.cap && row_bytes <= pitch,
            "2-D copy of {rows} x {row_bytes} bytes, pitch {pitch}"
        );
        if bytes == 0 {
            return Ok(());
        }
        if pitch == row_bytes {
            // SAFETY: the rows touch: one range of `bytes` bytes from `dst`, the caller's contract.
            return unsafe { self.copy_to(gpu, dst, bytes) };
        }
        self.ensure_event()?;
        let m = sys::CUDA_MEMCPY2D {
            srcXInBytes: 0,
            srcY: 0,
            srcMemoryType: sys::CUmemorytype::CU_MEMORYTYPE_HOST,
            srcHost: self.ptr as *const c_void,
            srcDevice: 0,
            srcArray: std::ptr::null_mut(),
            srcPitch: row_bytes,
            dstXInBytes: 0,
            dstY: 0,
            dstMemoryType: sys::CUmemorytype::CU_MEMORYTYPE_DEVICE,
            dstHost: std::ptr::null_mut(),
            dstDevice: dst,
            dstArray: std::ptr::null_mut(),
            dstPitch: pitch,
            WidthInBytes: row_bytes,
            Height: rows,
        };
        // SAFETY: the source is `bytes` bytes of our pinned buffer, guarded by the event recorded
        // below (as in copy_to); the destination rows are the caller's contract.
        unsafe {
            sys::cuMemcpy2DAsync_v2(&m, gpu.cu_stream())
                .result()
                .map_err(|e| cuda_err("copy rows to the device", e))?;
            sys::cuEventRecord(self.event, gpu.cu_stream())
                .result()
                .map_err(|e| cuda_err("record an event", e))
        }
    }

    /// Creates the guard event on first use.
    fn ensure_event(&mut self) -> Result<()> {
        if self.event.is_null() {
            let mut ev = std::ptr::null_mut();
            // SAFETY: writes one event handle; destroyed in Drop.
            unsafe { sys::cuEventCreate(&mut ev, sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32) }
                .result()
                .map_err(|e| cuda_err("create the input-copy event", e))?;
            self.event = ev;
        }
        Ok(())
    }

    fn release(&mut self) {
        if !self.ptr.is_null() {
            // SAFETY: allocated by cuMemHostAlloc; writable() waited for the last copy from it.
            unsafe { sys::cuMemFreeHost(self.ptr as *mut c_void) };
            self.ptr = std::ptr::null_mut();
            self.cap = 0;
        }
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        if !self.event.is_null() {
            // SAFETY: our event; a copy still reading the buffer must finish before it is freed.
            unsafe {
                sys::cuEventSynchronize(self.event);
                sys::cuEventDestroy_v2(self.event);
            }
        }
        self.release();
    }
}
