// colsum.cuh: the finish step of kiln's deterministic column sums (the bias gradient, layernorm's
// dw/db, RMSNorm's dw): out[col] = the sum over g = 0..groups-1 of part[g * stride + col], where a
// partial kernel wrote one row of part per group of input rows.
//
// One block of 32 x KILN_COLSUM_WARPS threads finishes 32 adjacent columns: warp w adds groups
// w, w + W, w + 2W, ... in that order (lane l owns column 32 blockIdx.x + l, so each warp reads one
// 128-byte line per group), then warp 0 adds the W warps' sums in warp order. The order depends
// only on `groups`, so the bits are the same on every run. Against one thread per column adding
// all groups, a column's serial chain is W times shorter and the grid W times larger (GPT-2's
// C = 768 with 128 groups: 24 blocks of 16-add chains instead of 3 blocks of 128-add chains),
// which is what these launches, a few hundred KB each, are bound by.
#pragma once
#include "common.cuh"

// The finish's order of additions, for host twins to replay: the sum of the `groups` values
// part[0], part[stride], part[2 stride], ... as colsum_block adds them.
KILN_HD float colsum_in_order(const float* part, int64_t stride, int groups) {
    float r = 0.0f;
    for (int w = 0; w < KILN_COLSUM_WARPS; ++w) {
        float t = 0.0f;
        for (int g = w; g < groups; g += KILN_COLSUM_WARPS) t += part[static_cast<int64_t>(g) * stride];
        r += t;
    }
    return r;
}

#if defined(__CUDACC__) || defined(KILN_CUDA_EMU)
// The sum for column `col` (valid in warp 0, threadIdx.y == 0; `ok` false: a column past the
// end, which reads nothing). Every thread of the block must call it (it has a barrier). `sums` is
// the kernel's shared float [KILN_COLSUM_WARPS][32], declared in the .cu file (the emulator build
// rewrites shared declarations there only).
__device__ __forceinline__ float colsum_block(float (*sums)[32], const float* part, int64_t stride, int groups, int col, bool ok) {
    float t = 0.0f;
    if (ok) {
        for (int g = threadIdx.y; g < groups; g += KILN_COLSUM_WARPS) t += part[static_cast<int64_t>(g) * stride + col];
    }
    sums[threadIdx.y][threadIdx.x] = t;
    __syncthreads();
    float r = 0.0f;
    if (threadIdx.y == 0) {
#pragma unroll
        for (int w = 0; w < KILN_COLSUM_WARPS; ++w) r += sums[w][threadIdx.x];
    }
    return r;
}
#endif
