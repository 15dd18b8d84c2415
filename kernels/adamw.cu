// adamw.cu: one AdamW step (decoupled weight decay, fp32 master weights and moments, torch's
// operation order) over every parameter tensor of a model in ONE launch. CPU twin:
// optim::adamw::adamw_step (src/optim/adamw.rs); the per-element update is kiln_adamw_update in
// adamw.cuh, bit-identical to optim::adamw::adamw_update (see there why).
//
// Work split: the host uploads a table of AdamWTensor descriptors (kiln_kernels.h), one per
// tensor, each cut into chunks of KILN_ADAMW_CHUNK elements; chunk_start is a prefix sum of the
// chunk counts, so the work items 0..work_items are all (tensor, chunk) pairs. Blocks of
// KILN_ADAMW_BLOCK threads take work items in a grid-stride loop; for each, every thread finds the
// tensor by binary search over chunk_start (the same few descriptor loads in every thread, served
// by broadcast from L1), then the block sweeps the chunk: thread t updates elements t, t + 256, ...
// (coalesced f32 loads of p, m, v, g; stores of p, m, v and, if the descriptor has one, the bf16
// copy of p that the forward reads). No shared memory, no atomics: every element is touched by
// exactly one thread. Weight decay is applied only to tensors whose descriptor sets `decay`.
//
// One variant. A multi-tensor launch instead of one per tensor because GPT-2 has ~150 parameter
// tensors, many of them tiny (biases, layernorm weights): per-tensor launches would cost more in
// launch gaps than the update itself.
//
// Test: cargo test --release --features cuda --test adamw
#include "adamw.cuh"

extern "C" __global__ void __launch_bounds__(KILN_ADAMW_BLOCK) adamw_step(const AdamWTensor* tensors, int32_t n_tensors, int64_t work_items, AdamWScalars s) {
    for (int64_t w = blockIdx.x; w < work_items; w += gridDim.x) {
        const AdamWTensor d = tensors[kiln_adamw_find_tensor(tensors, n_tensors, w)];
        kiln_adamw_chunk(d, w, s, (int32_t)threadIdx.x, (int32_t)blockDim.x);
    }
}
