// swiglu: out[t, j] = silu(gu[t, j]) * gu[t, I + j], the Qwen2 MLP activation over the fused
// [gate | up] projection output (row width 2I) written by one GEMM.
//
// Layout: gu [T, 2I] bf16 row-major, out [T, I] bf16 row-major.
// Precision: both inputs widened to f32, silu and the product in f32, one rounding to bf16
// (HF rounds twice, after silu and after the product; ours is the more accurate of the two).
// Launch: grid-stride over T*I/8 groups of 8 columns, 256 threads; requires I % 8 == 0 so that
// every access is a 16-byte vector (the launcher checks). Memory-bound: 3 * 2 bytes per element.
#include "common.cuh"

__device__ __forceinline__ float silu(float x) { return x / (1.0f + __expf(-x)); }

extern "C" __global__ void swiglu_bf16(const __nv_bfloat16 *__restrict__ gu,
                                       __nv_bfloat16 *__restrict__ out, int64_t tokens,
                                       int64_t inter) {
    const int64_t groups_per_row = inter / 8;
    const int64_t n = tokens * groups_per_row;
    for (int64_t g = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; g < n;
         g += (int64_t)gridDim.x * blockDim.x) {
        const int64_t t = g / groups_per_row;
        const int64_t c = (g - t * groups_per_row) * 8;
        const __nv_bfloat16 *row = gu + t * 2 * inter;
        float a[8], b[8], y[8];
        unpack8(*reinterpret_cast<const bf16x8 *>(row + c), a);
        unpack8(*reinterpret_cast<const bf16x8 *>(row + inter + c), b);
#pragma unroll
        for (int i = 0; i < 8; ++i) y[i] = silu(a[i]) * b[i];
        *reinterpret_cast<bf16x8 *>(out + t * inter + c) = pack8(y);
    }
}
