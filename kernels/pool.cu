// Output heads (docs/MODEL.md §8): the single-vector mean pooling with L2 normalisation
// (mean_pool_l2_f32) and the multi-vector per-token L2 normalisation (l2_rows_f32).
//
// mean_pool_l2_f32: for each span b, v = mean of h[s_b .. e_b) (rows), out[b] = v / max(‖v‖, 1e-12).
//   Layout: h [T, D] bf16 row-major, spans [B, 2] u32 (start, end) rows, half-open; out [B, D] f32.
//   Precision: per column the rows are summed in f32 in row order from s to e (one thread owns
//   the column for the whole span), divided by the row count; ‖v‖² in f32 by a fixed block tree;
//   the division by max(‖v‖, 1e-12) in f32. The order of every addition depends on the span's
//   rows and on D only, never on the other spans of the batch: a span's result is bit-identical
//   whatever it is batched with.
//   Invalid spans (s >= e or e > T) are never read; their output row is written as NaN (the engine
//   validates spans on the host before the launch).
//   Launch: one block per span (grid-stride over spans), blockDim a multiple of 32 (at most
//   JV4_THREADS) chosen from D only. When D % 8 == 0 (2048) a thread owns 8 columns (16-byte
//   loads, 4 rows in flight); otherwise one column at a time. The mean is written to out, then
//   the same thread rescales it once the block has the norm.
//
// l2_rows_f32: out[t] = x[t] / max(‖x[t]‖, 1e-12), x [T, C] bf16 → out [T, C] f32 (C = 128 for the
//   multi-vector head). One warp per row (grid-stride over rows), lanes stride the columns; the
//   sum of squares in f32 (sequential per lane, then a warp butterfly).
#include "common.cuh"

extern "C" __global__ void __launch_bounds__(JV4_THREADS)
    mean_pool_l2_f32(const __nv_bfloat16 *__restrict__ h, const uint32_t *__restrict__ spans,
                     float *__restrict__ out, int64_t tokens, int64_t dim, int64_t batch) {
    __shared__ float scratch[32];
    for (int64_t b = blockIdx.x; b < batch; b += gridDim.x) {
        const int64_t s = spans[2 * b], e = spans[2 * b + 1];
        float *o = out + b * dim;
        if (!(s < e && e <= tokens)) {
            // Block-uniform branch (s, e are the same for every thread): no barrier is skipped.
            for (int64_t c = threadIdx.x; c < dim; c += blockDim.x) o[c] = __int_as_float(0x7FC00000);
            continue;
        }
        const float count = (float)(e - s);
        float ss = 0.0f;
        if (dim % 8 == 0) {
            const int64_t groups = dim / 8;
            for (int64_t g = threadIdx.x; g < groups; g += blockDim.x) {
                float acc[8];
#pragma unroll
                for (int i = 0; i < 8; ++i) acc[i] = 0.0f;
                const __nv_bfloat16 *p = h + s * dim + g * 8;
                int64_t r = s;
                // Four rows in flight, added strictly in row order.
                for (; r + 4 <= e; r += 4, p += 4 * dim) {
                    const bf16x8 v0 = *reinterpret_cast<const bf16x8 *>(p);
                    const bf16x8 v1 = *reinterpret_cast<const bf16x8 *>(p + dim);
                    const bf16x8 v2 = *reinterpret_cast<const bf16x8 *>(p + 2 * dim);
                    const bf16x8 v3 = *reinterpret_cast<const bf16x8 *>(p + 3 * dim);
                    float f[8];
                    unpack8(v0, f);
#pragma unroll
                    for (int i = 0; i < 8; ++i) acc[i] += f[i];
                    unpack8(v1, f);
#pragma unroll
                    for (int i = 0; i < 8; ++i) acc[i] += f[i];
                    unpack8(v2, f);
#pragma unroll
                    for (int i = 0; i < 8; ++i) acc[i] += f[i];
                    unpack8(v3, f);
#pragma unroll
                    for (int i = 0; i < 8; ++i) acc[i] += f[i];
                }
                for (; r < e; ++r, p += dim) {
                    float f[8];
                    unpack8(*reinterpret_cast<const bf16x8 *>(p), f);
#pragma unroll
                    for (int i = 0; i < 8; ++i) acc[i] += f[i];
                }
#pragma unroll
                for (int i = 0; i < 8; ++i) {
                    acc[i] = acc[i] / count;
                    ss += acc[i] * acc[i];
                }
                float4 *o4 = reinterpret_cast<float4 *>(o + g * 8);
                o4[0] = make_float4(acc[0], acc[1], acc[2], acc[3]);
                o4[1] = make_float4(acc[4], acc[5], acc[6], acc[7]);
            }
        } else {
            for (int64_t c = threadIdx.x; c < dim; c += blockDim.x) {
                float acc = 0.0f;
                for (int64_t r = s; r < e; ++r) acc += __bfloat162float(h[r * dim + c]);
                acc = acc / count;
                ss += acc * acc;
                o[c] = acc;
            }
        }
        const float norm = fmaxf(sqrtf(block_sum(ss, scratch)), 1e-12f);
        // Each thread rescales exactly the columns it wrote above (same loop bounds), so no
        // barrier is needed between the two passes.
        if (dim % 8 == 0) {
            for (int64_t g = threadIdx.x; g < dim / 8; g += blockDim.x) {
#pragma unroll
                for (int i = 0; i < 8; ++i) o[g * 8 + i] = o[g * 8 + i] / norm;
            }
        } else {
            for (int64_t c = threadIdx.x; c < dim; c += blockDim.x) o[c] = o[c] / norm;
        }
    }
}

extern "C" __global__ void __launch_bounds__(JV4_THREADS)
    l2_rows_f32(const __nv_bfloat16 *__restrict__ x, float *__restrict__ out, int64_t tokens,
                int64_t dim) {
    const int lane = threadIdx.x & 31;
    const int64_t warps_per_block = blockDim.x >> 5;
    const int64_t warps = (int64_t)gridDim.x * warps_per_block;
    // t is the same for every lane of a warp: the loop and the shuffles are warp-uniform.
    for (int64_t t = blockIdx.x * warps_per_block + (threadIdx.x >> 5); t < tokens; t += warps) {
        const __nv_bfloat16 *xr = x + t * dim;
        float *o = out + t * dim;
        float ss = 0.0f;
        for (int64_t c = lane; c < dim; c += 32) {
            const float f = __bfloat162float(xr[c]);
            ss += f * f;
        }
        const float norm = fmaxf(sqrtf(warp_sum(ss)), 1e-12f);
        for (int64_t c = lane; c < dim; c += 32) o[c] = __bfloat162float(xr[c]) / norm;
    }
}
