//! Device tensors: row-major, contiguous, typed. [`Tensor`] lives in an [`super::alloc::Arena`]
//! and borrows it (what the forward uses); [`DTensor`] owns a block from the
//! [`super::alloc::DeviceAllocator`] that its user gives back explicitly (op tests and
//! benchmarks); [`DView`] / [`DViewMut`] are borrowed views that ops take, so that the borrow
//! checker keeps a block alive (and unfreed) while a view of it is in use.

use std::marker::PhantomData;

use cudarc::driver::sys::CUdeviceptr;

use super::alloc::DeviceBlock;

/// Most dimensions a tensor may have.
pub const MAX_DIMS: usize = 5;

/// A shape of up to [`MAX_DIMS`] dimensions, stored inline (views are `Copy`, no allocation).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    dims: [usize; MAX_DIMS],
    ndim: u8,
}

impl Shape {
    /// A shape from its dimensions. Panics on more than [`MAX_DIMS`]: a programming error.
    pub fn new(dims: &[usize]) -> Self {
        assert!(dims.len() <= MAX_DIMS, "tensor with {} dims", dims.len());
        let mut d = [0; MAX_DIMS];
        d[..dims.len()].copy_from_slice(dims);
        Shape { dims: d, ndim: dims.len() as u8 }
    }
    /// The dimensions.
    pub fn dims(&self) -> &[usize] {
        &self.dims[..self.ndim as usize]
    }
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.dims().iter().product()
    }
}

impl std::fmt::Debug for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.dims())
    }
}

/// A tensor in device memory that owns its block. Give it back with
/// [`super::alloc::DeviceAllocator::free`] via [`DTensor::into_block`].
#[derive(Debug)]
pub struct DTensor<T> {
    block: DeviceBlock,
    shape: Shape,
    _t: PhantomData<T>,
}

impl<T> DTensor<T> {
    /// Wraps a block that holds at least `shape.numel()` elements of `T`.
    pub fn from_block(block: DeviceBlock, dims: &[usize]) -> Self {
        let shape = Shape::new(dims);
        assert!(
            block.bytes() >= (shape.numel() * std::mem::size_of::<T>()) as u64,
            "block of {} bytes too small for {:?}",
            block.bytes(),
            shape
        );
        DTensor { block, shape, _t: PhantomData }
    }
    /// The block, to give back to the allocator.
    pub fn into_block(self) -> DeviceBlock {
        self.block
    }
    /// Shape.
    pub fn shape(&self) -> &[usize] {
        self.shape.dims()
    }
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.numel()
    }
    /// A read-only view.
    pub fn view(&self) -> DView<'_, T> {
        DView { ptr: self.block.ptr(), shape: self.shape, _t: PhantomData }
    }
    /// A writable view.
    pub fn view_mut(&mut self) -> DViewMut<'_, T> {
        DViewMut { ptr: self.block.ptr(), shape: self.shape, _t: PhantomData }
    }
    /// A writable view of the first `numel(dims)` elements with another shape: one scratch
    /// buffer serves several widths. Panics if the block cannot hold them (a programming error).
    pub fn view_mut_as(&mut self, dims: &[usize]) -> DViewMut<'_, T> {
        let shape = Shape::new(dims);
        assert!(
            (shape.numel() * std::mem::size_of::<T>()) as u64 <= self.block.bytes(),
            "view {shape:?} larger than its block ({} bytes)",
            self.block.bytes()
        );
        DViewMut { ptr: self.block.ptr(), shape, _t: PhantomData }
    }
}

/// A tensor in an [`super::alloc::Arena`]: it borrows the arena, so it cannot outlive the memory,
/// which goes back when the arena drops.
#[derive(Debug)]
pub struct Tensor<'a, T> {
    ptr: CUdeviceptr,
    bytes: u64,
    shape: Shape,
    _t: PhantomData<(&'a (), T)>,
}

impl<T> Tensor<'_, T> {
    /// A tensor over `bytes` bytes at `ptr` (a block its arena holds).
    pub(crate) fn new(ptr: CUdeviceptr, bytes: u64, dims: &[usize]) -> Self {
        let shape = Shape::new(dims);
        assert!(bytes >= (shape.numel() * std::mem::size_of::<T>()) as u64, "block too small for {shape:?}");
        Tensor { ptr, bytes, shape, _t: PhantomData }
    }
    /// Shape.
    pub fn shape(&self) -> &[usize] {
        self.shape.dims()
    }
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.numel()
    }
    /// A read-only view.
    pub fn view(&self) -> DView<'_, T> {
        DView { ptr: self.ptr, shape: self.shape, _t: PhantomData }
    }
    /// A writable view.
    pub fn view_mut(&mut self) -> DViewMut<'_, T> {
        DViewMut { ptr: self.ptr, shape: self.shape, _t: PhantomData }
    }
    /// A writable view of the first `numel(dims)` elements with another shape: one scratch
    /// buffer serves several widths. Panics if the block cannot hold them (a programming error).
    pub fn view_mut_as(&mut self, dims: &[usize]) -> DViewMut<'_, T> {
        let shape = Shape::new(dims);
        assert!(
            (shape.numel() * std::mem::size_of::<T>()) as u64 <= self.bytes,
            "view {shape:?} larger than its block ({} bytes)",
            self.bytes
        );
        DViewMut { ptr: self.ptr, shape, _t: PhantomData }
    }
}

/// A read-only view of device memory holding `shape.numel()` elements of `T`.
#[derive(Clone, Copy, Debug)]
pub struct DView<'a, T> {
    ptr: CUdeviceptr,
    shape: Shape,
    _t: PhantomData<&'a T>,
}

/// A writable view of device memory.
#[derive(Debug)]
pub struct DViewMut<'a, T> {
    ptr: CUdeviceptr,
    shape: Shape,
    _t: PhantomData<&'a mut T>,
}

macro_rules! view_common {
    ($t:ident) => {
        impl<'a, T> $t<'a, T> {
            /// Device address of element 0.
            pub fn ptr(&self) -> CUdeviceptr {
                self.ptr
            }
            /// Shape.
            pub fn shape(&self) -> &[usize] {
                self.shape.dims()
            }
            /// Number of elements.
            pub fn numel(&self) -> usize {
                self.shape.numel()
            }
            /// Size in bytes.
            pub fn nbytes(&self) -> usize {
                self.numel() * std::mem::size_of::<T>()
            }
        }
    };
}
view_common!(DView);
view_common!(DViewMut);

/// Rows `r` of a 2-D (or higher) shape: the byte offset of the first row and the new shape.
/// Panics when `r` is not inside the leading dimension (a programming error).
fn rows_of(shape: &Shape, elem: usize, r: &std::ops::Range<usize>) -> (u64, Shape) {
    let dims = shape.dims();
    assert!(
        !dims.is_empty() && r.start <= r.end && r.end <= dims[0],
        "rows {r:?} of a view of shape {dims:?}"
    );
    let row: usize = dims[1..].iter().product();
    let mut d = [0usize; MAX_DIMS];
    d[..dims.len()].copy_from_slice(dims);
    d[0] = r.end - r.start;
    ((r.start * row * elem) as u64, Shape::new(&d[..dims.len()]))
}

impl<'a, T> DView<'a, T> {
    /// A view of raw device memory.
    ///
    /// # Safety
    /// `ptr` must point to at least `numel(dims)` initialised elements of `T` that stay allocated
    /// (and are not written through another view) for `'a`.
    pub unsafe fn from_raw(ptr: CUdeviceptr, dims: &[usize]) -> Self {
        DView { ptr, shape: Shape::new(dims), _t: PhantomData }
    }
    /// The same memory with another shape of equal element count.
    pub fn reshape(self, dims: &[usize]) -> Self {
        let shape = Shape::new(dims);
        assert_eq!(shape.numel(), self.numel(), "reshape {:?} -> {:?}", self.shape, shape);
        DView { shape, ..self }
    }
    /// Rows `r` of the leading dimension (contiguous, so still a plain view).
    pub fn rows(&self, r: std::ops::Range<usize>) -> DView<'a, T> {
        let (off, shape) = rows_of(&self.shape, std::mem::size_of::<T>(), &r);
        DView { ptr: self.ptr + off, shape, _t: PhantomData }
    }
}

impl<'a, T> DViewMut<'a, T> {
    /// A writable view of raw device memory.
    ///
    /// # Safety
    /// `ptr` must point to at least `numel(dims)` elements of `T` that stay allocated for `'a`
    /// and are accessed through no other view meanwhile.
    pub unsafe fn from_raw(ptr: CUdeviceptr, dims: &[usize]) -> Self {
        DViewMut { ptr, shape: Shape::new(dims), _t: PhantomData }
    }
    /// The same memory with another shape of equal element count.
    pub fn reshape(self, dims: &[usize]) -> Self {
        let shape = Shape::new(dims);
        assert_eq!(shape.numel(), self.numel(), "reshape {:?} -> {:?}", self.shape, shape);
        DViewMut { shape, ..self }
    }
    /// Reborrows as read-only.
    pub fn as_view(&self) -> DView<'_, T> {
        DView { ptr: self.ptr, shape: self.shape, _t: PhantomData }
    }
    /// Rows `r` of the leading dimension, writable (reborrows `self`).
    pub fn rows_mut(&mut self, r: std::ops::Range<usize>) -> DViewMut<'_, T> {
        let (off, shape) = rows_of(&self.shape, std::mem::size_of::<T>(), &r);
        DViewMut { ptr: self.ptr + off, shape, _t: PhantomData }
    }
}

/// Where a tensor of `T` sits in a [`DeviceBuffer`]: byte offset and shape, planned with a
/// [`BufferLayout`]. Read through [`DeviceBuffer::at`]; written with [`DeviceBuffer::fill`].
pub struct Region<T> {
    offset: usize,
    shape: Shape,
    _t: PhantomData<T>,
}

impl<T> Clone for Region<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Region<T> {}

impl<T> std::fmt::Debug for Region<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Region {{ offset: {}, shape: {:?} }}", self.offset, self.shape)
    }
}

impl<T> Region<T> {
    /// Shape.
    pub fn shape(&self) -> &[usize] {
        self.shape.dims()
    }
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.numel()
    }
    /// Byte offset in its buffer.
    pub fn offset(&self) -> usize {
        self.offset
    }
    fn end(&self) -> usize {
        self.offset + self.numel() * std::mem::size_of::<T>()
    }
}

/// Plans tensors one after another in one buffer, each starting on an `align`-byte boundary.
#[derive(Clone, Debug)]
pub struct BufferLayout {
    bytes: usize,
    align: usize,
    regions: usize,
}

impl BufferLayout {
    /// An empty layout; `align` must be a multiple of every element type's alignment.
    pub fn new(align: usize) -> Self {
        BufferLayout { bytes: 0, align: align.max(16), regions: 0 }
    }
    /// Places a tensor of shape `dims` after the others.
    pub fn push<T>(&mut self, dims: &[usize]) -> Region<T> {
        let r = Region { offset: self.bytes, shape: Shape::new(dims), _t: PhantomData };
        self.bytes = r.end().div_ceil(self.align) * self.align;
        self.regions += 1;
        r
    }
    /// Bytes the buffer needs.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
    /// Regions placed.
    pub fn len(&self) -> usize {
        self.regions
    }
    /// Whether no region was placed.
    pub fn is_empty(&self) -> bool {
        self.regions == 0
    }
}

/// A plain device allocation outside the paged allocator, for data that lives as long as the
/// model (the weights): one `cuMemAlloc`, freed on drop.
pub struct DeviceBuffer {
    ptr: CUdeviceptr,
    bytes: usize,
}

impl DeviceBuffer {
    /// Allocates `bytes` bytes; a refusal by the driver is [`crate::Error::OutOfMemory`].
    pub fn new(gpu: &super::Gpu, bytes: usize) -> crate::Result<Self> {
        gpu.bind()?;
        // SAFETY: plain allocation; freed in Drop.
        match unsafe { cudarc::driver::result::malloc_sync(bytes.max(1)) } {
            Ok(ptr) => Ok(DeviceBuffer { ptr, bytes }),
            Err(e) if e.0 == cudarc::driver::sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY => {
                Err(crate::Error::OutOfMemory { requested: bytes as u64, in_use: 0, budget: 0 })
            }
            Err(e) => Err(super::cuda_err(&format!("allocate {bytes} bytes"), e)),
        }
    }

    /// Size in bytes.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Copies `src` to byte offset `offset` (waits for the copy).
    pub fn upload_at<T: Copy>(&mut self, gpu: &super::Gpu, offset: usize, src: &[T]) -> crate::Result<()> {
        let len = std::mem::size_of_val(src);
        if offset.checked_add(len).is_none_or(|end| end > self.bytes) {
            return Err(crate::Error::Shape {
                op: "upload",
                msg: format!("{len} bytes at offset {offset} into a buffer of {}", self.bytes),
            });
        }
        // SAFETY: the range [offset, offset + len) lies inside the allocation (checked).
        unsafe { cudarc::driver::result::memcpy_htod_async(self.ptr + offset as u64, src, gpu.cu_stream()) }
            .map_err(|e| super::cuda_err("copy to the device", e))?;
        gpu.sync()
    }

    /// The tensor at `region`. Panics when the region lies outside this buffer: a region planned
    /// for another (larger) buffer, a programming error.
    pub fn at<T>(&self, region: &Region<T>) -> DView<'_, T> {
        assert!(
            region.end() <= self.bytes && region.offset % std::mem::align_of::<T>() == 0,
            "{region:?} outside a buffer of {} bytes",
            self.bytes
        );
        DView { ptr: self.ptr + region.offset as u64, shape: region.shape, _t: PhantomData }
    }

    /// The tensor at `region`, writable (for the few in-place steps of weight preparation).
    pub fn at_mut<T>(&mut self, region: &Region<T>) -> DViewMut<'_, T> {
        let v = self.at(region);
        DViewMut { ptr: v.ptr, shape: v.shape, _t: PhantomData }
    }

    /// Copies region `src` of this buffer to region `dst` (same shape) on the GPU's stream,
    /// asynchronously: stream order puts it before later kernels.
    pub fn copy_region<T>(
        &mut self,
        gpu: &super::Gpu,
        src: &Region<T>,
        dst: &Region<T>,
    ) -> crate::Result<()> {
        if src.shape() != dst.shape() {
            return Err(crate::Error::Shape {
                op: "copy",
                msg: format!("{src:?} into {dst:?}: the shapes differ"),
            });
        }
        let (s, d) = (self.at(src).ptr, self.at(dst).ptr); // both checked inside the buffer
        let len = src.numel() * std::mem::size_of::<T>();
        if src.offset < dst.end() && dst.offset < src.end() {
            return Err(crate::Error::Shape { op: "copy", msg: format!("{src:?} overlaps {dst:?}") });
        }
        // SAFETY: both ranges lie inside this allocation (checked by `at`) and do not overlap;
        // `&mut self` keeps the buffer alive and unaliased while the copy is enqueued.
        unsafe { cudarc::driver::result::memcpy_dtod_async(d, s, len, gpu.cu_stream()) }
            .map_err(|e| super::cuda_err("copy within the device", e))
    }

    /// Streams `len` bytes into `region`, from byte `offset` of it on, through `staging`:
    /// `fill(i, part)` writes the stream's bytes `i..i + part.len()`. The copies are
    /// asynchronous: call [`Staging::finish`](super::Staging::finish) before using the region.
    pub fn stream_in<T>(
        &mut self,
        gpu: &super::Gpu,
        staging: &mut super::Staging,
        region: &Region<T>,
        offset: usize,
        len: usize,
        fill: &(dyn Fn(usize, &mut [u8]) -> crate::Result<()> + Sync),
    ) -> crate::Result<()> {
        let region_bytes = region.numel() * std::mem::size_of::<T>();
        if offset.checked_add(len).is_none_or(|end| end > region_bytes) || region.end() > self.bytes {
            return Err(crate::Error::Shape {
                op: "upload",
                msg: format!(
                    "{len} bytes at offset {offset} into {region:?} of a {}-byte buffer",
                    self.bytes
                ),
            });
        }
        let dst = self.ptr + (region.offset + offset) as u64;
        // SAFETY: [dst, dst + len) lies inside this allocation (checked above), which `&mut self`
        // keeps alive; the caller finishes the staging before the buffer is used or dropped
        // (dropping the staging also waits for its copies).
        unsafe { staging.copy_in(gpu, dst, len, fill) }
    }

    /// Streams a block of the 2-D `region` `[n, ld]` through `staging`: rows `row..row + rows`,
    /// columns `col..col + width`; `fill(i, part)` writes the block's bytes `i..i + part.len()`,
    /// its rows packed one after the other. Asynchronous, as [`DeviceBuffer::stream_in`].
    #[allow(clippy::too_many_arguments)]
    pub fn stream_in_block<T>(
        &mut self,
        gpu: &super::Gpu,
        staging: &mut super::Staging,
        region: &Region<T>,
        (row, rows): (usize, usize),
        (col, width): (usize, usize),
        fill: &(dyn Fn(usize, &mut [u8]) -> crate::Result<()> + Sync),
    ) -> crate::Result<()> {
        let fits = match region.shape() {
            &[n, ld] => {
                row.checked_add(rows).is_some_and(|e| e <= n)
                    && col.checked_add(width).is_some_and(|e| e <= ld)
            }
            _ => false,
        };
        if !fits || region.end() > self.bytes {
            return Err(crate::Error::Shape {
                op: "upload",
                msg: format!(
                    "rows {row}..+{rows}, columns {col}..+{width} of {region:?} in a {}-byte buffer",
                    self.bytes
                ),
            });
        }
        let e = std::mem::size_of::<T>();
        let ld = region.shape()[1];
        let dst = self.ptr + (region.offset + (row * ld + col) * e) as u64;
        // SAFETY: every row of the block lies inside the region (checked above), inside this
        // allocation, which `&mut self` keeps alive; the caller finishes the staging before the
        // buffer is used or dropped (dropping the staging also waits for its copies).
        unsafe { staging.copy_in_rows(gpu, dst, ld * e, width * e, rows, fill) }
    }

    /// Copies `data` into `region` (waits for the copy).
    pub fn fill<T: Copy>(&mut self, gpu: &super::Gpu, region: &Region<T>, data: &[T]) -> crate::Result<()> {
        if data.len() != region.numel() {
            return Err(crate::Error::Shape {
                op: "upload",
                msg: format!("{} values for a tensor of shape {:?}", data.len(), region.shape),
            });
        }
        self.upload_at(gpu, region.offset, data)
    }

    /// Copies the raw little-endian bytes of a tensor into `region` (waits for the copy).
    pub fn fill_bytes<T>(&mut self, gpu: &super::Gpu, region: &Region<T>, bytes: &[u8]) -> crate::Result<()> {
        if bytes.len() != region.numel() * std::mem::size_of::<T>() {
            return Err(crate::Error::Shape {
                op: "upload",
                msg: format!("{} bytes for a tensor of shape {:?}", bytes.len(), region.shape),
            });
        }
        self.upload_at(gpu, region.offset, bytes)
    }

    /// A typed view of `numel(dims)` elements at byte offset `offset`; `None` when out of range.
    pub fn view<T>(&self, offset: usize, dims: &[usize]) -> Option<DView<'_, T>> {
        let shape = Shape::new(dims);
        let end = offset.checked_add(shape.numel() * std::mem::size_of::<T>())?;
        (end <= self.bytes && offset % std::mem::align_of::<T>() == 0).then_some(DView {
            ptr: self.ptr + offset as u64,
            shape,
            _t: PhantomData,
        })
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        // SAFETY: the allocation made in new(); views borrow self, so none outlives it.
        unsafe {
            let _ = cudarc::driver::result::free_sync(self.ptr);
        }
    }
}
