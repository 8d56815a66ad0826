// embedding: out[t, :] = table[ids[t], :], the token-embedding gather at the start of the
// language model (MODEL.md §7).
//
// Layout: table [vocab, D] bf16 row-major, ids [T] u32, out [T, D] bf16 row-major.
// Precision: a copy, bit-exact.
// Invalid ids: an id >= vocab is never read; its output row is written as NaN instead (the engine
// validates ids on the host before the launch, so this only makes a host bug visible).
// Launch: grid-stride, 256 threads. When D % 8 == 0 (the model: 2048) each thread moves 8 columns
// with one 16-byte load and store; otherwise one column at a time. All offsets are int64
// (vocab·D exceeds 2^31 for a large vocabulary at large D).
#include "common.cuh"

extern "C" __global__ void embedding_bf16(const __nv_bfloat16 *__restrict__ table,
                                          const uint32_t *__restrict__ ids,
                                          __nv_bfloat16 *__restrict__ out, int64_t tokens,
                                          int64_t dim, int64_t vocab) {
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    const int64_t first = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (dim % 8 == 0) {
        const int64_t groups_per_row = dim / 8;
        const int64_t n = tokens * groups_per_row;
        for (int64_t g = first; g < n; g += stride) {
            const int64_t t = g / groups_per_row;
            const int64_t c = (g - t * groups_per_row) * 8;
            const int64_t id = ids[t];
            bf16x8 v;
            if (id < vocab) {
                v = *reinterpret_cast<const bf16x8 *>(table + id * dim + c);
            } else {
                v = bf16x8_fill(bf16_nan());
            }
            *reinterpret_cast<bf16x8 *>(out + t * dim + c) = v;
        }
    } else {
        const int64_t n = tokens * dim;
        for (int64_t i = first; i < n; i += stride) {
            const int64_t t = i / dim;
            const int64_t c = i - t * dim;
            const int64_t id = ids[t];
            out[i] = id < vocab ? table[id * dim + c] : bf16_nan();
        }
    }
}

// embedding_f32: the same gather into an f32 row (the start of the decoder's f32 residual
// stream); bf16 → f32 is exact. One column per thread: the f32 rows are twice as wide in bytes.
extern "C" __global__ void embedding_f32(const __nv_bfloat16 *__restrict__ table,
                                         const uint32_t *__restrict__ ids, float *__restrict__ out,
                                         int64_t tokens, int64_t dim, int64_t vocab) {
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    const int64_t n = tokens * dim;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += stride) {
        const int64_t t = i / dim;
        const int64_t c = i - t * dim;
        const int64_t id = ids[t];
        out[i] = id < vocab ? __bfloat162float(table[id * dim + c]) : __int_as_float(0x7fc00000);
    }
}
