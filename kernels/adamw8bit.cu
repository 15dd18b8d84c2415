// adamw8bit.cu: one step of bitsandbytes' 8-bit AdamW (moments as u8 codes with an f32 absmax per
// block of 256) over every trainable tensor in ONE launch; tensors under min_8bit_size keep f32
// moments in the same launch. CPU twin: backend::cpu::adamw8bit::adamw8bit_step (src/backend/
// cpu/adamw8bit.rs), equal bit for bit (adamw8bit.cuh says why).
//
// Work split: every tensor is cut into quantization blocks of KILN_ADAM8_BLOCK elements, one work
// item each (block_start is the prefix sum, as in adamw.cu); a block of KILN_ADAM8_BLOCK threads
// takes work items in a grid-stride loop, one element a thread: dequantize m and v, update them and
// p, then the block's new absmax of |m| and |v| (a warp max by shuffles, then across the 8 warps
// through shared memory), then requantize by a binary search over the map's midpoints. The maps
// and midpoints (4 KB) are copied into shared memory once per block. Two barriers a work item.
//
// Test: cargo test --release --features cuda --test adamw8bit
#include "adamw8bit.cuh"

__device__ __forceinline__ float adam8_warp_absmax(float x) {
    for (int o = 16; o > 0; o >>= 1) x = kiln_nan_max(x, __shfl_xor_sync(0xffffffffu, x, o));
    return x;
}

extern "C" __global__ void __launch_bounds__(KILN_ADAM8_BLOCK) adamw8bit_step(const Adam8Tensor* tensors, int32_t n_tensors, int64_t work_items, const float* tables, AdamWScalars s) {
    __shared__ float warp_max[2][KILN_ADAM8_BLOCK / 32];
    __shared__ float t[KILN_ADAM8_TABLES];
    for (int i = threadIdx.x; i < KILN_ADAM8_TABLES; i += blockDim.x) t[i] = tables[i];
    __syncthreads();
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    for (int64_t w = blockIdx.x; w < work_items; w += gridDim.x) {
        const Adam8Tensor d = tensors[kiln_adam8_find_tensor(tensors, n_tensors, w)];
        const int64_t i = (w - d.block_start) * KILN_ADAM8_BLOCK + threadIdx.x;
        const bool in = i < d.n;
        float m = 0.0f, v = 0.0f;
        if (in) kiln_adam8_element(d, i, t, s, &m, &v);
        float a1 = 0.0f, a2 = 0.0f;
        if (d.absmax1 != 0) {  // the same for the whole block: the barriers below are uniform
            const float w1 = adam8_warp_absmax(fabsf(m)), w2 = adam8_warp_absmax(fabsf(v));
            if (lane == 0) {
                warp_max[0][warp] = w1;
                warp_max[1][warp] = w2;
            }
            __syncthreads();
            for (int k = 0; k < KILN_ADAM8_BLOCK / 32; k++) {
                a1 = kiln_nan_max(a1, warp_max[0][k]);
                a2 = kiln_nan_max(a2, warp_max[1][k]);
            }
            __syncthreads();  // warp_max is read before the next work item writes it
            if (threadIdx.x == 0) {
                const int64_t blk = w - d.block_start;
                reinterpret_cast<float*>(d.absmax1)[blk] = a1;
                reinterpret_cast<float*>(d.absmax2)[blk] = a2;
            }
        }
        if (in) kiln_adam8_store(d, i, t, m, v, a1, a2);
    }
}
