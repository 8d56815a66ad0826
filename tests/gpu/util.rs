//! Inputs and device tensors for the op tests: random bf16 values (and their exact f32 images),
//! random bit patterns, permutations, and allocation and upload helpers.

use half::bf16;

use crate::harness::{e, Ctx};
use jv4::cuda::{DTensor, DeviceAllocator, DEFAULT_PAGE_SIZE};

/// f32 unit roundoff, 2^-24: the relative error of one f32 rounding.
pub const U32: f32 = f32::EPSILON / 2.0;

/// NaN in f32: the poison of f32 outputs.
pub const F32_NAN_BITS: u32 = 0x7FC0_0000;

/// Random bf16 values and their exact f32 images (the reference computes on the latter).
pub fn random_bf16(ctx: &mut Ctx, n: usize, scale: f32) -> (Vec<bf16>, Vec<f32>) {
    let h: Vec<bf16> = (0..n).map(|_| bf16::from_f32(ctx.rng.normal() * scale)).collect();
    let f = h.iter().map(|v| v.to_f32()).collect();
    (h, f)
}

pub fn to_f32(v: &[bf16]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
}

pub fn allocator(ctx: &Ctx, budget: u64) -> Result<DeviceAllocator, String> {
    DeviceAllocator::new(&ctx.gpu, budget, DEFAULT_PAGE_SIZE).map_err(e)
}

pub fn dtensor<T>(mem: &mut DeviceAllocator, dims: &[usize]) -> Result<DTensor<T>, String> {
    let n: usize = dims.iter().product();
    Ok(DTensor::from_block(mem.alloc((n * std::mem::size_of::<T>()).max(1) as u64).map_err(e)?, dims))
}

pub fn upload<T: Copy>(
    ctx: &Ctx,
    mem: &mut DeviceAllocator,
    dims: &[usize],
    host: &[T],
) -> Result<DTensor<T>, String> {
    let mut t = dtensor(mem, dims)?;
    ctx.gpu.upload(&mut t.view_mut(), host).map_err(e)?;
    Ok(t)
}

/// Random finite bf16 values of every magnitude (random bits; an all-ones exponent, inf or NaN,
/// gets its top exponent bit cleared).
pub fn random_bf16_bits(ctx: &mut Ctx, n: usize) -> Vec<bf16> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let r = ctx.rng.next_u64();
        for k in 0..4.min(n - out.len()) {
            let mut b = (r >> (16 * k)) as u16;
            if b & 0x7F80 == 0x7F80 {
                b &= !0x4000;
            }
            out.push(bf16::from_bits(b));
        }
    }
    out
}

/// A random permutation of `0..n` (Fisher–Yates).
pub fn permutation(ctx: &mut Ctx, n: usize) -> Vec<usize> {
    let mut p: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        p.swap(i, ctx.rng.below(i + 1));
    }
    p
}

pub fn bits(v: &[bf16]) -> Vec<u16> {
    v.iter().map(|x| x.to_bits()).collect()
}
