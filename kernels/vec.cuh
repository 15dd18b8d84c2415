// vec.cuh: 16-byte loads and stores of bf16 for the memory-bound kernels (elementwise,
// layernorm, rmsnorm, embedding), and the warp sum of the one-warp-per-row kernels. Device code
// only: the host twins never include it.
#pragma once
#include "common.cuh"

// 8 bf16 in 16 bytes, widened to f32 / narrowed back with round-to-nearest-even.
__device__ __forceinline__ void load8(float (&f)[8], const __nv_bfloat16* p) {
    const uint4 u = *reinterpret_cast<const uint4*>(p);
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&u);
#pragma unroll
    for (int j = 0; j < 4; j++) {
        const float2 t = __bfloat1622float2(h[j]);
        f[2 * j] = t.x;
        f[2 * j + 1] = t.y;
    }
}

__device__ __forceinline__ void store8(__nv_bfloat16* p, const float (&f)[8]) {
    uint4 u;
    __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&u);
#pragma unroll
    for (int j = 0; j < 4; j++) h[j] = __floats2bfloat162_rn(f[2 * j], f[2 * j + 1]);
    *reinterpret_cast<uint4*>(p) = u;
}

// The same from and to a 16-byte word in registers (taken by value: a word in shared memory is
// read with one 16-byte load, not four 4-byte ones that would conflict across lanes).
__device__ __forceinline__ void unpack8(float (&f)[8], uint4 u) {
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&u);
#pragma unroll
    for (int j = 0; j < 4; j++) {
        const float2 t = __bfloat1622float2(h[j]);
        f[2 * j] = t.x;
        f[2 * j + 1] = t.y;
    }
}

__device__ __forceinline__ uint4 pack8(const float (&f)[8]) {
    uint4 u;
    __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&u);
#pragma unroll
    for (int j = 0; j < 4; j++) h[j] = __floats2bfloat162_rn(f[2 * j], f[2 * j + 1]);
    return u;
}

// Copies n16 16-byte words from global to shared memory with the whole block, then a barrier:
// a row kernel's weights, read once per block instead of once per row. Every thread must call it.
__device__ __forceinline__ void stage16(uint4* dst, const void* src, int n16) {
    for (int i = threadIdx.x; i < n16; i += blockDim.x) dst[i] = reinterpret_cast<const uint4*>(src)[i];
    __syncthreads();
}

// Writes per-row statistics that a block's warps gathered in shared memory during its row loop
// (s[i] for row first + i) with one coalesced store, not a 4-byte store per warp and row. Starts
// with a barrier: every thread must call it, after the loop.
__device__ __forceinline__ void store_block_rows(float* out, const float* s, int64_t first, int64_t end) {
    __syncthreads();
    for (int64_t i = threadIdx.x; i < end - first; i += blockDim.x) out[first + i] = s[i];
}

// Whether a 16-byte access at p is aligned (the vector paths need every pointer aligned).
__device__ __forceinline__ bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// The sum of v over the warp's 32 lanes, in every lane (a butterfly: the order is fixed, so the
// same inputs give the same bits).
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
