// attention.cuh: the per-element math of causal flash attention, shared by the kernels in
// attention.cu and the host twins in host/attention.cu (tested against src/backend/cpu/attention.rs
// without a GPU).
//
// The online softmax is written as the pieces the kernel applies: the kernel finds a tile's max
// with a warp reduction and keeps per-lane partial sums, so it cannot call one whole-tile function;
// attention_online_softmax_update strings the same pieces together over arrays, exactly in the
// order of the CPU's online_softmax_update, and is what the host twin runs.
#pragma once
#include "common.cuh"
#include <math.h>

// The new running max after a tile whose largest (masked) score is tile_max.
KILN_HD float attention_online_max(float m_old, float tile_max) { return fmaxf(m_old, tile_max); }

// The factor that rescales the running sum and accumulator when the max moves from m_old to m_new.
// The first tile has m_old = -inf and gives 0, which clears the (zero) state.
KILN_HD float attention_rescale(float m_old, float m_new) { return expf(m_old - m_new); }

// The unnormalised probability of score s under max m (forward), or the normalised probability
// of s when m is the row's log-sum-exp (backward). A masked score of -inf gives 0.
KILN_HD float attention_prob(float s, float m) { return expf(s - m); }

// The row's log-sum-exp from its final max and sum: all the backward keeps of the softmax.
KILN_HD float attention_lse(float m, float l) { return m + logf(l); }

// dS = P * (dP - D): the softmax backward for one score, D = rowsum(dO * O) of its query row.
// The caller multiplies by the score scale 1/sqrt(hd), as the CPU twin does.
KILN_HD float attention_dscore(float p, float dp, float d) { return p * (dp - d); }

// One online-softmax step over a whole tile: folds scores s[0..n) (values v, n rows of hd) into
// the running max *m, sum *l and accumulator acc[0..hd). The CPU's online_softmax_update.
KILN_HD void attention_online_softmax_update(float* m, float* l, float* acc, const float* s, const float* v, int n,
                                             int hd) {
    float tile_max = -INFINITY;
    for (int j = 0; j < n; ++j) tile_max = fmaxf(tile_max, s[j]);
    const float m_new = attention_online_max(*m, tile_max);
    const float corr = attention_rescale(*m, m_new);
    *l *= corr;
    for (int d = 0; d < hd; ++d) acc[d] *= corr;
    for (int j = 0; j < n; ++j) {
        const float p = attention_prob(s[j], m_new);
        *l += p;
        for (int d = 0; d < hd; ++d) acc[d] += p * v[(int64_t)j * hd + d];
    }
    *m = m_new;
}

// Shared-memory layout. Each kernel carves its dynamic shared memory into consecutive arrays, each
// a multiple of 16 bytes: f32 tiles [TILE][hd] (rows read by a whole warp at once, broadcast),
// bf16 tiles [TILE][hd + PAD] (row j read by lane j; the pad spreads rows over banks) and the
// per-warp probability block [WARPS][ROWS][TILE] f32. The wrapper sizes the launch with the same
// function (through kiln_host_attention_smem_bytes), so the two cannot disagree.
KILN_HD int attention_f32_tile_bytes(int hd) { return KILN_ATTN_TILE * hd * 4; }
KILN_HD int attention_bf16_tile_bytes(int hd) { return KILN_ATTN_TILE * (hd + KILN_ATTN_PAD) * 2; }
KILN_HD int attention_p_bytes() { return KILN_ATTN_WARPS * KILN_ATTN_ROWS * KILN_ATTN_TILE * 4; }

// The head dims the tensor-core forward takes (its fragment loops are unrolled per head dim).
KILN_HD bool attention_mma_head_dim(int hd) { return hd == KILN_ATTN_MMA_HEAD_DIM || hd == 2 * KILN_ATTN_MMA_HEAD_DIM; }

// The tensor-core forward's tiles: KILN_ATTN_MMA_ROWS rows of hd bf16, padded by KILN_ATTN_PAD so
// that the fragment loads (8 rows x 4 words per instruction) fall in 32 different banks.
KILN_HD int attention_mma_tile_bytes(int hd) { return KILN_ATTN_MMA_ROWS * (hd + KILN_ATTN_PAD) * 2; }

// Forward: Q f32, K bf16 (padded), V bf16 (padded, same shape as K), P.
// Backward dK/dV: K f32, V f32, Q bf16, dO bf16, P. Backward dQ: Q f32, dO f32, K bf16, V bf16, P.
KILN_HD int attention_smem_bytes(int kernel, int hd) {
    switch (kernel) {
    case KILN_ATTN_KERNEL_FORWARD:
        return attention_f32_tile_bytes(hd) + 2 * attention_bf16_tile_bytes(hd) + attention_p_bytes();
    case KILN_ATTN_KERNEL_FORWARD_MMA:  // head dims 64 and 128: Q, and K and V double-buffered, bf16 padded
        return attention_mma_head_dim(hd) ? attention_mma_tile_bytes(hd) * 5 : -1;
    case KILN_ATTN_KERNEL_DQ_MMA:  // Q and dO, and K and V double-buffered
        return attention_mma_head_dim(hd) ? attention_mma_tile_bytes(hd) * 6 : -1;
    case KILN_ATTN_KERNEL_DKDV_MMA:  // K and V, and Q, dO and their rows' lse and D double-buffered
        return attention_mma_head_dim(hd) ? attention_mma_tile_bytes(hd) * 6 + 4 * KILN_ATTN_MMA_ROWS * 4 : -1;
    case KILN_ATTN_KERNEL_DKDV:
    case KILN_ATTN_KERNEL_DQ:
        return 2 * attention_f32_tile_bytes(hd) + 2 * attention_bf16_tile_bytes(hd) + attention_p_bytes();
    default:
        return -1;
    }
}
