// Row gather and scatter of the vision path.
//
// gather_rows_bf16: out[i, :] = x[index[i], :]. The vision tower's window permutation (a row is
// one merge group of 4 patches, 4·1280 values) and the merger's un-permutation (the same gather
// with the inverse index).
// Layout: x [R_in, L] bf16, index [R_out] u32, out [R_out, L] bf16, all row-major.
// Precision: a copy, bit-exact.
// Invalid indices: an index >= R_in is never read; its output row is written as NaN.
//
// scatter_rows_f32: out[rows[i], :] = float(v[i, :]). The image-token splice: the vision tower's
// bf16 outputs replace the embeddings at the <|image_pad|> rows of the decoder's f32 residual
// stream. bf16 → f32 is exact. A row >= R is skipped; other rows of out are not touched. Rows
// must be distinct (two writes to one row would race).
// Layout: v [N, L] bf16, rows [N] u32, out [R, L] f32.
//
// Launch: grid-stride, 256 threads, int64 offsets. The gather moves 8 columns per thread with
// 16-byte loads and stores when L % 8 == 0, otherwise one; the scatter moves one column per
// thread (the f32 rows are twice as wide in bytes).
#include "common.cuh"

extern "C" __global__ void gather_rows_bf16(const __nv_bfloat16 *__restrict__ x,
                                            const uint32_t *__restrict__ index,
                                            __nv_bfloat16 *__restrict__ out, int64_t rows_out,
                                            int64_t row_len, int64_t rows_in) {
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    const int64_t first = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (row_len % 8 == 0) {
        const int64_t groups_per_row = row_len / 8;
        const int64_t n = rows_out * groups_per_row;
        for (int64_t g = first; g < n; g += stride) {
            const int64_t r = g / groups_per_row;
            const int64_t c = (g - r * groups_per_row) * 8;
            const int64_t src = index[r];
            bf16x8 v;
            if (src < rows_in) {
                v = *reinterpret_cast<const bf16x8 *>(x + src * row_len + c);
            } else {
                v = bf16x8_fill(bf16_nan());
            }
            *reinterpret_cast<bf16x8 *>(out + r * row_len + c) = v;
        }
    } else {
        const int64_t n = rows_out * row_len;
        for (int64_t i = first; i < n; i += stride) {
            const int64_t r = i / row_len;
            const int64_t c = i - r * row_len;
            const int64_t src = index[r];
            out[i] = src < rows_in ? x[src * row_len + c] : bf16_nan();
        }
    }
}

extern "C" __global__ void scatter_rows_f32(const __nv_bfloat16 *__restrict__ v,
                                            const uint32_t *__restrict__ rows,
                                            float *__restrict__ out, int64_t n_rows,
                                            int64_t row_len, int64_t rows_out) {
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    const int64_t n = n_rows * row_len;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += stride) {
        const int64_t r = i / row_len;
        const int64_t c = i - r * row_len;
        const int64_t dst = rows[r];
        if (dst < rows_out) out[dst * row_len + c] = __bfloat162float(v[i]);
    }
}
