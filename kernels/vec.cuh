// vec.cuh: 16-byte loads and stores of bf16 for the memory-bound kernels (elementwise,
// layernorm, rmsnorm, embedding), and the warp sum of the one-warp-per-row kernels. Device code
// only: the host twins never include it.
#pragma once
#include "common.cuh"

// 8 bf16 in one 16-byte word, widened to f32 / narrowed back with round-to-nearest-even. The word
// is taken by value: one in shared memory is read with one 16-byte load, not four 4-byte ones that
// would conflict across lanes.
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

// The same through memory: one 16-byte load or store.
__device__ __forceinline__ void load8(float (&f)[8], const __nv_bfloat16* p) { unpack8(f, *reinterpret_cast<const uint4*>(p)); }

__device__ __forceinline__ void store8(__nv_bfloat16* p, const float (&f)[8]) { *reinterpret_cast<uint4*>(p) = pack8(f); }

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

// ---- rows cached in registers (the row-norm kernels, layernorm.cu and rmsnorm.cu) ----
// A lane's words of a row of at most KILN_LN_CACHE_C columns: word k at column 8 lane + 256 k,
// raw bf16, 4 registers a word.
constexpr int KILN_ROW_WORDS = KILN_LN_CACHE_C / 256;

// Reads the lane's words of row x into xv and returns the row's sum of term(value), lane partials
// in the uncached 16-byte walk's order, then the butterfly.
template <class Term>
__device__ __forceinline__ float cache_row(uint4 (&xv)[KILN_ROW_WORDS], const __nv_bfloat16* x, int c, int lane, Term term) {
    float s = 0.0f;
#pragma unroll
    for (int k = 0; k < KILN_ROW_WORDS; k++) {
        const int i = 8 * lane + 256 * k;
        if (i >= c) continue;
        xv[k] = *reinterpret_cast<const uint4*>(x + i);
        float f[8];
        unpack8(f, xv[k]);
#pragma unroll
        for (int j = 0; j < 8; j++) s += term(f[j]);
    }
    return warp_sum(s);
}

// The same for h = bf16(a + r), which is also stored: the residual-fused forwards.
template <class Term>
__device__ __forceinline__ float cache_residual_row(uint4 (&hv)[KILN_ROW_WORDS], __nv_bfloat16* h, const __nv_bfloat16* a, const __nv_bfloat16* r, int c, int lane, Term term) {
    float s = 0.0f;
#pragma unroll
    for (int k = 0; k < KILN_ROW_WORDS; k++) {
        const int i = 8 * lane + 256 * k;
        if (i >= c) continue;
        float fa[8], fr[8];
        load8(fa, a + i);
        load8(fr, r + i);
#pragma unroll
        for (int j = 0; j < 8; j++) fa[j] = __bfloat162float(__float2bfloat16_rn(fa[j] + fr[j]));
        hv[k] = pack8(fa);
        *reinterpret_cast<uint4*>(h + i) = hv[k];
#pragma unroll
        for (int j = 0; j < 8; j++) s += term(fa[j]);
    }
    return warp_sum(s);
}
