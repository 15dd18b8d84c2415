// nf4.cu: NF4 quantization (nf4_quantize: `kiln quantize`, QLoRA's base on the device) and
// dequantization (QLoRA's frozen base weights) in bitsandbytes' double-quantized
// layout, to f32 (nf4_dequantize) or to bf16 for the bf16 GEMMs (nf4_dequantize_bf16). CPU twin: quant::nf4::Nf4Weight::dequantize_into (src/quant/nf4.rs), which it
// equals bit for bit (nf4.cuh says why).
//
// Work split: one thread per packed byte (two elements), blocks of KILN_NF4_THREADS, a grid-stride
// loop. Each thread reads its byte, its block's absmax code and nested scale (shared by the 32
// threads of a 64-element block: one sector, served from L1) and the tables (1 KB, L1-resident),
// and writes its two f32s as one float2. No shared memory, no atomics.
//
// Test: cargo test --release --features cuda --test nf4
#include "nf4.cuh"

extern "C" __global__ void __launch_bounds__(KILN_NF4_THREADS) nf4_dequantize(float* out, const uint8_t* packed, const uint8_t* absmax_codes, const float* nested_absmax, const float* tables, float offset, int32_t blocksize, int64_t n_bytes) {
    for (int64_t k = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; k < n_bytes; k += (int64_t)gridDim.x * blockDim.x) {
        // out is 256-byte aligned (the allocator) and 2k even: an aligned 8-byte store, so a warp
        // writes 256 contiguous bytes in one request.
        reinterpret_cast<float2*>(out)[k] =
            kiln_nf4_dequantize_byte(packed, absmax_codes, nested_absmax, tables, offset, blocksize, k);
    }
}

// The same values rounded to bf16 (nearest even), what a bf16 GEMM reads: one 4-byte
// __nv_bfloat162 store per thread.
extern "C" __global__ void __launch_bounds__(KILN_NF4_THREADS) nf4_dequantize_bf16(__nv_bfloat16* out, const uint8_t* packed, const uint8_t* absmax_codes, const float* nested_absmax, const float* tables, float offset, int32_t blocksize, int64_t n_bytes) {
    for (int64_t k = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; k < n_bytes; k += (int64_t)gridDim.x * blockDim.x) {
        const float2 v = kiln_nf4_dequantize_byte(packed, absmax_codes, nested_absmax, tables, offset, blocksize, k);
        reinterpret_cast<__nv_bfloat162*>(out)[k] = __floats2bfloat162_rn(v.x, v.y);
    }
}

// Quantization, one warp per block of `blocksize` elements (32 to 4096): the lanes fold max |x|
// over the block (lane i takes elements i, i + 32, ...), a shuffle reduction gives every lane the
// block's absmax, lane 0 stores it, and the lanes pack the block's bytes (lane i takes bytes
// i, i + 32, ...). Blocks of KILN_NF4_THREADS / 32 warps, a grid-stride loop over quantization
// blocks; the loop is uniform within a warp, so every shuffle has its whole warp.
extern "C" __global__ void __launch_bounds__(KILN_NF4_THREADS) nf4_quantize(uint8_t* packed, float* absmax, const float* x, const float* mids, int32_t blocksize, int64_t n_blocks) {
    const int lane = threadIdx.x % 32;
    const int64_t warps = (int64_t)gridDim.x * (blockDim.x / 32);
    for (int64_t b = (int64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32; b < n_blocks; b += warps) {
        const float* xb = x + b * blocksize;
        float a = 0.0f;
        for (int32_t i = lane; i < blocksize; i += 32) a = kiln_nan_max(a, fabsf(xb[i]));
        for (int o = 16; o > 0; o >>= 1) a = kiln_nan_max(a, __shfl_xor_sync(0xffffffffu, a, o));
        if (lane == 0) absmax[b] = a;
        for (int32_t k = lane; k < blocksize / 2; k += 32) packed[b * (blocksize / 2) + k] = kiln_nf4_pack(xb, k, a, mids);
    }
}
