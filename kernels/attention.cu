// flash_attn: softmax(scale · q·kᵀ + mask) · v over packed variable-length segments, without ever
// forming the L×L score matrix (FlashAttention-2, Dao 2023). Used by the ViT (head_dim 80, 16:16
// heads, non-causal, segments = windows or whole images) and the LM (head_dim 128, GQA 16:2,
// causal, segments = documents).
//
// Math, per segment [s, e) of cu_seqlens, query head h, kv head g = h / (H / Hkv), query i:
//   out[s+i, h] = Σ_j p_j · v[s+j, g] / Σ_j p_j,   p_j = exp(scale · q[s+i, h]·k[s+j, g] − m),
//   j over the segment (causal: j ≤ i); m is the running row maximum (online softmax: when a
//   new key block raises it, the partial sums O and l are multiplied by exp(m_old − m_new)).
//   The scale is folded into the exponent base: p = exp2(s·scale·log2(e) − m·scale·log2(e)).
//
// Layout: qkv [T, row] bf16 row-major, row ≥ (H + 2·Hkv)·D, row % 8 == 0; q of head h at
//   columns [h·D, h·D + D), k of kv head g at [(H + g)·D, …), v at [(H + Hkv + g)·D, …) (the
//   fused q|k|v projection's output, read in place). out [T, H·D] bf16. cu_seqlens [S+1] i32,
//   0 = c₀ ≤ c₁ ≤ … ≤ c_S = T (values are clamped to [0, T], so a bad table cannot read out of
//   bounds).
//
// Precision: q·kᵀ and p·v on tensor cores, mma.sync m16n8k16 bf16 × bf16 → f32. Scores, the
//   running max and sum and the exponentials are f32 (exp2f); p is rounded to bf16 for the p·v
//   product (as FlashAttention-2 does) while the denominator sums the unrounded f32 p. O is
//   accumulated in f32 and rounded to bf16 once, after the division.
//
// Decomposition: grid (ceil(max_seqlen / BM), H, S); the CTA at blockIdx (x, h, s) owns query
//   block m = gridDim.x − 1 − x of segment s (the longest causal rows are launched first) and
//   exits at once when that block starts past the segment's end. 4 warps; BN = 64 keys per k/v
//   tile; two query tilings (the op picks one, tests run both):
//   - BM = 64 (MT = 1): 16 rows per warp, one m16 MMA tile; the warp's Q fragments are loaded
//     once into registers. Fewest registers (3 CTAs per SM); no idle rows on 64-patch windows.
//   - BM = 128 (MT = 2): 32 rows per warp, two m16 tiles sharing every K and V fragment (half
//     the shared-memory reads and half the L2 → SM traffic per FLOP); Q fragments are re-read
//     from smem at each k16 step, as FlashAttention-2 does for head dim 128 (2 CTAs per SM).
//   Key blocks are visited from the last one needed down to 0, so the masked blocks (the
//   causal diagonal, the segment end) come first and the rest run without mask code. A warp
//   whose rows all lie before a causal block's first key, or past the segment end, skips that
//   block's math but still joins the loads and barriers.
//
// Per key block (one k buffer and one v buffer, FlashAttention-2's overlap):
//   1. cp.async v[nb] (lands while 2 runs);   2. S = Q·K[nb]ᵀ;
//   3. mask (only blocks that reach past the warp's first row or the segment end);
//   4. wait v, barrier; cp.async k[nb−1] (lands while 5 runs);
//   5. online softmax in registers, P → bf16 A fragments (the S accumulator layout of m16n8 is
//      the A layout of m16k16), O += P·V[nb];   6. wait k, barrier.
//   Rows or keys past the segment end are zero-filled by cp.async (src-size 0) and keys masked
//   to −∞, so no garbage ever reaches an accumulator; fully masked rows keep m = −∞ and use 0 in
//   its place in the exponent (exp2(−∞) = 0, no NaN).
//
// Shared memory: Q [BM][D+8], K [BN][D+8], V [BN][D+8] bf16; rows padded by 16 bytes so that the
//   8 rows of every ldmatrix 8×8 block fall in 8 distinct 16-byte bank groups (row strides of 17
//   and 11 chunks for D = 128 and 80). (BM + 128)·(D + 8)·2 bytes: 52,224 / 69,632 B for
//   D = 128 and 33,792 / 45,056 B for D = 80 (BM 64 / 128); above 48 KB the launcher raises the
//   function's limit. The output is staged through each warp's own Q rows (read only by that
//   warp) and written with 16-byte stores.
//
// Head dims: D = 128 (8 k16 steps for q·kᵀ, 16 n8 tiles for p·v) and D = 80 (5 k16 steps, 10 n8
//   tiles): both multiples of 16, so no padding of the MMA shapes is needed.
//
// ptxas (13.0, sm_90a): d128: 168 registers (BM 64; 4 B spilled: one L1 reload per key block),
//   255 (BM 128; 88 B spill stores, a few per key block); d80: 158 (BM 64), 253 (BM 128), no spills.
#include "common.cuh"

namespace {

constexpr int WARPS = 4;
constexpr int THREADS = WARPS * 32;
constexpr int BN = 64;       // keys per k/v tile
constexpr int NT_S = BN / 8; // n8 tiles of a score row block

// Head dim D, MT m16 row tiles per warp (1 or 2).
template <int D, int MT> struct Cfg {
    static_assert(D % 16 == 0, "head_dim must be a multiple of 16");
    static_assert(MT == 1 || MT == 2, "one or two m16 tiles per warp");
    static constexpr int BM = 16 * MT * WARPS; // query rows per CTA
    static constexpr int CHUNKS = D / 8;       // 16-byte chunks per row
    static constexpr int STRIDE = D + 8;       // smem row stride in elements (one chunk of padding)
    static constexpr int KSTEPS = D / 16;      // k16 steps of q·kᵀ
    static constexpr int NT_O = D / 8;         // n8 tiles of the output
    // One m16 tile per warp: the warp's Q fragments stay in registers for the whole loop. Two:
    // they are re-read from smem at every k16 step (registers go to the doubled O and S).
    static constexpr bool Q_IN_REGS = MT == 1;
    static constexpr int SMEM_BYTES = (BM + 2 * BN) * STRIDE * 2;
};

__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr)
                 : "memory");
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr)
                 : "memory");
}

// c += a·b, one m16n8k16 tile: a = 16×16 bf16 (row), b = 16×8 bf16 (col), c = 16×8 f32.
__device__ __forceinline__ void mma_bf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
                 "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi); // .x (low half) = lo: the lower k index
    return *reinterpret_cast<uint32_t *>(&v);
}

// Rows [r0, r0 + ROWS) of one head's [len, D] slice (row stride `stride` elements) into smem
// [ROWS][STRIDE]; rows at or past len become zeros. Thread i copies 16-byte chunk i % 16 of rows
// i / 16, i / 16 + 8, …: 8 rows per pass, consecutive threads on consecutive chunks (for D = 80
// only 10 of the 16 lanes per row have a chunk), so a thread keeps one source pointer and one
// destination address and steps them by 8 rows.
template <int D, int ROWS>
__device__ __forceinline__ void load_tile(__nv_bfloat16 *s, const __nv_bfloat16 *g, int64_t stride, int r0,
                                          int len) {
    using C = Cfg<D, 1>;
    static_assert(C::CHUNKS <= 16 && ROWS % (THREADS / 16) == 0, "tile shape");
    constexpr int PASS_ROWS = THREADS / 16;
    const int c = threadIdx.x % 16;
    const int r = threadIdx.x / 16;
    if (c < C::CHUNKS) {
        const __nv_bfloat16 *src = g + (int64_t)(r0 + r) * stride + c * 8;
        const uint32_t dst = smem_addr(s + r * C::STRIDE + c * 8);
#pragma unroll
        for (int it = 0; it < ROWS / PASS_ROWS; ++it) {
            const bool valid = r0 + r + it * PASS_ROWS < len;
            // An invalid row reads nothing; point it at row 0 (inside the segment) anyway.
            cp_async16(dst + it * PASS_ROWS * C::STRIDE * 2, valid ? src + it * PASS_ROWS * stride : g,
                       valid ? 16 : 0);
        }
    }
}

template <int D, int MT>
__device__ __forceinline__ void flash_attn_block(const __nv_bfloat16 *__restrict__ qkv,
                                                 __nv_bfloat16 *__restrict__ out,
                                                 const int *__restrict__ cu_seqlens, int64_t tokens,
                                                 int64_t row, int heads, int kv_heads, int causal,
                                                 float scale_log2) {
    using C = Cfg<D, MT>;
    constexpr int BM = C::BM;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    __nv_bfloat16 *sQ = reinterpret_cast<__nv_bfloat16 *>(smem_raw);
    __nv_bfloat16 *sK = sQ + BM * C::STRIDE;
    __nv_bfloat16 *sV = sK + BN * C::STRIDE;

    const int seg = blockIdx.z;
    const int head = blockIdx.y;
    const int m_block = gridDim.x - 1 - blockIdx.x;
    const int64_t end = min(max((int64_t)cu_seqlens[seg + 1], (int64_t)0), tokens);
    const int64_t start = min(max((int64_t)cu_seqlens[seg], (int64_t)0), end);
    const int len = (int)(end - start);
    const int q0 = m_block * BM;
    if (q0 >= len) return; // uniform over the CTA: before any barrier

    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int kvh = head / (heads / kv_heads);
    const __nv_bfloat16 *gQ = qkv + start * row + (int64_t)head * D;
    const __nv_bfloat16 *gK = qkv + start * row + (int64_t)(heads + kvh) * D;
    const __nv_bfloat16 *gV = qkv + start * row + (int64_t)(heads + kv_heads + kvh) * D;

    // Key blocks [0, n_end): all of the segment, or (causal) up to the CTA's last query row.
    const int kv_len = causal ? min(len, q0 + BM) : len;
    const int n_end = (kv_len + BN - 1) / BN;

    load_tile<D, BM>(sQ, gQ, row, q0, len);
    load_tile<D, BN>(sK, gK, row, (n_end - 1) * BN, len);
    cp_async_commit();
    cp_async_wait_all();
    __syncthreads();

    // This warp's rows: [wq0, wq0 + 16·MT) of the CTA's block (segment-relative indices).
    const int wq0 = q0 + warp * 16 * MT;
    // Q fragments (A layout: ldmatrix matrices 0..3 = rows 0-7 / 8-15 × cols 0-7 / 8-15 of a
    // 16×16 block; lane l addresses row l % 16, column 8·(l / 16)).
    const uint32_t sQ_lane = smem_addr(sQ + (warp * 16 * MT + lane % 16) * C::STRIDE + (lane / 16) * 8);
    uint32_t qf[C::Q_IN_REGS ? C::KSTEPS : 1][4];
    if constexpr (C::Q_IN_REGS) {
#pragma unroll
        for (int ks = 0; ks < C::KSTEPS; ++ks) ldmatrix_x4(qf[ks], sQ_lane + ks * 16 * 2);
    }

    // This thread's rows of each m16 tile: g and g + 8 (g = lane / 4); columns 2t, 2t + 1.
    const int g = lane / 4, t = lane % 4;

    float o[MT][C::NT_O][4];
    float row_max[MT][2], row_sum[MT][2]; // max of raw scores; this thread's partial sums
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int j = 0; j < C::NT_O; ++j) o[mt][j][0] = o[mt][j][1] = o[mt][j][2] = o[mt][j][3] = 0.f;
        row_max[mt][0] = row_max[mt][1] = -INFINITY;
        row_sum[mt][0] = row_sum[mt][1] = 0.f;
    }

    // ldmatrix lane offsets into K (non-transposed: B fragments of q·kᵀ; matrices = keys 0-7 /
    // 8-15 × dims 0-7 / 8-15 in the order b0, b1 of n-tile 0, b0, b1 of n-tile 1) and into V
    // (transposed: B fragments of p·v; matrices = keys 0-7 / 8-15 × dims 0-7 / 8-15 in the order
    // b0, b1 of d-tile 0, b0, b1 of d-tile 1).
    const uint32_t sK_lane =
        smem_addr(sK + ((lane % 8) + 8 * (lane / 16)) * C::STRIDE + 8 * ((lane / 8) % 2));
    const uint32_t sV_lane =
        smem_addr(sV + ((lane % 8) + 8 * ((lane / 8) % 2)) * C::STRIDE + 8 * (lane / 16));

    for (int nb = n_end - 1; nb >= 0; --nb) {
        // Here K[nb] is in smem, visible to all, and no warp reads V any more.
        load_tile<D, BN>(sV, gV, row, nb * BN, len);
        cp_async_commit();

        const int k0 = nb * BN;
        // A warp whose rows all lie past the segment end, or (causal) all before this block's
        // first key, would only see −∞ scores: it skips the math (its state stays as it is) but
        // still takes part in the loads and barriers.
        const bool active = wq0 < len && (!causal || k0 <= wq0 + 16 * MT - 1);

        float s[MT][NT_S][4];
        if (active) {
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int j = 0; j < NT_S; ++j) s[mt][j][0] = s[mt][j][1] = s[mt][j][2] = s[mt][j][3] = 0.f;
#pragma unroll
            for (int ks = 0; ks < C::KSTEPS; ++ks) {
                uint32_t qa[MT][4];
                if constexpr (C::Q_IN_REGS) {
#pragma unroll
                    for (int i = 0; i < 4; ++i) qa[0][i] = qf[ks][i];
                } else {
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt)
                        ldmatrix_x4(qa[mt], sQ_lane + (mt * 16 * C::STRIDE + ks * 16) * 2);
                }
#pragma unroll
                for (int np = 0; np < NT_S / 2; ++np) {
                    uint32_t kb[4];
                    ldmatrix_x4(kb, sK_lane + (np * 16 * C::STRIDE + ks * 16) * 2);
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) {
                        mma_bf16(s[mt][2 * np], qa[mt], kb[0], kb[1]);
                        mma_bf16(s[mt][2 * np + 1], qa[mt], kb[2], kb[3]);
                    }
                }
            }
            // Masks: keys past the segment end, and (causal) keys after the query. Only blocks
            // that reach past the segment end or past the warp's first row need them.
            if (k0 + BN > len || (causal && k0 + BN - 1 > wq0)) {
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
                    for (int j = 0; j < NT_S; ++j) {
#pragma unroll
                        for (int e = 0; e < 4; ++e) {
                            const int key = k0 + j * 8 + 2 * t + (e & 1);
                            const int qi = wq0 + mt * 16 + g + 8 * (e >> 1);
                            if (key >= len || (causal && key > qi)) s[mt][j][e] = -INFINITY;
                        }
                    }
                }
            }
        }

        cp_async_wait_all(); // V[nb] landed
        __syncthreads();     // ... for every thread; and every warp is done reading K[nb]
        if (nb > 0) {
            load_tile<D, BN>(sK, gK, row, (nb - 1) * BN, len);
            cp_async_commit();
        }

        if (active) {
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                // Online softmax. Each row's 64 scores are spread over the 4 threads of a quad.
                float mx[2] = {row_max[mt][0], row_max[mt][1]};
#pragma unroll
                for (int j = 0; j < NT_S; ++j) {
                    mx[0] = fmaxf(mx[0], fmaxf(s[mt][j][0], s[mt][j][1]));
                    mx[1] = fmaxf(mx[1], fmaxf(s[mt][j][2], s[mt][j][3]));
                }
                float m_scaled[2], corr[2];
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
                    mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
                    // A row with every key masked so far keeps −∞; 0 stands in so that exp2
                    // gives 0, not NaN.
                    m_scaled[r] = mx[r] == -INFINITY ? 0.f : mx[r] * scale_log2;
                    corr[r] = exp2f(row_max[mt][r] * scale_log2 - m_scaled[r]); // 0 at the start
                    row_max[mt][r] = mx[r];
                    row_sum[mt][r] *= corr[r];
                }
#pragma unroll
                for (int j = 0; j < C::NT_O; ++j) {
                    o[mt][j][0] *= corr[0];
                    o[mt][j][1] *= corr[0];
                    o[mt][j][2] *= corr[1];
                    o[mt][j][3] *= corr[1];
                }
#pragma unroll
                for (int j = 0; j < NT_S; ++j) {
#pragma unroll
                    for (int e = 0; e < 4; ++e)
                        s[mt][j][e] = exp2f(fmaf(s[mt][j][e], scale_log2, -m_scaled[e >> 1]));
                    row_sum[mt][0] += s[mt][j][0] + s[mt][j][1];
                    row_sum[mt][1] += s[mt][j][2] + s[mt][j][3];
                }
            }
            // O += P·V, P rounded to bf16: the C fragments of n-tiles 2kk, 2kk+1 are the A
            // fragment of k16 step kk.
#pragma unroll
            for (int kk = 0; kk < BN / 16; ++kk) {
                uint32_t pa[MT][4];
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    pa[mt][0] = pack_bf16(s[mt][2 * kk][0], s[mt][2 * kk][1]);
                    pa[mt][1] = pack_bf16(s[mt][2 * kk][2], s[mt][2 * kk][3]);
                    pa[mt][2] = pack_bf16(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
                    pa[mt][3] = pack_bf16(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
                }
#pragma unroll
                for (int dp = 0; dp < C::NT_O / 2; ++dp) {
                    uint32_t vb[4];
                    ldmatrix_x4_trans(vb, sV_lane + (kk * 16 * C::STRIDE + dp * 16) * 2);
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) {
                        mma_bf16(o[mt][2 * dp], pa[mt], vb[0], vb[1]);
                        mma_bf16(o[mt][2 * dp + 1], pa[mt], vb[2], vb[3]);
                    }
                }
            }
        }

        cp_async_wait_all(); // K[nb−1] landed
        __syncthreads();     // ... for every thread; and every warp is done reading V[nb]
    }

    // Epilogue: full row sums, O / l, staged in this warp's own Q rows (which no other warp
    // reads), then 16-byte stores of the rows inside the segment.
    __nv_bfloat16 *sO = sQ + warp * 16 * MT * C::STRIDE;
    __syncwarp();
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        float inv[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float l = row_sum[mt][r];
            l += __shfl_xor_sync(0xffffffffu, l, 1);
            l += __shfl_xor_sync(0xffffffffu, l, 2);
            inv[r] = l > 0.f ? 1.f / l : 0.f;
        }
#pragma unroll
        for (int j = 0; j < C::NT_O; ++j) {
            const int col = j * 8 + 2 * t;
            *reinterpret_cast<__nv_bfloat162 *>(sO + (mt * 16 + g) * C::STRIDE + col) =
                __floats2bfloat162_rn(o[mt][j][0] * inv[0], o[mt][j][1] * inv[0]);
            *reinterpret_cast<__nv_bfloat162 *>(sO + (mt * 16 + g + 8) * C::STRIDE + col) =
                __floats2bfloat162_rn(o[mt][j][2] * inv[1], o[mt][j][3] * inv[1]);
        }
    }
    __syncwarp();
    const int64_t out_stride = (int64_t)heads * D;
    __nv_bfloat16 *gO = out + start * out_stride + (int64_t)head * D;
    constexpr int OUT_CHUNKS = 16 * MT * C::CHUNKS;
    static_assert(OUT_CHUNKS % 32 == 0, "output chunks must divide among the lanes");
#pragma unroll
    for (int it = 0; it < OUT_CHUNKS / 32; ++it) {
        const int i = it * 32 + lane;
        const int r = i / C::CHUNKS;
        const int c = i - r * C::CHUNKS;
        const int q = wq0 + r;
        if (q < len)
            *reinterpret_cast<bf16x8 *>(gO + (int64_t)q * out_stride + c * 8) =
                *reinterpret_cast<const bf16x8 *>(sO + r * C::STRIDE + c * 8);
    }
}

static_assert(Cfg<128, 1>::SMEM_BYTES == 52224 && Cfg<80, 1>::SMEM_BYTES == 33792 &&
                  Cfg<128, 2>::SMEM_BYTES == 69632 && Cfg<80, 2>::SMEM_BYTES == 45056,
              "src/ops/attention.rs passes these shared-memory sizes");

} // namespace

// One entry per head dim and query tile (BM = 64: one m16 tile per warp, Q in registers;
// BM = 128: two, Q re-read from smem). row: the qkv row stride in elements; scale_log2 = scale ·
// log2(e); causal: 0 or 1. Launch: grid (ceil(max_seqlen / BM), heads, segments), 128 threads,
// dynamic shared memory Cfg<D, MT>::SMEM_BYTES = (BM + 128) · (D + 8) · 2 bytes.
#define FLASH_ATTN_ENTRY(name, D, MT, MIN_CTAS)                                                              \
    extern "C" __global__ void __launch_bounds__(THREADS, MIN_CTAS)                                               \
        name(const __nv_bfloat16 *__restrict__ qkv, __nv_bfloat16 *__restrict__ out,                        \
             const int *__restrict__ cu_seqlens, int64_t tokens, int64_t row, int heads, int kv_heads,      \
             int causal, float scale_log2) {                                                                \
        flash_attn_block<D, MT>(qkv, out, cu_seqlens, tokens, row, heads, kv_heads, causal, scale_log2);   \
    }
FLASH_ATTN_ENTRY(flash_attn_bf16_d128_m64, 128, 1, 3)
FLASH_ATTN_ENTRY(flash_attn_bf16_d128_m128, 128, 2, 2)
FLASH_ATTN_ENTRY(flash_attn_bf16_d80_m64, 80, 1, 3)
FLASH_ATTN_ENTRY(flash_attn_bf16_d80_m128, 80, 2, 2)
