// The one row gather of the engine: out[i, :] = src[index[i], :] for i < rows_out, bf16 rows
// copied into bf16 or widened to f32 (exact). Used by the token-embedding lookup
// (kernels/embedding.cu: src = the table, index = the token ids) and by gather_rows
// (kernels/rows.cu: the vision tower's window permutation and its inverse).
//
// Layout: src [rows_in, L] bf16 row-major, index [rows_out] u32, out [rows_out, L] row-major.
// Precision: a copy, bit-exact (bf16 → f32 widening is exact).
// Invalid indices: an index >= rows_in is never read; its output row is written as NaN (the
// host validates indices before the launch, so this only makes a host bug visible).
// Launch: grid-stride over the elements (any grid, any block size). When L % 8 == 0 each thread
// moves 8 columns with one 16-byte load and one 16-byte (bf16) or two (f32) stores; otherwise one
// column at a time. All offsets are int64 (rows_in·L exceeds 2^31 for a large vocabulary).
#pragma once
#include "common.cuh"

__device__ __forceinline__ void store8(__nv_bfloat16 *dst, const bf16x8 &v) {
    *reinterpret_cast<bf16x8 *>(dst) = v;
}

__device__ __forceinline__ void store8(float *dst, const bf16x8 &v) {
    float f[8];
    unpack8(v, f);
    float4 *d = reinterpret_cast<float4 *>(dst);
    d[0] = make_float4(f[0], f[1], f[2], f[3]);
    d[1] = make_float4(f[4], f[5], f[6], f[7]);
}

__device__ __forceinline__ void store1(__nv_bfloat16 *dst, __nv_bfloat16 v) { *dst = v; }

__device__ __forceinline__ void store1(float *dst, __nv_bfloat16 v) { *dst = __bfloat162float(v); }

template <typename Out>
__device__ __forceinline__ void gather_rows(const __nv_bfloat16 *__restrict__ src,
                                            const uint32_t *__restrict__ index,
                                            Out *__restrict__ out, int64_t rows_out,
                                            int64_t row_len, int64_t rows_in) {
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    const int64_t first = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (row_len % 8 == 0) {
        const int64_t groups_per_row = row_len / 8;
        const int64_t n = rows_out * groups_per_row;
        for (int64_t g = first; g < n; g += stride) {
            const int64_t r = g / groups_per_row;
            const int64_t c = (g - r * groups_per_row) * 8;
            const int64_t i = index[r];
            const bf16x8 v = i < rows_in ? *reinterpret_cast<const bf16x8 *>(src + i * row_len + c)
                                         : bf16x8_fill(bf16_nan());
            store8(out + r * row_len + c, v);
        }
    } else {
        const int64_t n = rows_out * row_len;
        for (int64_t e = first; e < n; e += stride) {
            const int64_t r = e / row_len;
            const int64_t c = e - r * row_len;
            const int64_t i = index[r];
            store1(out + e, i < rows_in ? src[i * row_len + c] : bf16_nan());
        }
    }
}
