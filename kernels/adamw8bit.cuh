// adamw8bit.cuh: one element of bitsandbytes' 8-bit AdamW (blockwise-quantized moments) and the
// quantization rule, shared by kernels/adamw8bit.cu and its host twin (kernels/host/adamw8bit.cu).
//
// Bit-exactness with the CPU (src/backend/cpu/adamw8bit.rs, itself bitsandbytes-exact):
// - the update is the CPU's, operation for operation: two fused multiply-adds (Rust's mul_add,
//   CUDA's __fmaf_rn, the host's fmaf: all exactly rounded), then explicitly rounded products,
//   quotients, sums and square root (kiln_*_rn, never contracted);
// - a moment is dequantized as map[code] * absmax (one rounded product);
// - requantization finds a value's code as the CPU's table does: s = clamp(x * (1 / absmax), -1, 1)
//   scaled to the nearest of 65536 grid points, and that point's code, the number of the map's
//   midpoints below it (quant::blockwise::CodeLut builds its table entry by entry the same way);
// - the block's absmax is max |x| (NaN if any element is NaN), which is order-independent.
#pragma once
#include "common.cuh"
#include "elementwise.cuh"
#include "adamw.cuh"
#ifndef __CUDA_ARCH__
#include <math.h>
#endif

KILN_HD float kiln_fma_rn(float a, float b, float c) {
#ifdef __CUDA_ARCH__
    return __fmaf_rn(a, b, c);
#else
    return fmaf(a, b, c);
#endif
}

// One element with its (dequantized) moments: the CPU's adamw8bit_update.
//   m = fma(g, 1 - b1, m b1);  v = fma((1 - b2) g, g, v b2)
//   p *= decay;  p += (-step_size m) / (sqrt(v) / bc2_sqrt + eps)
KILN_HD void kiln_adam8_update(float* p, float* m, float* v, float g, const AdamWScalars* s) {
    *m = kiln_fma_rn(g, s->one_minus_beta1, kiln_mul_rn(*m, s->beta1));
    *v = kiln_fma_rn(kiln_mul_rn(s->one_minus_beta2, g), g, kiln_mul_rn(*v, s->beta2));
    const float denom = kiln_add_rn(kiln_div_rn(kiln_sqrt_rn(*v), s->bc2_sqrt), s->eps);
    *p = kiln_mul_rn(*p, s->decay);
    *p = kiln_add_rn(*p, kiln_div_rn(kiln_mul_rn(-s->step_size, *m), denom));
}

// The code of grid point q (of the 65536 points -1 + 2q / 65535 of [-1, 1]): the number of the
// map's 255 midpoints below it, by binary search (midpoints sorted ascending). This is the entry
// CodeLut (quant/blockwise.rs) stores for q, computed the way it computes it, so the device needs
// the midpoints (1 KB) instead of the 64 KB table.
KILN_HD uint8_t kiln_adam8_grid_code(uint32_t q, const float* mids) {
    const float grid = kiln_add_rn(-1.0f, kiln_div_rn(kiln_mul_rn(2.0f, (float)q), 65535.0f));
    int32_t lo = 0, hi = 255;
    while (lo < hi) {
        const int32_t mid = (lo + hi) / 2;
        if (mids[mid] < grid) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    return (uint8_t)lo;
}

// The code of x in a block whose absmax is a (non-zero): CodeLut::code with inv = 1 / a.
KILN_HD uint8_t kiln_adam8_code(float x, float inv, const float* mids) {
    float s = kiln_mul_rn(x, inv);
    if (s != s) return kiln_adam8_grid_code(0, mids);  // NaN: Rust's `as u16` gives 0
    s = s < -1.0f ? -1.0f : (s > 1.0f ? 1.0f : s);
    // (s + 1) * 0.5 * 65535 + 0.5, truncated: in [0.5, 65535.5], so at most 65535
    const float q = kiln_add_rn(kiln_mul_rn(kiln_mul_rn(kiln_add_rn(s, 1.0f), 0.5f), 65535.0f), 0.5f);
    return kiln_adam8_grid_code((uint32_t)q, mids);
}

// The tensor that work item w belongs to: the last descriptor whose block_start <= w.
KILN_HD int32_t kiln_adam8_find_tensor(const Adam8Tensor* tensors, int32_t n_tensors, int64_t w) {
    return kiln_find_tensor(tensors, n_tensors, w, &Adam8Tensor::block_start);
}

// Phase 1 of element i (< d.n) of the tensor: load p, g and the moments (dequantized with the
// block's absmax when 8-bit), update them, store p, and return m and v for requantization.
// `maps` is the signed map (256 floats) then the unsigned one (the start of KILN_ADAM8_TABLES).
KILN_HD void kiln_adam8_element(const Adam8Tensor& d, int64_t i, const float* maps, AdamWScalars s, float* m, float* v) {
    if (!d.decay) s.decay = 1.0f;
    float* p = reinterpret_cast<float*>(d.p);
    const float g = reinterpret_cast<const float*>(d.g)[i];
    float pi = p[i];
    if (d.absmax1 != 0) {
        const int64_t blk = i / KILN_ADAM8_BLOCK;
        *m = kiln_mul_rn(maps[reinterpret_cast<const uint8_t*>(d.state1)[i]], reinterpret_cast<const float*>(d.absmax1)[blk]);
        *v = kiln_mul_rn(maps[256 + reinterpret_cast<const uint8_t*>(d.state2)[i]], reinterpret_cast<const float*>(d.absmax2)[blk]);
    } else {
        *m = reinterpret_cast<const float*>(d.state1)[i];
        *v = reinterpret_cast<const float*>(d.state2)[i];
    }
    kiln_adam8_update(&pi, m, v, g, &s);
    p[i] = pi;
}

// Phase 2 of element i: store the moments, as codes under the block's new absmax a1 (m) and a2
// (v) when 8-bit. `tables` is KILN_ADAM8_TABLES: m's map, v's map, m's midpoints, v's midpoints
// (256 floats each, the midpoints' last one unused).
KILN_HD void kiln_adam8_store(const Adam8Tensor& d, int64_t i, const float* tables, float m, float v, float a1, float a2) {
    if (d.absmax1 != 0) {
        uint8_t* c1 = reinterpret_cast<uint8_t*>(d.state1);
        uint8_t* c2 = reinterpret_cast<uint8_t*>(d.state2);
        // an all-zero block keeps code 0 with absmax 0 (CodeLut::quantize_block)
        c1[i] = a1 == 0.0f ? 0 : kiln_adam8_code(m, kiln_div_rn(1.0f, a1), tables + 512);
        c2[i] = a2 == 0.0f ? 0 : kiln_adam8_code(v, kiln_div_rn(1.0f, a2), tables + 768);
    } else {
        reinterpret_cast<float*>(d.state1)[i] = m;
        reinterpret_cast<float*>(d.state2)[i] = v;
    }
}
