// Status: off by default (src/ops/linear.rs, STREAM_DEFAULT). It gives cuBLASLt's bits and, alone,
// beats it at m ≤ 16 on qkv, o and gate_up (stream_pays), yet the query end to end is slower
// with it (H200, 2026-12-02; benches/NOTES.md, seventh session).
//
// linear_stream: y[m, n] = x[m, k] · w[n, k]ᵀ (+ y when accumulate) (+ bias[n]) for small m
// (1 ≤ m ≤ 64 tokens): a weight-streaming GEMM. At such m a projection is a read of its weights
// (n·k·2 bytes against m·k·2 of x), so the kernel is built to keep HBM busy: every CTA owns a
// slice of F output features and ALL of k, and streams its weight rows (and the x rows beside
// them, which L2 serves) through a multi-stage cp.async ring in shared memory.
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
//   slots, then the W slots. A slot's tile is `subs` sub-tiles of 64 columns, each rows of 128
//   bytes (16-byte chunk ch of row r at ch ^ (r % 8); 8-row atoms of 1 KB): x sub-tiles of
//   8·ceil(m / 8) rows, W sub-tiles of F rows. wgmma's A descriptor spans 64 rows, so past an x
//   sub-tile it reads the next ones (or the launcher's slack past the ring): those rows only
//   reach accumulator rows ≥ m. The multistage loop: the first stages − 1 chunks are in flight
//   before it; at chunk c, wait until chunk c has landed (at most stages − 2 groups pending),
//   barrier, issue chunk c's wgmma (behind chunk c − 1's, still running), wait for chunk
//   c − 1's, issue chunk c + stages − 1 into its slot. A chunk past k runs only its valid k16
//   steps. Out-of-range rows and columns of w are loaded as zeros (cp.async src-size 0).
//   Why long slots: with one 128-byte line per weight row per slot (kc = 64) the H200 streams a
//   weight matrix at ≈ 0.6 TB/s; runs of 1 KB per row reach 1.7-2.4 TB/s, 2 KB ≈ 3 TB/s on down
//   (tools/stream_bw.cu, 2026-12-02).
//
// Layout: x [m, ldx] and y [m, ldy] row-major (ldx ≥ k, ldy ≥ n: column windows of wider
//   buffers, the folded LoRA's `[x | t]`), w [n, k] row-major, bias [n] or null. x and y may be
//   the same buffer when the columns read and written do not overlap (linear_cols): neither is
//   declared __restrict__. Requires: x, w 16-byte aligned, ldx % 8 == 0, k % 16 == 0.
//
// Build: the body exists only for sm_90a (__CUDA_ARCH_FEAT_SM90_ALL); elsewhere the entries
//   trap and src/ops/linear.rs never selects them.
#include "common.cuh"
#include "wgmma.cuh"

namespace {

constexpr int THREADS = 128;   // one warpgroup
constexpr int SUB_K = 64;      // k of one W sub-tile (= one 128-byte swizzle row)
constexpr int MAX_SUBS = 8;    // sub-tiles per ring slot (k per slot up to 512): the launcher's limit
static_assert(MAX_SUBS * SUB_K <= 512, "ops::linear's STREAM_MAX_SUBS");
constexpr int MAX_STAGES = 16; // = ops::linear's STREAM_MAX_STAGES

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// cp.async.wait_group takes an immediate: one case per possible count (uniform over the CTA).
__device__ __forceinline__ void cp_async_wait_pending(int n) {
    switch (n) {
#define JV4_WAIT(N)                                                                                  \
    case N: asm volatile("cp.async.wait_group " #N ";\n" ::: "memory"); break;
        JV4_WAIT(0) JV4_WAIT(1) JV4_WAIT(2) JV4_WAIT(3) JV4_WAIT(4) JV4_WAIT(5) JV4_WAIT(6) JV4_WAIT(7)
        JV4_WAIT(8) JV4_WAIT(9) JV4_WAIT(10) JV4_WAIT(11) JV4_WAIT(12) JV4_WAIT(13) JV4_WAIT(14)
#undef JV4_WAIT
    default: asm volatile("cp.async.wait_group 0;\n" ::: "memory"); break;
    }
}
static_assert(MAX_STAGES - 2 == 14, "cp_async_wait_pending has a case for every count below a full ring");

// Registers an in-flight wgmma reads or writes: pinned so the compiler neither reads them early
// nor reuses them before the wait that follows.
template <int N> __device__ __forceinline__ void pin_regs(float (&r)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}

template <int F, bool F32OUT>
__device__ __forceinline__ void linear_stream_block(const __nv_bfloat16 *x, int64_t ldx,
                                                    const __nv_bfloat16 *__restrict__ w,
                                                    const __nv_bfloat16 *__restrict__ bias, void *y,
                                                    int64_t ldy, int m, int n, int k, int accumulate,
                                                    int stages, int subs) {
    constexpr int W_SUB = F * 128; // bytes of one 64-wide W sub-tile (F rows of 128 bytes)
    extern __shared__ __align__(16) unsigned char smem_raw[];
    unsigned char *smem =
        reinterpret_cast<unsigned char *>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));

    const int kc = subs * SUB_K;     // k per slot
    const int mt = (m + 7) / 8 * 8;  // token rows of an x sub-tile: whole 8-row atoms
    const int x_sub = mt * 128;      // bytes of one x sub-tile
    const int chunks = (k + kc - 1) / kc;
    const int w_slot = subs * W_SUB, x_slot = subs * x_sub;
    unsigned char *ws = smem + stages * x_slot; // the x slots first, then the W slots
    const int f0 = blockIdx.x * F;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;

    // Chunk c (columns [c·kc, c·kc + kc)) of the weight rows and token rows into slot s. Piece p
    // (16 bytes) of a row is column 8p: consecutive threads copy consecutive pieces of one row,
    // so each weight row is read as one run of kc·2 bytes (the long runs are what the H200's HBM
    // wants: tools/stream_bw.cu). Both tiles take the 128-byte swizzle (chunk ch of row r at
    // ch ^ (r % 8)).
    // Each thread copies one fixed piece p of every (128 / pieces)-th row: the index math is
    // done once here, and a copy costs a few adds (a single warpgroup issues both the copies
    // and the wgmma, so every instruction of the loads delays the tensor core's chain).
    const int pieces = subs * 8;             // per row per slot: a power of two, 8 to 64
    const int lg = 31 - __clz(pieces);
    const int p = tid & (pieces - 1), r0 = tid >> lg, rows_pass = THREADS >> lg;
    const int col = p * 8;                   // this thread's column within a slot
    auto swz = [&](int r) { return (uint32_t)((((p & 7) ^ (r & 7)) << 4)); };
    auto load = [&](int c, int s) {
        const int k0 = c * kc;
        const bool in_k = k0 + col < k;
        const uint32_t wbase = smem_addr(ws + s * w_slot) + (p >> 3) * W_SUB;
        const __nv_bfloat16 *src = w + (int64_t)(f0 + r0) * k + k0 + col;
        for (int r = r0; r < F; r += rows_pass, src += (int64_t)rows_pass * k) {
            const bool valid = in_k && f0 + r < n;
            // An invalid piece reads nothing; point it at w[0] (a valid address) anyway.
            cp_async16(wbase + r * 128 + swz(r), valid ? src : w, valid ? 16 : 0);
        }
        if (!in_k) return;
        const uint32_t xbase = smem_addr(smem + s * x_slot) + (p >> 3) * x_sub;
        const __nv_bfloat16 *xsrc = x + (int64_t)r0 * ldx + k0 + col;
        for (int r = r0; r < m; r += rows_pass, xsrc += (int64_t)rows_pass * ldx)
            cp_async16(xbase + r * 128 + swz(r), xsrc, 16);
    };

    float acc[F / 2];
#pragma unroll
    for (int i = 0; i < F / 2; ++i) acc[i] = 0.0f;

    for (int s = 0; s < stages - 1; ++s) {
        if (s < chunks) load(s, s);
        cp_async_commit();
    }

    for (int c = 0; c < chunks; ++c) {
        cp_async_wait_pending(stages - 2); // chunk c has landed (this thread's part)
        // The tiles were written through the generic proxy (cp.async) and are read next by the
        // async proxy (wgmma): each thread fences its writes before the barrier publishes them.
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
        __syncthreads(); // everyone's part of chunk c has landed
        const int s = c % stages;
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
        // Chunk c − 1's wgmma are done (this warpgroup is the CTA): its slot may be refilled.
        wgmma_wait<1>();
        const int next = c + stages - 1;
        if (next < chunks) load(next, next % stages); // into chunk c − 1's slot
        cp_async_commit();
    }
    wgmma_wait<0>();
    pin_regs(acc);
    cp_async_wait_pending(0); // nothing left in flight at exit (the trailing groups are empty)

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
            float v = acc[4 * j + e];
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
#define JV4_STREAM_BODY(ROWS, F32OUT) linear_stream_block<ROWS, F32OUT>(x, ldx, w, bias, y, ldy, m, n, k, accumulate, stages, subs)
#else
#define JV4_STREAM_BODY(ROWS, F32OUT) __trap()
#endif
#define JV4_LINEAR_STREAM(ROWS, NAME, F32OUT)                                                       \
    extern "C" __global__ void __launch_bounds__(THREADS)                                           \
        linear_stream_r##ROWS##_##NAME(const __nv_bfloat16 *x, int64_t ldx, const __nv_bfloat16 *w, \
                                       const __nv_bfloat16 *bias, void *y, int64_t ldy, int m, int n, \
                                       int k, int accumulate, int stages, int subs) {               \
        JV4_STREAM_BODY(ROWS, F32OUT);                                                              \
    }
JV4_LINEAR_STREAM(16, bf16, false)
JV4_LINEAR_STREAM(32, bf16, false)
JV4_LINEAR_STREAM(64, bf16, false)
JV4_LINEAR_STREAM(16, f32, true)
JV4_LINEAR_STREAM(32, f32, true)
JV4_LINEAR_STREAM(64, f32, true)
