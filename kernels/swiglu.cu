// swiglu: out[t, j] = silu(gu[t, j]) * gu[t, I + j], the MLP activation of the Qwen2 decoder and
// of the vision blocks, over the fused [gate | up] projection output that one GEMM writes.
//
// Layout: gu [T, 2I] bf16 row-major, out [T, I] bf16 row-major with rows ld_out >= I elements
// apart (the first I columns of a wider buffer: the folded LoRA's [act | t]; the rest untouched).
// Precision: inputs widened to f32, silu and the product in f32, one rounding to bf16 (HF rounds
// twice, after silu and after the product; one rounding is the more accurate).
// Launch: grid-stride, JV4_THREADS threads. When I % 8 == 0 (the text model: 11008) each thread
// moves 8 columns with 16-byte loads and stores; otherwise (the vision tower: 3420) one column at
// a time. Memory-bound: 6 bytes per output element.
#include "common.cuh"

__device__ __forceinline__ float silu(float x) { return x / (1.0f + expf(-x)); }

extern "C" __global__ void __launch_bounds__(JV4_THREADS)
    swiglu_bf16(const __nv_bfloat16 *__restrict__ gu, __nv_bfloat16 *__restrict__ out,
                int64_t tokens, int64_t inter, int64_t ld_out) {
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    const int64_t first = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (inter % 8 == 0) {
        const int64_t groups_per_row = inter / 8;
        const int64_t n = tokens * groups_per_row;
        for (int64_t g = first; g < n; g += stride) {
            const int64_t t = g / groups_per_row;
            const int64_t c = (g - t * groups_per_row) * 8;
            const __nv_bfloat16 *row = gu + t * 2 * inter;
            float a[8], b[8], y[8];
            unpack8(*reinterpret_cast<const bf16x8 *>(row + c), a);
            unpack8(*reinterpret_cast<const bf16x8 *>(row + inter + c), b);
#pragma unroll
            for (int i = 0; i < 8; ++i) y[i] = silu(a[i]) * b[i];
            *reinterpret_cast<bf16x8 *>(out + t * ld_out + c) = pack8(y);
        }
    } else {
        const int64_t n = tokens * inter;
        for (int64_t i = first; i < n; i += stride) {
            const int64_t t = i / inter;
            const int64_t c = i - t * inter;
            const __nv_bfloat16 *row = gu + t * 2 * inter;
            const float a = __bfloat162float(row[c]);
            const float b = __bfloat162float(row[inter + c]);
            out[t * ld_out + c] = __float2bfloat16_rn(silu(a) * b);
        }
    }
}
