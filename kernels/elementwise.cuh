// elementwise.cuh: the per-element math of the elementwise family (GELU, SwiGLU, dropout), shared by
// kernels/elementwise.cu, the GEMM epilogue (kernels/gemm.cu includes this for GELU) and the host
// twins in kernels/host/elementwise.cu.
//
// Mirroring the CPU. src/backend/cpu/elementwise.rs computes GELU with its own polynomial e^x
// (fast_exp) rather than libm, so the functions below repeat that arithmetic operation for
// operation, in the same order, with the same f32 constants. On the device every operation goes
// through an explicitly rounded intrinsic (__fmul_rn, __fadd_rn, __fdiv_rn), which nvcc never
// contracts into an FMA; on the host the twins are compiled with -ffp-contract=off (build.rs). So
// kiln_gelu gives the same bits as cpu::gelu on the host and on the device, and the only
// difference left between a kernel and the CPU backend is the bf16 rounding of inputs/outputs.
// tanhf / tanh.approx were the alternative: tanh.approx errs by ~2^-11 relative, libm tanhf
// differs between host and device; neither could be checked bit for bit against the CPU.
//
// The dropout rule is integer arithmetic (splitmix64's finaliser over the element index) plus one
// exact float compare, so the device mask equals cpu::dropout_keep bit for bit by construction.
#pragma once
#include "common.cuh"
#ifndef __CUDA_ARCH__
#include <math.h>
#include <string.h>
#endif

#ifndef KILN_RN_DEFINED
#define KILN_RN_DEFINED
// Single f32 operations, rounded to nearest and never fused with their neighbours.
KILN_HD float kiln_mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
    return __fmul_rn(a, b);
#else
    return a * b;
#endif
}
KILN_HD float kiln_add_rn(float a, float b) {
#ifdef __CUDA_ARCH__
    return __fadd_rn(a, b);
#else
    return a + b;
#endif
}
KILN_HD float kiln_sub_rn(float a, float b) {
#ifdef __CUDA_ARCH__
    return __fsub_rn(a, b);
#else
    return a - b;
#endif
}
KILN_HD float kiln_div_rn(float a, float b) {
#ifdef __CUDA_ARCH__
    return __fdiv_rn(a, b);
#else
    return a / b;
#endif
}
KILN_HD float kiln_bits_as_float(uint32_t u) {
#ifdef __CUDA_ARCH__
    return __uint_as_float(u);
#else
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
#endif
}
#endif  // KILN_RN_DEFINED

#ifndef KILN_GELU_DEFINED
#define KILN_GELU_DEFINED
// e^x as cpu::fast_exp: x = k ln2 + r, e^r by Taylor to r^7, 2^k in the exponent bits.
KILN_HD float kiln_gelu_exp(float x) {
    const float LOG2E = 1.44269504088896340736f;
    const float LN2_HI = 0.69314575f;
    const float LN2_LO = 1.4286068e-6f;
    const float ROUND = 12582912.0f;  // 1.5 * 2^23: adding and removing it rounds to an integer
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);  // Rust's clamp: NaN passes through
    const float k = kiln_sub_rn(kiln_add_rn(kiln_mul_rn(x, LOG2E), ROUND), ROUND);
    const float r = kiln_sub_rn(kiln_sub_rn(x, kiln_mul_rn(k, LN2_HI)), kiln_mul_rn(k, LN2_LO));
    float p = kiln_add_rn(1.0f / 720.0f, kiln_mul_rn(r, 1.0f / 5040.0f));
    p = kiln_add_rn(1.0f / 120.0f, kiln_mul_rn(r, p));
    p = kiln_add_rn(1.0f / 24.0f, kiln_mul_rn(r, p));
    p = kiln_add_rn(1.0f / 6.0f, kiln_mul_rn(r, p));
    p = kiln_add_rn(0.5f, kiln_mul_rn(r, p));
    p = kiln_add_rn(1.0f, kiln_mul_rn(r, p));
    p = kiln_add_rn(1.0f, kiln_mul_rn(r, p));
    return kiln_mul_rn(p, kiln_bits_as_float((uint32_t)((int32_t)k + 127) << 23));
}

// tanh as cpu::fast_tanh: sign(u) (1 - 2 / (e^{2|u|} + 1)).
KILN_HD float kiln_gelu_tanh(float u) {
    float a = u < 0.0f ? -u : u;
    a = a < 20.0f ? a : 20.0f;  // f32::min(NaN, 20) is 20, and so is this
    const float e = kiln_gelu_exp(kiln_mul_rn(2.0f, a));
    return copysignf(kiln_sub_rn(1.0f, kiln_div_rn(2.0f, kiln_add_rn(e, 1.0f))), u);
}

// GELU, tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))); cpu::gelu's bits.
KILN_HD float kiln_gelu(float x) {
    const float K = 0.7978846f;  // sqrt(2 / pi)
    const float C = 0.044715f;
    const float u = kiln_mul_rn(K, kiln_add_rn(x, kiln_mul_rn(kiln_mul_rn(kiln_mul_rn(C, x), x), x)));
    return kiln_mul_rn(kiln_mul_rn(0.5f, x), kiln_add_rn(1.0f, kiln_gelu_tanh(u)));
}

// d gelu / dx; cpu::gelu_grad's bits.
KILN_HD float kiln_gelu_grad(float x) {
    const float K = 0.7978846f;
    const float C = 0.044715f;
    const float u = kiln_mul_rn(K, kiln_add_rn(x, kiln_mul_rn(kiln_mul_rn(kiln_mul_rn(C, x), x), x)));
    const float t = kiln_gelu_tanh(u);
    const float du = kiln_mul_rn(K, kiln_add_rn(1.0f, kiln_mul_rn(kiln_mul_rn(3.0f * C, x), x)));
    const float left = kiln_mul_rn(0.5f, kiln_add_rn(1.0f, t));
    const float right = kiln_mul_rn(kiln_mul_rn(kiln_mul_rn(0.5f, x), kiln_sub_rn(1.0f, kiln_mul_rn(t, t))), du);
    return kiln_add_rn(left, right);
}
#endif  // KILN_GELU_DEFINED

#ifndef KILN_SILU_DEFINED
#define KILN_SILU_DEFINED
// SwiGLU's gate, silu(g) = g sigmoid(g), sigmoid(g) = 1 / (1 + e^-g) with e^x as cpu::fast_exp;
// cpu::sigmoid, silu and silu_grad's bits.
KILN_HD float kiln_sigmoid(float g) { return kiln_div_rn(1.0f, kiln_add_rn(1.0f, kiln_gelu_exp(-g))); }
KILN_HD float kiln_silu(float g) { return kiln_mul_rn(g, kiln_sigmoid(g)); }
KILN_HD float kiln_silu_grad(float g) {
    const float s = kiln_sigmoid(g);
    return kiln_mul_rn(s, kiln_add_rn(1.0f, kiln_mul_rn(g, kiln_sub_rn(1.0f, s))));
}
#endif  // KILN_SILU_DEFINED

// Whether element i survives dropout with probability p of dropping under `seed`: splitmix64's
// finaliser over the counter, its top 24 bits as a uniform in [0, 1). cpu::dropout_keep's rule.
KILN_HD bool kiln_dropout_keep(uint64_t seed, uint64_t i, float p) {
    uint64_t z = seed + (i + 1) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    // (z >> 40) < 2^24 converts exactly and the scale is a power of two: the product is exact.
    return (float)(uint32_t)(z >> 40) * (1.0f / 16777216.0f) >= p;
}
