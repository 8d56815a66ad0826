// Status: off by default (src/ops/linear.rs, STREAM_DEFAULT and shrink_stream). It gives
// cuBLASLt's bits but is slower than cuBLASLt on every model shape when both are timed as graphs
// (H200, 2026-12-02; benches/NOTES.md, eighth session). At m = 16 a CTA's one accumulator chain
// runs at ≈ 46 ns per k16 step whatever feeds it (cp.async and TMA gave the same rates), so
// k = 11008 takes ≈ 31 µs; cuBLASLt's chains run at ≈ 25-28 ns per step. Why is not established.
//
// linear_stream: y[m, n] = x[m, k] · w[n, k]ᵀ (+ y when accumulate) (+ bias[n]) for small m
// (1 ≤ m ≤ 64 tokens): a weight-streaming GEMM. At such m a projection is a read of its weights
// (n·k·2 bytes against m·k·2 of x), so the kernel is built to keep HBM busy: every CTA owns a
// slice of F output features and ALL of k, and streams its weight rows (and the x rows beside
// them, which L2 serves) through a multi-stage ring in shared memory that TMA fills.
//
// Batch invariance, and cuBLASLt's bits: each output element is ONE f32 accumulator, fed by
//   wgmma (bf16 × bf16 → f32) in k16 steps from k = 0 upward (the first step overwrites it);
//   then the epilogue in f32 (the old y first, then the bias, as cuBLASLt orders them) and
//   the rounding to bf16 (round to nearest even) for a bf16 y; an accumulating bf16 y adds the
//   product rounded to bf16 first, as cuBLASLt's epilogue does (measured: bf16(bf16(acc) + y)). No split of K anywhere, so a row of y gets the same bits at any m, tile
//   or grid. `probe_linear_wgmma_bits` (tests/gpu/probe.rs) found that a wgmma GEMM in this
//   order gives cuBLASLt's unsplit algorithms' bits in both operand roles at m = 1 to 200 on the
//   decoder's shapes (0 differing elements, H200, 2026-12-01); mma.sync in the same order does
//   not (5% of the elements differ; the fourth session's version of this kernel). So the op may
//   switch between this kernel and cuBLASLt by m and stay batch-invariant;
//   `linear_stream_equals_cublas_bitwise` in tests/gpu/linear.rs checks every shape and form.
//
// MMA roles: the tokens are wgmma's M (64 rows; only 8·ceil(m / 8) of them are loaded, rows ≥ m
//   are never stored), the CTA's F features its N (F = 16, 32 or 64: the launcher picks it so
//   the grid covers the SMs; n = 2048 gives 128 CTAs of 16). Both operands come from shared
//   memory through matrix descriptors, K-major with the 128-byte swizzle, so a chunk's k16
//   steps issue back to back with no register hand-off and are waited for only one chunk later.
//   (The sixth session's version loaded A into registers by ldmatrix and waited after every 4
//   steps: down at m = 16 took 117 µs whatever the load pattern; both operands from shared
//   memory, 60 µs; with the copies' index math done once per thread, 37 µs. ncu found the one
//   warpgroup issue-bound: every instruction between two wgmma delays the chain.)
//
// Ring: `stages` slots (runtime, 2..16) of kc = 64·subs columns each (subs runtime, 1..8; the
//   launcher picks both from the smem budget). Shared memory from the 1 KB-aligned base: the x
//   slots, the W slots, the slack, then one mbarrier per slot. A slot's tile is `subs` sub-tiles
//   of 64 columns, each rows of 128 bytes (16-byte chunk ch of row r at ch ^ (r % 8); 8-row atoms
//   of 1 KB): x sub-tiles of 8·ceil(m / 8) rows, W sub-tiles of F rows. wgmma's A descriptor
//   spans 64 rows, so past an x sub-tile it reads the next ones (or the launcher's slack past
//   the ring): those rows only reach accumulator rows ≥ m. Loads: thread 0 issues one TMA box
//   per sub-tile of x and of w (the host's tensor maps carry the swizzle and zero-fill rows past
//   m or n and columns past k), completing on the slot's mbarrier with the bytes expected. The
//   multistage loop: the first stages − 1 chunks are in flight before it; at chunk c, every
//   thread waits on the slot's mbarrier (phase c / stages), issues chunk c's wgmma (behind chunk
//   c − 1's, still running), waits for chunk c − 1's, and thread 0 loads chunk c + stages − 1
//   into chunk c − 1's slot (TMA writes and wgmma reads are both the async proxy, ordered by
//   that wait). A chunk past k runs only its valid k16 steps and loads only its valid sub-tiles.
//   Why long slots: with one 128-byte line per weight row per slot (kc = 64) the H200 streams a
//   weight matrix at ≈ 0.6 TB/s; runs of 1 KB per row reach 1.7-2.4 TB/s, 2 KB ≈ 3 TB/s on down
//   (tools/stream_bw.cu, 2026-12-02). The seventh session's per-thread cp.async copies gave the
//   same rates at m ≤ 16 as TMA does (the chain above is the limit there); TMA is faster at
//   m = 64 (down 1,005 against 759 GB/s) and issues a few instructions per slot instead of
//   hundreds.
//
// Mask (the LoRA shrink, ops::lora::lora_shrink): with row_task non-null, output column f < mask_cols
//   of row i is written +0.0 unless f / group == row_task[i] (lora_mask's rule); columns past
//   mask_cols keep the product. Only for a plain bf16 output (the launcher checks).
//
// Layout: x [m, ldx] and y [m, ldy] row-major (ldx ≥ k, ldy ≥ n: column windows of wider
//   buffers, the folded LoRA's `[x | t]`), w [n, k] row-major, bias [n] or null; x and w reach
//   the kernel as tensor maps. x and y may be the same buffer when the columns read and written
//   do not overlap (linear_cols). Requires (TMA): x, w 16-byte aligned, ldx % 8 == 0, k % 16 == 0.
//
// Build: the body exists only for sm_90a (__CUDA_ARCH_FEAT_SM90_ALL); elsewhere the entries
//   trap and src/ops/linear.rs never selects them.
#include "common.cuh"
#include "tma.cuh"
#include "wgmma.cuh"

namespace {

constexpr int THREADS = 128;   // one warpgroup
constexpr int SUB_K = 64;      // k of one W sub-tile (= one 128-byte swizzle row)
constexpr int MAX_SUBS = 8;    // sub-tiles per ring slot (k per slot up to 512): the launcher's limit
static_assert(MAX_SUBS * SUB_K <= 512, "ops::linear's STREAM_MAX_SUBS");
constexpr int MAX_STAGES = 16; // = ops::linear's STREAM_MAX_STAGES
constexpr int BAR_BYTES = 8 * MAX_STAGES; // one mbarrier per slot: ops::linear's STREAM_BAR_BYTES
static_assert(BAR_BYTES == 128, "the launcher reserves 128 bytes of mbarriers past the slack");

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// Registers an in-flight wgmma reads or writes: pinned so the compiler neither reads them early
// nor reuses them before the wait that follows.
template <int N> __device__ __forceinline__ void pin_regs(float (&r)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}

template <int F, bool F32OUT>
__device__ __forceinline__ void linear_stream_block(const TmaMap *xmap, const TmaMap *wmap,
                                                    const __nv_bfloat16 *__restrict__ bias, void *y,
                                                    int64_t ldy, int m, int n, int k, int accumulate,
                                                    int stages, int subs, const uint8_t *row_task,
                                                    int group, int mask_cols) {
    constexpr int W_SUB = F * 128; // bytes of one 64-wide W sub-tile (F rows of 128 bytes)
    extern __shared__ __align__(16) unsigned char smem_raw[];
    unsigned char *smem =
        reinterpret_cast<unsigned char *>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));

    const int kc = subs * SUB_K;     // k per slot
    const int mt = (m + 7) / 8 * 8;  // token rows of an x sub-tile: whole 8-row atoms (the x box)
    const int x_sub = mt * 128;      // bytes of one x sub-tile
    const int chunks = (k + kc - 1) / kc;
    const int w_slot = subs * W_SUB, x_slot = subs * x_sub;
    unsigned char *ws = smem + stages * x_slot; // the x slots first, then the W slots
    // One mbarrier per slot, past the ring and the A descriptor's slack (the launcher's layout).
    const uint32_t bars = smem_addr(ws + stages * w_slot) + (uint32_t)((64 - mt) * 128);
    const int f0 = blockIdx.x * F;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;

    // Chunk c (columns [c·kc, c·kc + kc)) into slot s: one TMA box per 64-column sub-tile of the
    // weight rows (F rows) and of the token rows (mt rows), issued by one thread and completing
    // on the slot's mbarrier. The maps carry the 128-byte swizzle (chunk ch of row r lands at
    // ch ^ (r % 8)) and zero-fill rows past n or m and columns past k. Sub-tiles wholly past k
    // are not loaded (the chunk runs only its valid k16 steps).
    auto load = [&](int c, int s) {
        const int k0 = c * kc;
        const int valid = min(subs, (k - k0 + SUB_K - 1) / SUB_K);
        const uint32_t bar = bars + 8 * s;
        mbar_expect_tx(bar, (uint32_t)(valid * (W_SUB + x_sub)));
        const uint32_t wdst = smem_addr(ws + s * w_slot), xdst = smem_addr(smem + s * x_slot);
        for (int j = 0; j < valid; ++j) {
            tma_load(wdst + j * W_SUB, wmap, k0 + j * SUB_K, f0, bar);
            tma_load(xdst + j * x_sub, xmap, k0 + j * SUB_K, 0, bar);
        }
    };

    if (tid == 0) {
        for (int s = 0; s < stages; ++s) mbar_init(bars + 8 * s, 1);
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();

    float acc[F / 2];
#pragma unroll
    for (int i = 0; i < F / 2; ++i) acc[i] = 0.0f;

    if (tid == 0) {
        for (int s = 0; s < stages - 1 && s < chunks; ++s) load(s, s);
    }

    for (int c = 0; c < chunks; ++c) {
        const int s = c % stages;
        mbar_wait(bars + 8 * s, (uint32_t)((c / stages) & 1)); // chunk c has landed
        const uint32_t xtile = smem_addr(smem + s * x_slot), wtile = smem_addr(ws + s * w_slot);
        // All of the chunk's k16 steps back to back, in k order, on the one accumulator, queued
        // behind chunk c − 1's (which may still run: the tensor core never waits for the loads'
        // bookkeeping). The A descriptor reads 64 token rows; rows ≥ mt are whatever follows in
        // shared memory (the launcher's slack keeps them in bounds) and only reach accumulator
        // rows ≥ m, never stored.
        const int steps = min(kc, k - c * kc) / 16;
        // Step j's operands: sub-tile j / 4, k16 column group j % 4 (32 bytes), added to the
        // descriptors' address field (16-byte units; smem addresses never carry out of it).
        const uint64_t da = make_desc(xtile, 16, 1024, 1), db = make_desc(wtile, 16, 1024, 1);
        auto step = [&](int j) {
            wgmma_ss(acc, da + (uint64_t)(((j >> 2) * x_sub + (j & 3) * 32) >> 4),
                     db + (uint64_t)(((j >> 2) * W_SUB + (j & 3) * 32) >> 4), c > 0 || j > 0);
        };
        wgmma_fence();
        // A full slot of the longest kind as straight-line code: a loop's back edge makes ptxas
        // put a warpgroup.arrive before its first wgmma (C7519), which may stall the chain.
        if (steps == MAX_SUBS * SUB_K / 16) {
#pragma unroll
            for (int j = 0; j < MAX_SUBS * SUB_K / 16; ++j) step(j);
        } else {
            for (int j = 0; j < steps; ++j) step(j);
        }
        wgmma_commit();
        // Chunk c − 1's wgmma are done (this warpgroup is the CTA, and its wait is collective):
        // its slot may be refilled (TMA writes and wgmma reads are both the async proxy).
        wgmma_wait<1>();
        const int next = c + stages - 1;
        if (tid == 0 && next < chunks) load(next, next % stages); // into chunk c − 1's slot
    }
    wgmma_wait<0>();
    pin_regs(acc);

    // Accumulator layout (m64nFk16, f32): warp q holds tokens 16q + g and 16q + g + 8 (lane =
    // 4g + t4), features 8j + 2·t4 + {0, 1} of the CTA's F.
    if (16 * warp >= m) return; // no token of this warp's rows
    const int g = lane / 4, t4 = lane % 4;
#pragma unroll
    for (int j = 0; j < F / 8; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int tok = 16 * warp + g + 8 * (e >> 1);
            const int f = f0 + 8 * j + 2 * t4 + (e & 1);
            if (tok >= m || f >= n) continue;
            // The LoRA shrink's mask (lora_mask, fused): of each row only its task's group of
            // columns is kept; the others become +0.0 (exactly what lora_mask writes).
            const bool masked = row_task != nullptr && f < mask_cols && f / group != (int)row_task[tok];
            float v = masked ? 0.0f : acc[4 * j + e];
            const float b = bias != nullptr ? __bfloat162float(bias[f]) : 0.0f;
            if constexpr (F32OUT) {
                float *p = static_cast<float *>(y) + (int64_t)tok * ldy + f;
                if (accumulate) v = v + *p;
                if (bias != nullptr) v = v + b;
                *p = v;
            } else {
                __nv_bfloat16 *p = static_cast<__nv_bfloat16 *>(y) + (int64_t)tok * ldy + f;
                // cuBLASLt's accumulating bf16 epilogue rounds the product to bf16 before adding the
                // old y (bf16(bf16(acc) + y): the only rule of two that matched its bits,
                // `linear_stream_equals_cublas_bitwise`); then the bias (that order with both
                // is not measured: the model never adds a bias to an accumulating bf16 y).
                if (accumulate) v = __bfloat162float(__float2bfloat16_rn(v)) + __bfloat162float(*p);
                if (bias != nullptr) v = v + b;
                *p = __float2bfloat16_rn(v);
            }
        }
    }
}
#endif

} // namespace

// One entry per (features per CTA, output type): linear_stream_r{16,32,64}_{bf16,f32}.
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define JV4_STREAM_BODY(ROWS, F32OUT)                                                               \
    linear_stream_block<ROWS, F32OUT>(&xmap, &wmap, bias, y, ldy, m, n, k, accumulate, stages, subs, row_task, group, \
                                      mask_cols)
#else
#define JV4_STREAM_BODY(ROWS, F32OUT) __trap()
#endif
#define JV4_LINEAR_STREAM(ROWS, NAME, F32OUT)                                                       \
    extern "C" __global__ void __launch_bounds__(THREADS)                                           \
        linear_stream_r##ROWS##_##NAME(const __grid_constant__ TmaMap xmap,                         \
                                       const __grid_constant__ TmaMap wmap,                         \
                                       const __nv_bfloat16 *bias, void *y, int64_t ldy, int m, int n, \
                                       int k, int accumulate, int stages, int subs,                 \
                                       const uint8_t *row_task, int group, int mask_cols) {         \
        JV4_STREAM_BODY(ROWS, F32OUT);                                                              \
    }
JV4_LINEAR_STREAM(16, bf16, false)
JV4_LINEAR_STREAM(32, bf16, false)
JV4_LINEAR_STREAM(64, bf16, false)
JV4_LINEAR_STREAM(16, f32, true)
JV4_LINEAR_STREAM(32, f32, true)
JV4_LINEAR_STREAM(64, f32, true)
