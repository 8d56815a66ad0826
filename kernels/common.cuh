// Shared device helpers for every kernel file: bf16 <-> f32 and 16-byte vector access.
// Precision policy of the engine: bf16 in memory, f32 in registers for all arithmetic.
#pragma once
#include <cuda_bf16.h>
#include <stdint.h>

// Threads per block of every kernel here but attention (= `ops::THREADS` of the launchers, which a
// test checks): grid-stride kernels run with exactly this many, row kernels with a multiple of 32
// up to it. Each kernel declares it with __launch_bounds__, so ptxas budgets registers for it.
#define JV4_THREADS 256

// Eight bf16 values moved as one 16-byte load or store.
struct __align__(16) bf16x8 {
    __nv_bfloat162 h[4];
};

__device__ __forceinline__ void unpack8(const bf16x8 &v, float (&f)[8]) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        float2 p = __bfloat1622float2(v.h[i]);
        f[2 * i] = p.x;
        f[2 * i + 1] = p.y;
    }
}

__device__ __forceinline__ bf16x8 pack8(const float (&f)[8]) {
    bf16x8 v;
#pragma unroll
    for (int i = 0; i < 4; ++i) v.h[i] = __floats2bfloat162_rn(f[2 * i], f[2 * i + 1]);
    return v;
}

// bf16 quiet NaN (0x7FC0): what kernels write where an input is invalid (an id past the
// vocabulary, an empty pooling span), so that a host-side validation bug shows up as NaN instead
// of an out-of-bounds read.
__device__ __forceinline__ __nv_bfloat16 bf16_nan() { return __ushort_as_bfloat16((unsigned short)0x7FC0); }

__device__ __forceinline__ bf16x8 bf16x8_fill(__nv_bfloat16 x) {
    bf16x8 v;
#pragma unroll
    for (int i = 0; i < 4; ++i) v.h[i] = __halves2bfloat162(x, x);
    return v;
}

// Sum over the 32 lanes of a warp (all lanes active). Butterfly: every lane combines the same two
// partial sums at every level (f32 addition is commutative), so every lane gets the same bits.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Sum over the block; every thread gets the same result. blockDim.x must be a multiple of 32
// (at most 1024) and every thread of the block must call it (it synchronises). `scratch` is a
// __shared__ float[32]. The order of the additions depends only on blockDim.x: deterministic.
__device__ __forceinline__ float block_sum(float v, float *scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_sum(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float total = warp_sum(lane < warps ? scratch[lane] : 0.0f);
    __syncthreads(); // scratch may be reused as soon as we return
    return total;
}

// cp.async (sm_80+), shared by the kernels that stage tiles through shared memory (attention,
// linear_stream): the shared-space address of a pointer, one 16-byte copy, closing a group.
__device__ __forceinline__ uint32_t smem_addr(const void *p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global → shared, asynchronous; src_bytes = 0 writes 16 zero bytes and reads nothing.
__device__ __forceinline__ void cp_async16(uint32_t dst, const void *src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes)
                 : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
