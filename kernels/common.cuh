// Shared device helpers for every kernel file: bf16 <-> f32 and 16-byte vector access.
// Precision policy of the engine: bf16 in memory, f32 in registers for all arithmetic.
#pragma once
#include <cuda_bf16.h>
#include <stdint.h>

// Eight bf16 values moved as one 16-byte load or store.
struct __align__(16) bf16x8 {
    __nv_bfloat162 h[4];
};

__device__ __forceinline__ void unpack8(const bf16x8 &v, float (&f)[8]) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        float2 p = __bfloat1622float2(v.h[i]);
        f[2 * i] = p.x;
        f[2 * i + 1] = p.y;
    }
}

__device__ __forceinline__ bf16x8 pack8(const float (&f)[8]) {
    bf16x8 v;
#pragma unroll
    for (int i = 0; i < 4; ++i) v.h[i] = __floats2bfloat162_rn(f[2 * i], f[2 * i + 1]);
    return v;
}
