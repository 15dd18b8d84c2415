// Host twin of kernels/adamw8bit.cuh, compiled for the CPU (build.rs, -ffp-contract=off) so CI can
// compare it with src/backend/cpu/adamw8bit.rs without a GPU.
#include "../adamw8bit.cuh"

// The whole kernel, simulated: every work item in order; within one, every thread's update, the
// block's absmax (a fold: max is order-independent), then every thread's requantization.
extern "C" void kiln_host_adamw8bit_step(const Adam8Tensor* tensors, int32_t n_tensors, int64_t work_items,
                                         const float* tables, AdamWScalars s) {
    float m[KILN_ADAM8_BLOCK], v[KILN_ADAM8_BLOCK];
    for (int64_t w = 0; w < work_items; w++) {
        const Adam8Tensor d = tensors[kiln_adam8_find_tensor(tensors, n_tensors, w)];
        const int64_t base = (w - d.block_start) * KILN_ADAM8_BLOCK;
        float a1 = 0.0f, a2 = 0.0f;
        for (int t = 0; t < KILN_ADAM8_BLOCK; t++) {
            m[t] = v[t] = 0.0f;
            if (base + t < d.n) kiln_adam8_element(d, base + t, tables, s, &m[t], &v[t]);
            a1 = kiln_nan_max(a1, fabsf(m[t]));
            a2 = kiln_nan_max(a2, fabsf(v[t]));
        }
        if (d.absmax1 != 0) {
            reinterpret_cast<float*>(d.absmax1)[w - d.block_start] = a1;
            reinterpret_cast<float*>(d.absmax2)[w - d.block_start] = a2;
        }
        for (int t = 0; t < KILN_ADAM8_BLOCK && base + t < d.n; t++) kiln_adam8_store(d, base + t, tables, m[t], v[t], a1, a2);
    }
}

// The code of grid point q under one map's 255 midpoints (the binary search the kernel does).
extern "C" uint8_t kiln_host_adam8_grid_code(uint32_t q, const float* mids) { return kiln_adam8_grid_code(q, mids); }
