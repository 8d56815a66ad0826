// Hopper's tensor memory accelerator (TMA) and the mbarriers it completes, shared by the sm_90a
// kernels that load tiles with it (attention_sm90.cu, linear_stream.cu).
//
// TmaMap is a CUtensorMap (128 opaque bytes, 64-byte aligned) that the host encodes with
// cuTensorMapEncodeTiled (src/cuda/tma.rs) and passes by value as a __grid_constant__ parameter.
// tma_load copies one box of a 2-D map at (column c, row r) into shared memory and signals the
// mbarrier with the bytes it wrote (boxes past the tensor's edge arrive as zeros, and count).
// Only for sm_90a builds (__CUDA_ARCH_FEAT_SM90_ALL), except the struct, which the entries'
// signatures need on every build.
#pragma once
#include <stdint.h>

struct alignas(64) TmaMap {
    uint64_t opaque[16];
};

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
namespace {

__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// Blocks until the phase of parity `parity` has completed.
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
    asm volatile("{\n.reg .pred done;\nWAIT_%=:\n"
                 "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
                 "@!done bra WAIT_%=;\n}\n" ::"r"(bar),
                 "r"(parity)
                 : "memory");
}

// One box of `map` at (column c, row r) into shared memory at dst, completing on `bar`.
__device__ __forceinline__ void tma_load(uint32_t dst, const TmaMap *map, int c, int r, uint32_t bar) {
    asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n"
                 ::"r"(dst), "l"(reinterpret_cast<uint64_t>(map)), "r"(c), "r"(r), "r"(bar)
                 : "memory");
}

} // namespace
#endif
