// Status: off by default (src/ops/linear.rs, STREAM_DEFAULT): slower than cuBLASLt and not bitwise
// equal to it on the H200 (benches/NOTES.md).
//
// linear_stream: y[m, n] = x[m, k] · w[n, k]ᵀ (+ y when accumulate) (+ bias[n]) for small m
// (1 ≤ m ≤ 64 tokens): a weight-streaming GEMM. At such m a projection is a read of its weights
// (n·k·2 bytes against m·k·2 of x), so the kernel is built to keep HBM busy: every CTA owns a
// slice of F output features and ALL of k, and streams its weight rows (and the x tile beside
// them, which L2 serves) through a multi-stage cp.async ring in shared memory.
//
// Batch invariance (why there is no split of K anywhere, not even between the warps of a CTA):
//   each output element is ONE f32 accumulator, fed by mma.sync m16n8k16 (bf16 × bf16 → f32) in
//   k16 steps from k = 0 upward; then the epilogue in f32 (the old y first, then the bias: the
//   order of cuBLASLt's `alpha·acc + beta·C` then its bias epilogue) and one rounding to bf16
//   (round to nearest even) for a bf16 y. The order of the additions depends on k only, never
//   on m, the tile or the grid: a row of y gets the same bits at any m. The hypothesis this
//   kernel rests on is that cuBLASLt's unsplit algorithms (src/cuda/blas.rs) reduce in the same
//   order, so that this kernel and cuBLAS give the same bits and the op may switch between them
//   by m (`linear_stream_equals_cublas_bitwise` in tests/gpu/linear.rs decides it).
//
// MMA roles: the weights are the A operand (16 output features per m16 tile, row-major [F][k]
//   in smem), the tokens the B operand (8 tokens per n8 tile; x rows are k-contiguous, which is
//   B's "col" layout). C[f][t] = y[t, f]: lane (g = lane / 4, t4 = lane % 4) holds features g and
//   g + 8 of its tile for tokens 2·t4 and 2·t4 + 1.
//
// Decomposition: grid ceil(n / F) CTAs of 4 warps, F = 16·FM features (FM = 1, 2, 4: the
//   launcher picks it so the grid covers the SMs). Tokens padded to MT = 8·ceil(m / 8) (rows ≥ m
//   are zero-filled in smem and never stored). The CTA's FM × MT/8 (m16, n8) tiles are split
//   between the warps: 4 / FM warps per m16 tile, each taking a contiguous run of its n8 tiles
//   (a warp with no tile only loads). k is walked in chunks of KC = 64 (4 k16 steps); a chunk
//   past k % 64 runs only its valid k16 steps (k % 16 == 0 is required).
//
// Ring: `stages` slots (runtime, 2..16, chosen by the launcher from the smem budget), each
//   holding W [F][KC + 8] and X [MT][KC + 8] bf16; rows padded by 16 bytes so that the 8 rows of
//   every ldmatrix 8×8 block fall in distinct bank groups. The classic multistage loop: the
//   first stages − 1 chunks are in flight before the loop; at chunk c, wait until chunk c has
//   landed (at most stages − 2 groups pending), barrier, issue chunk c + stages − 1 into the
//   slot chunk c − 1 used, then run chunk c's MMAs. Out-of-range rows and columns are loaded as
//   zeros (cp.async src-size 0) and never read by an MMA that reaches the output.
//
// Layout: x [m, ldx] and y [m, ldy] row-major (ldx ≥ k, ldy ≥ n: column windows of wider
//   buffers, the folded LoRA's `[x | t]`), w [n, k] row-major, bias [n] or null. x and y may be
//   the same buffer when the columns read and written do not overlap (linear_cols): neither is
//   declared __restrict__. Requires: x, w 16-byte aligned, ldx % 8 == 0, k % 16 == 0.
//
// ptxas (13.0, sm_90a): 40 / 48 / 56 registers for r16 / r32 / r64 (bf16 and f32 outputs alike),
//   no spills, no stack frame; so the smem ring, not registers, bounds the CTAs per SM.
//
// Measured (H200): filled in by the integrator (bench rows `linear_stream/...`).
#include "common.cuh"

namespace {

constexpr int WARPS = 4;
constexpr int THREADS = WARPS * 32;
constexpr int KC = 64;          // k per ring slot
constexpr int STRIDE = KC + 8;  // smem row stride in elements (144 bytes)
constexpr int MAX_NT = 8;       // n8 token tiles: m ≤ 64
constexpr int MAX_STAGES = 16;  // = ops::linear's STREAM_MAX_STAGES

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
__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(addr)
                 : "memory");
}

// c += a·b, one m16n8k16 tile: a = 16×16 bf16 (row), b = 16×8 bf16 (col), c = 16×8 f32.
__device__ __forceinline__ void mma_bf16(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
                 "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

template <int FM, bool F32OUT>
__device__ __forceinline__ void linear_stream_block(const __nv_bfloat16 *x, int64_t ldx,
                                                    const __nv_bfloat16 *__restrict__ w,
                                                    const __nv_bfloat16 *__restrict__ bias, void *y,
                                                    int64_t ldy, int m, int n, int k, int accumulate,
                                                    int stages) {
    constexpr int F = 16 * FM;                 // output features per CTA
    constexpr int WPM = WARPS / FM;            // warps per m16 tile
    constexpr int NPW = MAX_NT / WPM;          // most n8 tiles a warp holds
    constexpr int CHUNKS_PER_ROW = KC / 8;     // 16-byte chunks per smem row of a slot
    static_assert(WARPS % FM == 0, "FM divides the warps");
    extern __shared__ __align__(16) unsigned char smem_raw[];
    __nv_bfloat16 *smem = reinterpret_cast<__nv_bfloat16 *>(smem_raw);

    const int nt = (m + 7) / 8; // n8 tiles of tokens
    const int rows = F + nt * 8; // smem rows per slot: F weight rows, then the token rows
    const int slot_elems = rows * STRIDE;
    const int f0 = blockIdx.x * F;
    const int chunks = (k + KC - 1) / KC;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;

    // This warp's tiles: m16 tile mi, n8 tiles [ni0, ni0 + count).
    const int mi = warp / WPM;
    const int per_warp = (nt + WPM - 1) / WPM;
    const int ni0 = (warp % WPM) * per_warp;
    const int count = min(per_warp, nt - ni0); // ≤ 0: no tile, the warp only loads

    // Chunk c (columns [c·KC, c·KC + KC)) of the weight rows and token rows into slot s.
    auto load = [&](int c, int s) {
        const uint32_t base = smem_addr(smem + s * slot_elems);
        const int k0 = c * KC;
        for (int i = tid; i < rows * CHUNKS_PER_ROW; i += THREADS) {
            const int r = i / CHUNKS_PER_ROW;
            const int col = (i % CHUNKS_PER_ROW) * 8;
            const bool in_k = k0 + col < k;
            const __nv_bfloat16 *src;
            bool valid;
            if (r < F) {
                valid = in_k && f0 + r < n;
                src = w + (int64_t)(f0 + r) * k + k0 + col;
            } else {
                valid = in_k && r - F < m;
                src = x + (int64_t)(r - F) * ldx + k0 + col;
            }
            // An invalid chunk reads nothing; point it at w[0] (a valid address) anyway.
            cp_async16(base + (r * STRIDE + col) * 2, valid ? src : w, valid ? 16 : 0);
        }
    };

    float acc[NPW][4];
#pragma unroll
    for (int j = 0; j < NPW; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;

    for (int s = 0; s < stages - 1; ++s) {
        if (s < chunks) load(s, s);
        cp_async_commit();
    }

    // ldmatrix lane addresses within a slot (bytes): A rows mi·16 + lane % 16, column 8·(lane / 16);
    // B rows F + 8·ni + lane % 8, column 8·((lane / 8) % 2) (lanes 16–31 repeat 0–15, unused by x2).
    const uint32_t a_off = ((mi * 16 + lane % 16) * STRIDE + (lane / 16) * 8) * 2;
    const uint32_t b_off = ((F + ni0 * 8 + lane % 8) * STRIDE + ((lane / 8) % 2) * 8) * 2;

    for (int c = 0; c < chunks; ++c) {
        cp_async_wait_pending(stages - 2); // chunk c has landed (this thread's part)
        __syncthreads();                   // everyone's part; and slot (c − 1) % stages is free
        const int next = c + stages - 1;
        if (next < chunks) load(next, next % stages);
        cp_async_commit();
        if (count > 0) {
            const uint32_t slot = smem_addr(smem + (c % stages) * slot_elems);
            const int steps = min(KC, k - c * KC) / 16;
#pragma unroll
            for (int ks = 0; ks < KC / 16; ++ks) {
                if (ks < steps) {
                    uint32_t a[4];
                    ldmatrix_x4(a, slot + a_off + ks * 32);
#pragma unroll
                    for (int j = 0; j < NPW; ++j) {
                        if (j < count) {
                            uint32_t b[2];
                            ldmatrix_x2(b, slot + b_off + j * 8 * STRIDE * 2 + ks * 32);
                            mma_bf16(acc[j], a, b);
                        }
                    }
                }
            }
        }
    }
    cp_async_wait_pending(0); // nothing left in flight at exit (the trailing groups are empty)

    if (count <= 0) return;
    const int g = lane / 4, t4 = lane % 4;
#pragma unroll
    for (int j = 0; j < NPW; ++j) {
        if (j >= count) continue;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int f = f0 + mi * 16 + g + 8 * h;
            if (f >= n) continue;
            const float b = bias != nullptr ? __bfloat162float(bias[f]) : 0.0f;
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int tok = (ni0 + j) * 8 + 2 * t4 + e;
                if (tok >= m) continue;
                float v = acc[j][2 * h + e];
                if constexpr (F32OUT) {
                    float *p = static_cast<float *>(y) + (int64_t)tok * ldy + f;
                    if (accumulate) v = v + *p;
                    if (bias != nullptr) v = v + b;
                    *p = v;
                } else {
                    __nv_bfloat16 *p = static_cast<__nv_bfloat16 *>(y) + (int64_t)tok * ldy + f;
                    if (accumulate) v = v + __bfloat162float(*p);
                    if (bias != nullptr) v = v + b;
                    *p = __float2bfloat16_rn(v);
                }
            }
        }
    }
}

} // namespace

// One entry per (features per CTA, output type): linear_stream_r{16,32,64}_{bf16,f32}.
#define JV4_LINEAR_STREAM(FM, ROWS, NAME, F32OUT)                                                   \
    extern "C" __global__ void __launch_bounds__(THREADS)                                           \
        linear_stream_r##ROWS##_##NAME(const __nv_bfloat16 *x, int64_t ldx, const __nv_bfloat16 *w, \
                                       const __nv_bfloat16 *bias, void *y, int64_t ldy, int m, int n, \
                                       int k, int accumulate, int stages) {                         \
        linear_stream_block<FM, F32OUT>(x, ldx, w, bias, y, ldy, m, n, k, accumulate, stages);      \
    }
JV4_LINEAR_STREAM(1, 16, bf16, false)
JV4_LINEAR_STREAM(2, 32, bf16, false)
JV4_LINEAR_STREAM(4, 64, bf16, false)
JV4_LINEAR_STREAM(1, 16, f32, true)
JV4_LINEAR_STREAM(2, 32, f32, true)
JV4_LINEAR_STREAM(4, 64, f32, true)
