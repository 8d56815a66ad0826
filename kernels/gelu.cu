// gelu: out[i] = 0.5·x·(1 + erf(x/√2)), the exact GELU (nn.GELU()) of the vision patch merger.
//
// Layout: x and out [n] bf16, any shape flattened (out-of-place).
// Precision: x widened to f32, erff (CUDA: ≤ 2 ulp) and the products in f32, one rounding to
// bf16.
// For x ≪ 0 the f32 value 1 + erf(x/√2) cancels, but its absolute error stays ~2^-24, far below
// half a bf16 ulp of the result wherever the result is not already negligible.
// Launch: grid-stride, JV4_THREADS threads. When n % 8 == 0 (the merger: 5120 per row) each
// thread moves 8 elements with 16-byte loads and stores; otherwise one element at a time.
#include "common.cuh"

__device__ __forceinline__ float gelu_erf(float x) {
    return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f));
}

extern "C" __global__ void __launch_bounds__(JV4_THREADS)
    gelu_bf16(const __nv_bfloat16 *__restrict__ x, __nv_bfloat16 *__restrict__ out, int64_t n) {
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    const int64_t first = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (n % 8 == 0) {
        const int64_t groups = n / 8;
        for (int64_t g = first; g < groups; g += stride) {
            float a[8];
            unpack8(*reinterpret_cast<const bf16x8 *>(x + g * 8), a);
#pragma unroll
            for (int i = 0; i < 8; ++i) a[i] = gelu_erf(a[i]);
            *reinterpret_cast<bf16x8 *>(out + g * 8) = pack8(a);
        }
    } else {
        for (int64_t i = first; i < n; i += stride) {
            out[i] = __float2bfloat16_rn(gelu_erf(__bfloat162float(x[i])));
        }
    }
}
