// rmsnorm: y[t, :] = w ⊙ (x[t, :] · rsqrt(mean_j(x[t, j]²) + eps)), the weight-only RMSNorm of
// the decoder (input/post-attention/final norms, docs/MODEL.md §7.1) and of the vision blocks (§5.4).
//
// Layout: x [T, D] bf16 row-major, w [D] bf16, out [T, D] bf16 row-major (out may not alias x).
// Precision: x and w widened to f32; the sum of squares in f32 (per-thread sequential, then a
// fixed warp/block tree: deterministic, independent of T and of the other rows); the scale, the
// normalised value and the weight product in f32 with ONE rounding to bf16 at the end. HF rounds
// x·rsqrt(…) to bf16 before multiplying by w (two roundings); one rounding is the more accurate,
// and differs from HF by at most one bf16 ulp per element.
// Launch: one block per row (grid-stride over rows when T exceeds the grid), blockDim a multiple
// of 32 (at most JV4_THREADS; the launcher picks it from D only). When D % 8 == 0 (2048, 1280) each
// thread handles 8 columns per 16-byte load; otherwise one column at a time. The row is read
// twice: the second read (≤ a few KiB per row) comes from L1/L2.
#include "common.cuh"

extern "C" __global__ void __launch_bounds__(JV4_THREADS)
    rmsnorm_bf16(const __nv_bfloat16 *__restrict__ x, const __nv_bfloat16 *__restrict__ w,
                 __nv_bfloat16 *__restrict__ out, int64_t tokens, int64_t dim, float eps) {
    __shared__ float scratch[32];
    for (int64_t t = blockIdx.x; t < tokens; t += gridDim.x) {
        const __nv_bfloat16 *xr = x + t * dim;
        __nv_bfloat16 *yr = out + t * dim;
        float ss = 0.0f;
        if (dim % 8 == 0) {
            const int64_t groups = dim / 8;
            for (int64_t g = threadIdx.x; g < groups; g += blockDim.x) {
                float f[8];
                unpack8(*reinterpret_cast<const bf16x8 *>(xr + g * 8), f);
#pragma unroll
                for (int i = 0; i < 8; ++i) ss += f[i] * f[i];
            }
            const float inv = rsqrtf(block_sum(ss, scratch) / (float)dim + eps);
            for (int64_t g = threadIdx.x; g < groups; g += blockDim.x) {
                float f[8], wf[8], y[8];
                unpack8(*reinterpret_cast<const bf16x8 *>(xr + g * 8), f);
                unpack8(*reinterpret_cast<const bf16x8 *>(w + g * 8), wf);
#pragma unroll
                for (int i = 0; i < 8; ++i) y[i] = wf[i] * (f[i] * inv);
                *reinterpret_cast<bf16x8 *>(yr + g * 8) = pack8(y);
            }
        } else {
            for (int64_t c = threadIdx.x; c < dim; c += blockDim.x) {
                const float f = __bfloat162float(xr[c]);
                ss += f * f;
            }
            const float inv = rsqrtf(block_sum(ss, scratch) / (float)dim + eps);
            for (int64_t c = threadIdx.x; c < dim; c += blockDim.x) {
                const float f = __bfloat162float(xr[c]);
                yr[c] = __float2bfloat16_rn(__bfloat162float(w[c]) * (f * inv));
            }
        }
        // block_sum ends with __syncthreads, so the next row may reuse scratch right away.
    }
}

// rmsnorm_f32: the same norm over an f32 input: the decoder and the vision tower keep their
// residual streams in f32 (the GEMMs accumulate into them without rounding to bf16 each time), and
// normalise them into the bf16 activations the next GEMM reads. Same launch shape; when D % 4 == 0
// each thread reads 4 columns with one 16-byte load. Output rows are ld_out >= D elements apart: the first D columns of a
// wider buffer (the folded LoRA's [x | t], docs/MODEL.md §6); the other columns are not touched.
extern "C" __global__ void __launch_bounds__(JV4_THREADS)
    rmsnorm_f32_bf16(const float *__restrict__ x, const __nv_bfloat16 *__restrict__ w,
                     __nv_bfloat16 *__restrict__ out, int64_t tokens, int64_t dim, int64_t ld_out,
                     float eps) {
    __shared__ float scratch[32];
    for (int64_t t = blockIdx.x; t < tokens; t += gridDim.x) {
        const float *xr = x + t * dim;
        __nv_bfloat16 *yr = out + t * ld_out;
        float ss = 0.0f;
        if (dim % 4 == 0) {
            const int64_t groups = dim / 4;
            for (int64_t g = threadIdx.x; g < groups; g += blockDim.x) {
                const float4 f = *reinterpret_cast<const float4 *>(xr + g * 4);
                ss += f.x * f.x + f.y * f.y + f.z * f.z + f.w * f.w;
            }
            const float inv = rsqrtf(block_sum(ss, scratch) / (float)dim + eps);
            for (int64_t g = threadIdx.x; g < groups; g += blockDim.x) {
                const float4 f = *reinterpret_cast<const float4 *>(xr + g * 4);
                const __nv_bfloat16 *wg = w + g * 4;
                yr[g * 4 + 0] = __float2bfloat16_rn(__bfloat162float(wg[0]) * (f.x * inv));
                yr[g * 4 + 1] = __float2bfloat16_rn(__bfloat162float(wg[1]) * (f.y * inv));
                yr[g * 4 + 2] = __float2bfloat16_rn(__bfloat162float(wg[2]) * (f.z * inv));
                yr[g * 4 + 3] = __float2bfloat16_rn(__bfloat162float(wg[3]) * (f.w * inv));
            }
        } else {
            for (int64_t c = threadIdx.x; c < dim; c += blockDim.x) ss += xr[c] * xr[c];
            const float inv = rsqrtf(block_sum(ss, scratch) / (float)dim + eps);
            for (int64_t c = threadIdx.x; c < dim; c += blockDim.x) {
                yr[c] = __float2bfloat16_rn(__bfloat162float(w[c]) * (xr[c] * inv));
            }
        }
    }
}
