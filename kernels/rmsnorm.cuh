// rmsnorm.cuh: the per-element and per-row math of the RMSNorm family (Llama's norm), shared by
// kernels/rmsnorm.cu and the host twins in kernels/host/rmsnorm.cu.
//
// Mirroring the CPU (src/backend/cpu/rmsnorm.rs): rstd = 1 / sqrt(mean(x^2) + eps) per row,
// y = w * (x * rstd), and backward's dx = rstd * (g w - x rstd m) with m = mean(g w x rstd),
// dw = sum over rows of g (x rstd). The CPU sums the squares in f64 and the kernels in f32 lane
// partials (a C of 2048 sums to within 1e-4 of itself, far inside the bf16 output's rounding);
// everything after the row sums is these functions, with correctly rounded division and square
// root, so a twin given the CPU's mean square gives the CPU's bits.
//
// The weight-gradient accumulation rms_dw_acc is an explicit fmaf, so the device and the host
// twin (built with -ffp-contract=off) round it identically and agree bit for bit.
#pragma once
#include "common.cuh"
#include <math.h>

KILN_HD float rms_rstd(float mean_sq, float eps) { return 1.0f / sqrtf(mean_sq + eps); }

KILN_HD float rms_out(float x, float rstd, float w) { return w * (x * rstd); }

// One term of the row sum m = mean(g w x rstd).
KILN_HD float rms_gwx(float g, float w, float x, float rstd) { return g * w * x * rstd; }

// dx of one element from the row mean m of g w x rstd.
KILN_HD float rms_dx(float g, float w, float x, float rstd, float m) { return rstd * (g * w - x * rstd * m); }

// acc + g * (x rstd), fused (one rounding) on host and device alike.
KILN_HD float rms_dw_acc(float acc, float g, float x, float rstd) { return fmaf(g, x * rstd, acc); }
