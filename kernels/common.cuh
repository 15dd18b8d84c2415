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
