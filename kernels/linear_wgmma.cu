// Status: a probe (issue 10, deliverable 2), not used by the engine. The question it answers:
// does a GEMM built on wgmma (the instruction cuBLASLt's Hopper kernels use) give cuBLASLt's bits
// when it accumulates each output in one f32 accumulator over k16 steps from k = 0 upward?
// mma.sync in that order does not (linear_stream.cu, benches/NOTES.md, fourth session). If it
// does, a weight-streaming kernel on wgmma may replace cuBLASLt at small m and keep the engine
// batch-invariant; tests/gpu/probe.rs (`probe_linear_wgmma_bits`) counts the differing bits.
//
// linear_wgmma_{tok,feat}: y[m, n] (f32) = x[m, k] · w[n, k]ᵀ, one warpgroup per CTA, one 64 × 64
//   output tile per CTA (grid: ceil(n / 64) feature tiles × ceil(m / 64) token tiles). `tok`:
//   the tokens are wgmma's M (A = the x tile, B = the w tile); `feat`: the features are M (A = the
//   w tile, B = the x tile), as cuBLASLt sees the problem (column-major C[n, m] = wᵀ-major A ·
//   x). Per k chunk of 64: both tiles are loaded by plain 16-byte loads into shared memory in
//   the 128-byte-swizzled K-major layout (rows of 128 bytes, 16-byte chunk c of row r at
//   c ^ (r % 8), 8-row atoms of 1 KB), made visible to the async proxy, then 4 wgmma
//   m64n64k16 (the first of the whole k walk overwrites the accumulator, the others add), and
//   waited for before the next chunk overwrites the tiles. No pipelining: this is a probe of
//   the arithmetic, not of speed. Rows past m or n load as zeros and are not stored.
// Requires: k % 64 == 0, x, w 16-byte aligned (the launcher checks).
#include "common.cuh"
#include "wgmma.cuh"

namespace {

constexpr int TILE = 64;                 // rows (tokens or features) per tile, and k per chunk
constexpr int TILE_BYTES = TILE * 128;   // 64 rows of 64 bf16

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// Rows r0.. of src [rows, ld] (bf16), columns k0..k0 + 63, into the swizzled tile at `tile`;
// rows ≥ rows as zeros. 64 rows × 8 chunks over the 128 threads.
__device__ __forceinline__ void load_tile(unsigned char *tile, const __nv_bfloat16 *src, int64_t ld, int rows,
                                          int r0, int k0) {
    for (int i = threadIdx.x; i < TILE * 8; i += 128) {
        const int r = i / 8, c = i % 8;
        uint4 v = make_uint4(0, 0, 0, 0);
        if (r0 + r < rows) v = *reinterpret_cast<const uint4 *>(src + (int64_t)(r0 + r) * ld + k0 + 8 * c);
        *reinterpret_cast<uint4 *>(tile + r * 128 + ((c ^ (r & 7)) * 16)) = v;
    }
}

template <bool TOKENS_AS_M>
__device__ void linear_wgmma(const __nv_bfloat16 *__restrict__ x, const __nv_bfloat16 *__restrict__ w,
                             float *__restrict__ y, int m, int n, int k) {
    extern __shared__ unsigned char smem_raw[];
    unsigned char *smem = reinterpret_cast<unsigned char *>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
    unsigned char *xs = smem, *ws = smem + TILE_BYTES;
    const int f0 = blockIdx.x * TILE, t0 = blockIdx.y * TILE;
    float d[32];
#pragma unroll
    for (int i = 0; i < 32; ++i) d[i] = 0.f;
    const uint32_t a_tile = smem_addr(TOKENS_AS_M ? xs : ws), b_tile = smem_addr(TOKENS_AS_M ? ws : xs);
    for (int k0 = 0; k0 < k; k0 += TILE) {
        __syncthreads(); // the previous chunk's wgmma have completed (waited below) in every warp
        load_tile(xs, x, k, m, t0, k0);
        load_tile(ws, w, k, n, f0, k0);
        // Generic-proxy stores, read next by the async proxy (wgmma): fence, then all threads.
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
        __syncthreads();
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < 4; ++kk)
            wgmma_ss(d, make_desc(a_tile + kk * 32, 16, 1024, 1), make_desc(b_tile + kk * 32, 16, 1024, 1),
                         k0 > 0 || kk > 0);
        wgmma_commit();
        wgmma_wait<0>();
    }
    // Accumulator layout (m64nNk16, f32): warp q of the warpgroup holds M rows 16q.., lane (g, t4)
    // rows g and g + 8, N columns 8j + 2·t4 + {0, 1}.
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t4 = lane % 4;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int rm = 16 * warp + g + 8 * (e >> 1), cn = 8 * j + 2 * t4 + (e & 1);
            const int tok = TOKENS_AS_M ? t0 + rm : t0 + cn, feat = TOKENS_AS_M ? f0 + cn : f0 + rm;
            if (tok < m && feat < n) y[(int64_t)tok * n + feat] = d[4 * j + e];
        }
    }
}
#endif

} // namespace

extern "C" __global__ void __launch_bounds__(128)
linear_wgmma_tok(const __nv_bfloat16 *x, const __nv_bfloat16 *w, float *y, int m, int n, int k) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    linear_wgmma<true>(x, w, y, m, n, k);
#else
    __trap();
#endif
}

extern "C" __global__ void __launch_bounds__(128)
linear_wgmma_feat(const __nv_bfloat16 *x, const __nv_bfloat16 *w, float *y, int m, int n, int k) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    linear_wgmma<false>(x, w, y, m, n, k);
#else
    __trap();
#endif
}
