// rmsnorm.cu: RMSNorm over the last dimension C of a [rows, C] tensor, bf16 in and out, f32 rstd
// (one per row) kept for backward. y = w * (x * rstd), rstd = 1 / sqrt(mean(x^2) + eps).
// CPU twin: src/backend/cpu/rmsnorm.rs (rmsnorm_forward, rmsnorm_backward).
//
// Kernels and work split, as layernorm.cu (whose launch constants KILN_LN_* they share):
// - rmsnorm_forward: one warp per row at a time, KILN_LN_BLOCK_ROWS rows per block (KILN_LN_WARPS
//   warps, each taking every 8th). The warp walks its row twice: the sum of squares, then the
//   output. The block's rstd values are gathered in shared memory and stored together at the end.
// - rmsnorm_residual_forward: the first walk computes h = a + r (rounded to bf16, the value
//   backward sees as x), writes h and sums its squares. A Llama block adds each sublayer's output
//   to the residual stream and normalises the sum for the next sublayer: one launch and one read
//   of h fewer than add then norm.
// - rmsnorm_backward_dx: one warp per row: the row mean of g w x rstd, then dx.
// - rmsnorm_backward_dw_partial + rmsnorm_backward_dw_finish: dw deterministically, without
//   atomics: the partial kernel's block (x = group of KILN_LN_DW_ROWS rows, y = stripe of
//   KILN_LN_DW_THREADS columns) gives each thread one column, accumulated over the group's rows in
//   row order, into [groups, C]; the finish kernel adds the groups in colsum.cuh's fixed order.
//   The grouping depends only on (rows, C): the same bits on every run and every GPU.
// Every kernel has a 16-byte path (8 bf16 per access) taken when C % 8 == 0 and every bf16 pointer
// is 16-byte aligned, otherwise one bf16 per lane per step. On the 16-byte path, rows of at most
// KILN_LN_CACHE_C columns are cached: each lane keeps its words of the row in registers between
// the walks (as raw bf16, 4 registers a word), and w is staged in shared memory once per block of
// KILN_LN_BLOCK_ROWS rows, so x, a, r, h, dout and w are each read from global memory once (the
// emulator's sector count shows it). The arithmetic and its order are the uncached walks', so
// both give the same bits. Wider rows walk twice.
//
// Test: cargo test --release --features cuda --test rmsnorm
#include "colsum.cuh"
#include "rmsnorm.cuh"
#include "vec.cuh"

namespace {

// Sum of squares of one row (lane partials, then the butterfly).
template <bool VEC>
__device__ __forceinline__ float row_sumsq(const __nv_bfloat16* x, int c, int lane) {
    float s = 0.0f;
    if (VEC) {
        for (int i = 8 * lane; i < c; i += 256) {
            float f[8];
            load8(f, x + i);
#pragma unroll
            for (int j = 0; j < 8; j++) s += f[j] * f[j];
        }
    } else {
        for (int i = lane; i < c; i += 32) {
            const float v = __bfloat162float(x[i]);
            s += v * v;
        }
    }
    return warp_sum(s);
}

// h = bf16(a + r), written to h, and the sum of squares of h (of the rounded values).
template <bool VEC>
__device__ __forceinline__ float residual_row_sumsq(__nv_bfloat16* h, const __nv_bfloat16* a, const __nv_bfloat16* r, int c, int lane) {
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
            for (int j = 0; j < 8; j++) s += fa[j] * fa[j];
        }
    } else {
        for (int i = lane; i < c; i += 32) {
            const __nv_bfloat16 v = __float2bfloat16_rn(__bfloat162float(a[i]) + __bfloat162float(r[i]));
            h[i] = v;
            const float f = __bfloat162float(v);
            s += f * f;
        }
    }
    return warp_sum(s);
}

// The output of a row once its sum of squares is known. The lane-to-element mapping is the
// sums', so a lane re-reads only elements it wrote itself when x is the h just stored.
template <bool VEC>
__device__ __forceinline__ void finish_row(__nv_bfloat16* out, float* rstd_out, const __nv_bfloat16* x, const __nv_bfloat16* w, int c, float eps, int lane, float sumsq) {
    const float rstd = rms_rstd(sumsq / (float)c, eps);
    if (VEC) {
        for (int i = 8 * lane; i < c; i += 256) {
            float f[8], fw[8];
            load8(f, x + i);
            load8(fw, w + i);
#pragma unroll
            for (int j = 0; j < 8; j++) f[j] = rms_out(f[j], rstd, fw[j]);
            store8(out + i, f);
        }
    } else {
        for (int i = lane; i < c; i += 32) out[i] = __float2bfloat16_rn(rms_out(__bfloat162float(x[i]), rstd, __bfloat162float(w[i])));
    }
    if (lane == 0) *rstd_out = rstd;
}

template <bool VEC>
__device__ __forceinline__ void dx_row(__nv_bfloat16* dx, const __nv_bfloat16* g, const __nv_bfloat16* x, const __nv_bfloat16* w, float rstd, int c, int lane) {
    float s = 0.0f;
    if (VEC) {
        for (int i = 8 * lane; i < c; i += 256) {
            float fg[8], fx[8], fw[8];
            load8(fg, g + i);
            load8(fx, x + i);
            load8(fw, w + i);
#pragma unroll
            for (int j = 0; j < 8; j++) s += rms_gwx(fg[j], fw[j], fx[j], rstd);
        }
    } else {
        for (int i = lane; i < c; i += 32) s += rms_gwx(__bfloat162float(g[i]), __bfloat162float(w[i]), __bfloat162float(x[i]), rstd);
    }
    const float m = warp_sum(s) / (float)c;
    if (VEC) {
        for (int i = 8 * lane; i < c; i += 256) {
            float fg[8], fx[8], fw[8];
            load8(fg, g + i);
            load8(fx, x + i);
            load8(fw, w + i);
#pragma unroll
            for (int j = 0; j < 8; j++) fg[j] = rms_dx(fg[j], fw[j], fx[j], rstd, m);
            store8(dx + i, fg);
        }
    } else {
        for (int i = lane; i < c; i += 32) {
            dx[i] = __float2bfloat16_rn(rms_dx(__bfloat162float(g[i]), __bfloat162float(w[i]), __bfloat162float(x[i]), rstd, m));
        }
    }
}

// ---- cached rows (16-byte path, C <= KILN_LN_CACHE_C) ----
constexpr int CACHE = KILN_ROW_WORDS;

// finish_row<true> from the cached words and the staged w.
__device__ __forceinline__ void cache_finish_row(__nv_bfloat16* out, float* rstd_out, const uint4 (&xv)[CACHE], const uint4* ws, int c, float eps, int lane, float sumsq) {
    const float rstd = rms_rstd(sumsq / (float)c, eps);
#pragma unroll
    for (int k = 0; k < CACHE; k++) {
        const int i = 8 * lane + 256 * k;
        if (i >= c) continue;
        float f[8], fw[8];
        unpack8(f, xv[k]);
        unpack8(fw, ws[i / 8]);
#pragma unroll
        for (int j = 0; j < 8; j++) f[j] = rms_out(f[j], rstd, fw[j]);
        store8(out + i, f);
    }
    if (lane == 0) *rstd_out = rstd;
}

// dx_row<true> with dout and x cached and w staged.
__device__ __forceinline__ void cache_dx_row(__nv_bfloat16* dx, const __nv_bfloat16* g, const __nv_bfloat16* x, const uint4* ws, float rstd, int c, int lane) {
    uint4 gv[CACHE], xv[CACHE];
    float s = 0.0f;
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
        for (int j = 0; j < 8; j++) s += rms_gwx(fg[j], fw[j], fx[j], rstd);
    }
    const float m = warp_sum(s) / (float)c;
#pragma unroll
    for (int k = 0; k < CACHE; k++) {
        const int i = 8 * lane + 256 * k;
        if (i >= c) continue;
        float fg[8], fx[8], fw[8];
        unpack8(fg, gv[k]);
        unpack8(fx, xv[k]);
        unpack8(fw, ws[i / 8]);
#pragma unroll
        for (int j = 0; j < 8; j++) fg[j] = rms_dx(fg[j], fw[j], fx[j], rstd, m);
        store8(dx + i, fg);
    }
}

}  // namespace

extern "C" __global__ void __launch_bounds__(KILN_LN_WARPS * 32) rmsnorm_forward(__nv_bfloat16* out, float* rstd, const __nv_bfloat16* x, const __nv_bfloat16* w, int rows, int c, float eps) {
    __shared__ uint4 ws[KILN_LN_CACHE_C / 8];
    const bool vec = c % 8 == 0 && aligned16(out) && aligned16(x) && aligned16(w);
    const bool cached = vec && c <= KILN_LN_CACHE_C;  // the same in every thread of the block
    if (cached) stage16(ws, w, c / 8);
    __shared__ float s_rstd[KILN_LN_BLOCK_ROWS];
    const int lane = threadIdx.x & 31;
    const int64_t first = (int64_t)blockIdx.x * KILN_LN_BLOCK_ROWS;
    const int64_t last = ((int64_t)blockIdx.x + 1) * KILN_LN_BLOCK_ROWS, end = last < rows ? last : rows;
    for (int64_t row = first + (threadIdx.x >> 5); row < end; row += KILN_LN_WARPS) {
        const int64_t off = row * c;
        if (cached) {
            uint4 xv[CACHE];
            const float s = cache_row(xv, x + off, c, lane, [](float v) { return v * v; });
            cache_finish_row(out + off, s_rstd + (row - first), xv, ws, c, eps, lane, s);
        } else if (vec) {
            finish_row<true>(out + off, s_rstd + (row - first), x + off, w, c, eps, lane, row_sumsq<true>(x + off, c, lane));
        } else {
            finish_row<false>(out + off, s_rstd + (row - first), x + off, w, c, eps, lane, row_sumsq<false>(x + off, c, lane));
        }
    }
    store_block_rows(rstd, s_rstd, first, end);
}

extern "C" __global__ void __launch_bounds__(KILN_LN_WARPS * 32) rmsnorm_residual_forward(__nv_bfloat16* h, __nv_bfloat16* out, float* rstd, const __nv_bfloat16* a, const __nv_bfloat16* r, const __nv_bfloat16* w, int rows, int c, float eps) {
    __shared__ uint4 ws[KILN_LN_CACHE_C / 8];
    const bool vec = c % 8 == 0 && aligned16(h) && aligned16(out) && aligned16(a) && aligned16(r) && aligned16(w);
    const bool cached = vec && c <= KILN_LN_CACHE_C;
    if (cached) stage16(ws, w, c / 8);
    __shared__ float s_rstd[KILN_LN_BLOCK_ROWS];
    const int lane = threadIdx.x & 31;
    const int64_t first = (int64_t)blockIdx.x * KILN_LN_BLOCK_ROWS;
    const int64_t last = ((int64_t)blockIdx.x + 1) * KILN_LN_BLOCK_ROWS, end = last < rows ? last : rows;
    for (int64_t row = first + (threadIdx.x >> 5); row < end; row += KILN_LN_WARPS) {
        const int64_t off = row * c;
        if (cached) {
            uint4 hv[CACHE];
            const float s = cache_residual_row(hv, h + off, a + off, r + off, c, lane, [](float v) { return v * v; });
            cache_finish_row(out + off, s_rstd + (row - first), hv, ws, c, eps, lane, s);
        } else if (vec) {
            const float s = residual_row_sumsq<true>(h + off, a + off, r + off, c, lane);
            finish_row<true>(out + off, s_rstd + (row - first), h + off, w, c, eps, lane, s);
        } else {
            const float s = residual_row_sumsq<false>(h + off, a + off, r + off, c, lane);
            finish_row<false>(out + off, s_rstd + (row - first), h + off, w, c, eps, lane, s);
        }
    }
    store_block_rows(rstd, s_rstd, first, end);
}

extern "C" __global__ void __launch_bounds__(KILN_LN_WARPS * 32) rmsnorm_backward_dx(__nv_bfloat16* dx, const __nv_bfloat16* dout, const __nv_bfloat16* x, const __nv_bfloat16* w, const float* rstd, int rows, int c) {
    __shared__ uint4 ws[KILN_LN_CACHE_C / 8];
    const bool vec = c % 8 == 0 && aligned16(dx) && aligned16(dout) && aligned16(x) && aligned16(w);
    const bool cached = vec && c <= KILN_LN_CACHE_C;
    if (cached) stage16(ws, w, c / 8);
    const int lane = threadIdx.x & 31;
    const int64_t last = ((int64_t)blockIdx.x + 1) * KILN_LN_BLOCK_ROWS, end = last < rows ? last : rows;
    for (int64_t row = (int64_t)blockIdx.x * KILN_LN_BLOCK_ROWS + (threadIdx.x >> 5); row < end; row += KILN_LN_WARPS) {
        const int64_t off = row * c;
        if (cached) {
            cache_dx_row(dx + off, dout + off, x + off, ws, rstd[row], c, lane);
        } else if (vec) {
            dx_row<true>(dx + off, dout + off, x + off, w, rstd[row], c, lane);
        } else {
            dx_row<false>(dx + off, dout + off, x + off, w, rstd[row], c, lane);
        }
    }
}

// partial[g, col] = sum over the group's rows of dout * (x rstd).
// Grid (groups, ceil(C / KILN_LN_DW_THREADS)); groups = ceil(rows / KILN_LN_DW_ROWS).
extern "C" __global__ void __launch_bounds__(KILN_LN_DW_THREADS) rmsnorm_backward_dw_partial(float* partial, const __nv_bfloat16* dout, const __nv_bfloat16* x, const float* rstd, int rows, int c) {
    const int col = blockIdx.y * KILN_LN_DW_THREADS + threadIdx.x;
    if (col >= c) return;
    const int r0 = blockIdx.x * KILN_LN_DW_ROWS;
    const int r1 = min(r0 + KILN_LN_DW_ROWS, rows);
    float acc = 0.0f;
    for (int r = r0; r < r1; r++) {
        const int64_t i = (int64_t)r * c + col;
        acc = rms_dw_acc(acc, __bfloat162float(dout[i]), __bfloat162float(x[i]), rstd[r]);
    }
    partial[(int64_t)blockIdx.x * c + col] = acc;
}

// dw[col] = sum over groups (in order) of partial[g, col].
extern "C" __global__ void __launch_bounds__(32 * KILN_COLSUM_WARPS) rmsnorm_backward_dw_finish(float* dw, const float* partial, int groups, int c) {
    __shared__ float colsums[KILN_COLSUM_WARPS][32];
    const int col = blockIdx.x * 32 + threadIdx.x;
    const float t = colsum_block(colsums, partial, c, groups, col, col < c);
    if (threadIdx.y == 0 && col < c) dw[col] = t;
}
