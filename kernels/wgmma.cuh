// Hopper warpgroup-MMA helpers shared by the sm_90a kernels (attention_sm90.cu, linear_wgmma.cu,
// linear_stream.cu): shared-memory matrix descriptors and the fence / commit / wait protocol of
// wgmma.mma_async (shared-memory addresses: common.cuh's smem_addr). Only for sm_90a builds (__CUDA_ARCH_FEAT_SM90_ALL).
#pragma once
#include <stdint.h>

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
namespace {

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

// Shared-memory matrix descriptor: start address, leading and stride byte offsets (16-byte
// units), layout type (swizzle) in bits 62-63.
__device__ __forceinline__ uint64_t make_desc(uint32_t addr, uint32_t lbo, uint32_t sbo, uint64_t layout) {
    return (uint64_t)((addr & 0x3FFFF) >> 4) | ((uint64_t)(lbo >> 4) << 16) | ((uint64_t)(sbo >> 4) << 32) |
           (layout << 62);
}

} // namespace
#endif
