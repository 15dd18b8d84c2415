// Host twins of kernels/adamw.cuh, compiled for the CPU (build.rs, -ffp-contract=off) so CI can
// compare them with src/optim/adamw.rs without a GPU.
#include "../adamw.cuh"

// The per-element update over arrays: kiln_adamw_update on element i of each.
extern "C" void kiln_host_adamw_update(float* p, float* m, float* v, const float* g, const AdamWScalars* s, int64_t n) {
    for (int64_t i = 0; i < n; i++) kiln_adamw_update(&p[i], &m[i], &v[i], g[i], s);
}

// The whole kernel, simulated: every work item in order, every thread of a block in turn, over a
// descriptor table whose addresses point at host memory. Checks the work split (descriptor
// search, chunk bounds, decay flag, bf16 copy) on machines without a GPU.
extern "C" void kiln_host_adamw_step(const AdamWTensor* tensors, int32_t n_tensors, int64_t work_items, AdamWScalars s) {
    for (int64_t w = 0; w < work_items; w++) {
        const AdamWTensor d = tensors[kiln_adamw_find_tensor(tensors, n_tensors, w)];
        for (int32_t t = 0; t < KILN_ADAMW_BLOCK; t++) kiln_adamw_chunk(d, w, s, t, KILN_ADAMW_BLOCK);
    }
}
