// lora_mask: per-row task selection of the LoRA path (docs/MODEL.md §6). The engine computes
// t = x·[A_0; A_1; …]ᵀ for all tasks in one GEMM ([T, tasks·r]), this kernel zeroes in place every
// r-wide column group g of row i with g != row_task[i], and one GEMM with [B_0 | B_1 | …]
// accumulates the delta: each row gets exactly its own task's (x·A_τᵀ)·B_τᵀ whatever the batch mix.
//
// Layout: t [T, tasks·r] bf16 (in place), rows ld >= tasks·r elements apart (t may be a column
// window of a wider buffer: the folded LoRA's [x | t]), row_task [T] u8.
// A row whose task is >= tasks has every group zeroed (no group belongs to it: no LoRA delta).
// Precision: kept elements are not touched; masked elements become +0.0 exactly.
// Launch: grid-stride, JV4_THREADS threads. When r % 8 == 0 (the model: 32) a thread handles 8
// columns, all in the same group, with one 16-byte store; otherwise one column at a time. The
// kernel only writes (never reads t).
#include "common.cuh"

extern "C" __global__ void __launch_bounds__(JV4_THREADS)
    lora_mask_bf16(__nv_bfloat16 *__restrict__ t, const uint8_t *__restrict__ row_task,
                   int64_t tokens, int64_t tasks, int64_t r, int64_t ld) {
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    const int64_t first = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    const int64_t cols = tasks * r;
    if (r % 8 == 0) {
        const int64_t groups_per_row = cols / 8;
        const int64_t n = tokens * groups_per_row;
        const bf16x8 zero = bf16x8_fill(__float2bfloat16_rn(0.0f));
        for (int64_t g = first; g < n; g += stride) {
            const int64_t row = g / groups_per_row;
            const int64_t c = (g - row * groups_per_row) * 8;
            if (c / r != (int64_t)row_task[row]) {
                *reinterpret_cast<bf16x8 *>(t + row * ld + c) = zero;
            }
        }
    } else {
        const int64_t n = tokens * cols;
        for (int64_t i = first; i < n; i += stride) {
            const int64_t row = i / cols;
            const int64_t c = i - row * cols;
            if (c / r != (int64_t)row_task[row]) t[row * ld + c] = __float2bfloat16_rn(0.0f);
        }
    }
}
