// gemm.cuh: the per-element epilogue of the GEMM family, shared by kernels/gemm.cu (both the
// tensor-core and the naive kernel) and the host twin in kernels/host/gemm.cu.
//
// For each output element, with acc the f32 dot product of row i of op(A) and column j of op(B):
//   v   = acc (+ bias[j]) (+ out_old[i, j] when accumulating)   -- f32, single rounded adds
//   pre = v                  (stored only when a pre-activation buffer is given)
//   out = gelu(v) or v       (GELU when KILN_GEMM_GELU is set)
// and both pre and out are rounded to the output type (bf16 round-to-nearest-even, or kept f32).
// This is cpu::gemm::matmul_forward's epilogue (bias first, then the product; GELU of the f32
// pre-activation) and cpu::gemm::matmul's `accumulate`; GELU is elementwise.cuh's kiln_gelu, which
// gives cpu::elementwise::gelu's bits.
#pragma once
#include "common.cuh"
#include "elementwise.cuh"

// The pre-activation v: the product, plus the bias, plus the old output when accumulating.
// Bias first mirrors matmul_forward (which fills out with the bias, then adds the product).
KILN_HD float kiln_gemm_preact(float acc, bool has_bias, float bias, bool accumulate, float old) {
    float v = has_bias ? kiln_add_rn(bias, acc) : acc;
    return accumulate ? kiln_add_rn(old, v) : v;
}

// The activation applied to the pre-activation.
KILN_HD float kiln_gemm_activate(float v, bool gelu) { return gelu ? kiln_gelu(v) : v; }

// The value an output of the given type holds: v itself in f32, v rounded to nearest-even in bf16.
KILN_HD float kiln_gemm_round(float v, bool out_f32) {
    return out_f32 ? v : __bfloat162float(__float2bfloat16_rn(v));
}
