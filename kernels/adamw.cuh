// adamw.cuh: the per-element AdamW update and the multi-tensor work split, shared by
// kernels/adamw.cu and its host twins (kernels/host/adamw.cu).
//
// Bit-exactness. kiln_adamw_update repeats optim::adamw::adamw_update (torch's operation order)
// one f32 operation at a time. On the device every operation is an explicitly rounded intrinsic
// (__fmul_rn, __fadd_rn, __fdiv_rn, __fsqrt_rn via elementwise.cuh and below), which nvcc never
// contracts into an FMA; on the host build.rs compiles the twins with -ffp-contract=off, and Rust
// never contracts. IEEE f32 +, -, *, / and sqrt are correctly rounded everywhere, so the device,
// the host twin and the CPU optimizer produce the same bits (denormals kept: no -ftz, no
// --use_fast_math).
#pragma once
#include "common.cuh"
#include "elementwise.cuh"
#ifndef __CUDA_ARCH__
#include <math.h>
#endif

KILN_HD float kiln_sqrt_rn(float x) {
#ifdef __CUDA_ARCH__
    return __fsqrt_rn(x);
#else
    return sqrtf(x);
#endif
}

// One element: p *= decay; m += (1 - b1) (g - m); v = v b2 + (1 - b2) g g;
// p += -step_size * (m / (sqrt(v) / bc2_sqrt + eps)).
KILN_HD void kiln_adamw_update(float* p, float* m, float* v, float g, const AdamWScalars* s) {
    *p = kiln_mul_rn(*p, s->decay);
    *m = kiln_add_rn(*m, kiln_mul_rn(s->one_minus_beta1, kiln_sub_rn(g, *m)));
    *v = kiln_add_rn(kiln_mul_rn(*v, s->beta2), kiln_mul_rn(kiln_mul_rn(s->one_minus_beta2, g), g));
    const float denom = kiln_add_rn(kiln_div_rn(kiln_sqrt_rn(*v), s->bc2_sqrt), s->eps);
    *p = kiln_add_rn(*p, kiln_mul_rn(-s->step_size, kiln_div_rn(*m, denom)));
}

// The tensor that work item w belongs to in a multi-tensor launch: the last of the n_tensors
// descriptors whose `start` field (a prefix sum of work items, non-decreasing; a tensor with no
// work shares its start with the next one and is skipped this way) is <= w. Requires
// 0 <= w < total work items. AdamW's descriptors count chunks, 8-bit AdamW's blocks.
template <typename D>
KILN_HD int32_t kiln_find_tensor(const D* tensors, int32_t n_tensors, int64_t w, int64_t D::*start) {
    int32_t lo = 0, hi = n_tensors - 1;
    while (lo < hi) {
        const int32_t mid = lo + (hi - lo + 1) / 2;
        if (tensors[mid].*start <= w) {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    return lo;
}

KILN_HD int32_t kiln_adamw_find_tensor(const AdamWTensor* tensors, int32_t n_tensors, int64_t w) {
    return kiln_find_tensor(tensors, n_tensors, w, &AdamWTensor::chunk_start);
}

// The share of work item w that thread `lane` of `lanes` updates: elements base + lane,
// base + lane + lanes, ... below the chunk's end, 4 at a time with the loads of the 4 issued
// before any update (independent loads in flight; the pointers are restrict: p, m, v, g and the
// bf16 copy are distinct buffers).
KILN_HD void kiln_adamw_chunk(const AdamWTensor& d, int64_t w, AdamWScalars s, int32_t lane, int32_t lanes) {
    if (!d.decay) s.decay = 1.0f;
    float* __restrict__ p = reinterpret_cast<float*>(d.p);
    float* __restrict__ m = reinterpret_cast<float*>(d.m);
    float* __restrict__ v = reinterpret_cast<float*>(d.v);
    const float* __restrict__ g = reinterpret_cast<const float*>(d.g);
    __nv_bfloat16* __restrict__ pb = reinterpret_cast<__nv_bfloat16*>(d.p_bf16);
    const int64_t base = (w - d.chunk_start) * (int64_t)KILN_ADAMW_CHUNK;
    const int64_t end = base + KILN_ADAMW_CHUNK < d.n ? base + KILN_ADAMW_CHUNK : d.n;
    for (int64_t i0 = base + lane; i0 < end; i0 += 4 * (int64_t)lanes) {
        float pr[4], mr[4], vr[4], gr[4];
#pragma unroll
        for (int k = 0; k < 4; k++) {
            const int64_t i = i0 + k * (int64_t)lanes;
            if (i < end) {
                pr[k] = p[i];
                mr[k] = m[i];
                vr[k] = v[i];
                gr[k] = g[i];
            }
        }
#pragma unroll
        for (int k = 0; k < 4; k++) {
            const int64_t i = i0 + k * (int64_t)lanes;
            if (i < end) {
                kiln_adamw_update(&pr[k], &mr[k], &vr[k], gr[k], &s);
                p[i] = pr[k];
                m[i] = mr[k];
                v[i] = vr[k];
                if (pb != nullptr) pb[i] = __float2bfloat16_rn(pr[k]);
            }
        }
    }
}
