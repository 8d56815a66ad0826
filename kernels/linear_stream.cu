// Status: off by default (src/ops/linear.rs, STREAM_DEFAULT): it gives cuBLASLt's bits, but it is
// slower than cuBLASLt at every decoder shape (H200, 2026-12-01; benches/NOTES.md, sixth session).
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
// MMA roles: the tokens are wgmma's M (64 rows; rows ≥ m are zero registers, never stored), the
//   CTA's F features its N (F = 16, 32 or 64: the launcher picks it so the grid covers the SMs;
//   n = 2048 gives 128 CTAs of 16). A (x) comes from registers, loaded by ldmatrix from the x
//   slot (the m16n8k16 A fragment layout, which is wgmma's per warp: warp q holds rows 16q..);
//   B (w) from shared memory through a matrix descriptor, K-major with the 128-byte swizzle.
//   Only warps whose 16 rows hold tokens load A; the others pass zeros (wgmma is warpgroup-wide).
//
// Ring: `stages` slots (runtime, 2..16, chosen by the launcher from the smem budget). Slot s:
//   W tile at s·F·128 bytes from the 1 KB-aligned base (F rows of 64 k, 128 bytes each, 16-byte
//   chunk c of row r at chunk c ^ (r % 8); 8-row atoms of 1 KB), and after all W tiles the x
//   tiles: MT = 16·ceil(m / 16) rows of KC + 8 elements (rows padded by 16 bytes so that ldmatrix
//   rows fall in distinct bank groups), rows ≥ m zero-filled. The classic multistage loop: the
//   first stages − 1 chunks are in flight before the loop; at chunk c, wait until chunk c has
//   landed (at most stages − 2 groups pending), barrier, issue chunk c + stages − 1 into the slot
//   chunk c − 1 used (its wgmma were waited for), then run chunk c's wgmma and wait for them. k
//   is walked in chunks of KC = 64; a chunk past k % 64 runs only its valid k16 steps.
//   Out-of-range rows and columns are loaded as zeros (cp.async src-size 0).
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

constexpr int THREADS = 128;    // one warpgroup
constexpr int KC = 64;          // k per ring slot (= one 128-byte swizzle row)
constexpr int STRIDE = KC + 8;  // x slot row stride in elements (144 bytes)
constexpr int MAX_STAGES = 16;  // = ops::linear's STREAM_MAX_STAGES
// x_mode: how x reaches shared memory (= ops::linear's StreamX).
constexpr int X_RING = 0;       // beside W in every ring slot
constexpr int X_RESIDENT = 1;   // all of k at once, before the loop (the launcher checks it fits)
constexpr int X_SKIP = 2;       // never loaded (zeros): timing research only, wrong results

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

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr)
                 : "memory");
}

// d (+)= a·b, m64nNk16: A (bf16 pairs) in registers, B K-major in shared memory (descriptor);
// accumulate = 0 overwrites d. One overload per N = 16, 32, 64 (d holds N / 2 floats).
__device__ __forceinline__ void wgmma_rs(float (&d)[8], const uint32_t (&a)[4], uint64_t b, int accumulate) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %13, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n16k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7}, {%8, %9, %10, %11}, %12, p, 1, 1, 0;\n}\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(accumulate));
}

__device__ __forceinline__ void wgmma_rs(float (&d)[16], const uint32_t (&a)[4], uint64_t b, int accumulate) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %21, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, {%16, %17, %18, %19}, %20, p, 1, 1, 0;\n}\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(accumulate));
}

__device__ __forceinline__ void wgmma_rs(float (&d)[32], const uint32_t (&a)[4], uint64_t b, int accumulate) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, %36, p, 1, 1, 0;\n}\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(accumulate));
}

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
                                                    int stages, int x_mode) {
    constexpr int W_SLOT = F * 128; // bytes of one W tile
    extern __shared__ __align__(16) unsigned char smem_raw[];
    unsigned char *smem =
        reinterpret_cast<unsigned char *>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));

    const int mt = (m + 15) / 16 * 16; // token rows of an x tile
    const int chunks = (k + KC - 1) / KC;
    const bool resident = x_mode == X_RESIDENT;
    // Row stride (elements) and bytes of the x tile: one per ring slot, or all of k at once.
    const int x_stride = resident ? chunks * KC + 8 : STRIDE;
    const int x_slot = mt * x_stride * 2;
    unsigned char *xs = smem + stages * W_SLOT;
    const int f0 = blockIdx.x * F;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;

    // Token rows m..mt − 1 are zeros, written once here and never loaded (a cp.async of size 0
    // would still send a request: every CTA's to the same address).
    for (int tile = 0; tile < (resident ? 1 : stages); ++tile) {
        for (int i = tid; i < (mt - m) * x_stride / 8; i += THREADS) {
            const int r = m + i / (x_stride / 8), ch = i % (x_stride / 8);
            *reinterpret_cast<uint4 *>(xs + tile * x_slot + (r * x_stride + ch * 8) * 2) = make_uint4(0, 0, 0, 0);
        }
    }
    if (resident) {
        // All of x at once, in chunk order rotated by the CTA: the CTAs do not all ask L2 for the
        // same lines at the same time. One group, older than every W group, so the loop's first
        // wait covers it. (Columns past k are never read: k % 16 == 0 and whole k16 steps.)
        const int rot = blockIdx.x % chunks;
        for (int j = 0; j < chunks; ++j) {
            const int k0 = ((j + rot) % chunks) * KC;
            for (int i = tid; i < m * 8; i += THREADS) {
                const int r = i / 8, col = k0 + (i % 8) * 8;
                if (col < k) cp_async16(smem_addr(xs + (r * x_stride + col) * 2), x + (int64_t)r * ldx + col, 16);
            }
        }
        cp_async_commit();
    }

    // Chunk c (columns [c·KC, c·KC + KC)) of the weight rows and token rows into slot s.
    auto load = [&](int c, int s) {
        const int k0 = c * KC;
        const uint32_t wbase = smem_addr(smem + s * W_SLOT);
        for (int i = tid; i < F * 8; i += THREADS) {
            const int r = i / 8, ch = i % 8;
            const bool valid = k0 + ch * 8 < k && f0 + r < n;
            // An invalid chunk reads nothing; point it at w[0] (a valid address) anyway.
            const __nv_bfloat16 *src = valid ? w + (int64_t)(f0 + r) * k + k0 + ch * 8 : w;
            cp_async16(wbase + r * 128 + ((ch ^ (r & 7)) * 16), src, valid ? 16 : 0);
        }
        if (x_mode != X_RING) return;
        const uint32_t xbase = smem_addr(xs + s * x_slot);
        for (int i = tid; i < m * 8; i += THREADS) {
            const int r = i / 8, ch = i % 8;
            if (k0 + ch * 8 < k) cp_async16(xbase + (r * STRIDE + ch * 8) * 2, x + (int64_t)r * ldx + k0 + ch * 8, 16);
        }
    };

    float acc[F / 2];
#pragma unroll
    for (int i = 0; i < F / 2; ++i) acc[i] = 0.0f;

    for (int s = 0; s < stages - 1; ++s) {
        if (s < chunks) load(s, s);
        cp_async_commit();
    }

    // ldmatrix lane address within an x slot (bytes): rows 16·warp + lane % 16, columns
    // 8·(lane / 16): the A fragment of one k16 step (a warp whose rows are all ≥ mt loads none).
    const bool has_rows = 16 * warp < mt;
    const uint32_t a_off = ((16 * warp + lane % 16) * x_stride + (lane / 16) * 8) * 2;

    for (int c = 0; c < chunks; ++c) {
        cp_async_wait_pending(stages - 2); // chunk c has landed (this thread's part)
        // The W tile was written through the generic proxy (cp.async) and is read next by the
        // async proxy (wgmma): each thread fences its writes before the barrier publishes them.
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
        __syncthreads(); // everyone's part; and slot (c − 1) % stages is free
        const int next = c + stages - 1;
        if (next < chunks) load(next, next % stages);
        cp_async_commit();
        const int s = c % stages;
        const int steps = min(KC, k - c * KC) / 16;
        uint32_t a[4][4];
#pragma unroll
        for (int ks = 0; ks < 4; ++ks) {
            a[ks][0] = a[ks][1] = a[ks][2] = a[ks][3] = 0u;
            if (has_rows && ks < steps) {
                const uint32_t tile = resident ? smem_addr(xs) + c * KC * 2 : smem_addr(xs + s * x_slot);
                ldmatrix_x4(a[ks], tile + a_off + ks * 32);
            }
        }
        const uint32_t wtile = smem_addr(smem + s * W_SLOT);
        wgmma_fence();
#pragma unroll
        for (int ks = 0; ks < 4; ++ks)
            if (ks < steps) wgmma_rs(acc, a[ks], make_desc(wtile + ks * 32, 16, 1024, 1), c > 0 || ks > 0);
        wgmma_commit();
        wgmma_wait<0>();
        pin_regs(acc);
    }
    cp_async_wait_pending(0); // nothing left in flight at exit (the trailing groups are empty)

    // Accumulator layout (m64nFk16, f32): warp q holds tokens 16q + g and 16q + g + 8 (lane =
    // 4g + t4), features 8j + 2·t4 + {0, 1} of the CTA's F.
    if (!has_rows) return;
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
#define JV4_STREAM_BODY(ROWS, F32OUT) linear_stream_block<ROWS, F32OUT>(x, ldx, w, bias, y, ldy, m, n, k, accumulate, stages, x_mode)
#else
#define JV4_STREAM_BODY(ROWS, F32OUT) __trap()
#endif
#define JV4_LINEAR_STREAM(ROWS, NAME, F32OUT)                                                       \
    extern "C" __global__ void __launch_bounds__(THREADS)                                           \
        linear_stream_r##ROWS##_##NAME(const __nv_bfloat16 *x, int64_t ldx, const __nv_bfloat16 *w, \
                                       const __nv_bfloat16 *bias, void *y, int64_t ldy, int m, int n, \
                                       int k, int accumulate, int stages, int x_mode) {             \
        JV4_STREAM_BODY(ROWS, F32OUT);                                                              \
    }
JV4_LINEAR_STREAM(16, bf16, false)
JV4_LINEAR_STREAM(32, bf16, false)
JV4_LINEAR_STREAM(64, bf16, false)
JV4_LINEAR_STREAM(16, f32, true)
JV4_LINEAR_STREAM(32, f32, true)
JV4_LINEAR_STREAM(64, f32, true)
