// embedding: out[t, :] = table[ids[t], :], the token-embedding gather at the start of the
// language model (docs/MODEL.md §7): the shared row gather of gather.cuh with the table as the source
// and the token ids as the index.
//
// embedding_bf16: out [T, D] bf16. embedding_f32: out [T, D] f32, the start of the decoder's f32
// residual stream (bf16 → f32 is exact).
// Layout: table [vocab, D] bf16 row-major, ids [T] u32.
// Invalid ids: an id >= vocab is never read; its output row is written as NaN.
// Launch: grid-stride, JV4_THREADS threads; 16-byte vectors when D % 8 == 0 (the model: 2048).
#include "gather.cuh"

extern "C" __global__ void __launch_bounds__(JV4_THREADS)
    embedding_bf16(const __nv_bfloat16 *__restrict__ table, const uint32_t *__restrict__ ids,
                   __nv_bfloat16 *__restrict__ out, int64_t tokens, int64_t dim, int64_t vocab) {
    gather_rows(table, ids, out, tokens, dim, vocab);
}

extern "C" __global__ void __launch_bounds__(JV4_THREADS)
    embedding_f32(const __nv_bfloat16 *__restrict__ table, const uint32_t *__restrict__ ids,
                  float *__restrict__ out, int64_t tokens, int64_t dim, int64_t vocab) {
    gather_rows(table, ids, out, tokens, dim, vocab);
}
