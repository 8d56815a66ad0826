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
//   exits at once when that block starts past the segment's end. 4 warps, BM = 64 query rows
//   (16 per warp: one m16 MMA tile), BN = 64 keys per k/v tile. Key blocks are visited from the
//   last one needed down to 0 (causal: the last is the diagonal block, so it alone needs the
//   causal mask; the segment-end mask likewise falls on the first block visited).
//
// Per key block (one k buffer and one v buffer, FlashAttention-2's overlap):
//   1. cp.async v[nb] (lands while 2 runs);   2. S = Q·K[nb]ᵀ (Q fragments live in registers);
//   3. mask (only blocks that reach past the diagonal or the segment end);
//   4. wait v, barrier; cp.async k[nb−1] (lands while 5 runs);
//   5. online softmax in registers, P → bf16 A fragments (the S accumulator layout of m16n8 is
//      the A layout of m16k16), O += P·V[nb];   6. wait k, barrier.
//   Rows or keys past the segment end are zero-filled by cp.async (src-size 0) and keys masked
//   to −∞, so no garbage ever reaches an accumulator; fully masked rows keep m = −∞ and use 0 in
//   its place in the exponent (exp2(−∞) = 0, no NaN).
//
// Shared memory: Q [BM][D+8], K [BN][D+8], V [BN][D+8] bf16; rows padded by 16 bytes so that the
//   8 rows of every ldmatrix 8×8 block fall in 8 distinct 16-byte bank groups (row strides of 17
//   and 11 chunks for D = 128 and 80). D = 128: 52,224 B (above the 48 KB default: the launcher
//   raises the function's limit); D = 80: 33,792 B. The output is staged through each warp's own
//   16 Q rows (read only by that warp) and written with 16-byte stores.
//
// Head dims: D = 128 (8 k16 steps for q·kᵀ, 16 n8 tiles for p·v) and D = 80 (5 k16 steps, 10 n8
//   tiles): both multiples of 16, so no padding of the MMA shapes is needed.
#include "common.cuh"

namespace {

constexpr int WARPS = 4;
constexpr int THREADS = WARPS * 32;
constexpr int BM = 16 * WARPS; // query rows per CTA
constexpr int BN = 64;         // keys per k/v tile
constexpr int NT_S = BN / 8;   // n8 tiles of a score row block

template <int D> struct Dims {
    static_assert(D % 16 == 0, "head_dim must be a multiple of 16");
    static constexpr int CHUNKS = D / 8;  // 16-byte chunks per row
    static constexpr int STRIDE = D + 8;  // smem row stride in elements (one chunk of padding)
    static constexpr int KSTEPS = D / 16; // k16 steps of q·kᵀ
    static constexpr int NT_O = D / 8;    // n8 tiles of the output
    static constexpr int SMEM_BYTES = (BM + 2 * BN) * STRIDE * 2;
};

__device__ __forceinline__ uint32_t smem_addr(const void *p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global → shared, asynchronous; src_bytes = 0 writes 16 zero bytes and reads nothing.
__device__ __forceinline__ void cp_async16(uint32_t dst, const void *src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes)
                 : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
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
// [ROWS][STRIDE]; rows at or past len become zeros. Every thread issues ROWS·CHUNKS/THREADS
// copies (exact for both head dims), consecutive threads take consecutive 16-byte chunks.
template <int D, int ROWS>
__device__ __forceinline__ void load_tile(__nv_bfloat16 *s, const __nv_bfloat16 *g, int64_t stride, int r0,
                                          int len) {
    using P = Dims<D>;
    constexpr int TOTAL = ROWS * P::CHUNKS;
    static_assert(TOTAL % THREADS == 0, "tile chunks must divide among the threads");
#pragma unroll
    for (int it = 0; it < TOTAL / THREADS; ++it) {
        const int i = it * THREADS + threadIdx.x;
        const int r = i / P::CHUNKS;
        const int c = i - r * P::CHUNKS;
        const bool valid = r0 + r < len;
        // An invalid row reads nothing; point it at row 0 (always inside the segment) anyway.
        const __nv_bfloat16 *src = g + (valid ? (int64_t)(r0 + r) * stride : 0) + c * 8;
        cp_async16(smem_addr(s + r * P::STRIDE + c * 8), src, valid ? 16 : 0);
    }
}

template <int D>
__device__ __forceinline__ void flash_attn_block(const __nv_bfloat16 *__restrict__ qkv,
                                                 __nv_bfloat16 *__restrict__ out,
                                                 const int *__restrict__ cu_seqlens, int64_t tokens,
                                                 int64_t row, int heads, int kv_heads, int causal,
                                                 float scale_log2) {
    using P = Dims<D>;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    __nv_bfloat16 *sQ = reinterpret_cast<__nv_bfloat16 *>(smem_raw);
    __nv_bfloat16 *sK = sQ + BM * P::STRIDE;
    __nv_bfloat16 *sV = sK + BN * P::STRIDE;

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

    // Q fragments of this warp's 16 rows, all k16 steps (A layout: ldmatrix matrices 0..3 =
    // rows 0-7 / 8-15 × cols 0-7 / 8-15; lane l addresses row l % 16, column 8·(l / 16)).
    uint32_t qf[P::KSTEPS][4];
#pragma unroll
    for (int ks = 0; ks < P::KSTEPS; ++ks)
        ldmatrix_x4(qf[ks], smem_addr(sQ + (warp * 16 + lane % 16) * P::STRIDE + ks * 16 + (lane / 16) * 8));

    // This thread's two rows of the m16 tile: g and g + 8 (g = lane / 4), columns 2t, 2t + 1.
    const int g = lane / 4, t = lane % 4;
    const int qrow0 = q0 + warp * 16 + g; // segment-relative query index of row g (row g+8: +8)

    float o[P::NT_O][4];
#pragma unroll
    for (int j = 0; j < P::NT_O; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
    float row_max[2] = {-INFINITY, -INFINITY}; // raw scores (before the scale)
    float row_sum[2] = {0.f, 0.f};             // this thread's partial sums; quad-reduced at the end

    // ldmatrix lane offsets (elements) into K (non-transposed: B fragments of q·kᵀ, matrices =
    // keys 0-7 / 8-15 × dims 0-7 / 8-15 in the order b0, b1 of n-tile 0, b0, b1 of n-tile 1) and
    // into V (transposed: B fragments of p·v, matrices = keys 0-7 / 8-15 × dims 0-7 / 8-15 in the
    // order b0, b1 of d-tile 0, b0, b1 of d-tile 1).
    const int k_off = ((lane % 8) + 8 * (lane / 16)) * P::STRIDE + 8 * ((lane / 8) % 2);
    const int v_off = ((lane % 8) + 8 * ((lane / 8) % 2)) * P::STRIDE + 8 * (lane / 16);
    const uint32_t sK_lane = smem_addr(sK + k_off);
    const uint32_t sV_lane = smem_addr(sV + v_off);

    for (int nb = n_end - 1; nb >= 0; --nb) {
        // Here K[nb] is in smem, visible to all, and no warp reads V any more.
        load_tile<D, BN>(sV, gV, row, nb * BN, len);
        cp_async_commit();

        float s[NT_S][4];
#pragma unroll
        for (int j = 0; j < NT_S; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
        for (int ks = 0; ks < P::KSTEPS; ++ks) {
#pragma unroll
            for (int np = 0; np < NT_S / 2; ++np) {
                uint32_t kb[4];
                ldmatrix_x4(kb, sK_lane + (np * 16 * P::STRIDE + ks * 16) * 2);
                mma_bf16(s[2 * np], qf[ks], kb[0], kb[1]);
                mma_bf16(s[2 * np + 1], qf[ks], kb[2], kb[3]);
            }
        }

        const int k0 = nb * BN;
        if (k0 + BN > len || (causal && k0 + BN - 1 > q0)) {
#pragma unroll
            for (int j = 0; j < NT_S; ++j) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int key = k0 + j * 8 + 2 * t + (e & 1);
                    const int qi = qrow0 + 8 * (e >> 1);
                    if (key >= len || (causal && key > qi)) s[j][e] = -INFINITY;
                }
            }
        }

        cp_async_wait_all(); // V[nb] landed
        __syncthreads();     // ... for every thread; and every warp is done reading K[nb]
        if (nb > 0) {
            load_tile<D, BN>(sK, gK, row, (nb - 1) * BN, len);
            cp_async_commit();
        }

        // Online softmax. Each row's 64 scores are spread over the 4 threads of a quad.
        float mx[2] = {row_max[0], row_max[1]};
#pragma unroll
        for (int j = 0; j < NT_S; ++j) {
            mx[0] = fmaxf(mx[0], fmaxf(s[j][0], s[j][1]));
            mx[1] = fmaxf(mx[1], fmaxf(s[j][2], s[j][3]));
        }
        float m_scaled[2], corr[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
            // A row with every key masked so far keeps −∞; 0 stands in so exp2 gives 0, not NaN.
            m_scaled[r] = mx[r] == -INFINITY ? 0.f : mx[r] * scale_log2;
            corr[r] = exp2f(row_max[r] * scale_log2 - m_scaled[r]); // 0 on the first block
            row_max[r] = mx[r];
            row_sum[r] *= corr[r];
        }
#pragma unroll
        for (int j = 0; j < P::NT_O; ++j) {
            o[j][0] *= corr[0];
            o[j][1] *= corr[0];
            o[j][2] *= corr[1];
            o[j][3] *= corr[1];
        }
#pragma unroll
        for (int j = 0; j < NT_S; ++j) {
            s[j][0] = exp2f(fmaf(s[j][0], scale_log2, -m_scaled[0]));
            s[j][1] = exp2f(fmaf(s[j][1], scale_log2, -m_scaled[0]));
            s[j][2] = exp2f(fmaf(s[j][2], scale_log2, -m_scaled[1]));
            s[j][3] = exp2f(fmaf(s[j][3], scale_log2, -m_scaled[1]));
            row_sum[0] += s[j][0] + s[j][1];
            row_sum[1] += s[j][2] + s[j][3];
        }

        // O += P·V: the C fragments of n-tiles 2kk, 2kk+1 are the A fragment of k16 step kk.
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
            uint32_t a[4];
            a[0] = pack_bf16(s[2 * kk][0], s[2 * kk][1]);
            a[1] = pack_bf16(s[2 * kk][2], s[2 * kk][3]);
            a[2] = pack_bf16(s[2 * kk + 1][0], s[2 * kk + 1][1]);
            a[3] = pack_bf16(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
            for (int dp = 0; dp < P::NT_O / 2; ++dp) {
                uint32_t vb[4];
                ldmatrix_x4_trans(vb, sV_lane + (kk * 16 * P::STRIDE + dp * 16) * 2);
                mma_bf16(o[2 * dp], a, vb[0], vb[1]);
                mma_bf16(o[2 * dp + 1], a, vb[2], vb[3]);
            }
        }

        cp_async_wait_all(); // K[nb−1] landed
        __syncthreads();     // ... for every thread; and every warp is done reading V[nb]
    }

    // Epilogue: full row sums, O / l, staged in this warp's own Q rows, 16-byte stores.
    float inv[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        row_sum[r] += __shfl_xor_sync(0xffffffffu, row_sum[r], 1);
        row_sum[r] += __shfl_xor_sync(0xffffffffu, row_sum[r], 2);
        inv[r] = row_sum[r] > 0.f ? 1.f / row_sum[r] : 0.f;
    }
    __nv_bfloat16 *sO = sQ + warp * 16 * P::STRIDE;
    __syncwarp();
#pragma unroll
    for (int j = 0; j < P::NT_O; ++j) {
        const int col = j * 8 + 2 * t;
        *reinterpret_cast<__nv_bfloat162 *>(sO + g * P::STRIDE + col) =
            __floats2bfloat162_rn(o[j][0] * inv[0], o[j][1] * inv[0]);
        *reinterpret_cast<__nv_bfloat162 *>(sO + (g + 8) * P::STRIDE + col) =
            __floats2bfloat162_rn(o[j][2] * inv[1], o[j][3] * inv[1]);
    }
    __syncwarp();
    const int64_t out_stride = (int64_t)heads * D;
    __nv_bfloat16 *gO = out + start * out_stride + (int64_t)head * D;
    constexpr int OUT_CHUNKS = 16 * P::CHUNKS;
    static_assert(OUT_CHUNKS % 32 == 0, "output chunks must divide among the lanes");
#pragma unroll
    for (int it = 0; it < OUT_CHUNKS / 32; ++it) {
        const int i = it * 32 + lane;
        const int r = i / P::CHUNKS;
        const int c = i - r * P::CHUNKS;
        const int q = q0 + warp * 16 + r;
        if (q < len)
            *reinterpret_cast<bf16x8 *>(gO + (int64_t)q * out_stride + c * 8) =
                *reinterpret_cast<const bf16x8 *>(sO + r * P::STRIDE + c * 8);
    }
}

static_assert(Dims<128>::SMEM_BYTES == 52224 && Dims<80>::SMEM_BYTES == 33792,
              "src/ops/attention.rs passes these shared-memory sizes");

} // namespace

// One entry per head dim. row: the qkv row stride in elements; scale_log2 = scale · log2(e);
// causal: 0 or 1. Launch: grid (ceil(max_seqlen / 64), heads, segments), 128 threads, dynamic
// shared memory Dims<D>::SMEM_BYTES (52,224 B for 128, 33,792 B for 80).
extern "C" __global__ void __launch_bounds__(THREADS, 2)
    flash_attn_bf16_d128(const __nv_bfloat16 *__restrict__ qkv, __nv_bfloat16 *__restrict__ out,
                         const int *__restrict__ cu_seqlens, int64_t tokens, int64_t row, int heads,
                         int kv_heads, int causal, float scale_log2) {
    flash_attn_block<128>(qkv, out, cu_seqlens, tokens, row, heads, kv_heads, causal, scale_log2);
}

extern "C" __global__ void __launch_bounds__(THREADS, 2)
    flash_attn_bf16_d80(const __nv_bfloat16 *__restrict__ qkv, __nv_bfloat16 *__restrict__ out,
                        const int *__restrict__ cu_seqlens, int64_t tokens, int64_t row, int heads,
                        int kv_heads, int causal, float scale_log2) {
    flash_attn_block<80>(qkv, out, cu_seqlens, tokens, row, heads, kv_heads, causal, scale_log2);
}
