// xent.cuh: the per-element math of fused softmax cross-entropy, shared by kernels/xent.cu and the
// host twins in kernels/host/xent.cu.
//
// A row's log-sum-exp is accumulated online as a pair (m, s) = (running max, sum of exp(x - m)):
// each element either adds exp(x - m) or, when it raises the max, rescales s by exp(m_old - x).
// Every lane of a block keeps its own pair over a strided share of the row; pairs merge by
// rescaling both to the larger max. One exp per element and one read of the row, against the CPU
// twin's two passes (max, then sum; src/backend/cpu/xent.rs logsumexp). e^x is expf (correctly
// rounded to within ~2 ulp on host and device) rather than the CPU's fast_exp polynomial: the
// kernel is memory-bound on bf16 logits only if the exp costs a few instructions.
//
// Merging is commutative bit for bit (fmaxf and + are), so a butterfly leaves every lane of a warp
// with the same pair. A pair (-inf, 0) is empty (a lane that got no element); the equality tests
// below keep exp(-inf - -inf) = NaN out of it. Logits are assumed finite.
#pragma once
#include "common.cuh"
#include <math.h>

KILN_HD void xent_online_add(float& m, float& s, float x) {
    if (x > m) {
        s = s * expf(m - x) + 1.0f;
        m = x;
    } else {
        s += expf(x - m);
    }
}

// Raises the running max to mx (when larger) before a group of elements is added with
// xent_online_add: the group's exps then depend on m only, not on each other.
KILN_HD void xent_online_raise(float& m, float& s, float mx) {
    if (mx > m) {
        s = s * expf(m - mx);
        m = mx;
    }
}

KILN_HD void xent_online_merge(float& m, float& s, float m2, float s2) {
    const float mx = fmaxf(m, m2);
    const float a = m == mx ? s : s * expf(m - mx);
    const float b = m2 == mx ? s2 : s2 * expf(m2 - mx);
    m = mx;
    s = a + b;
}

KILN_HD float xent_lse(float m, float s) { return m + logf(s); }

// dlogit of one element: softmax * scale, less scale at the target (the CPU's order of operations).
KILN_HD float xent_grad(float x, float lse, float scale, bool is_target) {
    const float d = expf(x - lse) * scale;
    return is_target ? d - scale : d;
}
