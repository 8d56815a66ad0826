// flash_attn on Hopper (sm_90a): the same op as kernels/attention.cu (same contract, same math,
// same rounding points), in the FlashAttention-3 structure (Shah et al. 2024): the copy engine
// (TMA) feeds K/V tiles into a shared-memory ring guarded by mbarriers, and warpgroup MMAs (wgmma)
// compute S = Q·Kᵀ and O += P·V with the accumulators in registers.
//
// Math: see kernels/attention.cu. Per segment [s, e), query head h, kv head g = h / (H / Hkv):
//   out[s+i, h] = Σ_j p_j · v[s+j, g] / Σ_j p_j,  p_j = exp2(scale·log2e · (q·k_j − m)), online
//   over key blocks (m the running max); causal: j ≤ i. p is rounded to bf16 for P·V, the row sum
//   adds the f32 p, O is f32 and rounded once after the division (as the FA2 kernel does).
//
// Persistent grid: one CTA per SM (at most), each walking the tiles v = blockIdx.x, + gridDim.x, …
//   (static round robin, the same walk in every thread). Normal mode: a tile is 128 query rows of
//   one (segment, head); tiles are ordered by query block from the last (the longest causal rows)
//   down, so the heaviest go first, and the heads of a segment are adjacent. Short mode (every
//   segment ≤ 64 tokens: the ViT's windows, short queries): a tile is two segments of one head,
//   one per consumer, each with its own 64 rows of Q and 64 keys in its half of the tiles, so a
//   64-patch window costs a 64 × 64 block instead of a mostly empty 128 × 128 one. Short mode
//   gives the same bits as normal mode for such a segment: its scores, max and exponentials are
//   the same numbers, and normal mode's extra keys 64..127 are masked, so their p is 0 and they
//   add exact zeros to the row sums and to O. Which mode runs (a property of the batch) thus
//   changes no row.
//
// CTA: 3 warpgroups (384 threads):
//   - warpgroup 0, the producer: gives registers back (setmaxnreg.dec 40); one thread issues the
//     TMA copies, tile after tile: Q into one of 2 stages, K[n] and V[n] for each key block into
//     a STAGES-deep ring, as far ahead as the free stages allow (the next tile's Q and first
//     blocks load while the consumers finish the current one);
//   - warpgroups 1 and 2, the consumers (setmaxnreg.inc 232): 64 query rows each, m64 wgmma. A
//     consumer with no rows in a tile (a short tail, an empty segment) only keeps the barriers
//     in step.
//   Key blocks (BN = 128 keys) are visited from the last one needed down to 0, so the masked
//   blocks (the causal diagonal, the segment end) come first.
//
// Consumer pipeline (FA3's intra-warpgroup overlap): S(n) = Q·K(n)ᵀ is issued, then O += P(n−1)·
//   V(n−1); the softmax of S(n) runs while that P·V is still on the tensor cores; then O is
//   rescaled and P(n) rounded to bf16 for the next step.
//     wait K(n) → issue S(n) → [wait V(n−1) → issue O += P(n−1)·V(n−1)] → wait S(n) → free K(n)
//     → mask, max, exp, row sums of S(n) → wait P·V → free V(n−1) → O *= corr → P(n) = bf16(S(n))
//   Ping-pong (FA3, a launch option, on by default): the two consumers take turns issuing their
//   GEMMs (named barriers 1 and 2), so that one's softmax overlaps the other's GEMMs.
//   The schedule (persistent or one CTA per tile, tile order, ping-pong) never changes a bit:
//   every tile is computed alone, in the same order of operations.
//
// Barriers (mbarrier, shared memory): per Q stage q_full, q_empty; per ring stage k_full, v_full
//   (the producer's arrive with the expected byte count, completed by the TMA) and k_empty,
//   v_empty (count = the 256 consumer threads; each arrives after its wgmma that read the tile
//   has completed). Phase parity of use u of a stage is u & 1; producer and consumers count
//   tiles and key blocks the same way.
//
// Shared memory tiles (filled by TMA, read by wgmma through matrix descriptors), all rows of a
//   tile at one fixed column block: head dim 128 as 2 blocks of 64 columns with the 128-byte
//   swizzle (rows of 128 B, 8-row atoms of 1 KB), head dim 80 as 5 blocks of 16 columns with the
//   32-byte swizzle (rows of 32 B, atoms of 256 B): 80 is not a multiple of 64 or 32, and the
//   tensors are never padded in memory. Q and K are read K-major (the head dim is the reduction),
//   V N-major (the head dim is the output), from the same tile layout.
//   Bytes: Q 128·D·2 per stage (2), K and V 128·D·2 per stage: D 128, 2 ring stages: 192 KB; D 80,
//   3 ring stages: 160 KB. TMA boxes are 64 rows (one consumer's half) × one column block.
//
// Rows past the segment end: the TMA reads the next segment's rows (or zeros past the tensor);
//   their keys are masked to −∞ before the softmax, so their p is exactly 0 and their values add
//   exact zeros (finite inputs assumed, as for any bf16 activation); their queries are computed
//   and not stored. Every tile starts at a segment-relative offset, so a segment's result does
//   not depend on its neighbours (bitwise).
//
// Build: compiled for every target; the body exists only for sm_90a (__CUDA_ARCH_FEAT_SM90_ALL),
//   elsewhere the entries trap and src/ops/attention.rs never selects them.
//
// ptxas (13.0, sm_90a): 168 registers at entry for both head dims (384 threads, 1 CTA per SM;
//   40 / 232 after setmaxnreg), 0 spills, no wgmma serialisation warning. SASS: HGMMA.64x128x16
//   (S and P·V), HGMMA.64x64x16 (short mode), UTMALDG.2D, SYNCS (mbarrier), USETMAXREG.
#include "common.cuh"
#include "tma.cuh"
#include "wgmma.cuh"

namespace {

constexpr int BM = 128;             // query rows per tile (2 consumer warpgroups × 64)
constexpr int BN = 128;             // keys per K/V tile
constexpr int CONSUMERS = 2;        // consumer warpgroups
constexpr int THREADS = 128 * (1 + CONSUMERS);

// The tensor map (tma.cuh's TmaMap) is encoded on the host over qkv as a 2-D [T, row] bf16
// tensor, box [64 rows, SW columns].

template <int D> struct Sm90Cfg;
template <> struct Sm90Cfg<128> {
    static constexpr int SW = 64;          // columns per block (= the 128-byte swizzle span)
    static constexpr uint64_t LAYOUT = 1;  // descriptor layout type: 128-byte swizzle
    static constexpr int STAGES = 2;
};
template <> struct Sm90Cfg<80> {
    static constexpr int SW = 16;          // 32-byte swizzle span
    static constexpr uint64_t LAYOUT = 3;  // 32-byte swizzle
    static constexpr int STAGES = 3;
};
template <int D> struct Cfg90 : Sm90Cfg<D> {
    using Sm90Cfg<D>::SW;
    static constexpr int ROW_BYTES = SW * 2;           // one row of one column block
    static constexpr int ATOM = 8 * ROW_BYTES;          // 8-row swizzle atom (the SBO)
    static constexpr int BLOCKS = D / SW;               // column blocks per tile
    static constexpr int BLOCK_BYTES = 128 * ROW_BYTES; // one column block of a 128-row tile
    static constexpr int TILE_BYTES = BLOCKS * BLOCK_BYTES; // = 128 · D · 2
    static constexpr int KSTEPS = D / 16;
    static constexpr int NO = D / 2; // O accumulators per thread (D/8 n-tiles × 4)
    static_assert(D % SW == 0 && TILE_BYTES == 128 * D * 2, "tile shape");
    static constexpr int STAGES = Sm90Cfg<D>::STAGES;
    // Q (2 stages: the next tile's Q loads while this one finishes), the K ring, the V ring,
    // then 8-byte barriers: q_full[2], q_empty[2], k_full[S], v_full[S], k_empty[S],
    // v_empty[S]; +1 KB to align the start to the 1 KB swizzle atom.
    static constexpr int BAR_OFFSET = TILE_BYTES * (2 + 2 * STAGES);
    static constexpr int SMEM_BYTES = BAR_OFFSET + 8 * (4 + 4 * STAGES) + 1024;
};

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

// mbarriers and TMA loads: tma.cuh.

// ---- wgmma ----
// Registers that an in-flight wgmma reads or writes: pin them so the compiler neither reads them
// early nor reuses them before the wait that follows.
template <int N> __device__ __forceinline__ void fence_regs(float (&r)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}
template <int N> __device__ __forceinline__ void fence_regs(uint32_t (&r)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+r"(r[i])::"memory");
}

// Named barriers 1 and 2 (0 is __syncthreads) over the two consumer warpgroups (256 threads):
// the ping-pong turn of consumer c is barrier 1 + c.
__device__ __forceinline__ void named_sync(int id) { asm volatile("bar.sync %0, 256;\n" ::"r"(id) : "memory"); }
__device__ __forceinline__ void named_arrive(int id) { asm volatile("bar.arrive %0, 256;\n" ::"r"(id) : "memory"); }

// d (+)= a·b, m64n128k16, A and B K-major in shared memory (descriptors); accumulate = 0
// overwrites d.
__device__ __forceinline__ void wgmma_ss_n128(float (&d)[64], uint64_t a, uint64_t b, int accumulate) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {"
                 "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
                 "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
                 "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
                 "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
                 "}, %64, %65, p, 1, 1, 0, 0;\n}\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
                   "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
                   "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
                   "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
                   "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
                   "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
                   "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
                   "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
                 : "l"(a), "l"(b), "r"(accumulate));
}

// The same at m64n64k16 on d[0, 32) (short segments: 64 keys).
__device__ __forceinline__ void wgmma_ss_n64(float (&d)[64], uint64_t a, uint64_t b, int accumulate) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {"
                 "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
                 "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
                 "}, %32, %33, p, 1, 1, 0, 0;\n}\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
                   "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
                   "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
                   "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
                 : "l"(a), "l"(b), "r"(accumulate));
}
// d += a·b, m64n128k16, A (bf16 pairs) in registers, B N-major (transposed) in shared memory.
__device__ __forceinline__ void wgmma_rs_n128_bt(float (&d)[64], const uint32_t (&a)[4], uint64_t b) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {"
                 "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
                 "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
                 "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
                 "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
                 "}, {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
                   "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
                   "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
                   "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
                   "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
                   "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
                   "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
                   "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1));
}

// d += a·b, m64n80k16, A (bf16 pairs) in registers, B N-major (transposed) in shared memory.
__device__ __forceinline__ void wgmma_rs_n80_bt(float (&d)[40], const uint32_t (&a)[4], uint64_t b) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %45, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n80k16.f32.bf16.bf16 {"
                 "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
                 "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
                 "%32, %33, %34, %35, %36, %37, %38, %39"
                 "}, {%40, %41, %42, %43}, %44, p, 1, 1, 1;\n}\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
                   "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
                   "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
                   "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
                   "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1));
}

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi); // .x (low half) = lo: the lower k index
    return *reinterpret_cast<uint32_t *>(&v);
}

template <int D>
__device__ __forceinline__ void pv_wgmma(float (&o)[D / 2], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint64_t b) {
    const uint32_t a[4] = {a0, a1, a2, a3};
    if constexpr (D == 128) {
        wgmma_rs_n128_bt(o, a, b);
    } else {
        wgmma_rs_n80_bt(o, a, b);
    }
}

// S = Q·Kᵀ for one key block: D/16 k-steps, both operands K-major (q_tile: the warpgroup's 64
// rows of Q; k_tile: its keys, N = 128 or 64). Issued and committed as one wgmma group.
template <int D, int N>
__device__ __forceinline__ void issue_qk(float (&s)[64], uint32_t q_tile, uint32_t k_tile) {
    using C = Cfg90<D>;
#pragma unroll
    for (int kk = 0; kk < C::KSTEPS; ++kk) {
        const uint32_t off = (kk * 16 / C::SW) * C::BLOCK_BYTES + (kk * 16 % C::SW) * 2;
        const uint64_t a = make_desc(q_tile + off, 16, C::ATOM, C::LAYOUT);
        const uint64_t b = make_desc(k_tile + off, 16, C::ATOM, C::LAYOUT);
        if constexpr (N == 128) {
            wgmma_ss_n128(s, a, b, kk > 0);
        } else {
            wgmma_ss_n64(s, a, b, kk > 0);
        }
    }
    wgmma_commit();
}

// O += P·V for one key block: N/16 k-steps of 16 keys, P from registers, V N-major.
template <int D, int N>
__device__ __forceinline__ void issue_pv(float (&o)[D / 2], const uint32_t (&p)[32], uint32_t v_tile) {
    using C = Cfg90<D>;
#pragma unroll
    for (int kk = 0; kk < N / 16; ++kk)
        pv_wgmma<D>(o, p[4 * kk], p[4 * kk + 1], p[4 * kk + 2], p[4 * kk + 3],
                    make_desc(v_tile + kk * 16 * C::ROW_BYTES, C::BLOCK_BYTES, C::ATOM, C::LAYOUT));
    wgmma_commit();
}

// Masks and online softmax of one block of N scores per row in place (s becomes the f32 p),
// updating the row max and partial sums; corr: the factor for O. Rows row0, row0 + 8
// (segment-relative); keys from k0; wq0: the warpgroup's first row. N = 64 gives the same bits
// as N = 128 with keys 64..127 masked (their p is 0 and adds exact zeros).
template <int N>
__device__ __forceinline__ void softmax_block(float (&s)[64], float (&row_max)[2], float (&row_sum)[2],
                                              float (&corr)[2], int k0, int len, int causal, int wq0, int row0,
                                              int t, float scale_log2) {
    constexpr int NT = N / 8;
    // Masks: keys past the segment end and (causal) keys after the row; only blocks that reach
    // past the segment end or past the warpgroup's first row need them.
    if (k0 + N > len || (causal && k0 + N - 1 > wq0)) {
#pragma unroll
        for (int j = 0; j < NT; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int key = k0 + 8 * j + 2 * t + (e & 1);
                const int row = row0 + 8 * (e >> 1);
                if (key >= len || (causal && key > row)) s[4 * j + e] = -INFINITY;
            }
        }
    }
    // Each row's scores are spread over the 4 threads of a quad.
    float mx[2] = {row_max[0], row_max[1]};
#pragma unroll
    for (int j = 0; j < NT; ++j) {
        mx[0] = fmaxf(mx[0], fmaxf(s[4 * j], s[4 * j + 1]));
        mx[1] = fmaxf(mx[1], fmaxf(s[4 * j + 2], s[4 * j + 3]));
    }
    float m_scaled[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
        // A row with every key masked so far keeps −∞; 0 stands in so that exp2 gives 0.
        m_scaled[r] = mx[r] == -INFINITY ? 0.f : mx[r] * scale_log2;
        corr[r] = exp2f(row_max[r] * scale_log2 - m_scaled[r]); // 0 at the start
        row_max[r] = mx[r];
        row_sum[r] *= corr[r];
    }
#pragma unroll
    for (int j = 0; j < NT; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) s[4 * j + e] = exp2f(fmaf(s[4 * j + e], scale_log2, -m_scaled[e >> 1]));
        row_sum[0] += s[4 * j] + s[4 * j + 1];
        row_sum[1] += s[4 * j + 2] + s[4 * j + 3];
    }
}

// P → bf16 A fragments: n-tiles 2kk, 2kk + 1 of S are k-step kk of P·V (the m64 accumulator
// layout of a warp is the A layout of its 16 rows).
template <int N> __device__ __forceinline__ void pack_p(uint32_t (&p)[32], const float (&s)[64]) {
#pragma unroll
    for (int kk = 0; kk < N / 16; ++kk) {
        p[4 * kk] = pack_bf16(s[8 * kk], s[8 * kk + 1]);
        p[4 * kk + 1] = pack_bf16(s[8 * kk + 2], s[8 * kk + 3]);
        p[4 * kk + 2] = pack_bf16(s[8 * kk + 4], s[8 * kk + 5]);
        p[4 * kk + 3] = pack_bf16(s[8 * kk + 6], s[8 * kk + 7]);
    }
}

// One unit of work of the persistent grid. Normal mode: 128 query rows [q0, q0 + 128) of one
// (segment, head), both consumers on the same segment (rows 64c.. each), key blocks of 128.
// Short mode (every segment ≤ 64 tokens, e.g. the ViT's windows): two segments of one head, one
// per consumer (each its own 64 rows of Q and 64 keys in its half of the tiles), one key block.
struct Tile {
    int head;
    int q0;           // first query row, segment-relative (short mode: 0)
    int n_blocks;     // key blocks
    int start[2];     // per consumer half: first token of its segment
    int len[2];       // per consumer half: its segment's length
};

__device__ __forceinline__ void seg_bounds(const int *__restrict__ cu_seqlens, int seg, int segments, int tokens,
                                           int &start, int &len) {
    if (seg >= segments) {
        start = 0;
        len = 0;
        return;
    }
    // Values are clamped to [0, T]: a bad table gives wrong rows, never out-of-bounds accesses.
    const int end = min(max(cu_seqlens[seg + 1], 0), tokens);
    start = min(max(cu_seqlens[seg], 0), end);
    len = end - start;
}

// Virtual tile v → its work; false when it has none (a query block past its segment's end, or
// two empty segments). Normal mode, two orders (the same results, only the schedule differs):
// heads_outer = 0: the query-block index is the slowest, from the last block (the longest causal
// rows) down, so the heaviest tiles of every head go first; heads_outer = 1: (segment, head) is
// the slowest and the query blocks of one head follow each other, longest first (the tiles in
// flight then share one kv head's K/V in L2). Within either, the heads of a segment are adjacent.
__device__ __forceinline__ bool decode_tile(int v, int short_mode, int heads_outer, int nq, int heads,
                                            int segments, const int *__restrict__ cu_seqlens, int tokens,
                                            int causal, Tile &t) {
    if (short_mode) {
        const int pair = v / heads;
        t.head = v - pair * heads;
        seg_bounds(cu_seqlens, 2 * pair, segments, tokens, t.start[0], t.len[0]);
        seg_bounds(cu_seqlens, 2 * pair + 1, segments, tokens, t.start[1], t.len[1]);
        t.q0 = 0;
        t.n_blocks = 1;
        return t.len[0] > 0 || t.len[1] > 0;
    }
    int x, sh;
    if (heads_outer) {
        sh = v / nq;
        x = v - sh * nq;
    } else {
        const int per_x = heads * segments;
        x = v / per_x;
        sh = v - x * per_x;
    }
    const int seg = sh / heads;
    t.head = sh - seg * heads;
    int start, len;
    seg_bounds(cu_seqlens, seg, segments, tokens, start, len);
    t.q0 = (nq - 1 - x) * BM;
    if (t.q0 >= len) return false;
    t.start[0] = t.start[1] = start;
    t.len[0] = t.len[1] = len;
    const int kv_len = causal ? min(len, t.q0 + BM) : len;
    t.n_blocks = (kv_len + BN - 1) / BN;
    return true;
}

// The k-th tile of this CTA, or −1 past the end: round k covers tiles [k·G, k·G + G) (G =
// gridDim.x), CTA b takes b in even rounds and G − 1 − b in odd ones ("snake"), so that with
// tiles ordered heaviest first no CTA gets the heaviest of every round. A launch with one CTA
// per tile (G = n_tiles) is the plain grid.
__device__ __forceinline__ int tile_of(int k, int n_tiles) {
    const int g = gridDim.x;
    if ((long long)k * g >= n_tiles) return -1;
    return k * g + ((k & 1) ? g - 1 - (int)blockIdx.x : (int)blockIdx.x);
}

template <int D>
__device__ __forceinline__ void flash_attn_sm90_block(const TmaMap *map, __nv_bfloat16 *__restrict__ out,
                                                      const int *__restrict__ cu_seqlens, int tokens,
                                                      int segments, int heads, int kv_heads, int causal,
                                                      int short_mode, int heads_outer, int pingpong, int nq,
                                                      int n_tiles, float scale_log2) {
    using C = Cfg90<D>;
    constexpr int ST = C::STAGES;
    extern __shared__ unsigned char smem_raw[];
    const uint32_t base = (smem_addr(smem_raw) + 1023u) & ~1023u;
    const uint32_t sQ = base;                   // 2 stages of Q
    const uint32_t sK = base + 2 * C::TILE_BYTES; // ST stages of K
    const uint32_t sV = sK + ST * C::TILE_BYTES;  // ST stages of V
    const uint32_t bars = base + C::BAR_OFFSET;
#define Q_FULL(s) (bars + 8u * (s))
#define Q_EMPTY(s) (bars + 8u * (2 + (s)))
#define K_FULL(s) (bars + 8u * (4 + (s)))
#define V_FULL(s) (bars + 8u * (4 + ST + (s)))
#define K_EMPTY(s) (bars + 8u * (4 + 2 * ST + (s)))
#define V_EMPTY(s) (bars + 8u * (4 + 3 * ST + (s)))
    constexpr int HALF = 64 * C::ROW_BYTES; // offset of rows 64.. within a column block

    const int wg = threadIdx.x / 128;
    if (threadIdx.x == 0) {
        for (int s = 0; s < 2; ++s) {
            mbar_init(Q_FULL(s), 1);
            mbar_init(Q_EMPTY(s), 128 * CONSUMERS);
        }
        for (int s = 0; s < ST; ++s) {
            mbar_init(K_FULL(s), 1);
            mbar_init(V_FULL(s), 1);
            mbar_init(K_EMPTY(s), 128 * CONSUMERS);
            mbar_init(V_EMPTY(s), 128 * CONSUMERS);
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();

    if (wg == 0) {
        // Producer: one thread issues every copy, tile after tile, as far ahead as the Q stages
        // and the K/V ring allow; the warpgroup keeps few registers.
        asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n");
        if (threadIdx.x == 0) {
            uint32_t kv_it = 0; // key blocks issued so far (ring position)
            int tile_i = 0;     // tiles issued so far (Q stage)
            for (int k = 0, v; (v = tile_of(k, n_tiles)) >= 0; ++k) {
                Tile t;
                if (v >= n_tiles ||
                    !decode_tile(v, short_mode, heads_outer, nq, heads, segments, cu_seqlens, tokens, causal, t))
                    continue;
                const int kvh = t.head / (heads / kv_heads);
                const int qc = t.head * D, kc = (heads + kvh) * D, vc = (heads + kv_heads + kvh) * D;
                // Rows of each 64-row half: normal mode the two halves of one 128-row block,
                // short mode the two segments.
                const int qr[2] = {t.start[0] + t.q0, t.start[1] + t.q0 + (short_mode ? 0 : 64)};
                const int qs = tile_i & 1;
                if (tile_i >= 2) mbar_wait(Q_EMPTY(qs), ((uint32_t)(tile_i >> 1) - 1u) & 1u);
                mbar_expect_tx(Q_FULL(qs), C::TILE_BYTES);
#pragma unroll
                for (int h = 0; h < 2; ++h)
#pragma unroll
                    for (int b = 0; b < C::BLOCKS; ++b)
                        tma_load(sQ + qs * C::TILE_BYTES + b * C::BLOCK_BYTES + h * HALF, map, qc + b * C::SW,
                                 qr[h], Q_FULL(qs));
                for (int it = 0; it < t.n_blocks; ++it, ++kv_it) {
                    const int s = kv_it % ST;
                    const uint32_t parity = (kv_it / ST - 1u) & 1u; // of the stage's previous use
                    const int k0 = (t.n_blocks - 1 - it) * BN;
                    const int kr[2] = {t.start[0] + k0, t.start[1] + k0 + (short_mode ? 0 : 64)};
                    if (kv_it >= ST) mbar_wait(K_EMPTY(s), parity);
                    mbar_expect_tx(K_FULL(s), C::TILE_BYTES);
#pragma unroll
                    for (int h = 0; h < 2; ++h)
#pragma unroll
                        for (int b = 0; b < C::BLOCKS; ++b)
                            tma_load(sK + s * C::TILE_BYTES + b * C::BLOCK_BYTES + h * HALF, map, kc + b * C::SW,
                                     kr[h], K_FULL(s));
                    if (kv_it >= ST) mbar_wait(V_EMPTY(s), parity);
                    mbar_expect_tx(V_FULL(s), C::TILE_BYTES);
#pragma unroll
                    for (int h = 0; h < 2; ++h)
#pragma unroll
                        for (int b = 0; b < C::BLOCKS; ++b)
                            tma_load(sV + s * C::TILE_BYTES + b * C::BLOCK_BYTES + h * HALF, map, vc + b * C::SW,
                                     kr[h], V_FULL(s));
                }
                ++tile_i;
            }
        }
        return;
    }
    asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n");
    const int c = wg - 1; // consumer index: rows [64c, 64c + 64) of a tile
    const int tid = threadIdx.x % 128;
    const int warp = tid / 32, lane = tid % 32;
    const int g = lane / 4, t4 = lane % 4;
    const int64_t out_stride = (int64_t)heads * D;

    // Ping-pong (FA3): the two consumers take turns to issue their GEMMs, so that one's softmax
    // runs while the other's GEMMs occupy the tensor cores. Every tile has n_blocks + 1 issue
    // points in both consumers (idle ones too); consumer 0 goes first.
    const bool pp = pingpong && !short_mode;
#define TURN_BEGIN()                                                                                        \
    do {                                                                                                    \
        if (pp) named_sync(1 + c);                                                                          \
    } while (0)
#define TURN_END()                                                                                          \
    do {                                                                                                    \
        if (pp) named_arrive(2 - c);                                                                        \
    } while (0)
    if (pp && c == 1) named_arrive(1);

    uint32_t kv_it = 0;
    int tile_i = 0;
    for (int k = 0, v; (v = tile_of(k, n_tiles)) >= 0; ++k) {
        Tile t;
        if (v >= n_tiles ||
            !decode_tile(v, short_mode, heads_outer, nq, heads, segments, cu_seqlens, tokens, causal, t))
            continue;
        const int qs = tile_i & 1;
        const int len = c ? t.len[1] : t.len[0]; // (no run-time index: keeps t in registers)
        const int seg_start = c ? t.start[1] : t.start[0];
        // The warpgroup's first row (segment-relative) and whether it has rows in its segment.
        const int wq0 = t.q0 + (short_mode ? 0 : 64 * c);
        const bool active = wq0 < len;
        const uint32_t q_tile = sQ + qs * C::TILE_BYTES + c * HALF;
        mbar_wait(Q_FULL(qs), (uint32_t)(tile_i >> 1) & 1u);

        if (!active) {
            // No rows here (a short tail, an empty segment): keep the barriers in step.
            for (int it = 0; it < t.n_blocks; ++it, ++kv_it) {
                const int st = kv_it % ST;
                const uint32_t par = (kv_it / ST) & 1u;
                mbar_wait(K_FULL(st), par);
                TURN_BEGIN();
                TURN_END();
                mbar_arrive(K_EMPTY(st));
                mbar_wait(V_FULL(st), par);
                mbar_arrive(V_EMPTY(st));
            }
            TURN_BEGIN();
            TURN_END();
            mbar_arrive(Q_EMPTY(qs));
            ++tile_i;
            continue;
        }

        const int row0 = wq0 + 16 * warp + g; // this thread's rows: row0 and row0 + 8
        float o[C::NO];
#pragma unroll
        for (int i = 0; i < C::NO; ++i) o[i] = 0.f;
        float s[64];
#pragma unroll
        for (int i = 0; i < 64; ++i) s[i] = 0.f;
        uint32_t p[32];
#pragma unroll
        for (int i = 0; i < 32; ++i) p[i] = 0u;
        float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};
        float corr[2];

        if (short_mode) {
            // One block of 64 keys in this consumer's half of the stage.
            const int st = kv_it % ST;
            const uint32_t par = (kv_it / ST) & 1u;
            mbar_wait(K_FULL(st), par);
            fence_regs(s);
            wgmma_fence();
            issue_qk<D, 64>(s, q_tile, sK + st * C::TILE_BYTES + c * HALF);
            wgmma_wait<0>();
            fence_regs(s);
            mbar_arrive(K_EMPTY(st));
            mbar_arrive(Q_EMPTY(qs));
            softmax_block<64>(s, row_max, row_sum, corr, 0, len, causal, wq0, row0, t4, scale_log2);
            pack_p<64>(p, s);
            mbar_wait(V_FULL(st), par);
            fence_regs(o);
            fence_regs(p);
            wgmma_fence();
            issue_pv<D, 64>(o, p, sV + st * C::TILE_BYTES + c * HALF);
            wgmma_wait<0>();
            fence_regs(o);
            fence_regs(p);
            mbar_arrive(V_EMPTY(st));
            ++kv_it;
        } else {
            // Block 0 of the visit order: S, softmax, P; its P·V is issued with the next S.
            {
                const int st = kv_it % ST;
                mbar_wait(K_FULL(st), (kv_it / ST) & 1u);
                fence_regs(s);
                TURN_BEGIN();
                wgmma_fence();
                issue_qk<D, 128>(s, q_tile, sK + st * C::TILE_BYTES);
                TURN_END();
                wgmma_wait<0>();
                fence_regs(s);
                mbar_arrive(K_EMPTY(st));
                softmax_block<128>(s, row_max, row_sum, corr, (t.n_blocks - 1) * BN, len, causal, wq0, row0, t4,
                                   scale_log2);
                pack_p<128>(p, s);
            }
            for (int it = 1; it < t.n_blocks; ++it) {
                const uint32_t cur = kv_it + it, prev = cur - 1;
                const int st = cur % ST, pst = prev % ST;
                mbar_wait(K_FULL(st), (cur / ST) & 1u);
                mbar_wait(V_FULL(pst), (prev / ST) & 1u); // long since landed
                // Every register the two GEMMs touch is final before the fence.
                fence_regs(s);
                fence_regs(o);
                fence_regs(p);
                TURN_BEGIN();
                wgmma_fence();
                issue_qk<D, 128>(s, q_tile, sK + st * C::TILE_BYTES); // S(it)
                issue_pv<D, 128>(o, p, sV + pst * C::TILE_BYTES);     // O += P(it − 1)·V(it − 1)
                TURN_END();
                wgmma_wait<1>(); // S(it) done (groups complete in order)
                fence_regs(s);
                mbar_arrive(K_EMPTY(st));
                // The softmax of S(it) runs while P·V(it − 1) is on the tensor cores.
                softmax_block<128>(s, row_max, row_sum, corr, (t.n_blocks - 1 - it) * BN, len, causal, wq0, row0,
                                   t4, scale_log2);
                wgmma_wait<0>(); // P·V(it − 1) done: V(it − 1) and the P registers are free
                fence_regs(o);
                fence_regs(p);
                mbar_arrive(V_EMPTY(pst));
#pragma unroll
                for (int j = 0; j < C::NO / 4; ++j) {
                    o[4 * j] *= corr[0];
                    o[4 * j + 1] *= corr[0];
                    o[4 * j + 2] *= corr[1];
                    o[4 * j + 3] *= corr[1];
                }
                pack_p<128>(p, s);
            }
            mbar_arrive(Q_EMPTY(qs)); // the tile's last S is done: the producer may refill Q
            // The last block's P·V.
            {
                const uint32_t last = kv_it + t.n_blocks - 1;
                const int pst = last % ST;
                mbar_wait(V_FULL(pst), (last / ST) & 1u);
                fence_regs(o);
                fence_regs(p);
                TURN_BEGIN();
                wgmma_fence();
                issue_pv<D, 128>(o, p, sV + pst * C::TILE_BYTES);
                TURN_END();
                wgmma_wait<0>();
                fence_regs(o);
                fence_regs(p);
                mbar_arrive(V_EMPTY(pst));
            }
            kv_it += t.n_blocks;
        }

        // Epilogue: full row sums, O / l, bf16 pairs straight to global memory (the next tile's
        // loads are already in flight).
        float inv[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float l = row_sum[r];
            l += __shfl_xor_sync(0xffffffffu, l, 1);
            l += __shfl_xor_sync(0xffffffffu, l, 2);
            inv[r] = l > 0.f ? 1.f / l : 0.f;
        }
        __nv_bfloat16 *gO = out + (int64_t)seg_start * out_stride + (int64_t)t.head * D + 2 * t4;
#pragma unroll
        for (int j = 0; j < C::NO / 4; ++j) {
            if (row0 < len)
                *reinterpret_cast<__nv_bfloat162 *>(gO + (int64_t)row0 * out_stride + 8 * j) =
                    __floats2bfloat162_rn(o[4 * j] * inv[0], o[4 * j + 1] * inv[0]);
            if (row0 + 8 < len)
                *reinterpret_cast<__nv_bfloat162 *>(gO + (int64_t)(row0 + 8) * out_stride + 8 * j) =
                    __floats2bfloat162_rn(o[4 * j + 2] * inv[1], o[4 * j + 3] * inv[1]);
        }
        ++tile_i;
    }
    // Consumer 1's last turn hand-over is still pending on barrier 1: take it, so that both
    // barriers end balanced.
    if (pp && c == 0) named_sync(1);
#undef TURN_BEGIN
#undef TURN_END
#undef Q_FULL
#undef Q_EMPTY
#undef K_FULL
#undef V_FULL
#undef K_EMPTY
#undef V_EMPTY
}

#endif // __CUDA_ARCH_FEAT_SM90_ALL

static_assert(Cfg90<128>::SMEM_BYTES == 197728 && Cfg90<80>::SMEM_BYTES == 164992,
              "src/ops/attention.rs passes these shared-memory sizes");

} // namespace

// One entry per head dim. tmap: qkv as a 2-D [T, row] bf16 tensor map, box [64 rows, SW columns]
// with the 128-byte (D 128, SW 64) or 32-byte (D 80, SW 16) swizzle; T < 2³¹. short_mode: 1 when
// every segment has ≤ 64 tokens (two segments per tile), else 0; heads_outer: the tile order
// (decode_tile); pingpong: the consumers take turns issuing GEMMs (normal mode); nq = ceil(max_seqlen / 128);
// n_tiles: normal nq · heads · segments, short ceil(segments / 2) · heads; scale_log2 = scale ·
// log2(e); causal: 0 or 1. Launch: a persistent grid of min(n_tiles, SMs) CTAs (or n_tiles: one
// tile each) of 384 threads, dynamic shared memory Cfg90<D>::SMEM_BYTES.
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define SM90_BODY(D)                                                                                        \
    flash_attn_sm90_block<D>(&tmap, out, cu_seqlens, tokens, segments, heads, kv_heads, causal, short_mode, \
                             heads_outer, pingpong, nq, n_tiles, scale_log2)
#else
#define SM90_BODY(D) __trap()
#endif
#define FLASH_ATTN_SM90_ENTRY(name, D)                                                                       \
    extern "C" __global__ void __launch_bounds__(THREADS, 1)                                                  \
        name(const __grid_constant__ TmaMap tmap, __nv_bfloat16 *__restrict__ out,                         \
             const int *__restrict__ cu_seqlens, int tokens, int segments, int heads, int kv_heads,         \
             int causal, int short_mode, int heads_outer, int pingpong, int nq, int n_tiles,               \
             float scale_log2) {                                                                            \
        SM90_BODY(D);                                                                                       \
    }
FLASH_ATTN_SM90_ENTRY(flash_attn_sm90_bf16_d128, 128)
FLASH_ATTN_SM90_ENTRY(flash_attn_sm90_bf16_d80, 80)
