//! Device tensors: row-major, contiguous, typed. [`DTensor`] owns a block from the
//! [`super::alloc::DeviceAllocator`]; [`DView`] / [`DViewMut`] are borrowed views that ops take,
//! so that the borrow checker keeps a block alive (and unfreed) while a view of it is in use.

use std::marker::PhantomData;

use cudarc::driver::sys::CUdeviceptr;

use super::alloc::DeviceBlock;

/// Most dimensions a tensor may have.
pub const MAX_DIMS: usize = 4;

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
}
