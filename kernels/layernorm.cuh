// layernorm.cuh: the per-element and per-row math of the layernorm family, shared by
// kernels/layernorm.cu and the host twins in kernels/host/layernorm.cu.
//
// Mirroring the CPU (src/backend/cpu/layernorm.rs). row_stats takes two passes, mean = sum / C,
// then var = sum((x - mean)^2) / C (biased, as PyTorch), and rstd = 1 / sqrt(var + eps); the
// forward is (x - mean) * rstd * w + b and backward's dx is
// rstd * (g w - mean(g w) - xhat mean(g w xhat)). The functions below are those formulas one by
// one, with correctly rounded division and square root (nvcc's defaults without --use_fast_math),
// so a host twin that sums in the CPU's order gives the CPU's bits; the kernels sum a row across
// the 32 lanes of a warp, which changes only the order of the row sums.
//
// The parameter-gradient accumulation ln_dw_acc is an explicit fmaf so that the device and the
// host twin (built with -ffp-contract=off) round it identically: the dw/db kernels sum in a fixed
// order that the twin repeats, so the two agree bit for bit.
#pragma once
#include "common.cuh"
#include <math.h>

KILN_HD float ln_mean(float sum, int c) { return sum / (float)c; }

// Biased variance from the sum of centred squares.
KILN_HD float ln_var(float sum_sq_centred, int c) { return sum_sq_centred / (float)c; }

KILN_HD float ln_rstd(float var, float eps) { return 1.0f / sqrtf(var + eps); }

KILN_HD float ln_xhat(float x, float mean, float rstd) { return (x - mean) * rstd; }

KILN_HD float ln_out(float x, float mean, float rstd, float w, float b) { return (x - mean) * rstd * w + b; }

// dx of one element from the two row means (mean of g w and of g w xhat).
KILN_HD float ln_dx(float g, float w, float xhat, float rstd, float mean_dxhat, float mean_dxhat_xhat) {
    return rstd * (g * w - mean_dxhat - xhat * mean_dxhat_xhat);
}

// acc + g * xhat, fused (one rounding) on host and device alike.
KILN_HD float ln_dw_acc(float acc, float g, float xhat) { return fmaf(g, xhat, acc); }
