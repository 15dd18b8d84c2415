// reduce.cuh: the arithmetic and the work split of the reduce family, shared by kernels/reduce.cu
// and the host twins in kernels/host/reduce.cu (and, through the twin kiln_host_reduce_blocks, by
// the launch wrapper, so the grid the twin simulates is the grid that runs).
//
// Sum of squares (global gradient norm): each thread folds x*x into an f32 accumulator with one
// fused multiply-add per element (fmaf on host and device alike, so both round identically);
// the block's threads' sums are widened to f64 and added by a halving tree; the per-block f64
// partial sums are added by one block in a fixed order. Every step is a fixed sequence of IEEE
// operations, so a host twin that replays it gives the kernel's bits, and the kernel gives the same
// bits on every run. Error against the exact sum S of squares: the f32 accumulation of m terms
// per thread errs by at most m u S (u = 2^-24); the f64 steps add ~log2(blocks * threads) 2^-53 S.
#pragma once
#include "common.cuh"
#include <math.h>

KILN_HD float reduce_sq_acc(float acc, float x) { return fmaf(x, x, acc); }

// Blocks (= partial sums) for a buffer of n elements: one element per thread up to
// KILN_REDUCE_MAX_BLOCKS blocks; 0 for an empty buffer (which contributes nothing).
KILN_HD int reduce_blocks(int64_t n) {
    const int64_t b = (n + KILN_REDUCE_THREADS - 1) / KILN_REDUCE_THREADS;
    return (int)(b < KILN_REDUCE_MAX_BLOCKS ? b : KILN_REDUCE_MAX_BLOCKS);
}

// The most elements one thread folds for a buffer of n: the m of the error bound above.
KILN_HD int64_t reduce_per_thread(int64_t n) {
    const int64_t threads = (int64_t)reduce_blocks(n) * KILN_REDUCE_THREADS;
    return threads == 0 ? 0 : (n + threads - 1) / threads;
}
