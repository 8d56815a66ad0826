// Rotary position embeddings, in place on the fused qkv GEMM output: the language model's
// M-RoPE (mrope_bf16, docs/MODEL.md §7.2) and the vision tower's 2-D rotary (vision_rope_bf16, §5.2).
//
// Rotation (rotate_half convention, both kernels): with half = head_dim/2 and angle φ_j, for
// every rotated head and j < half:
//   x'[j]        = x[j]·cos φ_j − x[j+half]·sin φ_j
//   x'[j+half]   = x[j+half]·cos φ_j + x[j]·sin φ_j
// The same φ_j serves every head of a token.
//
// mrope_bf16: qkv [T, (Hq + 2·Hkv)·hd] bf16 row-major = [q heads | k heads | v heads]; the q and k
// heads (columns [0, (Hq+Hkv)·hd)) are rotated, v is not touched. pos [3, T] i32 (planes t, h, w),
// inv_freq [hd/2] f32. φ_j = pos[sec(j)][t] · inv_freq[j], sec(j) = 0 for j < s0, 1 for
// j < s0 + s1, else 2 (jina-v4: [16, 24, 24]).
// vision_rope_bf16: qkv [P, 3·H·hd] bf16 = [q | k | v], q and k rotated; angles [P, hd/2] f32
// precomputed on the host (row then column frequencies, docs/MODEL.md §5.2).
//
// Precision: the angle is one f32 product of the exact position and the f32 inv_freq (as HF
// computes it); cos and sin by the accurate sincosf (full range reduction: positions reach 32768,
// where __sinf would be off by far more than bf16 resolution); the rotation in f32 with one
// rounding to bf16. (HF rounds cos and sin to bf16 before the rotation in the language model; f32
// is the more accurate. The vision tower's HF rotation is f32 too.)
// Launch: one block per token (grid-stride over tokens), dynamic shared memory 2·half floats
// (cos, sin). The block first computes the token's half angles, then rotates all its heads. When
// half % 8 == 0 (128 → 64, 80 → 40) a thread rotates 8 pairs with two 16-byte loads and stores;
// otherwise one pair at a time. Offsets within a row are int; row offsets int64.
#include "common.cuh"

// Rotates `heads` consecutive heads of `row` (head h at row + h·head_dim) with the angles whose
// cos/sin are in cs/sn [half]. Called by every thread of the block.
__device__ __forceinline__ void rotate_heads(__nv_bfloat16 *__restrict__ row, int heads,
                                             int head_dim, const float *cs, const float *sn) {
    const int half = head_dim / 2;
    if (half % 8 == 0) {
        const int groups = half / 8; // 8-pair vectors per head
        const int n = heads * groups;
        for (int i = threadIdx.x; i < n; i += blockDim.x) {
            const int h = i / groups;
            const int j = (i - h * groups) * 8;
            __nv_bfloat16 *lo = row + h * head_dim + j;
            __nv_bfloat16 *hi = lo + half;
            float a[8], b[8], ya[8], yb[8];
            unpack8(*reinterpret_cast<const bf16x8 *>(lo), a);
            unpack8(*reinterpret_cast<const bf16x8 *>(hi), b);
#pragma unroll
            for (int k = 0; k < 8; ++k) {
                const float c = cs[j + k], s = sn[j + k];
                ya[k] = a[k] * c - b[k] * s;
                yb[k] = b[k] * c + a[k] * s;
            }
            *reinterpret_cast<bf16x8 *>(lo) = pack8(ya);
            *reinterpret_cast<bf16x8 *>(hi) = pack8(yb);
        }
    } else {
        const int n = heads * half;
        for (int i = threadIdx.x; i < n; i += blockDim.x) {
            const int h = i / half;
            const int j = i - h * half;
            __nv_bfloat16 *lo = row + h * head_dim + j;
            __nv_bfloat16 *hi = lo + half;
            const float a = __bfloat162float(*lo), b = __bfloat162float(*hi);
            const float c = cs[j], s = sn[j];
            *lo = __float2bfloat16_rn(a * c - b * s);
            *hi = __float2bfloat16_rn(b * c + a * s);
        }
    }
}

extern "C" __global__ void __launch_bounds__(JV4_THREADS)
    mrope_bf16(__nv_bfloat16 *__restrict__ qkv, const int32_t *__restrict__ pos,
               const float *__restrict__ inv_freq, int64_t tokens, int64_t q_heads,
               int64_t kv_heads, int64_t head_dim, int64_t sec0, int64_t sec1) {
    extern __shared__ float smem[];
    const int half = (int)(head_dim / 2);
    float *cs = smem, *sn = smem + half;
    const int64_t row_len = (q_heads + 2 * kv_heads) * head_dim;
    const int s0 = (int)sec0, s01 = (int)(sec0 + sec1);
    for (int64_t t = blockIdx.x; t < tokens; t += gridDim.x) {
        for (int j = threadIdx.x; j < half; j += blockDim.x) {
            const int plane = j < s0 ? 0 : (j < s01 ? 1 : 2);
            const float p = (float)pos[plane * tokens + t];
            float s, c;
            sincosf(p * inv_freq[j], &s, &c);
            cs[j] = c;
            sn[j] = s;
        }
        __syncthreads();
        rotate_heads(qkv + t * row_len, (int)(q_heads + kv_heads), (int)head_dim, cs, sn);
        __syncthreads(); // every thread is done with cs/sn before the next token overwrites them
    }
}

extern "C" __global__ void __launch_bounds__(JV4_THREADS)
    vision_rope_bf16(__nv_bfloat16 *__restrict__ qkv, const float *__restrict__ angles,
                     int64_t tokens, int64_t heads, int64_t head_dim) {
    extern __shared__ float smem[];
    const int half = (int)(head_dim / 2);
    float *cs = smem, *sn = smem + half;
    const int64_t row_len = 3 * heads * head_dim;
    for (int64_t t = blockIdx.x; t < tokens; t += gridDim.x) {
        for (int j = threadIdx.x; j < half; j += blockDim.x) {
            float s, c;
            sincosf(angles[t * half + j], &s, &c);
            cs[j] = c;
            sn[j] = s;
        }
        __syncthreads();
        rotate_heads(qkv + t * row_len, (int)(2 * heads), (int)head_dim, cs, sn);
        __syncthreads();
    }
}
