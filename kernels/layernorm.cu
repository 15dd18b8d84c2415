// layernorm.cu: LayerNorm over the last dimension C of a [rows, C] tensor, bf16 in and out, f32
// statistics. y = (x - mean) * rstd * w + b, saving mean and rstd (f32, one per row) for backward.
// CPU twin: src/backend/cpu/layernorm.rs (layernorm_forward, layernorm_backward).
//
// Kernels and work split:
// - layernorm_forward: one warp per row at a time, KILN_LN_BLOCK_ROWS rows per block
//   (KILN_LN_WARPS warps, each taking every 8th). The warp walks its row
//   three times, as row_stats does: the sum (mean), the centred squares (variance; two passes
//   rather than Welford so the arithmetic matches the CPU), then the output. Rows of at most
//   KILN_LN_CACHE_C columns on the 16-byte path are cached: each lane keeps its words of the row
//   in registers (raw bf16, 4 registers a word) for the second and third walks, and w and b are
//   staged in shared memory once per block (the block's barriers), so every input byte is read
//   from global memory once; same arithmetic, same order, same bits as the uncached walks, which
//   wider rows take. The block's mean and rstd values are gathered in shared memory and stored
//   together at the end.
// - layernorm_residual_forward: the same, but the first walk computes h = a + b (rounded to bf16,
//   the value backward will see as x), writes h and sums it; GPT-2 adds the residual and then
//   normalises, so this saves a launch and a read of h.
// - layernorm_backward_dx: one warp per row: the two row means of g w and g w xhat, then dx.
// - layernorm_backward_dwdb_partial + layernorm_backward_dwdb_finish: the parameter gradients,
//   deterministically and without atomics. The partial kernel's block (x = group of
//   KILN_LN_DW_ROWS rows, y = stripe of KILN_LN_DW_THREADS columns) gives each thread one column,
//   which it accumulates over the group's rows in row order; it writes [groups, 2, C] partial sums.
//   The finish kernel adds the groups per column in colsum.cuh's fixed order. The grouping
//   depends only on (rows, C), so the bits are the same on every run and every GPU. Cost: the
//   partial kernel re-reads dout and x (the dx kernel reads them too), i.e. ~1.5x the bytes of a
//   fused kernel that kept dw/db in shared memory; fusing would need per-warp shared copies of
//   dw/db (8 warps * 2 * C floats) to stay deterministic. Left for a measured need.
// Every kernel also has a 16-byte path (8 bf16 per access) taken when C % 8 == 0 and every bf16
// pointer is 16-byte aligned; otherwise the scalar path (one bf16 per lane per step). Both sum a
// row in the same lane-strided way up to the order inside a lane.
//
// Numerics: layernorm.cuh holds the formulas; row sums are lane partials then a butterfly
// (__shfl_xor), so mean/rstd differ from the CPU's serial sums only by summation order.
//
// Test: cargo test --release --features cuda --test layernorm
#include "colsum.cuh"
#include "layernorm.cuh"
#include "vec.cuh"

namespace {

// Sum of one row (lane partials, then the butterfly).
template <bool VEC>
__device__ __forceinline__ float row_sum(const __nv_bfloat16* x, int c, int lane) {
    float s = 0.0f;
    if (VEC) {
        for (int i = 8 * lane; i < c; i += 256) {
            float f[8];
            load8(f, x + i);
#pragma unroll
            for (int j = 0; j < 8; j++) s += f[j];
        }
    } else {
        for (int i = lane; i < c; i += 32) s += __bfloat162float(x[i]);
    }
    return warp_sum(s);
}

// h = bf16(a + r), written to h, and the row sum of h (of the rounded values).
template <bool VEC>
__device__ __forceinline__ float residual_row_sum(__nv_bfloat16* h, const __nv_bfloat16* a, const __nv_bfloat16* r, int c, int lane) {
    float s = 0.0f;
    if (VEC) {
        for (int i = 8 * lane; i < c; i += 256) {
            float fa[8], fr[8];
            load8(fa, a + i);
            load8(fr, r + i);
#pragma unroll
            for (int j = 0; j < 8; j++) fa[j] = __bfloat162float(__float2bfloat16_rn(fa[j] + fr[j]));
            store8(h + i, fa);
#pragma unroll
            for (int j = 0; j < 8; j++) s += fa[j];
        }
    } else {
        for (int i = lane; i < c; i += 32) {
            const __nv_bfloat16 v = __float2bfloat16_rn(__bfloat162float(a[i]) + __bfloat162float(r[i]));
            h[i] = v;
            s += __bfloat162float(v);
        }
    }
    return warp_sum(s);
}

// The rest of a forward row once its sum is known: the centred squares, then the output. The
// lane-to-element mapping is row_sum's, so a lane re-reads only elements it wrote itself when x
// is the h that residual_row_sum just stored.
template <bool VEC>
__device__ __forceinline__ void finish_row(__nv_bfloat16* out, float* mean_out, float* rstd_out, const __nv_bfloat16* x, const __nv_bfloat16* w, const __nv_bfloat16* b, int c, float eps, int lane, float sum) {
    const float mean = ln_mean(sum, c);
    float sq = 0.0f;
    if (VEC) {
        for (int i = 8 * lane; i < c; i += 256) {
            float f[8];
            load8(f, x + i);
#pragma unroll
            for (int j = 0; j < 8; j++) sq += (f[j] - mean) * (f[j] - mean);
        }
    } else {
        for (int i = lane; i < c; i += 32) {
            const float d = __bfloat162float(x[i]) - mean;
            sq += d * d;
        }
    }
    const float rstd = ln_rstd(ln_var(warp_sum(sq), c), eps);
    if (VEC) {
        for (int i = 8 * lane; i < c; i += 256) {
            float f[8], fw[8], fb[8];
            load8(f, x + i);
            load8(fw, w + i);
            load8(fb, b + i);
#pragma unroll
            for (int j = 0; j < 8; j++) f[j] = ln_out(f[j], mean, rstd, fw[j], fb[j]);
            store8(out + i, f);
        }
    } else {
        for (int i = lane; i < c; i += 32) {
            out[i] = __float2bfloat16_rn(ln_out(__bfloat162float(x[i]), mean, rstd, __bfloat162float(w[i]), __bfloat162float(b[i])));
        }
    }
    if (lane == 0) {
        *mean_out = mean;
        *rstd_out = rstd;
    }
}

template <bool VEC>
__device__ __forceinline__ void dx_row(__nv_bfloat16* dx, const __nv_bfloat16* g, const __nv_bfloat16* x, const __nv_bfloat16* w, float mean, float rstd, int c, int lane) {
    float s1 = 0.0f, s2 = 0.0f;
    if (VEC) {
        for (int i = 8 * lane; i < c; i += 256) {
            float fg[8], fx[8], fw[8];
            load8(fg, g + i);
            load8(fx, x + i);
            load8(fw, w + i);
#pragma unroll
            for (int j = 0; j < 8; j++) {
                const float dxhat = fg[j] * fw[j];
                s1 += dxhat;
                s2 += dxhat * ln_xhat(fx[j], mean, rstd);
            }
        }
    } else {
        for (int i = lane; i < c; i += 32) {
            const float dxhat = __bfloat162float(g[i]) * __bfloat162float(w[i]);
            s1 += dxhat;
            s2 += dxhat * ln_xhat(__bfloat162float(x[i]), mean, rstd);
        }
    }
    const float m1 = warp_sum(s1) / (float)c;
    const float m2 = warp_sum(s2) / (float)c;
    if (VEC) {
        for (int i = 8 * lane; i < c; i += 256) {
            float fg[8], fx[8], fw[8];
            load8(fg, g + i);
            load8(fx, x + i);
            load8(fw, w + i);
#pragma unroll
            for (int j = 0; j < 8; j++) fg[j] = ln_dx(fg[j], fw[j], ln_xhat(fx[j], mean, rstd), rstd, m1, m2);
            store8(dx + i, fg);
        }
    } else {
        for (int i = lane; i < c; i += 32) {
            const float xhat = ln_xhat(__bfloat162float(x[i]), mean, rstd);
            dx[i] = __float2bfloat16_rn(ln_dx(__bfloat162float(g[i]), __bfloat162float(w[i]), xhat, rstd, m1, m2));
        }
    }
}

// ---- cached rows (16-byte path, C <= KILN_LN_CACHE_C; rmsnorm.cu has the same for its walks) ----
constexpr int CACHE = KILN_ROW_WORDS;

// finish_row<true> from the cached words and the staged w and b.
__device__ __forceinline__ void cache_finish_row(__nv_bfloat16* out, float* mean_out, float* rstd_out, const uint4 (&xv)[CACHE], const uint4* ws, const uint4* bs, int c, float eps, int lane, float sum) {
    const float mean = ln_mean(sum, c);
    float sq = 0.0f;
#pragma unroll
    for (int k = 0; k < CACHE; k++) {
        if (8 * lane + 256 * k >= c) continue;
        float f[8];
        unpack8(f, xv[k]);
#pragma unroll
        for (int j = 0; j < 8; j++) sq += (f[j] - mean) * (f[j] - mean);
    }
    const float rstd = ln_rstd(ln_var(warp_sum(sq), c), eps);
#pragma unroll
    for (int k = 0; k < CACHE; k++) {
        const int i = 8 * lane + 256 * k;
        if (i >= c) continue;
        float f[8], fw[8], fb[8];
        unpack8(f, xv[k]);
        unpack8(fw, ws[i / 8]);
        unpack8(fb, bs[i / 8]);
#pragma unroll
        for (int j = 0; j < 8; j++) f[j] = ln_out(f[j], mean, rstd, fw[j], fb[j]);
        store8(out + i, f);
    }
    if (lane == 0) {
        *mean_out = mean;
        *rstd_out = rstd;
    }
}

// dx_row<true> with dout and x cached and w staged.
__device__ __forceinline__ void cache_dx_row(__nv_bfloat16* dx, const __nv_bfloat16* g, const __nv_bfloat16* x, const uint4* ws, float mean, float rstd, int c, int lane) {
    uint4 gv[CACHE], xv[CACHE];
    float s1 = 0.0f, s2 = 0.0f;
#pragma unroll
    for (int k = 0; k < CACHE; k++) {
        const int i = 8 * lane + 256 * k;
        if (i >= c) continue;
        gv[k] = *reinterpret_cast<const uint4*>(g + i);
        xv[k] = *reinterpret_cast<const uint4*>(x + i);
        float fg[8], fx[8], fw[8];
        unpack8(fg, gv[k]);
        unpack8(fx, xv[k]);
        unpack8(fw, ws[i / 8]);
#pragma unroll
        for (int j = 0; j < 8; j++) {
            const float dxhat = fg[j] * fw[j];
            s1 += dxhat;
            s2 += dxhat * ln_xhat(fx[j], mean, rstd);
        }
    }
    const float m1 = warp_sum(s1) / (float)c;
    const float m2 = warp_sum(s2) / (float)c;
#pragma unroll
    for (int k = 0; k < CACHE; k++) {
        const int i = 8 * lane + 256 * k;
        if (i >= c) continue;
        float fg[8], fx[8], fw[8];
        unpack8(fg, gv[k]);
        unpack8(fx, xv[k]);
        unpack8(fw, ws[i / 8]);
#pragma unroll
        for (int j = 0; j < 8; j++) fg[j] = ln_dx(fg[j], fw[j], ln_xhat(fx[j], mean, rstd), rstd, m1, m2);
        store8(dx + i, fg);
    }
}

}  // namespace

extern "C" __global__ void __launch_bounds__(KILN_LN_WARPS * 32) layernorm_forward(__nv_bfloat16* out, float* mean, float* rstd, const __nv_bfloat16* x, const __nv_bfloat16* w, const __nv_bfloat16* b, int rows, int c, float eps) {
    __shared__ uint4 ws[KILN_LN_CACHE_C / 8], bs[KILN_LN_CACHE_C / 8];
    const bool vec = c % 8 == 0 && aligned16(out) && aligned16(x) && aligned16(w) && aligned16(b);
    const bool cached = vec && c <= KILN_LN_CACHE_C;  // the same in every thread of the block
    if (cached) {
        stage16(ws, w, c / 8);
        stage16(bs, b, c / 8);
    }
    __shared__ float s_mean[KILN_LN_BLOCK_ROWS], s_rstd[KILN_LN_BLOCK_ROWS];
    const int lane = threadIdx.x & 31;
    const int64_t first = (int64_t)blockIdx.x * KILN_LN_BLOCK_ROWS;
    const int64_t last = ((int64_t)blockIdx.x + 1) * KILN_LN_BLOCK_ROWS, end = last < rows ? last : rows;
    for (int64_t row = first + (threadIdx.x >> 5); row < end; row += KILN_LN_WARPS) {
        const int64_t off = row * c;
        if (cached) {
            uint4 xv[CACHE];
            const float s = cache_row(xv, x + off, c, lane, [](float v) { return v; });
            cache_finish_row(out + off, s_mean + (row - first), s_rstd + (row - first), xv, ws, bs, c, eps, lane, s);
        } else if (vec) {
            const float s = row_sum<true>(x + off, c, lane);
            finish_row<true>(out + off, s_mean + (row - first), s_rstd + (row - first), x + off, w, b, c, eps, lane, s);
        } else {
            const float s = row_sum<false>(x + off, c, lane);
            finish_row<false>(out + off, s_mean + (row - first), s_rstd + (row - first), x + off, w, b, c, eps, lane, s);
        }
    }
    store_block_rows(mean, s_mean, first, end);
    store_block_rows(rstd, s_rstd, first, end);
}

extern "C" __global__ void __launch_bounds__(KILN_LN_WARPS * 32) layernorm_residual_forward(__nv_bfloat16* h, __nv_bfloat16* out, float* mean, float* rstd, const __nv_bfloat16* a, const __nv_bfloat16* r, const __nv_bfloat16* w, const __nv_bfloat16* b, int rows, int c, float eps) {
    __shared__ uint4 ws[KILN_LN_CACHE_C / 8], bs[KILN_LN_CACHE_C / 8];
    const bool vec = c % 8 == 0 && aligned16(h) && aligned16(out) && aligned16(a) && aligned16(r) && aligned16(w) && aligned16(b);
    const bool cached = vec && c <= KILN_LN_CACHE_C;
    if (cached) {
        stage16(ws, w, c / 8);
        stage16(bs, b, c / 8);
    }
    __shared__ float s_mean[KILN_LN_BLOCK_ROWS], s_rstd[KILN_LN_BLOCK_ROWS];
    const int lane = threadIdx.x & 31;
    const int64_t first = (int64_t)blockIdx.x * KILN_LN_BLOCK_ROWS;
    const int64_t last = ((int64_t)blockIdx.x + 1) * KILN_LN_BLOCK_ROWS, end = last < rows ? last : rows;
    for (int64_t row = first + (threadIdx.x >> 5); row < end; row += KILN_LN_WARPS) {
        const int64_t off = row * c;
        if (cached) {
            uint4 hv[CACHE];
            const float s = cache_residual_row(hv, h + off, a + off, r + off, c, lane, [](float v) { return v; });
            cache_finish_row(out + off, s_mean + (row - first), s_rstd + (row - first), hv, ws, bs, c, eps, lane, s);
        } else if (vec) {
            const float s = residual_row_sum<true>(h + off, a + off, r + off, c, lane);
            finish_row<true>(out + off, s_mean + (row - first), s_rstd + (row - first), h + off, w, b, c, eps, lane, s);
        } else {
            const float s = residual_row_sum<false>(h + off, a + off, r + off, c, lane);
            finish_row<false>(out + off, s_mean + (row - first), s_rstd + (row - first), h + off, w, b, c, eps, lane, s);
        }
    }
    store_block_rows(mean, s_mean, first, end);
    store_block_rows(rstd, s_rstd, first, end);
}

extern "C" __global__ void __launch_bounds__(KILN_LN_WARPS * 32) layernorm_backward_dx(__nv_bfloat16* dx, const __nv_bfloat16* dout, const __nv_bfloat16* x, const __nv_bfloat16* w, const float* mean, const float* rstd, int rows, int c) {
    __shared__ uint4 ws[KILN_LN_CACHE_C / 8];
    const bool vec = c % 8 == 0 && aligned16(dx) && aligned16(dout) && aligned16(x) && aligned16(w);
    const bool cached = vec && c <= KILN_LN_CACHE_C;
    if (cached) stage16(ws, w, c / 8);
    const int lane = threadIdx.x & 31;
    const int64_t last = ((int64_t)blockIdx.x + 1) * KILN_LN_BLOCK_ROWS, end = last < rows ? last : rows;
    for (int64_t row = (int64_t)blockIdx.x * KILN_LN_BLOCK_ROWS + (threadIdx.x >> 5); row < end; row += KILN_LN_WARPS) {
        const int64_t off = row * c;
        if (cached) {
            cache_dx_row(dx + off, dout + off, x + off, ws, mean[row], rstd[row], c, lane);
        } else if (vec) {
            dx_row<true>(dx + off, dout + off, x + off, w, mean[row], rstd[row], c, lane);
        } else {
            dx_row<false>(dx + off, dout + off, x + off, w, mean[row], rstd[row], c, lane);
        }
    }
}

// partial[g, 0, col] = sum over the group's rows of dout * xhat, partial[g, 1, col] = of dout.
// Grid (groups, ceil(C / KILN_LN_DW_THREADS)); groups = ceil(rows / KILN_LN_DW_ROWS).
extern "C" __global__ void __launch_bounds__(KILN_LN_DW_THREADS) layernorm_backward_dwdb_partial(float* partial, const __nv_bfloat16* dout, const __nv_bfloat16* x, const float* mean, const float* rstd, int rows, int c) {
    const int col = blockIdx.y * KILN_LN_DW_THREADS + threadIdx.x;
    if (col >= c) return;
    const int r0 = blockIdx.x * KILN_LN_DW_ROWS;
    const int r1 = min(r0 + KILN_LN_DW_ROWS, rows);
    float aw = 0.0f, ab = 0.0f;
    for (int r = r0; r < r1; r++) {
        const int64_t i = (int64_t)r * c + col;
        const float g = __bfloat162float(dout[i]);
        aw = ln_dw_acc(aw, g, ln_xhat(__bfloat162float(x[i]), mean[r], rstd[r]));
        ab += g;
    }
    float* p = partial + (int64_t)blockIdx.x * 2 * c;
    p[col] = aw;
    p[c + col] = ab;
}

// dw[col] = the sum over groups of partial[g, 0, col], db[col] of partial[g, 1, col]
// (colsum.cuh's fixed order, over the 2C columns of partial's rows). Either may be null. Grid
// ceil(2C / 32), block (32, KILN_COLSUM_WARPS).
extern "C" __global__ void __launch_bounds__(32 * KILN_COLSUM_WARPS) layernorm_backward_dwdb_finish(float* dw, float* db, const float* partial, int groups, int c) {
    __shared__ float colsums[KILN_COLSUM_WARPS][32];
    const int col = blockIdx.x * 32 + threadIdx.x;
    float* out = col < c ? dw : db;
    const bool ok = col < 2 * c && out != nullptr;
    const float t = colsum_block(colsums, partial, 2 * static_cast<int64_t>(c), groups, col, ok);
    if (threadIdx.y == 0 && ok) out[col < c ? col : col - c] = t;
}
