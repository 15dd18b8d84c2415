// attention.cu: causal multi-head self-attention, the flash way (FlashAttention-2's loop order),
// on CUDA cores. CPU twin: src/backend/cpu/attention.rs (the same names, over packed qkv; with RoPE
// on load, src/backend/cpu/rope.rs's rope_pack before it and rope_unpack after).
//
// What it computes. Queries of NH heads and the keys and values of NKV heads (head dim hd = C / NH,
// Ckv = NKV hd), from three pointers with row strides (the operands, described below the
// helpers): GPT-2's packed c_attn output [B, T, 3C] (NKV = NH), or a Llama block's q, k and v as
// its three projections give them, with grouped-query heads and RoPE applied on load. Query head h
// attends with KV head h / (NH / NKV), read in place: no K or V is copied per group. Forward: out
// [B, T, C] bf16 = softmax(q k^T / sqrt(hd), causal) v, and lse [B, NH, T] f32, the log-sum-exp
// of each row's scaled scores, all the backward keeps of the softmax. Backward: dq, dk and dv laid
// out as q, k and v, every element written once (=, not +=), from dout [B, T, C], q, k, v, out
// and lse, by three kernels:
//   attention_backward_preprocess  D [B, NH, T] f32 = rowsum(dout * out) per head;
//   attention_backward_dkdv        dK, dV: one block per (key tile, KV head), looping over the
//                                  group's query heads and their query tiles in a fixed order;
//   attention_backward_dq          dQ: one block per query tile, looping over key tiles.
// Each recomputes P = exp(s - lse) rather than storing it. Splitting dQ from dK/dV recomputes the
// scores and dP once more (7 tile products instead of 5), and buys determinism with no atomics:
// each output element is summed by one thread in a fixed order.
//
// How the work splits. A tile is 32 rows (KILN_ATTN_TILE). One block of 4 warps per
// (tile, head, batch) = grid (ceil(T / 32), NH, B); each warp owns 8 of the block's 32 rows
// (queries in the forward and dQ, keys in dK/dV). Blocks take query tiles last first, so that the
// longest (those with the most key tiles) start first; in dK/dV the longest, the first key tiles,
// come first anyway. A score tile is computed with lanes over the other side's 32 rows: lane j
// takes key j (or query j) and forms the 8 dot products of its warp's rows with it, reading its
// own row of a bf16 tile (padded so the 32 rows fall in different banks) and the warp's rows from
// an f32 tile by broadcast. The probabilities go to a per-warp block of
// shared memory; the products P V, dS K, P^T dO and dS^T Q then run with lanes over head-dim
// pairs (lane owns dims 2*lane, 2*lane+1 and, for hd > 64, 64 + the same), reading the
// probabilities as broadcast float4s. Scores are computed by one function (dot_rows) in all three
// kernels, in the same order over d, so the backward's recomputed scores equal the forward's bit
// for bit. The online softmax keeps the row max in every lane (a butterfly reduction) and the
// running sum per lane, summed across the warp once at the end.
//
// Variants. Each CUDA-core kernel body is a template on the head dim: 64 (GPT-2, fully unrolled)
// and 0 (any multiple of 8 up to KILN_ATTN_MAX_HEAD_DIM = 128, read at run time); the kernel picks
// one. These keep P, dS and all sums in f32, so they are at least as accurate as the plain bf16
// reference the tests measure against. The forward has a second, tensor-core variant,
// attention_forward_mma (head dims 64 and 128, sm_80+; the wrapper's AttentionVariant picks it there):
// FlashAttention-2's forward on mma.sync m16n8k16 bf16 -> f32. One block of 4 warps per 64 query
// rows, each warp 16 rows (one m16 block); K and V tiles of 64 keys staged in shared memory with
// cp.async, double-buffered (the next tile loads while this one is used); S = Q K^T and O += P V
// on tensor cores, the online softmax in f32 on the accumulator fragments, P rounded to bf16 in
// registers (the S accumulators are the P V A-fragments, see the layout note at the kernel), and
// the causal mask applied on the diagonal tile only. Same out and lse as attention_forward.
// The backward has tensor-core variants too (sm_80+, head dims 64 and 128, where their tiles fit):
// attention_backward_dkdv_mma (64 keys per block, the transposed products S^T = K Q^T and
// dP^T = V dO^T, then dV += P^T dO and dK += dS^T Q) and attention_backward_dq_mma (the forward's
// tiles with dO beside Q), both rounding P and dS to bf16 for the products as FlashAttention-2
// does, and still split so that each output element is summed by one thread (7 tile products, no
// atomics).
//
// Shared memory is dynamic, sized by attention_smem_bytes (attention.cuh): 21.5 KB (forward),
// 45 KB (forward_mma), 29.7 KB (backward), 54 KB (dq_mma) and 55 KB (dkdv_mma) at hd = 64; at
// hd = 128 the backward needs 54.3 KB, the forward_mma 85 KB and the mma backward 102-103 KB (over
// sm_86/89's 99 KB: the wrapper keeps the backward on CUDA cores there), which the wrapper allows
// by raising the kernel's dynamic shared-memory limit.
//
// Generation (the KV cache, kernels at the end of the file): attention_cache_append splits the qkv
// of new positions into q and the caches' next rows; attention_decode attends each new query to
// the cache, one warp per (query, head, batch), on CUDA cores with the same online softmax. It has
// no backward: the cache is for inference.
//
// Tested by: cargo test --release --features cuda --test attention (both forward variants at every
// shape; needs a GPU), and on the CPU by the emulated device (kernels/emu/README.md).
#include "common.cuh"
#include "attention.cuh"
#include "rope.cuh"

namespace {

constexpr int TILE = KILN_ATTN_TILE;
constexpr int WARPS = KILN_ATTN_WARPS;
constexpr int ROWS = KILN_ATTN_ROWS;
constexpr int PAD = KILN_ATTN_PAD;
constexpr int THREADS = WARPS * 32;
// Head-dim pairs per lane: hd / 2 <= 64 pairs over 32 lanes.
constexpr int NP = KILN_ATTN_MAX_HEAD_DIM / 64;
static_assert(WARPS * ROWS == TILE, "a block's warps cover one tile of rows");
static_assert(TILE == 32, "lanes index the rows of a tile");
static_assert(TILE % 4 == 0, "probabilities are read four at a time");

typedef __nv_bfloat16 bf16;

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
    return x;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

// The operands. q [B, T, ldq] holds query head h at columns h hd .. (h + 1) hd of each row; k and
// v [B, T, ldkv] hold KV head g at g hd. Query head h reads KV head g = h / (NH / NKV), in place: no
// K or V is copied per group. GPT-2's packed qkv [B, T, 3C] passes q = qkv, k = qkv + C, v = qkv +
// 2C with ldq = ldkv = 3C (a packed GQA row [q | k | v]: k = qkv + C, v = qkv + C + Ckv); a Llama
// block passes its three projections as they are (ldq = C, ldkv = Ckv). The backward writes dq, dk
// and dv with the same strides as q, k and v. Pointers and strides are multiples of 8 elements
// (16 bytes), which the wrapper checks.
//
// RoPE on load. With a table cs ([T][hd] f32, rope.cu's layout: cos of pair i at [p][i], sin at
// [p][hd/2 + i]), q and k are rotated as they are loaded (row t at position t) and dq, dk rotated
// back as they are stored, so a Llama block's attention needs no packed, rotated copy of q and k.
// A rotated value is rounded to bf16, as rope_pack stores it, and a gradient is rounded to bf16
// before it is turned back, as attention-then-rope_unpack does: the fused kernels equal rope_pack +
// attention + rope_unpack bit for bit. cs null: no rotation (GPT-2).

__device__ __forceinline__ float round_bf16(float x) { return __bfloat162float(__float2bfloat16_rn(x)); }

// Eight bf16 (one 16-byte word, element 0 in the low half of .x) as f32.
__device__ __forceinline__ void unpack8(uint4 u, float f[8]) {
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        f[2 * i] = __uint_as_float(w[i] << 16);
        f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
}

// RoPE on load, for either kind of tile: rows of hd bf16 from global (row stride src_ld) rotated
// as rope_pack rotates them, row r at the table row cs + r hd. Each step takes two adjacent pairs
// of a row, dims (i, i + 1) and (i + hd/2, i + hd/2 + 1), as bf16x2 words (hd % 8 == 0, so both
// halves start word-aligned), and hands the rotated values, rounded to bf16, to put(r, i, lo, hi);
// rows r >= rows give zeros. Few registers live at once: it runs inside the key-tile loops.
template <typename Put>
__device__ __forceinline__ void rope_tile(const bf16* src, size_t src_ld, int rows, int hd, const float* cs, Put put) {
    const int h2 = hd / 2, steps = h2 / 2;
#pragma unroll 1
    for (int idx = threadIdx.x; idx < TILE * steps; idx += THREADS) {
        const int r = idx / steps, i = 2 * (idx - r * steps);
        float2 lo = make_float2(0.0f, 0.0f), hi = lo;
        if (r < rows) {
            const bf16* row = src + (size_t)r * src_ld;
            const float* c = cs + (size_t)r * hd;
            const float2 x = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(row + i));
            const float2 y = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(row + i + h2));
            const float2 co = *reinterpret_cast<const float2*>(c + i), si = *reinterpret_cast<const float2*>(c + h2 + i);
            lo = make_float2(round_bf16(rope_lo(x.x, y.x, co.x, si.x)), round_bf16(rope_lo(x.y, y.y, co.y, si.y)));
            hi = make_float2(round_bf16(rope_hi(x.x, y.x, co.x, si.x)), round_bf16(rope_hi(x.y, y.y, co.y, si.y)));
        }
        put(r, i, lo, hi);
    }
}

// Copies `rows` (<= TILE) rows of hd bf16 from global (row stride src_ld elements) into a bf16
// shared tile with row stride hd + PAD; rows rows..TILE-1 become zeros, so every value read later
// is finite. All pointers and strides are multiples of 8 elements (16 bytes). With cs (the table
// row of the tile's first position), rotated on the way (rope_tile).
__device__ __forceinline__ void load_tile_bf16(bf16* dst, const bf16* src, size_t src_ld, int rows, int hd, const float* cs) {
    const int ld = hd + PAD;
    if (cs) {
        rope_tile(src, src_ld, rows, hd, cs, [&](int r, int i, float2 lo, float2 hi) {
            *reinterpret_cast<__nv_bfloat162*>(dst + r * ld + i) = __floats2bfloat162_rn(lo.x, lo.y);
            *reinterpret_cast<__nv_bfloat162*>(dst + r * ld + i + hd / 2) = __floats2bfloat162_rn(hi.x, hi.y);
        });
        return;
    }
    const int hd8 = hd / 8;
    for (int idx = threadIdx.x; idx < TILE * hd8; idx += THREADS) {
        const int r = idx / hd8, c = idx - r * hd8;
        uint4 v = make_uint4(0u, 0u, 0u, 0u);
        if (r < rows) v = *reinterpret_cast<const uint4*>(src + (size_t)r * src_ld + c * 8);
        *reinterpret_cast<uint4*>(dst + r * ld + c * 8) = v;
    }
}

// The same into an f32 tile with row stride hd.
__device__ __forceinline__ void load_tile_f32(float* dst, const bf16* src, size_t src_ld, int rows, int hd, const float* cs) {
    if (cs) {
        rope_tile(src, src_ld, rows, hd, cs, [&](int r, int i, float2 lo, float2 hi) {
            *reinterpret_cast<float2*>(dst + r * hd + i) = lo;
            *reinterpret_cast<float2*>(dst + r * hd + i + hd / 2) = hi;
        });
        return;
    }
    const int hd8 = hd / 8;
    for (int idx = threadIdx.x; idx < TILE * hd8; idx += THREADS) {
        const int r = idx / hd8, c = idx - r * hd8;
        uint4 v = make_uint4(0u, 0u, 0u, 0u);
        if (r < rows) v = *reinterpret_cast<const uint4*>(src + (size_t)r * src_ld + c * 8);
        float f[8];
        unpack8(v, f);
        float4* d = reinterpret_cast<float4*>(dst + r * hd + c * 8);
        d[0] = make_float4(f[0], f[1], f[2], f[3]);
        d[1] = make_float4(f[4], f[5], f[6], f[7]);
    }
}

// s[r] = sum_d a[r][d] * b[d] for the ROWS rows of an f32 tile starting at a (row stride hd),
// against one bf16 row b, accumulated with fmaf in the order d = 0, 1, ..., hd - 1. fmaf(x, y, s)
// == fmaf(y, x, s), so a score comes out the same whichever side is the f32 tile.
template <int HD>
__device__ __forceinline__ void dot_rows(float s[ROWS], const float* a, const bf16* b, int hd_rt) {
    const int hd = HD ? HD : hd_rt;
    KILN_FLOPS(2 * ROWS * hd);
#pragma unroll
    for (int r = 0; r < ROWS; ++r) s[r] = 0.0f;
#pragma unroll
    for (int c = 0; c < hd / 8; ++c) {
        float y[8];
        unpack8(*reinterpret_cast<const uint4*>(b + c * 8), y);
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            const float4 x0 = *reinterpret_cast<const float4*>(a + r * hd + c * 8);
            const float4 x1 = *reinterpret_cast<const float4*>(a + r * hd + c * 8 + 4);
            float t = s[r];
            t = fmaf(x0.x, y[0], t);
            t = fmaf(x0.y, y[1], t);
            t = fmaf(x0.z, y[2], t);
            t = fmaf(x0.w, y[3], t);
            t = fmaf(x1.x, y[4], t);
            t = fmaf(x1.y, y[5], t);
            t = fmaf(x1.z, y[6], t);
            t = fmaf(x1.w, y[7], t);
            s[r] = t;
        }
    }
}

// acc[r][2k + e] += sum_j p[r][j] * x[j][2 * (lane + 32 k) + e] over the TILE rows j of a bf16
// tile x (row stride hd + PAD) and the warp's probability block p [ROWS][TILE]: the lane's
// head-dim pairs of (P X) for the warp's rows.
template <int HD>
__device__ __forceinline__ void accumulate_rows(float acc[ROWS][2 * NP], const float* p, const bf16* x, int lane,
                                                int hd_rt) {
    const int hd = HD ? HD : hd_rt;
    const int ld = hd + PAD;
    constexpr int np = HD ? (HD / 2 + 31) / 32 : NP;
    KILN_FLOPS(2 * TILE * ROWS * 2 * np);
    for (int j = 0; j < TILE; j += 4) {
        float xv[4][2 * np];
#pragma unroll
        for (int jj = 0; jj < 4; ++jj) {
#pragma unroll
            for (int k = 0; k < np; ++k) {
                const int pair = lane + 32 * k;
                float2 f = make_float2(0.0f, 0.0f);
                if (pair < hd / 2) f = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(x + (j + jj) * ld + 2 * pair));
                xv[jj][2 * k] = f.x;
                xv[jj][2 * k + 1] = f.y;
            }
        }
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            const float4 p4 = *reinterpret_cast<const float4*>(p + r * TILE + j);
#pragma unroll
            for (int e = 0; e < 2 * np; ++e) {
                float t = acc[r][e];
                t = fmaf(p4.x, xv[0][e], t);
                t = fmaf(p4.y, xv[1][e], t);
                t = fmaf(p4.z, xv[2][e], t);
                t = fmaf(p4.w, xv[3][e], t);
                acc[r][e] = t;
            }
        }
    }
}

// Stores the lane's pairs of one row (already scaled) as bf16.
template <int HD>
__device__ __forceinline__ void store_row(bf16* dst, const float v[2 * NP], float mul, int lane, int hd_rt) {
    const int hd = HD ? HD : hd_rt;
    constexpr int np = HD ? (HD / 2 + 31) / 32 : NP;
#pragma unroll
    for (int k = 0; k < np; ++k) {
        const int pair = lane + 32 * k;
        if (pair < hd / 2)
            *reinterpret_cast<__nv_bfloat162*>(dst + 2 * pair) =
                __floats2bfloat162_rn(v[2 * k] * mul, v[2 * k + 1] * mul);
    }
}

// store_row of a dq or dk row with the rotation undone when cs_row (the row position's table row)
// is given: the lane's values, rounded to bf16 as attention stores dqkv, go through the warp's
// scratch (hd floats of shared memory) so that each lane reads the partners of its dims, then turn
// back by the negative angle as rope_unpack does.
template <int HD>
__device__ __forceinline__ void store_row_unrope(bf16* dst, const float v[2 * NP], int lane, int hd_rt, const float* cs_row, float* scratch) {
    if (!cs_row) {
        store_row<HD>(dst, v, 1.0f, lane, hd_rt);
        return;
    }
    const int hd = HD ? HD : hd_rt, h2 = hd / 2;
    constexpr int np = HD ? (HD / 2 + 31) / 32 : NP;
    __syncwarp();  // every lane is done with what the scratch held before
#pragma unroll
    for (int k = 0; k < np; ++k) {
        const int pair = lane + 32 * k;
        if (pair < hd / 2) {
            scratch[2 * pair] = round_bf16(v[2 * k]);
            scratch[2 * pair + 1] = round_bf16(v[2 * k + 1]);
        }
    }
    __syncwarp();
#pragma unroll
    for (int k = 0; k < np; ++k) {
        const int pair = lane + 32 * k;
        if (pair >= hd / 2) continue;
        float y[2];
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            const int d = 2 * pair + e;
            y[e] = d < h2 ? rope_lo(scratch[d], scratch[d + h2], cs_row[d], -cs_row[h2 + d])
                          : rope_hi(scratch[d - h2], scratch[d], cs_row[d - h2], -cs_row[d]);
        }
        *reinterpret_cast<__nv_bfloat162*>(dst + 2 * pair) = __floats2bfloat162_rn(y[0], y[1]);
    }
    __syncwarp();  // every lane has read the scratch before the next row overwrites it
}

template <int HD>
__device__ __forceinline__ void forward_body(bf16* out, float* lse, const bf16* q, const bf16* k, const bf16* v, const float* cs, int T, int C,
                                             int NH, int NKV, int ldq, int ldkv, int hd_rt) {
    const int hd = HD ? HD : hd_rt;
    // Query tiles in reverse: the longest rows (most key tiles) start first, the short ones fill in.
    const int b = blockIdx.z, h = blockIdx.y, q0 = (gridDim.x - 1 - blockIdx.x) * TILE;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = h / (NH / NKV);
    const bf16* base = q + (size_t)b * T * ldq + (size_t)h * hd;
    const bf16* kbase = k + (size_t)b * T * ldkv + (size_t)g * hd;
    const bf16* vbase = v + (size_t)b * T * ldkv + (size_t)g * hd;
    const float scale = 1.0f / sqrtf((float)hd);

    extern __shared__ __align__(16) unsigned char smem[];
    float* qs = reinterpret_cast<float*>(smem);                                      // [TILE][hd]
    bf16* ks = reinterpret_cast<bf16*>(smem + attention_f32_tile_bytes(hd));         // [TILE][hd + PAD]
    bf16* vs = ks + TILE * (hd + PAD);                                               // [TILE][hd + PAD]
    float* pw = reinterpret_cast<float*>(vs + TILE * (hd + PAD)) + warp * ROWS * TILE;  // this warp's [ROWS][TILE]

    load_tile_f32(qs, base + (size_t)q0 * ldq, ldq, min(TILE, T - q0), hd, cs ? cs + (size_t)q0 * hd : nullptr);

    float m[ROWS], l[ROWS], acc[ROWS][2 * NP];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        m[r] = -INFINITY;
        l[r] = 0.0f;
#pragma unroll
        for (int e = 0; e < 2 * NP; ++e) acc[r][e] = 0.0f;
    }
    // Key tiles up to the block's last real row. Tile 0 holds key 0, which every row sees, so each
    // row's max is finite from the first tile on and a later fully masked tile rescales by 1.
    const int n_kt = (min(q0 + TILE, T) - 1) / TILE + 1;
    for (int kt = 0; kt < n_kt; ++kt) {
        const int k0 = kt * TILE;
        __syncthreads();  // every warp is done with the previous K, V tiles
        load_tile_bf16(ks, kbase + (size_t)k0 * ldkv, ldkv, min(TILE, T - k0), hd, cs ? cs + (size_t)k0 * hd : nullptr);
        load_tile_bf16(vs, vbase + (size_t)k0 * ldkv, ldkv, min(TILE, T - k0), hd, nullptr);
        __syncthreads();

        float s[ROWS];
        dot_rows<HD>(s, qs + warp * ROWS * hd, ks + lane * (hd + PAD), hd);
        const int j = k0 + lane;
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            const int i = q0 + warp * ROWS + r;
            const float sr = j <= i ? s[r] * scale : -INFINITY;
            const float m_new = attention_online_max(m[r], warp_max(sr));
            const float corr = attention_rescale(m[r], m_new);
            const float p = attention_prob(sr, m_new);
            m[r] = m_new;
            l[r] = l[r] * corr + p;
#pragma unroll
            for (int e = 0; e < 2 * NP; ++e) acc[r][e] *= corr;
            pw[r * TILE + lane] = p;
        }
        __syncwarp();  // the warp's p are visible to all its lanes
        accumulate_rows<HD>(acc, pw, vs, lane, hd);
        // The next writes to pw come after the __syncthreads at the top of the loop.
    }

#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        const int i = q0 + warp * ROWS + r;
        const float lsum = warp_sum(l[r]);
        if (i < T) {
            if (lane == 0) lse[((size_t)b * NH + h) * T + i] = attention_lse(m[r], lsum);
            store_row<HD>(out + ((size_t)b * T + i) * C + (size_t)h * hd, acc[r], 1.0f / lsum, lane, hd);
        }
    }
}

template <int HD>
__device__ __forceinline__ void dkdv_body(bf16* dk_out, bf16* dv_out, const bf16* dout, const bf16* q, const bf16* k, const bf16* v,
                                          const float* cs, const float* lse, const float* dsum, int T, int C, int NH, int NKV,
                                          int ldq, int ldkv, int hd_rt) {
    const int hd = HD ? HD : hd_rt;
    // blockIdx.y is a KV head: its dK, dV sum over the group of query heads it serves.
    const int b = blockIdx.z, g = blockIdx.y, k0 = blockIdx.x * TILE, group = NH / NKV;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const bf16* kbase = k + (size_t)b * T * ldkv + (size_t)g * hd;
    const bf16* vbase = v + (size_t)b * T * ldkv + (size_t)g * hd;
    const float scale = 1.0f / sqrtf((float)hd);

    extern __shared__ __align__(16) unsigned char smem[];
    float* ks = reinterpret_cast<float*>(smem);                      // [TILE][hd]
    float* vs = ks + TILE * hd;                                      // [TILE][hd]
    bf16* qs = reinterpret_cast<bf16*>(vs + TILE * hd);              // [TILE][hd + PAD]
    bf16* dos = qs + TILE * (hd + PAD);                              // [TILE][hd + PAD]
    float* pw = reinterpret_cast<float*>(dos + TILE * (hd + PAD)) + warp * ROWS * TILE;

    load_tile_f32(ks, kbase + (size_t)k0 * ldkv, ldkv, min(TILE, T - k0), hd, cs ? cs + (size_t)k0 * hd : nullptr);
    load_tile_f32(vs, vbase + (size_t)k0 * ldkv, ldkv, min(TILE, T - k0), hd, nullptr);

    float dk[ROWS][2 * NP], dv[ROWS][2 * NP];
#pragma unroll
    for (int r = 0; r < ROWS; ++r)
#pragma unroll
        for (int e = 0; e < 2 * NP; ++e) dk[r][e] = dv[r][e] = 0.0f;

    // The group's query heads in order, and for each the query tiles from the diagonal (the tile
    // holding key k0) to the end: one fixed summation order. One flat loop over (head, tile): a
    // nested loop held more registers than the single-head kernel and spilled on sm_80.
    const int n_qt = (T + TILE - 1) / TILE;
    const int per_head = n_qt - blockIdx.x;
    for (int it = 0; it < group * per_head; ++it) {
        const int h = g * group + it / per_head;
        const int q0 = (blockIdx.x + it % per_head) * TILE;
        __syncthreads();  // every warp is done with the previous Q, dO tiles (and K, V are loaded)
        load_tile_bf16(qs, q + ((size_t)b * T + q0) * ldq + (size_t)h * hd, ldq, min(TILE, T - q0), hd,
                       cs ? cs + (size_t)q0 * hd : nullptr);
        load_tile_bf16(dos, dout + ((size_t)b * T + q0) * C + (size_t)h * hd, C, min(TILE, T - q0), hd, nullptr);
        __syncthreads();

        const int i = q0 + lane;
        const size_t bh = (size_t)b * NH + h;
        const float lse_i = i < T ? lse[bh * T + i] : 0.0f;
        const float d_i = i < T ? dsum[bh * T + i] : 0.0f;
        float s[ROWS], dp[ROWS], ds[ROWS];
        dot_rows<HD>(s, ks + warp * ROWS * hd, qs + lane * (hd + PAD), hd);
        dot_rows<HD>(dp, vs + warp * ROWS * hd, dos + lane * (hd + PAD), hd);
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            const int j = k0 + warp * ROWS + r;
            const float p = (i < T && j <= i) ? attention_prob(s[r] * scale, lse_i) : 0.0f;
            ds[r] = attention_dscore(p, dp[r], d_i) * scale;
            pw[r * TILE + lane] = p;
        }
        __syncwarp();
        accumulate_rows<HD>(dv, pw, dos, lane, hd);  // dV_j += sum_i p_ij dO_i
        __syncwarp();  // all lanes have read p before it is overwritten
#pragma unroll
        for (int r = 0; r < ROWS; ++r) pw[r * TILE + lane] = ds[r];
        __syncwarp();
        accumulate_rows<HD>(dk, pw, qs, lane, hd);  // dK_j += sum_i dS_ij Q_i
    }

#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        const int j = k0 + warp * ROWS + r;
        if (j < T) {
            const size_t off = ((size_t)b * T + j) * ldkv + (size_t)g * hd;
            store_row_unrope<HD>(dk_out + off, dk[r], lane, hd, cs ? cs + (size_t)j * hd : nullptr, pw);
            store_row<HD>(dv_out + off, dv[r], 1.0f, lane, hd);
        }
    }
}

template <int HD>
__device__ __forceinline__ void dq_body(bf16* dq_out, const bf16* dout, const bf16* q, const bf16* k, const bf16* v, const float* cs,
                                        const float* lse, const float* dsum, int T, int C, int NH, int NKV, int ldq, int ldkv,
                                        int hd_rt) {
    const int hd = HD ? HD : hd_rt;
    // Query tiles in reverse: the longest rows (most key tiles) start first, the short ones fill in.
    const int b = blockIdx.z, h = blockIdx.y, q0 = (gridDim.x - 1 - blockIdx.x) * TILE;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = h / (NH / NKV);
    const bf16* base = q + (size_t)b * T * ldq + (size_t)h * hd;
    const bf16* kbase = k + (size_t)b * T * ldkv + (size_t)g * hd;
    const bf16* vbase = v + (size_t)b * T * ldkv + (size_t)g * hd;
    const bf16* dbase = dout + (size_t)b * T * C + (size_t)h * hd;
    const float* lse_bh = lse + ((size_t)b * NH + h) * T;
    const float* d_bh = dsum + ((size_t)b * NH + h) * T;
    const float scale = 1.0f / sqrtf((float)hd);

    extern __shared__ __align__(16) unsigned char smem[];
    float* qs = reinterpret_cast<float*>(smem);                      // [TILE][hd]
    float* dos = qs + TILE * hd;                                     // [TILE][hd]
    bf16* ks = reinterpret_cast<bf16*>(dos + TILE * hd);             // [TILE][hd + PAD]
    bf16* vs = ks + TILE * (hd + PAD);                               // [TILE][hd + PAD]
    float* pw = reinterpret_cast<float*>(vs + TILE * (hd + PAD)) + warp * ROWS * TILE;

    load_tile_f32(qs, base + (size_t)q0 * ldq, ldq, min(TILE, T - q0), hd, cs ? cs + (size_t)q0 * hd : nullptr);
    load_tile_f32(dos, dbase + (size_t)q0 * C, C, min(TILE, T - q0), hd, nullptr);

    float lse_r[ROWS], d_r[ROWS], dq[ROWS][2 * NP];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        const int i = q0 + warp * ROWS + r;
        lse_r[r] = i < T ? lse_bh[i] : 0.0f;
        d_r[r] = i < T ? d_bh[i] : 0.0f;
#pragma unroll
        for (int e = 0; e < 2 * NP; ++e) dq[r][e] = 0.0f;
    }

    const int n_kt = (min(q0 + TILE, T) - 1) / TILE + 1;
    for (int kt = 0; kt < n_kt; ++kt) {
        const int k0 = kt * TILE;
        __syncthreads();  // every warp is done with the previous K, V tiles (and Q, dO are loaded)
        load_tile_bf16(ks, kbase + (size_t)k0 * ldkv, ldkv, min(TILE, T - k0), hd, cs ? cs + (size_t)k0 * hd : nullptr);
        load_tile_bf16(vs, vbase + (size_t)k0 * ldkv, ldkv, min(TILE, T - k0), hd, nullptr);
        __syncthreads();

        float s[ROWS], dp[ROWS];
        dot_rows<HD>(s, qs + warp * ROWS * hd, ks + lane * (hd + PAD), hd);
        dot_rows<HD>(dp, dos + warp * ROWS * hd, vs + lane * (hd + PAD), hd);
        const int j = k0 + lane;
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            const int i = q0 + warp * ROWS + r;
            const float p = (i < T && j <= i) ? attention_prob(s[r] * scale, lse_r[r]) : 0.0f;
            pw[r * TILE + lane] = attention_dscore(p, dp[r], d_r[r]) * scale;
        }
        __syncwarp();
        accumulate_rows<HD>(dq, pw, ks, lane, hd);  // dQ_i += sum_j dS_ij K_j
    }

#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        const int i = q0 + warp * ROWS + r;
        if (i < T)
            store_row_unrope<HD>(dq_out + ((size_t)b * T + i) * ldq + (size_t)h * hd, dq[r], lane, hd,
                                 cs ? cs + (size_t)i * hd : nullptr, pw);
    }
}


// ---- The tensor-core forward (head dim 64, sm_80+) ----
//
// Fragment layouts of mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 (PTX ISA, "Matrix
// Fragments for mma.m16n8k16 with floating point type"), with g = lane / 4, t = lane % 4; each
// 32-bit register holds two bf16, the lower column (A) or row (B) in the low half:
//   A (16 x 16, row): a[0] = A[g][2t, 2t+1], a[1] = A[g+8][2t, 2t+1], a[2] = A[g][2t+8, 2t+9],
//                     a[3] = A[g+8][2t+8, 2t+9];
//   B (16 x 8, col):  b[0] = B[2t, 2t+1][g], b[1] = B[2t+8, 2t+9][g];
//   C, D (16 x 8 f32): c[0], c[1] = C[g][2t, 2t+1], c[2], c[3] = C[g+8][2t, 2t+1].
// So the score accumulators of two neighbouring 8-key column blocks are, rounded to bf16 and
// packed in pairs, exactly the A fragment of the 16 keys they cover: P never leaves registers.
//
// The inline PTX sits in four helpers; under KILN_CUDA_EMU (the emulated device, kernels/emu/)
// they call the emulator's implementations of the same instructions (kiln_emu_*, defined in
// kernels/emu/emu.h, which is included before this file) instead.
constexpr int MMA_ROWS = KILN_ATTN_MMA_ROWS;     // query rows per block, 16 per warp
constexpr int MMA_KEYS = KILN_ATTN_MMA_ROWS;     // keys per K/V tile (equal: the diagonal is one tile)
static_assert(MMA_ROWS == 16 * WARPS, "each warp owns one m16 block of query rows");
// The bf16 row stride of the shared tiles at head dim HD: 36 words at 64, 68 at 128.
template <int HD>
__host__ __device__ constexpr int mma_ld() {
    return HD + PAD;
}
static_assert(mma_ld<64>() % 8 == 0 && mma_ld<128>() % 8 == 0, "rows stay 16-byte aligned for cp.async");
static_assert((mma_ld<64>() / 2) % 32 == 4 && (mma_ld<128>() / 2) % 32 == 4,
              "rows g = 0..7 of a fragment load start 4 banks apart");

// d += A B for one m16n8k16 block (fragments as above), f32 accumulation.
__device__ __forceinline__ void mma_bf16_16816(float d[4], const uint32_t a[4], const uint32_t b[2]) {
#ifdef KILN_CUDA_EMU
    kiln_emu_mma_m16n8k16_bf16(d, a, b);
#else
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

// Starts copying 16 bytes global -> shared; with valid false, writes 16 zero bytes and reads none.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
#ifdef KILN_CUDA_EMU
    kiln_emu_cp_async_16(dst, src, valid);
#else
    const uint32_t d = (uint32_t)__cvta_generic_to_shared(dst);
    const int n = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(n) : "memory");
#endif
}

// Closes the group of this thread's copies started since the last commit.
__device__ __forceinline__ void cp_async_commit() {
#ifdef KILN_CUDA_EMU
    kiln_emu_cp_async_commit();
#else
    asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Waits until at most N of this thread's committed groups are still in flight (then a
// __syncthreads makes every thread's finished copies visible to the block).
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#ifdef KILN_CUDA_EMU
    kiln_emu_cp_async_wait(N);
#else
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// Two floats as a bf16 pair in one register, lo in the low half.
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    uint32_t u;
    memcpy(&u, &v, 4);
    return u;
}

// Two bf16 from shared memory as one register, lo in the low half.
__device__ __forceinline__ uint32_t pack_bf16_raw(const bf16& lo, const bf16& hi) {
    uint16_t a, b;
    memcpy(&a, &lo, 2);
    memcpy(&b, &hi, 2);
    return (uint32_t)a | ((uint32_t)b << 16);
}

// The A fragment of 16 columns of an accumulator tile (its 8-column blocks s0, s1), rounded to
// bf16: per the layouts above, a score tile's accumulators are the next product's A side.
__device__ __forceinline__ void acc_to_a(uint32_t a[4], const float s0[4], const float s1[4]) {
    a[0] = pack_bf16(s0[0], s0[1]);
    a[1] = pack_bf16(s0[2], s0[3]);
    a[2] = pack_bf16(s1[0], s1[1]);
    a[3] = pack_bf16(s1[2], s1[3]);
}

// acc[n] += A X[16 rows][8n .. 8n + 7] for every block n of head dims: X's B fragments are read down
// its rows, x pointing at X[2t][g] of the 16 rows (row stride mma_ld<HD>()), so block n takes
// X[2t (+1, +8, +9)][8n + g]. The forward's P V, dQ's dS K, dK/dV's P^T dO and dS^T Q.
template <int HD>
__device__ __forceinline__ void mma_down_rows(float acc[HD / 8][4], const uint32_t a[4], const bf16* x) {
    constexpr int LD = mma_ld<HD>();
#pragma unroll
    for (int n = 0; n < HD / 8; ++n) {
        const uint32_t bx[2] = {pack_bf16_raw(x[n * 8], x[LD + n * 8]), pack_bf16_raw(x[8 * LD + n * 8], x[9 * LD + n * 8])};
        mma_bf16_16816(acc[n], a, bx);
    }
}

// Starts copying `rows` (<= MMA_ROWS) rows of HD bf16 (global row stride src_ld) into a shared
// tile of row stride mma_ld<HD>(); the rest of the tile's rows become zeros.
template <int HD>
__device__ __forceinline__ void mma_load_tile(bf16* dst, const bf16* src, size_t src_ld, int rows) {
    constexpr int CHUNKS = HD / 8, LD = mma_ld<HD>();  // 16-byte chunks per row; row stride
#pragma unroll
    for (int k = 0; k < MMA_ROWS * CHUNKS / THREADS; ++k) {
        const int idx = threadIdx.x + k * THREADS, r = idx / CHUNKS, c = idx % CHUNKS;
        const bool valid = r < rows;
        cp_async_16(dst + r * LD + c * 8, src + (valid ? (size_t)r * src_ld : 0) + c * 8, valid);
    }
}

// The K/V pipeline of the query-tile kernels: starts copying key tile kt + 1 (if any) into the other
// of the two buffers ks and vs hold (free: the __syncthreads closing the previous iteration came
// after every warp's last read of it), then waits for this thread's copies of tile kt; the
// caller's __syncthreads makes every thread's visible.
template <int HD>
__device__ __forceinline__ void mma_next_kv(bf16* ks, bf16* vs, int kt, int n_kt, const bf16* kbase, const bf16* vbase,
                                            int ldkv, int T) {
    constexpr int LD = mma_ld<HD>();
    if (kt + 1 < n_kt) {
        const int k1 = (kt + 1) * MMA_KEYS, other = ((kt + 1) & 1) * MMA_KEYS * LD;
        mma_load_tile<HD>(ks + other, kbase + (size_t)k1 * ldkv, ldkv, min(MMA_KEYS, T - k1));
        mma_load_tile<HD>(vs + other, vbase + (size_t)k1 * ldkv, ldkv, min(MMA_KEYS, T - k1));
        cp_async_commit();
        cp_async_wait<1>();
    } else {
        cp_async_wait<0>();
    }
}

// Rotates `rows` rows of a shared tile (row stride mma_ld<HD>()) in place, row r at the table row
// cs + r HD: rope_pack's arithmetic on the same bf16 values, so the tile then holds what a plain
// load of rope_pack's output would. Each thread owns its pairs (i, i + HD/2): no thread reads what
// another writes.
template <int HD>
__device__ __forceinline__ void mma_rope_tile(bf16* tile, int rows, const float* cs) {
    constexpr int H2 = HD / 2, LD = mma_ld<HD>();
    for (int idx = threadIdx.x; idx < rows * H2; idx += THREADS) {
        const int r = idx / H2, i = idx % H2;
        bf16* x = tile + r * LD;
        const float* c = cs + (size_t)r * HD;
        const float a = __bfloat162float(x[i]), b = __bfloat162float(x[i + H2]);
        x[i] = __float2bfloat16_rn(rope_lo(a, b, c[i], c[H2 + i]));
        x[i + H2] = __float2bfloat16_rn(rope_hi(a, b, c[i], c[H2 + i]));
    }
}

template <int HD>
__device__ __forceinline__ void forward_mma_body(bf16* out, float* lse, const bf16* q, const bf16* k, const bf16* v, const float* cs,
                                                 int T, int C, int NH, int NKV, int ldq, int ldkv) {
    // Query tiles in reverse: the longest rows (most key tiles) start first, the short ones fill in.
    const int b = blockIdx.z, h = blockIdx.y, q0 = (gridDim.x - 1 - blockIdx.x) * MMA_ROWS;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int kv_head = h / (NH / NKV);
    const bf16* base = q + (size_t)b * T * ldq + (size_t)h * HD;
    const bf16* kbase = k + (size_t)b * T * ldkv + (size_t)kv_head * HD;
    const bf16* vbase = v + (size_t)b * T * ldkv + (size_t)kv_head * HD;
    const float scale = 1.0f / sqrtf((float)HD);
    constexpr int LD = mma_ld<HD>();

    extern __shared__ __align__(16) unsigned char smem[];
    bf16* qs = reinterpret_cast<bf16*>(smem);  // [MMA_ROWS][LD]
    bf16* ks = qs + MMA_ROWS * LD;         // [2][MMA_KEYS][LD], double-buffered
    bf16* vs = ks + 2 * MMA_KEYS * LD;     // [2][MMA_KEYS][LD]

    // Key tiles 0 .. the diagonal one (q0 / 64: query and key tiles are the same 64 rows). Only the
    // diagonal tile can hold keys after a row, or keys >= T (zeros, then masked for real rows).
    const int n_kt = q0 / MMA_KEYS + 1;
    mma_load_tile<HD>(qs, base + (size_t)q0 * ldq, ldq, min(MMA_ROWS, T - q0));
    mma_load_tile<HD>(ks, kbase, ldkv, min(MMA_KEYS, T));
    mma_load_tile<HD>(vs, vbase, ldkv, min(MMA_KEYS, T));
    cp_async_commit();

    // This thread's rows of the warp's 16: i0 (fragment row g) and i1 = i0 + 8.
    const int i0 = q0 + warp * 16 + g, i1 = i0 + 8;
    uint32_t qf[HD / 16][4];  // Q as A fragments, one per 16 head dims
    float o[HD / 8][4];       // O as accumulators, one per 8 head dims
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};  // l: this thread's 16 columns per tile
#pragma unroll
    for (int n = 0; n < HD / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;

    for (int kt = 0; kt < n_kt; ++kt) {
        const int buf = kt & 1, k0 = kt * MMA_KEYS;
        mma_next_kv<HD>(ks, vs, kt, n_kt, kbase, vbase, ldkv, T);
        __syncthreads();  // every thread's copies of tile kt (and Q) have landed
        if (cs) {  // RoPE on load: the landed K tile (and, first, the Q tile) turned in place
            if (kt == 0) mma_rope_tile<HD>(qs, min(MMA_ROWS, T - q0), cs + (size_t)q0 * HD);
            mma_rope_tile<HD>(ks + buf * MMA_KEYS * LD, min(MMA_KEYS, T - k0), cs + (size_t)k0 * HD);
            __syncthreads();
        }
        const bf16* kb = ks + buf * MMA_KEYS * LD;
        const bf16* vb = vs + buf * MMA_KEYS * LD;
        if (kt == 0) {
            const bf16* qr = qs + (warp * 16 + g) * LD + 2 * t;
#pragma unroll
            for (int kk = 0; kk < HD / 16; ++kk) {
                qf[kk][0] = *reinterpret_cast<const uint32_t*>(qr + kk * 16);
                qf[kk][1] = *reinterpret_cast<const uint32_t*>(qr + 8 * LD + kk * 16);
                qf[kk][2] = *reinterpret_cast<const uint32_t*>(qr + kk * 16 + 8);
                qf[kk][3] = *reinterpret_cast<const uint32_t*>(qr + 8 * LD + kk * 16 + 8);
            }
        }

        // S = Q K^T for the warp's 16 rows and the tile's 64 keys: B[d][j] = K[j][d], so the B
        // fragment of keys 8n .. 8n + 7 is two words of key row 8n + g.
        float s[MMA_KEYS / 8][4];
#pragma unroll
        for (int n = 0; n < MMA_KEYS / 8; ++n) {
            s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
            const bf16* k = kb + (n * 8 + g) * LD + 2 * t;
#pragma unroll
            for (int kk = 0; kk < HD / 16; ++kk) {
                const uint32_t bk[2] = {*reinterpret_cast<const uint32_t*>(k + kk * 16),
                                        *reinterpret_cast<const uint32_t*>(k + kk * 16 + 8)};
                mma_bf16_16816(s[n], qf[kk], bk);
            }
        }

        // Online softmax on the fragments: element e of block n is row (e < 2 ? i0 : i1), key
        // k0 + 8n + 2t + (e & 1). A row's 64 scores live in the 4 lanes of a quad (same g).
        const bool diag = kt == n_kt - 1;
        float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int n = 0; n < MMA_KEYS / 8; ++n) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int j = k0 + n * 8 + 2 * t + (e & 1);
                const float v = (!diag || j <= (e < 2 ? i0 : i1)) ? s[n][e] * scale : -INFINITY;
                s[n][e] = v;
                mx[e / 2] = fmaxf(mx[e / 2], v);
            }
        }
        float corr[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
            // Key k0 = 0 is seen by every row in tile 0, so m is finite from the first tile on.
            const float m_new = attention_online_max(m[r], mx[r]);
            corr[r] = attention_rescale(m[r], m_new);
            m[r] = m_new;
            l[r] *= corr[r];
        }
#pragma unroll
        for (int n = 0; n < MMA_KEYS / 8; ++n) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                s[n][e] = attention_prob(s[n][e], m[e / 2]);
                l[e / 2] += s[n][e];
            }
        }
#pragma unroll
        for (int n = 0; n < HD / 8; ++n) {
            o[n][0] *= corr[0];
            o[n][1] *= corr[0];
            o[n][2] *= corr[1];
            o[n][3] *= corr[1];
        }

        // O += P V: P's A fragment for keys 16kk .. 16kk + 15 is blocks 2kk and 2kk + 1 of s, in
        // bf16; V's B fragment for head dims 8n .. 8n + 7 is V[16kk + 2t (+1, +8, +9)][8n + g].
#pragma unroll
        for (int kk = 0; kk < MMA_KEYS / 16; ++kk) {
            uint32_t pa[4];
            acc_to_a(pa, s[2 * kk], s[2 * kk + 1]);
            mma_down_rows<HD>(o, pa, vb + (kk * 16 + 2 * t) * LD + g);
        }
        __syncthreads();  // every warp is done with buffer buf before the next iteration refills it
    }

    // A row's sum over the quad's four lanes; rows past T (zero queries of the last tile) are dropped.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int i = r ? i1 : i0;
        if (i >= T) continue;
        if (t == 0) lse[((size_t)b * NH + h) * T + i] = attention_lse(m[r], l[r]);
        const float mul = 1.0f / l[r];
        bf16* row = out + ((size_t)b * T + i) * C + (size_t)h * HD + 2 * t;
#pragma unroll
        for (int n = 0; n < HD / 8; ++n)
            *reinterpret_cast<__nv_bfloat162*>(row + n * 8) =
                __floats2bfloat162_rn(o[n][2 * r] * mul, o[n][2 * r + 1] * mul);
    }
}


// Stores row r (0: fragment row g, 1: g + 8) of a 16 x HD accumulator block acc as bf16 at row
// (already offset by the thread's column 2t): dims 8n + 2t, + 1 of block n. With cs (the row
// position's table row) the values are rounded to bf16 (as the CUDA-core kernels store them) and
// turned back by the negative angle, as rope_unpack does: dim d < HD/2 pairs with d + HD/2, which
// is block n + HD/16 of the same thread, so no value crosses threads.
template <int HD>
__device__ __forceinline__ void store_mma_row(bf16* row, const float acc[HD / 8][4], int r, const float* cs) {
    constexpr int H2 = HD / 2, NB = HD / 16;
    const int t = threadIdx.x % 4;
#pragma unroll
    for (int n = 0; n < HD / 8; ++n) {
        float y[2];
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            const int d = n * 8 + 2 * t + e;
            const float x = acc[n][2 * r + e];
            if (!cs) y[e] = x;
            else if (n < NB) y[e] = rope_lo(round_bf16(x), round_bf16(acc[n + NB][2 * r + e]), cs[d], -cs[H2 + d]);
            else y[e] = rope_hi(round_bf16(acc[n - NB][2 * r + e]), round_bf16(x), cs[d - H2], -cs[d]);
        }
        *reinterpret_cast<__nv_bfloat162*>(row + n * 8) = __floats2bfloat162_rn(y[0], y[1]);
    }
}

// dQ on tensor cores: one block of 4 warps per 64 query rows, as the forward, looping over the key
// tiles up to the diagonal with K and V double-buffered by cp.async. Per tile, for the warp's 16
// rows: S = Q K^T and dP = dO V^T (both with the key rows as B fragments, as the forward's S), P =
// exp(S scale - lse) from the forward's lse (no online softmax), dS = P (dP - D) scale in f32,
// then dQ += dS K, with dS rounded to bf16 into A fragments straight from the accumulators (as the
// forward's P) and K's B fragment read down its rows (as the forward's V). dQ stays in f32
// accumulators to the end; each element is summed by one thread in a fixed order (deterministic).
template <int HD>
__device__ __forceinline__ void dq_mma_body(bf16* dq_out, const bf16* dout, const bf16* q, const bf16* k, const bf16* v,
                                            const float* cs, const float* lse, const float* dsum, int T, int C, int NH,
                                            int NKV, int ldq, int ldkv) {
    const int b = blockIdx.z, h = blockIdx.y, q0 = (gridDim.x - 1 - blockIdx.x) * MMA_ROWS;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int kv_head = h / (NH / NKV);
    const bf16* base = q + (size_t)b * T * ldq + (size_t)h * HD;
    const bf16* kbase = k + (size_t)b * T * ldkv + (size_t)kv_head * HD;
    const bf16* vbase = v + (size_t)b * T * ldkv + (size_t)kv_head * HD;
    const bf16* dbase = dout + (size_t)b * T * C + (size_t)h * HD;
    const float scale = 1.0f / sqrtf((float)HD);
    constexpr int LD = mma_ld<HD>();

    extern __shared__ __align__(16) unsigned char smem[];
    bf16* qs = reinterpret_cast<bf16*>(smem);  // [MMA_ROWS][LD]
    bf16* dos = qs + MMA_ROWS * LD;            // [MMA_ROWS][LD]
    bf16* ks = dos + MMA_ROWS * LD;            // [2][MMA_KEYS][LD], double-buffered
    bf16* vs = ks + 2 * MMA_KEYS * LD;         // [2][MMA_KEYS][LD]

    const int n_kt = q0 / MMA_KEYS + 1;
    const int rows = min(MMA_ROWS, T - q0);
    mma_load_tile<HD>(qs, base + (size_t)q0 * ldq, ldq, rows);
    mma_load_tile<HD>(dos, dbase + (size_t)q0 * C, C, rows);
    mma_load_tile<HD>(ks, kbase, ldkv, min(MMA_KEYS, T));
    mma_load_tile<HD>(vs, vbase, ldkv, min(MMA_KEYS, T));
    cp_async_commit();

    const int i0 = q0 + warp * 16 + g, i1 = i0 + 8;
    const float* lse_bh = lse + ((size_t)b * NH + h) * T;
    const float* d_bh = dsum + ((size_t)b * NH + h) * T;
    const float lse_r[2] = {i0 < T ? lse_bh[i0] : 0.0f, i1 < T ? lse_bh[i1] : 0.0f};
    const float d_r[2] = {i0 < T ? d_bh[i0] : 0.0f, i1 < T ? d_bh[i1] : 0.0f};
    uint32_t qf[HD / 16][4], df[HD / 16][4];  // Q and dO as A fragments
    float dq[HD / 8][4];
#pragma unroll
    for (int n = 0; n < HD / 8; ++n) dq[n][0] = dq[n][1] = dq[n][2] = dq[n][3] = 0.0f;

    for (int kt = 0; kt < n_kt; ++kt) {
        const int buf = kt & 1, k0 = kt * MMA_KEYS;
        mma_next_kv<HD>(ks, vs, kt, n_kt, kbase, vbase, ldkv, T);
        __syncthreads();  // tile kt (and, first, Q and dO) has landed
        if (cs) {
            if (kt == 0) mma_rope_tile<HD>(qs, rows, cs + (size_t)q0 * HD);
            mma_rope_tile<HD>(ks + buf * MMA_KEYS * LD, min(MMA_KEYS, T - k0), cs + (size_t)k0 * HD);
            __syncthreads();
        }
        const bf16* kb = ks + buf * MMA_KEYS * LD;
        const bf16* vb = vs + buf * MMA_KEYS * LD;
        if (kt == 0) {
            const int r0 = (warp * 16 + g) * LD + 2 * t;
#pragma unroll
            for (int kk = 0; kk < HD / 16; ++kk) {
                const int at[4] = {r0 + kk * 16, r0 + 8 * LD + kk * 16, r0 + kk * 16 + 8, r0 + 8 * LD + kk * 16 + 8};
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    qf[kk][i] = *reinterpret_cast<const uint32_t*>(qs + at[i]);
                    df[kk][i] = *reinterpret_cast<const uint32_t*>(dos + at[i]);
                }
            }
        }

        // S = Q K^T and dP = dO V^T: key rows 8n + g as B fragments.
        float s[MMA_KEYS / 8][4], dp[MMA_KEYS / 8][4];
#pragma unroll
        for (int n = 0; n < MMA_KEYS / 8; ++n) {
            s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
            dp[n][0] = dp[n][1] = dp[n][2] = dp[n][3] = 0.0f;
            const bf16* kr = kb + (n * 8 + g) * LD + 2 * t;
            const bf16* vr = vb + (n * 8 + g) * LD + 2 * t;
#pragma unroll
            for (int kk = 0; kk < HD / 16; ++kk) {
                const uint32_t bk[2] = {*reinterpret_cast<const uint32_t*>(kr + kk * 16),
                                        *reinterpret_cast<const uint32_t*>(kr + kk * 16 + 8)};
                const uint32_t bv[2] = {*reinterpret_cast<const uint32_t*>(vr + kk * 16),
                                        *reinterpret_cast<const uint32_t*>(vr + kk * 16 + 8)};
                mma_bf16_16816(s[n], qf[kk], bk);
                mma_bf16_16816(dp[n], df[kk], bv);
            }
        }

        // dS = P (dP - D) scale, in place of S; zero past the causal edge and for rows past T.
#pragma unroll
        for (int n = 0; n < MMA_KEYS / 8; ++n) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int i = e < 2 ? i0 : i1, j = k0 + n * 8 + 2 * t + (e & 1);
                const float p = (i < T && j <= i) ? attention_prob(s[n][e] * scale, lse_r[e / 2]) : 0.0f;
                s[n][e] = attention_dscore(p, dp[n][e], d_r[e / 2]) * scale;
            }
        }

        // dQ += dS K: dS's A fragment for keys 16kk .. 16kk + 15 is blocks 2kk, 2kk + 1 in bf16;
        // K's B fragment for head dims 8n .. 8n + 7 is K[16kk + 2t (+1, +8, +9)][8n + g].
#pragma unroll
        for (int kk = 0; kk < MMA_KEYS / 16; ++kk) {
            uint32_t da[4];
            acc_to_a(da, s[2 * kk], s[2 * kk + 1]);
            mma_down_rows<HD>(dq, da, kb + (kk * 16 + 2 * t) * LD + g);
        }
        __syncthreads();  // every warp is done with buffer buf before the next iteration refills it
    }

    // Store rows i0, i1 (with RoPE undone in registers).
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int i = r ? i1 : i0;
        if (i < T)
            store_mma_row<HD>(dq_out + ((size_t)b * T + i) * ldq + (size_t)h * HD + 2 * t, dq, r,
                              cs ? cs + (size_t)i * HD : nullptr);
    }
}

// dK and dV on tensor cores: one block of 4 warps per (64-key tile, KV head, batch), each warp
// owning 16 keys, looping over the group's query heads and, for each, the query tiles from the
// diagonal to the end (dkdv_body's fixed order), with Q, dO and their rows' lse and D
// double-buffered. Per query tile, in two halves of 32 queries (to hold fewer registers), the
// transposed products with the keys as the A side: S^T = K Q^T and dP^T = V dO^T (query rows as B
// fragments, as the forward's keys), P^T = exp(S^T scale - lse) and dS^T = P^T (dP^T - D) scale in
// f32, then dV += P^T dO and dK += dS^T Q with P^T and dS^T rounded to bf16 into A fragments
// from the accumulators and dO, Q read down their rows as B fragments (as the forward's V).
// K and V fragments are read from their shared tiles at each use.
template <int HD>
__device__ __forceinline__ void dkdv_mma_body(bf16* dk_out, bf16* dv_out, const bf16* dout, const bf16* q, const bf16* k,
                                              const bf16* v, const float* cs, const float* lse, const float* dsum, int T,
                                              int C, int NH, int NKV, int ldq, int ldkv) {
    const int b = blockIdx.z, kvh = blockIdx.y, k0 = blockIdx.x * MMA_KEYS, group = NH / NKV;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const float scale = 1.0f / sqrtf((float)HD);
    constexpr int LD = mma_ld<HD>(), HALF = MMA_ROWS / 2;

    extern __shared__ __align__(16) unsigned char smem[];
    bf16* ks = reinterpret_cast<bf16*>(smem);  // [MMA_KEYS][LD]
    bf16* vs = ks + MMA_KEYS * LD;             // [MMA_KEYS][LD]
    bf16* qs = vs + MMA_KEYS * LD;             // [2][MMA_ROWS][LD], double-buffered
    bf16* dos = qs + 2 * MMA_ROWS * LD;        // [2][MMA_ROWS][LD]
    float* ls = reinterpret_cast<float*>(dos + 2 * MMA_ROWS * LD);  // [2][MMA_ROWS] lse
    float* ds_ = ls + 2 * MMA_ROWS;                                 // [2][MMA_ROWS] D

    const int keys = min(MMA_KEYS, T - k0);
    mma_load_tile<HD>(ks, k + ((size_t)b * T + k0) * ldkv + (size_t)kvh * HD, ldkv, keys);
    mma_load_tile<HD>(vs, v + ((size_t)b * T + k0) * ldkv + (size_t)kvh * HD, ldkv, keys);

    // Item it: query head kvh * group + it / per_head, query tile blockIdx.x + it % per_head.
    const int per_head = (T + MMA_ROWS - 1) / MMA_ROWS - blockIdx.x, items = group * per_head;
    auto load = [&](int it, int buf) {
        const int h = kvh * group + it / per_head, q0 = (blockIdx.x + it % per_head) * MMA_ROWS;
        const int rows = min(MMA_ROWS, T - q0);
        mma_load_tile<HD>(qs + buf * MMA_ROWS * LD, q + ((size_t)b * T + q0) * ldq + (size_t)h * HD, ldq, rows);
        mma_load_tile<HD>(dos + buf * MMA_ROWS * LD, dout + ((size_t)b * T + q0) * C + (size_t)h * HD, C, rows);
        const size_t bh = ((size_t)b * NH + h) * T;
        for (int r = threadIdx.x; r < MMA_ROWS; r += THREADS) {
            ls[buf * MMA_ROWS + r] = r < rows ? lse[bh + q0 + r] : 0.0f;
            ds_[buf * MMA_ROWS + r] = r < rows ? dsum[bh + q0 + r] : 0.0f;
        }
    };
    load(0, 0);
    cp_async_commit();

    const int j0 = k0 + warp * 16 + g, j1 = j0 + 8;  // this thread's keys (fragment rows g, g + 8)
    float dk[HD / 8][4], dv[HD / 8][4];
#pragma unroll
    for (int n = 0; n < HD / 8; ++n) dk[n][0] = dk[n][1] = dk[n][2] = dk[n][3] = dv[n][0] = dv[n][1] = dv[n][2] = dv[n][3] = 0.0f;

    for (int it = 0; it < items; ++it) {
        const int buf = it & 1, q0 = (blockIdx.x + it % per_head) * MMA_ROWS;
        if (it + 1 < items) {
            load(it + 1, buf ^ 1);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();  // item it's Q, dO, lse, D (and, first, K and V) have landed
        bf16* qb = qs + buf * MMA_ROWS * LD;
        const bf16* db = dos + buf * MMA_ROWS * LD;
        if (cs) {  // RoPE on load: the Q tile, and first the K tile, turned in place
            if (it == 0) mma_rope_tile<HD>(ks, keys, cs + (size_t)k0 * HD);
            mma_rope_tile<HD>(qb, min(MMA_ROWS, T - q0), cs + (size_t)q0 * HD);
            __syncthreads();
        }
        const float* lb = ls + buf * MMA_ROWS;
        const float* dsb = ds_ + buf * MMA_ROWS;
        const int kr = (warp * 16 + g) * LD + 2 * t;  // the warp's key rows as A fragments

#pragma unroll 1
        for (int half = 0; half < 2; ++half) {
            const int h0 = half * HALF;
            // S^T = K Q^T and dP^T = V dO^T for the warp's 16 keys and 32 queries.
            float st[HALF / 8][4], dpt[HALF / 8][4];
#pragma unroll
            for (int n = 0; n < HALF / 8; ++n) {
                st[n][0] = st[n][1] = st[n][2] = st[n][3] = 0.0f;
                dpt[n][0] = dpt[n][1] = dpt[n][2] = dpt[n][3] = 0.0f;
            }
#pragma unroll
            for (int kk = 0; kk < HD / 16; ++kk) {
                const int at[4] = {kr + kk * 16, kr + 8 * LD + kk * 16, kr + kk * 16 + 8, kr + 8 * LD + kk * 16 + 8};
                uint32_t ka[4], va[4];
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    ka[i] = *reinterpret_cast<const uint32_t*>(ks + at[i]);
                    va[i] = *reinterpret_cast<const uint32_t*>(vs + at[i]);
                }
#pragma unroll
                for (int n = 0; n < HALF / 8; ++n) {
                    const bf16* qr = qb + (h0 + n * 8 + g) * LD + 2 * t + kk * 16;
                    const bf16* dr = db + (h0 + n * 8 + g) * LD + 2 * t + kk * 16;
                    const uint32_t bq[2] = {*reinterpret_cast<const uint32_t*>(qr), *reinterpret_cast<const uint32_t*>(qr + 8)};
                    const uint32_t bd[2] = {*reinterpret_cast<const uint32_t*>(dr), *reinterpret_cast<const uint32_t*>(dr + 8)};
                    mma_bf16_16816(st[n], ka, bq);
                    mma_bf16_16816(dpt[n], va, bd);
                }
            }
            // P^T into st, dS^T into dpt: element e of block n is key (e < 2 ? j0 : j1), query
            // q0 + h0 + 8n + 2t + (e & 1); zero past the causal edge and for queries past T.
#pragma unroll
            for (int n = 0; n < HALF / 8; ++n) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int r = h0 + n * 8 + 2 * t + (e & 1), i = q0 + r, j = e < 2 ? j0 : j1;
                    const float lse_i = lb[r], d_i = dsb[r];  // read by every lane: no divergent loads
                    const float p = (i < T && j <= i) ? attention_prob(st[n][e] * scale, lse_i) : 0.0f;
                    st[n][e] = p;
                    dpt[n][e] = attention_dscore(p, dpt[n][e], d_i) * scale;
                }
            }
            // dV += P^T dO and dK += dS^T Q over these 32 queries: the A fragment of queries
            // 16kk .. 16kk + 15 is blocks 2kk, 2kk + 1; dO's and Q's B fragment for head dims
            // 8n .. 8n + 7 is X[h0 + 16kk + 2t (+1, +8, +9)][8n + g].
#pragma unroll
            for (int kk = 0; kk < HALF / 16; ++kk) {
                uint32_t pa[4], sa[4];
                acc_to_a(pa, st[2 * kk], st[2 * kk + 1]);
                acc_to_a(sa, dpt[2 * kk], dpt[2 * kk + 1]);
                const int at = (h0 + kk * 16 + 2 * t) * LD + g;
                mma_down_rows<HD>(dv, pa, db + at);
                mma_down_rows<HD>(dk, sa, qb + at);
            }
        }
        __syncthreads();  // every warp is done with buffer buf before the next item refills it
    }

    // Store keys j0, j1 (dK with RoPE undone in registers, as dq_mma_body does).
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int j = r ? j1 : j0;
        if (j >= T) continue;
        const size_t off = ((size_t)b * T + j) * ldkv + (size_t)kvh * HD + 2 * t;
        store_mma_row<HD>(dk_out + off, dk, r, cs ? cs + (size_t)j * HD : nullptr);
        store_mma_row<HD>(dv_out + off, dv, r, nullptr);
    }
}

}  // namespace

// The kernels' operands (q, k, v with their row strides ldq and ldkv, and the RoPE table cs or
// null) are described at the top of the file. B, T, C, NH, NKV: batch, sequence, C = NH hd the
// query (and output) width, NKV KV heads.

// out [B, T, C] bf16 and lse [B, NH, T] f32. Grid (ceil(T / 32), NH, B), 128 threads,
// attention_smem_bytes(FORWARD, C / NH) bytes of dynamic shared memory.
extern "C" __global__ void __launch_bounds__(128) attention_forward(__nv_bfloat16* out, float* lse, const __nv_bfloat16* q, const __nv_bfloat16* k, const __nv_bfloat16* v, const float* cs, int B, int T, int C, int NH, int NKV, int ldq, int ldkv) {
    const int hd = C / NH;
    if (hd == 64) forward_body<64>(out, lse, q, k, v, cs, T, C, NH, NKV, ldq, ldkv, hd);
    else forward_body<0>(out, lse, q, k, v, cs, T, C, NH, NKV, ldq, ldkv, hd);
}

// dsum [B, NH, T] f32 = sum over the head's dims of dout * out. One warp per (b, t, h), 4 warps
// per block: grid ceil(B * T * NH / 4), 128 threads.
extern "C" __global__ void __launch_bounds__(128) attention_backward_preprocess(float* dsum, const __nv_bfloat16* dout, const __nv_bfloat16* out, int B, int T, int C, int NH) {
    const long long w = ((long long)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    const int lane = threadIdx.x % 32;
    if (w >= (long long)B * T * NH) return;
    const int h = (int)(w % NH);
    const long long bt = w / NH;
    const int b = (int)(bt / T), t = (int)(bt % T);
    const int hd = C / NH;
    const size_t off = (size_t)bt * C + (size_t)h * hd;
    float acc = 0.0f;
    for (int pair = lane; pair < hd / 2; pair += 32) {
        const float2 g = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(dout + off + 2 * pair));
        const float2 o = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(out + off + 2 * pair));
        acc = fmaf(g.x, o.x, acc);
        acc = fmaf(g.y, o.y, acc);
    }
    acc = warp_sum(acc);
    if (lane == 0) dsum[((size_t)b * NH + h) * T + t] = acc;
}

// dk, dv [B, T, ldkv] bf16 (the KV heads' columns; dk rotated back with cs). Grid (ceil(T / 32),
// NKV, B) over key tiles of each KV head, 128 threads, attention_smem_bytes(DKDV, C / NH) bytes of
// dynamic shared memory.
extern "C" __global__ void __launch_bounds__(128) attention_backward_dkdv(__nv_bfloat16* dk, __nv_bfloat16* dv, const __nv_bfloat16* dout, const __nv_bfloat16* q, const __nv_bfloat16* k, const __nv_bfloat16* v, const float* cs, const float* lse, const float* dsum, int B, int T, int C, int NH, int NKV, int ldq, int ldkv) {
    const int hd = C / NH;
    if (hd == 64) dkdv_body<64>(dk, dv, dout, q, k, v, cs, lse, dsum, T, C, NH, NKV, ldq, ldkv, hd);
    else dkdv_body<0>(dk, dv, dout, q, k, v, cs, lse, dsum, T, C, NH, NKV, ldq, ldkv, hd);
}

// dq [B, T, ldq] bf16 (the query heads' columns; rotated back with cs). Grid (ceil(T / 32), NH,
// B) over query tiles, 128 threads, attention_smem_bytes(DQ, C / NH) bytes of dynamic shared memory.
extern "C" __global__ void __launch_bounds__(128) attention_backward_dq(__nv_bfloat16* dq, const __nv_bfloat16* dout, const __nv_bfloat16* q, const __nv_bfloat16* k, const __nv_bfloat16* v, const float* cs, const float* lse, const float* dsum, int B, int T, int C, int NH, int NKV, int ldq, int ldkv) {
    const int hd = C / NH;
    if (hd == 64) dq_body<64>(dq, dout, q, k, v, cs, lse, dsum, T, C, NH, NKV, ldq, ldkv, hd);
    else dq_body<0>(dq, dout, q, k, v, cs, lse, dsum, T, C, NH, NKV, ldq, ldkv, hd);
}

// The tensor-core forward for head dims 64 and 128 on sm_80+: out and lse exactly as
// attention_forward. Grid (ceil(T / 64), NH, B), 128 threads, attention_smem_bytes(FORWARD_MMA,
// hd) bytes of dynamic shared memory: 46080 at 64, 87040 at 128 (the wrapper raises the limit).
// The wrapper launches it only at those head dims.
extern "C" __global__ void __launch_bounds__(128) attention_forward_mma(__nv_bfloat16* out, float* lse, const __nv_bfloat16* q, const __nv_bfloat16* k, const __nv_bfloat16* v, const float* cs, int B, int T, int C, int NH, int NKV, int ldq, int ldkv) {
#if defined(KILN_CUDA_EMU) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800)
    if (C / NH == 128) forward_mma_body<128>(out, lse, q, k, v, cs, T, C, NH, NKV, ldq, ldkv);
    else forward_mma_body<64>(out, lse, q, k, v, cs, T, C, NH, NKV, ldq, ldkv);
#else
    __trap();  // mma.sync bf16 and cp.async need sm_80; the wrapper never launches it below that
#endif
}

// dq exactly as attention_backward_dq computes it, on tensor cores (dS rounded to bf16 for the
// dQ product) for head dims 64 and 128 on sm_80+. Grid (ceil(T / 64), NH, B), 128 threads,
// attention_smem_bytes(DQ_MMA, hd) bytes of dynamic shared memory: 55296 at 64, 104448 at 128
// (the wrapper raises the limit). The wrapper launches it only at those head dims.
extern "C" __global__ void __launch_bounds__(128) attention_backward_dq_mma(__nv_bfloat16* dq, const __nv_bfloat16* dout, const __nv_bfloat16* q, const __nv_bfloat16* k, const __nv_bfloat16* v, const float* cs, const float* lse, const float* dsum, int B, int T, int C, int NH, int NKV, int ldq, int ldkv) {
#if defined(KILN_CUDA_EMU) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800)
    if (C / NH == 128) dq_mma_body<128>(dq, dout, q, k, v, cs, lse, dsum, T, C, NH, NKV, ldq, ldkv);
    else dq_mma_body<64>(dq, dout, q, k, v, cs, lse, dsum, T, C, NH, NKV, ldq, ldkv);
#else
    __trap();  // mma.sync bf16 and cp.async need sm_80; the wrapper never launches it below that
#endif
}

// dk and dv exactly as attention_backward_dkdv computes them, on tensor cores (P and dS rounded to
// bf16 for dV = P^T dO and dK = dS^T Q) for head dims 64 and 128 on sm_80+. Grid (ceil(T / 64),
// NKV, B) over key tiles, 128 threads, attention_smem_bytes(DKDV_MMA, hd) bytes of dynamic shared
// memory: 56320 at 64, 105472 at 128 (the wrapper raises the limit).
extern "C" __global__ void __launch_bounds__(128) attention_backward_dkdv_mma(__nv_bfloat16* dk, __nv_bfloat16* dv, const __nv_bfloat16* dout, const __nv_bfloat16* q, const __nv_bfloat16* k, const __nv_bfloat16* v, const float* cs, const float* lse, const float* dsum, int B, int T, int C, int NH, int NKV, int ldq, int ldkv) {
#if defined(KILN_CUDA_EMU) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800)
    if (C / NH == 128) dkdv_mma_body<128>(dk, dv, dout, q, k, v, cs, lse, dsum, T, C, NH, NKV, ldq, ldkv);
    else dkdv_mma_body<64>(dk, dv, dout, q, k, v, cs, lse, dsum, T, C, NH, NKV, ldq, ldkv);
#else
    __trap();  // mma.sync bf16 and cp.async need sm_80; the wrapper never launches it below that
#endif
}

// ---- generation: attention against a key/value cache ----
//
// Caches kc, vc [B, cap, Ckv] bf16 hold the keys and values of positions 0..len of each sequence
// (KV head g at columns g*hd .. (g+1)*hd, as in qkv's key and value parts; Ckv = C without GQA). CPU twins: attention_cache_append and
// attention_decode in src/backend/cpu/attention.rs (same names, same argument order).

// Splits qkv [B, n, C + 2 Ckv] of n new positions: q [B, n, C] (compact, for attention_decode)
// and the key and value parts into rows len .. len + n of kc and vc. One thread per 16 bytes
// (8 bf16) of a packed row: grid ceil(B * n * (C + 2 Ckv) / 8 / 256), 256 threads. C and Ckv are
// multiples of 8 (the wrapper checks), so every row and part starts 16-byte aligned.
extern "C" __global__ void __launch_bounds__(256) attention_cache_append(__nv_bfloat16* q, __nv_bfloat16* kc, __nv_bfloat16* vc, const __nv_bfloat16* qkv, int B, int n, int len, int cap, int C, int CKV) {
    const int64_t w8 = (C + 2 * (int64_t)CKV) / 8;
    const int64_t e = (int64_t)blockIdx.x * 256 + threadIdx.x;
    if (e >= (int64_t)B * n * w8) return;
    const int64_t row = e / w8, col = (e - row * w8) * 8;
    const int64_t b = row / n, t = row - b * n;
    const uint4 v = *reinterpret_cast<const uint4*>(qkv + row * w8 * 8 + col);
    const int64_t dst = (b * cap + len + t) * CKV;
    if (col < C) *reinterpret_cast<uint4*>(q + row * C + col) = v;
    else if (col < C + CKV) *reinterpret_cast<uint4*>(kc + dst + col - C) = v;
    else *reinterpret_cast<uint4*>(vc + dst + col - C - CKV) = v;
}

// out [B, n, C] bf16: query i of sequence b (q [B, n, C]) sits at position len + i and attends,
// causally, to cache rows 0 ..= len + i (which attention_cache_append has filled, its own
// included). Generation feeds one token at a time, so a query is the unit of work: one warp per
// (query, head, batch), grid (n, NH, B), 32 threads; head h reads KV head h / (NH / NKV) of the
// caches [B, cap, NKV hd]. Keys come in tiles of 32, one per lane: lane
// j forms the score of key j0 + j against the query (f32 in shared memory, read by broadcast), the
// warp takes the tile's max with a butterfly, and each lane folds the tile's probabilities (read
// back from shared memory) into its head-dim pairs of the accumulator, as attention_forward's
// online softmax does. Any head dim that is a multiple of 8 up to KILN_ATTN_MAX_HEAD_DIM.
extern "C" __global__ void __launch_bounds__(32) attention_decode(__nv_bfloat16* out, const __nv_bfloat16* q, const __nv_bfloat16* kc, const __nv_bfloat16* vc, int B, int n, int len, int cap, int C, int NH, int NKV) {
    const int hd = C / NH, ckv = NKV * hd;
    const int i = blockIdx.x, h = blockIdx.y, b = blockIdx.z, lane = threadIdx.x;
    const int pos = len + i;
    const float scale = 1.0f / sqrtf((float)hd);
    __shared__ __align__(16) float qs[KILN_ATTN_MAX_HEAD_DIM];
    __shared__ float ps[32];
    const bf16* qrow = q + ((size_t)b * n + i) * C + (size_t)h * hd;
    for (int d = lane; d < hd; d += 32) qs[d] = __bfloat162float(qrow[d]);
    __syncthreads();
    const int g = h / (NH / NKV);
    const bf16* kb = kc + (size_t)b * cap * ckv + (size_t)g * hd;  // key j at kb + j * ckv
    const bf16* vb = vc + (size_t)b * cap * ckv + (size_t)g * hd;
    float m = -INFINITY, l = 0.0f, acc[2 * NP];
#pragma unroll
    for (int e = 0; e < 2 * NP; ++e) acc[e] = 0.0f;
    // Tile 0 holds key 0, which every query sees: the max is finite from the first tile on.
    for (int j0 = 0; j0 <= pos; j0 += TILE) {
        const int j = j0 + lane;
        float s = -INFINITY;
        if (j <= pos) {
            float t = 0.0f;
            for (int c = 0; c < hd / 8; ++c) {
                float y[8];
                unpack8(*reinterpret_cast<const uint4*>(kb + (size_t)j * ckv + c * 8), y);
#pragma unroll
                for (int e = 0; e < 8; ++e) t = fmaf(qs[c * 8 + e], y[e], t);
            }
            s = t * scale;
        }
        const float m_new = attention_online_max(m, warp_max(s));
        const float corr = attention_rescale(m, m_new);
        const float p = attention_prob(s, m_new);
        m = m_new;
        l = l * corr + p;  // the lane's share of the sum; the warp adds the shares at the end
#pragma unroll
        for (int e = 0; e < 2 * NP; ++e) acc[e] *= corr;
        ps[lane] = p;
        __syncthreads();
        const int nj = min(TILE, pos + 1 - j0);
        for (int jj = 0; jj < nj; ++jj) {
            const float pj = ps[jj];
            const bf16* vr = vb + (size_t)(j0 + jj) * ckv;
#pragma unroll
            for (int k = 0; k < NP; ++k) {
                const int pair = lane + 32 * k;
                if (pair < hd / 2) {
                    const float2 f = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(vr + 2 * pair));
                    acc[2 * k] = fmaf(pj, f.x, acc[2 * k]);
                    acc[2 * k + 1] = fmaf(pj, f.y, acc[2 * k + 1]);
                }
            }
        }
        __syncthreads();  // every lane has read ps before the next tile overwrites it
    }
    const float lsum = warp_sum(l);
    store_row<0>(out + ((size_t)b * n + i) * C + (size_t)h * hd, acc, 1.0f / lsum, lane, hd);
}
