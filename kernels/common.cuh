// common.cuh: what every kernel file and every host twin includes.
//
// KILN_HD marks the per-element math that runs on the device inside a kernel and on the host in
// the twins under kernels/host/, which CI compiles and tests against the CPU backend: one
// definition of each formula, checked even on machines that have no GPU.
#pragma once
#include <cuda_bf16.h>
#include <stdint.h>
#include "kiln_kernels.h"

#define KILN_HD __host__ __device__ __forceinline__

// KILN_FLOPS(n): a thread declares n floating-point operations it issues on CUDA cores (an fmaf
// counts 2), where a kernel's math is not on tensor cores and would bound its time. The emulated
// device counts them per launch (kernels/emu/emu.h) for the predicted step; elsewhere it is
// nothing.
#ifndef KILN_FLOPS
#define KILN_FLOPS(n) ((void)0)
#endif

// The larger of two absolute values (or any non-negative values), NaN if either is NaN: the
// CPU's absmax fold (quant::blockwise::absmax), which max's order-independence lets any reduction
// order reproduce.
KILN_HD float kiln_nan_max(float a, float b) {
    if (a != a || b != b) return a != a ? a : b;
    return a > b ? a : b;
}
