// Host twins of kernels/reduce.cuh and a replay of the reduce kernels' fixed summation order,
// compiled for the CPU (build.rs, -ffp-contract=off). CI compares them with
// src/backend/cpu/reduce.rs; on a GPU the kernels must equal the replay bit for bit.
#include "../reduce.cuh"

static double tree(double* s) {
    for (int stride = KILN_REDUCE_THREADS / 2; stride > 0; stride >>= 1)
        for (int t = 0; t < stride; t++) s[t] += s[t + stride];
    return s[0];
}

// How many partial sums (blocks) reduce_sum_squares_partial writes for n elements.
extern "C" int32_t kiln_host_reduce_blocks(int64_t n) { return reduce_blocks(n); }

// The most elements one thread folds in f32 for n elements (the m of reduce.cuh's error bound).
extern "C" int64_t kiln_host_reduce_per_thread(int64_t n) { return reduce_per_thread(n); }

// Replays reduce_sum_squares_partial: writes kiln_host_reduce_blocks(n) partial sums.
extern "C" void kiln_host_reduce_sum_squares_partial(double* partial, const float* x, int64_t n) {
    const int blocks = reduce_blocks(n);
    const int64_t stride = (int64_t)blocks * KILN_REDUCE_THREADS;
    double s[KILN_REDUCE_THREADS];
    for (int b = 0; b < blocks; b++) {
        for (int t = 0; t < KILN_REDUCE_THREADS; t++) {
            float acc = 0.0f;
            for (int64_t i = (int64_t)b * KILN_REDUCE_THREADS + t; i < n; i += stride) acc = reduce_sq_acc(acc, x[i]);
            s[t] = (double)acc;
        }
        partial[b] = tree(s);
    }
}

// Replays reduce_sum_squares_finish over n partial sums.
extern "C" double kiln_host_reduce_sum_squares_finish(const double* partial, int32_t n) {
    double s[KILN_REDUCE_THREADS];
    for (int t = 0; t < KILN_REDUCE_THREADS; t++) {
        double acc = 0.0;
        for (int i = t; i < n; i += KILN_REDUCE_THREADS) acc += partial[i];
        s[t] = acc;
    }
    return tree(s);
}

extern "C" void kiln_host_reduce_scale(float* x, float s, int64_t n) {
    for (int64_t i = 0; i < n; i++) x[i] *= s;
}
