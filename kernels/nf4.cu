// nf4.cu: NF4 quantization (nf4_quantize: `kiln quantize`, QLoRA's base on the device) and
// dequantization (QLoRA's frozen base weights) in bitsandbytes' double-quantized
// layout, to f32 (nf4_dequantize) or to bf16 for the bf16 GEMMs (nf4_dequantize_bf16). CPU twin: quant::nf4::Nf4Weight::dequantize_into (src/quant/nf4.rs), which it
// equals bit for bit (nf4.cuh says why).
//
// Dequantization work split: one thread per 16 bytes of output (4 f32 or 8 bf16 elements), blocks
// of KILN_NF4_THREADS, a grid-stride loop. Each thread reads its packed bytes, its block's absmax
// code and nested scale (shared by the threads of a block of elements, served from L1) and the
// tables (copied into shared memory), and writes one 16-byte store. No atomics.
//
// Test: cargo test --release --features cuda --test nf4
#include "nf4.cuh"

// Both dequantization kernels copy the tables (1 KB) into shared memory once per block: each
// thread's lookups (its block's absmax code, its nibbles) are then bank reads, not gathers from
// global memory. Each thread writes 16 contiguous bytes per step, so a warp's store is 512
// contiguous bytes: in f32 that is 4 elements (2 packed bytes, one 2-byte load), in bf16 8
// elements (a 4-byte load).
__device__ __forceinline__ void nf4_tables_to_shared(float* s, const float* g) {
    for (int i = threadIdx.x; i < KILN_NF4_TABLE_LEN; i += blockDim.x) s[i] = g[i];
    __syncthreads();
}

extern "C" __global__ void __launch_bounds__(KILN_NF4_THREADS) nf4_dequantize(float* out, const uint8_t* packed, const uint8_t* absmax_codes, const float* nested_absmax, const float* tables_g, float offset, int32_t blocksize, int64_t n_units) {
    __shared__ float tables[KILN_NF4_TABLE_LEN];
    nf4_tables_to_shared(tables, tables_g);
    for (int64_t j = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; j < n_units; j += (int64_t)gridDim.x * blockDim.x) {
        float v[4];
        // packed and out are 256-byte aligned (the allocator): every access below is aligned.
        kiln_nf4_dequantize_word<2>(v, reinterpret_cast<const uint16_t*>(packed)[j], absmax_codes, nested_absmax, tables, offset, blocksize, j);
        reinterpret_cast<float4*>(out)[j] = make_float4(v[0], v[1], v[2], v[3]);
    }
}

// The same values rounded to bf16 (nearest even), what a bf16 GEMM reads.
extern "C" __global__ void __launch_bounds__(KILN_NF4_THREADS) nf4_dequantize_bf16(__nv_bfloat16* out, const uint8_t* packed, const uint8_t* absmax_codes, const float* nested_absmax, const float* tables_g, float offset, int32_t blocksize, int64_t n_units) {
    __shared__ float tables[KILN_NF4_TABLE_LEN];
    nf4_tables_to_shared(tables, tables_g);
    for (int64_t j = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; j < n_units; j += (int64_t)gridDim.x * blockDim.x) {
        float v[8];
        kiln_nf4_dequantize_word<4>(v, reinterpret_cast<const uint32_t*>(packed)[j], absmax_codes, nested_absmax, tables, offset, blocksize, j);
        __align__(16) __nv_bfloat162 h[4];
        for (int b = 0; b < 4; b++) h[b] = __floats2bfloat162_rn(v[2 * b], v[2 * b + 1]);
        reinterpret_cast<uint4*>(out)[j] = *reinterpret_cast<const uint4*>(h);
    }
}

// Quantization, one warp per block of `blocksize` elements (32 to 4096): the lanes fold max |x|
// over the block (lane i takes element pairs i, i + 32, ...), a shuffle reduction gives every lane
// the block's absmax, lane 0 stores it, and the lanes pack the block's bytes (lane i takes bytes
// i, i + 32, ...). Blocks of KILN_NF4_THREADS / 32 warps, a grid-stride loop over quantization
// blocks; the loop is uniform within a warp, so every shuffle has its whole warp.
extern "C" __global__ void __launch_bounds__(KILN_NF4_THREADS) nf4_quantize(uint8_t* packed, float* absmax, const float* x, const float* mids_g, int32_t blocksize, int64_t n_blocks) {
    const int lane = threadIdx.x % 32;
    // The midpoints in registers (every code compares against all 15): one load by 15 lanes,
    // then shuffled to every lane.
    const float mine = mids_g[lane < 15 ? lane : 0];
    float mids[15];
#pragma unroll
    for (int k = 0; k < 15; k++) mids[k] = __shfl_sync(0xffffffffu, mine, k);
    const int64_t warps = (int64_t)gridDim.x * (blockDim.x / 32);
    for (int64_t b = (int64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32; b < n_blocks; b += warps) {
        // element pairs as 8-byte loads (x is 256-byte aligned and blocksize even): a warp reads
        // 256 contiguous bytes per request
        const float2* xb = reinterpret_cast<const float2*>(x + b * blocksize);
        float a = 0.0f;
        for (int32_t k = lane; k < blocksize / 2; k += 32) {
            const float2 p = xb[k];
            a = kiln_nan_max(a, kiln_nan_max(fabsf(p.x), fabsf(p.y)));
        }
        for (int o = 16; o > 0; o >>= 1) a = kiln_nan_max(a, __shfl_xor_sync(0xffffffffu, a, o));
        if (lane == 0) absmax[b] = a;
        // the second pass re-reads the block (from L1 on a GPU: it was just read)
        for (int32_t k = lane; k < blocksize / 2; k += 32) {
            const float2 p = xb[k];
            packed[b * (blocksize / 2) + k] = kiln_nf4_pack(p.x, p.y, a, mids);
        }
    }
}
