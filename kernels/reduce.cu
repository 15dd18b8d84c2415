// reduce.cu: the reductions behind clipping by global gradient norm: the sum of squares over many
// f32 gradient buffers (deterministic, f64 result), and x *= s. CPU twin:
// src/backend/cpu/reduce.rs (sum_squares, scale), which src/tape.rs (Gradients::global_norm and
// ::scale) calls once per gradient.
//
// Kernels and work split:
// - reduce_sum_squares_partial: stage one, launched once per buffer with reduce_blocks(n) blocks
//   (reduce.cuh: at most KILN_REDUCE_MAX_BLOCKS) of KILN_REDUCE_THREADS threads. A thread folds
//   elements i, i + blocks * threads, ... into an f32 sum of squares (fmaf); the block adds its
//   threads' sums in f64 by a halving tree in shared memory and writes one f64 partial sum into
//   its slot of a partials buffer (each buffer has its own range of slots).
// - reduce_sum_squares_finish: stage two, one block: thread j adds the partials j, j + threads, ...
//   in order (f64), then the halving tree; writes the total. All buffers' partials end in one
//   total, so a training step with ~150 gradient tensors does one download, not 150.
// - reduce_scale: x *= s, a grid-stride loop, 16-byte accesses when x is 16-byte aligned.
// Deterministic by construction: no atomics, and the grid depends on n alone (not on the GPU), so
// run to run and GPU to GPU the total has the same bits, which equal the host twin's replay
// (kernels/host/reduce.cu). Not bitwise the CPU's f64 sum: the bound is in reduce.cuh.
//
// Test: cargo test --release --features cuda --test reduce
#include "reduce.cuh"

namespace {

// The halving tree over s[0 .. KILN_REDUCE_THREADS): s[0] holds the sum afterwards.
__device__ __forceinline__ void block_tree(double* s) {
#pragma unroll
    for (int stride = KILN_REDUCE_THREADS / 2; stride > 0; stride >>= 1) {
        if ((int)threadIdx.x < stride) s[threadIdx.x] += s[threadIdx.x + stride];
        __syncthreads();
    }
}

}  // namespace

extern "C" __global__ void __launch_bounds__(KILN_REDUCE_THREADS) reduce_sum_squares_partial(double* partial, const float* x, int64_t n) {
    __shared__ double s[KILN_REDUCE_THREADS];
    const int64_t stride = (int64_t)gridDim.x * KILN_REDUCE_THREADS;
    float acc = 0.0f;
    for (int64_t i = (int64_t)blockIdx.x * KILN_REDUCE_THREADS + threadIdx.x; i < n; i += stride) acc = reduce_sq_acc(acc, x[i]);
    s[threadIdx.x] = (double)acc;
    __syncthreads();
    block_tree(s);
    if (threadIdx.x == 0) partial[blockIdx.x] = s[0];
}

// Launch with one block. out[0] = the sum of partial[0 .. n).
extern "C" __global__ void __launch_bounds__(KILN_REDUCE_THREADS) reduce_sum_squares_finish(double* out, const double* partial, int n) {
    __shared__ double s[KILN_REDUCE_THREADS];
    double acc = 0.0;
    for (int i = threadIdx.x; i < n; i += KILN_REDUCE_THREADS) acc += partial[i];
    s[threadIdx.x] = acc;
    __syncthreads();
    block_tree(s);
    if (threadIdx.x == 0) out[0] = s[0];
}

extern "C" __global__ void __launch_bounds__(KILN_REDUCE_THREADS) reduce_scale(float* x, float s, int64_t n) {
    const int64_t stride = (int64_t)gridDim.x * KILN_REDUCE_THREADS;
    const int64_t first = (int64_t)blockIdx.x * KILN_REDUCE_THREADS + threadIdx.x;
    int64_t done = 0;
    if ((reinterpret_cast<uintptr_t>(x) & 15) == 0) {
        float4* x4 = reinterpret_cast<float4*>(x);
        for (int64_t i = first; i < n / 4; i += stride) {
            float4 v = x4[i];
            v.x *= s;
            v.y *= s;
            v.z *= s;
            v.w *= s;
            x4[i] = v;
        }
        done = n / 4 * 4;
    }
    for (int64_t i = done + first; i < n; i += stride) x[i] *= s;
}
