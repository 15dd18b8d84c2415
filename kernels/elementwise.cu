// elementwise.cu: GELU forward/backward, SwiGLU forward/backward, residual add, in-place add and
// dropout on bf16 tensors with f32 arithmetic in between; CPU twin src/backend/cpu/elementwise.rs (same names, same
// argument order). Also, with no CPU twin since the CPU is all f32: an f32 in-place add for f32
// gradients and the f32 <-> bf16 casts between master weights and the bf16 forward.
//
// Work split: every kernel is a grid-stride loop over the flat tensor, one thread per group of 8
// bf16 elements (4 floats for add_assign_f32). When every pointer is 16-byte aligned (8 bytes for
// a u8 mask), a thread moves its group with one 16-byte load or store per operand over the first
// n / 8 * 8 elements, and the last n % 8 go one per thread; an unaligned pointer (a view at an odd
// offset) sends the whole tensor down that scalar loop. No shared memory, no communication between
// threads. The launch (src/backend/cuda/elementwise.rs) gives KILN_ELEMENTWISE_BLOCK threads a
// block and one group per thread, capped at 8 blocks per SM (the loop covers the rest).
//
// Math: the per-element functions come from elementwise.cuh, which repeats the CPU's operations in
// order with explicitly rounded intrinsics, so every f32 result equals the CPU's bit for bit and
// each bf16 output is the round-to-nearest-even of the CPU's f32 value. The price is ~60
// instructions per GELU (no FMA, an IEEE division): a standalone GELU kernel may be bound by
// issue rate rather than by memory on an H200; the GEMM epilogue, where GELU mostly runs, hides it.
// The dropout mask is a counter hash of (seed, element index): no RNG state.
//
// Variants: elementwise_dropout_mask + elementwise_dropout_forward mirror the CPU twin (draw the
// mask, then apply a stored mask); elementwise_dropout draws and applies in one pass and stores the
// mask only if asked (null to skip). Dropout's backward is elementwise_dropout on dout with the same
// seed, or elementwise_dropout_forward on dout with the stored mask.
//
// Test: cargo test --release --features cuda --test elementwise
#include "elementwise.cuh"
#include "vec.cuh"

namespace {

__device__ __forceinline__ int64_t thread_index() { return (int64_t)blockIdx.x * blockDim.x + threadIdx.x; }
__device__ __forceinline__ int64_t thread_stride() { return (int64_t)gridDim.x * blockDim.x; }

}  // namespace

extern "C" __global__ void __launch_bounds__(KILN_ELEMENTWISE_BLOCK) elementwise_gelu_forward(__nv_bfloat16* out, const __nv_bfloat16* inp, int64_t n) {
    int64_t tail = 0;
    if (aligned16(out) && aligned16(inp)) {
        const int64_t groups = n / 8;
        for (int64_t v = thread_index(); v < groups; v += thread_stride()) {
            float x[8];
            load8(x, inp + 8 * v);
#pragma unroll
            for (int j = 0; j < 8; j++) x[j] = kiln_gelu(x[j]);
            store8(out + 8 * v, x);
        }
        tail = groups * 8;
    }
    for (int64_t i = tail + thread_index(); i < n; i += thread_stride()) {
        out[i] = __float2bfloat16_rn(kiln_gelu(__bfloat162float(inp[i])));
    }
}

extern "C" __global__ void __launch_bounds__(KILN_ELEMENTWISE_BLOCK) elementwise_gelu_backward(__nv_bfloat16* dinp, const __nv_bfloat16* inp, const __nv_bfloat16* dout, int64_t n) {
    int64_t tail = 0;
    if (aligned16(dinp) && aligned16(inp) && aligned16(dout)) {
        const int64_t groups = n / 8;
        for (int64_t v = thread_index(); v < groups; v += thread_stride()) {
            float x[8], g[8];
            load8(x, inp + 8 * v);
            load8(g, dout + 8 * v);
#pragma unroll
            for (int j = 0; j < 8; j++) x[j] = kiln_mul_rn(g[j], kiln_gelu_grad(x[j]));
            store8(dinp + 8 * v, x);
        }
        tail = groups * 8;
    }
    for (int64_t i = tail + thread_index(); i < n; i += thread_stride()) {
        const float g = __bfloat162float(dout[i]);
        dinp[i] = __float2bfloat16_rn(kiln_mul_rn(g, kiln_gelu_grad(__bfloat162float(inp[i]))));
    }
}

// out = silu(gate) * up, the Llama MLP's activation.
extern "C" __global__ void __launch_bounds__(KILN_ELEMENTWISE_BLOCK) elementwise_swiglu_forward(__nv_bfloat16* out, const __nv_bfloat16* gate, const __nv_bfloat16* up, int64_t n) {
    int64_t tail = 0;
    if (aligned16(out) && aligned16(gate) && aligned16(up)) {
        const int64_t groups = n / 8;
        for (int64_t v = thread_index(); v < groups; v += thread_stride()) {
            float g[8], u[8];
            load8(g, gate + 8 * v);
            load8(u, up + 8 * v);
#pragma unroll
            for (int j = 0; j < 8; j++) g[j] = kiln_mul_rn(kiln_silu(g[j]), u[j]);
            store8(out + 8 * v, g);
        }
        tail = groups * 8;
    }
    for (int64_t i = tail + thread_index(); i < n; i += thread_stride()) {
        out[i] = __float2bfloat16_rn(kiln_mul_rn(kiln_silu(__bfloat162float(gate[i])), __bfloat162float(up[i])));
    }
}

// dgate = (dout * up) * silu'(gate) and dup = dout * silu(gate), both in one pass.
extern "C" __global__ void __launch_bounds__(KILN_ELEMENTWISE_BLOCK) elementwise_swiglu_backward(__nv_bfloat16* dgate, __nv_bfloat16* dup, const __nv_bfloat16* gate, const __nv_bfloat16* up, const __nv_bfloat16* dout, int64_t n) {
    int64_t tail = 0;
    if (aligned16(dgate) && aligned16(dup) && aligned16(gate) && aligned16(up) && aligned16(dout)) {
        const int64_t groups = n / 8;
        for (int64_t v = thread_index(); v < groups; v += thread_stride()) {
            float g[8], u[8], o[8], dg[8];
            load8(g, gate + 8 * v);
            load8(u, up + 8 * v);
            load8(o, dout + 8 * v);
#pragma unroll
            for (int j = 0; j < 8; j++) {
                dg[j] = kiln_mul_rn(kiln_mul_rn(o[j], u[j]), kiln_silu_grad(g[j]));
                u[j] = kiln_mul_rn(o[j], kiln_silu(g[j]));
            }
            store8(dgate + 8 * v, dg);
            store8(dup + 8 * v, u);
        }
        tail = groups * 8;
    }
    for (int64_t i = tail + thread_index(); i < n; i += thread_stride()) {
        const float g = __bfloat162float(gate[i]), u = __bfloat162float(up[i]), o = __bfloat162float(dout[i]);
        dgate[i] = __float2bfloat16_rn(kiln_mul_rn(kiln_mul_rn(o, u), kiln_silu_grad(g)));
        dup[i] = __float2bfloat16_rn(kiln_mul_rn(o, kiln_silu(g)));
    }
}

extern "C" __global__ void __launch_bounds__(KILN_ELEMENTWISE_BLOCK) elementwise_residual_forward(__nv_bfloat16* out, const __nv_bfloat16* a, const __nv_bfloat16* b, int64_t n) {
    int64_t tail = 0;
    if (aligned16(out) && aligned16(a) && aligned16(b)) {
        const int64_t groups = n / 8;
        for (int64_t v = thread_index(); v < groups; v += thread_stride()) {
            float x[8], y[8];
            load8(x, a + 8 * v);
            load8(y, b + 8 * v);
#pragma unroll
            for (int j = 0; j < 8; j++) x[j] = x[j] + y[j];
            store8(out + 8 * v, x);
        }
        tail = groups * 8;
    }
    for (int64_t i = tail + thread_index(); i < n; i += thread_stride()) {
        out[i] = __float2bfloat16_rn(__bfloat162float(a[i]) + __bfloat162float(b[i]));
    }
}

// dst may not alias src (the Rust wrapper takes &mut dst and &src, so it cannot).
extern "C" __global__ void __launch_bounds__(KILN_ELEMENTWISE_BLOCK) elementwise_add_assign(__nv_bfloat16* dst, const __nv_bfloat16* src, int64_t n) {
    int64_t tail = 0;
    if (aligned16(dst) && aligned16(src)) {
        const int64_t groups = n / 8;
        for (int64_t v = thread_index(); v < groups; v += thread_stride()) {
            float x[8], y[8];
            load8(x, dst + 8 * v);
            load8(y, src + 8 * v);
#pragma unroll
            for (int j = 0; j < 8; j++) x[j] = x[j] + y[j];
            store8(dst + 8 * v, x);
        }
        tail = groups * 8;
    }
    for (int64_t i = tail + thread_index(); i < n; i += thread_stride()) {
        dst[i] = __float2bfloat16_rn(__bfloat162float(dst[i]) + __bfloat162float(src[i]));
    }
}

// The f32 twin of add_assign, for f32 gradients (the tape accumulates parameter gradients in f32):
// 4 floats per 16-byte access.
extern "C" __global__ void __launch_bounds__(KILN_ELEMENTWISE_BLOCK) elementwise_add_assign_f32(float* dst, const float* src, int64_t n) {
    int64_t tail = 0;
    if (aligned16(dst) && aligned16(src)) {
        const int64_t groups = n / 4;
        for (int64_t v = thread_index(); v < groups; v += thread_stride()) {
            float4 x = reinterpret_cast<const float4*>(dst)[v];
            const float4 y = reinterpret_cast<const float4*>(src)[v];
            x.x += y.x;
            x.y += y.y;
            x.z += y.z;
            x.w += y.w;
            reinterpret_cast<float4*>(dst)[v] = x;
        }
        tail = groups * 4;
    }
    for (int64_t i = tail + thread_index(); i < n; i += thread_stride()) dst[i] += src[i];
}

// out = bf16(in), round to nearest even: the bf16 forward copy of an f32 master weight.
extern "C" __global__ void __launch_bounds__(KILN_ELEMENTWISE_BLOCK) elementwise_cast_f32_to_bf16(__nv_bfloat16* out, const float* inp, int64_t n) {
    int64_t tail = 0;
    if (aligned16(out) && aligned16(inp)) {
        const int64_t groups = n / 8;
        for (int64_t v = thread_index(); v < groups; v += thread_stride()) {
            const float4 lo = reinterpret_cast<const float4*>(inp)[2 * v];
            const float4 hi = reinterpret_cast<const float4*>(inp)[2 * v + 1];
            const float x[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
            store8(out + 8 * v, x);
        }
        tail = groups * 8;
    }
    for (int64_t i = tail + thread_index(); i < n; i += thread_stride()) out[i] = __float2bfloat16_rn(inp[i]);
}

// out = f32(in), exact: a bf16 gradient handed back to an f32 master.
extern "C" __global__ void __launch_bounds__(KILN_ELEMENTWISE_BLOCK) elementwise_cast_bf16_to_f32(float* out, const __nv_bfloat16* inp, int64_t n) {
    int64_t tail = 0;
    if (aligned16(out) && aligned16(inp)) {
        const int64_t groups = n / 8;
        for (int64_t v = thread_index(); v < groups; v += thread_stride()) {
            float x[8];
            load8(x, inp + 8 * v);
            reinterpret_cast<float4*>(out)[2 * v] = make_float4(x[0], x[1], x[2], x[3]);
            reinterpret_cast<float4*>(out)[2 * v + 1] = make_float4(x[4], x[5], x[6], x[7]);
        }
        tail = groups * 8;
    }
    for (int64_t i = tail + thread_index(); i < n; i += thread_stride()) out[i] = __bfloat162float(inp[i]);
}

// mask[i] = kiln_dropout_keep(seed, i, p) as 0 or 1. Byte stores from consecutive threads
// coalesce; one thread per element keeps it obviously right.
extern "C" __global__ void __launch_bounds__(KILN_ELEMENTWISE_BLOCK) elementwise_dropout_mask(uint8_t* mask, uint64_t seed, float p, int64_t n) {
    for (int64_t i = thread_index(); i < n; i += thread_stride()) {
        mask[i] = kiln_dropout_keep(seed, (uint64_t)i, p) ? 1 : 0;
    }
}

// out[i] = mask[i] != 0 ? inp[i] * scale : 0, the mask as elementwise_dropout_mask stores it.
extern "C" __global__ void __launch_bounds__(KILN_ELEMENTWISE_BLOCK) elementwise_dropout_forward(__nv_bfloat16* out, const __nv_bfloat16* inp, const uint8_t* mask, float scale, int64_t n) {
    int64_t tail = 0;
    if (aligned16(out) && aligned16(inp) && (reinterpret_cast<uintptr_t>(mask) & 7) == 0) {
        const int64_t groups = n / 8;
        for (int64_t v = thread_index(); v < groups; v += thread_stride()) {
            float x[8];
            load8(x, inp + 8 * v);
            const uint2 mw = *reinterpret_cast<const uint2*>(mask + 8 * v);
            const uint8_t* m = reinterpret_cast<const uint8_t*>(&mw);
#pragma unroll
            for (int j = 0; j < 8; j++) x[j] = m[j] != 0 ? x[j] * scale : 0.0f;
            store8(out + 8 * v, x);
        }
        tail = groups * 8;
    }
    for (int64_t i = tail + thread_index(); i < n; i += thread_stride()) {
        out[i] = __float2bfloat16_rn(mask[i] != 0 ? __bfloat162float(inp[i]) * scale : 0.0f);
    }
}

// Draw and apply in one pass: out[i] = keep(seed, i, p) ? inp[i] * scale : 0, and when mask is
// not null also mask[i] = keep as 0 or 1. Run on dout with the same seed, p and scale it is the
// backward (dinp = dout * mask * scale).
extern "C" __global__ void __launch_bounds__(KILN_ELEMENTWISE_BLOCK) elementwise_dropout(__nv_bfloat16* out, uint8_t* mask, const __nv_bfloat16* inp, uint64_t seed, float p, float scale, int64_t n) {
    int64_t tail = 0;
    if (aligned16(out) && aligned16(inp) && (reinterpret_cast<uintptr_t>(mask) & 7) == 0) {
        const int64_t groups = n / 8;
        for (int64_t v = thread_index(); v < groups; v += thread_stride()) {
            float x[8];
            load8(x, inp + 8 * v);
            uint2 mw;
            uint8_t* m = reinterpret_cast<uint8_t*>(&mw);
#pragma unroll
            for (int j = 0; j < 8; j++) {
                const bool keep = kiln_dropout_keep(seed, (uint64_t)(8 * v + j), p);
                m[j] = keep ? 1 : 0;
                x[j] = keep ? x[j] * scale : 0.0f;
            }
            store8(out + 8 * v, x);
            if (mask != nullptr) *reinterpret_cast<uint2*>(mask + 8 * v) = mw;
        }
        tail = groups * 8;
    }
    for (int64_t i = tail + thread_index(); i < n; i += thread_stride()) {
        const bool keep = kiln_dropout_keep(seed, (uint64_t)i, p);
        out[i] = __float2bfloat16_rn(keep ? __bfloat162float(inp[i]) * scale : 0.0f);
        if (mask != nullptr) mask[i] = keep ? 1 : 0;
    }
}
