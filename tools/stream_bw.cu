// Research microbenchmark (not part of the engine): how fast can one CTA per slice of a weight
// matrix w [n, k] (bf16, row-major, as the checkpoint ships it) stream that slice into shared
// memory on this card? It answers which load pattern a weight-streaming GEMM (kernels/
// linear_stream.cu) should use; nothing is computed, only the bytes land in shared memory.
//
// Patterns (each CTA owns F rows and walks all of k, a ring of S slots):
//   cp    cp.async, 16 bytes per thread, a slot = F rows × KB bytes along k (KB = 128 is what
//         linear_stream did in the sixth session, one 128-byte line per row per slot; it now
//         takes up to 1 KB per row per slot)
//   tma   TMA 2-D tiles (box 64 columns × F rows, 128-byte swizzle, the layout wgmma reads),
//         KB / 128 boxes per slot, one mbarrier per slot, one issuing thread
//   bulk  a re-tiled copy of w where each slot's F × KB bytes are contiguous: one 1-D bulk copy
//         per slot (what a load-time re-layout of the weights would buy)
// The weights rotate through copies covering ≥ 512 MB so that L2 (50 MB) never holds them.
//
// Build and run on the GPU machine:  nvcc -O3 -arch=sm_90a -o stream_bw tools/stream_bw.cu && ./stream_bw
#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <stdio.h>
#include <vector>

#define CK(x)                                                                                       \
    do {                                                                                            \
        cudaError_t e = (x);                                                                        \
        if (e != cudaSuccess) {                                                                     \
            printf("%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e));                        \
            exit(1);                                                                                \
        }                                                                                           \
    } while (0)

__device__ __forceinline__ uint32_t sa(const void *p) { return (uint32_t)__cvta_generic_to_shared(p); }

__device__ __forceinline__ void bar_init(uint64_t *b, int count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(sa(b)), "r"(count) : "memory");
}
__device__ __forceinline__ void bar_expect(uint64_t *b, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(sa(b)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void bar_wait(uint64_t *b, int parity) {
    asm volatile("{\n.reg .pred p;\nW: mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n@!p bra W;\n}\n" ::"r"(sa(b)),
                 "r"(parity)
                 : "memory");
}

extern __shared__ __align__(1024) unsigned char smem_raw[];

__device__ unsigned char *smem_base() {
    return reinterpret_cast<unsigned char *>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
}

// cp.async: slot = F rows × kb bytes; thread i copies 16-byte pieces in row-major order.
__global__ void __launch_bounds__(128) stream_cp(const __nv_bfloat16 *w, int n, int k, int F, int kb, int S, int *sink) {
    unsigned char *smem = smem_base();
    const int f0 = blockIdx.x * F;
    const int slot = F * kb;
    const int per_row = kb / 16;
    const int chunks = (k * 2 + kb - 1) / kb;
    auto load = [&](int c) {
        if (c < chunks) {
            unsigned char *dst = smem + (c % S) * slot;
            for (int i = threadIdx.x; i < F * per_row; i += 128) {
                const int r = i / per_row, p = i % per_row;
                const int64_t byte = (int64_t)c * kb + p * 16;
                const bool ok = byte < (int64_t)k * 2 && f0 + r < n;
                const char *src = reinterpret_cast<const char *>(w) + (ok ? (int64_t)(f0 + r) * k * 2 + byte : 0);
                asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(sa(dst + r * kb + p * 16)), "l"(src),
                             "r"(ok ? 16 : 0)
                             : "memory");
            }
        }
        asm volatile("cp.async.commit_group;\n" ::: "memory");
    };
    for (int s = 0; s < S - 1; ++s) load(s);
    int acc = 0;
    for (int c = 0; c < chunks; ++c) {
        // S − 2 groups may stay pending; the immediate forms for the S used here.
        if (S == 2) asm volatile("cp.async.wait_group 0;\n" ::: "memory");
        else if (S == 3) asm volatile("cp.async.wait_group 1;\n" ::: "memory");
        else if (S == 4) asm volatile("cp.async.wait_group 2;\n" ::: "memory");
        else if (S == 6) asm volatile("cp.async.wait_group 4;\n" ::: "memory");
        else if (S == 8) asm volatile("cp.async.wait_group 6;\n" ::: "memory");
        else asm volatile("cp.async.wait_group 14;\n" ::: "memory");
        __syncthreads();
        acc += smem[(c % S) * slot + threadIdx.x * 4];
        load(c + S - 1);
    }
    asm volatile("cp.async.wait_group 0;\n" ::: "memory");
    if (acc == 12345678) sink[0] = acc;
}

// The mbarrier ring of the tma and bulk patterns: thread 0 issues slot c's copies through
// issue(c, dst, bar) (each completes `slot` bytes on bar), every thread waits for the slot,
// reads one byte of it, and the slot is refilled S chunks ahead.
template <typename Issue>
__device__ void mbar_ring(int slot, int chunks, int S, int *sink, Issue issue) {
    unsigned char *smem = smem_base();
    uint64_t *bars = reinterpret_cast<uint64_t *>(smem + S * slot);
    if (threadIdx.x == 0) {
        for (int s = 0; s < S; ++s) bar_init(&bars[s], 1);
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();
    auto load = [&](int c) {
        if (c >= chunks) return;
        bar_expect(&bars[c % S], slot);
        issue(c, smem + (c % S) * slot, &bars[c % S]);
    };
    if (threadIdx.x == 0)
        for (int s = 0; s < S; ++s) load(s);
    int acc = 0;
    for (int c = 0; c < chunks; ++c) {
        bar_wait(&bars[c % S], (c / S) & 1);
        acc += smem[(c % S) * slot + threadIdx.x * 4];
        __syncthreads();
        if (threadIdx.x == 0) load(c + S);
    }
    if (acc == 12345678) sink[0] = acc;
}

// TMA 2-D: box 64 columns × F rows (128-byte swizzle), kb / 128 boxes per slot.
__global__ void __launch_bounds__(128) stream_tma(const __grid_constant__ CUtensorMap map, int n, int k, int F, int kb, int S,
                                                  int *sink) {
    const int f0 = blockIdx.x * F;
    mbar_ring(F * kb, (k * 2 + kb - 1) / kb, S, sink, [&](int c, unsigned char *dst, uint64_t *bar) {
        for (int j = 0; j < kb / 128; ++j) {
            const int col = (c * kb) / 2 + j * 64;
            asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::"r"(
                             sa(dst + j * F * 128)),
                         "l"(&map), "r"(col), "r"(f0), "r"(sa(bar))
                         : "memory");
        }
    });
}

// 1-D bulk copies of a re-tiled w: slot c of CTA b is the contiguous bytes at (b·chunks + c)·slot.
__global__ void __launch_bounds__(128) stream_bulk(const unsigned char *wt, int n, int k, int F, int kb, int S, int *sink) {
    const int slot = F * kb, chunks = (k * 2 + kb - 1) / kb;
    mbar_ring(slot, chunks, S, sink, [&](int c, unsigned char *dst, uint64_t *bar) {
        const unsigned char *src = wt + ((int64_t)blockIdx.x * chunks + c) * slot;
        asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(sa(dst)),
                     "l"(src), "r"(slot), "r"(sa(bar))
                     : "memory");
    });
}

typedef CUresult (*EncodeFn)(CUtensorMap *, CUtensorMapDataType, cuuint32_t, void *, const cuuint64_t *, const cuuint64_t *,
                             const cuuint32_t *, const cuuint32_t *, CUtensorMapInterleave, CUtensorMapSwizzle,
                             CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

int main() {
    const size_t pool_bytes = size_t(640) << 20;
    unsigned char *pool;
    CK(cudaMalloc(&pool, pool_bytes));
    // Random-ish bytes (never time on zeros).
    {
        std::vector<uint32_t> h(pool_bytes / 4);
        uint32_t s = 12345;
        for (auto &v : h) v = (s = s * 1664525u + 1013904223u);
        CK(cudaMemcpy(pool, h.data(), pool_bytes, cudaMemcpyHostToDevice));
    }
    int *sink;
    CK(cudaMalloc(&sink, 4));
    int sms;
    CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    EncodeFn encode;
    cudaDriverEntryPointQueryResult q;
    CK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", (void **)&encode, 12000, cudaEnableDefault, &q));
    for (auto fn : {(const void *)stream_cp, (const void *)stream_tma, (const void *)stream_bulk})
        CK(cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, 220 << 10));
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));

    struct Shape { const char *name; int n, k; };
    const Shape shapes[] = {{"qkv", 2560, 2048}, {"o", 2048, 2048}, {"gate_up", 22016, 2048}, {"down", 2048, 11008}};
    printf("%-8s %-5s %3s %5s %3s %6s %9s %8s\n", "shape", "kind", "F", "KB", "S", "CTAs", "us", "GB/s");
    for (const Shape &sh : shapes) {
        const size_t bytes = (size_t)sh.n * sh.k * 2;
        const int copies = (int)(pool_bytes / bytes) - 1; // the last leaves room for rounding k up to a slot
        for (int F : {16, 32, 64}) {
            const int ctas = (sh.n + F - 1) / F;
            const int per_sm = (ctas + sms - 1) / sms;
            const int budget = std::min((220 << 10) / per_sm - 2048, 200 << 10);
            for (int kind = 0; kind < 3; ++kind) {
                for (int kb : {128, 256, 512, 1024, 2048}) {
                    if (kind == 2 && kb < 256) continue;
                    const int slot = F * kb;
                    int S = budget / slot;
                    const int chunks = (sh.k * 2 + kb - 1) / kb;
                    S = std::min(S, 16);
                    if (kind == 0) S = S >= 16 ? 16 : S >= 8 ? 8 : S >= 6 ? 6 : S >= 4 ? 4 : S >= 3 ? 3 : S;
                    S = std::min(S, std::max(chunks, 2));
                    if (S < 2) continue;
                    if (kind == 0 && S != 2 && S != 3 && S != 4 && S != 6 && S != 8 && S != 16) S = S > 8 ? 8 : S > 4 ? 4 : 3;
                    if (S < 2) continue;
                    const int smem = S * slot + 1024 + 16 * 8 + 64;
                    float best = 1e30f;
                    CUtensorMap maps[64];
                    if (kind == 1) {
                        for (int c = 0; c < copies && c < 64; ++c) {
                            cuuint64_t dims[2] = {(cuuint64_t)sh.k, (cuuint64_t)sh.n};
                            cuuint64_t strides[1] = {(cuuint64_t)sh.k * 2};
                            cuuint32_t box[2] = {64, (cuuint32_t)F};
                            cuuint32_t es[2] = {1, 1};
                            CUresult r = encode(&maps[c], CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, pool + c * bytes, dims, strides, box, es,
                                                CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                                                CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
                            if (r != CUDA_SUCCESS) { printf("encode failed %d\n", (int)r); exit(1); }
                        }
                    }
                    for (int rep = 0; rep < 3; ++rep) {
                        const int iters = 40;
                        CK(cudaEventRecord(e0));
                        for (int it = 0; it < iters; ++it) {
                            const int c = it % std::min(copies, 64);
                            if (kind == 0)
                                stream_cp<<<ctas, 128, smem>>>((const __nv_bfloat16 *)(pool + c * bytes), sh.n, sh.k, F, kb, S, sink);
                            else if (kind == 1)
                                stream_tma<<<ctas, 128, smem>>>(maps[c], sh.n, sh.k, F, kb, S, sink);
                            else
                                stream_bulk<<<ctas, 128, smem>>>(pool + c * bytes, sh.n, sh.k, F, kb, S, sink);
                        }
                        CK(cudaEventRecord(e1));
                        CK(cudaEventSynchronize(e1));
                        CK(cudaGetLastError());
                        float ms;
                        CK(cudaEventElapsedTime(&ms, e0, e1));
                        best = std::min(best, ms * 1000.0f / iters);
                    }
                    const char *kinds[] = {"cp", "tma", "bulk"};
                    printf("%-8s %-5s %3d %5d %3d %6d %9.2f %8.0f\n", sh.name, kinds[kind], F, kb, S, ctas, best, bytes / (best * 1e3));
                }
            }
        }
    }
    return 0;
}
