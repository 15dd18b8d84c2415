// Host twin of kernels/nf4.cuh, compiled for the CPU (build.rs, -ffp-contract=off) so CI can
// compare it with src/quant/nf4.rs without a GPU.
#include "../nf4.cuh"
#include <math.h>

// The whole kernel, one packed byte after another.
extern "C" void kiln_host_nf4_dequantize(float* out, const uint8_t* packed, const uint8_t* absmax_codes,
                                         const float* nested_absmax, const float* tables, float offset,
                                         int32_t blocksize, int64_t n_bytes) {
    for (int64_t k = 0; k < n_bytes; k++) {
        const float2 v = kiln_nf4_dequantize_byte(packed, absmax_codes, nested_absmax, tables, offset, blocksize, k);
        out[2 * k] = v.x;
        out[2 * k + 1] = v.y;
    }
}

// The quantization kernel, one block after another (the absmax a fold, as the lanes' maxima are).
extern "C" void kiln_host_nf4_quantize(uint8_t* packed, float* absmax, const float* x, const float* mids,
                                       int32_t blocksize, int64_t n_blocks) {
    for (int64_t b = 0; b < n_blocks; b++) {
        const float* xb = x + b * blocksize;
        float a = 0.0f;
        for (int32_t i = 0; i < blocksize; i++) a = kiln_nan_max(a, fabsf(xb[i]));
        absmax[b] = a;
        for (int32_t k = 0; k < blocksize / 2; k++) packed[b * (blocksize / 2) + k] = kiln_nf4_pack(xb, k, a, mids);
    }
}
