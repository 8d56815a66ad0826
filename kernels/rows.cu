// Row gather and scatter of the vision path.
//
// gather_rows_bf16: out[i, :] = x[index[i], :], the shared row gather of gather.cuh (also the
// embedding lookup's). The vision tower's window permutation (a row is one merge group of 4
// patches, 4·1280 values) and the merger's un-permutation (the same gather with the inverse
// index).
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
// Launch: grid-stride, JV4_THREADS threads, int64 offsets. The gather moves 8 columns per thread
// with 16-byte loads and stores when L % 8 == 0, otherwise one; the scatter moves one column per
// thread (the f32 rows are twice as wide in bytes).
#include "gather.cuh"

extern "C" __global__ void __launch_bounds__(JV4_THREADS)
    gather_rows_bf16(const __nv_bfloat16 *__restrict__ x, const uint32_t *__restrict__ index,
                     __nv_bfloat16 *__restrict__ out, int64_t rows_out, int64_t row_len,
                     int64_t rows_in) {
    gather_rows(x, index, out, rows_out, row_len, rows_in);
}

extern "C" __global__ void __launch_bounds__(JV4_THREADS)
    scatter_rows_f32(const __nv_bfloat16 *__restrict__ v, const uint32_t *__restrict__ rows,
                     float *__restrict__ out, int64_t n_rows, int64_t row_len, int64_t rows_out) {
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    const int64_t n = n_rows * row_len;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += stride) {
        const int64_t r = i / row_len;
        const int64_t c = i - r * row_len;
        const int64_t dst = rows[r];
        if (dst < rows_out) out[dst * row_len + c] = __bfloat162float(v[i]);
    }
}
